"""The nightly regeneration schedule on a real instance: its ticks are evaluated as the daemon does
(evaluate_tick) and the runs they request are executed, until nothing is stale."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import dagster as dg
import polars as pl
import pytest
from dagster._core.test_utils import create_run_for_test

from dagster_project.automation import AutomationSettings, NightlySettings, build_nightly_schedule
from dagster_project.instance import PID_TAG, fail_dead_runs, run_tags
from dagster_project.staleness import (
    Stale,
    profile_op_config,
    run_requests,
    with_recipe_versions,
)
from tests.support import coco_captions, make_resources, write_jsonl
from unicorn_assets.caption_seeds import read_caption_seeds
from unicorn_assets.expansion import expand_captions
from unicorn_assets.instructions import make_instructions
from unicorn_assets.partitions import SEED_SHARDS
from unicorn_resources.llm import FakeLLM

SEEDS = {dg.AssetKey("caption_seeds"), dg.AssetKey("caption_seed_rejects")}
STAGE1 = {dg.AssetKey("expanded_captions"), dg.AssetKey("expanded_caption_rejects")}
CORPUS = dg.AssetKey("corpus_caption_count")
TICK = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)


@dg.asset(description="test-only corpus-wide asset over every shard's captions")
def corpus_caption_count(expanded_captions: pl.LazyFrame) -> pl.DataFrame:
    return expanded_captions.select(pl.len().alias("captions")).collect()


class OtherFakeLLM(FakeLLM):
    """Another model, as far as the code version can tell."""

    @property
    def model_id(self) -> str:
        return "fake:other"


def nightly_defs(resources: dict) -> dg.Definitions:
    return dg.Definitions(
        assets=with_recipe_versions([read_caption_seeds, expand_captions, corpus_caption_count],
                                    resources),
        schedules=[build_nightly_schedule(NightlySettings(selection="*"))],
        resources=resources, executor=dg.in_process_executor)


def evaluate(defs: dg.Definitions, instance: dg.DagsterInstance):
    schedule = defs.get_schedule_def("nightly_regeneration")
    with dg.build_schedule_context(instance=instance, scheduled_execution_time=TICK,
                                   repository_def=defs.get_repository_def()) as context:
        return schedule.evaluate_tick(context)


def execute(defs: dg.Definitions, instance: dg.DagsterInstance, request: dg.RunRequest) -> None:
    job = defs.get_repository_def().get_job(defs.get_schedule_def("nightly_regeneration").job_name)
    result = job.execute_in_process(instance=instance, partition_key=request.partition_key,
                                    asset_selection=request.asset_selection, tags=request.tags,
                                    run_config=request.run_config)
    assert result.success


def regenerate(defs: dg.Definitions, instance: dg.DagsterInstance) -> list[list[dg.RunRequest]]:
    """Tick and run until a tick finds nothing to do; the requests of every tick."""
    ticks = []
    for _ in range(5):
        data = evaluate(defs, instance)
        if not data.run_requests:
            assert "nothing stale" in data.skip_message
            return ticks
        ticks.append(data.run_requests)
        for request in data.run_requests:
            execute(defs, instance, request)
    raise AssertionError("regeneration did not settle")


def shards_of(request: dg.RunRequest) -> tuple[str, ...]:
    if request.partition_key:
        return (request.partition_key,)
    return (request.tags["dagster/asset_partition_range_start"],
            request.tags["dagster/asset_partition_range_end"])


@pytest.fixture
def fresh(instance, seed_dir, tmp_path):
    """Two shards regenerated from nothing: (defs, resources, ticks)."""
    instance.add_dynamic_partitions(SEED_SHARDS, ["shard-a", "shard-b"])
    resources = make_resources(tmp_path / "data", seed_dir, llm=FakeLLM())
    defs = nightly_defs(resources)
    return defs, resources, regenerate(defs, instance)


def test_missing_shards_first_then_the_corpus_then_nothing(fresh, instance, tmp_path):
    _, _, ticks = fresh
    (shard_run,), (corpus_run,) = ticks
    # Both shards share one run (a partition range), every per-shard asset in it.
    assert shards_of(shard_run) == ("shard-a", "shard-b")
    assert set(shard_run.asset_selection) == SEEDS | STAGE1
    assert shard_run.tags["unicorn/trigger"] == "nightly"
    # The corpus-wide asset waited for its shards, then came alone.
    assert corpus_run.asset_selection == [CORPUS] and corpus_run.partition_key is None
    count = pl.read_parquet(tmp_path / "data" / "corpus_caption_count.parquet")["captions"][0]
    captions = sum(pl.read_parquet(tmp_path / "data" / "expanded_captions" / f"{k}.parquet").height
                   for k in ("shard-a", "shard-b"))
    assert count == captions > 0


def test_a_changed_model_regenerates_its_assets_and_what_follows(fresh, instance, seed_dir,
                                                                 tmp_path):
    _, resources, _ = fresh
    defs = nightly_defs({**resources, "llm": OtherFakeLLM(cache_path=resources["llm"].cache_path)})
    data = evaluate(defs, instance)
    (request,) = data.run_requests
    assert set(request.asset_selection) == STAGE1  # the seeds are fresh
    assert shards_of(request) == ("shard-a", "shard-b")
    (_,), (corpus_run,) = regenerate(defs, instance)
    assert corpus_run.asset_selection == [CORPUS]
    written = pl.read_parquet(tmp_path / "data" / "expanded_captions" / "shard-a.parquet")
    assert set(written["model_id"]) == {"fake:other"}


def test_new_seed_content_makes_only_its_shard_stale(fresh, instance, seed_dir):
    defs, _, _ = fresh
    job = defs.get_repository_def().get_job(defs.get_schedule_def("nightly_regeneration").job_name)
    job.execute_in_process(instance=instance, partition_key="shard-b",
                           asset_selection=sorted(SEEDS, key=str))
    data = evaluate(defs, instance)
    (request,) = data.run_requests
    assert request.partition_key == "shard-b" and set(request.asset_selection) == STAGE1
    ticks = regenerate(defs, instance)
    assert [r.asset_selection for r in ticks[-1]] == [[CORPUS]]


def test_shards_with_a_run_in_flight_are_left_alone(fresh, instance):
    defs, _, _ = fresh
    instance.add_dynamic_partitions(SEED_SHARDS, ["shard-c"])
    run = create_run_for_test(instance, job_name="unicorn_shard_job", tags={
        "dagster/partition": "shard-c"}, status=dg.DagsterRunStatus.STARTED)
    assert run.status == dg.DagsterRunStatus.STARTED
    data = evaluate(defs, instance)
    assert data.run_requests == []
    assert "waiting" in data.skip_message  # the corpus waits for shard-c


def test_a_corpus_run_whose_process_died_stops_holding_back_the_schedule(fresh, instance):
    """A `unicorn` command killed mid-run leaves its run STARTED: the corpus waits for it for
    ever, until the next command marks the run failed; then the corpus is requested again."""
    defs, _, _ = fresh
    job = defs.get_repository_def().get_job(defs.get_schedule_def("nightly_regeneration").job_name)
    job.execute_in_process(instance=instance, partition_key="shard-b",
                           asset_selection=sorted(STAGE1, key=str))  # the corpus is stale now
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    killed = create_run_for_test(instance, job_name="unicorn_corpus_job",
                                 status=dg.DagsterRunStatus.STARTED,
                                 tags={**run_tags(), PID_TAG: str(gone.pid)})
    assert evaluate(defs, instance).run_requests == []  # the "running" corpus run holds it back

    assert [run.run_id for run, _ in fail_dead_runs(instance)] == [killed.run_id]
    (request,) = evaluate(defs, instance).run_requests
    assert request.asset_selection == [CORPUS]


def test_due_work_is_grouped_into_contiguous_runs():
    a, b = dg.AssetKey("a"), dg.AssetKey("b")
    shards = ["s1", "s2", "s3", "s4", "s5", "s6"]
    stale = [Stale(a, s, "missing", True) for s in ("s1", "s2", "s3", "s5", "s6")]
    stale += [Stale(b, "s3", "missing", True), Stale(b, "s4", "missing", False),
              Stale(b, None, "missing", True), Stale(a, None, "waits", False)]
    requests = run_requests(stale, shards, max_shards_per_run=2, run_key_prefix="t", tags={})
    # s1..s2 (a); s3 alone (a and b); s4 is not due; s5..s6 (a); then the corpus-wide b.
    assert [shards_of(r) if r.partition_key or r.tags else None for r in requests] == [
        ("s1", "s2"), ("s3",), ("s5", "s6"), None]
    assert [set(r.asset_selection) for r in requests] == [{a}, {a, b}, {a}, {b}]
    assert len({r.run_key for r in requests}) == 4


def test_cron_and_time_zone_come_from_the_profile():
    settings = AutomationSettings.from_profile({"automation": {"nightly": {
        "cron": "30 3 * * 1-5", "timezone": "Europe/Berlin", "running": True}}})
    schedule = build_nightly_schedule(settings.nightly)
    assert schedule.cron_schedule == "30 3 * * 1-5"
    assert schedule.execution_timezone == "Europe/Berlin"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    with pytest.raises(ValueError, match="not an IANA time zone"):
        AutomationSettings.from_profile({"automation": {"nightly": {"timezone": "Mars/Olympus"}}})
    with pytest.raises(Exception, match="cron"):
        build_nightly_schedule(NightlySettings(cron="every night"))


def test_the_shipped_definitions_show_the_sensor_and_schedule():
    from dagster_project.definitions import defs

    schedule = defs.get_schedule_def("nightly_regeneration")
    assert schedule.cron_schedule and schedule.execution_timezone
    assert defs.get_sensor_def("new_seed_shards").job_name == "unicorn_shard_job"
    graph = defs.resolve_asset_graph()
    versions = {graph.get(k).code_version for k in graph.get_all_asset_keys()}
    assert None not in versions  # every asset carries its recipe version


def test_the_profile_run_config_goes_into_the_version_and_the_runs(instance, seed_dir, tmp_path):
    resources = make_resources(tmp_path / "data", seed_dir, llm=FakeLLM())
    profile = {"run_config": {"unicorn_shard_job": {"ops": {
        "expand_captions": {"config": {"expansions_per_seed": 1}}}}}}
    op_configs = profile_op_config(profile)
    assert op_configs == {"expand_captions": {"expansions_per_seed": 1}}

    def version(configs):
        (asset,) = [a for a in with_recipe_versions([expand_captions], resources, configs)]
        return asset.specs_by_key[dg.AssetKey("expanded_captions")].code_version

    assert version(op_configs) != version(None)
    defs = dg.Definitions(
        assets=with_recipe_versions([read_caption_seeds, expand_captions], resources, op_configs),
        schedules=[build_nightly_schedule(NightlySettings(selection="*"), op_configs)],
        resources=resources, executor=dg.in_process_executor)
    instance.add_dynamic_partitions(SEED_SHARDS, ["shard-a"])
    (request,) = evaluate(defs, instance).run_requests
    assert request.run_config == {"ops": {"expand_captions": {"config": {"expansions_per_seed": 1}}}}
    execute(defs, instance, request)
    captions = pl.read_parquet(tmp_path / "data" / "expanded_captions" / "shard-a.parquet")
    seeds = pl.read_parquet(tmp_path / "data" / "caption_seeds" / "shard-a.parquet")
    assert 0 < captions.height <= seeds.height  # one expansion per seed, before filtering


def test_the_profiles_stage2_settings_go_into_the_instructions_version(tmp_path, seed_dir):
    def versions(stage2: dict) -> dict[str, str]:
        resources = make_resources(tmp_path / "data", seed_dir, llm=FakeLLM(), stage2=stage2)
        assets = with_recipe_versions([expand_captions, make_instructions], resources)
        return {key.to_user_string(): spec.code_version
                for asset in assets for key, spec in asset.specs_by_key.items()}

    paper, demo = versions({}), versions({"qa_pairs_min": 2, "qa_pairs_max": 2})
    assert paper["instructions"] != demo["instructions"]
    assert paper["expanded_captions"] == demo["expanded_captions"]
    assert versions({"qa_pairs_min": 2, "qa_pairs_max": 2}) == demo


def test_a_bad_shard_of_a_run_leaves_the_healthy_ones_due_for_stage1_only(instance, tmp_path):
    keys = ["shard-a", "shard-b", "shard-c", "shard-d"]
    folder = tmp_path / "seeds"
    for i, key in enumerate(keys):
        write_jsonl(folder / f"{key}.jsonl", coco_captions(3, offset=3 * i))
    with open(folder / "shard-c.jsonl", "ab") as handle:
        handle.write(b"{broken\n")
    instance.add_dynamic_partitions(SEED_SHARDS, keys)
    resources = make_resources(tmp_path / "data", folder, llm=FakeLLM(),
                               seeds={"on_bad_line": "fail"})
    defs = nightly_defs(resources)
    job = defs.get_repository_def().get_job(defs.get_schedule_def("nightly_regeneration").job_name)

    (request,) = evaluate(defs, instance).run_requests
    assert shards_of(request) == ("shard-a", "shard-d")
    result = job.execute_in_process(instance=instance, asset_selection=request.asset_selection,
                                    tags=request.tags, raise_on_error=False)
    assert not result.success  # shard-c fails its run; Stage 1 did not run for anyone
    assert not (tmp_path / "data" / "expanded_captions").exists()

    # the healthy shards' seeds were kept, fresh: the next tick asks only for their Stage 1,
    # in runs without shard-c, which is asked for again from its seeds
    requests = evaluate(defs, instance).run_requests
    by_shards = {shards_of(r): set(r.asset_selection) for r in requests}
    assert by_shards == {("shard-a", "shard-b"): STAGE1, ("shard-c",): SEEDS | STAGE1,
                         ("shard-d",): STAGE1}
    for healthy in (r for r in requests if set(r.asset_selection) == STAGE1):
        execute(defs, instance, healthy)
    written = sorted(p.stem for p in (tmp_path / "data" / "expanded_captions").glob("*.parquet"))
    assert written == ["shard-a", "shard-b", "shard-d"]
