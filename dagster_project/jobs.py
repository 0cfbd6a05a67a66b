"""Jobs: the per-shard Unicorn pipeline, and the corpus-wide assets that span every shard.

`build_jobs(run_configs)` makes them with the profile's `run_config.<job name>` as each job's
default config; the module-level jobs carry none.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import dagster as dg

from unicorn_assets.partitions import seed_shards

# The shard job holds the seeds (backfill runs of up to 32 shards) and the model stages (up to
# 8): by design, since a backfill reads seeds in runs of their own (unicorn_assets/partitions.py).
# A run of the job itself takes the smaller policy, which is right; Dagster warns of it on
# every resolution, which would fill each command's screen.
warnings.filterwarnings("ignore", message=r"Asset job \w+ materializes assets with varying "
                        r"BackfillPolicies", category=UserWarning)

SHARD_GROUPS = ["unicorn_seeds", "unicorn_stage1", "unicorn_stage2", "unicorn_stage3"]
CORPUS_GROUPS = ["unicorn_corpus"]


def build_jobs(run_configs: Mapping[str, Any] | None = None, synthvlm: bool = False
               ) -> list[dg.UnresolvedAssetJobDefinition]:
    """The jobs (SynthVLM's too when `synthvlm`), each with `run_configs[its name]` as default
    config: runs of the job without config of their own use it, and the launchpad shows it."""
    configs = run_configs or {}
    return [dg.define_asset_job(**{**spec, "config": configs.get(spec["name"])})
            for spec in (JOB_SPECS + (SYNTHVLM_JOB_SPECS if synthvlm else []))]


UNICORN_SHARD_JOB = {
    "name": "unicorn_shard_job",
    "selection": dg.AssetSelection.groups(*SHARD_GROUPS),
    "partitions_def": seed_shards,
    "description": "Seeds -> Stage 1 -> Stage 2 -> caption embeddings for one seed shard (one run "
    "per shard; backfill for many).",
}
UNICORN_CORPUS_JOB = {
    "name": "unicorn_corpus_job",
    "selection": dg.AssetSelection.groups(*CORPUS_GROUPS),
    "description": "Over every shard: corpus embedding statistics -> mean-shift transfer -> the "
    "pretrain and instruct exports; the quality and alignment reports. Run it after the shards it "
    "should include.",
}
JOB_SPECS = [UNICORN_SHARD_JOB, UNICORN_CORPUS_JOB]

# The SynthVLM branch: off the nightly job, in the Definitions only when the profile enables it.
SYNTHVLM_JOB = {
    "name": "synthvlm_job",
    "selection": dg.AssetSelection.assets("synthvlm_candidates", "synthetic_images",
                                          "image_scores"),
    "partitions_def": seed_shards,
    "description": "SynthVLM per shard: choose captions, render them with SDXL, score the images "
    "(clipped CLIP cosine, CLIPScore, SSIM). Needs Stage 1's expanded_captions of the shard.",
}
SYNTHVLM_CORPUS_JOB = {
    "name": "synthvlm_corpus_job",
    "selection": dg.AssetSelection.assets("synthvlm_selection", "synthvlm_dataset"),
    "description": "SynthVLM over every shard: best-of-N and top-fraction selection, LLaVA export.",
}
SYNTHVLM_JOB_SPECS = [SYNTHVLM_JOB, SYNTHVLM_CORPUS_JOB]

JOBS = build_jobs()
unicorn_shard_job, unicorn_corpus_job = JOBS
SYNTHVLM_JOBS = build_jobs(synthvlm=True)[len(JOBS):]
synthvlm_job, synthvlm_corpus_job = SYNTHVLM_JOBS
