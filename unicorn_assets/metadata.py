"""Materialisation metadata shared by every asset: row count, schema, and a Markdown sample."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import dagster as dg
import polars as pl


def markdown_table(frame: pl.DataFrame, columns: Sequence[str] | None = None, rows: int = 5,
                   width: int = 160) -> str:
    sample = frame.select(columns) if columns else frame
    sample = sample.head(rows).with_columns(pl.col(pl.String).str.replace_all(r"\|", "/"))
    with pl.Config(tbl_formatting="ASCII_MARKDOWN", tbl_hide_column_data_types=True,
                   tbl_hide_dataframe_shape=True, fmt_str_lengths=width, tbl_width_chars=10_000,
                   tbl_cols=-1, tbl_rows=rows):
        return str(sample)


def table_schema(schema: pl.Schema) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(name, str(dtype)) for name, dtype in schema.items()])


def frame_metadata(frame: pl.DataFrame, sample_columns: Sequence[str] | None = None,
                   **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "dagster/row_count": frame.height,
        "dagster/column_schema": table_schema(frame.schema),
        "sample": dg.MetadataValue.md(markdown_table(frame, sample_columns)) if frame.height
        else dg.MetadataValue.md("_no rows_"),
    }
    for key, value in extra.items():
        meta[key] = dg.MetadataValue.json(value) if isinstance(value, (dict, list)) else value
    return meta


def add_shard_metadata(context: dg.AssetExecutionContext, asset: str,
                       metadata_for: Callable[[str], dict[str, Any]]) -> None:
    """Gives each shard's materialisation its own row count, sample and counts. A backfill run
    covers several shards; without this, each of them would show the whole run's figures. The
    output's own metadata (model, timings) then describes the run and names its shard count."""
    for key in context.partition_keys:
        context.add_asset_metadata(metadata_for(key), asset_key=asset, partition_key=key)
