"""Materialisation metadata shared by every asset: row count, schema, and a Markdown sample."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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


# Who answers for every asset, shown in the Dagster UI and its asset catalog filters.
OWNERS = ["team:vlm-data"]
KINDS = {"polars", "parquet"}


def stage_tags(stage: str) -> dict[str, str]:
    """The tags of an asset of pipeline stage `stage` ("seeds", "1", "2", "3", "export",
    "report", "synthvlm"), to filter the catalog by stage."""
    return {"stage": stage}


def table_out(description: str, stage: str, version: str,
              columns: tuple[pl.Schema | Mapping[str, Any], Mapping[str, str]] | None = None
              ) -> dg.AssetOut:
    """An output table of a stage's multi-asset, with what every table of ours carries: owners,
    kinds, the stage tag, the code version and, for the main tables, `columns` = (schema, the
    description of each column)."""
    return dg.AssetOut(description=description, kinds=KINDS, owners=OWNERS,
                       tags=stage_tags(stage), code_version=version,
                       metadata=described_columns(*columns) if columns else None)


def table_schema(schema: pl.Schema | Mapping[str, Any],
                 docs: Mapping[str, str] | None = None) -> dg.TableSchema:
    docs = docs or {}
    return dg.TableSchema(columns=[dg.TableColumn(name, str(dtype), description=docs.get(name))
                                   for name, dtype in schema.items()])


def described_columns(schema: pl.Schema | Mapping[str, Any],
                      docs: Mapping[str, str]) -> dict[str, Any]:
    """Definition metadata: the table's columns (name: polars type, or its name as text), each
    with its description (every one needs one), shown in the UI before the first
    materialisation."""
    missing = [name for name in schema if not docs.get(name)]
    if missing:
        raise ValueError(f"columns without a description: {missing}")
    return {"dagster/column_schema": table_schema(schema, docs)}


def frame_metadata(frame: pl.DataFrame, sample_columns: Sequence[str] | None = None,
                   column_docs: Mapping[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "dagster/row_count": frame.height,
        "dagster/column_schema": table_schema(frame.schema, column_docs),
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
