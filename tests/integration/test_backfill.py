"""A backfill over a range of dynamic partitions, submitted with `unicorn backfill` and carried out
by Dagster's own backfill daemon logic in-process: several shards per run, one model set-up per run."""

from __future__ import annotations

import logging
import math
import sys
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
from unicorn_assets.partitions import SEED_BACKFILL, SEED_SHARDS, SHARD_BACKFILL

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
    # read this test's environment, not the one of the test that imported it first (under
    # either name: the daemon's code location loads the file as a top-level module)
    for name in ("tests.integration.backfill_location", "backfill_location"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    from tests.integration import backfill_location

    monkeypatch.setattr(cli, "_defs", lambda: backfill_location.defs)
    return data


SEED_ASSETS = {dg.AssetKey("caption_seeds"), dg.AssetKey("caption_seed_rejects")}


def run_shards(run: dg.DagsterRun) -> list[str]:
    start = int(run.tags["dagster/asset_partition_range_start"][-2:])
    end = int(run.tags["dagster/asset_partition_range_end"][-2:])
    return [f"shard-{i:02d}" for i in range(start, end + 1)]


def run_daemon_until_done(instance: dg.DagsterInstance, backfill_id: str,
                          expect: BulkActionStatus = BulkActionStatus.COMPLETED_SUCCESS) -> None:
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
    assert status == expect, status


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

    assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)
    # the seeds are read in runs of their own (so that a bad seed file fails only its shard)
    seed_runs = [run for run in runs if run.asset_selection == SEED_ASSETS]
    assert len(seed_runs) == math.ceil(10 / SEED_BACKFILL.max_partitions_per_run) == 1
    per_run = SHARD_BACKFILL.max_partitions_per_run
    stage1_runs = [run for run in runs if run not in seed_runs]
    assert len(stage1_runs) == math.ceil(10 / per_run) < 10  # not one run per shard
    sizes = [len(run_shards(run)) for run in stage1_runs]
    assert sorted(sizes) == sorted([per_run] * (10 // per_run) + [10 % per_run] * (10 % per_run > 0))

    setups = (location / "llm_setups.log").read_text().split()
    assert sorted(setups) == sorted(run.run_id for run in stage1_runs)  # once per run
    written = sorted(p.stem for p in (location / "expanded_captions").glob("*.parquet"))
    assert written == [f"shard-{i:02d}" for i in range(1, 11)]  # shard-00 and -11 untouched
    assert pl.read_parquet(location / "expanded_captions" / "shard-05.parquet").height > 0


def test_cli_backfill_rejects_unknown_shards(location):
    result = CliRunner().invoke(cli.app, ["backfill", "--shard", "nope"])
    assert result.exit_code != 0 and "no seed file for shard(s) ['nope']" in result.output
    result = CliRunner().invoke(cli.app, ["backfill", "--from", "nope"])
    assert result.exit_code != 0 and "is not a shard" in result.output


def test_a_seed_file_gone_fails_its_shard_and_the_others_go_on_to_stage1(location, tmp_path):
    result = CliRunner().invoke(cli.app, [
        "backfill", "--from", "shard-01", "--to", "shard-04",
        "--select", 'group:"unicorn_seeds" or group:"unicorn_stage1"'])
    assert result.exit_code == 0, result.output
    backfill_id = result.output.split()[1].rstrip(":")
    (tmp_path / "seeds" / "shard-03.jsonl").unlink()  # after it was registered and submitted

    with dg.DagsterInstance.get() as instance:
        run_daemon_until_done(instance, backfill_id, expect=BulkActionStatus.COMPLETED_FAILED)
        runs = instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
        # the four shards' seeds were read in one run; it failed, and names the lost file's shard
        (seed_run,) = [run for run in runs if run.asset_selection == SEED_ASSETS]
        assert run_shards(seed_run) == ["shard-01", "shard-02", "shard-03", "shard-04"]
        assert seed_run.status == dg.DagsterRunStatus.FAILURE
        failure = next(e for e in instance.all_logs(seed_run.run_id)
                       if e.dagster_event and e.dagster_event.is_step_failure)
        message = failure.dagster_event.step_failure_data.error.message
        assert "1 of 4 shard(s) failed;" in message
        assert "- shard-03: no seed file for shard 'shard-03'" in message
        assert "The other 3 (shard-01, shard-02, shard-04) were stored" in message
        # ... and Stage 1 still ran for the three healthy shards, in runs without shard-03
        stage1_runs = [run for run in runs if run is not seed_run]
        assert stage1_runs and all(r.status == dg.DagsterRunStatus.SUCCESS for r in stage1_runs)
        assert "shard-03" not in {k for run in stage1_runs for k in run_shards(run)}
        assert instance.get_materialized_partitions(dg.AssetKey("expanded_captions")) == \
            {"shard-01", "shard-02", "shard-04"}
        assert instance.get_materialized_partitions(dg.AssetKey("caption_seeds")) == \
            {"shard-01", "shard-02", "shard-04"}
    for key in ("shard-01", "shard-02", "shard-04"):
        assert pl.read_parquet(location / "expanded_captions" / f"{key}.parquet").height > 0
    assert not (location / "caption_seeds" / "shard-03.parquet").exists()
    assert not (location / "expanded_captions" / "shard-03.parquet").exists()


def test_seeds_over_the_malformed_line_gate_keep_their_shard_out_of_stage1(location, tmp_path):
    # 2 of 3 lines malformed, over the default seed_max_reject_rate (25%); on_bad_line is 'skip'
    (tmp_path / "seeds" / "shard-02.jsonl").write_bytes(
        b'{"caption": "A dog runs on the grass by a tree."}\n{broken\n{broken\n')
    result = CliRunner().invoke(cli.app, [
        "backfill", "--from", "shard-01", "--to", "shard-03",
        "--select", 'group:"unicorn_seeds" or group:"unicorn_stage1"'])
    assert result.exit_code == 0, result.output
    backfill_id = result.output.split()[1].rstrip(":")

    with dg.DagsterInstance.get() as instance:
        # a blocking check would stop only the rest of its own run: Stage 1 runs apart from the
        # seeds in a backfill, so the seeds step itself keeps shard-02 out
        run_daemon_until_done(instance, backfill_id, expect=BulkActionStatus.COMPLETED_FAILED)
        assert instance.get_materialized_partitions(dg.AssetKey("expanded_captions")) == \
            {"shard-01", "shard-03"}
        assert instance.get_materialized_partitions(dg.AssetKey("caption_seed_rejects")) == \
            {"shard-01", "shard-02", "shard-03"}
    rejects = pl.read_parquet(location / "caption_seed_rejects" / "shard-02.parquet")
    assert rejects["reason"].to_list() == ["bad_json", "bad_json"]
