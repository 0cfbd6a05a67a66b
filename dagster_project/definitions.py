"""The one place the Definitions are assembled. The profile (UNICORN_PROFILE) picks resources."""

import dagster as dg

from dagster_project.automation import (
    AutomationSettings,
    build_new_shard_sensor,
    build_nightly_sensor,
    with_nightly_conditions,
)
from dagster_project.code_versions import profile_op_config, with_recipe_versions
from dagster_project.jobs import JOB_SPECS, SYNTHVLM_JOB_SPECS, build_jobs, unicorn_shard_job
from dagster_project.profiles import (
    build_resources,
    check_run_config,
    job_run_configs,
    load_profile,
    synthvlm_enabled,
)
from unicorn_assets.alignment_report import alignment_assets
from unicorn_assets.caption_seeds import read_caption_seeds
from unicorn_assets.expansion import expand_captions
from unicorn_assets.exports import export_asset_checks, export_assets
from unicorn_assets.instructions import make_instructions
from unicorn_assets.modality import stage3_assets, stage3_checks
from unicorn_assets.quality_report import report_assets
from unicorn_assets.synthvlm import synthvlm_assets, synthvlm_checks

ASSETS = [read_caption_seeds, expand_captions, make_instructions, *stage3_assets, *export_assets,
          *report_assets, *alignment_assets]
# Most checks run inside their assets (check_specs); these read stored outputs back as their own
# steps: the streamed shifted embeddings, the export folders and the pairing across assets.
ASSET_CHECKS = [*stage3_checks, *export_asset_checks]


def build_definitions(profile_name: str | None = None) -> dg.Definitions:
    profile = load_profile(profile_name)
    synthvlm = synthvlm_enabled(profile)
    resources = build_resources(profile)
    automation = AutomationSettings.from_profile(profile)
    op_configs = profile_op_config(profile)
    job_names = [spec["name"] for spec in JOB_SPECS + (SYNTHVLM_JOB_SPECS if synthvlm else [])]
    if not synthvlm:  # the switched-off branch's job settings stay in the file, unused
        switched_off = {spec["name"] for spec in SYNTHVLM_JOB_SPECS}
        profile = {**profile, "run_config": {name: config for name, config
                                             in (profile.get("run_config") or {}).items()
                                             if name not in switched_off}}
    jobs = build_jobs(job_run_configs(profile, job_names), synthvlm)
    shard_job = next(job for job in jobs if job.name == unicorn_shard_job.name)
    assets = with_recipe_versions(ASSETS + (synthvlm_assets if synthvlm else []), resources,
                                  op_configs)
    defs = dg.Definitions(
        assets=with_nightly_conditions(assets, automation.nightly),
        asset_checks=ASSET_CHECKS + (synthvlm_checks if synthvlm else []),
        jobs=jobs,
        resources=resources,
        sensors=[build_new_shard_sensor(shard_job, automation.new_shard_sensor),
                 build_nightly_sensor(automation.nightly)],
        executor=automation.executor_def(),
    )
    check_run_config(defs, profile)
    return defs


defs = build_definitions()
