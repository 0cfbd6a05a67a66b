"""Data-quality rules as plain functions over frames. The Dagster checks wrap these."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
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
                   else "null rates within bound", {f"null_rate_{c}": r for c, r in rates.items()})


def length_distribution(word_counts: pl.Series, min_median: float, max_median: float,
                        max_p95: float, min_p5: float = 0) -> Outcome:
    if word_counts.len() == 0:
        return Outcome(False, "no captions to measure", {})
    stats = {"words_min": int(word_counts.min()), "words_median": float(word_counts.median()),
             "words_p5": float(word_counts.quantile(0.05, "linear")),
             "words_p95": float(word_counts.quantile(0.95, "linear")),
             "words_max": int(word_counts.max())}  # percentiles interpolated as numpy's
    median, p5, p95 = stats["words_median"], stats["words_p5"], stats["words_p95"]
    ok = min_median <= median <= max_median and p95 <= max_p95 and p5 >= min_p5
    return Outcome(ok, f"median {median:.0f} words (allowed {min_median}-{max_median}), "
                   f"p5 {p5:.0f} (min {min_p5}), p95 {p95:.0f} (max {max_p95})", stats)


def reject_rate(kept: int, rejected: int, max_rate: float,
                by_reason: dict[str, int] | None = None) -> Outcome:
    total = kept + rejected
    rate = rejected / total if total else 0.0
    return Outcome(rate <= max_rate, f"reject rate {rate:.1%} (max {max_rate:.0%})",
                   {"reject_rate": rate, "rejected": rejected, "total": total,
                    **{f"rejects_{reason}": int(count)
                       for reason, count in (by_reason or {}).items()}})


def near_duplicate_rate(texts: Sequence[str], threshold: float, max_rate: float,
                        sample: int = 400) -> Outcome:
    """Measured with exact shingle Jaccard on a sample, independent of the MinHash filter."""
    rate, examined = exact_jaccard_pair_rate(texts, threshold, sample=sample)
    return Outcome(rate <= max_rate, f"{rate:.1%} near duplicates in {examined} sampled "
                   f"(max {max_rate:.0%})", {"near_duplicate_rate": rate, "sampled": examined})


def min_rate(rate: float, minimum: float, what: str, measured: int) -> Outcome:
    return Outcome(rate >= minimum, f"{what} {rate:.1%} over {measured} (min {minimum:.0%})",
                   {"rate": rate, "measured": measured})


def wilson_interval(successes: int, n: int, z: float) -> tuple[float, float]:
    """The Wilson score interval of a binomial share `successes` / `n` for a normal quantile `z`
    (it keeps its coverage near 0 and 1 and at small n, where the normal interval does not)."""
    if n == 0:
        return 0.0, 1.0
    share, z2 = successes / n, z * z
    centre = (share + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(share * (1 - share) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mix_min_records(expected: Mapping[str, float], tolerance: float, alpha: float,
                    categories: int | None = None) -> int:
    """The fewest records at which every expected share can be judged to within `tolerance`:
    the n where the interval's half-width at the expected share, z * sqrt(p (1 - p) / n), is
    `tolerance` (z: two-sided, Bonferroni over the categories)."""
    z = _mix_z(alpha, categories or len(expected))
    worst = max((p * (1 - p) for p in expected.values()), default=0.0)
    return math.ceil(z * z * worst / max(tolerance, 1e-6) ** 2)


def _mix_z(alpha: float, categories: int) -> float:
    return NormalDist().inv_cdf(1 - alpha / (2 * max(categories, 1)))


def mix_within_tolerance(counts: Mapping[str, int], expected: Mapping[str, float],
                         tolerance: float, alpha: float = 0.01) -> Outcome:
    """Each category's share, seen in a sample of n, is consistent with its expected share
    within `tolerance`: a share fails when its Wilson interval (confidence 1 - alpha, Bonferroni
    over the categories) lies wholly outside expected +- tolerance, i.e. when it is off by more
    than the tolerance beyond chance. Below `mix_min_records` the sample cannot show a share to
    within the tolerance: a clear deviation still fails, anything else passes with
    `too_small_to_judge` set and says so."""
    n = sum(counts.values())
    keys = sorted({*counts, *expected})
    min_n = mix_min_records({k: expected.get(k, 0.0) for k in keys}, tolerance, alpha, len(keys))
    base: dict[str, Any] = {"records": n, "min_records": min_n, "too_small_to_judge": n < min_n,
                            "alpha": alpha, "tolerance": tolerance}
    if n == 0:
        return Outcome(True, "no records to measure", base)
    z = _mix_z(alpha, len(keys))
    figures: dict[str, Any] = {}
    off = []
    for k in keys:
        p, share = expected.get(k, 0.0), counts.get(k, 0) / n
        low, high = wilson_interval(counts.get(k, 0), n, z)
        figures |= {f"share_{k}": share, f"expected_{k}": p, f"lower_{k}": low,
                    f"upper_{k}": high}
        if high < p - tolerance or low > p + tolerance:
            off.append(k)
    confidence = f"{1 - alpha:.0%}"
    if off:
        detail = "; ".join(f"{k} {figures[f'share_{k}']:.2f} (expected {expected.get(k, 0.0):.2f}"
                           f", {confidence} interval {figures[f'lower_{k}']:.2f}-"
                           f"{figures[f'upper_{k}']:.2f})" for k in off)
        return Outcome(False, f"shares off the configured mix by more than {tolerance:.2f} "
                       f"beyond chance over {n} records: {detail}; check stage2.task_mix and "
                       "regenerate", {**base, **figures, "off": off})
    if n < min_n:
        return Outcome(True, f"too small to judge: {n} records; judging each share to within "
                       f"{tolerance:.2f} at {confidence} needs at least {min_n}, and no share is "
                       "off beyond chance", {**base, **figures, "off": off})
    return Outcome(True, f"mix within {tolerance:.2f} of the configured shares over {n} records "
                   f"({confidence} intervals)", {**base, **figures, "off": off})


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
