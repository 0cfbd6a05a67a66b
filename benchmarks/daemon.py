"""11. Daemon-driven throughput: the deployment's way out, run for real. A backfill of N small
shards (seeds + Stage 1, the selection of bench 3, fake LLM) is submitted with `unicorn backfill`
to an instance on a throwaway PostgreSQL server and carried out by `dagster-daemon run` through a
`dagster api grpc` code server, every run a process of its own (DefaultRunLauncher; up to 3 runs
at once; tests/deployment/daemon_stack.py, as the end-to-end test runs it). Measured: runs per
minute, seconds per shard beside the seconds the runs' steps took (the rest is overhead: the
daemon's 30 s backfill iterations, queueing, a fresh interpreter per run), and the rows the
instance wrote to PostgreSQL per shard. The in-process figure for the same selection is bench 3
(3b: a backfill in one process, up to 8 shards per run)."""

from __future__ import annotations

import math
import time
from typing import Any

import dagster as dg

from benchmarks.common import Row, coco_captions, workdir
from unicorn_assets.partitions import SEED_BACKFILL, SHARD_BACKFILL

# 100 shards: the figure.
FULL = {"shards": 100, "seeds_per_shard": 4}
SMOKE = {"shards": 3, "seeds_per_shard": 2}
BENCH = "11. Daemon-driven throughput"
SELECT = 'group:"unicorn_seeds" or group:"unicorn_stage1"'


def run(config: dict[str, Any]) -> list[Row]:
    from tests.deployment.daemon_stack import DaemonStack, postgres_bin, postgres_server

    binaries = postgres_bin()
    if binaries is None:
        raise RuntimeError("PostgreSQL server binaries not found: apt-get install postgresql")
    shards, per = config["shards"], config["seeds_per_shard"]
    captions = coco_captions(shards * per)
    with workdir("daemon") as tmp, postgres_server(binaries) as pg:
        stack = DaemonStack(tmp, pg, sensor_running=False, nightly_running=False)
        keys = [f"s{i:04d}" for i in range(shards)]
        for i, key in enumerate(keys):
            stack.write_seed_file(key, captions[i * per:(i + 1) * per])
        try:
            stack.start()
            before = stack.postgres_rows()
            started = time.monotonic()
            submitted = stack.cli("unicorn", "backfill", "--select", SELECT)
            if submitted.returncode != 0:
                raise RuntimeError(submitted.stderr)
            backfill_id = submitted.stdout.split()[1].rstrip(":")
            backfill = stack.wait_for(
                lambda: (b := stack.instance.get_backfill(backfill_id)).status.value != "REQUESTED"
                and b, 3600, f"backfill {backfill_id}", poll=1)
            wall = time.monotonic() - started
            after = stack.postgres_rows()
            runs = stack.runs(tags={"dagster/backfill": backfill_id})
            step_seconds = sum((s.end_time or 0) - (s.start_time or 0)
                               for r in runs for s in stack.instance.get_run_step_stats(r.run_id))
            run_seconds = sum((st.end_time or 0) - (st.launch_time or st.start_time or 0)
                              for st in (stack.instance.get_run_stats(r.run_id) for r in runs))
        finally:
            stack.stop()
    ok = backfill.status.value == "COMPLETED_SUCCESS" and all(
        r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    expected = (math.ceil(shards / SEED_BACKFILL.max_partitions_per_run)
                + math.ceil(shards / SHARD_BACKFILL.max_partitions_per_run))
    added = {table: after[table] - before.get(table, 0) for table in after}
    rows_per_shard = (added.get("event_logs", 0) + added.get("runs", 0)) / shards
    details = {"shards": shards, "seeds_per_shard": per, "runs": len(runs),
               "runs_expected": expected, "succeeded": ok, "wall_seconds": round(wall, 1),
               "run_seconds_sum": round(run_seconds, 1), "step_seconds_sum": round(step_seconds, 1),
               "rows_added": added}
    note = (f"{shards} shards x {per} seeds; {len(runs)} runs (expected {expected}: seeds 32 "
            f"per run, Stage 1 8 per run), all succeeded: {ok}; wall {wall:.0f} s from submit "
            "to done")
    return [
        Row(BENCH, f"shards per minute, daemon backfill of {shards} shards on PostgreSQL",
            shards / wall * 60, "shards/min", "runs per minute", len(runs) / wall * 60,
            note=note + "; ratio = shards per run", details=details),
        Row(BENCH, f"s/shard wall, daemon backfill of {shards} shards (seeds + Stage 1)",
            wall / shards, "s/shard", "s/shard inside the runs' steps", step_seconds / shards,
            note=f"overhead {(wall - step_seconds) / shards:.2f} s/shard outside the steps (daemon "
            "iterations every 30 s, queue, one interpreter per run); in-process: bench 3b",
            details=details),
        Row(BENCH, f"PostgreSQL rows per shard (event_logs + runs), {shards} shards",
            rows_per_shard, "rows/shard", "event_logs rows per shard alone",
            added.get("event_logs", 0) / shards,
            note="rows added by the backfill: " + ", ".join(f"{t} {n}" for t, n in added.items()),
            details=details),
    ]
