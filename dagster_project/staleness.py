"""What the nightly schedule regenerates: asset partitions that are missing or stale.

An asset partition is stale when
- its latest materialisation was made under another code version (the code version folds in the
  prompt and model versions, see `recipe_version`), or
- a partition it reads was materialised after it (the seeds of its shard, or a corpus-wide asset
  such as the corpus mean), or
- a partition it reads is itself missing or stale: it follows once that one is regenerated.

Work on a shard is due now when every stale input of it is regenerated in the same run; it waits
when it needs a corpus-wide asset regenerated first, and a corpus-wide asset waits while any
shard it reads is stale or still running, so that no corpus-wide result mixes old and new shards.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg
from dagster._core.definitions.data_version import CODE_VERSION_TAG
from dagster._core.events import DagsterEventType
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
)

from unicorn_assets.logic.prompts import load_prompt_set

MATERIALIZATION = DagsterEventType.ASSET_MATERIALIZATION
IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
             dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


def profile_op_config(profile: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{op name: config} from the profile's `run_config.<job>.ops` (every job's, merged)."""
    out: dict[str, dict[str, Any]] = {}
    for job_config in (profile.get("run_config") or {}).values():
        for op, op_config in ((job_config or {}).get("ops") or {}).items():
            out[op] = {**out.get(op, {}), **((op_config or {}).get("config") or {})}
    return out


def recipe_version(asset: dg.AssetsDefinition, resources: Mapping[str, Any],
                   op_config: Mapping[str, Any] | None = None) -> str:
    """A digest of what an asset's output depends on besides its inputs: its run config (the
    defaults, overridden by the profile's run_config: prompt version, sampling, filters), the
    prompt template's text, the model of every resource it uses that has one (`model_id`:
    LLM, CLIP, SDXL), and the settings held in a resource (`recipe`: Stage 2's)."""
    field = asset.op.config_field
    config = field.default_value if field is not None and field.default_provided else {}
    if isinstance(config, dict):
        config = {**config, **(op_config or {})}
    recipe: dict[str, Any] = {"config": config}
    if isinstance(config, dict) and {"prompt", "prompt_version"} <= set(config):
        recipe["prompt_digest"] = load_prompt_set(config["prompt"], config["prompt_version"]).digest
    recipe["models"] = {key: _model_id(resources[key]) for key in sorted(asset.required_resource_keys)
                        if hasattr(type(resources.get(key)), "model_id")}
    settings = {key: resources[key].recipe for key in sorted(asset.required_resource_keys)
                if hasattr(type(resources.get(key)), "recipe")}
    if settings:  # resources that hold an asset's settings (Stage 2's `stage2`)
        recipe["settings"] = settings
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _model_id(resource: Any) -> str:
    try:
        return resource.model_id
    except Exception as err:  # noqa: BLE001 - e.g. a missing weights file: the run will say so
        return f"{type(resource).__name__}(unresolved: {type(err).__name__})"


def with_recipe_versions(assets: Iterable[Any], resources: Mapping[str, Any],
                         op_configs: Mapping[str, Mapping[str, Any]] | None = None) -> list[Any]:
    """The assets, each spec's code version set to `<declared version>+<recipe digest>`, so that
    a changed prompt, model or setting marks the materialisations made before as stale."""
    out = []
    for asset in assets:
        if not isinstance(asset, dg.AssetsDefinition) or not asset.is_executable:
            out.append(asset)
            continue
        digest = recipe_version(asset, resources, (op_configs or {}).get(asset.op.name))
        out.extend(dg.map_asset_specs(lambda spec, d=digest: spec.replace_attributes(
            code_version=f"{spec.code_version}+{d}" if spec.code_version else d), [asset]))
    return out


@dataclass(frozen=True)
class Stale:
    key: dg.AssetKey
    partition: str | None  # None: a corpus-wide asset
    reason: str
    due: bool  # False: it waits for another regeneration (or a running run) first

    def describe(self) -> str:
        where = f"[{self.partition}]" if self.partition else ""
        return f"{self.key.to_user_string()}{where}: {self.reason}"


class _Latest:
    """Latest materialisation (storage id, code version) per partition, two queries per asset."""

    def __init__(self, instance: dg.DagsterInstance):
        self.instance = instance
        self._partitions: dict[dg.AssetKey, dict[str, tuple[int, str | None]]] = {}
        self._unpartitioned: dict[dg.AssetKey, tuple[int, str | None] | None] = {}

    def partition(self, key: dg.AssetKey, partition: str) -> tuple[int, str | None] | None:
        if key not in self._partitions:
            ids = self.instance.get_latest_storage_id_by_partition(key, MATERIALIZATION)
            records = self.instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=key, storage_ids=list(ids.values())),
                limit=max(len(ids), 1)).records if ids else []
            self._partitions[key] = {
                r.partition_key: (r.storage_id, r.asset_materialization.tags.get(CODE_VERSION_TAG))
                for r in records}
        return self._partitions[key].get(partition)

    def whole(self, key: dg.AssetKey) -> tuple[int, str | None] | None:
        if key not in self._unpartitioned:
            records = self.instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key),
                                                           limit=1).records
            self._unpartitioned[key] = (
                (records[0].storage_id, records[0].asset_materialization.tags.get(CODE_VERSION_TAG))
                if records else None)
        return self._unpartitioned[key]

    def any_after(self, key: dg.AssetKey, storage_id: int) -> bool:
        return bool(self.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, after_storage_id=storage_id), limit=1).records)


def in_flight_partitions(instance: dg.DagsterInstance, order: Sequence[str]) -> set[str | None]:
    """Shards (and None, for runs without one) that a queued or running run is working on."""
    busy: set[str | None] = set()
    for record in instance.get_run_records(dg.RunsFilter(statuses=IN_FLIGHT)):
        tags = record.dagster_run.tags
        if PARTITION_NAME_TAG in tags:
            busy.add(tags[PARTITION_NAME_TAG])
        elif ASSET_PARTITION_RANGE_START_TAG in tags and tags[ASSET_PARTITION_RANGE_START_TAG] in order:
            start = order.index(tags[ASSET_PARTITION_RANGE_START_TAG])
            end = order.index(tags[ASSET_PARTITION_RANGE_END_TAG])
            busy.update(order[start:end + 1])
        else:
            busy.add(None)
    return busy


def find_stale(instance: dg.DagsterInstance, graph: Any, keys: Iterable[dg.AssetKey],
               shards: Sequence[str]) -> list[Stale]:
    """The missing or stale (asset, shard) pairs and corpus-wide assets among `keys`, in
    dependency order. Per-shard assets share one partitioning (one seed file per shard)."""
    selected = set(keys)
    latest = _Latest(instance)
    busy = in_flight_partitions(instance, shards)
    found: dict[tuple[dg.AssetKey, str | None], Stale] = {}
    for key in graph.toposorted_asset_keys:
        if key not in selected:
            continue
        node = graph.get(key)
        # With no shard yet, a corpus-wide asset has nothing to aggregate: it is not due.
        for partition in (shards if node.is_partitioned else [None] if shards else []):
            stale = _check(node, partition, graph, latest, found, busy, shards)
            if stale:
                found[(key, partition)] = stale
    return list(found.values())


def _check(node: Any, partition: str | None, graph: Any, latest: _Latest,
           found: Mapping[tuple[dg.AssetKey, str | None], Stale], busy: set[str | None],
           shards: Sequence[str]) -> Stale | None:
    if partition in busy:
        return None  # a run is on it now; the next tick sees its result
    mine = latest.partition(node.key, partition) if partition else latest.whole(node.key)
    reason = waits_for = None
    if mine is None:
        reason = "missing"
    elif node.code_version and mine[1] != node.code_version:
        reason = f"code version {mine[1]} -> {node.code_version}"
    for parent_key in sorted(node.parent_keys):
        parent = graph.get(parent_key)
        name = parent_key.to_user_string()
        if not parent.is_materializable:
            continue
        if parent.is_partitioned and partition is None:  # a corpus-wide asset over every shard
            stale_shards = [p for p in shards if (parent_key, p) in found]
            if stale_shards or busy - {None}:
                waits_for = waits_for or f"shards of {name} being regenerated"
                reason = reason or f"{name} is stale"
            elif reason is None and latest.any_after(parent_key, mine[0]):
                reason = f"{name} was updated"
            continue
        upstream_partition = partition if parent.is_partitioned else None
        upstream = found.get((parent_key, upstream_partition))
        if upstream is not None:
            reason = reason or f"{name} is stale"
            if not (upstream.due and upstream_partition == partition):  # not in the same run
                waits_for = waits_for or name
        elif reason is None:
            theirs = (latest.partition(parent_key, upstream_partition) if upstream_partition
                      else latest.whole(parent_key))
            if theirs is not None and theirs[0] > mine[0]:
                reason = f"{name} was updated"
    if reason is None:
        return None
    return Stale(node.key, partition, reason if waits_for is None else
                 f"{reason}; waits for {waits_for}", due=waits_for is None)


def run_requests(stale: Sequence[Stale], shards: Sequence[str], max_shards_per_run: int,
                 run_key_prefix: str, tags: Mapping[str, str],
                 run_config: Callable[[Sequence[dg.AssetKey]], dict] = lambda keys: {}
                 ) -> list[dg.RunRequest]:
    """Due work as runs: contiguous shards that need the same assets share a run (a partition
    range, up to `max_shards_per_run`, so models load once per run); corpus-wide assets get one
    run of their own. `run_config(asset keys)` gives each run its config."""
    by_shard: dict[str, set[dg.AssetKey]] = {}
    corpus: set[dg.AssetKey] = set()
    for item in stale:
        if item.due:
            (by_shard.setdefault(item.partition, set()) if item.partition else corpus).add(item.key)
    requests = []
    chunk: list[str] = []
    for shard in [*shards, None]:
        if chunk and (shard is None or by_shard.get(shard) != by_shard[chunk[0]]
                      or len(chunk) == max_shards_per_run):
            requests.append(_shard_request(chunk, by_shard[chunk[0]], run_key_prefix, tags,
                                           run_config))
            chunk = []
        if shard in by_shard:
            chunk.append(shard)
    if corpus:
        selection = sorted(corpus, key=str)
        requests.append(dg.RunRequest(run_key=f"{run_key_prefix}:corpus", tags=dict(tags),
                                      asset_selection=selection, run_config=run_config(selection)))
    return requests


def _shard_request(chunk: list[str], keys: set[dg.AssetKey], prefix: str, tags: Mapping[str, str],
                   run_config: Callable[[Sequence[dg.AssetKey]], dict]) -> dg.RunRequest:
    selection = sorted(keys, key=str)
    run_key = f"{prefix}:{chunk[0]}..{chunk[-1]}"
    if len(chunk) == 1:
        return dg.RunRequest(run_key=run_key, partition_key=chunk[0], asset_selection=selection,
                             tags=dict(tags), run_config=run_config(selection))
    return dg.RunRequest(run_key=run_key, asset_selection=selection, run_config=run_config(selection),
                         tags={**tags, ASSET_PARTITION_RANGE_START_TAG: chunk[0],
                               ASSET_PARTITION_RANGE_END_TAG: chunk[-1]})
