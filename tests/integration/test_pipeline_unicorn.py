"""The whole Unicorn graph in-process on a real on-disk Dagster instance: two seed shards through
seeds -> Stage 1 -> Stage 2 -> caption embeddings (FakeLLM, tiny untrained open_clip), then the
corpus job (statistics -> transfer -> exports), and the export read back by export_reader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tests.support import ROOT, Pipeline, checks_evaluated, failed_checks
from unicorn_assets.logic.modality import ModalityStatistics
from unicorn_resources.export_reader import UnicornExport


@pytest.fixture
def pipeline(tmp_path: Path, instance) -> Pipeline:
    return Pipeline(tmp_path, instance)


def test_two_shards_to_loadable_exports(pipeline: Pipeline):
    for offset, key in enumerate(["shard-a", "shard-b"]):
        result = pipeline.add_shard(key, offset * 3)
        assert result.success and not failed_checks(result), failed_checks(result)
    corpus = pipeline.corpus()
    assert corpus.success and not failed_checks(corpus), failed_checks(corpus)
    assert checks_evaluated(corpus) >= 7 + 2 * 2

    captions, instructions = pipeline.rows("expanded_captions"), pipeline.rows("instructions")
    assert pipeline.rows("caption_embeddings") == captions > 0
    stats = ModalityStatistics.from_frame(pl.read_parquet(pipeline.data / "modality_statistics.parquet"))
    assert (stats.count, stats.shards, stats.dim, stats.pretrained) == (captions, 2, 64, False)

    meta = corpus.asset_materializations_for_node("transferred_embeddings")[0].metadata
    assert "untrained" in meta["model_note"].value and meta["statistics_version"].value == stats.version

    pretrain = UnicornExport(pipeline.data / "exports" / "unicorn_pretrain")
    assert pretrain.manifest["counts"] == {"records": captions, "embeddings": captions,
                                           "duplicates_dropped": 0}
    assert pretrain.manifest["statistics_version"] == stats.version
    assert "untrained" in pretrain.manifest["note"]
    assert pretrain.manifest["models"]["caption_llm"] == ["fake:deterministic"]
    record = next(pretrain.records())
    assert record["conversations"][0]["value"].startswith("<image>\n")
    # the record's embedding is the transferred embedding of its caption
    shifted = pl.read_parquet(pipeline.data / "transferred_embeddings.parquet").filter(
        pl.col("caption_id") == record["caption_id"])["embedding"].to_numpy()[0]
    np.testing.assert_array_equal(pretrain.embedding(record), shifted)

    instruct = UnicornExport(pipeline.data / "exports" / "unicorn_instruct")
    assert instruct.manifest["counts"]["records"] == instructions > 0
    assert sum(instruct.manifest["task_types"].values()) == instructions
    for folder in ("unicorn_pretrain", "unicorn_instruct"):
        out = subprocess.run([sys.executable, "-m", "unicorn_resources.export_reader",
                              str(pipeline.data / "exports" / folder)], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        assert "embedding embeddings/embeddings-00000.safetensors#" in out and "(64,)" in out
        assert "untrained CLIP" in out


def test_a_new_shard_never_leaves_mixed_statistics(pipeline: Pipeline):
    """Adding a shard changes the corpus mean: shifting without recomputing the statistics is
    refused by a blocking check, the previous export stays, and the full corpus job fixes it."""
    for offset, key in enumerate(["shard-a", "shard-b"]):
        assert pipeline.add_shard(key, offset * 3).success
    assert pipeline.corpus().success
    export = pipeline.data / "exports" / "unicorn_pretrain" / "manifest.json"
    before = json.loads(export.read_text())

    assert pipeline.add_shard("shard-c", 6).success
    stale = pipeline.corpus(["transferred_embeddings", "pretrain_dataset", "instruct_dataset"])
    assert not stale.success
    assert "transferred_embeddings:single_statistics_version" in failed_checks(stale)
    assert json.loads(export.read_text()) == before  # nothing published from stale statistics

    # new statistics, but the export reads embeddings shifted with the old ones: refused whole
    mixed = pipeline.corpus(["modality_statistics", "pretrain_dataset"])
    assert not mixed.success
    errors = [e.step_failure_data.error.to_string() for e in mixed.all_events
              if e.event_type_value == "STEP_FAILURE" and e.step_key == "pretrain_dataset"]
    assert errors and "re-materialise transferred_embeddings" in errors[0]
    assert json.loads(export.read_text()) == before
    # no staging folder left behind
    assert sorted(p.name for p in export.parent.parent.iterdir()) == ["unicorn_instruct",
                                                                      "unicorn_pretrain"]

    fresh = pipeline.corpus()
    assert fresh.success and not failed_checks(fresh), failed_checks(fresh)
    after = json.loads(export.read_text())
    assert after["statistics_version"] != before["statistics_version"]
    assert after["counts"]["records"] == pipeline.rows("expanded_captions") > before["counts"]["records"]
