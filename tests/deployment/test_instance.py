"""One DAGSTER_HOME shared by many `unicorn` commands: its storage is created once, under a lock,
however many commands start at once; and a run whose process died is marked failed by the next
command instead of staying STARTED for ever."""

from __future__ import annotations

import multiprocessing
import os
import socket
import sqlite3
import subprocess
import sys
import traceback
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.test_utils import create_run_for_test

from dagster_project import cli
from dagster_project.instance import (
    HOST_TAG,
    PID_TAG,
    PROCESS_START_TAG,
    fail_dead_runs,
    open_instance,
    process_start,
    run_tags,
)
from tests.support import coco_captions, write_jsonl
from unicorn_assets.partitions import SEED_SHARDS
from unicorn_resources.seed_source import SeedSource

UNICORN = str(Path(sys.executable).parent / "unicorn")


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- a run whose process is gone ------------------------------------------------------------------

def started_run(instance: dg.DagsterInstance, **tags: str) -> dg.DagsterRun:
    return create_run_for_test(instance, job_name="unicorn_shard_job",
                               status=dg.DagsterRunStatus.STARTED,
                               tags={"dagster/partition": "shard-a", **tags})


def failure_message(instance: dg.DagsterInstance, run_id: str) -> str:
    (record,) = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
    return record.event_log_entry.dagster_event.message


def test_runs_of_a_dead_process_are_failed_and_live_or_foreign_ones_left(instance):
    host, pid = socket.gethostname(), dead_pid()
    dead = started_run(instance, **{HOST_TAG: host, PID_TAG: str(pid)})
    alive = started_run(instance, **run_tags())  # this test's own process
    elsewhere = started_run(instance, **{HOST_TAG: f"not-{host}", PID_TAG: str(pid)})
    untagged = started_run(instance)  # launched by a daemon: run monitoring's business
    # pid reused: the pid is alive, but it is a later process than the one the run recorded
    reused = started_run(instance, **{HOST_TAG: host, PID_TAG: str(os.getpid()),
                                      PROCESS_START_TAG: "1"})

    failed = fail_dead_runs(instance)

    assert {run.run_id for run, _ in failed} == {dead.run_id, reused.run_id}
    status = {r.run_id: r.status for r in instance.get_runs()}
    assert status[dead.run_id] == status[reused.run_id] == dg.DagsterRunStatus.FAILURE
    for run in (alive, elsewhere, untagged):
        assert status[run.run_id] == dg.DagsterRunStatus.STARTED
    message = failure_message(instance, dead.run_id)
    assert f"pid {pid} on host {host}" in message and "killed or crashed" in message
    assert fail_dead_runs(instance) == []  # once only


def test_run_tags_name_this_process():
    tags = run_tags()
    assert tags[HOST_TAG] == socket.gethostname() and tags[PID_TAG] == str(os.getpid())
    assert tags.get(PROCESS_START_TAG) == process_start(os.getpid())


# --- many commands on a fresh DAGSTER_HOME ---------------------------------------------------------

@dg.asset
def tiny() -> int:
    return 1


def command(role: str, home: str, seeds: str, start: multiprocessing.synchronize.Barrier) -> None:
    """One `unicorn` command's use of the instance, in a forked process (no re-import: fast)."""
    os.environ["DAGSTER_HOME"] = home
    try:
        start.wait(timeout=60)
        if role == "register":
            cli._register(cli._instance(),
                          dg.Definitions(resources={"seeds": SeedSource(location=seeds)}))
        elif role == "materialize":
            result = dg.materialize([tiny], instance=cli._instance(), tags=run_tags())
            assert result.success
        else:
            cli._instance().get_runs()
    except BaseException:  # noqa: BLE001 - the parent reads the exit code; the trace is printed
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def alembic_rows(home: Path) -> dict[str, int]:
    """Rows of alembic_version in every SQLite database of the instance (one each when sound)."""
    rows = {}
    for db in home.rglob("*.db"):
        with sqlite3.connect(db) as con:
            tables = {r[0] for r in con.execute("select name from sqlite_master")}
            if "alembic_version" in tables:
                rows[str(db.relative_to(home))] = con.execute(
                    "select count(*) from alembic_version").fetchone()[0]
    return rows


@pytest.mark.parametrize("attempts", [3, pytest.param(10, marks=pytest.mark.slow)])
def test_commands_started_at_once_on_a_fresh_home_share_one_sound_instance(tmp_path, attempts):
    """Without the lock, the first attempt already fails (two processes create the schema)."""
    seeds = tmp_path / "seeds"
    for key in ("coco-a", "coco-b"):
        write_jsonl(seeds / f"{key}.jsonl", coco_captions(2))
    roles = ["register", "register", "materialize", "instance", "instance"]
    fork = multiprocessing.get_context("fork")
    for attempt in range(attempts):
        home = tmp_path / f"home-{attempt}"
        home.mkdir()
        start = fork.Barrier(len(roles))
        procs = [fork.Process(target=command, args=(role, str(home), str(seeds), start))
                 for role in roles]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=120)
        assert [p.exitcode for p in procs] == [0] * len(roles), f"attempt {attempt}"
        assert alembic_rows(home) and set(alembic_rows(home).values()) == {1}, alembic_rows(home)
        # ... and the instance works afterwards
        with open_instance(home) as instance:
            assert sorted(instance.get_dynamic_partitions(SEED_SHARDS)) == ["coco-a", "coco-b"]
            (run,) = instance.get_runs()
            assert run.status == dg.DagsterRunStatus.SUCCESS
            instance.add_dynamic_partitions(SEED_SHARDS, ["coco-c"])
            assert len(instance.get_dynamic_partitions(SEED_SHARDS)) == 3


@pytest.mark.slow
def test_unicorn_commands_started_at_once_all_succeed(tmp_path):
    """The same with the console script itself: register, shards and two materialize at once
    (two minutes an attempt on two loaded cores; the forked test above makes the ten)."""
    seeds = tmp_path / "seeds"
    write_jsonl(seeds / "coco-a.jsonl", coco_captions(2))
    for attempt in range(2):
        home, data = tmp_path / f"home-{attempt}", tmp_path / f"data-{attempt}"
        env = {**os.environ, "UNICORN_SEEDS": str(seeds), "UNICORN_DATA_DIR": str(data),
               "DAGSTER_HOME": str(home), "UNICORN_LLM_BACKEND": "fake",
               "UNICORN_PROFILE": "local"}
        commands = [["register"], ["register"], ["shards"], ["materialize"],
                    ["materialize", "--shard", "coco-a"]]
        procs = [subprocess.Popen([UNICORN, *args], env=env, cwd=tmp_path, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for args in commands]
        for args, proc in zip(commands, procs, strict=True):
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, (attempt, args, out[-2000:], err[-3000:])
        assert set(alembic_rows(home).values()) == {1}
        with open_instance(home) as instance:
            assert instance.get_dynamic_partitions(SEED_SHARDS) == ["coco-a"]
            runs = instance.get_runs()
            assert len(runs) == 2 and {r.status for r in runs} == {dg.DagsterRunStatus.SUCCESS}
