"""Per-shard assets run over `context.partition_keys`: one key in a normal run, several in a
backfill run (BackfillPolicy), so a model is loaded once per run, not once per shard."""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import dagster as dg
import polars as pl

from unicorn_resources.storage import ParquetIOManager

# The tag Dagster reads a materialisation's code version from (a documented tag name; its
# constant lives in a private module).
CODE_VERSION_TAG = "dagster/code_version"


def split_by_shard(frame: pl.DataFrame, keys: Sequence[str]) -> dict[str, pl.DataFrame]:
    """{key: the rows of that shard}, with an empty frame (same schema) for a shard with none."""
    parts = frame.partition_by("shard", as_dict=True, maintain_order=True)
    return {key: parts.get((key,), frame.clear()) for key in keys}


def concat(frames: dict[str, pl.DataFrame]) -> pl.DataFrame:
    return pl.concat(list(frames.values()), how="vertical") if frames else pl.DataFrame()


def fail_some_shards(context: dg.AssetExecutionContext,
                     outputs: Mapping[str, Mapping[str, pl.DataFrame]],
                     metadata_for: Mapping[str, Callable[[str], dict[str, Any]]],
                     failed: Mapping[str, str], run_metadata: Mapping[str, Any]) -> NoReturn:
    """Ends a multi-shard step some of whose shards failed: stores the given outputs
    ({asset: {shard: frame}}: every output of a healthy shard, and whatever of a failed shard is
    worth keeping, such as its rejects) and records each as materialised with its own metadata,
    then fails the step with a message that names each failed shard, why, and what to do.

    Dagster records the partitions of an Output all or none, so the healthy shards cannot go out
    as the step's Outputs; this stores them through the IO manager and reports one
    AssetMaterialization per shard instead. What is not stored keeps its earlier data."""
    healthy = [key for key in context.partition_keys if key not in failed]
    io_manager = context.resources.io_manager
    if not isinstance(io_manager, ParquetIOManager):  # cannot store outside an Output
        outputs = {}
    for asset, frames in outputs.items():
        spec = context.assets_def.specs_by_key[dg.AssetKey(asset)]
        tags = {CODE_VERSION_TAG: spec.code_version or context.run_id}
        uris = io_manager.store_shards(asset, dict(frames), log=context.log) if frames else {}
        for key, uri in uris.items():
            context.log_event(dg.AssetMaterialization(
                asset_key=asset, partition=key, tags=tags,
                metadata={**metadata_for[asset](key), **run_metadata,
                          "path": dg.MetadataValue.path(uri)}))

    def kept(key: str) -> str:
        assets = [asset for asset, frames in outputs.items() if key in frames]
        return f" (stored all the same: {', '.join(assets)})" if assets else ""

    listing = "\n".join(f"- {key}: " + why.replace("\n", "\n  ") + kept(key)
                        for key, why in failed.items())
    stored = (f"The other {len(healthy)} ({', '.join(healthy)}) were stored and recorded as "
              "materialised. Dagster runs a step for all of a run's shards or none, so their "
              "downstream steps did not run in this run: a backfill goes on with them in its "
              "next runs; otherwise materialise them, or leave them to the nightly regeneration, "
              "which asks for just those." if healthy else "No other shard was stored.")
    raise dg.Failure(
        description=f"{len(failed)} of {len(context.partition_keys)} shard(s) failed; what "
        f"of them is not stored keeps its earlier data:\n{listing}\nFix each as its message "
        f"says, then materialise it again. {stored}",
        metadata={"failed_shards": dg.MetadataValue.json(dict(failed)),
                  "stored_shards": dg.MetadataValue.json(healthy)},
        allow_retries=False)
