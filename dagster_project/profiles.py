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

from unicorn_resources.llm import FakeLLM, LlamaCppLLM, LLMResource, TransformersLLM
from unicorn_resources.quality import QualityGates
from unicorn_resources.seeds import BUNDLED_SEEDS, SeedSource
from unicorn_resources.storage import ParquetIOManager, S3Options

PROFILE_DIR = files("dagster_project") / "profiles"

LLM_BACKENDS: dict[str, type[LLMResource]] = {
    "llama_cpp": LlamaCppLLM,
    "transformers": TransformersLLM,
    "fake": FakeLLM,
}


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


def build_llm(section: dict[str, Any]) -> LLMResource:
    section = dict(section)
    backend = section.pop("backend", "llama_cpp")
    if backend not in LLM_BACKENDS:
        raise ProfileError(f"llm.backend {backend!r} is unknown; use one of {sorted(LLM_BACKENDS)}")
    return LLM_BACKENDS[backend](**section)


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
        "llm": build_llm(profile.get("llm") or {}),
        "quality_gates": QualityGates(**(profile.get("quality_gates") or {})),
    }
