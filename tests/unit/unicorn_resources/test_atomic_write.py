"""atomic_write's temporary files: named for the process that writes them, removed by the next
write of the same file once that process is gone (kill -9 mid-write), never while it lives; and
the written file gets the mode open() gives under the umask."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileSystem

from tests.support import ROOT
from unicorn_resources import storage
from unicorn_resources.storage import (
    STALE_TEMP_SECONDS,
    TEMP_MARK,
    host_tag,
    sweep_stale_temps,
    write_bytes,
)

FS = LocalFileSystem()

# A writer that stops in the middle of its write, as a large Parquet write is when kill -9 hits.
WRITER = """
import sys, time
from fsspec.implementations.local import LocalFileSystem
from unicorn_resources.storage import atomic_write

def write(handle):
    handle.write(b"PAR1" + b"x" * 1_000_000)
    handle.flush()
    print("writing", flush=True)
    time.sleep(600)

atomic_write(LocalFileSystem(), sys.argv[1], write)
"""


def start_writer(target: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(target)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, text=True)


def temps_of(target: Path) -> dict[int, Path]:
    """{writer pid: temporary file} of `target`."""
    found = {}
    for path in target.parent.glob(f".{target.name}{TEMP_MARK}*"):
        found[int(path.name.rsplit("-", 2)[1])] = path
    return found


def wait_for_state(pid: int, letter: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] == letter:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} never reached state {letter}")


def test_temporaries_of_killed_writers_are_swept_and_live_ones_kept(tmp_path: Path,
                                                                    monkeypatch):
    monkeypatch.setattr(storage, "SWEEP_INTERVAL_SECONDS", 0.0)  # every write sweeps
    target = tmp_path / "expanded_captions" / "real.parquet"
    writers = {name: start_writer(target) for name in ("reaped", "zombie", "live")}
    try:
        for proc in writers.values():
            assert proc.stdout.readline().strip() == "writing"
        temps = temps_of(target)
        assert set(temps) == {p.pid for p in writers.values()}
        for name in temps.values():  # recognisable: hidden, marked, never read as Parquet
            assert name.name.startswith(".real.parquet.unicorn-tmp-") and name.suffix != ".parquet"
        writers["reaped"].send_signal(signal.SIGKILL)
        writers["reaped"].wait()
        writers["zombie"].send_signal(signal.SIGKILL)  # dead, not yet reaped by its parent
        wait_for_state(writers["zombie"].pid, "Z")

        write_bytes(FS, str(target), b"new")
        assert target.read_bytes() == b"new"
        assert set(temps_of(target)) == {writers["live"].pid}  # its write goes on
        assert temps[writers["live"].pid].stat().st_size > 1_000_000

        writers["live"].send_signal(signal.SIGKILL)
        writers["live"].wait()
        write_bytes(FS, str(target), b"newer")
        assert sorted(p.name for p in target.parent.iterdir()) == ["real.parquet"]
    finally:
        for proc in writers.values():
            proc.kill()
            proc.wait()


def temp(target: Path, host: str, pid: int, age: float = 0.0) -> Path:
    path = target.with_name(f".{target.name}{TEMP_MARK}{host}-{pid}-{uuid.uuid4().hex}")
    path.write_bytes(b"half a file")
    when = time.time() - age
    os.utime(path, (when, when))
    return path


def test_a_reused_pid_does_not_keep_an_orphan(tmp_path: Path):
    """The pid in an orphan's name may belong to a newer process (a restarted container): a
    process that started after the temporary was last written did not write it."""
    target = tmp_path / "real.parquet"
    newer = subprocess.Popen(["sleep", "60"])
    try:
        orphan = temp(target, host_tag(), newer.pid, age=3600)
        its_own = temp(target, host_tag(), newer.pid)
        ours = temp(target, host_tag(), os.getpid())
        assert sweep_stale_temps(tmp_path) == [orphan]
        assert its_own.exists() and ours.exists()
    finally:
        newer.kill()
        newer.wait()


def test_temporaries_of_other_hosts_and_older_versions_go_only_when_stale(tmp_path: Path):
    target = tmp_path / "real.parquet"
    other_host = "0" * 8 if host_tag() != "0" * 8 else "1" * 8
    fresh_remote = temp(target, other_host, 12345)
    stale_remote = temp(target, other_host, 12345, age=STALE_TEMP_SECONDS + 60)
    legacy_fresh = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    legacy_fresh.write_bytes(b"x")
    legacy_stale = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    legacy_stale.write_bytes(b"x")
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(legacy_stale, (old, old))
    dead_writer = temp(target.with_name("other.parquet"), host_tag(), 999_999_999)  # no such pid
    others = [target.with_name(".real.parquet.notes"), target.with_name("real.parquet.bak"),
              target.with_name(f"real.parquet{TEMP_MARK}{host_tag()}-999999999-{'a' * 32}")]
    for path in others:  # not temporaries: kept, however old
        path.write_bytes(b"keep")
        os.utime(path, (old, old))

    assert sorted(sweep_stale_temps(tmp_path)) == sorted([stale_remote, legacy_stale, dead_writer])
    assert fresh_remote.exists() and legacy_fresh.exists()
    assert all(path.exists() for path in others)


def test_a_process_sweeps_a_folder_once_a_minute(tmp_path: Path, monkeypatch):
    """Every write of a folder of 10,000 images would list the folder: a process sweeps it at
    its first write, then again once SWEEP_INTERVAL_SECONDS have passed."""
    target = tmp_path / "images" / "a.png"
    write_bytes(FS, str(target), b"first")
    orphan = temp(target, host_tag(), 999_999_999)
    write_bytes(FS, str(target.with_name("b.png")), b"second")
    assert orphan.exists()
    monkeypatch.setattr(storage, "SWEEP_INTERVAL_SECONDS", 0.0)
    write_bytes(FS, str(target.with_name("c.png")), b"third")
    assert not orphan.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.png", "b.png", "c.png"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_a_written_file_gets_the_mode_of_the_umask(tmp_path: Path, umask: int):
    previous = os.umask(umask)
    try:
        target = tmp_path / "a.parquet"
        write_bytes(FS, str(target), b"first")
        write_bytes(FS, str(target), b"second")  # the rename keeps the temporary's mode
        assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    finally:
        os.umask(previous)
