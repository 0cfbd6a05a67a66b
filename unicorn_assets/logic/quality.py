"""Data-quality rules as plain functions over frames. The Dagster checks wrap these."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from unicorn_assets.logic.dedup import exact_jaccard_pair_rate


@dataclass(frozen=True)
class Outcome:
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


def schema_matches(frame: pl.DataFrame | pl.Schema, expected: pl.Schema) -> Outcome:
    actual = frame if isinstance(frame, pl.Schema) else frame.schema
    missing = [c for c in expected.names() if c not in actual]
    wrong = {c: f"{actual[c]} (expected {t})" for c, t in expected.items()
             if c in actual and actual[c] != t}
    ok = not missing and not wrong
    return Outcome(ok, "schema matches" if ok else f"missing {missing}, wrong types {wrong}",
                   {"missing": missing, "wrong_types": wrong})


def non_empty(frame: pl.DataFrame) -> Outcome:
    return Outcome(frame.height > 0, f"{frame.height} rows", {"rows": frame.height})


def unique(frame: pl.DataFrame, column: str) -> Outcome:
    dupes = frame.height - frame[column].n_unique()
    return Outcome(dupes == 0, f"{dupes} duplicate {column}(s)", {"duplicates": dupes})


def null_rates(frame: pl.DataFrame, columns: Sequence[str], max_rate: float) -> Outcome:
    if frame.height == 0:
        return Outcome(True, "no rows", {})
    rates = {c: frame[c].null_count() / frame.height for c in columns}
    bad = {c: r for c, r in rates.items() if r > max_rate}
    return Outcome(not bad, f"columns over {max_rate:.0%} null: {sorted(bad)}" if bad
                   else "null rates within bound", {"null_rates": rates})


def length_distribution(word_counts: pl.Series, min_median: float, max_median: float,
                        max_p95: float) -> Outcome:
    if word_counts.len() == 0:
        return Outcome(False, "no captions to measure", {})
    stats = {"min": int(word_counts.min()), "median": float(word_counts.median()),
             "p95": float(word_counts.quantile(0.95)), "max": int(word_counts.max())}
    ok = min_median <= stats["median"] <= max_median and stats["p95"] <= max_p95
    return Outcome(ok, f"median {stats['median']:.0f} words (allowed {min_median}-{max_median}), "
                   f"p95 {stats['p95']:.0f} (max {max_p95})", {"words": stats})


def reject_rate(kept: int, rejected: int, max_rate: float,
                by_reason: dict[str, int] | None = None) -> Outcome:
    total = kept + rejected
    rate = rejected / total if total else 0.0
    return Outcome(rate <= max_rate, f"reject rate {rate:.1%} (max {max_rate:.0%})",
                   {"reject_rate": rate, "rejected": rejected, "total": total,
                    "by_reason": by_reason or {}})


def near_duplicate_rate(texts: Sequence[str], threshold: float, max_rate: float,
                        sample: int = 400) -> Outcome:
    """Measured with exact shingle Jaccard on a sample, independent of the MinHash filter."""
    rate, examined = exact_jaccard_pair_rate(texts, threshold, sample=sample)
    return Outcome(rate <= max_rate, f"{rate:.1%} near duplicates in {examined} sampled "
                   f"(max {max_rate:.0%})", {"near_duplicate_rate": rate, "sampled": examined})


def min_rate(rate: float, minimum: float, what: str, measured: int) -> Outcome:
    return Outcome(rate >= minimum, f"{what} {rate:.1%} over {measured} (min {minimum:.0%})",
                   {"rate": rate, "measured": measured})


def mix_within_tolerance(counts: Mapping[str, int], expected: Mapping[str, float],
                         tolerance: float, z: float = 3.0) -> Outcome:
    """Each category's share within `tolerance` of its expected share, plus the binomial slack of
    `z` standard errors (a shard of a few records cannot show a mix precisely)."""
    n = sum(counts.values())
    if n == 0:
        return Outcome(True, "no records to measure", {})
    observed = {k: counts.get(k, 0) / n for k in sorted({*counts, *expected})}
    off = {}
    for k, share in observed.items():
        p = expected.get(k, 0.0)
        allowed = tolerance + z * math.sqrt(p * (1 - p) / n)
        if abs(share - p) > allowed:
            off[k] = {"observed": round(share, 4), "expected": round(p, 4),
                      "allowed": round(allowed, 4)}
    return Outcome(not off, f"shares off the configured mix: {sorted(off)}" if off else
                   f"mix within tolerance over {n} records",
                   {"observed": observed, "expected": dict(expected), "off": off, "records": n})


def rows_satisfy(frame: pl.DataFrame, column: str, predicate: Callable[[Any], bool], what: str,
                 id_column: str = "id") -> Outcome:
    """Every row's `column` value satisfies `predicate`; the failing ids are listed."""
    failing = [i for i, v in zip(frame[id_column].to_list(), frame[column].to_list())
               if not predicate(v)]
    return Outcome(not failing, f"{len(failing)} of {frame.height} rows break: {what}",
                   {"failing": len(failing), "failing_ids": failing[:20]})


def per_shard(keys: Sequence[str], frames: Mapping[str, pl.DataFrame],
              rule: Callable[..., Outcome]) -> Outcome:
    """Applies `rule` to each shard's rows of `frames` (split by their `shard` column) and passes
    only if every shard passes, so that one bad shard in a multi-shard (backfill) run is not
    averaged away by the others. One shard: the rule's own outcome."""
    if len(keys) <= 1:
        return rule(**frames)
    return combine({key: rule(**{name: frame.filter(pl.col("shard") == key)
                                 for name, frame in frames.items()}) for key in keys})


def combine(outcomes: Mapping[str, Outcome]) -> Outcome:
    """One outcome for a run from each shard's own: passes only if every shard passes, and names
    the failing ones. One shard: its own outcome."""
    if len(outcomes) == 1:
        return next(iter(outcomes.values()))
    keys = list(outcomes)
    failing = [key for key, outcome in outcomes.items() if not outcome.passed]
    summary = (f"{len(failing)} of {len(keys)} shards fail: " + "; ".join(
        f"{key}: {outcomes[key].description}" for key in failing[:5])) if failing \
        else f"all {len(keys)} shards pass"
    return Outcome(not failing, summary, {
        "shards": len(keys), "failing_shards": failing,
        "by_shard": {key: {"passed": o.passed, "description": o.description}
                     for key, o in outcomes.items()}})
