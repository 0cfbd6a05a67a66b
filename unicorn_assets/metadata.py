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
    meta.update(as_metadata(extra))
    return meta


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number_leaves(value: Any) -> bool:
    """A number, or a non-empty dict whose leaves are all numbers."""
    if isinstance(value, Mapping):
        return bool(value) and all(_number_leaves(v) for v in value.values())
    return _is_number(value)


def _flatten(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return {k: v for sub, inner in value.items() for k, v in _flatten(f"{key}_{sub}",
                                                                         inner).items()}
    return {key: value}


def as_metadata(values: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata the UI can plot: every figure a number (MetadataValue.int / .float, bool as
    .bool), a dict of figures ({"too_short": 3}) flattened to one number per entry
    (`<key>_too_short`); only genuinely structured values (lists, dicts of text) stay JSON.
    MetadataValue objects pass unchanged."""
    meta: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dg.MetadataValue | dg.TableSchema):  # Dagster's own (records)
            meta[key] = value
        elif isinstance(value, bool):
            meta[key] = dg.MetadataValue.bool(value)
        elif isinstance(value, int):
            meta[key] = dg.MetadataValue.int(value)
        elif isinstance(value, float):
            meta[key] = dg.MetadataValue.float(value)
        elif isinstance(value, Mapping) and _number_leaves(value):
            meta.update(as_metadata(_flatten(key, value)))
        elif type(value) in (dict, list, tuple):
            meta[key] = dg.MetadataValue.json(value)
        else:
            meta[key] = value
    return meta


def add_shard_metadata(context: dg.AssetExecutionContext, asset: str,
                       metadata_for: Callable[[str], dict[str, Any]]) -> None:
    """Gives each shard's materialisation its own row count, sample and counts. A backfill run
    covers several shards; without this, each of them would show the whole run's figures. The
    output's own metadata (model, timings) then describes the run and names its shard count."""
    for key in context.partition_keys:
        context.add_asset_metadata(metadata_for(key), asset_key=asset, partition_key=key)
