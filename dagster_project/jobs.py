"""Jobs: the per-shard Unicorn pipeline, and the corpus-wide assets that span every shard."""

import dagster as dg

from unicorn_assets.partitions import seed_shards

SHARD_GROUPS = ["unicorn_seeds", "unicorn_stage1", "unicorn_stage2", "unicorn_stage3"]
CORPUS_GROUPS = ["unicorn_corpus"]

unicorn_shard_job = dg.define_asset_job(
    "unicorn_shard_job",
    selection=dg.AssetSelection.groups(*SHARD_GROUPS),
    partitions_def=seed_shards,
    description="Seeds -> Stage 1 -> Stage 2 -> caption embeddings for one seed shard (one run "
    "per shard; backfill for many).",
)

unicorn_corpus_job = dg.define_asset_job(
    "unicorn_corpus_job",
    selection=dg.AssetSelection.groups(*CORPUS_GROUPS),
    description="Over every shard: corpus embedding statistics -> mean-shift transfer -> the "
    "pretrain and instruct exports. Run it after the shards it should include.",
)

JOBS = [unicorn_shard_job, unicorn_corpus_job]

# The SynthVLM branch: off the nightly job, in the Definitions only when the profile enables it.
synthvlm_job = dg.define_asset_job(
    "synthvlm_job",
    selection=dg.AssetSelection.assets("synthvlm_candidates", "synthetic_images", "image_scores"),
    partitions_def=seed_shards,
    description="SynthVLM per shard: choose captions, render them with SDXL, score the images "
    "(CLIPScore, SSIM). Needs Stage 1's expanded_captions of the shard.",
)
synthvlm_corpus_job = dg.define_asset_job(
    "synthvlm_corpus_job",
    selection=dg.AssetSelection.assets("synthvlm_selection", "synthvlm_dataset"),
    description="SynthVLM over every shard: best-of-N and top-fraction selection, LLaVA export.",
)
SYNTHVLM_JOBS = [synthvlm_job, synthvlm_corpus_job]
