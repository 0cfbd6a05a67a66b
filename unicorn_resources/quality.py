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
