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
    add_shard_metadata,
    frame_metadata,
    table_out,
)
from unicorn_assets.partitions import SEED_BACKFILL, seed_shards
from unicorn_assets.sharding import fail_some_shards
from unicorn_resources.keys import SeedError
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
        "caption_seeds": table_out(
            "Seed captions of one shard: whitespace-normalised, ids filled, label seeds "
            "expanded into templates, empty and duplicate captions removed.",
            "seeds", SEEDS_VERSION, (SEED_SCHEMA, SEED_COLUMNS)),
        "caption_seed_rejects": table_out(
            "Every seed line that did not become a seed, with file, line and reason.",
            "seeds", SEEDS_VERSION),
    },
    check_specs=check_specs(seed_checks),
    partitions_def=seed_shards,
    group_name="unicorn_seeds",
    backfill_policy=SEED_BACKFILL,
)
def read_caption_seeds(context: dg.AssetExecutionContext, seeds: SeedSource,
                       quality_gates: QualityGates
                       ) -> Iterator[dg.Output | dg.AssetCheckResult]:
    """Each shard is read and judged on its own. A shard that fails (its file gone or unreadable,
    malformed lines under on_bad_line='fail', or no seeds or too many malformed lines for the
    seed gates) fails the step naming it, after the others are stored. The gates are those of
    the blocking checks, applied here per shard: a check blocks only the rest of its own run,
    while a shard whose seeds are not recorded stays out of every later run (the next runs of a
    backfill, the nightly regeneration) until it is fixed."""
    results: dict[str, SeedReadResult] = {}
    failed: dict[str, str] = {}
    for key in context.partition_keys:
        try:
            results[key] = read_shard(seeds, key)
        except Exception as err:  # any error fails this shard only
            failed[key] = shard_failure(err)
            context.log.error(f"{key}: {failed[key]}", exc_info=not isinstance(err, SeedError))
    try:
        for problem in seeds.shards()[1]:  # entries of the location that are not read
            context.log.warning(f"seed location: {problem}")
    except SeedError:
        pass  # no location: every shard has failed with that message
    for key, result in results.items():
        bad = result.rejects.filter(pl.col("reason").is_in(list(BAD_LINE_REASONS)))
        if bad.height:
            context.log.warning(f"{key}: {bad.height} malformed line(s) skipped into "
                                "caption_seed_rejects: " + "; ".join(bad["detail"].head(3)))
        gate = seed_gate(result, quality_gates.seed_max_reject_rate)
        if gate:
            failed[key] = gate
            context.log.error(f"{key}: {gate}")
    metadata_for = {
        "caption_seeds": lambda key: frame_metadata(
            results[key].seeds, ["seed_id", "seed_kind", "caption"], SEED_COLUMNS,
            lines_read=results[key].lines_read, rejects=results[key].counts),
        "caption_seed_rejects": lambda key: frame_metadata(
            results[key].rejects, ["source_line", "reason", "detail"],
            lines_read=results[key].lines_read, rejects=results[key].counts),
    }
    run = {"shards_in_run": len(context.partition_keys)}
    outputs = {"caption_seeds": {k: r.seeds for k, r in results.items() if k not in failed},
               "caption_seed_rejects": {k: r.rejects for k, r in results.items()}}
    if failed:  # a gated shard's rejects are stored all the same: they say what to fix
        fail_some_shards(context, outputs, metadata_for, failed, run)
    for asset, metadata in metadata_for.items():
        add_shard_metadata(context, asset, metadata)
        yield dg.Output(outputs[asset], asset, metadata=run)
    yield from evaluate(seed_checks, by_shard(context.partition_keys, **outputs), quality_gates)


def seed_gate(result: SeedReadResult, max_reject_rate: float) -> str | None:
    """Why a shard's seeds must not go on (none left, or a share of malformed lines over the
    gate), with the fix; None when they pass. The same rules as the blocking checks."""
    bad = result.rejects.filter(pl.col("reason").is_in(list(BAD_LINE_REASONS)))
    files = pl.concat([result.rejects["source_file"], result.seeds["source_file"]]).head(1)
    where = f"{files[0]}: " if files.len() else ""
    reasons = ", ".join(f"{k} {n}" for k, n in result.counts.items()) or "none"
    if not quality.non_empty(result.seeds).passed:
        return (f"{where}no seed is left of {result.lines_read} line(s) (rejects: {reasons}); "
                "see caption_seed_rejects for each line and its fix, or remove the file")
    outcome = quality.reject_rate(result.seeds.height, bad.height, max_reject_rate)
    if not outcome.passed:
        return (f"{where}{bad.height} malformed line(s) beside {result.seeds.height} seed(s): "
                f"{outcome.description}, over quality_gates.seed_max_reject_rate (rejects: "
                f"{reasons}); fix the lines listed in caption_seed_rejects, or raise the gate")
    return None


def shard_failure(err: Exception) -> str:
    """Why a shard's seed file could not be read, with the fix."""
    if isinstance(err, SeedError):
        return str(err)  # names the file and the fix
    if isinstance(err, OSError):
        where = f"{err.filename}: " if err.filename else ""
        return (f"{where}the seed file cannot be read ({type(err).__name__}: "
                f"{err.strerror or err}); check that it is there and readable, then materialise "
                "the shard again")
    return (f"reading the seed file failed ({type(err).__name__}: {err}); the run log has the "
            "traceback")


