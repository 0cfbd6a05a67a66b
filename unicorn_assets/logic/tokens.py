"""How much of each caption reaches the text encoder: token counts, their distribution, and the
share of captions cut at the encoder's limit (Stage 3). Pure: no Dagster, no model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from unicorn_assets.logic.quality import Outcome

TOKENS_SCHEMA = pl.Schema({"caption_id": pl.String, "tokens": pl.Int64, "truncated": pl.Boolean})


def token_frame(caption_ids: Sequence[str], counts: np.ndarray, limit: int) -> pl.DataFrame:
    """One row per caption: its length in the encoder's tokens, and whether it is longer than
    the `limit` tokens that reach the embedding (cut)."""
    counts = np.asarray(counts, dtype=np.int64)
    return pl.DataFrame({"caption_id": list(caption_ids), "tokens": counts,
                         "truncated": counts > limit}, schema=TOKENS_SCHEMA)


def token_summary(frame: pl.DataFrame) -> dict[str, float | int]:
    """The token-count distribution of `frame` (token_frame) and its truncated share."""
    counts = frame["tokens"].to_numpy()
    if counts.size == 0:
        return {"text_tokens_mean": 0.0, "text_tokens_p50": 0.0, "text_tokens_p95": 0.0,
                "text_tokens_max": 0, "captions_truncated": 0, "truncated_share": 0.0}
    cut = int(frame["truncated"].sum())
    return {"text_tokens_mean": float(counts.mean()),
            "text_tokens_p50": float(np.percentile(counts, 50)),
            "text_tokens_p95": float(np.percentile(counts, 95)),
            "text_tokens_max": int(counts.max()),
            "captions_truncated": cut,
            "truncated_share": cut / counts.size}


def truncated_share_within(frame: pl.DataFrame, max_share: float, limit: int) -> Outcome:
    """Passes when at most `max_share` of the captions are longer than the encoder reads."""
    summary = token_summary(frame)
    share = summary["truncated_share"]
    passed = share <= max_share
    fix = "" if passed else ("; their ends do not reach the embedding: set clip.long_text: "
                             "chunk_mean, or use an encoder that reads more (clip.backend: llm2clip)")
    return Outcome(passed, f"{summary['captions_truncated']} of {frame.height} captions "
                   f"({share:.1%}) are longer than the {limit} tokens the text encoder reads "
                   f"(max {max_share:.0%}){fix}", {**summary, "max_text_tokens": limit})
