"""Deployment profiles: named YAML files that pick resources and their settings.

The profile is chosen by UNICORN_PROFILE (default `local`), or UNICORN_PROFILE_FILE for a file of
your own; switching environments is a configuration change, never a code edit.
"""

from __future__ import annotations

import difflib
import os
from importlib.resources import files
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from dagster_project.profile_settings import (
    CLIP_BACKENDS,
    DEFAULT_BACKEND,
    DIFFUSION_BACKENDS,
    LLM_BACKENDS,
    ProfileError,
    build_checked,
    set_values,
    validate_profile,
    without_other_backends_settings,
)
from unicorn_assets.instructions import InstructionDefaults
from unicorn_resources.clip import ClipResource
from unicorn_resources.diffusion import DiffusionResource
from unicorn_resources.llm import LLMResource
from unicorn_resources.quality_gates import QualityGates
from unicorn_resources.seed_source import SeedSource
from unicorn_resources.storage import ParquetIOManager, S3Options, join

PROFILE_DIR = files("dagster_project") / "profiles"
BUNDLED_SEEDS = str(files("dagster_project") / "demo_seeds")


def _known_profiles() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in PROFILE_DIR.iterdir()
                  if p.name.endswith(".yaml"))


def profile_path(name: str | None = None) -> Path:
    explicit = os.environ.get("UNICORN_PROFILE_FILE")
    if explicit and name is None:
        if not Path(explicit).is_file():
            raise ProfileError(f"UNICORN_PROFILE_FILE={explicit}: no such file; point it at a "
                               "profile YAML file, or unset it to use UNICORN_PROFILE")
        return Path(explicit)
    name = name or os.environ.get("UNICORN_PROFILE", "local")
    known = _known_profiles()
    if name not in known:  # a name only: never a path out of the profiles folder
        near = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ProfileError(f"unknown profile {name!r}; {hint}set UNICORN_PROFILE to one of "
                           f"{known}, or UNICORN_PROFILE_FILE to a YAML file of your own")
    return Path(str(PROFILE_DIR / f"{name}.yaml"))


def _resolve(value: Any, sources: dict[str, str] | None = None, at: tuple[str, ...] = (),
             path: str = "the profile") -> Any:
    """Replace {env: NAME, default: X} by the environment's value (or X), and {env: NAME} by an
    EnvVar resolved at run time. `sources` gets {setting: NAME} of each value the environment
    set, so an error about the value names the variable."""
    if isinstance(value, dict):
        if "env" in value:
            other = sorted(set(value) - {"env", "default"})
            if other or not isinstance(value["env"], str) or not value["env"]:
                raise ProfileError(
                    f"{path}: {'.'.join(at)}: write an environment reference as "
                    f"{{env: NAME}} or {{env: NAME, default: VALUE}}; got {value!r}")
            name = value["env"]
            if "default" not in value:
                return dg.EnvVar(name)
            if name in os.environ:
                if sources is not None:
                    sources[".".join(at)] = name
                return os.environ[name]
            return value["default"]
        return {k: _resolve(v, sources, (*at, str(k)), path) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, sources, (*at, str(i)), path) for i, v in enumerate(value)]
    return value


def load_profile(name: str | None = None) -> dict[str, Any]:
    """The profile's settings, checked against ProfileSettings (every key, every range): the
    values it sets, environment references resolved, with `name` and `_path` (its file)."""
    path = profile_path(name)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ProfileError(f"{path}: not valid YAML: {err}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ProfileError(f"{path}: cannot be read ({err}); fix the file or its "
                           "permissions") from err
    sources: dict[str, str] = {}
    spec = without_other_backends_settings(_resolve(spec, sources, path=str(path)), sources)
    profile = set_values(validate_profile(spec, str(path), sources))
    profile.setdefault("name", path.stem)
    profile["_path"], profile["_env"] = str(path), sources
    return profile


def _where(profile: dict[str, Any]) -> tuple[str, dict[str, str]]:
    return profile.get("_path", "the profile"), profile.get("_env") or {}


def _backend_section(section: str, values: dict[str, Any] | None, path: str
                     ) -> tuple[str, dict[str, Any]]:
    """(backend, its settings) of the llm/clip/diffusion section, checked."""
    settings = validate_profile({section: values}, path)
    checked = set_values(getattr(settings, section))
    return checked.pop("backend", DEFAULT_BACKEND[section]), checked


def build_llm(section: dict[str, Any], storage_base: str = "data",
              path: str = "the profile") -> LLMResource:
    """The response cache defaults to <storage base>/llm_cache.sqlite; with S3 storage it must be
    set, since SQLite needs a filesystem (a shared volume in a cluster)."""
    backend, section = _backend_section("llm", section, path)
    if not section.get("cache_path"):
        section.pop("cache_path", None)
        if "://" not in storage_base and not isinstance(storage_base, dg.EnvVar):
            section["cache_path"] = join(storage_base, "llm_cache.sqlite")
        elif section.get("cache_enabled", True):
            raise ProfileError(
                f"{path}: llm.cache_path: storage is {storage_base!r}, but the SQLite response "
                "cache needs a filesystem path; set llm.cache_path to a file on a volume every "
                "run mounts, or llm.cache_enabled: false")
    return build_checked(LLM_BACKENDS[backend], section, ("llm", backend), path)


def build_clip(section: dict[str, Any], path: str = "the profile") -> ClipResource:
    backend, section = _backend_section("clip", section, path)
    return build_checked(CLIP_BACKENDS[backend], section, ("clip", backend), path)


def build_diffusion(section: dict[str, Any], path: str = "the profile") -> DiffusionResource:
    backend, section = _backend_section("diffusion", section, path)
    return build_checked(DIFFUSION_BACKENDS[backend], section, ("diffusion", backend), path)


def job_run_configs(profile: dict[str, Any], job_names: list[str]) -> dict[str, Any]:
    """{job name: default run config} from the profile's `run_config.<job name>` (e.g. small demo
    settings on a CPU), for `jobs.build_jobs`; a name that is not one of `job_names` is an error.
    Asset materialisations outside these jobs use the defaults."""
    configs = profile.get("run_config") or {}
    names = sorted(job_names)
    unknown = sorted(set(configs) - set(names))
    if unknown:
        near = {n: difflib.get_close_matches(n, names, n=1) for n in unknown}
        hints = "".join(f"; run_config.{n}: did you mean run_config.{m[0]}?"
                        for n, m in near.items() if m)
        raise ProfileError(f"{_where(profile)[0]}: run_config names unknown job(s) {unknown}"
                           f"{hints} (jobs: {', '.join(names)})")
    return dict(configs)


def check_run_config(defs: dg.Definitions, profile: dict[str, Any]) -> None:
    """Each job's run config from the profile against the job's own config (its ops, their keys
    and types), when the Definitions load rather than when a run starts."""
    path = _where(profile)[0]
    for job_name, config in (profile.get("run_config") or {}).items():
        job = defs.resolve_job_def(job_name)
        where = f"{path}: run_config.{job_name}.ops"
        try:  # the job's whole default config: its ops and each one's settings
            ops = dg.validate_run_config(job, {})["ops"]
        except dg.DagsterInvalidConfigError:
            ops = {}
        configurable = sorted(op for op, c in ops.items() if isinstance(c.get("config"), dict))
        problems = []
        for op, op_config in (config.get("ops") or {}).items():
            if ops and op not in configurable:
                near = difflib.get_close_matches(op, configurable, n=1)
                hint = f"did you mean {where[len(path) + 2:]}.{near[0]}? " if near else ""
                problems.append(f"{where}.{op} is not a configurable op of {job_name}; {hint}"
                                f"(valid: {', '.join(configurable)})")
                continue
            keys = sorted(ops[op]["config"]) if ops else []
            for key in (op_config or {}).get("config") or {}:
                if keys and key not in keys:
                    near = difflib.get_close_matches(key, keys, n=1)
                    hint = f"did you mean {where[len(path) + 2:]}.{op}.config.{near[0]}? " \
                        if near else ""
                    problems.append(f"{where}.{op}.config.{key} is not a setting; {hint}"
                                    f"(valid: {', '.join(keys)})")
        if not problems:
            try:
                dg.validate_run_config(job, config)
            except dg.DagsterInvalidConfigError as err:
                problems = [f"{path}: run_config.{job_name}: {e.message}" for e in err.errors]
        if problems:
            raise ProfileError("\n".join(problems))


def synthvlm_enabled(profile: dict[str, Any]) -> bool:
    """The SynthVLM branch (its assets and jobs) is part of the Definitions only when turned on."""
    path, sources = _where(profile)
    return validate_profile({"synthvlm": profile.get("synthvlm")}, path, sources).synthvlm.enabled


def build_resources(profile: dict[str, Any]) -> dict[str, Any]:
    path, sources = _where(profile)
    values = set_values(validate_profile(profile, path, sources))
    storage = values.get("storage", {})
    storage_s3 = S3Options(**storage.pop("s3", {}))
    seeds = values.get("seeds", {})
    if seeds.get("location") in (None, "bundled"):
        seeds["location"] = BUNDLED_SEEDS
    seeds_s3 = S3Options(**seeds.pop("s3", {}))
    return {
        "io_manager": build_checked(ParquetIOManager, {**storage, "s3": storage_s3}, ("storage",),
                                    path),
        "seeds": build_checked(SeedSource, {**seeds, "s3": seeds_s3}, ("seeds",), path),
        "llm": build_llm(values.get("llm", {}), storage.get("base_uri", "data"), path),
        "clip": build_clip(values.get("clip", {}), path),
        "diffusion": build_diffusion(values.get("diffusion", {}), path),
        "quality_gates": build_checked(QualityGates, values.get("quality_gates", {}),
                                       ("quality_gates",), path),
        "stage2": build_stage2(values.get("stage2", {}), path),
    }


def build_stage2(section: dict[str, Any], path: str = "the profile") -> InstructionDefaults:
    """The `stage2:` section of the profile file at `path` as the `stage2` resource."""
    checked = set_values(validate_profile({"stage2": section}, path).stage2)
    return build_checked(InstructionDefaults, checked, ("stage2",), path)
