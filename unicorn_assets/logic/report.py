"""The corpus-wide quality report (no Dagster): every figure of logic/figures.py over all shards,
each with the number of rows it was measured on, beside the Unicorn paper's own value, plus a few
seeded random records with their seeds, to read.

Memory stays bounded at any corpus size:
- counts, shares, means and the length quantiles are exact, as lazy aggregations over narrow
  numeric columns (`exact_caption_figures`, `exact_instruction_figures`);
- the figures that need the text (distinct-n, type-token ratio, seed coverage, the multiple-choice
  letter check) come from `figures.caption_figures` / `figures.instruction_figures` over a seeded
  sample of at most `sample_size` rows (`seeded_sample`): the rows with the smallest
  (first 60 bits of caption_sha256) XOR (a mask drawn from the seed), ties broken by id. The
  sample depends only on the texts and the seed, not on shard order or re-runs; a corpus no
  larger than the sample is measured whole.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import polars as pl

from unicorn_assets.logic import expansion, instructions
from unicorn_assets.logic.quality import Outcome

# The Unicorn paper's own figures (Unicorn-1.2M captions, Unicorn-Instruction-471K), as text for
# the page and, where it is one number, as that number.
PAPER_MIX = {"multiple_choice": 171, "question_answering": 199, "complex_reasoning": 100}


@dataclass(frozen=True)
class PaperValue:
    text: str
    value: float | None = None


PAPER: dict[str, PaperValue] = {
    "words_mean": PaperValue("129", 129.0),
    "words_min": PaperValue("51", 51.0),
    "words_max": PaperValue("483", 483.0),
    "type_token_ratio": PaperValue("0.68", 0.68),
    **{f"share_{task}": PaperValue(f"{count}K of 470K", count / sum(PAPER_MIX.values()))
       for task, count in PAPER_MIX.items()},
    "share_multi_turn": PaperValue("0 (not in the paper's mix)", 0.0),
    "turns_mean": PaperValue("6–8"),
    "turns_min": PaperValue("6", 6.0),
    "turns_max": PaperValue("8", 8.0),
}

STAGES = {"caption": "Stage 1: captions", "instruction": "Stage 2: instructions"}
# The figures of figures.py that need the texts, so come from the sample (the rest are exact).
SAMPLED = ("distinct_", "type_token_ratio", "seed_coverage", "mc_letter_valid_share",
           "mc_rationale")
TURNS_SHOWN = 4  # of each record on the page (the rest are in the instructions table)
# Counts by reason or task type: exact; one the corpus never met is 0 over every row.
COUNTED = ("rejects_", "share_")


@dataclass(frozen=True)
class Figure:
    name: str  # the figure's name in figures.py; the metadata key is `<stage>/<name>`
    stage: str  # "caption" or "instruction"
    value: float | int
    n: int  # the rows it was measured on
    exact: bool  # over every row (False: over the seeded sample)

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.name}"

    @property
    def paper(self) -> PaperValue | None:
        return PAPER.get(self.name)


def sample_key(seed: int) -> pl.Expr:
    """A stable pseudo-random order of rows: the first 60 bits of caption_sha256, XOR a mask drawn
    from `seed` (a hex digest is uniform, so every seed gives another uniform order)."""
    mask = int(hashlib.sha256(f"unicorn-report-{seed}".encode()).hexdigest()[:15], 16)
    return (pl.col("caption_sha256").str.slice(0, 15).str.to_integer(base=16, strict=False)
            .xor(pl.lit(mask, dtype=pl.Int64)).alias("_sample_key"))


def seeded_sample(frame: pl.LazyFrame, n: int, seed: int, id_column: str) -> pl.DataFrame:
    """At most `n` rows of `frame`, chosen by `sample_key(seed)` then `id_column`: the same rows
    for the same data and seed, whatever the shard order."""
    return (frame.with_columns(sample_key(seed))
            .sort(["_sample_key", id_column], nulls_last=True).head(n)
            .drop("_sample_key").collect(engine="streaming"))


def _count(frame: pl.LazyFrame) -> int:
    return frame.select(pl.len()).collect(engine="streaming").item()


def reasons(rejects: pl.LazyFrame, known: Sequence[str]) -> dict[str, int]:
    """{reason: rejects} for every `known` reason (0 if none), then any other the rejects name."""
    counts = dict(rejects.group_by("reason").len().collect(engine="streaming").iter_rows())
    return {reason: int(counts.get(reason, 0))
            for reason in [*known, *sorted(str(r) for r in counts if r not in known)]}


def exact_caption_figures(captions: pl.LazyFrame, rejects: pl.LazyFrame
                          ) -> dict[str, tuple[float | int, int]]:
    """{figure: (value, n)} of the Stage 1 figures that aggregate narrow columns, over every row."""
    kept = _count(captions)
    rejected = reasons(rejects, expansion.REJECT_REASONS)
    total = kept + sum(rejected.values())
    out: dict[str, tuple[float | int, int]] = {"captions_n": (kept, kept)}
    if kept:
        w = pl.col("n_words")
        row = captions.select(
            w.mean().alias("words_mean"), w.median().alias("words_median"),
            w.quantile(0.05, "linear").alias("words_p5"),
            w.quantile(0.95, "linear").alias("words_p95"),
            w.min().alias("words_min"), w.max().alias("words_max"),
        ).collect(engine="streaming").row(0, named=True)
        out.update({name: (value, kept) for name, value in row.items()})
    if total:
        finish = (pl.col("finish_reason") == "length").sum()
        length = (captions.select(finish).collect(engine="streaming").item()
                  + rejects.select(finish).collect(engine="streaming").item())
        out["length_finish_share"] = (length / total, total)
        out["reject_rate"] = (sum(rejected.values()) / total, total)
    out.update({f"rejects_{reason}": (count, total) for reason, count in rejected.items()})
    return out


def exact_instruction_figures(records: pl.LazyFrame, rejects: pl.LazyFrame
                              ) -> dict[str, tuple[float | int, int]]:
    """{figure: (value, n)} of the Stage 2 figures that aggregate narrow columns, over every row
    (the definitions of figures.instruction_figures)."""
    kept = _count(records)
    rejected = reasons(rejects, instructions.REJECT_REASONS)
    planned = kept + sum(rejected.values())
    out: dict[str, tuple[float | int, int]] = {"records_n": (kept, kept)}
    if kept:
        turns = (pl.col("conversations").list.eval(pl.element().struct.field("from") == "human")
                 .list.sum())
        row = records.select(
            turns.mean().alias("turns_mean"), turns.min().alias("turns_min"),
            turns.max().alias("turns_max"),
            (pl.col("task_type") == "multiple_choice").sum().alias("mc_records_n"),
        ).collect(engine="streaming").row(0, named=True)
        out.update({name: (value, kept) for name, value in row.items()})
        mix = dict(records.group_by("task_type").len().collect(engine="streaming").iter_rows())
        out.update({f"share_{task}": (mix.get(task, 0) / kept, kept)
                    for task in [*instructions.TASK_TYPES, *sorted(set(mix) - set(
                        instructions.TASK_TYPES))]})
    if planned:
        json_reasons = list(instructions.JSON_REASONS)
        first = pl.col("attempt_reasons").list.first()
        lineage = pl.concat([frame.select("attempts", "attempt_reasons")
                             for frame in (records, rejects)])
        row = lineage.select(
            (first.is_null() | ~first.is_in(json_reasons)).sum().alias("first"),
            pl.col("attempts").sum().alias("attempts"),
            pl.col("attempt_reasons").list.eval(pl.element().is_in(json_reasons)).list.sum()
            .sum().alias("invalid"),
        ).collect(engine="streaming").row(0, named=True)
        final = kept + sum(n for r, n in rejected.items() if r not in json_reasons)
        out["json_valid_first_attempt"] = (row["first"] / planned, planned)
        out["json_valid_final"] = (final / planned, planned)
        if row["attempts"]:
            out["json_valid_attempts"] = (1 - row["invalid"] / row["attempts"], row["attempts"])
        out["attempts_mean"] = (row["attempts"] / planned, planned)
        out["reject_rate"] = (sum(rejected.values()) / planned, planned)
    out.update({f"rejects_{reason}": (count, planned) for reason, count in rejected.items()})
    return out


FigureFn = Callable[[pl.DataFrame, pl.DataFrame], Mapping[str, float | int]]


def stage_figures(stage: str, figure_fn: FigureFn, exact: Mapping[str, tuple[float | int, int]],
                  sample: pl.DataFrame, sample_rejects: pl.DataFrame) -> list[Figure]:
    """Every figure `figure_fn` gives on the sample; those `exact` has over every row replace
    theirs. A figure that is not a finite number is left out (none measured)."""
    sampled = dict(figure_fn(sample, sample_rejects)) if sample.height else {}
    total = max([n for _, n in exact.values()] or [0])
    out = []
    for name in dict.fromkeys([*sampled, *exact]):
        if name in exact:
            value, n = exact[name]
            figure = Figure(name, stage, value, n, exact=True)
        elif name.startswith(COUNTED) and not name.startswith(SAMPLED):
            figure = Figure(name, stage, 0, total, exact=True)  # a reason or type never met
        else:
            figure = Figure(name, stage, sampled[name], sample.height, exact=False)
        if isinstance(figure.value, (int, float)) and figure.value == figure.value:
            out.append(figure)
    return out


def records_to_read(records: pl.LazyFrame, captions: pl.LazyFrame, seeds: pl.LazyFrame,
                    n: int, seed: int) -> pl.DataFrame:
    """`n` seeded random instruction records (see `seeded_sample`), each with its seed and its
    caption: record id, shard, seed_id, seed, caption, task_type, conversations."""
    picked = seeded_sample(records.select("id", "caption_id", "caption_sha256", "seed_id", "shard",
                                          "task_type", "conversations"), n, seed, "id")
    ids = picked.select("caption_id", "caption_sha256", "seed_id", "shard")
    caption = (captions.select("caption_id", "caption_sha256", "caption")
               .join(ids.lazy(), on=["caption_id", "caption_sha256"], how="semi"))
    seed_text = (seeds.select("seed_id", "shard", pl.col("caption").alias("seed"))
                 .join(ids.lazy(), on=["seed_id", "shard"], how="semi"))
    return (picked.join(caption.collect(engine="streaming"), on=["caption_id", "caption_sha256"],
                        how="left")
            .join(seed_text.collect(engine="streaming"), on=["seed_id", "shard"], how="left")
            .select("id", "shard", "seed_id", "seed", "caption", "task_type", "conversations"))


def figures_frame(figures: list[Figure]) -> pl.DataFrame:
    """The report as a table: one row per figure (what the asset stores)."""
    return pl.DataFrame(
        [{"stage": f.stage, "figure": f.name, "value": float(f.value), "n": f.n, "exact": f.exact,
          "paper": f.paper.text if f.paper else None,
          "paper_value": f.paper.value if f.paper else None} for f in figures],
        schema={"stage": pl.String, "figure": pl.String, "value": pl.Float64, "n": pl.Int64,
                "exact": pl.Boolean, "paper": pl.String, "paper_value": pl.Float64})


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def report_markdown(figures: list[Figure], records: pl.DataFrame, shards: int,
                    sample_size: int, seed: int) -> str:
    """One page: a table per stage (figure, ours, n, how measured, the paper's), then the records."""
    lines = [f"# Quality report: {shards} shard(s)", "",
             (f"Exact figures are over every row; *sampled* ones over a seeded sample of at most "
             f"{sample_size:,} rows (seed {seed}). The paper: Unicorn-1.2M and "
             "Unicorn-Instruction-471K."), ""]
    for stage, title in STAGES.items():
        rows = [f for f in figures if f.stage == stage]
        lines += [f"## {title}", "", "| figure | ours | n | measured | Unicorn paper |",
                  "|---|---:|---:|---|---:|"]
        lines += [f"| {f.name} | {_number(f.value)} | {f.n:,} | "
                  f"{'exact' if f.exact else '*sampled*'} | {f.paper.text if f.paper else '–'} |"
                  for f in rows]
        lines.append("")
    lines += [f"## {records.height} random records with their seeds (seed {seed})", ""]
    for i, row in enumerate(records.iter_rows(named=True), 1):
        lines += [(f"### {i}. `{row['id']}` ({row['task_type']}, shard {row['shard']}, "
                  f"seed `{row['seed_id']}`)"), "",
                  f"- **seed:** {_cell(row['seed'] or '(seed not found)')}",
                  f"- **caption:** {_cell(row['caption'] or '(caption not found)')}", ""]
        turns = row["conversations"]
        lines += [f"> **{turn['from']}:** {_cell(turn['value'])}  " for turn in turns[:TURNS_SHOWN]]
        if len(turns) > TURNS_SHOWN:
            lines.append(f"> … {len(turns) - TURNS_SHOWN} more turns")
        lines.append("")
    return "\n".join(lines)


def coverage(reported: Mapping[str, int], stored: Mapping[str, int], what: str) -> Outcome:
    """The report counted every stored row of `what`, shard by shard ({shard: rows})."""
    missing = sorted(set(stored) - set(reported))
    wrong = {s: (reported.get(s, 0), n) for s, n in stored.items()
             if s in reported and reported[s] != n}
    ok = not missing and not wrong
    total_r, total_s = sum(reported.values()), sum(stored.values())
    if ok:
        text = f"the report covers all {total_s} stored {what} of {len(stored)} shard(s)"
    else:
        text = (f"the report counts {total_r} {what}, the data folder holds {total_s}: shard(s) "
                f"stored but not reported {missing}, counted differently {wrong}. Register the "
                "missing shards again (or delete their files) and re-materialise quality_report")
    return Outcome(ok, text, {"reported": total_r, "stored": total_s, "missing_shards": missing})
