"""6. Memory: peak RSS of a full `unicorn demo` run (bundled seeds, offline models, fresh instance,
data folder and response cache), each in its own subprocess, against the RSS of only importing the
code location (the floor every run pays). The Stage 3 figure at 1M x 768 lives in benchmarks.stage3."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import (
    ROOT,
    Row,
    coco_captions,
    median,
    peak_rss,
    tail,
    workdir,
    write_seed_shards,
)

FULL = {"runs": 1, "demo_profile": None}  # the `local` profile as users get it
SMOKE = {"runs": 1, "demo_profile": {"llm": {"backend": "fake", "cache_enabled": False}},
         "seeds": 4}
BENCH = "6. Memory"


def smoke_profile(tmp: Path, overrides: dict[str, Any], seeds: int) -> Path:
    """The local profile with a stand-in LLM and a tiny seed folder."""
    spec = yaml.safe_load((ROOT / "dagster_project" / "profiles" / "local.yaml").read_text())
    spec.update(overrides)
    write_seed_shards(tmp / "seeds", {"tiny": coco_captions(seeds)})
    spec["seeds"] = {**(spec.get("seeds") or {}), "location": str(tmp / "seeds")}
    path = tmp / "profile.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run(size: dict[str, Any]) -> list[Row]:
    demo, codes, walls, log_tail = [], [], [], ""
    unicorn = str(Path(sys.executable).with_name("unicorn"))
    imports: dict[str, list[float]] = {"dagster_project.definitions": [], "unicorn_assets.expansion": []}
    for _ in range(size["runs"]):
        with workdir("memory") as tmp:
            env = {k: v for k, v in os.environ.items() if k not in (
                "UNICORN_PROFILE", "UNICORN_PROFILE_FILE", "UNICORN_LLM_CACHE", "UNICORN_SEEDS")}
            env.update(DAGSTER_HOME=str(tmp / "dagster_home"), UNICORN_DATA_DIR=str(tmp / "data"))
            if size["demo_profile"]:
                env["UNICORN_PROFILE_FILE"] = str(smoke_profile(tmp, size["demo_profile"],
                                                                size["seeds"]))
            rc, rss, wall = peak_rss([unicorn, "demo"], env, tmp / "demo.log")
            demo.append(rss), codes.append(rc), walls.append(wall)
            if rc:
                log_tail = tail(tmp / "demo.log")
            for module, peaks in imports.items():
                peaks.append(peak_rss([sys.executable, "-c", f"import {module}"], env,
                                      tmp / "import.log")[1])
    ok = not any(codes)
    location, stage1 = (median(imports[m]) for m in imports)
    return [
        Row(BENCH, "peak RSS, `unicorn demo` (all shards, one process)", median(demo), "MiB",
            "importing the code location", location, runs=size["runs"],
            note=f"demo wall {median(walls):.0f} s" + ("" if ok else f"; demo exit codes {codes}"),
            details={"demo_mib": [round(x, 1) for x in demo], "exit_codes": codes,
                     "profile": "smoke (fake LLM)" if size["demo_profile"] else "local",
                     "log_tail": log_tail}),
        Row(BENCH, "peak RSS, importing the code location (dagster_project.definitions)",
            location, "MiB", "importing Stage 1 alone (unicorn_assets.expansion)", stage1,
            runs=size["runs"], note="every process that loads the Definitions (code server, "
            "each run worker) pays this; see Findings for what it holds",
            details={module: [round(x, 1) for x in peaks] for module, peaks in imports.items()}),
    ]
