"""Deployment profiles: each one's Definitions load without a GPU or the network, and pick the
resources it documents."""

from __future__ import annotations

import os
import socket
import sys

import dagster as dg
import pytest

from dagster_project.definitions import build_definitions
from dagster_project.profiles import PROFILE_DIR, ProfileError, build_llm, build_resources
from unicorn_resources.llm import LlamaCppLLM, OpenAILLM, VllmLLM

PROFILES = sorted(p.name.removesuffix(".yaml") for p in PROFILE_DIR.iterdir()
                  if p.name.endswith(".yaml"))


@pytest.fixture
def offline(monkeypatch):
    """No network, and none of the environment that would change a profile's values."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a profile tried to open a connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in list(os.environ):
        if name.startswith(("UNICORN_", "AWS_")):
            monkeypatch.delenv(name)


def test_the_three_documented_profiles_exist():
    assert {"local", "gpu", "cluster"} <= set(PROFILES)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_definitions_load_without_gpu_or_network(name, offline):
    defs = build_definitions(name)
    dg.Definitions.validate_loadable(defs)
    assert defs.resolve_job_def("unicorn_shard_job")
    assert "vllm" not in sys.modules
    if "torch" in sys.modules:
        assert not sys.modules["torch"].cuda.is_initialized()


def test_local_profile(offline):
    resources = build_definitions("local").resources
    assert isinstance(resources["llm"], LlamaCppLLM)
    assert resources["llm"].cache_path == "data/llm_cache.sqlite"
    assert resources["io_manager"].base_uri == "data"


@pytest.mark.parametrize("name", ["gpu", "cluster"])
def test_gpu_profiles_name_the_real_clip_and_sdxl(name, offline):
    resources = build_definitions(name).resources
    clip, diffusion = resources["clip"], resources["diffusion"]
    assert (clip.model_name, clip.pretrained) == ("ViT-L-14-336", "openai")
    assert diffusion.base_model_id == "stabilityai/stable-diffusion-xl-base-1.0"
    assert not diffusion.tiny_random


def test_gpu_profile_runs_the_vllm_engine(offline):
    llm = build_definitions("gpu").resources["llm"]
    assert isinstance(llm, VllmLLM)
    assert llm.engine_kwargs() == {"model": "Qwen/Qwen2.5-7B-Instruct", "tensor_parallel_size": 1,
                                   "gpu_memory_utilization": 0.85, "max_model_len": 4096,
                                   "dtype": "bfloat16"}
    assert llm.cache_path == "data/llm_cache.sqlite"


def test_cluster_profile_uses_a_fleet_s3_and_env_secrets(offline):
    resources = build_definitions("cluster").resources
    llm, io = resources["llm"], resources["io_manager"]
    assert isinstance(llm, OpenAILLM) and len(llm.base_urls) >= 2
    assert isinstance(llm.api_key, dg.EnvVar) and llm.api_key.env_var_name == "UNICORN_LLM_API_KEY"
    assert llm.cache_path.startswith("/shared/") and llm.cache_journal_mode == "delete"
    assert io.base_uri.startswith("s3://")
    assert isinstance(io.s3.access_key_id, dg.EnvVar)
    assert isinstance(io.s3.secret_access_key, dg.EnvVar)
    assert resources["seeds"].location.startswith("s3://")


def test_profile_is_chosen_by_environment(offline, monkeypatch):
    monkeypatch.setenv("UNICORN_PROFILE", "gpu")
    assert isinstance(build_definitions().resources["llm"], VllmLLM)
    monkeypatch.setenv("UNICORN_PROFILE", "nope")
    with pytest.raises(ProfileError, match="unknown profile 'nope'"):
        build_definitions()


def test_cache_lives_beside_local_data_and_must_be_named_for_s3(tmp_path):
    local = build_resources({"storage": {"base_uri": str(tmp_path)}, "llm": {"backend": "fake"}})
    assert local["llm"].cache_path == f"{tmp_path}/llm_cache.sqlite"
    explicit = build_llm({"backend": "fake", "cache_path": "/mnt/c.sqlite"}, "s3://b/p")
    assert explicit.cache_path == "/mnt/c.sqlite"
    assert not build_llm({"backend": "fake", "cache_enabled": False}, "s3://b/p").cache_enabled
    with pytest.raises(ProfileError, match="llm.cache_path: storage is 's3://b/p'"):
        build_llm({"backend": "fake"}, "s3://b/p")


def test_unknown_llm_backend_is_refused():
    with pytest.raises(ProfileError, match="llm.backend 'vlm' is unknown"):
        build_llm({"backend": "vlm"})
