"""One Dagster instance (DAGSTER_HOME) shared by many `unicorn` commands, with no daemon.

- The instance's storage is created (or migrated) once, under a file lock in DAGSTER_HOME, before
  any command uses it: two processes creating the SQLite schemas at once corrupt them.
- A run that the CLI executes in its own process carries the host and process in its tags. When
  that process dies (kill -9, out of memory, a closed terminal) no daemon notices, and the run
  would stay STARTED for ever, holding back the nightly schedule. The next command on the same
  host marks such runs failed, naming the dead process.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

HOST_TAG = "unicorn/host"
PID_TAG = "unicorn/pid"
PROCESS_START_TAG = "unicorn/process_start"  # the pid's start time: a reused pid is another process
LOCK_FILE = ".unicorn-instance.lock"
UNFINISHED = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
              dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


@contextmanager
def home_lock(home: str | Path, timeout: float = 300.0) -> Iterator[None]:
    """Hold the exclusive lock of DAGSTER_HOME (fcntl.flock on its lock file; released by the OS
    when the process dies, so a killed command never leaves it held)."""
    path = Path(home) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"DAGSTER_HOME {home} stayed locked for {timeout:.0f}s by another "
                        f"`unicorn` command ({path}); wait for it to finish, or stop it") from None
                time.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def open_instance(home: str | Path) -> dg.DagsterInstance:
    """The instance of `home`, its storage created or migrated while holding the home's lock."""
    with home_lock(home):
        instance = dg.DagsterInstance.from_config(str(home))
        # One query per storage makes each create (or check) its schema now, under the lock.
        instance.get_run_records(limit=1)
        instance.get_dynamic_partitions("unicorn_instance_check")
        instance.all_instigator_state()
    return instance


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, Linux /proc), or None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None  # field 22 of proc_pid_stat(5)


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether process `pid` still runs (a zombie does not) and, given its recorded start time,
    is the same process and not a later one that was given the same pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user's process
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
    except (OSError, IndexError):
        pass
    if started:
        now = process_start(pid)
        return now is None or now == started
    return True


def run_tags() -> dict[str, str]:
    """Tags naming this process, for a run that executes in it (execute_in_process)."""
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    started = process_start(os.getpid())
    if started:
        tags[PROCESS_START_TAG] = started
    return tags


def fail_dead_runs(instance: dg.DagsterInstance, host: str | None = None
                   ) -> list[tuple[dg.DagsterRun, str]]:
    """Report as failed every unfinished run that ran in a process of this host which is gone;
    returns (run, message) for each."""
    host = host or socket.gethostname()
    failed = []
    for record in instance.get_run_records(dg.RunsFilter(statuses=UNFINISHED,
                                                         tags={HOST_TAG: host})):
        run = record.dagster_run
        try:
            pid = int(run.tags.get(PID_TAG, ""))
        except ValueError:
            continue  # not started by `unicorn`
        if process_alive(pid, run.tags.get(PROCESS_START_TAG)):
            continue
        # The process is gone, so the run will write nothing more: its status now is final.
        current = instance.get_run_by_id(run.run_id)
        if current is None or current.status not in UNFINISHED:
            continue
        message = (f"The process of this run (pid {pid} on host {host}) is gone: it was killed or "
                   "crashed before the run finished. Marked failed by the next `unicorn` command; "
                   "run it again to redo the work.")
        instance.report_run_failed(current, message)
        failed.append((current, message))
    return failed
