"""Stage 1's settings as each profile resolves them: a real model gets a token budget that does
not clip the paper's caption length, and the paper's one main-subject expansion per seed."""

import pytest

from dagster_project.code_versions import profile_op_config
from dagster_project.profiles import load_profile
from unicorn_assets.expansion import ExpansionConfig


@pytest.mark.parametrize("name", ["gpu", "cluster", "docker", "local"])
def test_every_profile_expands_with_at_least_384_tokens_and_one_main_subject_prompt(name):
    overrides = profile_op_config(load_profile(name)).get("expand_captions", {})
    config = ExpansionConfig(**overrides)
    assert config.max_tokens >= 384, f"profile {name}: max_tokens {config.max_tokens}"
    assert (config.styles, config.expansions_per_seed) == ([], 1)
