"""Quality figures of each stage's output, as plain numbers (no Dagster): what every shard's
materialisation reports, so the UI can plot each figure across partitions and runs, and what the
corpus-wide quality report sets beside the Unicorn paper's own figures.

Every function returns {figure name: int | float}. A figure with nothing to measure (the mean
length of no captions) is NaN, never 0: a 0 would plot as a real value.

Stage 1 (`caption_figures`): lengths in words (the `n_words` column, the same count the length
gates use), lexical diversity over the shard (distinct-1, distinct-2: distinct word uni-/bigrams
over all of them, bigrams within a caption), the mean per-caption type-token ratio (distinct words
over words, as the Unicorn paper's 0.68 is read), seed coverage (the share of the seed's content
words the caption keeps; the `seed_coverage` column where Stage 1 stores one), the share of
expansions that stopped at the token budget, and rejects by reason.

Stage 2 (`instruction_figures`): JSON validity at the first attempt and after the retries (from
the stored `attempts` / `attempt_reasons` lineage), the task mix, turns per record, and the
multiple-choice replies checked against their options and rationales.

Stage 3 (`embedding_figures`): L2 norm statistics of the embeddings, and the encoder's token
counts with the truncated share where they are given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import polars as pl

from unicorn_assets.logic import expansion, faithfulness, images, instructions, tokens
from unicorn_assets.logic.text import words

NAN = float("nan")
Figures = dict[str, float | int]

# Function words that carry no content of their own: what seed coverage does not ask a caption to
# keep (a seed's "a", "of", "is" say nothing about the picture). English only, kept small.
def seed_coverage(caption: str, seed: str) -> float:
    """Share of the seed's content lemmas that the caption contains (1.0 for a seed without
    any): the Stage 1 filter's own signal (logic/faithfulness.py), for frames stored before it."""
    return faithfulness.seed_coverage(seed, caption)


def _ngrams(tokens_: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens_[i:i + n]) for i in range(len(tokens_) - n + 1)]


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct word n-grams over all word n-grams of `texts` (n-grams do not cross captions)."""
    grams = [g for text in texts for g in _ngrams(words(text), n)]
    return len(set(grams)) / len(grams) if grams else NAN


def type_token_ratio(text: str) -> float:
    """Distinct words over words of one text (NaN for a text without words)."""
    toks = words(text)
    return len(set(toks)) / len(toks) if toks else NAN


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else NAN


def distribution(values: pl.Series | Sequence[float], prefix: str) -> Figures:
    """<prefix>_mean, _median, _p5, _p95 (linear interpolation, as numpy), _min, _max."""
    v = np.asarray(pl.Series(values).drop_nulls().to_numpy(), dtype=float)
    if v.size == 0:
        return {f"{prefix}_{k}": NAN for k in ("mean", "median", "p5", "p95", "min", "max")}
    return {f"{prefix}_mean": float(v.mean()), f"{prefix}_median": float(np.median(v)),
            f"{prefix}_p5": float(np.percentile(v, 5)), f"{prefix}_p95": float(np.percentile(v, 95)),
            f"{prefix}_min": float(v.min()), f"{prefix}_max": float(v.max())}


def reject_figures(kept: int, rejects: pl.DataFrame, reasons: Sequence[str]) -> Figures:
    """reject_rate over kept + rejected, and rejects_<reason> for every known reason (and any
    other reason the rejects name)."""
    counts = dict(rejects.group_by("reason").len().iter_rows()) if rejects.height else {}
    total = kept + rejects.height
    out: Figures = {"reject_rate": rejects.height / total if total else NAN}
    for reason in [*reasons, *sorted(r for r in counts if r not in reasons)]:
        out[f"rejects_{reason}"] = int(counts.get(reason, 0))
    return out


# --- Stage 1 ----------------------------------------------------------------------------------------

def caption_figures(captions: pl.DataFrame, rejects: pl.DataFrame) -> Figures:
    """Stage 1's figures of one shard's kept `captions` and its `rejects` (module docstring)."""
    texts = captions["caption"].to_list()
    lengths = distribution(captions["n_words"], "words")
    if "seed_coverage" in captions.columns:
        coverage = [float(v) for v in captions["seed_coverage"].drop_nulls()]
    else:
        coverage = [seed_coverage(c, s) for c, s in zip(texts, captions["seed_caption"])]
    share, generated = expansion.length_finish_share(captions, rejects)
    return {
        "captions_n": captions.height,
        **lengths,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "type_token_ratio": _mean([type_token_ratio(t) for t in texts]),
        "seed_coverage": _mean(coverage),
        "seed_coverage_full_share": (sum(c >= 1.0 for c in coverage) / len(coverage)
                                     if coverage else NAN),
        "length_finish_share": share if generated else NAN,
        **reject_figures(captions.height, rejects, expansion.REJECT_REASONS),
    }


# --- Stage 2 ----------------------------------------------------------------------------------------

def _first_attempt_valid_json(reasons: Sequence[str]) -> bool:
    """The first attempt's output was valid JSON for the schema: it was accepted (no failure
    recorded before it) or failed a record rule rather than a JSON reason."""
    return not reasons or reasons[0] not in instructions.JSON_REASONS


def instruction_figures(records: pl.DataFrame, rejects: pl.DataFrame) -> Figures:
    """Stage 2's figures of one shard's `records` and `rejects` (module docstring).

    json_valid_first_attempt: share of the planned records (kept + rejected) whose first output
    was valid JSON for its schema; json_valid_final: the share whose last output was (every kept
    record, and the rejects that failed a record rule rather than JSON); json_valid_attempts: the
    share over every attempt. Shares of task types and turns are over the kept records; the
    multiple-choice figures over the kept multiple-choice records."""
    planned = records.height + rejects.height
    first = [_first_attempt_valid_json(r) for frame in (records, rejects)
             for r in frame["attempt_reasons"].to_list()]
    final_valid = records.height + int((~rejects["reason"].is_in(
        list(instructions.JSON_REASONS))).sum())
    validity, attempts = instructions.json_validity(records, rejects)
    counts = instructions.task_counts(records)
    pairs = [instructions.turn_pairs(c) for c in records["conversations"].to_list()]
    turns = distribution(pl.Series(pairs, dtype=pl.Float64), "turns")
    return {
        "records_n": records.height,
        "json_valid_first_attempt": sum(first) / planned if planned else NAN,
        "json_valid_final": final_valid / planned if planned else NAN,
        "json_valid_attempts": validity if attempts else NAN,
        "attempts_mean": attempts / planned if planned else NAN,
        **{f"share_{task}": (counts[task] / records.height if records.height else NAN)
           for task in instructions.TASK_TYPES},
        "turns_mean": turns["turns_mean"], "turns_min": turns["turns_min"],
        "turns_max": turns["turns_max"],
        **mc_figures(records),
        **reject_figures(records.height, rejects, instructions.REJECT_REASONS),
    }


def mc_figures(records: pl.DataFrame) -> Figures:
    """The kept multiple-choice records: how many, the share whose every reply is one letter of
    the options listed (mc_letter_replies), and the share with a non-empty rationale for every
    turn (NaN without multiple-choice records)."""
    mc = records.filter(pl.col("task_type") == "multiple_choice")
    conversations = mc["conversations"].to_list()
    letters = [instructions.mc_letter_replies(c) for c in conversations]
    rationales = [bool(r) and len(r) == instructions.turn_pairs(c) and all(words(x) for x in r)
                  for c, r in zip(conversations, mc["mc_rationale"].to_list())]
    return {"mc_records_n": mc.height,
            "mc_letter_valid_share": sum(letters) / mc.height if mc.height else NAN,
            "mc_rationale_share": sum(rationales) / mc.height if mc.height else NAN}


# --- Stage 3 ----------------------------------------------------------------------------------------

def embedding_figures(embeddings: pl.DataFrame, token_counts: pl.DataFrame | None = None
                      ) -> Figures:
    """Stage 3's figures of one shard: the embeddings' L2 norms (min, max, mean, std) and, with
    `token_counts` (tokens.token_frame), the token-count distribution and truncated share."""
    out: Figures = {"embeddings_n": embeddings.height}
    if embeddings.height:
        vectors = embeddings["embedding"].to_numpy().astype(np.float64)
        norms = np.linalg.norm(vectors, axis=1)
        finite = norms[np.isfinite(norms)]
        out |= {"norm_min": float(finite.min()) if finite.size else NAN,
                "norm_max": float(finite.max()) if finite.size else NAN,
                "norm_mean": float(finite.mean()) if finite.size else NAN,
                "norm_std": float(finite.std()) if finite.size else NAN,
                "non_finite_rows": int(norms.size - finite.size)}
    else:
        out |= {"norm_min": NAN, "norm_max": NAN, "norm_mean": NAN, "norm_std": NAN,
                "non_finite_rows": 0}
    if token_counts is not None:
        out |= tokens.token_summary(token_counts)
    return out


# --- a histogram for the UI -------------------------------------------------------------------------

def word_histogram_png(n_words: pl.Series, bins: int = 20, title: str = "caption length") -> bytes:
    """A small PNG histogram of caption lengths in words, with its n and mean in the legend."""
    values = np.asarray(pl.Series(n_words).drop_nulls().to_numpy(), dtype=float)
    label = "captions" + (f", mean {values.mean():.0f}" if values.size else "")
    return images.histogram_png(title, {label: values}, bins=bins, xlabel="words",
                                ylabel="captions")


def word_histogram_markdown(n_words: pl.Series, title: str = "caption length in words") -> str:
    """The histogram as a Markdown image with a data: URI (Dagster shows it in the UI)."""
    return images.png_markdown(word_histogram_png(n_words, title=title), title)
