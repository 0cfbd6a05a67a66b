"""Automation: the new-shard sensor, the nightly regeneration schedule, and the executor.

Settings come from the profile's `automation:` and `execution:` sections (see profiles/*.yaml).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import dagster as dg
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dagster_project.staleness import find_stale, run_requests
from unicorn_assets.partitions import SEED_SHARDS, SHARD_BACKFILL
from unicorn_resources.keys import claim_keys, discover_shards
from unicorn_resources.seed_source import SeedSource

SEED_ASSET = dg.AssetKey("caption_seeds")
SEED_REJECTS_ASSET = dg.AssetKey("caption_seed_rejects")


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SensorSettings(_Settings):
    running: bool = False  # on when the code location loads; else switch it on in the UI
    minimum_interval_seconds: int = Field(30, ge=1, le=86400)
    # new or changed shards requested per tick; the rest wait
    max_shards_per_tick: int = Field(16, ge=1, le=10000)


class NightlySettings(_Settings):
    running: bool = False
    cron: str = "0 2 * * *"
    timezone: str = "UTC"
    # A Dagster asset-selection string; SynthVLM is off the nightly run.
    selection: str = 'not group:"synthvlm"'

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as err:
            raise ValueError(f"automation.nightly.timezone {value!r} is not an IANA time zone "
                             "(e.g. UTC, Europe/Berlin)") from err
        return value


class AutomationSettings(_Settings):
    new_shard_sensor: SensorSettings = SensorSettings()
    nightly: NightlySettings = NightlySettings()
    # in_process: every step of a run in the run's one process, so no process forks after CUDA is
    # initialised and a model is loaded once per run. k8s_job: each step in its own pod
    # (dagster-k8s), GPU steps on GPU nodes through their `dagster-k8s/config` op tags.
    executor: Literal["in_process", "k8s_job"] = "in_process"
    k8s_job_executor: dict[str, Any] = {}  # config of dagster_k8s.k8s_job_executor

    @classmethod
    def from_profile(cls, profile: dict[str, Any]) -> AutomationSettings:
        return cls.model_validate(profile.get("automation") or {})

    def executor_def(self) -> dg.ExecutorDefinition:
        if self.executor == "k8s_job":
            from dagster_k8s import k8s_job_executor

            return k8s_job_executor.configured(self.k8s_job_executor, name="k8s_job_executor")
        return dg.in_process_executor


# --- the new-shard sensor -------------------------------------------------------------------------

def scan_seed_location(seeds: SeedSource, known: dict[str, dict[str, str]]
                       ) -> tuple[dict[str, dict[str, str]], list[str], set[str]]:
    """{shard key: fingerprint} of the seed files now at the location, the entries that cannot
    be shards (folder, link, bad name, key claimed by several files, empty) with the fix for
    each, and the keys claimed by several files (on hold until all but one are renamed)."""
    listed, skipped = seeds.scan()
    entries = {e["name"]: e for e in listed}
    shards, problems = discover_shards(list(entries))
    problems = skipped + problems
    held = {key for key, files in claim_keys(list(entries))[0].items() if len(files) > 1}
    found = {}
    for key, name in shards.items():
        if entries[name]["size"] == 0:
            problems.append(f"{name}: the file is empty; it becomes shard {key!r} once it has "
                            "seed records")
            continue
        found[key] = seeds.fingerprint(entries[name], known.get(key))
    return found, problems, held


def build_new_shard_sensor(job: dg.UnresolvedAssetJobDefinition,
                           settings: SensorSettings) -> dg.SensorDefinition:
    @dg.sensor(
        name="new_seed_shards", job=job, minimum_interval_seconds=settings.minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING if settings.running
        else dg.DefaultSensorStatus.STOPPED,
        description="Watches the seed location: a new seed file becomes a shard (dynamic "
        f"partition) and a run of {job.name}; a changed file (new content hash) is run again. "
        f"At most {settings.max_shards_per_tick} shards per tick; invalid files are reported "
        "and skipped.")
    def new_seed_shards(context: dg.SensorEvaluationContext, seeds: SeedSource) -> dg.SensorResult:
        cursor = json.loads(context.cursor) if context.cursor else {"files": {}, "problems": []}
        known: dict[str, dict[str, str]] = cursor["files"]
        found, problems, held = scan_seed_location(seeds, known)
        for problem in problems:
            context.log.warning(f"skipped: {problem}")

        registered = set(context.instance.get_dynamic_partitions(SEED_SHARDS))
        materialised = context.instance.get_materialized_partitions(SEED_ASSET)
        todo: list[tuple[str, str]] = []  # (key, why)
        # a held key keeps its fingerprint: once the clash is resolved, unchanged content reruns nothing
        files = {k: v for k, v in known.items() if k in found or k in held}
        for key, fingerprint in sorted(found.items()):
            if key not in known:
                if key in registered and key in materialised:
                    files[key] = fingerprint  # made before the sensor watched; nightly covers it
                else:
                    todo.append((key, "new"))
            elif known[key]["hash"] != fingerprint["hash"]:
                todo.append((key, "changed"))
            else:
                files[key] = fingerprint  # same content (maybe a new mtime)
        now, later = todo[:settings.max_shards_per_tick], todo[settings.max_shards_per_tick:]
        for key, _ in now:
            files[key] = found[key]
        if later:
            context.log.info(f"{len(later)} more shard(s) wait for the next tick (cap "
                             f"max_shards_per_tick={settings.max_shards_per_tick})")
        removed = sorted(set(known) - set(found) - held)
        if removed:
            context.log.info(f"seed file(s) gone: {', '.join(removed)}; their partitions and data "
                             "stay until deleted by hand")

        new_keys = [key for key, _ in now if key not in registered]
        events = []
        if sorted(problems) != cursor["problems"]:
            events.append(dg.AssetObservation(asset_key=SEED_REJECTS_ASSET, metadata={
                "invalid_seed_files": dg.MetadataValue.json(sorted(problems)),
                "invalid_seed_file_count": len(problems)}))
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(run_key=f"{key}@{found[key]['hash']}", partition_key=key,
                              tags={"unicorn/trigger": f"{why}_seed_file"})
                for key, why in now],
            dynamic_partitions_requests=[dg.AddDynamicPartitionsRequest(
                partitions_def_name=SEED_SHARDS, partition_keys=new_keys)] if new_keys else [],
            asset_events=events,
            cursor=json.dumps({"files": files, "problems": sorted(problems)}, sort_keys=True),
            skip_reason=None if now else f"no new or changed seed files ({len(found)} known)",
        )

    return new_seed_shards


# --- the nightly schedule ---------------------------------------------------------------------------

def build_nightly_schedule(settings: NightlySettings,
                           op_configs: Mapping[str, Mapping[str, Any]] | None = None
                           ) -> dg.ScheduleDefinition:
    """`op_configs` ({op name: config}, the profile's run_config) goes with the runs it asks for,
    as it does with runs of the jobs."""
    with warnings.catch_warnings():  # the string parser passes a beta parameter of Dagster's own
        warnings.simplefilter("ignore", dg.BetaWarning)
        selection = dg.AssetSelection.from_string(settings.selection)

    @dg.schedule(
        name="nightly_regeneration", cron_schedule=settings.cron,
        execution_timezone=settings.timezone, target=selection,
        default_status=dg.DefaultScheduleStatus.RUNNING if settings.running
        else dg.DefaultScheduleStatus.STOPPED,
        description="Regenerates what is missing or stale (new shards, changed prompts or models, "
        "a changed corpus mean): contiguous shards share a run; corpus-wide assets follow once "
        f"their shards are fresh. Selection: {settings.selection}")
    def nightly_regeneration(context: dg.ScheduleEvaluationContext):
        return plan_nightly(context.instance, context.repository_def.asset_graph, selection,
                            context.scheduled_execution_time, context.log, op_configs or {})

    return nightly_regeneration


def plan_nightly(instance: dg.DagsterInstance, graph: Any, selection: dg.AssetSelection,
                 tick: datetime | None, log: Any, op_configs: Mapping[str, Mapping[str, Any]]
                 ) -> list[dg.RunRequest] | dg.SkipReason:
    shards = list(instance.get_dynamic_partitions(SEED_SHARDS))
    stale = find_stale(instance, graph, selection.resolve(graph), shards)
    for item in stale:
        log.info(item.describe())

    def run_config(keys: Sequence[dg.AssetKey]) -> dict:
        ops = {graph.get(key).assets_def.op.name for key in keys}
        return {"ops": {op: {"config": dict(op_configs[op])} for op in sorted(ops)
                        if op in op_configs}}

    requests = run_requests(stale, shards, SHARD_BACKFILL.max_partitions_per_run,
                            f"nightly:{tick.isoformat() if tick else 'manual'}",
                            {"unicorn/trigger": "nightly"}, run_config)
    return requests or dg.SkipReason(
        f"nothing stale over {len(shards)} shard(s)" if not stale
        else f"{len(stale)} stale, all waiting for running or earlier regenerations")
