"""Every file of an export is readable like any other file the pipeline writes: the mode open()
gives under the umask (0644 under the usual 022). safetensors' save_file alone makes 0600."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from fsspec.implementations.local import LocalFileSystem

from tests.support import Pipeline, failed_checks
from unicorn_assets.logic import exports as export
from unicorn_assets.logic import modality
from unicorn_assets.logic.modality import ModalityStatistics
from unicorn_assets.logic.text import caption_sha256_series, stable_id


@pytest.fixture
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def modes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mode & 0o777
            for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("umask", [0o022], indirect=True, ids=["umask022"])
def test_the_pipeline_exports_files_of_the_umask_mode(tmp_path: Path, instance, umask):
    pipeline = Pipeline(tmp_path, instance)
    assert pipeline.add_shard("shard-a", 0).success
    corpus = pipeline.corpus()
    assert corpus.success and not failed_checks(corpus), failed_checks(corpus)
    for name in ("unicorn_pretrain", "unicorn_instruct"):
        found = modes(pipeline.data / "exports" / name)
        assert any(f.endswith(".safetensors") for f in found)
        assert found == dict.fromkeys(found, 0o644), found
    # and like the Parquet files of the assets
    assert (pipeline.data / "modality_statistics.parquet").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("umask", [0o027, 0o002], indirect=True, ids=["umask027", "umask002"])
def test_export_files_follow_another_umask(tmp_path: Path, umask):
    frame = pl.DataFrame({"caption_id": [stable_id("c", i) for i in range(4)],
                          "shard": ["a"] * 4, "caption": [f"A red kite number {i}." for i in range(4)]})
    frame = frame.with_columns(caption_sha256=caption_sha256_series(frame["caption"]))
    vectors = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    embedded = modality.caption_embeddings_frame(frame, vectors, "clip")
    summary = modality.summarise(embedded)
    stats = ModalityStatistics("clip", False, summary.count, 6, summary.mean, shards=1)
    target = str(tmp_path / "exports" / "pretrain")
    staging = export.staging_folder(LocalFileSystem(), target)
    export.write_export(staging, export.pretrain_records(frame.lazy(), ["Describe."]),
                        modality.transfer(embedded.lazy(), stats), stats, rows_per_file=3)
    export.publish(staging, LocalFileSystem(), target)
    found = modes(Path(target))
    assert len([f for f in found if f.endswith(".safetensors")]) == 3  # 2 embedding files + stats
    assert found == dict.fromkeys(found, 0o666 & ~umask), found
