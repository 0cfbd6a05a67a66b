"""One dynamic partition per seed file; every per-record asset shares it."""

import dagster as dg

SEED_SHARDS = "seed_shards"
seed_shards = dg.DynamicPartitionsDefinition(name=SEED_SHARDS)

# Backfills put up to this many shards into one run, so GPU models load once per run.
SHARD_BACKFILL = dg.BackfillPolicy.multi_run(max_partitions_per_run=8)
