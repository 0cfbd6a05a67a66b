"""Each data-quality rule in unicorn_assets/logic/quality.py, with a passing and a failing case,
and the Dagster check wrapper that turns a rule's outcome into an AssetCheckResult."""

from __future__ import annotations

import dagster as dg
import polars as pl
import pytest

from tests.support import coco_captions
from unicorn_assets.checks import to_result
from unicorn_assets.logic import quality
from unicorn_assets.logic.caption_seeds import SEED_SCHEMA
from unicorn_assets.logic.expansion import CAPTION_SCHEMA

CAPTIONS = [c["caption"] for c in coco_captions(40)]


def seeds(n: int = 3) -> pl.DataFrame:
    return pl.DataFrame({"seed_id": [f"s{i}" for i in range(n)], "shard": ["a"] * n,
                         "caption": CAPTIONS[:n], "seed_kind": ["caption"] * n,
                         "label": [None] * n, "source_file": ["f.jsonl"] * n,
                         "source_line": list(range(1, n + 1)), "meta": ["{}"] * n},
                        schema=SEED_SCHEMA)


def test_schema_matches():
    assert quality.schema_matches(seeds(), SEED_SCHEMA).passed
    assert quality.schema_matches(pl.DataFrame(schema=CAPTION_SCHEMA), CAPTION_SCHEMA).passed


@pytest.mark.parametrize("change, missing, wrong", [
    (lambda df: df.drop("caption"), ["caption"], {}),
    (lambda df: df.with_columns(pl.col("source_line").cast(pl.String)), [],
     {"source_line": "String (expected Int64)"}),
])
def test_schema_mismatch(change, missing, wrong):
    outcome = quality.schema_matches(change(seeds()), SEED_SCHEMA)
    assert not outcome.passed
    assert outcome.metadata == {"missing": missing, "wrong_types": wrong}


def test_non_empty():
    assert quality.non_empty(seeds(1)).passed
    outcome = quality.non_empty(seeds().clear())
    assert not outcome.passed and outcome.metadata == {"rows": 0}


def test_unique():
    assert quality.unique(seeds(), "seed_id").passed
    twice = pl.concat([seeds(3), seeds(2)])
    outcome = quality.unique(twice, "seed_id")
    assert not outcome.passed and outcome.metadata == {"duplicates": 2}


def test_null_rates():
    frame = seeds(4)
    assert quality.null_rates(frame, ["seed_id", "caption"], 0.0).passed
    assert quality.null_rates(frame.clear(), ["caption"], 0.0).passed  # nothing to measure
    holes = frame.with_columns(pl.when(pl.col("source_line") == 1).then(None)
                               .otherwise(pl.col("caption")).alias("caption"))
    outcome = quality.null_rates(holes, ["seed_id", "caption"], 0.2)
    assert not outcome.passed and "caption" in outcome.description
    assert (outcome.metadata["null_rate_seed_id"], outcome.metadata["null_rate_caption"]) == \
        (0.0, 0.25)
    assert quality.null_rates(holes, ["seed_id", "caption"], 0.25).passed
    # a column the check does not cover may be null (label is null for caption seeds)
    assert quality.null_rates(frame, ["seed_id"], 0.0).passed


def test_length_distribution():
    words = pl.Series([30, 40, 50, 60, 70])
    outcome = quality.length_distribution(words, 20, 220, 300)
    assert outcome.passed
    assert outcome.metadata == {"words_min": 30, "words_median": 50.0, "words_p5": 32.0,
                                "words_p95": 68.0, "words_max": 70}  # interpolated as numpy


@pytest.mark.parametrize("words, why", [
    ([5, 8, 10, 12, 40], "median 10"),  # too short for min_median 20
    ([250, 260, 270, 280, 290], "median 270"),  # too long
    ([30, 30, 30, 30, 900], "p95 726"),  # a long tail: 30 + 0.8 * 870
    ([], "no captions"),
])
def test_length_distribution_out_of_bounds(words, why):
    outcome = quality.length_distribution(pl.Series(words, dtype=pl.Int32), 20, 220, 300)
    assert not outcome.passed and why in outcome.description


def test_length_distribution_p5_floor():
    words = pl.Series([10, 40, 50, 60, 70])  # p5 = 10 + 0.2 * 30 = 16
    assert quality.length_distribution(words, 20, 220, 300, min_p5=15).passed
    short_tail = quality.length_distribution(words, 20, 220, 300, min_p5=30)
    assert not short_tail.passed and "p5 16 (min 30)" in short_tail.description


def test_reject_rate():
    outcome = quality.reject_rate(kept=9, rejected=1, max_rate=0.1, by_reason={"too_short": 1})
    assert outcome.passed
    assert outcome.metadata == {"reject_rate": 0.1, "rejected": 1, "total": 10,
                                "rejects_too_short": 1}
    assert quality.reject_rate(0, 0, 0.0).passed  # an empty shard rejects nothing
    failing = quality.reject_rate(kept=8, rejected=2, max_rate=0.1)
    assert not failing.passed and "20.0%" in failing.description
    assert not quality.reject_rate(0, 3, 0.9).passed  # everything rejected


def test_per_shard_judges_every_shard_on_its_own():
    kept = pl.DataFrame({"shard": ["a"] * 18 + ["b"] * 2})
    rejects = pl.DataFrame({"shard": ["b"] * 2})

    def rule(kept, rejects):
        return quality.reject_rate(kept.height, rejects.height, max_rate=0.25)

    frames = {"kept": kept, "rejects": rejects}
    assert rule(**frames).passed  # 2 of 22 rejected over the run: averaged away
    outcome = quality.per_shard(["a", "b", "c"], frames, rule)
    assert not outcome.passed  # but shard b lost half of its captions
    assert outcome.metadata["failing_shards"] == ["b"] and outcome.metadata["shards"] == 3
    assert outcome.metadata["by_shard"]["c"]["passed"]  # a shard with no rows is still judged
    assert "1 of 3 shards fail: b: " in outcome.description
    empty = quality.per_shard(["a", "c"], {"data": kept}, lambda data: quality.non_empty(data))
    assert not empty.passed and empty.metadata["failing_shards"] == ["c"]
    single = quality.per_shard(["b"], frames, rule)  # one shard: the rule's own outcome
    assert single == rule(**frames) and "failing_shards" not in single.metadata


def test_near_duplicate_rate():
    assert quality.near_duplicate_rate(CAPTIONS, 0.85, 0.0).passed
    long = " ".join(CAPTIONS[:5])
    texts = [*CAPTIONS[5:25], long, long.rsplit(" ", 1)[0] + " kites"]
    outcome = quality.near_duplicate_rate(texts, 0.85, 0.02)
    assert not outcome.passed
    assert outcome.metadata == {"near_duplicate_rate": 1 / 22, "sampled": 22}
    assert quality.near_duplicate_rate(texts, 0.85, 0.05).passed


def test_near_duplicate_rate_samples_the_head():
    long = " ".join(CAPTIONS[:5])
    texts = [*CAPTIONS[5:15], long, long]
    assert quality.near_duplicate_rate(texts, 0.85, 0.0, sample=10).passed
    assert not quality.near_duplicate_rate(texts, 0.85, 0.0, sample=12).passed


def test_to_result_carries_outcome_into_the_check_result():
    result = to_result(quality.unique(pl.concat([seeds(2), seeds(1)]), "seed_id"))
    assert isinstance(result, dg.AssetCheckResult)
    assert result.passed is False and result.severity == dg.AssetCheckSeverity.ERROR
    assert result.metadata["duplicates"].value == 1
    assert to_result(quality.non_empty(seeds())).passed is True
