"""Stage 1 and Stage 2 settings as each profile resolves them: a real model gets a token budget
that does not clip the paper's caption length, one main-subject expansion per seed, and the paper's
share of captions in Stage 2."""

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


@pytest.mark.parametrize("name", ["gpu", "cluster"])
def test_real_model_profiles_sample_the_papers_share_of_captions_for_stage2(name):
    assert load_profile(name)["stage2"]["sample_fraction"] == pytest.approx(471 / 1200, abs=1e-3)
