"""Per-shard assets run over `context.partition_keys`: one key in a normal run, several in a
backfill run (BackfillPolicy), so a model is loaded once per run, not once per shard."""

from collections.abc import Sequence

import polars as pl


def split_by_shard(frame: pl.DataFrame, keys: Sequence[str]) -> dict[str, pl.DataFrame]:
    """{key: the rows of that shard}, with an empty frame (same schema) for a shard with none."""
    parts = frame.partition_by("shard", as_dict=True, maintain_order=True)
    return {key: parts.get((key,), frame.clear()) for key in keys}


def concat(frames: dict[str, pl.DataFrame]) -> pl.DataFrame:
    return pl.concat(list(frames.values()), how="vertical") if frames else pl.DataFrame()
