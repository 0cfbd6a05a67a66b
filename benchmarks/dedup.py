"""5. Dedup scaling: `near_duplicate_mask` (MinHash LSH) at 10k, 100k and 1M synthetic captions.

Captions are 20-60 words drawn from the word frequencies of the real COCO captions; one in twenty
is a planted near duplicate (an earlier caption with its last word replaced, Jaccard about 0.95).
Linear growth keeps the time per caption flat: the fitted exponent of time against size must stay
near 1 (an all-pairs comparison would give 2)."""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import Any

import numpy as np

from benchmarks.common import Row, coco_captions, fit_exponent, median
from unicorn_assets.logic.dedup import near_duplicate_mask

FULL = {"sizes": [10_000, 100_000, 1_000_000], "runs": {10_000: 5, 100_000: 3, 1_000_000: 3}}
SMOKE = {"sizes": [500, 1_000, 2_000], "runs": {500: 1, 1_000: 1, 2_000: 1}}
BENCH = "5. Dedup scaling"
NEAR_EVERY = 20


def synthetic_captions(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """(captions, indices of the planted near duplicates)."""
    counts = Counter(w for rec in coco_captions(5000) for w in re.findall(r"[a-z]+",
                                                                          rec["caption"].lower()))
    vocab = list(counts)
    weights = np.array([counts[w] for w in vocab], dtype=np.float64)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 61, n)
    draws = rng.choice(len(vocab), size=(n, 60), p=weights / weights.sum())
    texts = [" ".join(map(vocab.__getitem__, row[:k])) for row, k in zip(draws.tolist(), lengths)]
    planted = np.arange(NEAR_EVERY, n, NEAR_EVERY)
    for i in planted.tolist():
        words = texts[int(rng.integers(0, i))].split()
        words[-1] = "zebra" if words[-1] != "zebra" else "giraffe"
        texts[i] = " ".join(words)
    return texts, planted


def run(size: dict[str, Any]) -> list[Row]:
    sizes = size["sizes"]
    texts, planted = synthetic_captions(sizes[-1])
    near_duplicate_mask(texts[:1000])  # warm up: not timed
    seconds: dict[int, list[float]] = {}
    quality = {}
    for n in sizes:
        subset = texts[:n]
        for _ in range(size["runs"][n]):
            started = time.perf_counter()
            mask = near_duplicate_mask(subset)
            seconds.setdefault(n, []).append(time.perf_counter() - started)
        flagged = np.flatnonzero(mask)
        expected = planted[planted < n]
        quality[n] = {"planted": len(expected),
                      "planted_found": int(np.isin(expected, flagged).sum()),
                      "flagged_not_planted": int((~np.isin(flagged, expected)).sum())}
    medians = [median(seconds[n]) for n in sizes]
    exponent = fit_exponent(sizes, medians)
    per_caption = [m / n * 1e6 for m, n in zip(medians, sizes)]
    return [Row(
        BENCH, f"µs/caption at {sizes[-1]:,} captions", per_caption[-1], "µs/caption",
        f"same at {sizes[0]:,} captions", per_caption[0], target="exponent <= 1.15",
        met=exponent <= 1.15, runs=size["runs"][sizes[-1]],
        note=f"time ~ n^{exponent:.2f}; " + ", ".join(
            f"{n:,}: {s:.2f} s" for n, s in zip(sizes, medians)),
        details={"sizes": sizes, "median_seconds": [round(m, 4) for m in medians],
                 "us_per_caption": [round(p, 3) for p in per_caption],
                 "exponent": round(exponent, 3), "detection": quality})]
