"""The deployment run for real, as the end-to-end test and the daemon benchmark use it: a throwaway
PostgreSQL server, a Dagster instance on it configured as docker/dagster.yaml (with short
monitoring intervals), the project's code location served by `dagster api grpc`, and
`dagster-daemon run`, each a process of its own; every run is a process of its own too
(DefaultRunLauncher). The fake LLM and the tiny models keep runs small."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PG_INSTALL_HINT = ("install PostgreSQL's server binaries: `apt-get install postgresql` on "
                   "Debian/Ubuntu (they land in /usr/lib/postgresql/<version>/bin, which the "
                   "tests search), or put initdb, pg_ctl and postgres on the PATH; "
                   "`.ci/run` installs them when initdb is missing")
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: the PATH's, else Debian's newest."""
    found = shutil.which("initdb")
    folders = [Path(found).parent] if found else []
    folders += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for folder in folders:
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


@contextmanager
def postgres_server(binaries: Path) -> Iterator[dict[str, str]]:
    """initdb into a temporary folder, `pg_ctl start` on a free loopback port (as the postgres
    user when run as root, which PostgreSQL refuses), stopped at the end. Yields the
    DAGSTER_POSTGRES_* variables that docker/dagster.yaml reads."""
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="unicorn-pg-"))
    if as_user:
        shutil.chown(folder, "postgres")
    data, port, log = folder / "data", free_port(), folder / "server.log"
    subprocess.run([*as_user, str(binaries / "initdb"), "-D", str(data), "-U", "dagster",
                    "--auth=trust", "--no-sync"], check=True, capture_output=True, timeout=180)
    # Throwaway data: no fsync. Enough connections for a daemon, a code server, runs and CLIs.
    options = f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off -c max_connections=300"
    started = subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log),
                              "-o", options, "-w", "-t", "120", "start"],
                             capture_output=True, text=True, timeout=180, check=False)
    try:
        if started.returncode != 0:
            log_text = log.read_text() if log.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {started.stderr}\n{log_text[-3000:]}")
        yield {"DAGSTER_POSTGRES_HOST": "127.0.0.1", "DAGSTER_POSTGRES_PORT": str(port),
               "DAGSTER_POSTGRES_DB": "postgres", "DAGSTER_POSTGRES_USER": "dagster",
               "DAGSTER_POSTGRES_PASSWORD": "unused-with-trust"}
    finally:
        subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate",
                        "-w", "stop"], capture_output=True, timeout=120, check=False)
        shutil.rmtree(folder, ignore_errors=True)


def instance_yaml(compute_logs: Path) -> dict[str, Any]:
    """docker/dagster.yaml (PostgreSQL storage, queued runs, DefaultRunLauncher, run monitoring
    and retries), with intervals short enough for a test and room for runs side by side."""
    config = yaml.safe_load((ROOT / "docker" / "dagster.yaml").read_text())
    config["compute_logs"]["config"]["base_dir"] = str(compute_logs)
    config["run_coordinator"]["config"] = {"dequeue_interval_seconds": 1}
    config["concurrency"] = {"runs": {"max_concurrent_runs": 3},
                             "pools": {"default_limit": 3, "granularity": "run"}}
    config["run_monitoring"].update(poll_interval_seconds=3, start_timeout_seconds=180)
    return config


def profile_for_tests(nightly_cron: str, sensor_running: bool = True,
                 nightly_running: bool = True) -> dict[str, Any]:
    """The `local` profile (fake LLM, tiny CLIP through the environment), with the automation
    switched on at test intervals: the sensor every 3 s, a nightly tick at `nightly_cron`."""
    profile = yaml.safe_load((ROOT / "dagster_project" / "profiles" / "local.yaml").read_text())
    profile["quality_gates"]["caption_min_median_words"] = 5  # as tests/support.make_resources
    profile["automation"]["new_shard_sensor"].update(running=sensor_running,
                                                     minimum_interval_seconds=3)
    profile["automation"]["nightly"].update(running=nightly_running, cron=nightly_cron)
    return profile


class DaemonStack:
    """A DAGSTER_HOME on PostgreSQL, a code server and a daemon, all in `folder`."""

    def __init__(self, folder: Path, postgres: dict[str, str], nightly_cron: str = "* * * * *",
                 sensor_running: bool = True, nightly_running: bool = True):
        self.folder = folder
        self.home, self.seeds, self.data = folder / "home", folder / "seeds", folder / "data"
        for path in (self.home, self.seeds, self.data):
            path.mkdir(parents=True, exist_ok=True)
        (self.home / "dagster.yaml").write_text(yaml.safe_dump(instance_yaml(folder / "logs")))
        profile = folder / "profile.yaml"
        profile.write_text(yaml.safe_dump(profile_for_tests(nightly_cron, sensor_running,
                                                       nightly_running)))
        self.port = free_port()
        (folder / "workspace.yaml").write_text(yaml.safe_dump({"load_from": [{"grpc_server": {
            "host": "127.0.0.1", "port": self.port, "location_name": "unicorn"}}]}))
        self.env = {**os.environ, **postgres, "DAGSTER_HOME": str(self.home),
                    "PYTHONPATH": str(ROOT), "UNICORN_PROFILE_FILE": str(profile),
                    "UNICORN_SEEDS": str(self.seeds), "UNICORN_DATA_DIR": str(self.data),
                    "UNICORN_LLM_BACKEND": "fake", "UNICORN_SYNTHVLM": "false",
                    "DAGSTER_DISABLE_TELEMETRY": "1"}
        self.env.pop("UNICORN_PROFILE", None)
        self.postgres = postgres
        self.processes: dict[str, subprocess.Popen] = {}
        self._instance: dg.DagsterInstance | None = None

    # --- processes ----------------------------------------------------------------------------

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.processes[name] = process
        return process

    def log_tail(self, name: str, chars: int = 4000) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def start(self, timeout: float = 300) -> DaemonStack:
        self._start("code-server", [str(BIN / "dagster"), "api", "grpc", "--module-name",
                                    "dagster_project.definitions", "--attribute", "defs",
                                    "--host", "127.0.0.1", "--port", str(self.port),
                                    "--location-name", "unicorn"])
        self.wait_for(lambda: subprocess.run(
            [str(BIN / "dagster"), "api", "grpc-health-check", "--port", str(self.port)],
            capture_output=True, env=self.env, check=False).returncode == 0,
            timeout, "the code server to become healthy", poll=1)
        self._start("daemon", [str(BIN / "dagster-daemon"), "run", "-w",
                               str(self.folder / "workspace.yaml")])
        return self

    def stop(self) -> None:
        """Stop the daemon, then the code server; each in its own process group, with the runs
        the code server started."""
        for name in ("daemon", "code-server"):
            process = self.processes.get(name)
            if process is None or process.poll() is not None:
                continue
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._instance is not None:
            self._instance.dispose()
            self._instance = None

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """A command line against the stack's instance, e.g. ("unicorn", "backfill", ...)."""
        return subprocess.run([str(BIN / args[0]), *args[1:]], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)

    # --- the instance, read through public APIs ------------------------------------------------

    @property
    def instance(self) -> dg.DagsterInstance:
        if self._instance is None:
            for key, value in self.postgres.items():  # dagster.yaml reads them
                os.environ[key] = value
            self._instance = dg.DagsterInstance.from_config(str(self.home))
        return self._instance

    def runs(self, **filters: Any) -> list[dg.DagsterRun]:
        return [r.dagster_run for r in self.instance.get_run_records(dg.RunsFilter(**filters))]

    def wait_for(self, predicate: Callable[[], T], timeout: float, what: str,
                 poll: float = 0.5) -> T:
        """Poll `predicate` until it is truthy; fail naming `what`, with the processes' logs."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise AssertionError(f"{name} exited ({process.returncode}) while waiting "
                                         f"for {what}:\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n"
                                     f"daemon log:\n{self.log_tail('daemon')}")
            time.sleep(poll)

    def write_seed_file(self, key: str, captions: list[dict[str, Any]]) -> Path:
        path = self.seeds / f"{key}.jsonl"
        tmp = path.with_suffix(".part")  # whole at once: the sensor never sees half a file
        tmp.write_text("".join(json.dumps(c) + "\n" for c in captions), encoding="utf-8")
        tmp.rename(path)
        return path

    def postgres_rows(self) -> dict[str, int]:
        """Rows of the instance's main tables."""
        import sqlalchemy as sa

        url = sa.engine.URL.create(
            "postgresql+psycopg2", username=self.postgres["DAGSTER_POSTGRES_USER"],
            host=self.postgres["DAGSTER_POSTGRES_HOST"],
            port=int(self.postgres["DAGSTER_POSTGRES_PORT"]),
            database=self.postgres["DAGSTER_POSTGRES_DB"])
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        tables = ("event_logs", "runs", "run_tags", "asset_keys", "asset_event_tags",
                  "dynamic_partitions", "bulk_actions", "job_ticks")
        with engine.connect() as connection:
            present = set(sa.inspect(connection).get_table_names())
            rows = {t: connection.execute(sa.text(f"select count(*) from {t}")).scalar_one()
                    for t in tables if t in present}
        engine.dispose()
        return rows
