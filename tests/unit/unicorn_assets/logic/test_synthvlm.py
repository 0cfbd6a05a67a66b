"""SynthVLM logic: SSIM on real COCO images, CLIPScore, candidate filters, and selection on score
tables whose answers are worked out by hand."""

from __future__ import annotations

import base64
import json

import numpy as np
import polars as pl
import pytest
from PIL import Image, ImageFilter

from tests.support import SHARED_DATA
from unicorn_assets.logic import images as img
from unicorn_assets.logic import synthvlm as sv
from unicorn_assets.logic.exports import drop_duplicate_captions
from unicorn_assets.logic.prompts import load_lines
from unicorn_assets.logic.text import caption_sha256

COCO_IMAGES = SHARED_DATA / "coco_mini_val2017" / "images"
# Picked by measuring the 384-px COCO mini images upscaled to 1024 px: a busy street scene loses
# the most detail at a 336-px resize, a snowboarder on an empty slope the least.
DETAILED = "000000261712.jpg"
FLAT = "000000117645.jpg"


def coco(name: str, side: int | None = None) -> Image.Image:
    image = Image.open(COCO_IMAGES / name).convert("RGB")
    return image.resize((side, side), Image.Resampling.BICUBIC) if side else image


# --- SSIM ----------------------------------------------------------------------------------------

def test_ssim_of_an_image_with_itself_is_one():
    image = coco(DETAILED)
    assert img.ssim(image, image.copy()) == pytest.approx(1.0, abs=1e-12)


def test_ssim_against_a_blurred_copy_is_lower():
    image = coco(DETAILED)
    slight = img.ssim(image, image.filter(ImageFilter.GaussianBlur(1)))
    strong = img.ssim(image, image.filter(ImageFilter.GaussianBlur(3)))
    assert 0 < strong < slight < 1


def test_a_detailed_image_loses_more_at_the_encoder_resize_than_a_flat_one():
    detailed = img.resize_ssim(coco(DETAILED, 1024), 336)
    flat_photo = img.resize_ssim(coco(FLAT, 1024), 336)
    gradient = img.resize_ssim(Image.linear_gradient("L").resize((1024, 1024)).convert("RGB"), 336)
    assert detailed < flat_photo < 1
    assert detailed < gradient < 1
    assert flat_photo - detailed > 0.05


def test_no_shrink_means_nothing_lost():
    small = coco(DETAILED, 300)
    assert img.resize_ssim(small, 336) == 1.0
    round_trip = img.encoder_round_trip(coco(DETAILED, 512), 336)
    assert round_trip.size == (512, 512)


def test_ssim_needs_equal_sizes():
    with pytest.raises(ValueError, match="one size"):
        img.ssim(coco(DETAILED, 64), coco(DETAILED, 65))


def test_png_and_lossless_webp_keep_every_pixel():
    image = coco(DETAILED, 96)
    for fmt in ("png", "webp"):
        data = img.encode_image(image, fmt)
        assert np.array_equal(np.asarray(img.decode_image(data)), np.asarray(image))
    with pytest.raises(ValueError, match="not supported"):
        img.encode_image(image, "gif")


def test_thumbnails_and_histograms_are_pngs():
    uri = img.thumbnail_data_uri(coco(DETAILED), size=48)
    assert uri.startswith("data:image/png;base64,")
    thumb = img.decode_image(base64.b64decode(uri.split(",", 1)[1]))
    assert max(thumb.size) == 48
    png = img.histogram_png("SSIM", {"all": [0.5, 0.7, 0.9], "selected": [0.9]})
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


# --- CLIPScore -----------------------------------------------------------------------------------

def test_clip_scores_on_each_scale():
    images = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    texts = np.array([[0.6, 0.8], [0.0, -1.0], [0.6, 0.8]], dtype=np.float32)
    cosine, clipped, clipscore = sv.clip_scores(images, texts)
    assert cosine == pytest.approx([0.6, -1.0, 1.0], abs=1e-6)
    assert clipped == pytest.approx([0.6, 0.0, 1.0], abs=1e-6)  # the paper's scale, [0, 1]
    assert clipscore == pytest.approx([1.5, 0.0, 2.5], abs=1e-6)  # Hessel et al.'s, [0, 2.5]
    with pytest.raises(ValueError, match="shapes differ"):
        sv.clip_scores(images, texts[:2])


def test_clipscore_texts_carry_the_prefix():
    assert sv.clipscore_texts(["a dog."]) == ["A photo depicts a dog."]
    assert sv.clipscore_texts(["a dog."], prefix="") == ["a dog."]


# --- candidates ----------------------------------------------------------------------------------

def _captions(texts: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"caption_id": [f"c{i}" for i in range(len(texts))],
                         "seed_id": [f"s{i}" for i in range(len(texts))],
                         "shard": ["a"] * len(texts), "caption": texts})


GOOD = ("A red brick house with white window frames stands behind a low wooden fence, "
        "and a black bicycle leans against the gate in the afternoon sun.")
CAPTIONS = [
    GOOD,
    "A small dog.",  # 3 words
    "the cat sat on the mat " * 6,  # repeated trigrams
    "A ### $$$ @@@ ~~~ house with *** ^^^ and %%% windows next to a {{{ }}} road ===",
    " ".join(f"word{i}" for i in range(200)),  # too long
]


def test_rules_name_the_first_failure_and_each_can_be_switched_off():
    features = sv.caption_features(_captions(CAPTIONS))
    reasons = sv.rule_reasons(features, sv.CandidateRules())["reason"].to_list()
    assert reasons == [None, "too_short", "repetition", "special_chars", "too_long"]
    off = sv.CandidateRules(length_filter=False, repetition_filter=False,
                            special_char_filter=False)
    assert sv.rule_reasons(features, off)["reason"].null_count() == len(CAPTIONS)
    no_rep = sv.rule_reasons(features, sv.CandidateRules(repetition_filter=False))
    assert no_rep["reason"].to_list()[2] is None


def test_caption_quality_prefers_rich_clean_text():
    quality = sv.caption_features(_captions([GOOD, "the cat sat on the mat " * 6]))
    good, repetitive = quality["caption_quality"].to_list()
    assert 0 < repetitive < good <= 1


@pytest.mark.parametrize(("text", "expected"), [
    ('{"descriptive": "yes"}', "yes"), ('{"descriptive": "NO"}', "no"),
    ("Yes, it names concrete objects.", "yes"), ("no.", "no"),
    ("The description is fine", None), ("", None)])
def test_parse_judgement(text, expected):
    assert sv.parse_judgement(text) == expected


def test_judgements_reject_no_and_unparsed_answers():
    frame = sv.rule_reasons(sv.caption_features(_captions(CAPTIONS[:2] + [GOOD + " Two.",
                                                                          GOOD + " Three."])),
                            sv.CandidateRules())
    judged = sv.apply_judgements(frame, ["yes", "no", None])  # row 1 failed a rule: not asked
    assert judged["reason"].to_list() == [None, "too_short", "not_descriptive", "judge_unparsed"]
    assert judged["judgement"].to_list() == ["yes", None, "no", None]
    with pytest.raises(ValueError, match="2 judgements for 3"):
        sv.apply_judgements(frame, ["yes", "no"])


def test_quality_cap_keeps_the_top_fraction_of_survivors():
    frame = pl.DataFrame({"caption_id": ["a", "b", "c", "d", "e"],
                          "caption_quality": [0.2, 0.9, 0.5, 0.7, 0.99],
                          "reason": [None, None, None, None, "too_short"]})
    capped = sv.cap_by_quality(frame, 0.5)  # 4 survivors -> keep 2: b (0.9) and d (0.7)
    assert capped["reason"].to_list() == ["below_quality_cap", None, "below_quality_cap", None,
                                          "too_short"]
    assert sv.cap_by_quality(frame, None).equals(frame)


def test_seeds_depend_on_caption_and_index_only():
    candidates = _captions([GOOD, GOOD + " Again."])
    plan = sv.plan_renders(candidates, 3)
    assert plan.height == 6 and plan["image_index"].to_list() == [0, 1, 2, 0, 1, 2]
    assert plan["seed"].n_unique() == 6 and plan["image_id"].n_unique() == 6
    assert plan["seed"][4] == sv.image_seed("c1", 1)
    again = sv.plan_renders(candidates.reverse(), 3)
    assert set(again.select("image_id", "seed").rows()) == set(plan.select("image_id", "seed").rows())
    with pytest.raises(ValueError, match="at least 1"):
        sv.plan_renders(candidates, 0)


# --- selection -----------------------------------------------------------------------------------

def _scores(rows=None, captions: dict[str, str] | None = None) -> pl.DataFrame:
    """Four captions, two images each, as (caption, index, max(cos, 0), ssim).
    weighted_score = clip_cosine_clipped + 0.5 * ssim:
    A: a0 0.4 + 0.4 = 0.8, a1 0.48 + 0.1 = 0.58       -> best a0 (0.8)
    B: b0 0.2 + 0.25 = 0.45, b1 0.25 + 0.25 = 0.5     -> best b1 (0.5)
    C: c0 0.375 + 0.25 = 0.625, c1 0.125 + 0.5 = 0.625 -> tie, lower index: c0 (0.625)
    D: d0 0.9 + 0.0 = 0.9, d1 0.04 + 0.25 = 0.29      -> best d0 (0.9)
    Best, ranked: D 0.9, A 0.8, C 0.625, B 0.5."""
    rows = rows or [("A", 0, 0.4, 0.8), ("A", 1, 0.48, 0.2), ("B", 0, 0.2, 0.5),
                    ("B", 1, 0.25, 0.5), ("C", 0, 0.375, 0.5), ("C", 1, 0.125, 1.0),
                    ("D", 0, 0.9, 0.0), ("D", 1, 0.04, 0.5)]
    captions = captions or {}
    return pl.DataFrame(
        [{"image_id": f"{c.lower()}{i}", "caption_id": c, "seed_id": "s", "shard": "x",
          "caption": captions.get(c, c), "image_index": i, "uri": f"/x/{c}{i}.png",
          "format": "png", "sha256": "h", "model_id": "m", "pretrained": False,
          "clip_model_id": "clip", "clip_pretrained": False, "clip_cosine": cos,
          "clip_cosine_clipped": cos, "clipscore_x2_5": 2.5 * cos, "ssim": ss}
         for c, i, cos, ss in rows],
        schema_overrides={"image_index": pl.Int32})


def _selected(selection: pl.DataFrame) -> list[str]:
    return sorted(selection.filter("selected")["image_id"])


def test_best_of_n_then_top_fraction():
    selection = sv.select_pairs(_scores(), score_lambda=0.5, top_fraction=0.5)
    assert sorted(selection.filter("best_of_n")["image_id"]) == ["a0", "b1", "c0", "d0"]
    assert _selected(selection) == ["a0", "d0"]  # ceil(0.5 * 4) = 2
    reasons = dict(selection.select("image_id", "reason").rows())
    assert reasons == {"a0": None, "d0": None, "b1": "below_threshold", "c0": "below_threshold",
                       "a1": "not_best_of_n", "b0": "not_best_of_n", "c1": "not_best_of_n",
                       "d1": "not_best_of_n"}
    ranks = dict(selection.filter("best_of_n").select("image_id", "rank").rows())
    assert ranks == {"d0": 0, "a0": 1, "c0": 2, "b1": 3}
    assert selection.schema == sv.SELECTION_SCHEMA


def test_top_k_and_rounding_up():
    assert _selected(sv.select_pairs(_scores(), top_k=3)) == ["a0", "c0", "d0"]
    assert _selected(sv.select_pairs(_scores(), top_fraction=0.6)) == ["a0", "c0", "d0"]  # 2.4 -> 3
    assert _selected(sv.select_pairs(_scores(), top_k=10)) == ["a0", "b1", "c0", "d0"]
    assert _selected(sv.select_pairs(_scores(), top_k=0)) == []


def test_lambda_changes_the_best_image():
    # lambda 0: the clipped cosine alone; A's best becomes a1 (0.48 > 0.4), C's c0 (0.375 > 0.125)
    selection = sv.select_pairs(_scores(), score_lambda=0.0, top_k=2)
    assert sorted(selection.filter("best_of_n")["image_id"]) == ["a1", "b1", "c0", "d0"]
    assert _selected(selection) == ["a1", "d0"]


def test_the_ranking_is_on_the_papers_scale():
    """The paper's SynthVLM-100K figures add up only on the clipped-cosine scale:
    0.36 + 0.5 * 0.86 = 0.79. On that scale x (0.30 + 0.5 * 0.50 = 0.55) loses to y (0.26 + 0.5 *
    0.62 = 0.57); 2.5 * cos + 0.5 * ssim (an effective lambda of 0.2) would pick x (1.0 > 0.96)."""
    paper = sv.select_pairs(_scores([("P", 0, 0.36, 0.86)]), score_lambda=0.5, top_k=1)
    assert paper["weighted_score"][0] == pytest.approx(0.79)
    assert paper["clipscore_x2_5"][0] == pytest.approx(0.9)  # reported, not ranked on
    selection = sv.select_pairs(_scores([("X", 0, 0.30, 0.50), ("X", 1, 0.26, 0.62)]), top_k=1)
    assert sorted(selection.filter("best_of_n")["image_id"]) == ["x1"]
    assert selection.filter("best_of_n")["weighted_score"][0] == pytest.approx(0.57)


def test_duplicate_captions_are_dropped_before_top_k():
    """A and D read the same and rank first and second: dropping duplicates after top-2 would
    export one pair. Now D (0.9) keeps the text, A is a duplicate of it, and the top 2 are D and
    C: two pairs of two different captions."""
    scores = _scores(captions={"A": "the same text", "D": "the same text"})
    selection = sv.select_pairs(scores, top_k=2)
    assert _selected(selection) == ["c0", "d0"]
    a0 = selection.filter(pl.col("image_id") == "a0").row(0, named=True)
    assert (a0["reason"], a0["duplicate_of"], a0["rank"]) == ("duplicate_caption", "d0", None)
    ranks = dict(selection.filter(pl.col("rank").is_not_null()).select("image_id", "rank").rows())
    assert ranks == {"d0": 0, "c0": 1, "b1": 2}
    chosen = selection.filter("selected")
    kept, dropped = drop_duplicate_captions(chosen.lazy(), chosen.lazy())
    assert dropped == 0 and kept.collect().height == 2 == chosen["caption"].n_unique()
    assert sv.selection_ratio(selection).passed
    # a fraction counts the distinct captions: 3 of them, ceil(0.5 * 3) = 2
    assert sv.selection_ratio(sv.select_pairs(scores, top_fraction=0.5)).metadata["expected"] == 2
    summary = sv.selection_summary(selection)
    assert (summary["captions"], summary["distinct_captions"], summary["duplicate_captions"]) \
        == (4, 3, 1)


def test_of_duplicate_captions_with_equal_scores_the_first_shard_stays():
    scores = _scores([("A", 0, 0.5, 0.5), ("B", 0, 0.5, 0.5)], captions={"A": "t", "B": "t"})
    scores = scores.with_columns(pl.when(pl.col("caption_id") == "A").then(pl.lit("z"))
                                 .otherwise(pl.lit("y")).alias("shard"))
    selection = sv.select_pairs(scores, top_k=5)
    assert _selected(selection) == ["b0"]  # shard y before z
    assert selection.filter(pl.col("image_id") == "a0")["duplicate_of"].to_list() == ["b0"]


def test_summary_records_threshold_and_distributions():
    summary = sv.selection_summary(sv.select_pairs(_scores(), top_fraction=0.5))
    assert summary["images"] == 8 and summary["captions"] == 4 and summary["selected"] == 2
    assert summary["weighted_score_threshold"] == pytest.approx(0.8)
    assert summary["clip_cosine_clipped_threshold"] == pytest.approx(0.4)
    assert summary["clipscore_x2_5_threshold"] == pytest.approx(1.0)
    score = summary["distributions"]["weighted_score"]
    assert score["best_of_n"]["count"] == 4 and score["selected"]["min"] == pytest.approx(0.8)
    assert score["all_images"]["max"] == pytest.approx(0.9)
    assert summary["distributions"]["clip_cosine_clipped"]["selected"]["mean"] \
        == pytest.approx(0.65)
    json.dumps(summary)  # goes into metadata as JSON


def test_keep_count():
    assert sv.keep_count(10, 0.3) == 3  # 0.3 * 10 is 3.0000000000000004 in floats
    assert sv.keep_count(3, 0.5) == 2 and sv.keep_count(0, 0.5) == 0
    assert sv.keep_count(5, top_k=9) == 5
    with pytest.raises(ValueError):
        sv.keep_count(5, top_k=-1)
    with pytest.raises(ValueError):
        sv.keep_count(5, 1.5)


# --- check rules: a passing and a failing case each ----------------------------------------------

def test_selection_ratio_check():
    selection = sv.select_pairs(_scores(), top_fraction=0.5)
    assert sv.selection_ratio(selection).passed
    extra = selection.with_columns(
        pl.when(pl.col("image_id") == "c0").then(True).otherwise(pl.col("selected")).alias("selected"))
    outcome = sv.selection_ratio(extra)
    assert not outcome.passed and outcome.metadata["selected"] == 3
    twice = selection.with_columns(pl.when(pl.col("image_id") == "d0").then(pl.lit("A"))
                                   .otherwise(pl.col("caption")).alias("caption"))
    assert sv.selection_ratio(twice).metadata["repeated_captions_selected"] == 1
    assert not sv.selection_ratio(twice).passed
    two_best = selection.with_columns(
        pl.when(pl.col("image_id") == "a1").then(True).otherwise(pl.col("best_of_n")).alias("best_of_n"))
    assert sv.selection_ratio(two_best).metadata["captions_without_one_best"] == 1
    stray = selection.with_columns(
        pl.when(pl.col("image_id").is_in(["a0", "a1"])).then(pl.col("image_id") == "a1")
        .otherwise(pl.col("selected")).alias("selected"))
    assert not sv.selection_ratio(stray).passed
    assert not sv.selection_ratio(selection.clear()).passed


def test_no_nan_scores_check():
    scores = _scores()
    assert sv.no_nan_scores(scores).passed
    broken = scores.with_columns(pl.when(pl.col("image_id") == "b0").then(float("nan"))
                                 .otherwise(pl.col("ssim")).alias("ssim"))
    outcome = sv.no_nan_scores(broken)
    assert not outcome.passed and outcome.metadata["nan_or_null"]["ssim"] == 1


def test_score_ranges_check():
    scores = _scores()  # median clipped cosine: (0.25 + 0.375) / 2 = 0.3125
    assert sv.score_ranges(scores, 0.3).passed
    low = sv.score_ranges(scores, 0.36)  # under the floor, e.g. the paper's selected mean
    assert not low.passed and low.metadata["median_clip_cosine_clipped"] == pytest.approx(0.3125)
    assert "synthvlm_min_median_clip_cosine_clipped" in low.description
    old_scale = scores.with_columns(pl.col("clipscore_x2_5").alias("clip_cosine_clipped"))
    assert sv.score_ranges(old_scale, 0.0).metadata["out_of_range"]["clip_cosine_clipped"] == 8
    wrong_weight = scores.with_columns((pl.col("clip_cosine_clipped") * 2).alias("clipscore_x2_5"))
    assert sv.score_ranges(wrong_weight, 0.0).metadata["out_of_range"]["clipscore_x2_5"] == 8
    bad_cos = scores.with_columns(pl.lit(1.5).alias("clip_cosine"))
    assert sv.score_ranges(bad_cos, 0.0).metadata["out_of_range"]["clip_cosine"] == 8


def test_truncation_counts_texts_over_the_encoder_length():
    summary = sv.truncation([10, 77, 78, 166], 77)
    assert summary["truncated"] == 2 and summary["truncated_share"] == 0.5
    assert summary["tokens"]["max"] == 166 and summary["max_tokens"] == 77
    assert sv.truncation([], 77)["truncated_share"] == 0.0


def test_scores_cover_images_check():
    images = pl.DataFrame({"image_id": ["a", "b", "c"]})
    assert sv.scores_cover_images(images, images).passed
    outcome = sv.scores_cover_images(pl.DataFrame({"image_id": ["a", "b", "z"]}), images)
    assert not outcome.passed and outcome.metadata == {"unscored": 1, "stale": 1}


# --- export --------------------------------------------------------------------------------------

def test_llava_records():
    prompts = load_lines("brief_description/v1.txt")
    selected = pl.DataFrame({"image_id": ["i1", "i2"], "caption": ["A red car.", "A dog."]})
    records = sv.llava_records(selected, prompts, {"i1": "images/x/i1.png", "i2": "images/x/i2.png"})
    assert [r["image"] for r in records] == ["images/x/i1.png", "images/x/i2.png"]
    for record, caption in zip(records, ["A red car.", "A dog."]):
        human, gpt = record["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert human["value"].removeprefix("<image>\n") in prompts
        assert gpt == {"from": "gpt", "value": caption}
    assert records == sv.llava_records(selected, prompts, {"i1": "images/x/i1.png",
                                                           "i2": "images/x/i2.png"})
    with pytest.raises(ValueError, match="no brief-description prompts"):
        sv.llava_records(selected, (), {})


def _images_and_scores() -> tuple[pl.DataFrame, pl.DataFrame]:
    images = pl.DataFrame({"image_id": ["i0", "i1"], "shard": ["s", "s"],
                           "caption": ["a red bus", "two dogs"], "sha256": ["d0", "d1"]})
    scores = pl.DataFrame({"image_id": ["i0", "i1"], "ssim": [0.5, 0.6], "sha256": ["d0", "d1"],
                           "caption_sha256": [caption_sha256(t) for t in images["caption"]]})
    return images, scores


def test_scores_pair_with_the_images_of_the_content_they_scored():
    images, scores = _images_and_scores()
    joined = sv.pair_scores(images, scores)
    assert dict(zip(joined["image_id"], joined["ssim"])) == {"i0": 0.5, "i1": 0.6}


@pytest.mark.parametrize("change", ["caption", "sha256"])
def test_a_score_of_another_caption_text_or_image_file_is_refused(change):
    images, scores = _images_and_scores()
    # the same image id, re-made: Stage 1 gave the caption another text, or the image was rendered again
    images = images.with_columns(pl.when(pl.col("image_id") == "i1")
                                 .then(pl.lit("three cats" if change == "caption" else "d9"))
                                 .otherwise(pl.col(change)).alias(change))
    with pytest.raises(ValueError, match=r"1 image\(s\) have no score of their own content \(1 "
                       r"scored with another image or caption text, 0 scored without digests by "
                       r"an older version, 0 never scored; shards \['s'\]"):
        sv.pair_scores(images, scores)


def test_scores_made_before_digests_are_refused_with_the_fix():
    images, scores = _images_and_scores()
    with pytest.raises(ValueError, match="re-materialise image_scores"):
        sv.pair_scores(images, scores.drop("caption_sha256"))
    # one shard scored before digests, read beside newer shards: its digests are null
    older = scores.with_columns(pl.when(pl.col("image_id") == "i1").then(None)
                                .otherwise(pl.col("sha256")).alias("sha256"))
    with pytest.raises(ValueError, match=r"\(0 scored with another image or caption text, 1 "
                       r"scored without digests by an older version, 0 never scored"):
        sv.pair_scores(images, older)


def test_an_image_never_scored_is_refused():
    images, scores = _images_and_scores()
    with pytest.raises(ValueError, match=r"\(0 scored with another image or caption text, 0 "
                       r"scored without digests by an older version, 1 never scored"):
        sv.pair_scores(images, scores.filter(pl.col("image_id") == "i0"))
