"""The alignment_report asset on a real Dagster instance, with the 79 real COCO images and their
395 captions (../shared/data, read in place) and the tiny untrained CLIP of the local profile:
its figures are the numbers a direct numpy computation gives on the same embeddings, the report
says they mean nothing offline, and a bad pairs file is refused, naming the line."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
from PIL import Image

from tests.support import COCO_PAIRS, make_resources
from tests.unit.unicorn_assets.logic.test_alignment import direct_figures
from unicorn_assets.alignment_report import alignment_report
from unicorn_assets.logic import alignment
from unicorn_resources.clip import UNTRAINED_CLIP_NOTE, OpenClipResource


def materialise(instance, tmp_path: Path, seed_dir: Path, **config) -> dg.ExecuteInProcessResult:
    return dg.materialize([alignment_report], instance=instance,
                          resources=make_resources(tmp_path / "data", seed_dir),
                          run_config={"ops": {"alignment_report": {"config": config}}},
                          raise_on_error=False)


def test_alignment_report_on_real_coco_pairs(tmp_path: Path, instance, seed_dir):
    if not COCO_PAIRS.exists():
        pytest.fail(f"{COCO_PAIRS} is missing: the test reads real pairs from ../shared/data")
    result = materialise(instance, tmp_path, seed_dir, pairs=str(COCO_PAIRS))
    assert result.success
    checks = [e.asset_check_evaluation_data for e in result.all_events
              if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert [c.passed for c in checks] == [True] and "all in range" in checks[0].description
    meta = result.asset_materializations_for_node("alignment_report")[0].metadata
    lines = [json.loads(line) for line in COCO_PAIRS.read_text().splitlines() if line.strip()]
    paths = list(dict.fromkeys(COCO_PAIRS.parent / rec["image"] for rec in lines))
    assert meta["captions"].value == len(lines) == 395 and meta["images"].value == len(paths) == 79

    # the same tiny CLIP, encoding the same pairs here, and the figures computed directly
    clip = OpenClipResource()
    text = clip.encode_text([rec["caption"] for rec in lines]).astype(np.float64)
    images = clip.encode_images([Image.open(p).convert("RGB") for p in paths]).astype(np.float64)
    image_of = np.array([paths.index(COCO_PAIRS.parent / rec["image"]) for rec in lines])
    paired = alignment.PairedSet(text, images, image_of)
    for method in alignment.METHODS:
        direct = direct_figures(paired, method)
        for name in alignment.FIGURES:
            value = meta[f"{method}/{name}"]
            assert isinstance(value, dg.FloatMetadataValue)
            assert value.value == pytest.approx(direct[name], rel=1e-4, abs=1e-5), (method, name)
    assert meta["none/knn_overlap"].value == 1.0
    # realign removes the offset between the modalities even with random weights (geometry)
    assert meta["realign/centroid_gap"].value < meta["none/centroid_gap"].value / 10
    assert abs(np.log(meta["realign/trace_ratio"].value)) < 0.1

    report = meta["report"].value
    assert UNTRAINED_CLIP_NOTE in report and "say nothing about real alignment" in report
    assert "data:image/png;base64," in report and "2.6e-4" in report
    stored = pl.read_parquet(tmp_path / "data" / "alignment_report.parquet")
    assert stored.height == len(alignment.METHODS) * len(alignment.FIGURES)


def test_alignment_report_without_pairs_says_it_has_nothing_to_measure(tmp_path, instance, seed_dir):
    result = materialise(instance, tmp_path, seed_dir)
    assert result.success
    meta = result.asset_materializations_for_node("alignment_report")[0].metadata
    assert "nothing to measure" in meta["note"].value
    assert "ops.alignment_report.config.pairs" in meta["note"].value


def test_a_pairs_file_reaching_outside_its_folder_is_refused(tmp_path: Path, instance, seed_dir):
    pairs = tmp_path / "refs" / "pairs.jsonl"
    pairs.parent.mkdir()
    pairs.write_text(json.dumps({"image": "../../etc/passwd", "caption": "a cat"}) + "\n")
    result = materialise(instance, tmp_path, seed_dir, pairs=str(pairs))
    assert not result.success
    error = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error
    message = " ".join(m.message for m in (error, error.cause) if m is not None)
    assert f"{pairs}:1" in message and "outside" in message
