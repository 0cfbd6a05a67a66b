"""Exact and near-duplicate detection. Near duplicates use MinHash LSH (rensa): linear in the
number of texts, never a pairwise comparison."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import polars as pl
import rensa

from unicorn_assets.logic.text import fold, words


def shingles(text: str, n: int = 3) -> list[str]:
    """Word n-grams of `text` (`words`: any script; in scripts written without spaces, such as
    Chinese, each character is a word, so these are character n-grams there). A text of fewer
    than n words is one shingle."""
    toks = words(text)
    if len(toks) < n:
        return [" ".join(toks)] if toks else []
    return list(map(" ".join, zip(*(toks[i:] for i in range(n)))))


def exact_duplicate_mask(texts: pl.Series) -> pl.Series:
    """True for every text whose folded form (`fold`: its words in any script, case, punctuation
    and spacing ignored) appeared earlier."""
    folded = pl.Series(texts.name, [None if t is None else fold(t) for t in texts], dtype=pl.String)
    return ~folded.is_first_distinct()


def near_duplicate_mask(texts: Sequence[str], threshold: float = 0.85, num_perm: int = 128,
                        ngram: int = 3, seed: int = 1) -> list[bool]:
    """True for every text that is a near duplicate (estimated Jaccard >= threshold over word
    n-gram shingles) of a text kept earlier in the sequence."""
    lsh = rensa.RMinHashLSH(threshold=threshold, num_perm=num_perm, num_bands=_bands(num_perm))
    kept: dict[int, rensa.RMinHash] = {}
    mask = []
    for i, text in enumerate(texts):
        sig = rensa.RMinHash(num_perm=num_perm, seed=seed)
        sig.update(shingles(text, ngram))
        hit = any(sig.jaccard(kept[j]) >= threshold for j in lsh.query(sig))
        mask.append(hit)
        if not hit:
            lsh.insert(i, sig)
            kept[i] = sig
    return mask


def _bands(num_perm: int) -> int:
    for bands in (16, 32, 8, 64, 4):
        if num_perm % bands == 0:
            return bands
    return 1


def exact_jaccard_pair_rate(texts: Sequence[str], threshold: float, ngram: int = 3,
                            sample: int = 400) -> tuple[float, int]:
    """Share of texts (in a head sample) having an exact-Jaccard twin >= threshold.

    An independent, exact measurement used by checks to verify the MinHash filter.
    Returns (rate, number of texts examined).
    """
    subset = list(texts[:sample])
    sets = [frozenset(shingles(t, ngram)) for t in subset]
    flagged: set[int] = set()
    for i, j in combinations(range(len(sets)), 2):
        a, b = sets[i], sets[j]
        if a and b and len(a & b) / len(a | b) >= threshold:
            flagged.add(j)
    return (len(flagged) / len(subset) if subset else 0.0), len(subset)
