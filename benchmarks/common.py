"""Shared by every benchmark: result rows, interleaved repeats and their medians, the machine,
power-law fits, peak RSS of a subprocess, real seed captions and a throwaway Dagster instance."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tests.support import COCO_CAPTIONS  # noqa: F401 - re-exported for the benchmarks
from tests.support import read_coco_captions as coco_captions  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "_work"  # git-ignored scratch space


@dataclass
class Row:
    """One line of the table: a figure, the baseline it is compared with, and their ratio."""

    bench: str  # which of the six benchmarks
    measure: str
    value: float
    unit: str
    baseline: str
    baseline_value: float
    ratio: float | None = None  # value / baseline_value unless given
    target: str = ""
    met: bool | None = None  # None: no target
    runs: int = 1  # value and baseline are medians of this many runs
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ratio is None and self.baseline_value:
            self.ratio = self.value / self.baseline_value

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def interleaved(runs: int, **fns: Callable[[], Any]) -> dict[str, list[Any]]:
    """Call each function `runs` times, alternating in mirrored rounds (a b, b a, a b, ...), so that
    load from other processes on a shared machine, and its drift, fall on every contender alike.
    Returns their results by name, in run order."""
    results: dict[str, list[Any]] = {name: [] for name in fns}
    for round_ in range(runs):
        for name in (list(fns) if round_ % 2 == 0 else list(reversed(fns))):
            results[name].append(fns[name]())
    return results


def timed(fn: Callable[[], Any]) -> Callable[[], float]:
    def run() -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started
    return run


def fit_exponent(sizes: list[float], seconds: list[float]) -> float:
    """b in seconds = a * size**b, by least squares in log-log space (1.0: linear)."""
    slope, _ = np.polyfit(np.log(sizes), np.log(seconds), 1)
    return float(slope)


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in
              (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
              if line.startswith("model name")]
    meminfo = Path("/proc/meminfo")
    mem_kib = next((int(line.split()[1]) for line in
                    (meminfo.read_text().splitlines() if meminfo.exists() else [])
                    if line.startswith("MemTotal:")), 0)
    return {
        "cpu_model": models[0] if models else platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kib / 2**20, 1),
        "gpu": gpu_name(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


# Run by a small Python between us and the measured command: Linux counts the RSS of the process
# a child was forked from into the child's ru_maxrss, so forking from this (large) process would
# inflate every figure.
_RSS_PROBE = """
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as out:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}, out)
"""


def peak_rss(cmd: list[str], env: dict[str, str], log: Path,
             timeout_s: float = 3600) -> tuple[int, float, float]:
    """Run `cmd` to its end; (exit code, peak RSS in MiB, wall seconds). The peak is wait4's
    ru_maxrss: the largest resident set of the command or of any descendant it waited for."""
    result = log.with_suffix(".rss.json")
    started = time.perf_counter()
    with log.open("wb") as out:
        subprocess.run([sys.executable, "-c", _RSS_PROBE, str(result), *cmd], env=env, cwd=ROOT,
                       stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
    wall = time.perf_counter() - started
    measured = json.loads(result.read_text())
    return measured["rc"], measured["maxrss_kib"] / 1024, wall


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def workdir(name: str) -> Iterator[Path]:
    """A fresh folder under benchmarks/_work, removed afterwards."""
    path = WORK / f"{name}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_seed_shards(folder: Path, shards: dict[str, list[dict[str, Any]]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, records in shards.items():
        (folder / f"{key}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records),
                                             encoding="utf-8")


@contextmanager
def pipeline(tmp: Path, seed_dir: Path, llm: dict[str, Any], jobs: list,
             clip: dict[str, Any] | None = None) -> Iterator[tuple]:
    """(instance, Definitions) as the `unicorn` CLI has them: a persistent on-disk DagsterInstance
    (DAGSTER_HOME-style, no test settings) and the project's assets and checks, with the `local`
    profile's resources pointed at `tmp` and the given LLM (and clip) section."""
    import dagster as dg

    from dagster_project.definitions import ASSET_CHECKS, ASSETS
    from dagster_project.profiles import build_resources, load_profile

    profile = load_profile("local")
    profile["storage"] = {**profile.get("storage", {}), "base_uri": str(tmp / "data")}
    profile["seeds"] = {**profile.get("seeds", {}), "location": str(seed_dir)}
    profile["llm"] = llm
    if clip:
        profile["clip"] = {**profile.get("clip", {}), **clip}
    defs = dg.Definitions(assets=ASSETS, asset_checks=ASSET_CHECKS, jobs=jobs,
                          resources=build_resources(profile))
    home = tmp / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield instance, defs


def run_metadata(result: Any, asset: str, key: str) -> list[Any]:
    """`key` of every materialisation of `asset` in a run's events."""
    values = []
    for event in result.all_events:
        if event.event_type_value == "ASSET_MATERIALIZATION":
            mat = event.event_specific_data.materialization
            if mat.asset_key.to_user_string() == asset and key in mat.metadata:
                values.append(mat.metadata[key].value)
    return values


def failed_checks(result: Any) -> list[str]:
    return [f"{e.asset_check_evaluation_data.asset_check_key.asset_key.to_user_string()}:"
            f"{e.asset_check_evaluation_data.asset_check_key.name}"
            for e in result.all_events
            if e.event_type_value == "ASSET_CHECK_EVALUATION"
            and not e.asset_check_evaluation_data.passed]
