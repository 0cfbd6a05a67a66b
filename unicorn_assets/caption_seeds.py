"""`caption_seeds` (and `caption_seed_rejects`): one seed file per shard, parsed and de-duplicated."""

from collections.abc import Iterator

import dagster as dg
import polars as pl

from unicorn_assets.checks import (
    Check,
    by_shard,
    check_specs,
    evaluate,
    frame_check,
    standard_checks,
)
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
from unicorn_assets.metadata import (
    KINDS,
    OWNERS,
    add_shard_metadata,
    described_columns,
    frame_metadata,
    stage_tags,
)
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


SEED_COLUMNS = {
    "seed_id": "the seed's id: the file's id field, or a digest of its text; a label seed's "
               "templates add -t<n>",
    "shard": "the seed shard (partition key) the seed was read from",
    "caption": "the seed caption, whitespace-normalised",
    "seed_kind": "caption (a line of the file) or label (a template filled with a class label)",
    "label": "the line's label field, whitespace-normalised; null when it has none",
    "source_file": "the seed file the line was read from",
    "source_line": "the line number in the seed file (1-based)",
    "meta": "JSON of the line's other fields (besides caption, label and id)",
}
SEEDS_VERSION = "1"


def malformed_rate(frames, gates: QualityGates) -> quality.Outcome:
    seeds, rejects = frames["caption_seeds"], frames["caption_seed_rejects"]
    bad = rejects.filter(pl.col("reason").is_in(list(BAD_LINE_REASONS)))
    by_reason = dict(bad.group_by("reason").len().iter_rows())
    return quality.reject_rate(seeds.height, bad.height, gates.seed_max_reject_rate, by_reason)


seed_checks: list[Check] = [
    *standard_checks("caption_seeds", schema=SEED_SCHEMA, id_column="seed_id",
                     required=["seed_id", "shard", "caption", "seed_kind", "source_file"]),
    Check("caption_seeds", "malformed_line_rate", malformed_rate, blocking=True,
          description="share of malformed seed lines under quality_gates.seed_max_reject_rate"),
    *standard_checks("caption_seed_rejects", schema=REJECT_SCHEMA, id_column=None,
                     required=["source_file", "reason", "detail"], non_empty=False),
    frame_check("caption_seed_rejects", "every_reject_has_a_reason",
                lambda df, q: quality.Outcome(
                    df.filter(pl.col("reason").is_null() | (pl.col("detail") == "")).height == 0,
                    "every reject names its reason and location"),
                blocking=False, description="no reject row lacks a reason or a location"),
]


@dg.multi_asset(
    outs={
        "caption_seeds": dg.AssetOut(
            description="Seed captions of one shard: whitespace-normalised, ids filled, label seeds "
            "expanded into templates, empty and duplicate captions removed.",
            kinds=KINDS, owners=OWNERS, tags=stage_tags("seeds"), code_version=SEEDS_VERSION,
            metadata=described_columns(SEED_SCHEMA, SEED_COLUMNS)),
        "caption_seed_rejects": dg.AssetOut(
            description="Every seed line that did not become a seed, with file, line and reason.",
            kinds=KINDS, owners=OWNERS, tags=stage_tags("seeds"), code_version=SEEDS_VERSION),
    },
    check_specs=check_specs(seed_checks),
    partitions_def=seed_shards,
    group_name="unicorn_seeds",
    backfill_policy=SHARD_BACKFILL,
)
def read_caption_seeds(context: dg.AssetExecutionContext, seeds: SeedSource,
                       quality_gates: QualityGates
                       ) -> Iterator[dg.Output | dg.AssetCheckResult]:
    results = {key: read_shard(seeds, key) for key in context.partition_keys}
    for key, result in results.items():
        bad = result.rejects.filter(pl.col("reason").is_in(list(BAD_LINE_REASONS)))
        if bad.height:
            context.log.warning(f"{key}: {bad.height} malformed line(s) skipped into "
                                "caption_seed_rejects: " + "; ".join(bad["detail"].head(3)))
    add_shard_metadata(context, "caption_seeds", lambda key: frame_metadata(
        results[key].seeds, ["seed_id", "seed_kind", "caption"], SEED_COLUMNS,
        lines_read=results[key].lines_read, rejects_by_reason=results[key].counts))
    add_shard_metadata(context, "caption_seed_rejects", lambda key: frame_metadata(
        results[key].rejects, ["source_line", "reason", "detail"],
        rejects_by_reason=results[key].counts))
    run = {"shards_in_run": len(results)}
    seeds_out = {k: r.seeds for k, r in results.items()}
    rejects_out = {k: r.rejects for k, r in results.items()}
    yield dg.Output(seeds_out, "caption_seeds", metadata=run)
    yield dg.Output(rejects_out, "caption_seed_rejects", metadata=run)
    yield from evaluate(seed_checks, by_shard(context.partition_keys, caption_seeds=seeds_out,
                                              caption_seed_rejects=rejects_out), quality_gates)


