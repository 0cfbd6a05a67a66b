"""The alignment report's figures on geometry with a known answer: two synthetic "modalities"
sharing a latent structure (an anisotropic Gaussian, and the same one rescaled plus noise, each
around its own offset direction, on the unit sphere as CLIP's are). Each transfer moves the
centroid gap, the trace ratio and the neighbourhood overlap as its theory says, and every figure
equals a direct numpy computation written out here."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unicorn_assets.logic import alignment
from unicorn_assets.logic.alignment import PairedSet

DIM = 32


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def synthetic(scale: float, n_images: int = 120, per_image: int = 3, noise: float = 0.05,
              seed: int = 0) -> PairedSet:
    """Images: m_i + scale * z + noise; captions: m_t + z + a little caption noise, three per
    image. z is anisotropic (spread 1/k along axis k); the offsets m_t, m_i lie along two
    low-variance axes, so normalising keeps the latent structure."""
    rng = np.random.default_rng(seed)
    spread = 1.0 / np.arange(1, DIM + 1)
    z = rng.standard_normal((n_images, DIM)) * spread
    image_of = np.repeat(np.arange(n_images), per_image)
    z_text = z[image_of] + 0.2 * spread * rng.standard_normal((len(image_of), DIM))
    m_text, m_image = np.zeros(DIM), np.zeros(DIM)
    m_text[-1], m_image[-2] = 4.0, 4.0
    images = m_image + scale * z + noise * rng.standard_normal((n_images, DIM)) / np.sqrt(DIM)
    return PairedSet(unit(m_text + z_text), unit(images), image_of)


# --- a direct numpy computation, independent of the module --------------------------------------

def direct_transfer(paired: PairedSet, method: str) -> tuple[np.ndarray, np.ndarray]:
    u, e = paired.text, paired.images
    mu_t, mu_i = u.mean(axis=0), e.mean(axis=0)
    if method == "none":
        return u, e
    if method == "mean_shift":  # the paper: captions and (at inference) images centred
        return unit(u - mu_t), unit(e - mu_i)
    if method == "mean_shift_to_image_mean":
        return unit(u - mu_t + mu_i), e
    s = np.sqrt(np.trace(np.cov(e.T, bias=True)) / np.trace(np.cov(u.T, bias=True)))
    y = unit(mu_i + s * (u - mu_t))
    return unit(y - y.mean(axis=0) + mu_i), e


def direct_figures(paired: PairedSet, method: str, k: int = 10) -> dict[str, float]:
    t, im = direct_transfer(paired, method)
    sims = unit(t) @ unit(im).T
    order = np.argsort(-sims, axis=1)
    position = np.array([list(row).index(own) for row, own in zip(order, paired.image_of,
                                                                    strict=True)])

    def knn(x: np.ndarray) -> list[set[int]]:
        c = unit(x) @ unit(x).T
        np.fill_diagonal(c, -np.inf)
        return [set(row[:k]) for row in np.argsort(-c, axis=1)]

    raw, moved = knn(paired.text), knn(t)
    return {
        "centroid_gap": float(np.linalg.norm(t.mean(axis=0) - im.mean(axis=0))),
        "pair_cosine": float(np.mean([sims[i, j] for i, j in enumerate(paired.image_of)])),
        "r_at_1": float(np.mean(position < 1)),
        "r_at_5": float(np.mean(position < 5)),
        "knn_overlap": float(np.mean([len(a & b) / k for a, b in zip(raw, moved, strict=True)])),
        "trace_ratio": float(np.trace(np.cov(t.T, bias=True)) / np.trace(np.cov(im.T, bias=True))),
    }


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_the_report_figures_equal_a_direct_numpy_computation(scale):
    paired = synthetic(scale)
    figures = alignment.alignment_figures(paired, k=10)
    assert list(figures) == list(alignment.METHODS)
    for method, values in figures.items():
        assert set(values) == set(alignment.FIGURES)
        direct = direct_figures(paired, method)
        for name, value in values.items():
            assert value == pytest.approx(direct[name], rel=1e-9, abs=1e-12), (method, name)


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_each_transfer_moves_the_geometry_as_its_theory_says(scale):
    figures = alignment.alignment_figures(synthetic(scale))
    raw, shift = figures["none"], figures["mean_shift"]
    anchor, realign = figures["mean_shift_to_image_mean"], figures["realign"]
    # none: the offset between the modalities stays, and the spreads differ by scale^2 (+ noise)
    assert raw["centroid_gap"] > 1.0 and raw["knn_overlap"] == 1.0
    assert 0.6 / scale**2 < raw["trace_ratio"] < 1.5 / scale**2
    # every mean shift removes the offset
    for moved in (shift, anchor, realign):
        assert moved["centroid_gap"] < raw["centroid_gap"] / 10
        assert moved["pair_cosine"] > raw["pair_cosine"] + 0.5
    # the paper's mean shift centres both sides on the sphere: both spread like unit vectors
    assert abs(np.log(shift["trace_ratio"])) < 0.01
    # adding mu_image (ReAlign's anchor alone) keeps the text's spread: the scale stays wrong...
    assert abs(np.log(anchor["trace_ratio"])) > 0.9
    # ...ReAlign's trace step fixes it, and its centroid step closes the gap further
    assert abs(np.log(realign["trace_ratio"])) < 0.1
    assert realign["centroid_gap"] < min(anchor["centroid_gap"], shift["centroid_gap"]) / 3
    assert realign["centroid_gap"] < 0.01
    # adding a constant keeps each caption's neighbours; centring on 0 reshapes the cone
    assert anchor["knn_overlap"] > 0.9 and realign["knn_overlap"] > 0.9
    assert shift["knn_overlap"] < realign["knn_overlap"] - 0.2
    assert realign["r_at_1"] > raw["r_at_1"] + 0.5


def test_recall_and_overlap_edge_cases():
    paired = synthetic(1.0, n_images=6, per_image=2)
    assert alignment.recall_at(paired.images, paired.images, np.arange(6)) == {1: 1.0, 5: 1.0}
    with pytest.raises(ValueError, match="needs more than 12 captions"):
        alignment.knn_overlap(paired.text, paired.text, k=12)
    with pytest.raises(ValueError, match="own image"):
        PairedSet(paired.text, paired.images, paired.image_of[:-1])
    markdown = alignment.figures_png_markdown(alignment.alignment_figures(paired, k=3))
    assert markdown.startswith("![alignment by method](data:image/png;base64,")
    table = alignment.figures_markdown_table(alignment.alignment_figures(paired, k=3))
    assert table.count("\n") == 1 + len(alignment.METHODS)


def test_figures_in_range_rule():
    figures = alignment.alignment_figures(synthetic(0.5))
    assert alignment.figures_in_range(figures).passed
    for broken in ({"r_at_1": 0.9, "r_at_5": 0.5}, {"pair_cosine": float("nan")},
                   {"trace_ratio": -1.0}, {"centroid_gap": 2.5}):
        bad = {**figures, "realign": {**figures["realign"], **broken}}
        outcome = alignment.figures_in_range(bad)
        assert not outcome.passed and outcome.metadata["out_of_range"] >= 1
    moved = {**figures, "none": {**figures["none"], "knn_overlap": 0.5}}
    assert not alignment.figures_in_range(moved).passed


def test_read_pairs_refuses_bad_lines(tmp_path):
    image = tmp_path / "a.jpg"
    image.write_bytes(b"")
    pairs = tmp_path / "pairs.jsonl"
    good = json.dumps({"image": "a.jpg", "caption": "a cat"})
    pairs.write_text("\n".join([good, good.replace("cat", "dog")]) + "\n")
    read = alignment.read_pairs(pairs, max_pairs=10)
    assert read.captions == ["a cat", "a dog"] and read.images == [image]
    assert read.image_of.tolist() == [0, 0]
    assert alignment.read_pairs(pairs, max_pairs=1).captions == ["a cat"]
    for line, message in ((json.dumps({"image": "/etc/passwd", "caption": "x"}), "outside"),
                          (json.dumps({"image": "b.jpg", "caption": "x"}), "missing"),
                          (json.dumps({"caption": "x"}), "keys image and caption"),
                          ("not json", "keys image and caption"),
                          (json.dumps({"image": "a.jpg", "caption": " "}), "non-empty")):
        pairs.write_text(good + "\n" + line + "\n")
        with pytest.raises((ValueError, FileNotFoundError), match=f"{pairs}:2: .*{message}"):
            alignment.read_pairs(pairs, max_pairs=10)
    with pytest.raises(FileNotFoundError, match="set alignment_report's pairs"):
        alignment.read_pairs(tmp_path / "nope.jsonl", 10)
