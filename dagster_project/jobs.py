"""Jobs: the per-shard Unicorn pipeline, and the corpus-wide assets that span every shard."""

import dagster as dg

from dagster_project.partitions import seed_shards

SHARD_GROUPS = ["unicorn_seeds", "unicorn_stage1"]

unicorn_shard_job = dg.define_asset_job(
    "unicorn_shard_job",
    selection=dg.AssetSelection.groups(*SHARD_GROUPS),
    partitions_def=seed_shards,
    description="Seeds -> Stage 1 for one seed shard (one run per shard; backfill for many).",
)

JOBS = [unicorn_shard_job]
