"""`caption_seeds` (and `caption_seed_rejects`): one seed file per shard, parsed and de-duplicated."""

from collections.abc import Iterator

import dagster as dg
import polars as pl

from unicorn_assets.checks import frame_check, run_shards, standard_checks, to_result
from unicorn_assets.logic import quality
from unicorn_assets.logic.caption_seeds import (
    BAD_LINE_REASONS,
    REJECT_SCHEMA,
    SEED_SCHEMA,
    SeedReadOptions,
    SeedReadResult,
    read_seed_bytes,
)
from unicorn_assets.logic.prompts import load_lines
from unicorn_assets.metadata import add_shard_metadata, frame_metadata
from unicorn_assets.partitions import SHARD_BACKFILL, seed_shards
from unicorn_resources.quality_gates import QualityGates
from unicorn_resources.seed_source import SeedSource


def read_options(seeds: SeedSource) -> SeedReadOptions:
    return SeedReadOptions(
        caption_column=seeds.caption_column, label_column=seeds.label_column,
        id_column=seeds.id_column, max_line_bytes=seeds.max_line_bytes,
        on_bad_line=seeds.on_bad_line, label_templates=load_lines(seeds.label_templates),
        templates_per_label=seeds.templates_per_label,
    )


def read_shard(seeds: SeedSource, key: str) -> SeedReadResult:
    """Parse the seed file of shard `key`, as SeedSource locates and reads it."""
    uri, data = seeds.read_file(key)
    return read_seed_bytes(data, uri, key, read_options(seeds))


@dg.multi_asset(
    outs={
        "caption_seeds": dg.AssetOut(
            description="Seed captions of one shard: whitespace-normalised, ids filled, label seeds "
            "expanded into templates, empty and duplicate captions removed.",
            kinds={"polars", "parquet"}),
        "caption_seed_rejects": dg.AssetOut(
            description="Every seed line that did not become a seed, with file, line and reason.",
            kinds={"polars", "parquet"}),
    },
    partitions_def=seed_shards,
    group_name="unicorn_seeds",
    backfill_policy=SHARD_BACKFILL,
)
def read_caption_seeds(context: dg.AssetExecutionContext, seeds: SeedSource) -> Iterator[dg.Output]:
    results = {key: read_shard(seeds, key) for key in context.partition_keys}
    for key, result in results.items():
        bad = result.rejects.filter(pl.col("reason").is_in(list(BAD_LINE_REASONS)))
        if bad.height:
            context.log.warning(f"{key}: {bad.height} malformed line(s) skipped into "
                                "caption_seed_rejects: " + "; ".join(bad["detail"].head(3)))
    add_shard_metadata(context, "caption_seeds", lambda key: frame_metadata(
        results[key].seeds, ["seed_id", "seed_kind", "caption"],
        lines_read=results[key].lines_read, rejects_by_reason=results[key].counts))
    add_shard_metadata(context, "caption_seed_rejects", lambda key: frame_metadata(
        results[key].rejects, ["source_line", "reason", "detail"],
        rejects_by_reason=results[key].counts))
    run = {"shards_in_run": len(results)}
    yield dg.Output({k: r.seeds for k, r in results.items()}, "caption_seeds", metadata=run)
    yield dg.Output({k: r.rejects for k, r in results.items()}, "caption_seed_rejects",
                    metadata=run)


@dg.asset_check(asset="caption_seeds", name="malformed_line_rate", blocking=True,
                partitions_def=seed_shards,
                additional_ins={"rejects": dg.AssetIn("caption_seed_rejects")},
                description="share of malformed seed lines under quality_gates.seed_max_reject_rate")
def caption_seeds_malformed_rate(context: dg.AssetCheckExecutionContext,
                                 quality_gates: QualityGates, caption_seeds: pl.DataFrame,
                                 rejects: pl.DataFrame) -> dg.AssetCheckResult:
    def rule(seeds: pl.DataFrame, rejects: pl.DataFrame) -> quality.Outcome:
        bad = rejects.filter(pl.col("reason").is_in(list(BAD_LINE_REASONS)))
        by_reason = dict(bad.group_by("reason").len().iter_rows())
        return quality.reject_rate(seeds.height, bad.height, quality_gates.seed_max_reject_rate,
                                   by_reason)

    return to_result(quality.per_shard(run_shards(context),
                                       {"seeds": caption_seeds, "rejects": rejects}, rule))


seed_checks = [
    *standard_checks("caption_seeds", schema=SEED_SCHEMA, id_column="seed_id",
                     required=["seed_id", "shard", "caption", "seed_kind", "source_file"]),
    caption_seeds_malformed_rate,
    *standard_checks("caption_seed_rejects", schema=REJECT_SCHEMA, id_column=None,
                     required=["source_file", "reason", "detail"], non_empty=False),
    frame_check("caption_seed_rejects", "every_reject_has_a_reason",
                lambda df, q: quality.Outcome(
                    df.filter(pl.col("reason").is_null() | (pl.col("detail") == "")).height == 0,
                    "every reject names its reason and location"),
                blocking=False, description="no reject row lacks a reason or a location"),
]
