"""The `unicorn` console script, run as a user runs it: a seed folder, a data folder and a
DAGSTER_HOME chosen by environment variables, the fake LLM chosen by UNICORN_LLM_BACKEND."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import requests
import yaml

from dagster_project.dagster_internal import (
    CODE_LOCATION_NAME,
    DEFINITIONS_ATTRIBUTE,
    DEFINITIONS_MODULE,
    PROJECT_ROOT,
)
from dagster_project.instance import open_instance
from tests.support import coco_captions, stop_process, write_jsonl
from unicorn_assets.partitions import SEED_SHARDS
from unicorn_resources.storage import Catalog

UNICORN = str(Path(sys.executable).parent / "unicorn")


ROOT = Path(__file__).resolve().parents[2]


def fake_llm_profile(tmp_path: Path) -> Path:
    """The local profile with the fake LLM (the llama.cpp settings of local.yaml are refused
    for the fake backend) and without the SynthVLM branch."""
    profile = yaml.safe_load((ROOT / "dagster_project" / "profiles" / "local.yaml").read_text())
    profile["llm"] = {"backend": "fake", "cache_enabled": True}
    profile["synthvlm"] = {"enabled": False}
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    seeds = tmp_path / "seeds"
    write_jsonl(seeds / "coco-a.jsonl", coco_captions(3))
    write_jsonl(seeds / "coco-b.jsonl", coco_captions(3, offset=3))
    (seeds / "not a key.jsonl").write_text('{"caption": "A cat."}\n')
    (tmp_path / "home").mkdir()
    return {**os.environ, "UNICORN_SEEDS": str(seeds), "UNICORN_DATA_DIR": str(tmp_path / "out"),
            "DAGSTER_HOME": str(tmp_path / "home"), "UNICORN_LLM_BACKEND": "fake",
            "UNICORN_PROFILE_FILE": str(fake_llm_profile(tmp_path)),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


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
    assert "seed lines read: 6, seeds made: 6 (0 of them from label templates)" in first.stdout
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
    with Catalog(str(data / "catalog.duckdb")).connect() as con:
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


def materialize_one(env: dict[str, str], tmp_path: Path, *flags: str
                    ) -> subprocess.CompletedProcess:
    out = unicorn(env, "materialize", "--shard", "coco-a", *flags, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_runs_are_quiet_carry_the_code_location_and_the_catalog_moves(env, tmp_path: Path):
    quiet = materialize_one(env, tmp_path)
    screen = quiet.stdout + quiet.stderr
    # quiet: a line per stage of the shard, the summary, and where the event log went
    assert "STEP_START" not in screen and " - DEBUG - " not in screen
    assert "coco-a unicorn_shard_job" in quiet.stdout and "expand_captions" in quiet.stdout
    assert "1 shard(s):" in quiet.stdout
    (log_line,) = [line for line in quiet.stdout.splitlines() if line.startswith("event log: ")]
    log = Path(log_line.removeprefix("event log: ").split(" (")[0])
    assert log.parent == Path(env["UNICORN_DATA_DIR"]).resolve() / "logs"
    assert "STEP_START" in log.read_text() and "RUN_SUCCESS" in log.read_text()

    verbose = materialize_one(env, tmp_path, "--verbose")
    assert "STEP_START" in verbose.stderr  # the event log is back on the terminal
    assert "event log: " not in verbose.stdout

    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        runs = instance.get_runs()
        # the tag the UI's timeline and run filters select a code location's runs by
        labelled = instance.get_runs(dg.RunsFilter(tags={".dagster/repository":
                                                         "__repository__@unicorn"}))
    assert len(runs) == 2 and {r.run_id for r in labelled} == {r.run_id for r in runs}
    for run in runs:  # launched as runs of the `unicorn` code location, like the UI's
        origin = run.remote_job_origin
        assert origin is not None and origin.location_name == "unicorn"
        assert origin.repository_origin.repository_name == "__repository__"
        assert origin.job_name == "unicorn_shard_job"
        assert run.tags["dagster/partition"] == "coco-a"
        assert run.tags["unicorn/pid"] and run.tags["unicorn/host"]  # dead-run detection
        assert run.status == dg.DagsterRunStatus.SUCCESS

    # `unicorn sql` queries the catalog, also after the data folder moved
    query = "select shard, count(*) as n from expanded_captions group by 1"
    out = unicorn(env, "sql", query, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    captions = pl.read_parquet(Path(env["UNICORN_DATA_DIR"]) / "expanded_captions" / "coco-a.parquet")
    assert re.search(rf"coco-a\s*│\s*{captions.height}\s", out.stdout), out.stdout
    moved = tmp_path / "elsewhere" / "data"
    moved.parent.mkdir()
    Path(env["UNICORN_DATA_DIR"]).rename(moved)
    out = unicorn({**env, "UNICORN_DATA_DIR": str(moved)}, "sql", query, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert re.search(rf"coco-a\s*│\s*{captions.height}\s", out.stdout), out.stdout
    out = unicorn({**env, "UNICORN_DATA_DIR": str(moved)}, "sql", "select * from nope", cwd=tmp_path)
    assert out.returncode == 1 and "nope" in out.stderr and "duckdb_views()" in out.stderr


def test_the_code_location_named_by_the_cli_is_the_workspace_one():
    workspace = yaml.safe_load((ROOT / "workspace.yaml").read_text())
    (entry,) = workspace["load_from"]
    module = entry["python_module"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert (module["location_name"], module["module_name"], module["attribute"]) == (
        CODE_LOCATION_NAME, DEFINITIONS_MODULE, DEFINITIONS_ATTRIBUTE)
    assert pyproject["tool"]["dagster"] == {"module_name": DEFINITIONS_MODULE,
                                            "code_location_name": CODE_LOCATION_NAME}
    assert pyproject["tool"]["dg"]["project"]["code_location_name"] == CODE_LOCATION_NAME
    assert (ROOT / module["working_directory"]).resolve() == PROJECT_ROOT


def test_dg_lists_and_checks_the_definitions(tmp_path: Path):
    dg_cli = str(Path(sys.executable).parent / "dg")
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    check = subprocess.run([dg_cli, "check", "defs"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=180, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "All definitions loaded successfully" in check.stdout + check.stderr
    listed = subprocess.run([dg_cli, "list", "defs", "--json"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=180, check=False)
    assert listed.returncode == 0, listed.stderr
    defs = json.loads(listed.stdout)
    assert {"expanded_captions", "instructions"} <= {a["key"] if "key" in a else a["asset_key"]
                                                     for a in defs["assets"]}
    assert "unicorn_shard_job" in {j["name"] for j in defs["jobs"]}


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    answer = requests.post(f"http://127.0.0.1:{port}/graphql", timeout=60,
                           json={"query": query, "variables": variables or {}})
    answer.raise_for_status()
    body = answer.json()
    assert "errors" not in body, body["errors"]
    return body["data"]


def location_state(port: int) -> str | None:
    """The __typename of the webserver's first code location entry, None while not listening."""
    try:
        data = graphql(port, "{ workspaceOrError { ... on Workspace { locationEntries { "
                             "locationOrLoadError { __typename } } } } }")
    except requests.ConnectionError:
        return None
    entries = data["workspaceOrError"]["locationEntries"]
    return entries[0]["locationOrLoadError"]["__typename"] if entries else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_ui_reexecutes_a_run_started_by_the_cli(env, tmp_path: Path):
    """`Re-execute` in the UI is the launchRunReexecution mutation: it needs the run's code
    location, which execute_in_process never recorded."""
    from dagster_graphql import DagsterGraphQLClient

    # The webserver alone has no daemon to dequeue runs: launch them directly.
    (Path(env["DAGSTER_HOME"]) / "dagster.yaml").write_text(
        "run_coordinator:\n  module: dagster._core.run_coordinator\n"
        "  class: DefaultRunCoordinator\n")
    materialize_one(env, tmp_path)
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        (parent,) = instance.get_runs()

    port = free_port()
    with open(tmp_path / "webserver.log", "w") as log:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-webserver"), "-h", "127.0.0.1", "-p",
             str(port), "-w", str(ROOT / "workspace.yaml")], cwd=ROOT, env=env,
            stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 240
        while location_state(port) != "RepositoryLocation":  # its code server loaded the defs
            assert server.poll() is None, (tmp_path / "webserver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the webserver did not load the code location"
            time.sleep(1)

        answer = graphql(port, "mutation($parent: String!) { launchRunReexecution(reexecutionParams: "
            "{parentRunId: $parent, strategy: ALL_STEPS}) { __typename "
            "... on LaunchRunSuccess { run { runId } } ... on PythonError { message stack } "
            "... on Error { message } } }", {"parent": parent.run_id})["launchRunReexecution"]
        assert answer["__typename"] == "LaunchRunSuccess", answer
        child_id = answer["run"]["runId"]
        client = DagsterGraphQLClient("127.0.0.1", port_number=port, timeout=30)
        while (status := client.get_run_status(child_id)) not in (
                dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE,
                dg.DagsterRunStatus.CANCELED):
            assert time.monotonic() < deadline + 240, f"re-executed run still {status}"
            time.sleep(2)
        assert status == dg.DagsterRunStatus.SUCCESS
        with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            child = instance.get_run_by_id(child_id)
        assert child.parent_run_id == parent.run_id
        assert child.tags["dagster/partition"] == "coco-a"
    finally:
        stop_process(server)
