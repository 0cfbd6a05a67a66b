"""The alignment report's figures: how far each transfer moves caption embeddings toward their own
images, measured on a paired reference set (captions with the image each describes). Pure numpy.

Each method's statistics are fitted on the reference set itself, as ReAlign fits unpaired ones:
the text side (mu_text, tr Sigma_text, realign's drift) from its captions, the image side
(mu_image, tr Sigma_image) from its distinct images. The captions are transferred with the method
(`modality.transfer_arrays`, the pipeline's own arithmetic); the images are mapped by the method's
inference recipe (`modality.image_side`: l2norm(e - mu_image) for mean_shift, e for the others),
since that is what a trained model sees at inference. Per method:

- centroid_gap: ||mean(text') - mean(image')||, over the captions and the distinct images;
- pair_cosine: the mean cosine between each caption's vector and its own image's;
- r_at_1, r_at_5: text->image retrieval among the distinct images, the share of captions whose
  own image ranks first (in the first five) by cosine;
- knn_overlap: the mean share of each caption's k nearest captions (cosine, itself left out) in
  the raw text space that are still among its k nearest after the transfer;
- trace_ratio: tr Sigma(text') / tr Sigma(image'), the total variances (1: the same spread).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unicorn_assets.logic.images import png_markdown
from unicorn_assets.logic.modality import (
    TRANSFER_METHODS,
    EmbeddingSummary,
    ModalityStatistics,
    image_side,
    realign_scale,
    realign_trace,
    transfer_arrays,
)
from unicorn_assets.logic.quality import Outcome
from unicorn_resources.keys import is_inside

# every transfer method, the untransferred baseline first
METHODS = ("none", *(m for m in TRANSFER_METHODS if m != "none"))
FIGURES = {
    "centroid_gap": "||mean(text') - mean(image')||",
    "pair_cosine": "mean cosine of each caption's vector with its own image's",
    "r_at_1": "text->image retrieval: share of captions whose own image ranks first",
    "r_at_5": "text->image retrieval: share of captions whose own image is in the first 5",
    "knn_overlap": "share of each caption's k nearest captions kept by the transfer",
    "trace_ratio": "tr Sigma(text') / tr Sigma(image')",
}
CHUNK = 1024  # rows of a similarity matrix held at a time


@dataclass(frozen=True)
class PairedSet:
    text: np.ndarray  # (n, d) caption embeddings, unit rows
    images: np.ndarray  # (m, d) embeddings of the distinct images, unit rows
    image_of: np.ndarray  # (n,) the row in `images` of each caption's own image

    def __post_init__(self) -> None:
        if self.text.ndim != 2 or self.images.ndim != 2 or self.text.shape[1] != self.images.shape[1]:
            raise ValueError(f"caption embeddings {self.text.shape} and image embeddings "
                             f"{self.images.shape} must be 2-d rows of one width")
        if len(self.image_of) != len(self.text) or not (
                0 <= np.min(self.image_of) and np.max(self.image_of) < len(self.images)):
            raise ValueError("every caption needs the row of its own image")


@dataclass(frozen=True)
class Pairs:
    captions: list[str]
    images: list[Path]  # distinct, in order of first mention
    image_of: np.ndarray  # (len(captions),) index into images


def read_pairs(path: str | Path, max_pairs: int) -> Pairs:
    """The first `max_pairs` lines of a pairs.jsonl: {"image": a path relative to the file's
    folder, "caption": its text}. An image path leaving that folder, a missing file or a line
    without both keys is refused, naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the paired reference set {path} does not exist: set "
                                "alignment_report's pairs to a pairs.jsonl, or null")
    captions, images, image_of, row_of = [], [], [], {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if len(captions) >= max_pairs:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                image, caption = record["image"], record["caption"]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{number}: not a JSON object with keys image and caption "
                                 f"({err})") from None
            if not isinstance(image, str) or not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"{path}:{number}: image must be a path and caption a non-empty "
                                 "text")
            file = path.parent / image
            if Path(image).is_absolute() or not is_inside(str(path.parent), str(file)):
                raise ValueError(f"{path}:{number}: image {image!r} lies outside {path.parent}: "
                                 "give a path relative to the pairs file's folder")
            if file not in row_of:
                if not file.is_file():
                    raise FileNotFoundError(f"{path}:{number}: image {image!r} is missing")
                row_of[file] = len(images)
                images.append(file)
            captions.append(caption)
            image_of.append(row_of[file])
    if not captions:
        raise ValueError(f"{path} holds no pairs")
    return Pairs(captions, images, np.asarray(image_of, dtype=np.int64))


def _summary(rows: np.ndarray) -> EmbeddingSummary:
    summary = EmbeddingSummary()
    summary.add(np.asarray(rows, dtype=np.float64))
    return summary


def fit(paired: PairedSet, method: str, model_id: str = "reference",
        pretrained: bool = False) -> ModalityStatistics:
    """`method`'s statistics fitted on the reference set: text side from its captions, image
    side from its images."""
    text, images = _summary(paired.text), _summary(paired.images)
    drift = None
    if method == "realign":
        scale = realign_scale(text.trace, images.trace)
        drift = realign_trace(paired.text, text.mean, images.mean, scale)[0].mean(axis=0)
    return ModalityStatistics(model_id, pretrained, text.count, text.dim, text.mean, shards=1,
                              image_count=images.count, mu_image=images.mean,
                              image_source="the paired reference set", method=method,
                              trace_text=text.trace, trace_image=images.trace, drift=drift)


def transferred(paired: PairedSet, stats: ModalityStatistics) -> tuple[np.ndarray, np.ndarray]:
    """(the captions transferred by the method, the images as its inference recipe maps them)."""
    return transfer_arrays(paired.text, stats)[0], image_side(paired.images, stats)


def centroid_gap(text: np.ndarray, images: np.ndarray) -> float:
    return float(np.linalg.norm(text.mean(axis=0) - images.mean(axis=0)))


def total_variance(rows: np.ndarray) -> float:
    return float(((rows - rows.mean(axis=0)) ** 2).sum(axis=1).mean())


def trace_ratio(text: np.ndarray, images: np.ndarray) -> float:
    return total_variance(text) / total_variance(images)


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def pair_cosine(text: np.ndarray, images: np.ndarray, image_of: np.ndarray) -> float:
    return float(np.einsum("ij,ij->i", _unit(text), _unit(images)[image_of]).mean())


def recall_at(text: np.ndarray, images: np.ndarray, image_of: np.ndarray,
              ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """{k: share of captions whose own image is among the k most similar} (rank = the number of
    images strictly more similar than the own one)."""
    text, images = _unit(text), _unit(images)
    ranks = np.empty(len(text), dtype=np.int64)
    for start in range(0, len(text), CHUNK):
        sims = text[start : start + CHUNK] @ images.T
        own = sims[np.arange(len(sims)), image_of[start : start + CHUNK]]
        ranks[start : start + CHUNK] = (sims > own[:, None]).sum(axis=1)
    return {k: float((ranks < k).mean()) for k in ks}


def nearest(rows: np.ndarray, k: int) -> np.ndarray:
    """(n, k) indices of each row's k most cosine-similar other rows (itself left out)."""
    if len(rows) <= k:
        raise ValueError(f"k-NN with k={k} needs more than {k} captions, found {len(rows)}")
    rows = _unit(rows)
    out = np.empty((len(rows), k), dtype=np.int64)
    for start in range(0, len(rows), CHUNK):
        sims = rows[start : start + CHUNK] @ rows.T
        sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf
        out[start : start + CHUNK] = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    return out


def knn_overlap(raw: np.ndarray, moved: np.ndarray, k: int = 10) -> float:
    a, b = nearest(raw, k), nearest(moved, k)
    return float((a[:, :, None] == b[:, None, :]).any(axis=2).sum(axis=1).mean() / k)


def method_figures(paired: PairedSet, stats: ModalityStatistics, k: int = 10) -> dict[str, float]:
    text, images = transferred(paired, stats)
    recall = recall_at(text, images, paired.image_of)
    return {"centroid_gap": centroid_gap(text, images),
            "pair_cosine": pair_cosine(text, images, paired.image_of),
            "r_at_1": recall[1], "r_at_5": recall[5],
            "knn_overlap": knn_overlap(paired.text, text, k),
            "trace_ratio": trace_ratio(text, images)}


def alignment_figures(paired: PairedSet, k: int = 10, model_id: str = "reference",
                      pretrained: bool = False) -> dict[str, dict[str, float]]:
    """{method: {figure: value}} for every method, each fitted on the reference set."""
    return {method: method_figures(paired, fit(paired, method, model_id, pretrained), k)
            for method in METHODS}


RANGES = {"centroid_gap": (0.0, 2.0), "pair_cosine": (-1.0, 1.0), "r_at_1": (0.0, 1.0),
          "r_at_5": (0.0, 1.0), "knn_overlap": (0.0, 1.0), "trace_ratio": (0.0, np.inf)}


def figures_in_range(figures: dict[str, dict[str, float]]) -> Outcome:
    """Every figure finite and in its range (unit vectors: a gap of at most 2, cosines in [-1, 1],
    shares in [0, 1], a positive trace ratio), R@1 <= R@5, and `none` keeps every neighbour."""
    bad = [f"{method}/{name}={value}" for method, values in figures.items()
           for name, value in values.items()
           if not (np.isfinite(value) and RANGES[name][0] - 1e-9 <= value <= RANGES[name][1] + 1e-9)]
    bad += [f"{method}: r_at_1 > r_at_5" for method, values in figures.items()
            if values["r_at_1"] > values["r_at_5"]]
    if "none" in figures and abs(figures["none"]["knn_overlap"] - 1.0) > 1e-12:
        bad.append("none/knn_overlap != 1")
    return Outcome(not bad, f"{sum(map(len, figures.values()))} figures of {len(figures)} methods"
                   + (f"; out of range: {', '.join(bad)}" if bad else ", all in range"),
                   {"out_of_range": len(bad)})


def figures_markdown_table(figures: dict[str, dict[str, float]]) -> str:
    head = "| method | " + " | ".join(FIGURES) + " |"
    rule = "|---|" + "---:|" * len(FIGURES)
    rows = [f"| {method} | " + " | ".join(f"{values[name]:.4g}" for name in FIGURES) + " |"
            for method, values in figures.items()]
    return "\n".join([head, rule, *rows])


def figures_png(figures: dict[str, dict[str, float]], title: str = "alignment by method") -> bytes:
    """One small bar panel per figure, one bar per method."""
    from matplotlib.figure import Figure

    methods = list(figures)
    figure = Figure(figsize=(9, 4.5), dpi=80)
    axes = figure.subplots(2, 3).ravel()
    colours = ["#999999", "#4477aa", "#66ccee", "#228833"][: len(methods)]
    for ax, name in zip(axes, FIGURES, strict=True):
        ax.bar(range(len(methods)), [figures[m][name] for m in methods], color=colours)
        ax.set_title(name, fontsize="small")
        ax.set_xticks(range(len(methods)), [m.replace("_to_image_mean", "+mu_i") for m in methods],
                      fontsize="x-small", rotation=20)
        ax.tick_params(axis="y", labelsize="x-small")
        if name == "trace_ratio":
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    figure.suptitle(title, fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def figures_png_markdown(figures: dict[str, dict[str, float]],
                         title: str = "alignment by method") -> str:
    return png_markdown(figures_png(figures, title), title)
