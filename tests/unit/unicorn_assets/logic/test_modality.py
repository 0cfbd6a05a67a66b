"""Stage 3 logic (streamed statistics, the mean shift, the check rules: each passing and failing)
and its Dagster assets on a real instance: a reference-image mean from real COCO images, and a
broken encoder stopped by the blocking checks."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
from PIL import Image

from tests.support import COCO_PAIRS, make_resources, materialize_shard
from unicorn_assets.caption_seeds import read_caption_seeds
from unicorn_assets.expansion import expand_captions
from unicorn_assets.logic import modality
from unicorn_assets.logic.modality import ModalityStatistics
from unicorn_assets.logic.text import caption_sha256
from unicorn_assets.modality import (
    caption_embeddings,
    modality_statistics,
    stage3_checks,
    transferred_embeddings,
)
from unicorn_assets.partitions import SEED_SHARDS
from unicorn_resources.clip import OpenClipResource

DIM = 8


def unit_rows(n: int, seed: int, offset: float = 0.3) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32) + offset
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def shard_frame(shard: str, vectors: np.ndarray, model: str = "m") -> pl.DataFrame:
    captions = pl.DataFrame({"caption_id": [f"{shard}-{i}" for i in range(len(vectors))],
                             "caption_sha256": [caption_sha256(f"{shard}-{i}")
                                                for i in range(len(vectors))],
                             "shard": shard})
    return modality.caption_embeddings_frame(captions, vectors, model)


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[pl.LazyFrame, np.ndarray]:
    """Three shard files, as the IO manager stores them, and all their vectors."""
    parts = [unit_rows(n, seed) for seed, n in enumerate((7, 11, 5))]
    for i, vectors in enumerate(parts):
        shard_frame(f"s{i}", vectors).write_parquet(tmp_path / f"s{i}.parquet")
    return pl.scan_parquet(sorted(tmp_path.glob("s*.parquet"))), np.concatenate(parts)


def stats_of(summary: modality.EmbeddingSummary, mu_image=None,
             method: str = "mean_shift") -> ModalityStatistics:
    return ModalityStatistics("m", False, summary.count, summary.dim, summary.mean, shards=3,
                              image_count=0 if mu_image is None else 4, mu_image=mu_image,
                              image_source=None if mu_image is None else "imgs", method=method)


def test_embeddings_frame_has_fixed_size_float32_arrays():
    frame = shard_frame("s", unit_rows(3, 0))
    assert frame.schema["embedding"] == pl.Array(pl.Float32, DIM)
    assert frame["model_id"].to_list() == ["m"] * 3
    with pytest.raises(ValueError, match="2 embeddings for 3 captions"):
        modality.caption_embeddings_frame(frame, unit_rows(2, 0), "m")


def test_streamed_statistics_equal_the_in_memory_mean(corpus):
    lazy, vectors = corpus
    summary, shards = modality.text_statistics(lazy, batch_rows=4)  # many small batches
    assert (summary.count, summary.dim, shards) == (23, DIM, 3)
    np.testing.assert_allclose(summary.mean, vectors.astype(np.float64).mean(axis=0), atol=1e-12)


def test_statistics_refuse_mixed_encoders_empty_and_nan(tmp_path: Path):
    mixed = pl.concat([shard_frame("a", unit_rows(3, 0), "clip-1"),
                       shard_frame("b", unit_rows(3, 1), "clip-2")])
    with pytest.raises(ValueError, match="mixes encoders"):
        modality.text_statistics(mixed)
    with pytest.raises(ValueError, match="no rows"):
        modality.text_statistics(mixed.clear())
    bad = unit_rows(3, 0)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        modality.text_statistics(shard_frame("a", bad))


def test_statistics_version_follows_content():
    summary = modality.summarise(shard_frame("a", unit_rows(5, 0)))
    stats = stats_of(summary)
    again = ModalityStatistics.from_frame(stats.to_frame())
    assert again.version == stats.version and np.array_equal(again.mu_text, stats.mu_text)
    grown = modality.summarise(shard_frame("a", unit_rows(6, 0)))
    assert stats_of(grown).version != stats.version
    with_image = stats_of(summary, mu_image=np.ones(DIM) / 3)
    assert with_image.version != stats.version
    # the method is part of the version: changing it marks every shifted row stale
    additive = stats_of(summary, mu_image=np.ones(DIM) / 3, method="mean_shift_to_image_mean")
    assert additive.version != with_image.version
    assert ModalityStatistics.from_frame(additive.to_frame()).method == "mean_shift_to_image_mean"
    with pytest.raises(ValueError, match="needs reference images .* set modality_statistics' "
                       "reference_images"):
        stats_of(summary, method="mean_shift_to_image_mean")
    with pytest.raises(ValueError, match="realign needs reference images .*covariance trace.* "
                       "set modality_statistics' reference_images"):
        stats_of(summary, method="realign")
    with pytest.raises(ValueError, match="unknown transfer method"):
        stats_of(summary, method="shift")
    legacy = stats.to_frame().drop("method")
    with pytest.raises(ValueError, match="re-materialise modality_statistics"):
        ModalityStatistics.from_frame(legacy)
    tampered = stats.to_frame().with_columns(pl.lit(99, dtype=pl.Int64).alias("count"))
    with pytest.raises(ValueError, match="does not match its content"):
        ModalityStatistics.from_frame(tampered)


def realign_stats(lazy, vectors_image: np.ndarray, **changes) -> ModalityStatistics:
    text, _ = modality.text_statistics(lazy)
    images = modality.EmbeddingSummary()
    images.add(vectors_image)
    params = {"trace_text": text.trace, "trace_image": images.trace, "mu_image": images.mean,
              **changes}
    scale = modality.realign_scale(params["trace_text"], params["trace_image"])
    drift = modality.realign_drift(lazy, text.mean, params["mu_image"], scale, batch_rows=4)
    return ModalityStatistics("m", False, text.count, DIM, text.mean, shards=3,
                              image_count=len(vectors_image), image_source="imgs",
                              method="realign", drift=drift, **params)


def test_covariance_traces_come_from_the_same_streamed_pass(corpus):
    lazy, vectors = corpus
    summary, _ = modality.text_statistics(lazy, batch_rows=4)
    direct = np.trace(np.cov(vectors.astype(np.float64).T, bias=True))
    assert summary.trace == pytest.approx(direct, rel=1e-9)
    images = modality.EmbeddingSummary()
    images.add(unit_rows(9, 5, offset=1.0))
    assert images.trace < summary.trace  # a tighter cone: a smaller total variance


def test_a_change_of_method_or_its_parameters_marks_the_shift_stale(corpus):
    """The statistics version covers the method and its parameters (traces, drift): any change
    gives a new version, which single_statistics_version then refuses for the old rows."""
    lazy, _ = corpus
    images = unit_rows(9, 5, offset=1.0)
    summary, _ = modality.text_statistics(lazy)
    realigned = realign_stats(lazy, images)
    again = ModalityStatistics.from_frame(realigned.to_frame())
    assert again.version == realigned.version and again.scale == pytest.approx(realigned.scale)
    base = {"mu_image": realigned.mu_image, "trace_text": realigned.trace_text,
                "trace_image": realigned.trace_image}
    versions = {method: stats_of(summary, realigned.mu_image, method).version
                for method in ("mean_shift", "mean_shift_to_image_mean", "none")}
    versions["realign"] = realigned.version
    assert len(set(versions.values())) == 4
    rescaled = realign_stats(lazy, images, **{**base, "trace_image": base["trace_image"] * 2})
    assert rescaled.version != realigned.version and rescaled.scale != realigned.scale
    old_rows = modality.summarise(modality.transfer(lazy, stats_of(summary, realigned.mu_image)),
                                  tag="statistics_version")
    assert not modality.single_version(old_rows, realigned).passed
    assert modality.single_version(modality.summarise(
        modality.transfer(lazy, realigned), tag="statistics_version"), realigned).passed


def test_statistics_valid_rule():
    stats = stats_of(modality.summarise(shard_frame("a", unit_rows(5, 0))))
    assert modality.statistics_valid(stats.to_frame()).passed
    nan = ModalityStatistics("m", False, 5, DIM, np.full(DIM, np.nan), shards=1)
    assert not modality.statistics_valid(nan.to_frame()).passed
    empty = ModalityStatistics("m", False, 0, DIM, np.zeros(DIM), shards=0)
    assert not modality.statistics_valid(empty.to_frame()).passed
    edited = stats.to_frame().with_columns(pl.lit("0" * 16).alias("statistics_version"))
    assert not modality.statistics_valid(edited).passed


@pytest.mark.parametrize(("method", "with_image"), [("mean_shift", False), ("mean_shift", True),
                                                    ("mean_shift_to_image_mean", True)])
def test_transfer_matches_the_formula(corpus, method, with_image):
    """The paper's mean_shift gives l2norm(u - mu_text) even when an image mean is known (it is
    shipped for inference, not added); only the named variant adds it."""
    lazy, vectors = corpus
    summary, _ = modality.text_statistics(lazy)
    mu_image = unit_rows(1, 9)[0].astype(np.float64) if with_image else None
    stats = stats_of(summary, mu_image, method)
    out = modality.transfer(lazy, stats).collect()
    added = mu_image if method == "mean_shift_to_image_mean" else 0
    expected = vectors - summary.mean + added
    norms = np.linalg.norm(expected, axis=1)
    np.testing.assert_allclose(out["embedding"].to_numpy(), expected / norms[:, None], atol=1e-5)
    np.testing.assert_allclose(out["shift_norm"].to_numpy(), norms, rtol=1e-5)
    assert out["statistics_version"].unique().to_list() == [stats.version]
    shifted = modality.summarise(out, weight="shift_norm", tag="statistics_version")
    assert modality.shifted_mean(shifted, stats, 1e-5).passed
    assert modality.norms_in_range(shifted, 1 - 1e-4, 1 + 1e-4).passed
    assert modality.single_version(shifted, stats).passed


@pytest.mark.parametrize("method", ["realign", "none"])
def test_realign_and_none_follow_their_formulas(corpus, method):
    """realign: y = l2norm(mu_image + s (u - mu_text)), v = l2norm(y - mean(y) + mu_image), written
    out here in numpy; the lazy corpus query, the array function and the formula agree, and the
    transferred vectors' unnormalised mean is the method's target."""
    lazy, vectors = corpus
    images = unit_rows(9, 5, offset=1.0).astype(np.float64)
    stats = realign_stats(lazy, images)
    if method == "none":
        stats = ModalityStatistics("m", False, stats.count, DIM, stats.mu_text, shards=3,
                                   method="none", trace_text=stats.trace_text)
        expected_last = vectors.astype(np.float64)
    else:
        u = vectors.astype(np.float64)
        mu_t, mu_i = u.mean(axis=0), images.mean(axis=0)
        trace = lambda x: ((x - x.mean(axis=0)) ** 2).sum(axis=1).mean()
        s = np.sqrt(trace(images) / trace(u))
        y = mu_i + s * (u - mu_t)
        y /= np.linalg.norm(y, axis=1, keepdims=True)
        expected_last = y - y.mean(axis=0) + mu_i
        assert stats.scale == pytest.approx(s, rel=1e-9)
    norms = np.linalg.norm(expected_last, axis=1)
    out = modality.transfer(lazy, stats).collect()
    np.testing.assert_allclose(out["embedding"].to_numpy(), expected_last / norms[:, None],
                               atol=1e-5)
    np.testing.assert_allclose(out["shift_norm"].to_numpy(), norms, rtol=1e-5)
    arrays, array_norms = modality.transfer_arrays(vectors, stats)
    np.testing.assert_allclose(arrays, expected_last / norms[:, None], atol=1e-9)
    np.testing.assert_allclose(array_norms, norms, rtol=1e-9)
    shifted = modality.summarise(out, weight="shift_norm", tag="statistics_version")
    assert modality.shifted_mean(shifted, stats, 1e-5).passed
    assert not modality.shifted_mean(shifted, stats_of(shifted), 1e-5).passed  # 0 is not its aim
    assert modality.single_version(shifted, stats).passed


def test_text_mean_counts_each_exported_caption_once(corpus):
    """Captions left out of the exports as duplicates are left out of mu_text too, and the
    version check counts them among the shifted rows."""
    lazy, vectors = corpus
    ids = lazy.select("caption_id").collect()["caption_id"]
    dropped = ids.slice(2, 4)
    summary, shards = modality.text_statistics(lazy, exclude=dropped)
    keep = ~ids.is_in(dropped.implode()).to_numpy()
    assert summary.count == len(vectors) - 4 and shards == 3
    np.testing.assert_allclose(summary.mean, vectors[keep].astype(np.float64).mean(axis=0),
                               atol=1e-12)
    assert not np.allclose(summary.mean, vectors.mean(axis=0), atol=1e-6)
    stats = ModalityStatistics("m", False, summary.count, DIM, summary.mean, shards=3,
                               duplicates=len(dropped))
    shifted = modality.transfer(lazy, stats).collect()
    assert modality.single_version(modality.summarise(shifted, tag="statistics_version"),
                                   stats).passed
    kept = shifted.filter(~pl.col("caption_id").is_in(dropped.implode()))
    assert modality.shifted_mean(modality.summarise(kept, weight="shift_norm"), stats, 1e-5).passed
    no_dupes = ModalityStatistics("m", False, summary.count, DIM, summary.mean, shards=3)
    assert not modality.single_version(modality.summarise(shifted, tag="statistics_version"),
                                       no_dupes).passed


def test_inference_transform_names_the_image_mean(corpus):
    lazy, _ = corpus
    summary, _ = modality.text_statistics(lazy)
    plain = stats_of(summary).inference_transform()
    assert plain["formula"] == "e' = (e - mu_image) / ||e - mu_image||"
    assert "your own images" in plain["mu_image"] and "not shipped" in plain["mu_image"]
    shipped = stats_of(summary, np.ones(DIM) / 3).inference_transform()
    assert shipped["mu_image"].startswith("shipped")
    additive = stats_of(summary, np.ones(DIM) / 3, "mean_shift_to_image_mean")
    assert additive.inference_transform()["formula"].startswith("e' = e ")
    realigned = realign_stats(lazy, unit_rows(9, 5, offset=1.0))
    assert realigned.inference_transform()["formula"].startswith("e' = e ")
    e = unit_rows(3, 8)
    np.testing.assert_allclose(modality.image_side(e, realigned), e, atol=1e-7)
    centred = e - realigned.mu_image
    np.testing.assert_allclose(
        modality.image_side(e, stats_of(summary, realigned.mu_image)),
        centred / np.linalg.norm(centred, axis=1, keepdims=True), atol=1e-7)


def test_shifted_mean_fails_when_shards_used_different_means(corpus):
    lazy, _ = corpus
    summary, _ = modality.text_statistics(lazy)
    stats = stats_of(summary)
    old = stats_of(modality.summarise(lazy.filter(pl.col("shard") != "s2")))  # before s2 arrived
    mixed = pl.concat([modality.transfer(lazy.filter(pl.col("shard") != "s2"), old),
                       modality.transfer(lazy.filter(pl.col("shard") == "s2"), stats)]).collect()
    shifted = modality.summarise(mixed, weight="shift_norm", tag="statistics_version")
    outcome = modality.shifted_mean(shifted, stats, 1e-4)
    assert not outcome.passed and outcome.metadata["distance"] > 1e-3
    versions = modality.single_version(shifted, stats)
    assert not versions.passed and len(versions.metadata["versions"]) == 2
    # the stale statistics cover fewer captions than the shifted rows: refused too
    assert not modality.single_version(
        modality.summarise(modality.transfer(lazy, old), tag="statistics_version"), old).passed


def test_dimension_finite_and_norm_rules():
    good = modality.summarise(shard_frame("a", unit_rows(4, 0)))
    assert modality.dimension(good, DIM).passed
    assert not modality.dimension(good, DIM * 2).passed
    assert modality.finite(good).passed
    assert modality.norms_in_range(good, 0.999, 1.001).passed
    bad = unit_rows(4, 0)
    bad[0] *= 2
    bad[3, 0] = np.inf
    broken = modality.summarise(shard_frame("a", bad))
    assert not modality.finite(broken).passed and broken.nonfinite_rows == 1
    assert not modality.norms_in_range(broken, 0.999, 1.001).passed
    assert not modality.finite(modality.summarise(shard_frame("a", unit_rows(4, 0)).clear())).passed


def test_row_alignment_rule():
    ids = pl.Series(["a", "b", "c"])
    assert modality.row_alignment(ids, pl.Series(["c", "a", "b"])).passed
    for embedded, key in ((["a", "b"], "missing"), (["a", "b", "c", "d"], "extra"),
                          (["a", "b", "c", "c"], "duplicates")):
        outcome = modality.row_alignment(ids, pl.Series(embedded))
        assert not outcome.passed and outcome.metadata[key] == 1


def test_reference_images(tmp_path: Path):
    found = modality.reference_images(COCO_PAIRS.parent)
    assert found and all(p.suffix == ".jpg" for p in found)
    with pytest.raises(FileNotFoundError, match="reference_images"):
        modality.reference_images(tmp_path / "nope")
    with pytest.raises(ValueError, match="no images"):
        modality.reference_images(tmp_path)


# --- the Dagster assets ---------------------------------------------------------------------

STAGE3 = [read_caption_seeds, expand_captions, caption_embeddings]


def failed(result: dg.ExecuteInProcessResult) -> set[str]:
    return {e.asset_check_evaluation_data.asset_check_key.name for e in result.all_events
            if e.event_type_value == "ASSET_CHECK_EVALUATION"
            and not e.asset_check_evaluation_data.passed}


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    error = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error
    return " ".join(m.message for m in (error, error.cause) if m is not None)


def test_image_mean_from_real_reference_images(tmp_path: Path, instance, seed_dir, fake_llm):
    resources = make_resources(tmp_path / "data", seed_dir, llm=fake_llm)
    for key in ("shard-a", "shard-b"):
        result = materialize_shard(instance, resources, key, STAGE3,
                                   selection=[dg.AssetKey(a) for a in ("caption_seeds",
                                              "caption_seed_rejects", "expanded_captions",
                                              "expanded_caption_rejects", "caption_embeddings")])
        assert result.success and not failed(result)
    corpus = dg.materialize(
        [*STAGE3, modality_statistics, transferred_embeddings, *stage3_checks],
        selection=[modality_statistics, transferred_embeddings], instance=instance,
        resources=resources, run_config={"ops": {"modality_statistics": {"config": {
            "reference_images": str(COCO_PAIRS.parent)}}}})
    assert corpus.success and not failed(corpus), failed(corpus)
    stats = ModalityStatistics.from_frame(pl.read_parquet(tmp_path / "data" / "modality_statistics.parquet"))
    images = len(modality.reference_images(COCO_PAIRS.parent))
    assert stats.image_count == images and stats.mu_image is not None
    expected = OpenClipResource().encode_images(
        [Image.open(p) for p in modality.reference_images(COCO_PAIRS.parent)]).mean(axis=0)
    np.testing.assert_allclose(stats.mu_image, expected, atol=1e-5)
    meta = corpus.asset_materializations_for_node("modality_statistics")[0].metadata
    assert meta["transfer"].value["image_count"] == images

    assert "untrained" in meta["model_note"].value
    # the paper's transfer by default: mu_image is computed and shipped, not added
    assert stats.method == "mean_shift" and meta["transfer"].value["method"] == "mean_shift"
    assert meta["inference_transform"].value["mu_image"].startswith("shipped")
    shifted = pl.read_parquet(tmp_path / "data" / "transferred_embeddings.parquet")
    raw = pl.read_parquet(tmp_path / "data" / "caption_embeddings" / "*.parquet")
    u = dict(zip(raw["caption_id"], raw["embedding"].to_numpy()))
    first = shifted.row(0, named=True)
    expected = u[first["caption_id"]] - stats.mu_text
    np.testing.assert_allclose(first["embedding"], expected / np.linalg.norm(expected), atol=1e-5)
    # the additive variant without an image set is refused, naming the setting
    refused = dg.materialize(
        [*STAGE3, modality_statistics, transferred_embeddings, *stage3_checks],
        selection=[modality_statistics], instance=instance, resources=resources,
        raise_on_error=False, run_config={"ops": {"modality_statistics": {"config": {
            "transfer": {"method": "mean_shift_to_image_mean"}}}}})
    assert not refused.success
    assert "reference_images" in failure_message(refused)

    # realign on the real images: its checks pass (the unnormalised mean lands on mu_image), its
    # image trace is the images' own, and the new method gives a new statistics version
    def corpus_run(config: dict, **kwargs) -> dg.ExecuteInProcessResult:
        return dg.materialize(
            [*STAGE3, modality_statistics, transferred_embeddings, *stage3_checks],
            selection=[modality_statistics, transferred_embeddings], instance=instance,
            resources=resources, run_config={"ops": {"modality_statistics": {"config": config}}},
            **kwargs)

    realigned = corpus_run({"reference_images": str(COCO_PAIRS.parent),
                            "transfer": {"method": "realign"}})
    assert realigned.success and not failed(realigned), failed(realigned)
    new = ModalityStatistics.from_frame(
        pl.read_parquet(tmp_path / "data" / "modality_statistics.parquet"))
    assert new.method == "realign" and new.version != stats.version
    encoded = OpenClipResource().encode_images(
        [Image.open(p) for p in modality.reference_images(COCO_PAIRS.parent)]).astype(np.float64)
    direct = ((encoded - encoded.mean(axis=0)) ** 2).sum(axis=1).mean()
    assert new.trace_image == pytest.approx(direct, rel=1e-4)
    shifted = pl.read_parquet(tmp_path / "data" / "transferred_embeddings.parquet")
    assert shifted["statistics_version"].unique().to_list() == [new.version]
    # realign without reference images is refused, naming the setting
    refused = corpus_run({"transfer": {"method": "realign"}}, raise_on_error=False)
    assert not refused.success
    message = failure_message(refused)
    assert "realign needs reference images" in message
    assert "ops.modality_statistics.config.reference_images" in message


class BrokenClip(OpenClipResource):
    """The tiny CLIP, but one caption's vector comes back NaN (an fp16 overflow, say) and another
    unnormalised."""

    def encode_text(self, texts):
        vectors = super().encode_text(texts)
        vectors[0] = np.nan
        vectors[1] *= 2
        return vectors


def test_broken_embeddings_are_blocked(tmp_path: Path, instance, seed_dir, fake_llm):
    resources = make_resources(tmp_path / "data", seed_dir, llm=fake_llm)
    resources["clip"] = BrokenClip()
    instance.add_dynamic_partitions(SEED_SHARDS, ["shard-a"])
    result = materialize_shard(instance, resources, "shard-a", STAGE3, raise_on_error=False)
    assert {"finite", "norms_in_range"} <= failed(result)
    assert {"row_alignment", "embedding_dimension"}.isdisjoint(failed(result))
