"""The `unicorn` console script, run as a user runs it: a seed folder, a data folder and a
DAGSTER_HOME chosen by environment variables, the fake LLM chosen by UNICORN_LLM_BACKEND."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pytest

from dagster_project.instance import open_instance
from tests.support import coco_captions, write_jsonl
from unicorn_assets.partitions import SEED_SHARDS

UNICORN = str(Path(sys.executable).parent / "unicorn")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    seeds = tmp_path / "seeds"
    write_jsonl(seeds / "coco-a.jsonl", coco_captions(3))
    write_jsonl(seeds / "coco-b.jsonl", coco_captions(3, offset=3))
    (seeds / "not a key.jsonl").write_text('{"caption": "A cat."}\n')
    (tmp_path / "home").mkdir()
    return {**os.environ, "UNICORN_SEEDS": str(seeds), "UNICORN_DATA_DIR": str(tmp_path / "out"),
            "DAGSTER_HOME": str(tmp_path / "home"), "UNICORN_LLM_BACKEND": "fake",
            "UNICORN_PROFILE": "local"}


def unicorn(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([UNICORN, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)


def test_shards_lists_the_seed_files_and_the_refused_ones(env, tmp_path: Path):
    out = unicorn(env, "shards", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    seeds = Path(env["UNICORN_SEEDS"])
    assert rows == [[key, str(seeds / f"{key}.jsonl")] for key in ("coco-a", "coco-b")]
    assert "skipped:" in out.stderr and "not a key.jsonl" in out.stderr
    assert "Rename the file" in out.stderr

    # a folder and a link in the seed location are named, where they used to be passed over
    write_jsonl(seeds / "more" / "coco-c.jsonl", coco_captions(3, offset=6))
    (seeds / "coco-d.jsonl").symlink_to(seeds / "more" / "coco-c.jsonl")
    out = unicorn(env, "shards", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [line.split("\t")[0] for line in out.stdout.splitlines()] == ["coco-a", "coco-b"]
    assert f"skipped: {seeds / 'more'}: a folder" in out.stderr
    assert f"skipped: {seeds / 'coco-d.jsonl'}: a symbolic link" in out.stderr


def test_materialize_twice_replaces_and_records_runs_in_dagster_home(env, tmp_path: Path):
    data = Path(env["UNICORN_DATA_DIR"])
    first = unicorn(env, "materialize", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2 shard(s):" in first.stdout and "wall time:" in first.stdout
    assert "seed lines read: 6, seeds kept: 6" in first.stdout
    assert "captions rejected by reason:" in first.stdout
    outputs = {p.relative_to(data): pl.read_parquet(p)
               for p in data.rglob("*.parquet")}
    assert {str(p) for p in outputs} >= {f"{a}/{k}.parquet" for k in ("coco-a", "coco-b") for a in
                                         ("caption_seeds", "caption_seed_rejects",
                                          "expanded_captions", "expanded_caption_rejects")}

    second = unicorn(env, "materialize", cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    again = {p.relative_to(data): pl.read_parquet(p) for p in data.rglob("*.parquet")}
    assert again.keys() == outputs.keys()  # the same files, replaced in place
    for path, frame in outputs.items():
        assert again[path].equals(frame), path
    # UNICORN_DATA_DIR and DAGSTER_HOME were honoured: nothing went to the defaults
    assert not (tmp_path / "data").exists() and not (tmp_path / ".dagster_home").exists()

    # the catalog can be rebuilt from the files alone
    (data / "catalog.duckdb").unlink()
    rebuilt = unicorn(env, "catalog", cwd=tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "expanded_captions" in rebuilt.stdout
    with duckdb.connect(str(data / "catalog.duckdb"), read_only=True) as con:
        assert con.execute("select count(*) from expanded_captions").fetchone() == (
            sum(f.height for p, f in again.items() if p.parts[0] == "expanded_captions"),)

    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        assert sorted(instance.get_dynamic_partitions(SEED_SHARDS)) == ["coco-a", "coco-b"]
        runs = instance.get_runs()
        assert len(runs) == 4
        assert {r.status for r in runs} == {dg.DagsterRunStatus.SUCCESS}
        assert sorted(r.tags["dagster/partition"] for r in runs) == ["coco-a", "coco-a",
                                                                     "coco-b", "coco-b"]
        records = instance.fetch_materializations(dg.AssetKey("expanded_captions"), limit=10)
        assert sorted(r.partition_key for r in records.records) == ["coco-a", "coco-a",
                                                                    "coco-b", "coco-b"]


def test_materialize_refuses_an_unknown_shard(env, tmp_path: Path):
    out = unicorn(env, "materialize", "--shard", "nope", cwd=tmp_path)
    assert out.returncode != 0
    assert "no seed file for shard(s) ['nope']" in out.stdout + out.stderr
    assert not Path(env["UNICORN_DATA_DIR"]).exists()


def test_a_run_killed_mid_way_is_marked_failed_by_the_next_command(env, tmp_path: Path):
    write_jsonl(Path(env["UNICORN_SEEDS"]) / "coco-a.jsonl", coco_captions(300))
    proc = subprocess.Popen([UNICORN, "materialize", "--shard", "coco-a"], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    home = Path(env["DAGSTER_HOME"])
    try:
        deadline = time.monotonic() + 240
        with open_instance(home) as instance:  # under the lock the command takes too
            while not (runs := instance.get_runs(dg.RunsFilter(
                    statuses=[dg.DagsterRunStatus.STARTED]))):
                assert proc.poll() is None, "the run ended before it was seen running"
                assert time.monotonic() < deadline
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            (run,) = runs
            assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED

            out = unicorn(env, "register", cwd=tmp_path)
            assert out.returncode == 0, out.stderr
            assert f"run {run.run_id}" in out.stderr and f"pid {proc.pid}" in out.stderr
            assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
            (failure,) = instance.get_records_for_run(
                run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
            assert f"pid {proc.pid} on host" in failure.event_log_entry.dagster_event.message
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
