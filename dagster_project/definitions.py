"""The one place the Definitions are assembled. The profile (UNICORN_PROFILE) picks resources."""

import dagster as dg

from dagster_project.jobs import JOBS
from dagster_project.profiles import build_resources, load_profile
from unicorn_assets.seeds import read_caption_seeds, seed_checks
from unicorn_assets.stage1 import expand_captions, stage1_checks

ASSETS = [read_caption_seeds, expand_captions]
ASSET_CHECKS = [*seed_checks, *stage1_checks]


def build_definitions(profile_name: str | None = None) -> dg.Definitions:
    profile = load_profile(profile_name)
    return dg.Definitions(
        assets=ASSETS,
        asset_checks=ASSET_CHECKS,
        jobs=JOBS,
        resources=build_resources(profile),
    )


defs = build_definitions()
