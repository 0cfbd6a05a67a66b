"""3. Orchestration overhead: seeds + Stage 1 for 1, 10 and 100 shards of 64 real COCO seeds with an
instant LLM (FakeLLM), so nearly all the wall time is the pipeline's own: Dagster run and step
bookkeeping, seed parsing, filters, Parquet writes, catalog refresh, asset checks.

Two ways users run shards, both in-process on a persistent instance:
- per shard: one `execute_in_process` run per shard (what `unicorn materialize` does);
- backfill: runs of up to SHARD_BACKFILL's 8 shards each (a partition range per run, as a
  backfill launches them).
The asset checks run inside their assets, on the frames in memory (only the checks that read
stored files back, of the corpus-wide assets, are steps of their own); the time their rules take
is measured within the per-shard runs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
import polars as pl

from benchmarks.common import (
    Row,
    coco_captions,
    fit_exponent,
    median,
    pipeline,
    run_metadata,
    timed,
    workdir,
    write_seed_shards,
)
from unicorn_assets.partitions import SEED_SHARDS, SHARD_BACKFILL

FULL = {"shards": [1, 10, 100], "runs": {1: 3, 10: 3, 100: 1}, "seeds_per_shard": 64,
        "checks_shards": 10, "catalog_files": [10, 100, 1000, 3000], "catalog_runs": 5}
SMOKE = {"shards": [1, 2], "runs": {1: 1, 2: 1}, "seeds_per_shard": 4, "checks_shards": 1,
         "catalog_files": [5, 20], "catalog_runs": 1}
BENCH = "3. Orchestration overhead"
RUN_SIZE = SHARD_BACKFILL.max_partitions_per_run or 1

SELECTION = dg.AssetSelection.groups("unicorn_seeds", "unicorn_stage1")
shard_job = dg.define_asset_job("bench_shard", selection=SELECTION)


@contextmanager
def timing_checks() -> Iterator[list[float]]:
    """The seconds of every check evaluation (`Check.outcome`) in this process while open."""
    from unicorn_assets.checks import Check

    seconds: list[float] = []
    original = Check.outcome

    def timed_outcome(self, shards, gates):
        started = time.perf_counter()
        try:
            return original(self, shards, gates)
        finally:
            seconds.append(time.perf_counter() - started)

    Check.outcome = timed_outcome
    try:
        yield seconds
    finally:
        Check.outcome = original


def shard_keys(n: int) -> list[str]:
    return [f"shard-{i:04d}" for i in range(n)]


def materialise(n: int, mode: str, seeds_per_shard: int) -> dict[str, float]:
    """Materialise n shards on a fresh instance; wall seconds and seconds in the LLM. A first,
    untimed shard pays the one-off costs of a new instance (its SQLite schemas, the catalog file),
    which a DAGSTER_HOME pays once in its life."""
    keys = shard_keys(n + 1)
    warm, keys = keys[0], keys[1:]
    with workdir("overhead") as tmp:
        write_seed_shards(tmp / "seeds", {
            key: coco_captions(seeds_per_shard, offset=i * seeds_per_shard)
            for i, key in enumerate([warm, *keys])})
        llm = {"backend": "fake", "cache_enabled": False}
        with pipeline(tmp, tmp / "seeds", llm, [shard_job]) as (instance, defs), \
                timing_checks() as check_seconds:
            instance.add_dynamic_partitions(SEED_SHARDS, [warm, *keys])
            job = defs.resolve_job_def("bench_shard")
            job.execute_in_process(instance=instance, partition_key=warm)
            if mode == "backfill":
                batches = [keys[i : i + RUN_SIZE] for i in range(0, n, RUN_SIZE)]
                runs = [{"tags": {"dagster/asset_partition_range_start": b[0],
                                  "dagster/asset_partition_range_end": b[-1]}} for b in batches]
            else:
                runs = [{"partition_key": key} for key in keys]
            model_seconds = 0.0
            check_seconds.clear()
            started = time.perf_counter()
            for kwargs in runs:
                result = job.execute_in_process(instance=instance, **kwargs)
                model_seconds += sum(run_metadata(result, "expanded_captions",
                                                  "generation_seconds"))
            seconds = time.perf_counter() - started
            written = len(list((tmp / "data" / "expanded_captions").glob("*.parquet")))
    if written != n + 1:
        raise RuntimeError(f"{mode}: {written - 1} of {n} shards written")
    return {"seconds": seconds, "model_seconds": model_seconds, "runs": len(runs),
            "check_seconds": sum(check_seconds)}


def catalog_refresh(files: list[int], runs: int) -> Row:
    """What every local write pays after it: ParquetIOManager's catalog refresh, which checks the
    asset's DuckDB view against the columns just written and re-creates it (over the glob of all
    its shard files) only when they differ. Timed at growing numbers of shard files, against the
    forced re-create that `unicorn catalog` does (and every write did before)."""
    from unicorn_resources.storage import Catalog

    frame = pl.DataFrame({"caption_id": [f"c{i}" for i in range(64)], "shard": "s",
                          "caption": "a red bus parked beside a stone wall"})
    seconds, forced = {}, {}
    with workdir("catalog") as tmp:
        (tmp / "asset").mkdir()
        catalog, glob = Catalog(str(tmp / "catalog.duckdb")), f"{tmp}/asset/*.parquet"
        written = 0
        for n in files:
            while written < n:
                frame.write_parquet(tmp / "asset" / f"shard-{written:05d}.parquet")
                written += 1
            catalog.refresh_view("asset", glob)  # warm up
            seconds[n] = median([timed(lambda: catalog.refresh_view("asset", glob, frame.columns))()
                                 for _ in range(runs)])
            forced[n] = median([timed(lambda: catalog.refresh_view("asset", glob))()
                                for _ in range(runs)])
    last = files[-1]
    per_1000 = (seconds[last] - seconds[files[0]]) / (last - files[0]) * 1000
    return Row(
        BENCH, f"s per write in the catalog refresh, {last:,} shard files",
        seconds[last], "s/write", f"re-creating the view, {last:,} files", forced[last],
        runs=runs, note=f"{per_1000:+.3f} s per write for every 1,000 shard files of the asset: the "
        "view is re-created only when the written columns differ from its own, so a backfill no "
        "longer pays ~N^2. Per write: " + ", ".join(f"{n:,}: {s * 1000:.0f} ms" for n, s in
                                                     seconds.items())
        + "; re-created: " + ", ".join(f"{n:,}: {s * 1000:.0f} ms" for n, s in forced.items()),
        details={"files": files, "seconds": [round(seconds[n], 4) for n in files],
                 "recreate_seconds": [round(forced[n], 4) for n in files],
                 "seconds_per_write_per_1000_files": round(per_1000, 4)})


def run(size: dict[str, Any]) -> list[Row]:
    spec = size["seeds_per_shard"]
    materialise(1, "per_shard", spec)  # warm imports and the page cache: not timed
    series: dict[str, dict[int, list[dict]]] = {"per_shard": {}, "backfill": {}}
    for n in size["shards"]:
        modes = ["per_shard", "backfill"]
        for _ in range(size["runs"][n]):
            for mode in modes:
                series[mode].setdefault(n, []).append(materialise(n, mode, spec))

    def per_shard(mode: str, n: int) -> float:  # seconds per shard outside the model
        return median([(r["seconds"] - r["model_seconds"]) / n for r in series[mode][n]])

    rows = []
    sizes = size["shards"]
    smallest, largest = sizes[0], sizes[-1]
    for mode, label in (("per_shard", "one run per shard"),
                        ("backfill", f"backfill, up to {RUN_SIZE} shards per run")):
        walls = [median([r["seconds"] for r in series[mode][n]]) for n in sizes]
        exponent = fit_exponent(sizes, walls)
        details = {
            "shards": sizes, "runs_per_size": [size["runs"][n] for n in sizes],
            "wall_seconds": [round(w, 3) for w in walls],
            "seconds_per_shard_outside_model": [round(per_shard(mode, n), 4) for n in sizes],
            "model_seconds": [round(median([r["model_seconds"] for r in series[mode][n]]), 4)
                              for n in sizes],
            "dagster_runs": [series[mode][n][0]["runs"] for n in sizes],
            "wall_exponent": round(exponent, 3),
        }
        rows.append(Row(
            BENCH, f"s/shard outside model calls at {largest} shards, {label}",
            per_shard(mode, largest), "s/shard", f"same at {smallest} shard(s)",
            per_shard(mode, smallest), target="wall ~ shards^1 (exponent <= 1.1)",
            met=exponent <= 1.1, runs=size["runs"][largest],
            note=f"wall time ~ shards^{exponent:.2f}; per size: " + ", ".join(
                f"{n}: {s:.3f}" for n, s in zip(sizes, details["seconds_per_shard_outside_model"])),
            details=details))
    n = size["checks_shards"] if size["checks_shards"] in sizes else largest
    whole = per_shard("per_shard", n)
    in_checks = median([r["check_seconds"] / n for r in series["per_shard"][n]])
    rows.append(Row(
        BENCH, f"s/shard in asset checks ({n} shards, one run per shard)",
        in_checks, "s/shard", "s/shard of the whole run", whole,
        runs=size["runs"][n],
        note="the time in the check rules, which run inside their asset on the frames already "
        "in memory (no step of their own, no Parquet re-read); each check adds one evaluation "
        "event to the run",
        details={"check_rule_seconds_per_shard": round(in_checks, 4)}))
    rows.append(catalog_refresh(size["catalog_files"], size["catalog_runs"]))
    return rows
