"""Thresholds of the asset checks. Defaults hold for the offline 135M model; see README for the
stricter values meant for real models."""

from __future__ import annotations

import dagster as dg


class QualityGates(dg.ConfigurableResource):
    max_null_rate: float = 0.0
    seed_max_reject_rate: float = 0.25
    caption_max_reject_rate: float = 0.9
    caption_min_median_words: float = 20
    caption_max_median_words: float = 220
    caption_max_p95_words: float = 300
    max_near_duplicate_rate: float = 0.02
    near_duplicate_threshold: float = 0.85
    # Stage 2 instructions
    instruction_max_reject_rate: float = 0.9
    instruction_min_json_validity: float = 0.8  # share of attempts that gave schema-valid JSON
    instruction_mix_tolerance: float = 0.05  # plus 3 binomial standard errors
    # Stage 3: unit-norm embeddings within this of 1 (fp16 encoders are normalised in fp32), and
    # the mean of the shifted (unnormalised) text embeddings within this L2 distance of its target
    embedding_norm_tolerance: float = 1e-3
    transfer_mean_tolerance: float = 1e-4
    # SynthVLM: median CLIPScore floor of the rendered images (0 for untrained encoders; README)
    synthvlm_min_median_clipscore: float = 0.0
