"""One dynamic partition per seed file; every per-record asset shares it."""

import dagster as dg

SEED_SHARDS = "seed_shards"
seed_shards = dg.DynamicPartitionsDefinition(name=SEED_SHARDS)
