"""Shared fixtures: a real on-disk Dagster instance, seed folders built from the real COCO
captions in ../shared/data, and resource sets for the pipeline."""

from __future__ import annotations

import faulthandler
import json
import os
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from benchmarks.common import COCO_CAPTIONS
from benchmarks.common import coco_captions as read_coco_captions
from dagster_project.profiles import build_resources
from unicorn_resources.llm import FakeLLM, LLMResource

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
COCO_PAIRS = SHARED_DATA / "coco_mini_val2017" / "pairs.jsonl"


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """On a native crash, dump only the crashing thread's stack: CI shows the end of the output,
    and a dump of every idle thread pushed the one that mattered out of it."""
    faulthandler.enable(file=os.fdopen(os.dup(2), "w"), all_threads=False)


def coco_captions(n: int, offset: int = 0, one_per_image: bool = True) -> list[dict[str, Any]]:
    """Real COCO captions (CC BY 4.0) from ../shared/data, one per image unless told otherwise."""
    if not COCO_CAPTIONS.exists():
        pytest.fail(f"{COCO_CAPTIONS} is missing: the tests read real captions from ../shared/data")
    return read_coco_captions(n, offset, one_per_image)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def instance(tmp_path: Path):
    """A real, persistent (SQLite-backed) Dagster instance in a temporary DAGSTER_HOME."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as inst:
        yield inst


@pytest.fixture
def seed_dir(tmp_path: Path) -> Path:
    """Two small seed shards of real COCO captions."""
    folder = tmp_path / "seeds"
    write_jsonl(folder / "shard-a.jsonl", coco_captions(4))
    write_jsonl(folder / "shard-b.jsonl", coco_captions(4, offset=4))
    return folder


def make_resources(data_dir: Path, seed_location: Path | str, llm: LLMResource | None = None,
                   **overrides: Any) -> dict[str, Any]:
    """The resources of the `local` profile, pointed at test folders. An `llm` given without a
    cache_path gets one in `data_dir`, so no test shares the working tree's response cache."""
    profile: dict[str, Any] = {
        "storage": {"base_uri": str(data_dir)},
        "seeds": {"location": str(seed_location)},
        "llm": {"backend": "fake"},
        "quality_gates": {"caption_min_median_words": 5},
    }
    for section, values in overrides.items():
        profile[section] = {**profile.get(section, {}), **values}
    resources = build_resources(profile)
    if llm is not None:
        if "cache_path" not in llm.model_fields_set:
            fields = {name: getattr(llm, name) for name in llm.model_fields_set}
            llm = type(llm)(**fields, cache_path=str(Path(data_dir) / "llm_cache.sqlite"))
        resources["llm"] = llm
    return resources


@pytest.fixture
def fake_llm(tmp_path: Path) -> FakeLLM:
    return FakeLLM(cache_path=str(tmp_path / "llm_cache.sqlite"))


def materialize_shard(instance: dg.DagsterInstance, resources: dict[str, Any], key: str,
                      assets: list | None = None, **kwargs: Any) -> dg.ExecuteInProcessResult:
    """Register `key` as a seed shard, then materialise `assets` (default: seeds and Stage 1) for
    it in one run on `instance`."""
    from unicorn_assets.caption_seeds import read_caption_seeds
    from unicorn_assets.expansion import expand_captions
    from unicorn_assets.partitions import SEED_SHARDS

    if not instance.has_dynamic_partition(SEED_SHARDS, key):
        instance.add_dynamic_partitions(SEED_SHARDS, [key])
    return dg.materialize(assets or [read_caption_seeds, expand_captions], partition_key=key,
                          resources=resources, instance=instance, **kwargs)
