"""Small text helpers shared by every stage."""

from __future__ import annotations

import hashlib
import re

import polars as pl

_WS = re.compile(r"\s+")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def normalise_ws(text: str) -> str:
    return _WS.sub(" ", text).strip()


def normalise_ws_expr(col: str) -> pl.Expr:
    return pl.col(col).str.replace_all(r"\s+", " ").str.strip_chars()


def stable_id(*parts: object, length: int = 16) -> str:
    """A short, stable content hash: the same parts always give the same id."""
    digest = hashlib.sha1("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()
    return digest[:length]


def stable_int(*parts: object) -> int:
    """A stable 31-bit integer (a sampling seed, a template pick) from the given parts."""
    return int(stable_id(*parts, length=8), 16) & 0x7FFFFFFF


def caption_sha256(text: str) -> str:
    """Hex SHA-256 of the exact caption text (UTF-8): the content key that pairs a caption with
    everything made from it. Computed here only, when Stage 1 writes the caption; instructions and
    embeddings copy it from the caption row they were made from, and the exports join on it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def caption_sha256_series(texts: pl.Series) -> pl.Series:
    """`caption_sha256` of every text of a column (null stays null)."""
    return pl.Series("caption_sha256", [None if t is None else caption_sha256(t) for t in texts],
                     dtype=pl.String)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def excerpt(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
