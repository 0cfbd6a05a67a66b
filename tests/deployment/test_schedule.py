"""Nightly regeneration as Dagster automation conditions, on a real instance: each tick is evaluated
with the public `dg.evaluate_automation_conditions` (the cursor carried from tick to tick, as the
daemon's sensor does), and what it requests is materialised, until nothing is requested."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from dagster_project.automation import (
    NIGHTLY_SENSOR,
    AutomationSettings,
    NightlySettings,
    with_nightly_conditions,
)
from dagster_project.code_versions import profile_op_config, with_recipe_versions
from dagster_project.instance import fail_dead_runs, run_tags
from tests.support import ROOT, coco_captions, make_resources, write_jsonl
from unicorn_assets.caption_seeds import read_caption_seeds
from unicorn_assets.expansion import expand_captions
from unicorn_assets.instructions import make_instructions
from unicorn_assets.partitions import SEED_SHARDS
from unicorn_resources.llm import FakeLLM

SEEDS = {dg.AssetKey("caption_seeds"), dg.AssetKey("caption_seed_rejects")}
STAGE1 = {dg.AssetKey("expanded_captions"), dg.AssetKey("expanded_caption_rejects")}
CORPUS = dg.AssetKey("corpus_caption_count")
HOURLY = NightlySettings(cron="0 * * * *", selection="*")  # a "night" every hour keeps tests short


@dg.asset(description="test-only corpus-wide asset over every shard's captions")
def corpus_caption_count(expanded_captions: pl.LazyFrame) -> pl.DataFrame:
    return expanded_captions.select(pl.len().alias("captions")).collect()


class OtherFakeLLM(FakeLLM):
    """Another model, as far as the code version can tell."""

    @property
    def model_id(self) -> str:
        return "fake:other"


class HangingLLM(FakeLLM):
    """An LLM whose setup never ends: a run that uses it stays STARTED until its process dies."""

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        time.sleep(3600)


def nightly_defs(resources: dict, settings: NightlySettings = HOURLY) -> dg.Definitions:
    assets = with_recipe_versions([read_caption_seeds, expand_captions, corpus_caption_count],
                                  resources)
    return dg.Definitions(assets=with_nightly_conditions(assets, settings),
                          jobs=[dg.define_asset_job("everything", selection="*")],
                          resources=resources, executor=dg.in_process_executor)


class Nightly:
    """Evaluates the conditions at times it chooses, carrying the cursor."""

    def __init__(self, instance: dg.DagsterInstance):
        self.instance = instance
        self.cursor = None
        self.now = datetime.now(UTC)

    def evaluate(self, defs: dg.Definitions, at_tick: bool = True
                 ) -> dict[str | None, set[dg.AssetKey]]:
        """{shard (None: corpus-wide): requested assets}, at the next hourly tick (just after
        it), or a few minutes later without a tick passing."""
        self.now = (self.now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1, minutes=1)
                    if at_tick else self.now + timedelta(minutes=5))
        result = dg.evaluate_automation_conditions(defs=defs, instance=self.instance,
                                                   cursor=self.cursor, evaluation_time=self.now)
        self.cursor = result.cursor
        requested: dict[str | None, set[dg.AssetKey]] = defaultdict(set)
        for key in STAGE1 | SEEDS | {CORPUS}:
            for partition in result.get_requested_partitions(key):
                requested[partition].add(key)
        return dict(requested)

    def execute(self, defs: dg.Definitions, requested: dict[str | None, set[dg.AssetKey]]) -> None:
        job = defs.resolve_job_def("everything")
        for partition, keys in requested.items():
            assert job.execute_in_process(instance=self.instance, partition_key=partition,
                                          asset_selection=sorted(keys, key=str)).success

    def regenerate(self, defs: dg.Definitions) -> list[dict[str | None, set[dg.AssetKey]]]:
        """Tick, run what is requested, tick again, until a tick requests nothing."""
        ticks = []
        for _ in range(5):
            requested = self.evaluate(defs)
            if not requested:
                return ticks
            ticks.append(requested)
            self.execute(defs, requested)
        raise AssertionError(f"regeneration did not settle: {ticks}")


@pytest.fixture
def fresh(instance, seed_dir, tmp_path):
    """Two shards regenerated from nothing: (nightly, defs, resources, ticks)."""
    instance.add_dynamic_partitions(SEED_SHARDS, ["shard-a", "shard-b"])
    resources = make_resources(tmp_path / "data", seed_dir, llm=FakeLLM())
    defs = nightly_defs(resources)
    nightly = Nightly(instance)
    assert nightly.evaluate(defs, at_tick=False) == {}  # first look: no tick passed yet
    return nightly, defs, resources, nightly.regenerate(defs)


def test_new_shards_first_then_the_corpus_then_nothing(fresh, tmp_path):
    nightly, defs, _, ticks = fresh
    shards, corpus = ticks
    # Every asset of both new shards at the tick; the corpus-wide asset waits for them.
    assert shards == {"shard-a": SEEDS | STAGE1, "shard-b": SEEDS | STAGE1}
    assert corpus == {None: {CORPUS}}
    count = pl.read_parquet(tmp_path / "data" / "corpus_caption_count.parquet")["captions"][0]
    captions = sum(pl.read_parquet(tmp_path / "data" / "expanded_captions" / f"{k}.parquet").height
                   for k in ("shard-a", "shard-b"))
    assert count == captions > 0
    # A fresh state requests nothing, on later ticks too.
    assert nightly.evaluate(defs) == {} and nightly.evaluate(defs) == {}


def test_a_new_shard_is_requested_at_the_next_tick_only(fresh, instance):
    nightly, defs, _, _ = fresh
    instance.add_dynamic_partitions(SEED_SHARDS, ["shard-c"])
    assert nightly.evaluate(defs, at_tick=False) == {}  # regeneration waits for the tick
    assert nightly.evaluate(defs) == {"shard-c": SEEDS | STAGE1}  # not the corpus yet


def test_a_changed_model_marks_every_shard_and_the_corpus_follows(fresh, tmp_path):
    nightly, _, resources, _ = fresh
    defs = nightly_defs({**resources, "llm": OtherFakeLLM(cache_path=resources["llm"].cache_path)})
    assert nightly.evaluate(defs, at_tick=False) == {}  # the new code version is seen; no tick
    shards, corpus = nightly.regenerate(defs)
    assert shards == {"shard-a": STAGE1, "shard-b": STAGE1}  # the seeds are fresh
    assert corpus == {None: {CORPUS}}
    written = pl.read_parquet(tmp_path / "data" / "expanded_captions" / "shard-a.parquet")
    assert set(written["model_id"]) == {"fake:other"}


def test_new_seed_content_makes_only_its_shard_outdated(fresh, instance):
    nightly, defs, _, _ = fresh
    nightly.execute(defs, {"shard-b": SEEDS})  # e.g. a seed file run again by hand
    shards, corpus = nightly.regenerate(defs)
    assert shards == {"shard-b": STAGE1}
    assert corpus == {None: {CORPUS}}


def test_the_corpus_waits_for_an_outdated_shard(fresh, instance):
    nightly, defs, _, _ = fresh
    nightly.execute(defs, {"shard-b": STAGE1})  # the corpus is outdated now ...
    nightly.execute(defs, {"shard-a": SEEDS})  # ... but shard-a's Stage 1 is outdated too
    assert nightly.evaluate(defs) == {"shard-a": STAGE1}
    nightly.execute(defs, {"shard-a": STAGE1})
    assert nightly.evaluate(defs, at_tick=False) == {None: {CORPUS}}  # the same night


def hang_in_a_shard_run(home: str, data: str, seeds: str, shard: str) -> None:
    """In a child process: a run of `shard` on the instance at `home` that never finishes."""
    resources = make_resources(Path(data), seeds, llm=HangingLLM())
    job = nightly_defs(resources).resolve_job_def("everything")
    with dg.DagsterInstance.from_config(home) as instance:
        job.execute_in_process(instance=instance, partition_key=shard, tags=run_tags(),
                               asset_selection=sorted(SEEDS | STAGE1, key=str))


def test_a_shard_run_in_progress_holds_back_the_corpus_until_its_dead_process_is_failed(
        fresh, instance, seed_dir, tmp_path):
    """A shard's run in progress holds back the corpus-wide asset. A `unicorn` command killed
    mid-run leaves its run STARTED, holding it back for ever, until the next command marks the
    run failed; then the shard is requested again, and the corpus after it."""
    nightly, defs, _, _ = fresh
    write_jsonl(seed_dir / "shard-c.jsonl", coco_captions(4, offset=8))
    instance.add_dynamic_partitions(SEED_SHARDS, ["shard-c"])
    child = subprocess.Popen(
        [sys.executable, "-c", ("import sys; from tests.deployment.test_schedule import "
         "hang_in_a_shard_run as hang; hang(*sys.argv[1:])"), instance.root_directory,
         str(tmp_path / "data"), str(seed_dir), "shard-c"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        while not (running := instance.get_runs(dg.RunsFilter(
                statuses=[dg.DagsterRunStatus.STARTED]))):
            assert child.poll() is None, "the run's process ended early"
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.5)
        assert nightly.evaluate(defs) == {}  # shard-c is running: neither it nor the corpus
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert nightly.evaluate(defs) == {}  # the dead run still reads as running
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    assert [run.run_id for run, _ in fail_dead_runs(instance)] == [running[0].run_id]
    assert nightly.evaluate(defs, at_tick=False) == {"shard-c": SEEDS | STAGE1}
    nightly.execute(defs, {"shard-c": SEEDS | STAGE1})
    assert nightly.evaluate(defs, at_tick=False) == {None: {CORPUS}}


def test_only_the_selection_gets_the_nightly_condition(tmp_path, seed_dir):
    resources = make_resources(tmp_path / "data", seed_dir, llm=FakeLLM())
    defs = nightly_defs(resources, NightlySettings(selection='key:"caption_seed*"'))
    graph = defs.resolve_asset_graph()
    conditions = {key.to_user_string(): graph.get(key).automation_condition
                  for key in graph.get_all_asset_keys()}
    assert conditions["caption_seeds"] is not None
    assert conditions["expanded_captions"] is None and conditions["corpus_caption_count"] is None


def test_cron_time_zone_and_status_come_from_the_profile():
    from dagster_project.automation import build_nightly_sensor

    settings = AutomationSettings.from_profile({"automation": {"nightly": {
        "cron": "30 3 * * 1-5", "timezone": "Europe/Berlin", "running": True}}})
    sensor = build_nightly_sensor(settings.nightly)
    assert sensor.name == NIGHTLY_SENSOR and sensor.default_status == dg.DefaultSensorStatus.RUNNING
    (asset,) = with_nightly_conditions([read_caption_seeds], settings.nightly)
    condition = asset.automation_conditions_by_key[dg.AssetKey("caption_seeds")]
    assert "(30 3 * * 1-5, Europe/Berlin)" in condition.children[0].get_label()
    with pytest.raises(ValueError, match="not an IANA time zone"):
        AutomationSettings.from_profile({"automation": {"nightly": {"timezone": "Mars/Olympus"}}})
    with pytest.raises(ValueError, match="automation.nightly.cron 'every night' is not a cron"):
        AutomationSettings.from_profile({"automation": {"nightly": {"cron": "every night"}}})


def test_the_shipped_definitions_show_both_sensors():
    from dagster_project.definitions import defs

    sensors = {s.name: s for s in defs.sensors}
    assert isinstance(sensors[NIGHTLY_SENSOR], dg.AutomationConditionSensorDefinition)
    assert sensors["new_seed_shards"].job_name == "unicorn_shard_job"
    graph = defs.resolve_asset_graph()
    nodes = [graph.get(k) for k in graph.get_all_asset_keys()]
    assert None not in {n.code_version for n in nodes}  # every asset carries its recipe version
    nightly = {n.key.to_user_string() for n in nodes if n.automation_condition is not None}
    assert {"caption_seeds", "expanded_captions", "modality_statistics",
            "pretrain_dataset"} <= nightly
    assert not {k for k in nightly if k.startswith("synthvlm")}  # off the nightly selection


def test_the_profile_run_config_goes_into_the_version(seed_dir, tmp_path):
    resources = make_resources(tmp_path / "data", seed_dir, llm=FakeLLM())
    profile = {"run_config": {"unicorn_shard_job": {"ops": {
        "expand_captions": {"config": {"max_tokens": 200}}}}}}  # the default is 384
    op_configs = profile_op_config(profile)
    assert op_configs == {"expand_captions": {"max_tokens": 200}}

    def version(configs):
        (asset,) = [a for a in with_recipe_versions([expand_captions], resources, configs)]
        return asset.specs_by_key[dg.AssetKey("expanded_captions")].code_version

    assert version(op_configs) != version(None)


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
