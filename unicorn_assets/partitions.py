"""One dynamic partition per seed file; every per-record asset shares it."""

import dagster as dg

SEED_SHARDS = "seed_shards"
seed_shards = dg.DynamicPartitionsDefinition(name=SEED_SHARDS)

# Backfills put up to this many shards into one run, so GPU models load once per run.
SHARD_BACKFILL = dg.BackfillPolicy.multi_run(max_partitions_per_run=8)
# The seeds get a policy of their own, so that a backfill reads them in runs apart from Stage 1
# (Dagster groups only assets with equal policies into one run). A seed shard that fails (its
# file, strict parsing, or the seed gates) is then left out of Stage 1 alone, and Stage 1 onwards
# runs for the healthy shards of its run. Reading seeds is cheap, so more shards share a run.
SEED_BACKFILL = dg.BackfillPolicy.multi_run(max_partitions_per_run=32)

# Steps that hold a model on the local GPU (CLIP, SDXL) ask Kubernetes for one under the
# k8s_job_executor; node selection and memory come from the executor's step_k8s_config (Helm
# values). LLM steps reach a served model in a cluster and need none: they only share pool "gpu".
GPU_OP_TAGS = {"dagster-k8s/config": {
    "container_config": {"resources": {"limits": {"nvidia.com/gpu": 1}}},
    "pod_spec_config": {"tolerations": [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
}}

# Steps that call a model retry a failed call (a lost server, a CUDA error) twice, backing off
# from 10 s; a failed check or a refused key is raised as not retryable.
MODEL_RETRY = dg.RetryPolicy(max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL)
