"""Fixtures of the deployment tests: one throwaway PostgreSQL server for the whole session."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_INSTALL_HINT = ("install PostgreSQL's server binaries: `apt-get install postgresql` on "
                   "Debian/Ubuntu (they land in /usr/lib/postgresql/<version>/bin, which the "
                   "tests search), or put initdb, pg_ctl and postgres on the PATH; "
                   "`.ci/run` installs them when initdb is missing")


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


@pytest.fixture(scope="session")
def postgres() -> Iterator[dict[str, str]]:
    """A throwaway PostgreSQL server on 127.0.0.1 for the session: initdb into a temporary folder,
    `pg_ctl start` on a free port (as the postgres user when the tests run as root, which
    PostgreSQL refuses), stopped at the end. Yields the DAGSTER_POSTGRES_* variables that
    docker/dagster.yaml reads. Missing binaries fail the test in CI (the CI variable set), with
    how to install them; elsewhere they skip it with the same advice."""
    binaries = postgres_bin()
    if binaries is None:
        message = f"PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: {PG_INSTALL_HINT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
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
    if started.returncode != 0:
        log_text = log.read_text() if log.exists() else ""
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {started.stderr}\n{log_text[-3000:]}")
    try:
        yield {"DAGSTER_POSTGRES_HOST": "127.0.0.1", "DAGSTER_POSTGRES_PORT": str(port),
               "DAGSTER_POSTGRES_DB": "postgres", "DAGSTER_POSTGRES_USER": "dagster",
               "DAGSTER_POSTGRES_PASSWORD": "unused-with-trust"}
    finally:
        subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate",
                        "-w", "stop"], capture_output=True, timeout=120, check=False)
        shutil.rmtree(folder, ignore_errors=True)
