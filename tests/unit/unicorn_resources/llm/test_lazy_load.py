"""A run that the response cache answers whole loads no model; a run with misses loads it once."""

import random
from pathlib import Path

import dagster as dg
import llama_cpp
import pytest

from tests.support import make_resources, materialize_shard
from unicorn_resources.llm import LlamaCppLLM, TransformersLLM, VllmLLM

WORDS = ["red", "blue", "wooden", "metal", "glass", "round", "small", "large", "bright", "dark",
         "table", "wall", "window", "floor", "grass", "sky", "road", "water", "tree", "building",
         "shadow", "light", "lamp", "cloth", "paper", "stone"]


class CountingLlama:
    """Stands in for llama_cpp.Llama: counts how often a model is loaded, answers with seeded
    pseudo-descriptions."""

    loads = 0

    def __init__(self, **kwargs):
        type(self).loads += 1

    def reset(self):  # llama_cpp.Llama.reset: empty the KV cache
        pass

    def create_chat_completion(self, messages, seed=None, **kwargs):
        rng = random.Random(f"{seed}|{messages}")
        prompt = messages[-1]["content"]  # the seed is quoted in it, and echoed as models do
        seed = prompt.split('"')[1] if '"' in prompt else ""
        text = f"{seed} The scene shows " + " ".join(rng.choice(WORDS) for _ in range(40)) + "."
        return {"choices": [{"message": {"content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 42}}

    def close(self):
        pass


def test_a_fully_cached_run_loads_no_model(tmp_path: Path, instance, seed_dir, monkeypatch):
    monkeypatch.setattr(llama_cpp, "Llama", CountingLlama)
    monkeypatch.setattr(CountingLlama, "loads", 0)
    llm = LlamaCppLLM(model_path=str(tmp_path / "stand-in.gguf"))
    resources = make_resources(tmp_path / "data", seed_dir, llm=llm)

    cold = materialize_shard(instance, resources, "shard-a")
    assert cold.success
    assert CountingLlama.loads == 1  # every miss of the run shares one load
    cold_meta = cold.asset_materializations_for_node("expand_captions")[0].metadata
    assert cold_meta["cache_hits"].value == 0 and cold_meta["llm_requests"].value > 1

    warm = materialize_shard(instance, resources, "shard-a")
    assert warm.success
    warm_meta = warm.asset_materializations_for_node("expand_captions")[0].metadata
    assert warm_meta["cache_hit_rate"].value == 1.0
    assert CountingLlama.loads == 1  # the cache answered the whole run: nothing loaded


@pytest.mark.parametrize("backend", [LlamaCppLLM(model_path="stand-in.gguf"),
                                     TransformersLLM(model_path="stand-in"),
                                     VllmLLM(model="stand-in")], ids=lambda b: type(b).__name__)
def test_no_backend_loads_its_model_at_setup(backend, monkeypatch):
    def load(self):
        raise AssertionError(f"{type(self).__name__} loaded its model at setup")

    monkeypatch.setattr(type(backend), "_load", load)
    backend.setup_for_execution(dg.build_init_resource_context())
