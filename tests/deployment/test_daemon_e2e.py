"""The deployment run for real, end to end: PostgreSQL storage, the code location served by
`dagster api grpc`, `dagster-daemon run`, every run a process of its own (DefaultRunLauncher),
the fake LLM and the tiny models (daemon_stack.py). Everything is seen by polling the instance
through public APIs, as the UI would show it. The executable description of the new-shard
sensor, the nightly regeneration and backfills (README, "Operations").

The cases run in order on one stack (module fixture), each on top of the last:
(a) a seed file dropped into the seed location -> sensor -> its shard run -> the corpus follows;
(c) a backfill of 20 new shards, at most 8 per run (BackfillPolicy); the corpus follows;
(e) 5 `unicorn materialize` commands at once corrupt nothing;
(d) a run worker killed mid-run is marked failed and retried; the retry answers from the LLM
    response cache, and the nightly regeneration goes on (it remakes the corpus);
(b) a shard registered while the sensor is off (missing: stale) is made by the nightly, then the
    corpus; over all of it, the nightly regeneration redid only what was stale: that shard and
    the corpus, never a fresh shard."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from tests.deployment.daemon_stack import BIN, ROOT, DaemonStack
from tests.support import coco_captions

pytestmark = pytest.mark.slow

NIGHTLY = "nightly_regeneration"
SENSOR = "new_seed_shards"
SEEDS, STAGE1 = dg.AssetKey("caption_seeds"), dg.AssetKey("expanded_captions")
STATISTICS = dg.AssetKey("modality_statistics")  # the first corpus-wide asset of the nightly
BACKFILL_SHARDS = 20
MAX_PER_RUN = 8  # unicorn_assets.partitions.SHARD_BACKFILL
FINISHED = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE,
            dg.DagsterRunStatus.CANCELED)
STEP = 240  # seconds any one case may wait for the daemon
LATE = "late"  # a shard registered while the sensor is off: the nightly makes it


@pytest.fixture(scope="module")
def stack(postgres, tmp_path_factory):
    stack = DaemonStack(tmp_path_factory.mktemp("e2e"), postgres)
    try:
        yield stack.start()
    finally:
        stack.stop()


def materializations(stack: DaemonStack, key: dg.AssetKey, partition: str | None = None
                     ) -> list[dg.EventLogRecord]:
    return list(stack.instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=key, asset_partitions=[partition] if partition else None), limit=1000).records)


def made_after(stack: DaemonStack, key: dg.AssetKey, after: float) -> dg.EventLogRecord | None:
    event = stack.instance.get_latest_materialization_event(key)
    return event if event is not None and event.timestamp > after else None


def finished(stack: DaemonStack, run_id: str) -> dg.DagsterRun | None:
    run = stack.instance.get_run_by_id(run_id)
    return run if run is not None and run.status in FINISHED else None


def nightly_runs(stack: DaemonStack) -> list[dg.DagsterRun]:
    return stack.runs(tags={"dagster/sensor_name": NIGHTLY})


def sensor_status(stack: DaemonStack, sensor: str) -> list[str]:
    return [s.status.value for s in stack.instance.all_instigator_state() if s.name == sensor]


def switch(stack: DaemonStack, action: str, sensor: str, hold: float = 20) -> None:
    """`dagster sensor start|stop` against the code server, as an operator would, then watched for
    `hold` seconds. A daemon tick that read the sensor's state before the command can write it
    back after it (dagster-io/dagster#7736; seen in CI at 1.13): the command is then given again,
    as an operator who saw the sensor still running would."""
    want = {"stop": "STOPPED", "start": "RUNNING"}[action]
    seen: list[list[str]] = []
    for _ in range(4):
        done = stack.cli("dagster", "sensor", action, sensor, "-w",
                         str(stack.folder / "workspace.yaml"))
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline and sensor_status(stack, sensor) == [want]:
            time.sleep(0.5)
        seen.append(sensor_status(stack, sensor))
        if seen[-1] == [want]:
            return
    raise AssertionError(f"{sensor} did not stay {want}: {seen}\n{stack.log_tail('daemon')}")


def test_a_new_seed_file_becomes_a_shard_run_and_the_corpus_follows(stack):
    stack.write_seed_file("shard-a", coco_captions(3))
    (run,) = stack.wait_for(lambda: stack.runs(tags={"dagster/sensor_name": SENSOR}), STEP,
                            "the sensor to launch shard-a's run")
    assert stack.instance.get_dynamic_partitions("seed_shards") == ["shard-a"]
    assert run.tags["dagster/partition"] == "shard-a"
    assert run.tags["unicorn/trigger"] == "new_seed_file"
    done = stack.wait_for(lambda: finished(stack, run.run_id), STEP, "shard-a's run")
    assert done.status == dg.DagsterRunStatus.SUCCESS, stack.log_tail("code-server")
    (seeds,) = materializations(stack, SEEDS, "shard-a")
    assert seeds.run_id == run.run_id
    assert seeds.asset_materialization.metadata["dagster/row_count"].value == 3

    # The nightly tick (every minute here) makes the corpus-wide assets from the new shard.
    corpus = stack.wait_for(lambda: made_after(stack, STATISTICS, seeds.timestamp), STEP,
                            "the nightly regeneration to make the corpus-wide statistics")
    corpus_run = stack.instance.get_run_by_id(corpus.run_id)
    assert corpus_run.tags["dagster/sensor_name"] == NIGHTLY
    assert corpus_run.tags["unicorn/trigger"] == "nightly"


def test_a_backfill_of_20_shards_runs_at_most_8_shards_per_run(stack):
    # The sensor would run each new file itself: stopped, as an operator does before a backfill.
    switch(stack, "stop", SENSOR)
    sizes = {f"bf-{i:02d}": 1 + i % 3 for i in range(BACKFILL_SHARDS)}
    offset = 100
    for key, size in sizes.items():
        stack.write_seed_file(key, coco_captions(size, offset=offset))
        offset += size
    submitted = stack.cli("unicorn", "backfill", *[a for k in sizes for a in ("--shard", k)])
    assert submitted.returncode == 0, submitted.stderr
    backfill_id = submitted.stdout.split()[1].rstrip(":")

    def backfill_done():
        backfill = stack.instance.get_backfill(backfill_id)
        return backfill if backfill.status.value != "REQUESTED" else None

    backfill = stack.wait_for(backfill_done, 2 * STEP, f"backfill {backfill_id}")
    runs = stack.runs(tags={"dagster/backfill": backfill_id})
    assert backfill.status.value == "COMPLETED_SUCCESS", \
        [(r.run_id, r.status) for r in runs]
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    # The seeds read up to 32 shards per run; the model stages up to 8 (SHARD_BACKFILL).
    model_runs = [r for r in runs if STAGE1 in (r.asset_selection or set())]
    assert len(model_runs) == math.ceil(BACKFILL_SHARDS / MAX_PER_RUN)
    covered = Counter()
    for run in model_runs:
        first, last = (run.tags["dagster/asset_partition_range_start"],
                       run.tags["dagster/asset_partition_range_end"])
        keys = [k for k in sizes if first <= k <= last]
        assert len(keys) <= MAX_PER_RUN
        covered.update(keys)
    assert covered == Counter(dict.fromkeys(sizes, 1))

    # Each shard's metadata and checks are its own, though 8 shards shared a run.
    for key, size in sizes.items():
        (seeds,) = materializations(stack, SEEDS, key)
        assert seeds.asset_materialization.metadata["dagster/row_count"].value == size
        (stage1,) = materializations(stack, STAGE1, key)
        written = pl.read_parquet(stack.data / "expanded_captions" / f"{key}.parquet")
        assert set(written["shard"]) == {key}
        assert stage1.asset_materialization.metadata["dagster/row_count"].value == written.height
    # A check over a run of several shards judges each shard on its own (metadata by_shard).
    judged: dict[dg.AssetCheckKey, Counter] = {}
    for run in model_runs:
        shards = {k for k in sizes if run.tags["dagster/asset_partition_range_start"] <= k
                  <= run.tags["dagster/asset_partition_range_end"]}
        for record in stack.instance.all_logs(run.run_id,
                                              of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
            evaluation = record.dagster_event.asset_check_evaluation_data
            by_shard = evaluation.metadata["by_shard"].value
            assert set(by_shard) == shards, evaluation
            assert evaluation.passed == all(o["passed"] for o in by_shard.values())
            judged.setdefault(evaluation.asset_check_key, Counter()).update(list(by_shard))
    assert dg.AssetCheckKey(STAGE1, "reject_rate") in judged
    assert all(c == Counter(dict.fromkeys(sizes, 1)) for c in judged.values()), judged

    # The corpus-wide assets, made from shard-a before, are remade with the 20 new shards.
    done_at = max(r.end_time for r in stack.instance.get_run_records(
        dg.RunsFilter(tags={"dagster/backfill": backfill_id})))
    corpus = stack.wait_for(lambda: made_after(stack, STATISTICS, done_at), STEP,
                            "the nightly regeneration to remake the corpus after the backfill")
    assert stack.instance.get_run_by_id(corpus.run_id).tags["dagster/sensor_name"] == NIGHTLY


def test_five_commands_at_once_corrupt_nothing(stack):
    keys = [f"cli-{i}" for i in range(5)]
    for i, key in enumerate(keys):
        stack.write_seed_file(key, coco_captions(2, offset=300 + 2 * i))
    commands = [subprocess.Popen([str(BIN / "unicorn"), "materialize", "--shard", key],
                                 cwd=ROOT, env=stack.env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for key in keys]
    outputs = [c.communicate(timeout=2 * STEP)[0] for c in commands]
    assert [c.returncode for c in commands] == [0] * 5, outputs

    partitions = stack.instance.get_dynamic_partitions("seed_shards")
    assert len(partitions) == len(set(partitions)) and set(keys) <= set(partitions)
    for key in keys:
        # The command's run (the nightly tick may have run the new shard too: also no harm)
        (run,) = [r for r in stack.runs(tags={"dagster/partition": key})
                  if "unicorn/pid" in r.tags]
        assert run.status == dg.DagsterRunStatus.SUCCESS
        types = [r.dagster_event.event_type for r in stack.instance.all_logs(run.run_id)
                 if r.dagster_event is not None]
        assert types.count(dg.DagsterEventType.RUN_START) == 1
        assert types[-1] == dg.DagsterEventType.RUN_SUCCESS
        made = [r for r in stack.instance.all_logs(
            run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)]
        assert {r.dagster_event.partition for r in made} == {key}
        (stage1,) = [r for r in materializations(stack, STAGE1, key) if r.run_id == run.run_id]
        assert stage1.asset_materialization.metadata["dagster/row_count"].value > 0


def engine_pid(stack: DaemonStack, run_id: str) -> int | None:
    """The pid of the run's process, from the code server's "Started process for run" event."""
    for record in stack.instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        message = record.dagster_event.message or ""
        if message.startswith("Started process for run (pid: "):
            return int(message.split("pid: ")[1].split(")")[0])
    return None


def test_a_killed_run_is_failed_and_retried_from_the_cache_and_the_nightly_goes_on(stack):
    key = "killed"
    # The sensor and the nightly tick would run the new shard too: off until the kill is done with.
    switch(stack, "stop", SENSOR)
    switch(stack, "stop", NIGHTLY)
    stack.write_seed_file(key, coco_captions(3, offset=400))
    stack.instance.add_dynamic_partitions("seed_shards", [key])
    # Retried with every step (ALL_STEPS), so that Stage 1 runs again and shows where its
    # answers come from; the instance's run_retries (max_retries 1) does the retrying.
    run_id = str(uuid.uuid4())
    launched = stack.cli("dagster", "job", "launch", "-j", "unicorn_shard_job", "-w",
                         str(stack.folder / "workspace.yaml"), "--run-id", run_id, "--tags",
                         f'{{"dagster/partition": "{key}", "dagster/retry_strategy": "ALL_STEPS"}}')
    assert launched.returncode == 0, launched.stderr
    run = stack.instance.get_run_by_id(run_id)
    assert run is not None and run.tags["dagster/partition"] == key

    # Killed once Stage 1 is written (its answers are in the response cache), before the run ends.
    (stage1,) = stack.wait_for(lambda: materializations(stack, STAGE1, key), STEP,
                               "the run to write Stage 1", poll=0.1)
    assert stage1.run_id == run_id
    pid = engine_pid(stack, run.run_id)
    assert pid and stack.instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    failed = stack.wait_for(lambda: finished(stack, run.run_id), STEP,
                            "the killed run to be marked finished")
    assert failed.status == dg.DagsterRunStatus.FAILURE
    messages = [r.dagster_event.message or "" for r in stack.instance.all_logs(run.run_id)
                if r.dagster_event is not None]
    assert any("terminated by signal 9" in m for m in messages), messages[-5:]

    (retry,) = stack.wait_for(lambda: stack.runs(tags={"dagster/parent_run_id": run.run_id}),
                              STEP, "the retry")
    assert retry.tags["dagster/retry_number"] == "1"
    retried = stack.wait_for(lambda: finished(stack, retry.run_id), STEP, "the retry to finish")
    assert retried.status == dg.DagsterRunStatus.SUCCESS, stack.log_tail("code-server")
    again = next(r for r in materializations(stack, STAGE1, key) if r.run_id == retry.run_id)
    first, second = (r.asset_materialization.metadata for r in (stage1, again))
    assert first["cache_hits"].value == 0 and first["tokens_generated"].value > 0
    # Every Stage 1 answer of the retry came from the cache: the model computed none again.
    assert second["cache_hits"].value == second["llm_requests"].value == first["llm_requests"].value
    assert second["tokens_generated"].value == 0

    # The killed run holds nothing back: the nightly regeneration remakes the corpus after it.
    switch(stack, "start", NIGHTLY)
    corpus = stack.wait_for(lambda: made_after(stack, STATISTICS, killed_at), STEP,
                            "the nightly regeneration after the killed run")
    assert stack.instance.get_run_by_id(corpus.run_id).tags["dagster/sensor_name"] == NIGHTLY


def test_a_registered_shard_never_made_is_made_by_the_nightly_then_the_corpus(stack):
    """A shard registered while the sensor was off (stale: missing) is the nightly's to make."""
    switch(stack, "stop", SENSOR)
    registered_at = time.time()
    stack.write_seed_file(LATE, coco_captions(2, offset=500))
    stack.instance.add_dynamic_partitions("seed_shards", [LATE])
    (stage1,) = stack.wait_for(lambda: materializations(stack, STAGE1, LATE), STEP,
                               f"the nightly regeneration to make {LATE}")
    assert stack.instance.get_run_by_id(stage1.run_id).tags["dagster/sensor_name"] == NIGHTLY
    corpus = stack.wait_for(lambda: made_after(stack, STATISTICS, stage1.timestamp), STEP,
                            f"the nightly regeneration to remake the corpus after {LATE}")
    assert corpus.timestamp > registered_at
    assert stack.instance.get_run_by_id(corpus.run_id).tags["dagster/sensor_name"] == NIGHTLY


def shards_of(stack: DaemonStack, run: dg.DagsterRun) -> set[str]:
    """The shards a run covers: its partition, or its partition range in the shards' order (a
    run of several shards); none for a corpus-wide run."""
    if "dagster/partition" in run.tags:
        return {run.tags["dagster/partition"]}
    first = run.tags.get("dagster/asset_partition_range_start")
    if first is None:
        return set()
    order = stack.instance.get_dynamic_partitions("seed_shards")
    return set(order[order.index(first):
                     order.index(run.tags["dagster/asset_partition_range_end"]) + 1])


def test_the_nightly_regeneration_redoes_only_what_is_stale(stack):
    """By now many nightly ticks (one a minute) have passed over fresh shards (the sensor's, the
    backfill's, the retried one) and a corpus made stale by new shards, which the last case saw
    remade. The nightly redid no fresh shard. It made the late shard, and the only other shards
    it may have run are those of the 5 commands: each command registers every seed file, so a
    shard can sit registered and missing (stale) until its own command starts its run; a tick
    that finds several of them submits a backfill (emit_backfills)."""
    backfills = [b.backfill_id for b in stack.instance.get_backfills()
                 if b.tags.get("dagster/sensor_name") == NIGHTLY]
    runs = {r.run_id: r for r in nightly_runs(stack)}
    runs.update({r.run_id: r for b in backfills for r in stack.runs(tags={"dagster/backfill": b})})
    assert any(STATISTICS in (r.asset_selection or set()) for r in runs.values())
    commands = {f"cli-{i}" for i in range(5)}
    covered = {key for run in runs.values() for key in shards_of(stack, run)}
    assert LATE in covered
    assert covered <= commands | {LATE}, covered
    for key in set(stack.instance.get_dynamic_partitions("seed_shards")) - commands:
        made = materializations(stack, STAGE1, key)
        assert len(made) == (2 if key == "killed" else 1), key  # killed: the run and its retry
        assert bool({r.run_id for r in made} & set(runs)) == (key == LATE), key


def test_the_stack_survived(stack):
    for name, process in stack.processes.items():
        assert process.poll() is None, f"{name} exited:\n{stack.log_tail(name)}"
    assert not [r for r in stack.runs() if r.status == dg.DagsterRunStatus.STARTED
                and r.tags.get("dagster/sensor_name") != NIGHTLY]
    assert Path(stack.home, "dagster.yaml").is_file()
