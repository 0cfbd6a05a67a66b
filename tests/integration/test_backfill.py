"""A backfill over a range of dynamic partitions, submitted with `unicorn backfill` and carried out
by Dagster's own backfill daemon logic in-process: several shards per run, one model set-up per run."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from dagster._core.execution.backfill import BulkActionStatus
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.test_utils import create_test_daemon_workspace_context
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster._daemon.backfill import execute_backfill_iteration
from typer.testing import CliRunner

from dagster_project import cli
from tests.support import coco_captions, write_jsonl
from unicorn_assets.partitions import SEED_SHARDS, SHARD_BACKFILL

HERE = Path(__file__).parent
SYNC_LAUNCHER = """run_coordinator:
  module: dagster._core.run_coordinator.default_run_coordinator
  class: DefaultRunCoordinator
run_launcher:
  module: dagster._core.launcher.sync_in_memory_run_launcher
  class: SyncInMemoryRunLauncher
telemetry:
  enabled: false
"""


@pytest.fixture
def location(tmp_path, monkeypatch):
    """DAGSTER_HOME, 12 seed shards and the test code location; the CLI uses its Definitions."""
    home, seeds, data = tmp_path / "home", tmp_path / "seeds", tmp_path / "data"
    home.mkdir()
    (home / "dagster.yaml").write_text(SYNC_LAUNCHER)
    for i in range(12):
        write_jsonl(seeds / f"shard-{i:02d}.jsonl", coco_captions(2, offset=2 * i))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("UNICORN_TEST_DATA", str(data))
    monkeypatch.setenv("UNICORN_TEST_SEEDS", str(seeds))
    from tests.integration import backfill_location

    monkeypatch.setattr(cli, "_defs", lambda: backfill_location.defs)
    return data


def run_daemon_until_done(instance: dg.DagsterInstance, backfill_id: str) -> None:
    origin = InProcessCodeLocationOrigin(LoadableTargetOrigin(
        python_file=str(HERE / "backfill_location.py"), attribute="defs",
        working_directory=str(HERE)))
    with create_test_daemon_workspace_context(InProcessWorkspaceLoadTarget(origin),
                                              instance) as context:
        for _ in range(10):
            list(execute_backfill_iteration(context, logging.getLogger("backfill-test")))
            status = instance.get_backfill(backfill_id).status
            if status != BulkActionStatus.REQUESTED:
                break
    assert status == BulkActionStatus.COMPLETED_SUCCESS, status


def test_cli_backfill_of_a_range_batches_shards_and_loads_the_model_once_per_run(location):
    result = CliRunner().invoke(cli.app, [
        "backfill", "--from", "shard-01", "--to", "shard-10",
        "--select", 'group:"unicorn_seeds" or group:"unicorn_stage1"'])
    assert result.exit_code == 0, result.output
    assert "10 shard(s) x 4 asset(s)" in result.output
    backfill_id = result.output.split()[1].rstrip(":")

    with dg.DagsterInstance.get() as instance:
        assert len(instance.get_dynamic_partitions(SEED_SHARDS)) == 12
        run_daemon_until_done(instance, backfill_id)
        runs = instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))

    per_run = SHARD_BACKFILL.max_partitions_per_run
    assert len(runs) == math.ceil(10 / per_run) < 10  # not one run per shard
    sizes = []
    for run in runs:
        assert run.status == dg.DagsterRunStatus.SUCCESS
        start = int(run.tags["dagster/asset_partition_range_start"][-2:])
        end = int(run.tags["dagster/asset_partition_range_end"][-2:])
        sizes.append(end - start + 1)
    assert sorted(sizes) == sorted([per_run] * (10 // per_run) + [10 % per_run] * (10 % per_run > 0))

    setups = (location / "llm_setups.log").read_text().split()
    assert sorted(setups) == sorted(run.run_id for run in runs)  # once per run
    written = sorted(p.stem for p in (location / "expanded_captions").glob("*.parquet"))
    assert written == [f"shard-{i:02d}" for i in range(1, 11)]  # shard-00 and -11 untouched
    assert pl.read_parquet(location / "expanded_captions" / "shard-05.parquet").height > 0


def test_cli_backfill_rejects_unknown_shards(location):
    result = CliRunner().invoke(cli.app, ["backfill", "--shard", "nope"])
    assert result.exit_code != 0 and "no seed file for shard(s) ['nope']" in result.output
    result = CliRunner().invoke(cli.app, ["backfill", "--from", "nope"])
    assert result.exit_code != 0 and "is not a shard" in result.output
