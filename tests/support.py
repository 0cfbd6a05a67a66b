"""Plain helpers shared by the tests (fixtures are in conftest.py): real COCO captions from
../shared/data, seed files, the local profile's resources pointed at test folders, one-run
materialisation of a shard, and the new-shard sensor with one tick of it. The benchmarks read
their captions through this module too."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import polars as pl
import pytest
from PIL import Image

from dagster_project.automation import SensorSettings, build_new_shard_sensor
from dagster_project.definitions import ASSET_CHECKS, ASSETS
from dagster_project.jobs import unicorn_corpus_job, unicorn_shard_job
from dagster_project.profiles import build_resources
from unicorn_assets.caption_seeds import read_caption_seeds
from unicorn_assets.expansion import expand_captions
from unicorn_assets.partitions import SEED_SHARDS
from unicorn_resources.diffusion import DiffusionResource
from unicorn_resources.llm import FakeLLM, LLMResource

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
COCO_PAIRS = SHARED_DATA / "coco_mini_val2017" / "pairs.jsonl"
COCO_CAPTIONS = SHARED_DATA / "coco_val2017_captions_dev.jsonl"


def read_coco_captions(n: int, offset: int = 0, one_per_image: bool = False
                       ) -> list[dict[str, Any]]:
    """Real COCO captions (CC BY 4.0) from ../shared/data: `n` of them after skipping `offset`."""
    if not COCO_CAPTIONS.exists():
        raise FileNotFoundError(f"{COCO_CAPTIONS} is missing: the tests and benchmarks seed from "
                                "real COCO captions in ../shared/data")
    rows, images = [], set()
    with COCO_CAPTIONS.open() as handle:
        for line in handle:
            rec = json.loads(line)
            if one_per_image and rec["image_id"] in images:
                continue
            images.add(rec["image_id"])
            rows.append(rec)
            if len(rows) >= n + offset:
                break
    if len(rows) < n + offset:
        raise ValueError(f"{COCO_CAPTIONS} holds fewer than {n + offset} usable captions")
    return rows[offset:]


def coco_captions(n: int, offset: int = 0, one_per_image: bool = True) -> list[dict[str, Any]]:
    """Real COCO captions (CC BY 4.0) from ../shared/data, one per image unless told otherwise."""
    if not COCO_CAPTIONS.exists():
        pytest.fail(f"{COCO_CAPTIONS} is missing: the tests read real captions from ../shared/data")
    return read_coco_captions(n, offset, one_per_image)


def stop_process(process: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM, `grace` seconds to exit, then SIGKILL: a server a test started."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_resources(data_dir: Path, seed_location: Path | str, llm: LLMResource | None = None,
                   **overrides: Any) -> dict[str, Any]:
    """The resources of the `local` profile, pointed at test folders. An `llm` given without a
    cache_path gets one in `data_dir`, so no test shares the working tree's response cache."""
    profile: dict[str, Any] = {
        "storage": {"base_uri": str(data_dir)},
        "seeds": {"location": str(seed_location)},
        "llm": {"backend": "fake"},
        "quality_gates": {"caption_min_median_words": 5},
    }
    for section, values in overrides.items():
        profile[section] = {**profile.get(section, {}), **values}
    resources = build_resources(profile)
    if llm is not None:
        if "cache_path" not in llm.model_fields_set:
            fields = {name: getattr(llm, name) for name in llm.model_fields_set}
            llm = type(llm)(**fields, cache_path=str(Path(data_dir) / "llm_cache.sqlite"))
        resources["llm"] = llm
    return resources


def materialize_shard(instance: dg.DagsterInstance, resources: dict[str, Any], key: str,
                      assets: list | None = None, **kwargs: Any) -> dg.ExecuteInProcessResult:
    """Register `key` as a seed shard, then materialise `assets` (default: seeds and Stage 1) for
    it in one run on `instance`."""
    if not instance.has_dynamic_partition(SEED_SHARDS, key):
        instance.add_dynamic_partitions(SEED_SHARDS, [key])
    return dg.materialize(assets or [read_caption_seeds, expand_captions], partition_key=key,
                          resources=resources, instance=instance, **kwargs)


def sensor_pipeline(resources: dict, sensor: dg.SensorDefinition | None = None
                    ) -> dg.Definitions:
    """Seeds and Stage 1 with the shard job, and `sensor` if given."""
    return dg.Definitions(assets=[read_caption_seeds, expand_captions],
                          jobs=[unicorn_shard_job],
                          sensors=[sensor] if sensor else [], resources=resources)


def tick(sensor: dg.SensorDefinition, instance: dg.DagsterInstance, resources: dict,
         cursor: str | None):
    """One sensor tick, then what the daemon does with its result: add the partitions."""
    with dg.build_sensor_context(instance=instance, instance_ref=instance.get_ref(),
                                 cursor=cursor, sensor_name=sensor.name,
                                 definitions=sensor_pipeline(resources, sensor),
                                 resources={"seeds": resources["seeds"]}) as context:
        data = sensor.evaluate_tick(context)
    for request in data.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return data


def sensor_for(cap: int = 16) -> dg.SensorDefinition:
    return build_new_shard_sensor(unicorn_shard_job, SensorSettings(max_shards_per_tick=cap))


# --- the whole Unicorn graph on a real instance (integration tests) ---------------------------

def failed_checks(result: dg.ExecuteInProcessResult) -> list[str]:
    return sorted(f"{e.asset_check_evaluation_data.asset_check_key.asset_key.to_user_string()}:"
                  f"{e.asset_check_evaluation_data.asset_check_key.name}"
                  for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"
                  and not e.asset_check_evaluation_data.passed)


def checks_evaluated(result: dg.ExecuteInProcessResult) -> int:
    return sum(1 for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION")


class Pipeline:
    def __init__(self, tmp_path: Path, instance: dg.DagsterInstance):
        self.data, self.seeds, self.instance = tmp_path / "data", tmp_path / "seeds", instance
        resources = make_resources(self.data, self.seeds,
                                   llm=FakeLLM(cache_path=str(tmp_path / "cache.sqlite")))
        self.defs = dg.Definitions(assets=ASSETS, asset_checks=ASSET_CHECKS,
                                   jobs=[unicorn_shard_job, unicorn_corpus_job], resources=resources)

    def add_shard(self, key: str, offset: int) -> dg.ExecuteInProcessResult:
        write_jsonl(self.seeds / f"{key}.jsonl", coco_captions(3, offset=offset))
        self.instance.add_dynamic_partitions(SEED_SHARDS, [key])
        return self.defs.resolve_job_def("unicorn_shard_job").execute_in_process(
            instance=self.instance, partition_key=key, raise_on_error=False)

    def corpus(self, assets: list[str] | None = None) -> dg.ExecuteInProcessResult:
        return self.defs.resolve_job_def("unicorn_corpus_job").execute_in_process(
            instance=self.instance, raise_on_error=False,
            asset_selection=[dg.AssetKey(a) for a in assets] if assets else None)

    def rows(self, asset: str) -> int:
        return pl.scan_parquet(str(self.data / asset / "*.parquet")).select(pl.len()).collect().item()


def failed_only_on_checks(result: dg.ExecuteInProcessResult) -> bool:
    """The run succeeded, or its only failures are blocking checks run inside their assets (the
    assets were written first): for tests about the model or the backend, not the data, whose
    tiny or truncated outputs fail the caption gates."""
    failures = result.get_step_failure_events()
    return result.success or (bool(failures) and all(
        "DagsterAssetCheckFailedError" in (f.step_failure_data.error.cls_name or "")
        for f in failures))


# --- a stand-in SDXL for the SynthVLM tests and the memory benchmark ------------------------------

NOISE_RENDER_CALLS: list[list[int]] = []  # the seeds of every render call made in this process


def noise_picture(seed: int, shade: int, size: int) -> Image.Image:
    pixels = np.random.default_rng([seed, shade]).integers(0, 256, (size, size, 3), np.uint8)
    return Image.fromarray(pixels)


class NoiseDiffusion(DiffusionResource):
    """Seeded noise pictures; from render call `fail_from_call` on, every call fails."""

    resolution: int = 40
    shade: int = 0  # a render setting: another shade is another picture for every seed
    fail_from_call: int = 0

    @property
    def model_id(self) -> str:
        return "noise-stand-in"

    @property
    def is_pretrained(self) -> bool:
        return False

    @property
    def image_size(self) -> int:
        return self.resolution

    def settings(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "shade": self.shade}

    def render(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        NOISE_RENDER_CALLS.append(list(seeds))
        if self.fail_from_call and len(NOISE_RENDER_CALLS) >= self.fail_from_call:
            # not retried by the asset's retry policy: the test re-runs by itself
            raise dg.Failure("the GPU went away", allow_retries=False)
        return [noise_picture(seed, self.shade, self.resolution) for seed in seeds]
