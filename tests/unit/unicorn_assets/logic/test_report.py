"""The quality report's logic (unicorn_assets/logic/report.py): its exact lazy figures are
figures.py's over every row, its sample is stable and seeded, and a figure measured on the sample
says so with the sample's n."""

from __future__ import annotations

import math

import polars as pl
import pytest

from tests.support import coco_captions
from tests.unit.unicorn_assets.logic.test_figures import KEPT, RECORDS, REJECTED, REJECTS
from unicorn_assets.logic import figures, report
from unicorn_assets.logic.text import caption_sha256, word_count_expr


def corpus(n: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """`n` kept captions (real COCO text, two shards) and a few rejects."""
    seeds = [c["caption"] for c in coco_captions(n, one_per_image=False)]
    texts = [f"{seed} It stands in a {i % 7} room." for i, seed in enumerate(seeds)]
    kept = pl.DataFrame({
        "caption_id": [f"c{i:04d}" for i in range(n)], "shard": [f"s{i % 2}" for i in range(n)],
        "seed_caption": seeds, "caption": texts, "caption_sha256": [caption_sha256(t) for t in texts],
        "finish_reason": ["length" if i % 5 == 0 else "stop" for i in range(n)],
    }).with_columns(n_words=word_count_expr("caption").cast(pl.Int32))
    rejects = kept.head(3).with_columns(caption_id=pl.col("caption_id") + "r",
                                        reason=pl.Series(["too_short", "duplicate", "too_short"]))
    return kept, rejects


def test_exact_caption_figures_are_figures_py_over_every_row():
    kept, rejects = corpus(40)
    expected = figures.caption_figures(kept, rejects)
    exact = report.exact_caption_figures(kept.lazy(), rejects.lazy())
    assert exact
    for name, (value, n) in exact.items():
        assert value == pytest.approx(expected[name]), name
        assert n == (40 if name.startswith(("captions_n", "words_")) else 43), name
    # on the hand-built frames of the figures tests too
    exact = report.exact_caption_figures(KEPT.with_columns(pl.lit("s").alias("shard")).lazy(),
                                         REJECTED.lazy())
    expected = figures.caption_figures(KEPT, REJECTED)
    assert {k: v for k, (v, _) in exact.items()} == pytest.approx(
        {k: expected[k] for k in exact})


def test_exact_instruction_figures_are_figures_py_over_every_row():
    expected = figures.instruction_figures(RECORDS, REJECTS)
    exact = report.exact_instruction_figures(RECORDS.lazy(), REJECTS.lazy())
    assert set(exact) >= {"json_valid_first_attempt", "json_valid_final", "json_valid_attempts",
                          "turns_mean", "share_multiple_choice", "mc_records_n", "reject_rate"}
    for name, (value, _) in exact.items():
        assert value == pytest.approx(expected[name]), name


def test_the_sample_is_seeded_and_independent_of_row_order():
    kept, _ = corpus(60)
    first = report.seeded_sample(kept.lazy(), 10, seed=1, id_column="caption_id")
    reordered = pl.concat([kept.filter(pl.col("shard") == "s1"),
                           kept.filter(pl.col("shard") == "s0")]).reverse()
    again = report.seeded_sample(reordered.lazy(), 10, seed=1, id_column="caption_id")
    other = report.seeded_sample(kept.lazy(), 10, seed=2, id_column="caption_id")
    assert first.height == 10 and first["caption_id"].to_list() == again["caption_id"].to_list()
    assert set(first["caption_id"]) != set(other["caption_id"])
    assert report.seeded_sample(kept.lazy(), 100, 1, "caption_id").height == 60


def test_a_figure_from_the_sample_is_marked_with_the_sample_n():
    kept, rejects = corpus(60)
    sample = report.seeded_sample(kept.lazy(), 20, 0, "caption_id")
    out = {f.name: f for f in report.stage_figures(
        "caption", figures.caption_figures,
        report.exact_caption_figures(kept.lazy(), rejects.lazy()), sample, rejects.head(0))}
    assert (out["captions_n"].value, out["captions_n"].n, out["captions_n"].exact) == (60, 60, True)
    assert out["words_mean"].value == pytest.approx(kept["n_words"].mean())
    distinct = out["distinct_1"]
    assert (distinct.n, distinct.exact) == (20, False)
    assert distinct.value == pytest.approx(figures.distinct_n(sample["caption"], 1))
    assert out["rejects_too_short"].value == 2 and out["rejects_too_short"].exact
    assert all(not math.isnan(f.value) for f in out.values())
    page = report.report_markdown(list(out.values()), pl.DataFrame(
        schema={"id": pl.String, "shard": pl.String, "seed_id": pl.String, "seed": pl.String,
                "caption": pl.String, "task_type": pl.String,
                "conversations": pl.List(pl.Struct({"from": pl.String, "value": pl.String}))}),
        2, 20, 0)
    assert "| distinct_1 | " in page and "| 20 | *sampled* |" in page
    assert "| words_max | " in page and "| 483 |" in page


def test_coverage_names_the_shards_left_out():
    assert report.coverage({"a": 3, "b": 2}, {"a": 3, "b": 2}, "captions").passed
    missing = report.coverage({"a": 3}, {"a": 3, "b": 2}, "captions")
    assert not missing.passed and "['b']" in missing.description
    assert not report.coverage({"a": 2, "b": 2}, {"a": 3, "b": 2}, "captions").passed
