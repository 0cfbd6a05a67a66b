"""Code versions that say what an asset's output depends on besides its inputs.

Each asset's code version is its declared version plus a digest of its run config, prompt text,
model ids and resource-held settings (`recipe_version`), so that a changed prompt, model or setting
changes the code version, and the nightly automation (dagster_project/automation.py) regenerates
what was made under the old one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import dagster as dg

from unicorn_assets.logic.prompts import load_prompt_set


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
