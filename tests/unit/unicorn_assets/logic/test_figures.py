"""Quality figures (unicorn_assets/logic/figures.py) on hand-built frames, each figure checked
against a value computed by hand in the comments."""

from __future__ import annotations

import base64
import math

import numpy as np
import polars as pl
import pytest

from unicorn_assets.logic import figures
from unicorn_assets.logic.expansion import REJECT_REASONS as CAPTION_REASONS
from unicorn_assets.logic.instructions import LETTERS, MC_SUFFIX
from unicorn_assets.logic.instructions import REJECT_REASONS as RECORD_REASONS
from unicorn_assets.logic.modality import caption_embeddings_frame
from unicorn_assets.logic.tokens import token_frame


def captions(rows: list[tuple[str, str, int, str]], **extra: list) -> pl.DataFrame:
    """(caption, seed caption, n_words, finish_reason) rows."""
    frame = pl.DataFrame(rows, schema={"caption": pl.String, "seed_caption": pl.String,
                                       "n_words": pl.Int32, "finish_reason": pl.String},
                         orient="row")
    return frame.with_columns(**{k: pl.Series(v) for k, v in extra.items()})


KEPT = captions([("red bus on a street", "A red bus", 5, "stop"),
                 ("the dog the dog runs", "a black cat sitting", 5, "length")])
REJECTED = captions([("tiny", "A red bus", 1, "stop"),
                     ("red bus on a street!", "A red bus", 5, "length")]
                    ).with_columns(reason=pl.Series(["too_short", "near_duplicate"]))


def test_caption_figures_match_hand_counts() -> None:
    got = figures.caption_figures(KEPT, REJECTED)
    assert got["captions_n"] == 2
    assert got["words_mean"] == 5.0 and got["words_median"] == 5.0
    # unigrams: 10, distinct 8 (red bus on a street the dog runs)
    assert got["distinct_1"] == pytest.approx(8 / 10)
    # bigrams: 4 + 4, the second caption repeats "the dog": 7 distinct
    assert got["distinct_2"] == pytest.approx(7 / 8)
    # per caption: 5/5 and 3/5
    assert got["type_token_ratio"] == pytest.approx((1.0 + 0.6) / 2)
    # seed 1 {red, bus}: both kept; seed 2 {black, cat, sitting}: none kept
    assert got["seed_coverage"] == pytest.approx(0.5)
    assert got["seed_coverage_full_share"] == pytest.approx(0.5)
    # finish_reason "length": 1 kept + 1 rejected of 4 expansions
    assert got["length_finish_share"] == pytest.approx(0.5)
    assert got["reject_rate"] == pytest.approx(0.5)
    assert got["rejects_too_short"] == 1 and got["rejects_near_duplicate"] == 1
    assert all(f"rejects_{reason}" in got for reason in CAPTION_REASONS)
    assert got["rejects_empty"] == 0 and isinstance(got["rejects_empty"], int)


def test_caption_figures_take_the_stored_seed_coverage_column() -> None:
    got = figures.caption_figures(KEPT.with_columns(seed_coverage=pl.Series([0.25, 0.75])),
                                  REJECTED.head(0))
    assert got["seed_coverage"] == pytest.approx(0.5)
    assert got["seed_coverage_full_share"] == 0.0


def test_distribution_interpolates_percentiles_like_numpy() -> None:
    got = figures.distribution(pl.Series([1, 2, 3, 4, 5]), "words")
    # p5 = 1 + 0.05 * 4, p95 = 1 + 0.95 * 4
    assert got == pytest.approx({"words_mean": 3.0, "words_median": 3.0, "words_p5": 1.2,
                                 "words_p95": 4.8, "words_min": 1.0, "words_max": 5.0})


def test_no_captions_give_nan_figures_not_zeros() -> None:
    got = figures.caption_figures(KEPT.head(0), REJECTED.head(0))
    assert got["captions_n"] == 0 and got["rejects_too_short"] == 0
    for name in ("words_mean", "words_p95", "distinct_1", "type_token_ratio", "seed_coverage",
                 "length_finish_share", "reject_rate"):
        assert math.isnan(got[name]), name


def test_seed_coverage_ignores_stop_words_and_case() -> None:
    assert figures.seed_coverage("A Zebra grazes near the TREES.", "a zebra in the trees") == 1.0
    assert figures.seed_coverage("A horse in a field.", "two zebras in a field") == \
        pytest.approx(1 / 2)  # lemmas {zebra, field}; counts are the count-conflict signal
    assert figures.seed_coverage("anything", "a the of") == 1.0


def mc_turn(reply: str) -> list[dict[str, str]]:
    options = "".join(f"\n{letter}. {o}" for letter, o in zip(LETTERS, ["blue", "red", "green",
                                                                        "black"]))
    return [{"from": "human", "value": f"<image>\nWhat colour is the bus?{options}\n{MC_SUFFIX}"},
            {"from": "gpt", "value": reply}]


QA2 = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A bus."},
       {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "On a street."}]
RECORDS = pl.DataFrame({
    "task_type": ["multiple_choice", "question_answering", "multiple_choice"],
    "attempts": [1, 2, 2],
    "attempt_reasons": [[], ["invalid_json"], ["answer_not_in_options"]],
    "conversations": [mc_turn("B"), QA2, mc_turn("red")],
    "mc_rationale": [["the bus is red"], None, [""]],
}, schema_overrides={"attempt_reasons": pl.List(pl.String), "mc_rationale": pl.List(pl.String),
                     "attempts": pl.Int32})
REJECTS = pl.DataFrame({
    "task_type": ["complex_reasoning", "multi_turn"],
    "attempts": [3, 3],
    "attempt_reasons": [["schema_mismatch", "invalid_json", "invalid_json"],
                        ["wrong_turn_count", "invalid_json", "empty_turn"]],
    "reason": ["invalid_json", "empty_turn"],
}, schema_overrides={"attempts": pl.Int32})


def test_instruction_figures_match_hand_counts() -> None:
    got = figures.instruction_figures(RECORDS, REJECTS)
    assert got["records_n"] == 3
    # first outputs valid JSON: record 1 (accepted), record 3 (a rule failed), reject 2: 3 of 5
    assert got["json_valid_first_attempt"] == pytest.approx(3 / 5)
    # last outputs valid JSON: the 3 records and reject 2 (empty_turn): 4 of 5
    assert got["json_valid_final"] == pytest.approx(4 / 5)
    # 11 attempts, 5 of them not JSON (1 + 3 + 1)
    assert got["json_valid_attempts"] == pytest.approx(6 / 11)
    assert got["attempts_mean"] == pytest.approx(11 / 5)
    assert got["share_multiple_choice"] == pytest.approx(2 / 3)
    assert got["share_question_answering"] == pytest.approx(1 / 3)
    assert got["share_complex_reasoning"] == 0.0 and got["share_multi_turn"] == 0.0
    assert (got["turns_mean"], got["turns_min"], got["turns_max"]) == \
        (pytest.approx(4 / 3), 1.0, 2.0)
    # multiple choice: record 1 replies a letter with a rationale; record 3 neither
    assert got["mc_records_n"] == 2
    assert got["mc_letter_valid_share"] == pytest.approx(0.5)
    assert got["mc_rationale_share"] == pytest.approx(0.5)
    assert got["reject_rate"] == pytest.approx(2 / 5)
    assert got["rejects_invalid_json"] == 1 and got["rejects_empty_turn"] == 1
    assert all(f"rejects_{reason}" in got for reason in RECORD_REASONS)


def test_no_multiple_choice_records_leave_its_figures_nan() -> None:
    got = figures.instruction_figures(RECORDS.filter(pl.col("task_type") != "multiple_choice"),
                                      REJECTS.head(0))
    assert got["mc_records_n"] == 0 and math.isnan(got["mc_letter_valid_share"])
    assert got["json_valid_first_attempt"] == 0.0  # the one record failed its first attempt
    assert got["json_valid_final"] == 1.0


def test_embedding_figures_match_hand_norms() -> None:
    ids = pl.DataFrame({"caption_id": ["a", "b"], "caption_sha256": ["x", "y"],
                        "shard": ["s", "s"]})
    frame = caption_embeddings_frame(ids, np.array([[3.0, 4.0], [0.0, 1.0]]), "clip")
    got = figures.embedding_figures(frame, token_frame(["a", "b"], np.array([10, 80]), 77))
    # norms 5 and 1
    assert got["embeddings_n"] == 2
    assert (got["norm_min"], got["norm_max"], got["norm_mean"], got["norm_std"]) == \
        pytest.approx((1.0, 5.0, 3.0, 2.0))
    assert got["non_finite_rows"] == 0
    assert got["truncated_share"] == pytest.approx(0.5) and got["captions_truncated"] == 1


def test_word_histogram_is_a_png_and_a_markdown_image() -> None:
    png = figures.word_histogram_png(pl.Series([5, 10, 10, 40]))
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    markdown = figures.word_histogram_markdown(pl.Series([5, 10]))
    assert markdown.startswith("![caption length in words](data:image/png;base64,")
    assert base64.b64decode(markdown.split(",", 1)[1].rstrip(")")).startswith(b"\x89PNG")
    assert figures.word_histogram_png(pl.Series([], dtype=pl.Int32)).startswith(b"\x89PNG")


def test_every_figure_is_a_plain_number() -> None:
    for got in (figures.caption_figures(KEPT, REJECTED),
                figures.instruction_figures(RECORDS, REJECTS)):
        assert all(type(v) in (int, float) for v in got.values()), got
