"""Stage 3: CLIP text embeddings of the captions, corpus statistics, and the transfer that moves
text embeddings toward the image modality (`transfer.method`): the paper's v = l2norm(u - mu_text)
(`mean_shift`), the variant v = l2norm(u - mu_text + mu_image) (`mean_shift_to_image_mean`),
ReAlign's anchor + trace + centroid steps (`realign`, arXiv 2602.07026), or `none`.

Everything corpus-wide streams in row batches: nothing holds all embeddings in memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from unicorn_assets.logic.quality import Outcome
from unicorn_resources.export_reader import map_image_embedding

EMBEDDING = "embedding"
BATCH_ROWS = 16_384  # rows per streamed batch: 48 MiB of float32 at 768 dimensions
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# method -> formula. `mean_shift` is the Unicorn paper's (and its public code's, before the l2norm).
# `realign` is ReAlign's three steps (arXiv 2602.07026), s = sqrt(tr Sigma_image / tr Sigma_text):
# anchor u - mu_text + mu_image; trace: mu_image + s (u - mu_text), normalised to y; centroid:
# y - mean(y) + mu_image, normalised (mean(y), the "drift", over the corpus's captions).
TRANSFER_FORMULAS = {
    "mean_shift": "v = (u - mu_text) / ||u - mu_text||",
    "mean_shift_to_image_mean": "v = (u - mu_text + mu_image) / ||u - mu_text + mu_image||",
    "realign": "y = l2norm(mu_image + s (u - mu_text)), s = sqrt(tr Sigma_image / tr Sigma_text); "
               "v = l2norm(y - drift + mu_image), drift = the corpus mean of y",
    "none": "v = u (no transfer: the raw CLIP text embedding)",
}
TRANSFER_METHODS = tuple(TRANSFER_FORMULAS)
DEFAULT_METHOD = "mean_shift"
TRANSFER_FORMULA = TRANSFER_FORMULAS[DEFAULT_METHOD]
# What a trainer does to a REAL image embedding e (same encoder, l2-normalised) at inference, so it
# lands where the training vectors v are: the paper centres real images by their own mean.
INFERENCE_TRANSFORMS = {
    "mean_shift": "e' = (e - mu_image) / ||e - mu_image||",
    "mean_shift_to_image_mean": "e' = e (already unit norm: the training vectors were moved to "
                                "the image mean, so real image embeddings are used as they are)",
    "realign": "e' = e (already unit norm: ReAlign moved the training vectors into the image "
               "distribution, its mean and spread, so real image embeddings are used as they are)",
    "none": "e' = e (no transfer: the model was trained on raw text embeddings, and the modality "
            "gap between them and real images remains)",
}
# methods whose statistics need the reference images (mu_image, and tr Sigma_image for realign)
NEEDS_IMAGES = ("mean_shift_to_image_mean", "realign")


def embedding_dtype(dim: int) -> pl.Array:
    return pl.Array(pl.Float32, dim)


# caption_sha256: copied from the caption row the embedding was made from (never recomputed)
CAPTION_EMBEDDING_SCHEMA = pl.Schema({"caption_id": pl.String, "caption_sha256": pl.String,
                                      "shard": pl.String, "model_id": pl.String})
# + embedding: Array(Float32, dim)
TRANSFERRED_SCHEMA = pl.Schema({"caption_id": pl.String, "caption_sha256": pl.String,
                                "shard": pl.String, "shift_norm": pl.Float32,
                                "statistics_version": pl.String})


def caption_embeddings_frame(captions: pl.DataFrame, vectors: np.ndarray, model_id: str) -> pl.DataFrame:
    """One row per caption, in caption order: id, the caption's text digest, shard, encoder and
    its float32 vector."""
    if vectors.shape[0] != captions.height:
        raise ValueError(f"{vectors.shape[0]} embeddings for {captions.height} captions")
    return captions.select("caption_id", "caption_sha256", "shard").with_columns(
        pl.lit(model_id).alias("model_id"),
        pl.Series(EMBEDDING, vectors.astype(np.float32, copy=False), dtype=embedding_dtype(vectors.shape[1])),
    )


def iter_vectors(frame: pl.LazyFrame | pl.DataFrame, *columns: str,
                 batch_rows: int = BATCH_ROWS) -> Iterator[tuple[np.ndarray, pl.DataFrame]]:
    """(float32 (n, d) embeddings, the other requested columns) per streamed batch of rows."""
    lazy = frame.lazy().select(EMBEDDING, *columns)
    for batch in lazy.collect_batches(chunk_size=batch_rows):
        if batch.height:
            yield batch[EMBEDDING].to_numpy().astype(np.float32, copy=False), batch.drop(EMBEDDING)


@dataclass
class EmbeddingSummary:
    """Accumulated over batches: count, dimension, non-finite rows, norm range, float64 sum of the
    finite rows (each row times its weight when weights are given) and of their squared norms (for
    the covariance trace, in the same pass), and distinct tag values."""

    count: int = 0
    dim: int | None = None
    nonfinite_rows: int = 0
    min_norm: float = float("inf")
    max_norm: float = float("-inf")
    total: np.ndarray | None = None
    total_sq: float = 0.0
    tags: set[str] = field(default_factory=set)

    def add(self, vectors: np.ndarray, weights: np.ndarray | None = None,
            tags: Iterable[str] = ()) -> None:
        if self.dim is None:
            self.dim, self.total = vectors.shape[1], np.zeros(vectors.shape[1], dtype=np.float64)
        elif vectors.shape[1] != self.dim:
            raise ValueError(f"embedding width changed from {self.dim} to {vectors.shape[1]}")
        finite = np.isfinite(vectors).all(axis=1)
        good = vectors[finite].astype(np.float64)
        if weights is not None:
            good *= weights[finite, None]
        self.count += len(vectors)
        self.nonfinite_rows += int((~finite).sum())
        if len(good):
            norms = np.linalg.norm(vectors[finite], axis=1)
            self.min_norm = min(self.min_norm, float(norms.min()))
            self.max_norm = max(self.max_norm, float(norms.max()))
            self.total += good.sum(axis=0)
            self.total_sq += float(np.einsum("ij,ij->", good, good))
        self.tags.update(tags)

    @property
    def mean(self) -> np.ndarray:
        finite = self.count - self.nonfinite_rows
        if self.total is None or finite == 0:
            raise ValueError("no finite embeddings to average")
        return self.total / finite

    @property
    def trace(self) -> float:
        """tr Sigma = E||x||^2 - ||mu||^2: the total variance, from the same streamed sums."""
        mean = self.mean
        return max(self.total_sq / (self.count - self.nonfinite_rows) - float(mean @ mean), 0.0)


def summarise(frame: pl.LazyFrame | pl.DataFrame, weight: str | None = None,
              tag: str | None = None, batch_rows: int = BATCH_ROWS) -> EmbeddingSummary:
    summary = EmbeddingSummary()
    columns = [c for c in (weight, tag) if c]
    for vectors, rest in iter_vectors(frame, *columns, batch_rows=batch_rows):
        summary.add(vectors, rest[weight].to_numpy() if weight else None,
                    rest[tag].unique().to_list() if tag else ())
    return summary


@dataclass(frozen=True)
class ModalityStatistics:
    """The corpus text-embedding statistics the transfer uses (mean and covariance trace), the
    reference images' (optional; needed by mean_shift_to_image_mean and realign), the method, and
    realign's drift (the corpus mean of its trace step's unit vectors)."""

    model_id: str
    pretrained: bool
    count: int
    dim: int
    mu_text: np.ndarray
    shards: int
    image_count: int = 0
    mu_image: np.ndarray | None = None
    image_source: str | None = None
    method: str = DEFAULT_METHOD
    duplicates: int = 0  # captions left out of mu_text: exact copies of an earlier shard's caption
    trace_text: float | None = None  # tr Sigma_text = E||u||^2 - ||mu_text||^2
    trace_image: float | None = None  # tr Sigma_image over the reference images
    drift: np.ndarray | None = None  # realign only: the corpus mean of y = l2norm(trace step)

    def __post_init__(self) -> None:
        if self.method not in TRANSFER_FORMULAS:
            raise ValueError(f"unknown transfer method {self.method!r}; use one of "
                             f"{', '.join(TRANSFER_METHODS)}")
        if self.method in NEEDS_IMAGES and (self.mu_image is None or (
                self.method == "realign" and self.trace_image is None)):
            raise ValueError(f"transfer method {self.method} needs reference images (their mean"
                             f"{' and covariance trace' if self.method == 'realign' else ''}): set "
                             "modality_statistics' reference_images to a folder of real images, "
                             "or use method mean_shift")
        if self.method == "realign" and (self.trace_text is None or self.drift is None):
            raise ValueError("transfer method realign needs the text covariance trace and the "
                             "drift: compute them with modality.realign_drift")

    @property
    def version(self) -> str:
        """A content hash: any change of model, corpus, image set, transfer method or its
        parameters gives a new version (so a changed method marks every shifted embedding stale)."""
        head = json.dumps([self.model_id, self.count, self.dim, self.image_count, self.image_source,
                           self.method, self.duplicates, self.trace_text, self.trace_image])
        digest = hashlib.sha256(head.encode())
        for vector in (self.mu_text, self.mu_image, self.drift):
            if vector is not None:
                digest.update(np.ascontiguousarray(vector, dtype=np.float64).tobytes())
        return digest.hexdigest()[:16]

    @property
    def scale(self) -> float:
        """realign's trace scale s = sqrt(tr Sigma_image / tr Sigma_text); 1 for the others."""
        if self.method != "realign":
            return 1.0
        return realign_scale(self.trace_text, self.trace_image)

    def steps(self) -> list[tuple[float, np.ndarray]]:
        """The method as steps x <- l2norm(a x + b), applied in order to a text embedding u."""
        zero = np.zeros(self.dim)
        if self.method == "mean_shift":
            return [(1.0, -self.mu_text)]
        if self.method == "mean_shift_to_image_mean":
            return [(1.0, self.mu_image - self.mu_text)]
        if self.method == "realign":
            return [(self.scale, self.mu_image - self.scale * self.mu_text),  # anchor + trace
                    (1.0, self.mu_image - self.drift)]  # centroid
        return [(1.0, zero)]

    @property
    def target(self) -> np.ndarray:
        """Where the mean of the transferred, unnormalised text embeddings (v * shift_norm) lands:
        0 for the paper's mean_shift, mu_image for mean_shift_to_image_mean and realign (its
        centroid step puts it there), mu_text for none."""
        if self.method in NEEDS_IMAGES:
            return self.mu_image
        if self.method == "none":
            return self.mu_text
        return np.zeros(self.dim)

    @property
    def formula(self) -> str:
        return TRANSFER_FORMULAS[self.method]

    def inference_transform(self) -> dict:
        """How a trainer maps a real image embedding at inference, and where mu_image comes from."""
        out = {"formula": INFERENCE_TRANSFORMS[self.method], "applies_to": "a real image's "
               f"embedding e from {self.model_id}, l2-normalised as the text embeddings were"}
        if self.method != "mean_shift":
            return out
        if self.mu_image is not None:
            out["mu_image"] = (f"shipped: tensor mu_image of the export's statistics file, the mean "
                               f"over {self.image_count} reference images ({self.image_source}); "
                               "better: the mean over your own images, as the paper does")
        else:
            out["mu_image"] = (f"not shipped: compute the mean of {self.model_id}'s l2-normalised "
                               "embeddings over your own images")
        return out

    @property
    def offset(self) -> np.ndarray:
        """The vector subtracted from every text embedding (single-step methods)."""
        return self.mu_text - self.target

    def parameters(self) -> dict:
        return {"method": self.method, "formula": self.formula,
                "statistics_version": self.version, "duplicates_left_out": self.duplicates,
                "model_id": self.model_id, "count": self.count, "dim": self.dim,
                "mu_text_norm": float(np.linalg.norm(self.mu_text)),
                "mu_image_norm": None if self.mu_image is None else float(np.linalg.norm(self.mu_image)),
                "trace_text": self.trace_text, "trace_image": self.trace_image,
                **({"scale": self.scale, "drift_norm": float(np.linalg.norm(self.drift))}
                   if self.method == "realign" else {}),
                "image_count": self.image_count, "image_source": self.image_source}

    def to_frame(self) -> pl.DataFrame:
        vec = pl.Array(pl.Float64, self.dim)
        return pl.DataFrame({
            "statistics_version": [self.version], "model_id": [self.model_id],
            "pretrained": [self.pretrained], "count": [self.count], "dim": [self.dim],
            "shards": [self.shards], "mu_text": pl.Series([self.mu_text], dtype=vec),
            "image_count": [self.image_count],
            "mu_image": pl.Series([self.mu_image], dtype=vec),
            "image_source": pl.Series([self.image_source], dtype=pl.String),
            "method": [self.method], "duplicates": [self.duplicates],
            "trace_text": pl.Series([self.trace_text], dtype=pl.Float64),
            "trace_image": pl.Series([self.trace_image], dtype=pl.Float64),
            "drift": pl.Series([self.drift], dtype=vec),
        })

    @classmethod
    def from_frame(cls, frame: pl.DataFrame) -> ModalityStatistics:
        if frame.height != 1:
            raise ValueError(f"modality_statistics must have one row, found {frame.height}")
        row = frame.row(0, named=True)
        if "method" not in row or "trace_text" not in row:
            raise ValueError("modality_statistics was made before the current transfer methods: "
                             "re-materialise modality_statistics (unicorn_corpus_job)")

        def vector(name: str) -> np.ndarray | None:
            return None if row[name] is None else np.asarray(row[name], dtype=np.float64)

        stats = cls(model_id=row["model_id"], pretrained=row["pretrained"], count=row["count"],
                    dim=row["dim"], mu_text=vector("mu_text"), shards=row["shards"],
                    image_count=row["image_count"], mu_image=vector("mu_image"),
                    image_source=row["image_source"], method=row["method"],
                    duplicates=row["duplicates"], trace_text=row["trace_text"],
                    trace_image=row["trace_image"], drift=vector("drift"))
        if stats.version != row["statistics_version"]:
            raise ValueError(f"modality_statistics was edited: its stored version "
                             f"{row['statistics_version']} does not match its content ({stats.version})")
        return stats


# The transfers as pure functions on arrays: (n, d) float rows in, (unit rows, norm before the last
# normalisation) out. `transfer` below is the same arithmetic as a lazy, streamed query.

def _l2norm(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / norm, norm[..., 0]


def mean_shift(u: np.ndarray, mu_text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Unicorn paper's: v = l2norm(u - mu_text)."""
    return _l2norm(np.asarray(u, dtype=np.float64) - mu_text)


def mean_shift_to_image_mean(u: np.ndarray, mu_text: np.ndarray, mu_image: np.ndarray
                             ) -> tuple[np.ndarray, np.ndarray]:
    """Ours: v = l2norm(u - mu_text + mu_image), ReAlign's anchor step alone."""
    return _l2norm(np.asarray(u, dtype=np.float64) - mu_text + mu_image)


def realign_scale(trace_text: float, trace_image: float) -> float:
    if not trace_text > 0:
        raise ValueError(f"the text covariance trace is {trace_text}: realign needs captions whose "
                         "embeddings differ (more than one distinct caption)")
    return float(np.sqrt(trace_image / trace_text))


def realign_trace(u: np.ndarray, mu_text: np.ndarray, mu_image: np.ndarray, scale: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """ReAlign's anchor and trace steps: y = l2norm(mu_image + s (u - mu_text))."""
    return _l2norm(mu_image + scale * (np.asarray(u, dtype=np.float64) - mu_text))


def realign(u: np.ndarray, mu_text: np.ndarray, mu_image: np.ndarray, scale: float,
            drift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ReAlign (arXiv 2602.07026): the trace step y, then its centroid step
    v = l2norm(y - drift + mu_image), drift = the corpus mean of y (normalising moved it off
    mu_image)."""
    y, _ = realign_trace(u, mu_text, mu_image, scale)
    return _l2norm(y - drift + mu_image)


def no_transfer(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`none`: the raw (unit) text embedding."""
    return _l2norm(np.asarray(u, dtype=np.float64))


def transfer_arrays(u: np.ndarray, stats: ModalityStatistics) -> tuple[np.ndarray, np.ndarray]:
    """`stats.method` applied to rows u: (v float64, shift_norm)."""
    if stats.method == "mean_shift":
        return mean_shift(u, stats.mu_text)
    if stats.method == "mean_shift_to_image_mean":
        return mean_shift_to_image_mean(u, stats.mu_text, stats.mu_image)
    if stats.method == "realign":
        return realign(u, stats.mu_text, stats.mu_image, stats.scale, stats.drift)
    return no_transfer(u)


def image_side(e: np.ndarray, stats: ModalityStatistics, mu_image: np.ndarray | None = None
               ) -> np.ndarray:
    """A real image's embedding as the method's inference recipe maps it (the export reader's
    mapping): l2norm(e - mu_image) for mean_shift (mu_image: yours, else the shipped one), e
    itself for the others."""
    return map_image_embedding(e, stats.method, stats.mu_image if mu_image is None else mu_image)


def realign_drift(embeddings: pl.LazyFrame | pl.DataFrame, mu_text: np.ndarray,
                  mu_image: np.ndarray, scale: float, batch_rows: int = BATCH_ROWS,
                  exclude: pl.Series | None = None) -> np.ndarray:
    """The mean of realign's trace-step vectors y over the corpus (the captions of mu_text), one
    streamed pass; memory: one batch."""
    if exclude is not None and len(exclude):
        embeddings = embeddings.lazy().filter(~pl.col("caption_id").is_in(exclude.implode()))
    summary = EmbeddingSummary()
    for vectors, _ in iter_vectors(embeddings, batch_rows=batch_rows):
        summary.add(realign_trace(vectors, mu_text, mu_image, scale)[0])
    return summary.mean


def text_statistics(embeddings: pl.LazyFrame | pl.DataFrame, batch_rows: int = BATCH_ROWS,
                    exclude: pl.Series | None = None) -> tuple[EmbeddingSummary, int]:
    """(summary with the streamed mean, number of shards), refusing a corpus that mixes encoders.
    `exclude`: caption ids left out (the exports' duplicate captions, so mu_text is the mean over
    what is exported, each text once)."""
    if exclude is not None and len(exclude):
        embeddings = embeddings.lazy().filter(~pl.col("caption_id").is_in(exclude.implode()))
    summary = summarise(embeddings, tag="model_id", batch_rows=batch_rows)
    if summary.count == 0:
        raise ValueError("caption_embeddings holds no rows: materialise it for at least one shard")
    if len(summary.tags) != 1:
        raise ValueError(f"caption_embeddings mixes encoders {sorted(summary.tags)}: re-materialise "
                         "every shard with one CLIP model before computing statistics")
    if summary.nonfinite_rows:
        raise ValueError(f"{summary.nonfinite_rows} caption embeddings are NaN/Inf; fix "
                         "caption_embeddings (its finite check names the shard) first")
    shards = embeddings.lazy().select(pl.col("shard").n_unique()).collect().item()
    return summary, shards


def reference_images(folder: str | Path) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"reference image folder {root} does not exist; set "
                                "modality_statistics' reference_images to a folder of images, or null")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return paths


def transfer(embeddings: pl.LazyFrame, stats: ModalityStatistics) -> pl.LazyFrame:
    """`stats.method` as a lazy query (streamed when sunk; float32, the same steps as
    `transfer_arrays`): one statistics version for every row; shift_norm is the norm before the
    last normalisation."""
    vector = pl.col(EMBEDDING)
    norm = pl.lit(1.0)
    for scale, bias in stats.steps():
        lit = pl.lit(pl.Series([bias.astype(np.float32)], dtype=embedding_dtype(stats.dim)))
        shifted = (vector if scale == 1.0 else vector * np.float32(scale)) + lit
        norm = (shifted * shifted).arr.sum().sqrt()
        vector = shifted / norm
    return embeddings.select(
        "caption_id", "caption_sha256", "shard",
        vector.alias(EMBEDDING),
        norm.cast(pl.Float32).alias("shift_norm"),
        pl.lit(stats.version).alias("statistics_version"),
    )


# Checks: pure rules over summaries and frames.

def dimension(summary: EmbeddingSummary, expected: int) -> Outcome:
    return Outcome(summary.dim == expected, f"embedding dimension {summary.dim} (expected {expected})",
                   {"dim": summary.dim, "expected": expected})


def finite(summary: EmbeddingSummary) -> Outcome:
    return Outcome(summary.nonfinite_rows == 0 and summary.count > 0,
                   f"{summary.nonfinite_rows} of {summary.count} embeddings hold NaN/Inf",
                   {"nonfinite_rows": summary.nonfinite_rows, "rows": summary.count})


def norms_in_range(summary: EmbeddingSummary, low: float, high: float) -> Outcome:
    ok = summary.count > 0 and low <= summary.min_norm and summary.max_norm <= high
    return Outcome(ok, f"L2 norms in [{summary.min_norm:.6f}, {summary.max_norm:.6f}] "
                   f"(allowed [{low}, {high}])",
                   {"min_norm": summary.min_norm, "max_norm": summary.max_norm})


def statistics_valid(frame: pl.DataFrame) -> Outcome:
    """The stored statistics parse, their version matches their content, and the means are
    finite vectors of the stored dimension over at least one caption."""
    try:
        stats = ModalityStatistics.from_frame(frame)
    except ValueError as err:
        return Outcome(False, str(err))
    vectors = [stats.mu_text] + ([stats.mu_image] if stats.mu_image is not None else [])
    ok = stats.count > 0 and all(v.shape == (stats.dim,) and np.isfinite(v).all() for v in vectors)
    return Outcome(ok, f"{len(vectors)} mean(s) of dimension {stats.dim} over {stats.count} "
                   f"captions{'' if ok else ': NaN/Inf, wrong width or no captions'}",
                   {"count": stats.count, "dim": stats.dim})


def shifted_mean(weighted: EmbeddingSummary, stats: ModalityStatistics, tolerance: float) -> Outcome:
    """`weighted` sums v * shift_norm (the last step's vector before normalising), so its mean
    must be the method's target: 0 (mean_shift), mu_image (mean_shift_to_image_mean, realign) or
    mu_text (none)."""
    error = float(np.linalg.norm(weighted.mean - stats.target))
    aim = {"mean_shift": "0", "none": "mu_text"}.get(stats.method, "mu_image")
    return Outcome(error <= tolerance, f"mean of the shifted text embeddings is {error:.2e} from "
                   f"{aim} (tolerance {tolerance})", {"distance": error, "target": aim})


def single_version(summary: EmbeddingSummary, stats: ModalityStatistics) -> Outcome:
    """Every row was shifted with `stats`, and the rows are the captions it covers plus the
    duplicates it left out of the mean (they are shifted too, but not exported)."""
    covered = stats.count + stats.duplicates
    ok = summary.tags == {stats.version} and summary.count == covered
    return Outcome(ok, f"{summary.count} rows shifted with statistics {sorted(summary.tags)}; current "
                   f"statistics {stats.version} cover {covered} captions ({stats.count} in the "
                   f"mean, {stats.duplicates} duplicates)",
                   {"versions": sorted(summary.tags), "current": stats.version,
                    "rows": summary.count, "statistics_count": stats.count})


def row_alignment(caption_ids: pl.Series, embedding_ids: pl.Series) -> Outcome:
    captions, embedded = set(caption_ids.to_list()), set(embedding_ids.to_list())
    missing, extra = len(captions - embedded), len(embedded - captions)
    dupes = embedding_ids.len() - embedding_ids.n_unique()
    ok = not missing and not extra and not dupes
    return Outcome(ok, f"{caption_ids.len()} captions, {embedding_ids.len()} embeddings: {missing} "
                   f"without embedding, {extra} embeddings without caption, {dupes} duplicated",
                   {"missing": missing, "extra": extra, "duplicates": dupes})
