"""Deployment profiles: named YAML files that pick resources and their settings.

The profile is chosen by UNICORN_PROFILE (default `local`), or UNICORN_PROFILE_FILE for a file of
your own; switching environments is a configuration change, never a code edit.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path
from typing import Any

import dagster as dg
import yaml
from dagster_shared.record import replace
from pydantic import ValidationError

from unicorn_assets.instructions import InstructionDefaults
from unicorn_resources.clip import ClipResource, OpenClipResource
from unicorn_resources.diffusion import DiffusionResource, SdxlResource
from unicorn_resources.llm import (
    FakeLLM,
    LlamaCppLLM,
    LLMResource,
    OpenAILLM,
    TransformersLLM,
    VllmLLM,
)
from unicorn_resources.quality_gates import QualityGates
from unicorn_resources.seed_source import SeedSource
from unicorn_resources.storage import ParquetIOManager, S3Options, join

PROFILE_DIR = files("dagster_project") / "profiles"
BUNDLED_SEEDS = str(files("dagster_project") / "demo_seeds")

LLM_BACKENDS: dict[str, type[LLMResource]] = {
    "llama_cpp": LlamaCppLLM,
    "transformers": TransformersLLM,
    "vllm": VllmLLM,
    "openai": OpenAILLM,
    "fake": FakeLLM,
}


CLIP_BACKENDS: dict[str, type[ClipResource]] = {"open_clip": OpenClipResource}
DIFFUSION_BACKENDS: dict[str, type[DiffusionResource]] = {"sdxl": SdxlResource}


class ProfileError(ValueError):
    pass


def profile_path(name: str | None = None) -> Path:
    explicit = os.environ.get("UNICORN_PROFILE_FILE")
    if explicit and name is None:
        return Path(explicit)
    name = name or os.environ.get("UNICORN_PROFILE", "local")
    path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.name.removesuffix(".yaml") for p in PROFILE_DIR.iterdir()
                       if p.name.endswith(".yaml"))
        raise ProfileError(f"unknown profile {name!r}; set UNICORN_PROFILE to one of {known}, "
                           "or UNICORN_PROFILE_FILE to a YAML file of your own")
    return Path(str(path))


def _resolve(value: Any) -> Any:
    """Replace {env: NAME, default: X} by the environment's value (or X), and {env: NAME} by an
    EnvVar resolved at run time."""
    if isinstance(value, dict):
        if "env" in value and set(value) <= {"env", "default"}:
            if "default" in value:
                return os.environ.get(value["env"], value["default"])
            return dg.EnvVar(value["env"])
        return {k: _resolve(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v) for v in value]
    return value


def load_profile(name: str | None = None) -> dict[str, Any]:
    path = profile_path(name)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ProfileError(f"{path}: not valid YAML: {err}") from err
    spec = _resolve(spec)
    spec["_path"] = str(path)
    spec.setdefault("name", path.stem)
    return spec


def _s3(section: dict[str, Any]) -> S3Options:
    return S3Options(**(section.pop("s3", None) or {}))


def build_llm(section: dict[str, Any], storage_base: str = "data") -> LLMResource:
    """The response cache defaults to <storage base>/llm_cache.sqlite; with S3 storage it must be
    set, since SQLite needs a filesystem (a shared volume in a cluster)."""
    section = dict(section)
    backend = section.pop("backend", "llama_cpp")
    if backend not in LLM_BACKENDS:
        raise ProfileError(f"llm.backend {backend!r} is unknown; use one of {sorted(LLM_BACKENDS)}")
    if not section.get("cache_path"):
        section.pop("cache_path", None)
        if "://" not in storage_base and not isinstance(storage_base, dg.EnvVar):
            section["cache_path"] = join(storage_base, "llm_cache.sqlite")
        elif section.get("cache_enabled", True):
            raise ProfileError(
                f"llm.cache_path: storage is {storage_base!r}, but the SQLite response cache needs "
                "a filesystem path; set llm.cache_path to a file on a volume every run mounts, or "
                "llm.cache_enabled: false")
    return LLM_BACKENDS[backend](**section)


def build_clip(section: dict[str, Any]) -> ClipResource:
    section = dict(section)
    backend = section.pop("backend", "open_clip")
    if backend not in CLIP_BACKENDS:
        raise ProfileError(f"clip.backend {backend!r} is unknown; use one of {sorted(CLIP_BACKENDS)}")
    return CLIP_BACKENDS[backend](**section)


def build_diffusion(section: dict[str, Any]) -> DiffusionResource:
    section = dict(section)
    backend = section.pop("backend", "sdxl")
    if backend not in DIFFUSION_BACKENDS:
        raise ProfileError(f"diffusion.backend {backend!r} is unknown; use one of "
                           f"{sorted(DIFFUSION_BACKENDS)}")
    return DIFFUSION_BACKENDS[backend](**section)


def with_run_config(jobs: list[Any], profile: dict[str, Any]) -> list[Any]:
    """Each job with its default run config from the profile's `run_config.<job name>` (e.g.
    small demo settings on a CPU): runs of the job without config of their own use it, and the
    launchpad shows it, editable. Asset materialisations outside these jobs use the defaults."""
    configs = profile.get("run_config") or {}
    unknown = sorted(set(configs) - {job.name for job in jobs})
    if unknown:
        raise ProfileError(f"run_config names unknown job(s) {unknown}; jobs: "
                           f"{sorted(job.name for job in jobs)}")
    # Dagster has no public way to set a defined asset job's config; `replace` rebuilds the record.
    return [replace(job, config=configs[job.name]) if job.name in configs else job for job in jobs]


def synthvlm_enabled(profile: dict[str, Any]) -> bool:
    """The SynthVLM branch (its assets and jobs) is part of the Definitions only when turned on."""
    return bool((profile.get("synthvlm") or {}).get("enabled", False))


def build_resources(profile: dict[str, Any]) -> dict[str, Any]:
    storage = dict(profile.get("storage") or {})
    storage_s3 = _s3(storage)
    seeds = dict(profile.get("seeds") or {})
    if seeds.get("location") in (None, "bundled"):
        seeds["location"] = BUNDLED_SEEDS
    seeds_s3 = _s3(seeds)
    return {
        "io_manager": ParquetIOManager(s3=storage_s3, **storage),
        "seeds": SeedSource(s3=seeds_s3, **seeds),
        "llm": build_llm(profile.get("llm") or {}, storage.get("base_uri", "data")),
        "clip": build_clip(profile.get("clip") or {}),
        "diffusion": build_diffusion(profile.get("diffusion") or {}),
        "quality_gates": QualityGates(**(profile.get("quality_gates") or {})),
        "stage2": build_stage2(profile.get("stage2") or {}, profile.get("_path", "the profile")),
    }


def build_stage2(section: dict[str, Any], path: str = "the profile") -> InstructionDefaults:
    """The `stage2:` section of the profile file at `path` as the `stage2` resource."""
    unknown = sorted(set(section) - set(InstructionDefaults.model_fields))
    if unknown:
        raise ProfileError(f"{path}: stage2 has unknown setting(s) {unknown}; fix the name, or "
                           f"remove it. Known: {sorted(InstructionDefaults.model_fields)}")
    try:
        return InstructionDefaults(**section)
    except ValidationError as err:
        problems = "; ".join(f"stage2.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                             for e in err.errors())
        raise ProfileError(f"{path}: {problems}. Fix the value, or remove it to take the "
                           "paper's default.") from None
