"""Shared fixtures: a real on-disk Dagster instance, seed folders built from the real COCO
captions in ../shared/data, and a fake LLM. Plain helpers are in tests/support.py."""

from __future__ import annotations

import faulthandler
import os
from pathlib import Path

import dagster as dg
import pytest

from tests.support import coco_captions, write_jsonl
from unicorn_resources.llm import FakeLLM


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """On a native crash, dump only the crashing thread's stack: CI shows the end of the output,
    and a dump of every idle thread pushed the one that mattered out of it."""
    faulthandler.enable(file=os.fdopen(os.dup(2), "w"), all_threads=False)


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


@pytest.fixture
def fake_llm(tmp_path: Path) -> FakeLLM:
    return FakeLLM(cache_path=str(tmp_path / "llm_cache.sqlite"))
