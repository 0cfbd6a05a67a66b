"""Stage 1: expand short seeds into detailed captions, then filter the bad and duplicate ones."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import polars as pl

from unicorn_assets.logic import faithfulness
from unicorn_assets.logic.dedup import exact_duplicate_mask, near_duplicate_mask
from unicorn_assets.logic.prompts import PromptSet, load_lines
from unicorn_assets.logic.text import (
    caption_sha256_series,
    normalise_ws,
    stable_id,
    stable_int,
    word_count_expr,
    words,
)

CAPTION_SCHEMA = pl.Schema(
    {
        "caption_id": pl.String,
        "seed_id": pl.String,
        "shard": pl.String,
        "seed_caption": pl.String,
        "caption": pl.String,
        "caption_sha256": pl.String,  # of the exact caption text: the key pairing all that follows
        "style": pl.String,
        "expansion_index": pl.Int32,
        "model_id": pl.String,
        "prompt_version": pl.String,
        "prompt_digest": pl.String,
        "sampling": pl.String,  # JSON of the sampling parameters
        "sampling_seed": pl.Int64,
        "prompt_tokens": pl.Int32,
        "completion_tokens": pl.Int32,
        "finish_reason": pl.String,
        "n_words": pl.Int32,
        # seed faithfulness (logic/faithfulness.py); judge_contradicts is null unless the judge ran
        **faithfulness.COLUMN_SCHEMA,
    }
)
CAPTION_REJECT_SCHEMA = pl.Schema({**CAPTION_SCHEMA, "reason": pl.String})
REJECT_REASONS = ("empty", "truncated", "too_short", "too_long", "boilerplate", "repetition",
                  "echoes_seed", "duplicate", "near_duplicate", *faithfulness.REASONS)


@dataclass(frozen=True)
class CaptionFilters:
    min_words: int = 15
    max_words: int = 300
    max_repeated_trigram_ratio: float = 0.3
    min_new_words: int = 5
    near_duplicate_threshold: float = 0.85
    num_perm: int = 128
    boilerplate_patterns: str = "filters/boilerplate_v1.txt"
    faithfulness: faithfulness.FaithfulnessRules = field(
        default_factory=faithfulness.FaithfulnessRules)


MAIN_SUBJECT = "main_subject"  # the `style` of an expansion made with the prompt alone (no focus)


def plan_expansions(seeds: pl.DataFrame, prompts: PromptSet, styles: Sequence[str],
                    per_seed: int, base_seed: int) -> pl.DataFrame:
    """One row per LLM request: K distinct styles per seed, each with its own sampling seed.
    No styles (the default, as in the paper): one expansion per seed with the main-subject prompt
    alone, recorded as style `main_subject`.

    Seed ids are the user's and repeat across shards, so the caption id also hashes the shard
    (shard keys are unique). Styles and sampling seeds follow the seed id alone: the same seed
    line in two shards sends the same request (a cache hit; the export keeps one copy)."""
    unknown = [s for s in styles if s not in prompts.styles]
    if unknown:
        raise ValueError(f"styles {unknown} are not in prompt {prompts.ref}; known: "
                         f"{sorted(prompts.styles)}")
    if not styles:
        if per_seed != 1:
            raise ValueError(f"expansions_per_seed is {per_seed} with no styles: the main-subject "
                             "prompt makes one expansion per seed; set expansions_per_seed: 1, or "
                             f"name K style focuses in styles (known: {sorted(prompts.styles)})")
        styles = [MAIN_SUBJECT]
    elif not 1 <= per_seed <= len(styles):
        raise ValueError(f"expansions_per_seed must be 1..{len(styles)} (one per distinct style)")
    rows = []
    for seed_id, shard, caption in seeds.select("seed_id", "shard", "caption").iter_rows():
        start = stable_int(base_seed, seed_id) % len(styles)
        for k in range(per_seed):
            style = styles[(start + k) % len(styles)]
            rows.append({
                "caption_id": stable_id(shard, seed_id, prompts.ref, k),
                "seed_id": seed_id, "shard": shard, "seed_caption": caption, "style": style,
                "expansion_index": k, "sampling_seed": stable_int(base_seed, seed_id, k),
            })
    return pl.DataFrame(rows, schema={
        "caption_id": pl.String, "seed_id": pl.String, "shard": pl.String,
        "seed_caption": pl.String, "style": pl.String, "expansion_index": pl.Int32,
        "sampling_seed": pl.Int64,
    })


_SENTENCE_END = re.compile(r"[.!?][\"')\]]?(?=\s|$)")


def clean_completion(text: str, finish_reason: str) -> str:
    """One paragraph; a completion cut off by the token budget is trimmed to its last sentence."""
    text = normalise_ws(text).strip('"“” ')
    if finish_reason == "length":
        ends = list(_SENTENCE_END.finditer(text))
        text = text[: ends[-1].end()] if ends else ""
    return text


def assemble_captions(plan: pl.DataFrame, completions: Sequence, model_id: str,
                      prompts: PromptSet, sampling: dict) -> pl.DataFrame:
    if len(completions) != plan.height:
        raise ValueError(f"{len(completions)} completions for {plan.height} requests")
    texts = pl.Series("caption", [clean_completion(c.text, c.finish_reason) for c in completions],
                      dtype=pl.String)
    frame = plan.with_columns(
        texts, caption_sha256_series(texts),
        pl.lit(model_id).alias("model_id"),
        pl.lit(prompts.ref).alias("prompt_version"),
        pl.lit(prompts.digest).alias("prompt_digest"),
        pl.lit(json.dumps(sampling, sort_keys=True)).alias("sampling"),
        pl.Series("prompt_tokens", [c.prompt_tokens for c in completions], dtype=pl.Int32),
        pl.Series("completion_tokens", [c.completion_tokens for c in completions], dtype=pl.Int32),
        pl.Series("finish_reason", [c.finish_reason for c in completions], dtype=pl.String),
    ).with_columns(word_count_expr("caption").cast(pl.Int32).alias("n_words"))
    frame = frame.with_columns(faithfulness.score_columns(plan["seed_caption"], texts))
    return frame.select(CAPTION_SCHEMA.names())


def repeated_trigram_ratio(text: str) -> float:
    toks = words(text)
    grams = [tuple(toks[i : i + 3]) for i in range(len(toks) - 2)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def new_word_count(caption: str, seed: str) -> int:
    return len(set(words(caption)) - set(words(seed)))


def filter_captions(captions: pl.DataFrame, rules: CaptionFilters) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split captions into (kept, rejected); each reject carries the first rule it failed."""
    boilerplate = "(?i)" + "|".join(f"(?:{p})" for p in load_lines(rules.boilerplate_patterns))
    checked = captions.with_columns(
        pl.Series("_rep", [repeated_trigram_ratio(t) for t in captions["caption"]], dtype=pl.Float64),
        pl.Series("_new", [new_word_count(c, s) for c, s in
                           zip(captions["caption"], captions["seed_caption"])], dtype=pl.Int64),
        faithfulness.reason_column(captions, rules.faithfulness, "_faithfulness"),
    ).with_columns(
        pl.when(pl.col("caption").str.len_chars() == 0)
        .then(pl.when(pl.col("finish_reason") == "length").then(pl.lit("truncated"))
              .otherwise(pl.lit("empty")))
        .when(pl.col("n_words") < rules.min_words).then(pl.lit("too_short"))
        .when(pl.col("n_words") > rules.max_words).then(pl.lit("too_long"))
        .when(pl.col("caption").str.contains(boilerplate)).then(pl.lit("boilerplate"))
        .when(pl.col("_rep") > rules.max_repeated_trigram_ratio).then(pl.lit("repetition"))
        .when(pl.col("_new") < rules.min_new_words).then(pl.lit("echoes_seed"))
        .when(pl.col("_faithfulness").is_not_null()).then(pl.col("_faithfulness"))
        .otherwise(pl.lit(None, dtype=pl.String))
        .alias("reason")
    ).drop("_rep", "_new", "_faithfulness")

    survivors = checked.filter(pl.col("reason").is_null())
    exact = exact_duplicate_mask(survivors["caption"]).to_list()
    distinct = [i for i, dup in enumerate(exact) if not dup]
    near = near_duplicate_mask([survivors["caption"][i] for i in distinct],
                               threshold=rules.near_duplicate_threshold, num_perm=rules.num_perm)
    dedup_reason: list[str | None] = ["duplicate" if dup else None for dup in exact]
    for i, is_near in zip(distinct, near):
        if is_near:
            dedup_reason[i] = "near_duplicate"
    survivors = survivors.with_columns(pl.Series("reason", dedup_reason, dtype=pl.String))
    rejected = pl.concat([checked.filter(pl.col("reason").is_not_null()),
                          survivors.filter(pl.col("reason").is_not_null())])
    kept = survivors.filter(pl.col("reason").is_null()).drop("reason")
    return kept.select(CAPTION_SCHEMA.names()), rejected.select(CAPTION_REJECT_SCHEMA.names())


def length_finish_share(kept: pl.DataFrame, rejected: pl.DataFrame) -> tuple[float, int]:
    """(share of expansions whose stored finish_reason is "length", number of expansions), over
    the kept and the rejected rows: a cut caption is trimmed and kept, or rejected as truncated."""
    reasons = pl.concat([kept["finish_reason"], rejected["finish_reason"]])
    cut = int((reasons == "length").sum())
    return (cut / reasons.len() if reasons.len() else 0.0), reasons.len()


def reject_counts(rejected: pl.DataFrame) -> dict[str, int]:
    counts = dict(rejected.group_by("reason").len().iter_rows())
    return {reason: int(counts.get(reason, 0)) for reason in REJECT_REASONS}
