"""Smoke test of the benchmark suite: each benchmark at its smallest size, through the runner, so
that the suite cannot rot. The figures themselves are not asserted (2 shared cores are noisy);
what is asserted is that every row is measured, compared with its baseline, and written out."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT


def bench_value(expression: str, setup: str) -> Any:
    """The JSON value of `expression` in a fresh interpreter after `setup`: the tests do not import
    the benchmarks package themselves."""
    code = f"import json\n{setup}\nprint(json.dumps({expression}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def run_suite(names: list[str], out: Path) -> dict:
    run = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--only",
                          ",".join(names), "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, check=False)
    report = json.loads((out / "results.json").read_text())
    errors = {n: report["benchmarks"][n].get("traceback") for n in names
              if report["benchmarks"][n].get("error")}
    assert run.returncode == 0 and not errors, errors or run.stderr[-3000:]
    markdown = (out / "BENCHMARKS.md").read_text()
    assert f"{report['machine']['cores']} cores" in markdown
    assert report["machine"]["cpu_model"] in markdown
    for name in names:
        rows = report["benchmarks"][name]["rows"]
        assert rows, f"{name} produced no rows"
        for row in rows:
            assert row["value"] > 0 and row["baseline_value"] > 0, row
            expected = (statistics.median(row["details"]["ratio_per_round"])
                        if "paired ratio" in row["note"] else row["value"] / row["baseline_value"])
            assert row["ratio"] == pytest.approx(expected), row
            assert f": {row['measure']} |" in markdown
    return report


def test_dedup_overhead_memory_smoke(tmp_path):
    report = run_suite(["dedup", "overhead", "memory"], tmp_path)
    dedup = report["benchmarks"]["dedup"]["rows"][0]["details"]
    for size in dedup["detection"].values():  # the planted near duplicates are what is found
        assert size["flagged_not_planted"] == 0
        assert size["planted_found"] >= 0.9 * size["planted"]
    overhead = report["benchmarks"]["overhead"]["rows"]
    assert "one run per shard" in overhead[0]["measure"] and "backfill" in overhead[1]["measure"]
    assert all(d > 0 for d in overhead[0]["details"]["seconds_per_shard_outside_model"])
    assert report["benchmarks"]["memory"]["rows"][0]["details"]["exit_codes"] == [0]


@pytest.mark.slow
def test_stage1_and_backends_smoke(tmp_path):
    """The real llama.cpp and transformers backends on a token budget of a few tokens; a warm
    re-run that the response cache answers whole, which loads no model."""
    report = run_suite(["stage1", "backends", "cache_rerun"], tmp_path)
    stage1 = report["benchmarks"]["stage1"]["rows"][0]["details"]
    assert stage1["same_tokens"], "pipeline and bare loop must generate the same tokens"
    backends = report["benchmarks"]["backends"]["rows"][0]["details"]["tokens"]
    assert all(sum(tokens) > 0 for tokens in backends.values())
    rerun = report["benchmarks"]["cache_rerun"]["rows"][0]["details"]
    assert rerun["cold_model_loads"] == 1 and rerun["warm_model_loads"] == 0
    assert rerun["warm_cache_hit_rates"] == [1.0]


@pytest.mark.slow
def test_stage3_smoke(tmp_path):
    """The tiny CLIP encoder, and the corpus path in-process and in four memory subprocesses (the
    last with transfer realign)."""
    report = run_suite(["stage3"], tmp_path)
    rows = {r["measure"].split(",")[0]: r for r in report["benchmarks"]["stage3"]["rows"]}
    corpus = rows["GB/s of float32"]["details"]
    assert corpus["step_seconds"]["transferred_embeddings"] > 0
    assert corpus["step_seconds"]["pretrain_dataset"] > 0
    memory = rows["peak RSS"]["details"]["runs"]
    polars_row_group_rows = bench_value(
        "POLARS_ROW_GROUP_ROWS", "from benchmarks.stage3 import POLARS_ROW_GROUP_ROWS")
    assert {run["input_row_group_rows"] for run in memory.values()} == {
        "IO manager default", polars_row_group_rows}
    assert memory["large_realign"]["method"] == "realign"
    assert memory["large_realign"]["statistics_seconds"] > 0


def test_synthvlm_memory_smoke(tmp_path):
    """Rendering and exporting 4 and 40 images, each in its own subprocess."""
    report = run_suite(["synthvlm"], tmp_path)
    row = report["benchmarks"]["synthvlm"]["rows"][0]
    runs = row["details"]["runs"]
    assert [run["images"] for run in runs.values()] == [4, 40]
    assert runs["40"]["image_bytes"] > runs["4"]["image_bytes"] > 0


def test_peak_rss_measures_the_command_not_its_parent(tmp_path):
    setup = "import sys\nfrom pathlib import Path\nfrom benchmarks.common import peak_rss"

    def peak_rss(command: list[str], log: Path) -> list:
        return bench_value(f"peak_rss({command!r}, {{}}, Path({str(log)!r}))", setup)

    _, small, _ = peak_rss([sys.executable, "-c", "pass"], tmp_path / "small.log")
    touch_300_mib = "x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096])"
    rc, large, _ = peak_rss([sys.executable, "-c", touch_300_mib], tmp_path / "large.log")
    assert rc == 0
    assert small < 100
    assert large > 300


def test_fit_exponent_tells_linear_from_quadratic():
    sizes = [1e4, 1e5, 1e6]
    linear, quadratic = bench_value(
        f"[fit_exponent({sizes}, {[2e-6 * n for n in sizes]}), "
        f"fit_exponent({sizes}, {[2e-9 * n * n for n in sizes]})]",
        "from benchmarks.common import fit_exponent")
    assert linear == pytest.approx(1.0)
    assert quadratic == pytest.approx(2.0)
