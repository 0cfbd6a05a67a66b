"""Content-addressed pairing: what was made from a caption must have been made from its exact text.

`caption_id` names a caption's place (shard, seed, prompt, index), not its text: re-running
Stage 1 with another model or sampling keeps the ids and changes the text. So every table made
from a caption carries the caption's `caption_sha256` (copied, never recomputed), and this module
compares the stored digests along the lineage:

    expanded_captions -> caption_embeddings -> transferred_embeddings
    expanded_captions -> instructions

A row whose digest differs from its source's, or whose source row is gone, or a caption without
an embedding, is a problem of its (asset, shard). The outcome names the shards and the run that
fixes them; the exports publish nothing while any is left.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import polars as pl

from unicorn_assets.logic.quality import Outcome
from unicorn_assets.logic.text import caption_sha256_series

DIGEST = "caption_sha256"
PROBLEM_SCHEMA = pl.Schema({"asset": pl.String, "shard": pl.String, "problem": pl.String,
                            "rows": pl.Int64})
PROBLEMS = {
    "other_text": "made from another text than its source holds now",
    "source_gone": "made from a caption that is no longer there",
    "no_digest": "made before caption digests (no caption_sha256)",
    "missing": "caption without an embedding",
}
# which asset each one is made from, and whether every row of the source needs one
LINEAGE = {
    "caption_embeddings": ("expanded_captions", True),
    "instructions": ("expanded_captions", False),  # a shard may cap its captions (or reject)
    "transferred_embeddings": ("caption_embeddings", True),
}
PER_SHARD = ("expanded_captions", "instructions", "caption_embeddings")
FIX_SELECTION = {  # the Dagster selection that re-makes an asset (a multi-asset needs every output)
    "instructions": ['key:"instructions"', 'key:"instruction_rejects"'],
    "caption_embeddings": ['key:"caption_embeddings"'],
}


def digests(frame: pl.LazyFrame) -> pl.LazyFrame:
    """caption_id, shard and caption_sha256 of a stored table (null where it has none)."""
    digest = pl.col(DIGEST) if DIGEST in frame.collect_schema().names() else pl.lit(None)
    return frame.select("caption_id", "shard", digest.cast(pl.String).alias(DIGEST))


def digests_match_text(captions: pl.DataFrame) -> Outcome:
    """Every caption's stored caption_sha256 is the digest of its stored text."""
    if DIGEST not in captions.columns:
        return Outcome(False, "no caption_sha256 column: made before caption digests; re-run "
                       "Stage 1 (expanded_captions) for this shard")
    wrong = captions.filter(caption_sha256_series(captions["caption"]).ne_missing(
        captions[DIGEST]))
    return Outcome(wrong.is_empty(), f"{wrong.height} of {captions.height} captions have a "
                   "caption_sha256 that is not the digest of their text",
                   {"mismatched": wrong.height, "examples": wrong["caption_id"].head(5).to_list()})


def compare(asset: str, made: pl.LazyFrame, source: pl.LazyFrame, every_source_row: bool
            ) -> pl.DataFrame:
    """Problems of `asset` (rows per shard and kind) against the table it was made from.
    A source row without digest is its own asset's problem, not counted here."""
    own, src = digests(made), digests(source)
    joined = own.join(src.select("caption_id", pl.col(DIGEST).alias("_source"),
                                 pl.lit(True).alias("_found")), on="caption_id", how="left")
    problem = (pl.when(pl.col("_found").is_null()).then(pl.lit("source_gone"))
               .when(pl.col("_source").is_null()).then(pl.lit(None, dtype=pl.String))
               .when(pl.col(DIGEST).is_null()).then(pl.lit("no_digest"))
               .when(pl.col(DIGEST) != pl.col("_source")).then(pl.lit("other_text"))
               .otherwise(pl.lit(None, dtype=pl.String)))
    parts = [joined.select("shard", problem.alias("problem")).drop_nulls("problem")]
    if every_source_row:
        parts.append(src.join(own.select("caption_id"), on="caption_id", how="anti")
                     .select("shard", pl.lit("missing").alias("problem")))
    counted = (pl.concat(parts).group_by("shard", "problem").agg(pl.len().cast(pl.Int64)
                                                                  .alias("rows")).collect())
    return counted.select(pl.lit(asset).alias("asset"), "shard", "problem", "rows")


def find_problems(captions: pl.LazyFrame, tables: Mapping[str, pl.LazyFrame]) -> pl.DataFrame:
    """Every pairing problem of the stored `tables` (any of caption_embeddings, instructions,
    transferred_embeddings) and of the captions themselves, as (asset, shard, problem, rows)."""
    sources = {"expanded_captions": captions, **tables}
    own = (digests(captions).filter(pl.col(DIGEST).is_null()).group_by("shard")
           .agg(pl.len().cast(pl.Int64).alias("rows")).collect()
           .select(pl.lit("expanded_captions").alias("asset"), "shard",
                   pl.lit("no_digest").alias("problem"), "rows"))
    found = [own]
    for asset, frame in tables.items():
        source_name, every_row = LINEAGE[asset]
        if source_name not in sources:
            raise ValueError(f"{asset} is checked against {source_name}: pass it too")
        found.append(compare(asset, frame, sources[source_name], every_row))
    return pl.concat(found).cast(dict(PROBLEM_SCHEMA)).sort("asset", "shard", "problem")


@dataclass(frozen=True)
class Fix:
    """What to re-run: per-shard assets for a group of shards, or the corpus job."""

    shards: tuple[str, ...]
    assets: tuple[str, ...]

    def text(self) -> str:
        listed = ", ".join(self.shards)
        flags = " ".join(f"--shard {s}" for s in self.shards)
        if "expanded_captions" in self.assets:
            return (f"shard(s) {listed}: expanded_captions holds captions without caption_sha256 "
                    f"(made before caption digests); re-run those shards whole: "
                    f"`unicorn materialize {flags}`, then unicorn_corpus_job")
        selection = " or ".join(k for a in self.assets for k in FIX_SELECTION[a])
        return (f"shard(s) {listed}: {' and '.join(self.assets)} were made from older captions "
                f"than expanded_captions holds now; materialize {' + '.join(self.assets)} for "
                f"those shards (UI: select them, Materialize, pick the shards; or `unicorn "
                f"backfill {flags} --select '{selection}'`), or re-run the shards whole "
                f"(`unicorn materialize {flags}`, Stage 1 included), then unicorn_corpus_job")


def fixes(problems: pl.DataFrame) -> list[Fix]:
    """The runs that clear `problems`: shards that need the same per-shard assets share one."""
    per_shard: dict[str, set[str]] = {}
    for asset, shard in problems.filter(pl.col("asset").is_in(PER_SHARD)).select(
            "asset", "shard").unique().iter_rows():
        per_shard.setdefault(shard, set()).add(asset)
    groups: dict[tuple[str, ...], list[str]] = {}
    for shard, assets in per_shard.items():
        # a shard whose captions lack digests re-runs whole; that re-makes the rest too
        key = (("expanded_captions",) if "expanded_captions" in assets
               else tuple(a for a in ("instructions", "caption_embeddings") if a in assets))
        groups.setdefault(key, []).append(shard)
    return [Fix(tuple(sorted(shards)), assets) for assets, shards in sorted(groups.items())]


def outcome(problems: pl.DataFrame) -> Outcome:
    """Passed when nothing disagrees; else the shards, what is wrong and the runs that fix it."""
    if problems.is_empty():
        return Outcome(True, "every instruction record and embedding was made from the exact text "
                       "of its caption (caption_sha256 matches along the lineage)",
                       {"problem_rows": 0, "shards": []})
    lines = [f"{asset} of shard {shard}: {rows} row(s) {PROBLEMS[problem]}"
             for asset, shard, problem, rows in problems.head(20).iter_rows()]
    if problems.height > 20:
        lines.append(f"... and {problems.height - 20} more")
    todo = [fix.text() for fix in fixes(problems)]
    corpus_only = problems.filter(pl.col("asset") == "transferred_embeddings")
    if not corpus_only.is_empty() and not todo:
        todo.append("transferred_embeddings was shifted from older caption_embeddings: run "
                    "unicorn_corpus_job (it re-makes modality_statistics and transferred_embeddings)")
    shards = sorted(set(problems["shard"].to_list()))
    description = ("Captions and what was made from them disagree, so no export is published (the "
                   "previous one stays). To fix: " + "; ".join(todo) + ". Found: "
                   + "; ".join(lines) + ".")
    return Outcome(False, description, {
        "problem_rows": int(problems["rows"].sum()), "shards": shards,
        "rerun": todo, "problems": problems.head(100).to_dicts()})
