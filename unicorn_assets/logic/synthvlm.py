"""SynthVLM branch: which captions to render, per-image seeds, CLIP scores, best-of-N and top-fraction
selection, and the LLaVA export records. Plain functions over Polars frames.

Every score column is named by its scale:
- `clip_cosine`: the raw image-text cosine, in [-1, 1];
- `clip_cosine_clipped`: max(cosine, 0), in [0, 1]. The SynthVLM paper's "CLIP" score (0.36 for
  SynthVLM-100K), and what the public SynthVLM code stores (its CLIPScore divided by 2.5);
- `clipscore_x2_5`: CLIPScore as Hessel et al. (2021) define it, 2.5 * max(cosine, 0), in [0, 2.5];
  reported only;
- `weighted_score`: clip_cosine_clipped + lambda * ssim, the paper's ranking score (0.79 = 0.36 +
  0.5 * 0.86 for SynthVLM-100K)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from unicorn_assets.logic import images
from unicorn_assets.logic.expansion import repeated_trigram_ratio
from unicorn_assets.logic.quality import Outcome
from unicorn_assets.logic.text import caption_sha256_series, stable_id, stable_int, words

CANDIDATE_SCHEMA = pl.Schema({
    "caption_id": pl.String,
    "seed_id": pl.String,
    "shard": pl.String,
    "caption": pl.String,
    "n_words": pl.Int32,
    "repeated_trigram_ratio": pl.Float64,
    "special_char_ratio": pl.Float64,
    "caption_quality": pl.Float64,
    "judgement": pl.String,  # "yes" / "no" from the LLM judge; null when the judge is off
})
CANDIDATE_REJECT_REASONS = ("too_short", "too_long", "repetition", "special_chars",
                            "not_descriptive", "judge_unparsed", "below_quality_cap")
IMAGE_SCHEMA = pl.Schema({
    "image_id": pl.String,
    "caption_id": pl.String,
    "seed_id": pl.String,
    "shard": pl.String,
    "caption": pl.String,
    "image_index": pl.Int32,
    "seed": pl.Int64,
    "uri": pl.String,
    "format": pl.String,
    "width": pl.Int32,
    "height": pl.Int32,
    "n_bytes": pl.Int64,
    "sha256": pl.String,
    "model_id": pl.String,
    "pretrained": pl.Boolean,
    "render_settings": pl.String,  # JSON
})
SCORE_SCHEMA = pl.Schema({
    "image_id": pl.String,
    "caption_id": pl.String,
    "shard": pl.String,
    "image_index": pl.Int32,
    "clip_cosine": pl.Float64,  # [-1, 1]
    "clip_cosine_clipped": pl.Float64,  # max(cos, 0), [0, 1]: the paper's CLIP score
    "clipscore_x2_5": pl.Float64,  # 2.5 * max(cos, 0), [0, 2.5]: Hessel et al.'s CLIPScore
    "ssim": pl.Float64,
    "ssim_size": pl.Int32,
    "clip_model_id": pl.String,
    "clip_pretrained": pl.Boolean,
    # what was scored: the SHA-256 of the image bytes read and of the caption text (caption_sha256)
    "sha256": pl.String,
    "caption_sha256": pl.String,
})
SELECTION_SCHEMA = pl.Schema({
    "image_id": pl.String,
    "caption_id": pl.String,
    "seed_id": pl.String,
    "shard": pl.String,
    "caption": pl.String,
    "image_index": pl.Int32,
    "uri": pl.String,
    "format": pl.String,
    "sha256": pl.String,
    "model_id": pl.String,
    "pretrained": pl.Boolean,
    "clip_model_id": pl.String,
    "clip_pretrained": pl.Boolean,
    "clip_cosine": pl.Float64,
    "clip_cosine_clipped": pl.Float64,
    "clipscore_x2_5": pl.Float64,
    "ssim": pl.Float64,
    "weighted_score": pl.Float64,  # clip_cosine_clipped + score_lambda * ssim
    "best_of_n": pl.Boolean,
    "selected": pl.Boolean,
    # null when selected, else not_best_of_n / duplicate_caption / below_threshold
    "reason": pl.String,
    # the best image of the same caption text that stays, for a duplicate_caption; else null
    "duplicate_of": pl.String,
    # rank of a caption's best image among the best images of distinct captions (0 = top)
    "rank": pl.Int64,
    "score_lambda": pl.Float64,
    "target_fraction": pl.Float64,  # the configured rule: a fraction ...
    "target_k": pl.Int64,  # ... or a count (the other is null)
})

# Letters, digits, white space and ordinary sentence punctuation; anything else is "special".
_SPECIAL = r"[^\p{L}\p{N}\s.,;:'\"!?()\-]"


@dataclass(frozen=True)
class CandidateRules:
    """SynthVLM's caption-pool filters. Each rule can be switched off."""

    length_filter: bool = True
    min_words: int = 8
    max_words: int = 150
    repetition_filter: bool = True
    max_repeated_trigram_ratio: float = 0.2
    special_char_filter: bool = True
    max_special_char_ratio: float = 0.05
    quality_top_fraction: float | None = None  # keep only this share of survivors, best first


def keep_count(n: int, fraction: float | None = None, top_k: int | None = None) -> int:
    """How many of n items a rule keeps: top_k if given, else ceil(fraction * n)."""
    if top_k is not None:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        return min(top_k, n)
    if fraction is None or not 0 <= fraction <= 1:
        raise ValueError(f"a fraction between 0 and 1 is needed, got {fraction}")
    return min(n, math.ceil(fraction * n - 1e-9))


def caption_features(captions: pl.DataFrame) -> pl.DataFrame:
    """The measures the rules use, and `caption_quality` in [0, 1]:
    (1 - repeated trigram ratio) * (1 - special-character ratio) * min(1, distinct words / 40),
    i.e. rich, non-repetitive, clean captions rank first."""
    texts = captions["caption"].to_list()
    distinct = pl.Series([len(set(words(t))) for t in texts], dtype=pl.Float64)
    return captions.select("caption_id", "seed_id", "shard", "caption").with_columns(
        pl.col("caption").str.count_matches(r"\S+").cast(pl.Int32).alias("n_words"),
        pl.Series("repeated_trigram_ratio", [repeated_trigram_ratio(t) for t in texts],
                  dtype=pl.Float64),
        (pl.col("caption").str.count_matches(_SPECIAL)
         / pl.max_horizontal(pl.col("caption").str.len_chars(), 1)).cast(pl.Float64)
        .alias("special_char_ratio"),
    ).with_columns(
        ((1 - pl.col("repeated_trigram_ratio")) * (1 - pl.col("special_char_ratio"))
         * (distinct / 40).clip(upper_bound=1.0)).alias("caption_quality"),
        pl.lit(None, dtype=pl.String).alias("judgement"),
    )


def rule_reasons(features: pl.DataFrame, rules: CandidateRules) -> pl.DataFrame:
    """Adds `reason`: the first rule a caption fails, null if it passes them all."""
    reason = pl.lit(None, dtype=pl.String)
    checks = [
        (rules.special_char_filter, pl.col("special_char_ratio") > rules.max_special_char_ratio,
         "special_chars"),
        (rules.repetition_filter,
         pl.col("repeated_trigram_ratio") > rules.max_repeated_trigram_ratio, "repetition"),
        (rules.length_filter, pl.col("n_words") > rules.max_words, "too_long"),
        (rules.length_filter, pl.col("n_words") < rules.min_words, "too_short"),
    ]
    for enabled, failed, name in checks:  # built inside out: the last wrapped is checked first
        if enabled:
            reason = pl.when(failed).then(pl.lit(name)).otherwise(reason)
    return features.with_columns(reason.alias("reason"))


JUDGE_SCHEMA = {"type": "object", "properties": {"descriptive": {"type": "string",
                                                                   "enum": ["yes", "no"]}},
                "required": ["descriptive"]}
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def parse_judgement(text: str) -> str | None:
    """"yes" or "no" from the judge's answer: JSON {"descriptive": ...} or plain text whose first
    yes/no word decides; None if it says neither."""
    try:
        answer = json.loads(text)
        if isinstance(answer, dict) and str(answer.get("descriptive", "")).lower() in ("yes", "no"):
            return str(answer["descriptive"]).lower()
    except json.JSONDecodeError:
        pass
    found = _YES_NO.search(text)
    return found.group(1).lower() if found else None


def apply_judgements(frame: pl.DataFrame, answers: Sequence[str | None]) -> pl.DataFrame:
    """Records the judge's answers ("yes", "no" or None = unparsed) on the rows still without a
    reason, in order: "no" rejects as not_descriptive, None as judge_unparsed."""
    open_rows = int(frame["reason"].is_null().sum())
    if open_rows != len(answers):
        raise ValueError(f"{len(answers)} judgements for {open_rows} captions")
    judged = iter(answers)
    judgements, reasons = [], []
    for reason in frame["reason"]:
        answer = next(judged) if reason is None else None
        judgements.append(answer)
        if reason is None and answer != "yes":
            reason = "not_descriptive" if answer == "no" else "judge_unparsed"
        reasons.append(reason)
    return frame.with_columns(pl.Series("judgement", judgements, dtype=pl.String),
                              pl.Series("reason", reasons, dtype=pl.String))


def cap_by_quality(frame: pl.DataFrame, fraction: float | None) -> pl.DataFrame:
    """Keeps the top `fraction` of the surviving captions by caption_quality (ties: caption_id)."""
    if fraction is None:
        return frame
    survivors = frame.filter(pl.col("reason").is_null())
    keep = keep_count(survivors.height, fraction)
    kept_ids = survivors.sort(["caption_quality", "caption_id"], descending=[True, False]) \
        .head(keep)["caption_id"]
    return frame.with_columns(
        pl.when(pl.col("reason").is_null() & ~pl.col("caption_id").is_in(kept_ids.implode()))
        .then(pl.lit("below_quality_cap")).otherwise(pl.col("reason")).alias("reason"))


def split_candidates(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(candidates in CANDIDATE_SCHEMA, rejects with their reason)."""
    kept = frame.filter(pl.col("reason").is_null()).select(CANDIDATE_SCHEMA.names())
    return kept, frame.filter(pl.col("reason").is_not_null())


def reason_counts(rejects: pl.DataFrame) -> dict[str, int]:
    counts = dict(rejects.group_by("reason").len().iter_rows()) if rejects.height else {}
    return {reason: int(counts.get(reason, 0)) for reason in CANDIDATE_REJECT_REASONS}


def image_seed(caption_id: str, index: int) -> int:
    """The render seed of image `index` of a caption: the same pair always gives the same seed."""
    return stable_int("synthvlm-image", caption_id, index)


def plan_renders(candidates: pl.DataFrame, images_per_caption: int) -> pl.DataFrame:
    """One row per image to render: N per caption, each with its id and seed."""
    if images_per_caption < 1:
        raise ValueError(f"images_per_caption must be at least 1, got {images_per_caption}")
    rows = [
        {"image_id": stable_id(caption_id, "image", k), "caption_id": caption_id,
         "seed_id": seed_id, "shard": shard, "caption": caption, "image_index": k,
         "seed": image_seed(caption_id, k)}
        for caption_id, seed_id, shard, caption in
        candidates.select("caption_id", "seed_id", "shard", "caption").iter_rows()
        for k in range(images_per_caption)
    ]
    return pl.DataFrame(rows, schema={name: IMAGE_SCHEMA[name] for name in (
        "image_id", "caption_id", "seed_id", "shard", "caption", "image_index", "seed")})


SCORED_CONTENT = ("image_id", "sha256", "caption_sha256")


def pair_scores(images: pl.DataFrame, scores: pl.DataFrame) -> pl.DataFrame:
    """Each image row with its score, joined on the image id AND the digests of what was scored:
    the image's bytes and its caption's text. `image_id` names a place (caption id, index); a
    caption re-made with another text, or an image rendered again, keeps its id. A score of other
    content is stale; an image without a score of its own content is refused, naming its shards."""
    missing = [c for c in SCORED_CONTENT if c not in scores.columns]
    if missing:
        raise ValueError(f"image_scores has no {', '.join(missing)} column(s): scored before "
                         "scores carried digests; re-materialise image_scores for every shard")
    images = images.with_columns(caption_sha256_series(images["caption"]))
    joined = scores.join(images, on=list(SCORED_CONTENT), how="inner", suffix="_image")
    unpaired = images.join(scores, on=list(SCORED_CONTENT), how="anti")
    if unpaired.height:
        found = scores.select("image_id", pl.any_horizontal(
            pl.col("sha256", "caption_sha256").is_null()).alias("_undigested"))
        kinds = unpaired.join(found, on="image_id", how="left")["_undigested"]
        undigested = int(kinds.sum() or 0)  # scored by a version before the digests
        other = int(kinds.is_not_null().sum()) - undigested
        raise ValueError(
            f"{unpaired.height} image(s) have no score of their own content ({other} scored "
            f"with another image or caption text, {undigested} scored without digests by an "
            f"older version, {kinds.is_null().sum()} never scored; shards "
            f"{sorted(set(unpaired['shard']))}): materialise image_scores for those shards, "
            "then select again")
    return joined


CLIPSCORE_PREFIX = "A photo depicts"


def clipscore_texts(captions: Sequence[str], prefix: str = CLIPSCORE_PREFIX) -> list[str]:
    return [f"{prefix} {caption}" if prefix else caption for caption in captions]


# Hessel et al.'s w: CLIPScore = 2.5 * max(cos, 0). Reported only; the ranking uses max(cos, 0).
CLIPSCORE_WEIGHT = 2.5
SCORE_COLUMNS = ("clip_cosine", "clip_cosine_clipped", "clipscore_x2_5", "ssim")


def clip_scores(image_embeddings: np.ndarray, text_embeddings: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cosine, max(cosine, 0), CLIPScore = 2.5 * max(cosine, 0)) per row, from L2-normalised
    embeddings (Hessel et al. 2021)."""
    if image_embeddings.shape != text_embeddings.shape:
        raise ValueError(f"embedding shapes differ: {image_embeddings.shape} vs "
                         f"{text_embeddings.shape}")
    cosine = np.einsum("ij,ij->i", image_embeddings.astype(np.float64),
                       text_embeddings.astype(np.float64))
    clipped = np.maximum(cosine, 0.0)
    return cosine, clipped, CLIPSCORE_WEIGHT * clipped


def truncation(token_counts: Sequence[int], max_tokens: int) -> dict:
    """How many texts a text encoder of `max_tokens` positions cuts (counts include the start and
    end tokens), their share, and the token-count distribution, for metadata."""
    counts = pl.Series("tokens", list(token_counts), dtype=pl.Int64)
    cut = int((counts > max_tokens).sum())
    return {"texts": counts.len(), "max_tokens": max_tokens, "truncated": cut,
            "truncated_share": round(cut / counts.len(), 4) if counts.len() else 0.0,
            "tokens": distribution(counts)}


def select_pairs(scored: pl.DataFrame, score_lambda: float = 0.5,
                 top_fraction: float | None = 0.5, top_k: int | None = None) -> pl.DataFrame:
    """Per caption, the best image by weighted_score = clip_cosine_clipped + lambda * ssim (ties:
    lower image_index). Of best images whose captions read exactly the same (one caption text in
    several shards), the best scoring stays (ties: shard, caption_id) and the others are
    `duplicate_caption`. Then the global top fraction (or top K) of the distinct captions by
    weighted_score (ties: caption_id): K pairs of K different captions."""
    frame = scored.with_columns(
        (pl.col("clip_cosine_clipped") + score_lambda * pl.col("ssim")).alias("weighted_score"))
    frame = frame.sort(["caption_id", "weighted_score", "image_index"],
                       descending=[False, True, False])
    frame = frame.with_columns((pl.int_range(pl.len()).over("caption_id") == 0).alias("best_of_n"))
    best = frame.filter("best_of_n").sort(["weighted_score", "shard", "caption_id"],
                                          descending=[True, False, False])
    best = best.with_columns(pl.col("image_id").first().over("caption").alias("kept"))
    duplicates = best.filter(pl.col("image_id") != pl.col("kept")).select(
        "image_id", pl.col("kept").alias("duplicate_of"))
    distinct = best.filter(pl.col("image_id") == pl.col("kept")) \
        .sort(["weighted_score", "caption_id"], descending=[True, False])
    distinct = distinct.with_row_index("rank").with_columns(pl.col("rank").cast(pl.Int64))
    keep = keep_count(distinct.height, top_fraction, top_k)
    frame = frame.join(distinct.select("image_id", "rank"), on="image_id", how="left") \
        .join(duplicates, on="image_id", how="left")
    frame = frame.with_columns(
        (pl.col("best_of_n") & (pl.col("rank") < keep).fill_null(False)).alias("selected"),
        pl.lit(score_lambda, dtype=pl.Float64).alias("score_lambda"),
        pl.lit(None if top_k is not None else top_fraction, dtype=pl.Float64).alias("target_fraction"),
        pl.lit(top_k, dtype=pl.Int64).alias("target_k"),
    ).with_columns(
        pl.when(pl.col("selected")).then(pl.lit(None, dtype=pl.String))
        .when(pl.col("duplicate_of").is_not_null()).then(pl.lit("duplicate_caption"))
        .when(pl.col("best_of_n")).then(pl.lit("below_threshold"))
        .otherwise(pl.lit("not_best_of_n")).alias("reason"))
    return frame.sort(["selected", "weighted_score", "image_id"], descending=[True, True, False]) \
        .select(SELECTION_SCHEMA.names())


def distribution(values: pl.Series) -> dict[str, float | int]:
    """Count, min, p05, median, mean, p95 and max (rounded), for metadata."""
    values = values.drop_nulls()
    if values.len() == 0:
        return {"count": 0}
    return {"count": values.len(), "min": round(float(values.min()), 4),
            "p05": round(float(values.quantile(0.05)), 4),
            "median": round(float(values.median()), 4), "mean": round(float(values.mean()), 4),
            "p95": round(float(values.quantile(0.95)), 4), "max": round(float(values.max()), 4)}


def selection_summary(selection: pl.DataFrame) -> dict:
    """Counts, the thresholds that resulted, and distributions before/after selection. The mean
    clip_cosine_clipped, ssim and weighted_score of the selected pairs compare with the paper's
    0.36, 0.86 and 0.79 for SynthVLM-100K."""
    best = selection.filter("best_of_n")
    distinct = best.filter(pl.col("duplicate_of").is_null())
    chosen = selection.filter("selected")
    stages = {"all_images": selection, "best_of_n": best, "selected": chosen}

    def lowest(column: str) -> float | None:
        return float(chosen[column].min()) if chosen.height else None

    return {
        "images": selection.height, "captions": best.height,
        "distinct_captions": distinct.height,
        "duplicate_captions": best.height - distinct.height, "selected": chosen.height,
        "selected_share_of_captions": round(chosen.height / distinct.height, 4)
        if distinct.height else 0.0,
        "weighted_score_threshold": lowest("weighted_score"),
        "clip_cosine_clipped_threshold": lowest("clip_cosine_clipped"),
        "clipscore_x2_5_threshold": lowest("clipscore_x2_5"),
        "ssim_threshold": lowest("ssim"),
        "distributions": {column: {stage: distribution(frame[column]) for stage, frame in
                                   stages.items()}
                          for column in ("clip_cosine_clipped", "clipscore_x2_5", "ssim",
                                         "weighted_score")},
    }


def selection_ratio(selection: pl.DataFrame) -> Outcome:
    """The selected count is exactly what the recorded rule (fraction or K of the distinct
    captions) gives, every caption has one best image, only best images are selected, and no two
    selected pairs share a caption text."""
    if selection.height == 0:
        return Outcome(False, "no scored images to select from")
    distinct = selection.filter(pl.col("best_of_n") & pl.col("duplicate_of").is_null())
    per_caption = selection.group_by("caption_id").agg(pl.col("best_of_n").sum())
    bad_best = per_caption.filter(pl.col("best_of_n") != 1).height
    chosen_rows = selection.filter("selected")
    stray = chosen_rows.filter(~pl.col("best_of_n")).height
    repeated = chosen_rows.height - chosen_rows["caption"].n_unique()
    fraction, top_k = selection["target_fraction"][0], selection["target_k"][0]
    expected = keep_count(distinct.height, fraction, top_k)
    chosen = chosen_rows.height
    rule = f"top {top_k}" if top_k is not None else f"top {fraction:.0%}"
    ok = chosen == expected and bad_best == 0 and stray == 0 and repeated == 0
    return Outcome(ok, f"{chosen} of {distinct.height} distinct captions selected, {rule} gives "
                   f"{expected}; {bad_best} caption(s) without exactly one best image, {stray} "
                   f"non-best image(s) selected, {repeated} selected caption text(s) repeated",
                   {"selected": chosen, "expected": expected, "captions": distinct.height,
                    "captions_without_one_best": bad_best, "non_best_selected": stray,
                    "repeated_captions_selected": repeated})


def no_nan_scores(scores: pl.DataFrame, columns: Sequence[str] = SCORE_COLUMNS) -> Outcome:
    bad = {c: int(scores[c].is_nan().sum() + scores[c].null_count()) for c in columns}
    ok = not any(bad.values())
    return Outcome(ok, "no NaN or missing scores" if ok else f"NaN or missing scores: {bad}",
                   {"nan_or_null": bad})


def score_ranges(scores: pl.DataFrame, min_median_clip_cosine_clipped: float,
                 tolerance: float = 1e-6) -> Outcome:
    """clip_cosine in [-1, 1], clip_cosine_clipped in [0, 1] and equal to max(clip_cosine, 0),
    clipscore_x2_5 equal to 2.5 * clip_cosine_clipped, SSIM in [-1, 1], and the median
    clip_cosine_clipped at least the configured floor (0 for untrained encoders)."""
    if scores.height == 0:
        return Outcome(False, "no scores")
    clipped = pl.col("clip_cosine_clipped")
    out_of_range = {
        "clip_cosine": scores.filter(pl.col("clip_cosine").abs() > 1 + tolerance).height,
        "clip_cosine_clipped": scores.filter(
            (clipped < -tolerance) | (clipped > 1 + tolerance)
            | ((clipped - pl.col("clip_cosine").clip(lower_bound=0)).abs() > tolerance)).height,
        "clipscore_x2_5": scores.filter(
            (pl.col("clipscore_x2_5") - CLIPSCORE_WEIGHT * clipped).abs() > tolerance).height,
        "ssim": scores.filter(pl.col("ssim").abs() > 1 + tolerance).height,
    }
    median = float(scores["clip_cosine_clipped"].median())
    ok = not any(out_of_range.values()) and median >= min_median_clip_cosine_clipped
    return Outcome(ok, f"out of range: {out_of_range}; median clip_cosine_clipped {median:.3f} "
                   f"(floor {min_median_clip_cosine_clipped}"
                   + ("" if median >= min_median_clip_cosine_clipped else
                      ": the images do not match their captions; check the renderer and CLIP "
                      "models, or lower quality_gates.synthvlm_min_median_clip_cosine_clipped")
                   + ")",
                   {"out_of_range": out_of_range, "median_clip_cosine_clipped": median})


def llava_records(selected: pl.DataFrame, prompts: Sequence[str],
                  image_paths: Mapping[str, str]) -> list[dict]:
    """LLaVA pretraining records: the image (path relative to the export folder), a brief-
    description prompt drawn per record, and the caption as the answer."""
    if not prompts:
        raise ValueError("no brief-description prompts to draw from")
    return [
        {"id": image_id, "image": image_paths[image_id],
         "conversations": [
             {"from": "human",
              "value": "<image>\n" + prompts[stable_int("brief", image_id) % len(prompts)]},
             {"from": "gpt", "value": caption}]}
        for image_id, caption in selected.select("image_id", "caption").iter_rows()
    ]


# --- file checks: `read(uri)` returns the file's bytes, or None when it does not exist ---------

Reader = Callable[[str], bytes | None]
# `digest(uri)` returns the file's SHA-256 hex digest, or None when it does not exist
Digest = Callable[[str], str | None]


def scores_cover_images(scores: pl.DataFrame, rendered: pl.DataFrame) -> Outcome:
    scored, made = set(scores["image_id"]), set(rendered["image_id"])
    return Outcome(scored == made, f"{len(made - scored)} image(s) unscored, "
                   f"{len(scored - made)} score(s) of images no longer rendered",
                   {"unscored": len(made - scored), "stale": len(scored - made)})


def verify_image_files(frame: pl.DataFrame, read: Reader) -> Outcome:
    """Every file exists, matches its SHA-256, decodes, and has the configured resolution."""
    problems: dict[str, list[str]] = {"missing": [], "hash_mismatch": [], "undecodable": [],
                                      "wrong_size": []}
    for uri, digest, settings in frame.select("uri", "sha256", "render_settings").iter_rows():
        data = read(uri)
        if data is None:
            problems["missing"].append(uri)
            continue
        if images.sha256(data) != digest:
            problems["hash_mismatch"].append(uri)
        try:
            image = images.decode_image(data)
        except Exception:  # noqa: BLE001 - any decoder error means a broken file
            problems["undecodable"].append(uri)
            continue
        size = json.loads(settings)["resolution"]
        if image.size != (size, size):
            problems["wrong_size"].append(f"{uri} is {image.size}, configured {size}")
    bad = {k: v for k, v in problems.items() if v}
    return Outcome(not bad, f"{frame.height} image files exist, match their hash and decode at the "
                   "configured size" if not bad else
                   "; ".join(f"{len(v)} {k}, e.g. {v[0]}" for k, v in bad.items()),
                   {k: len(v) for k, v in problems.items()})


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def verify_export(root: str, read: Reader, digest: Digest | None = None) -> Outcome:
    """The manifest's checksums match the files, and every record's image resolves to one. Files
    are checked one at a time: by `digest` when given (a streaming hash), else read whole."""
    hash_file = digest or (lambda uri: None if (data := read(uri)) is None
                           else images.sha256(data))
    manifest_bytes = read(_join(root, "manifest.json"))
    if manifest_bytes is None:
        return Outcome(False, f"{root}/manifest.json is missing")
    manifest = json.loads(manifest_bytes)
    records_bytes = read(_join(root, manifest["records_file"]))
    if records_bytes is None:
        return Outcome(False, f"{root}/{manifest['records_file']} is missing")
    records = json.loads(records_bytes)
    missing, mismatched = set(), []
    for name, expected in manifest["sha256"].items():
        actual = hash_file(_join(root, name))
        if actual is None:
            missing.add(name)
        if actual != expected:
            mismatched.append(name)
    unresolved = [r["id"] for r in records
                  if r["image"] not in manifest["sha256"] or r["image"] in missing]
    count_ok = manifest["counts"]["records"] == len(records)
    ok = not unresolved and not mismatched and count_ok
    return Outcome(ok, f"{len(records)} records; {len(unresolved)} image(s) do not resolve, "
                   f"{len(mismatched)} file(s) differ from their manifest checksum"
                   + ("" if count_ok else "; the manifest's record count is wrong"),
                   {"records": len(records), "unresolved": unresolved[:10],
                    "checksum_mismatch": mismatched[:10]})
