"""The `vllm` backend's request shaping and engine lifecycle, with a stand-in `vllm` module.

vLLM is not installed here (it is the `gpu` extra and needs CUDA): these tests check what the
backend would send to the engine (`chat` sub-batches, per-request SamplingParams, structured outputs)
and when it creates and shuts the engine down. The real engine is not exercised by this suite."""

from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace
from typing import ClassVar

import dagster as dg
import pytest

from tests.support import failed_only_on_checks, make_resources
from unicorn_assets.caption_seeds import read_caption_seeds
from unicorn_assets.expansion import expand_captions
from unicorn_assets.partitions import SEED_SHARDS
from unicorn_resources.llm import ChatRequest, ResponseCache, SamplingParams, VllmLLM


class Recorded:
    """Stands in for vllm.SamplingParams / StructuredOutputsParams: keeps its arguments."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeEngine:
    created: ClassVar[list[FakeEngine]] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.chat_calls: list[tuple] = []
        self.shutdowns = 0
        core = SimpleNamespace(shutdown=lambda: setattr(self, "shutdowns", self.shutdowns + 1))
        self.llm_engine = SimpleNamespace(engine_core=core)
        FakeEngine.created.append(self)

    def chat(self, messages, sampling_params=None, use_tqdm=True):
        self.chat_calls.append((messages, sampling_params, use_tqdm))
        outputs = []
        for i, conversation in enumerate(messages):
            words = conversation[-1]["content"].split()
            text = f"Reply {i}: " + " ".join(words * 6)
            outputs.append(SimpleNamespace(
                prompt_token_ids=list(range(len(words))),
                outputs=[SimpleNamespace(text=text, token_ids=list(range(len(text.split()))),
                                         finish_reason="length" if i == 0 else "stop")]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch) -> SimpleNamespace:
    FakeEngine.created = []
    state = SimpleNamespace(cleanups=0)
    vllm = ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeEngine, Recorded
    sampling = ModuleType("vllm.sampling_params")
    sampling.StructuredOutputsParams = Recorded
    distributed = ModuleType("vllm.distributed")
    distributed.cleanup_dist_env_and_memory = lambda: setattr(state, "cleanups",
                                                              state.cleanups + 1)
    for name, module in {"vllm": vllm, "vllm.sampling_params": sampling,
                         "vllm.distributed": distributed}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return state


def test_missing_vllm_names_the_gpu_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as on the CPU install
    llm = VllmLLM(model="Qwen/Qwen2.5-7B-Instruct", cache_enabled=False)
    with pytest.raises(ImportError, match=r"pip install '\.\[gpu\]'"):
        llm.generate([ChatRequest.of([{"role": "user", "content": "hi"}])], SamplingParams())


def test_engine_gets_the_configured_arguments(fake_vllm, tmp_path):
    llm = VllmLLM(model="/models/qwen.Q4_K_M.gguf", tokenizer="Qwen/Qwen2.5-7B-Instruct",
                  tensor_parallel_size=4, gpu_memory_utilization=0.8, max_model_len=4096,
                  dtype="bfloat16", engine_args={"enforce_eager": True},
                  cache_path=str(tmp_path / "cache.sqlite"))  # never the working tree's cache
    with dg.build_resources({"llm": llm}) as resources:
        assert not FakeEngine.created  # loaded at the first cache miss, not at setup
        resources.llm.generate([ChatRequest.of([{"role": "user", "content": "hi"}])],
                               SamplingParams())
        [engine] = FakeEngine.created
        assert engine.kwargs == {
            "model": "/models/qwen.Q4_K_M.gguf", "tokenizer": "Qwen/Qwen2.5-7B-Instruct",
            "tensor_parallel_size": 4, "gpu_memory_utilization": 0.8, "max_model_len": 4096,
            "dtype": "bfloat16", "enforce_eager": True}
        assert resources.llm.model_id == "vllm:/models/qwen.Q4_K_M.gguf"
    assert engine.shutdowns == 1 and fake_vllm.cleanups == 1


def test_every_request_goes_in_one_batch_with_its_own_sampling(fake_vllm, tmp_path):
    schema = {"type": "object", "properties": {"question": {"type": "string"}}}
    requests = [ChatRequest.of([{"role": "system", "content": "Be precise."},
                                {"role": "user", "content": f"Describe scene {i}."}], seed=100 + i)
                for i in range(4)]
    requests.append(ChatRequest.of([{"role": "user", "content": "Ask about it."}], seed=None,
                                   json_schema=schema))
    params = SamplingParams(temperature=0.6, top_p=0.9, max_tokens=64, repeat_penalty=1.05)
    llm = VllmLLM(model="m", cache_path=str(tmp_path / "cache.sqlite"))

    answers = llm.generate(requests, params)

    [engine] = FakeEngine.created
    [(conversations, sampling, use_tqdm)] = engine.chat_calls
    assert conversations == [r.message_dicts() for r in requests] and use_tqdm is False
    expected = [{"temperature": 0.6, "top_p": 0.9, "max_tokens": 64, "repetition_penalty": 1.05,
                 "seed": seed} for seed in (100, 101, 102, 103, None)]
    assert [{k: v for k, v in s.kwargs.items() if k != "structured_outputs"}
            for s in sampling] == expected
    assert [s.kwargs.get("structured_outputs") for s in sampling[:4]] == [None] * 4
    assert sampling[4].kwargs["structured_outputs"].kwargs == {"json": schema}
    assert [a.finish_reason for a in answers] == ["length", "stop", "stop", "stop", "stop"]
    assert answers[1].text.startswith("Reply 1: Describe scene 1.")
    assert answers[1].prompt_tokens == 3 and answers[1].completion_tokens == len(
        answers[1].text.split())

    again = llm.generate(requests, params)  # answered by the cache: no second batch
    assert len(engine.chat_calls) == 1 and all(a.cached for a in again)


def test_each_sub_batch_is_cached_as_soon_as_it_is_done(fake_vllm, tmp_path, monkeypatch):
    requests = [ChatRequest.of([{"role": "user", "content": f"Describe scene {i}."}], seed=i)
                for i in range(5)]
    cache_path = tmp_path / "cache.sqlite"
    llm = VllmLLM(model="m", sub_batch_size=2, cache_path=str(cache_path))
    answer, died = FakeEngine.chat, []

    def dies_on_the_third_batch(engine, messages, **kwargs):
        if len(engine.chat_calls) == 2 and not died:
            died.append(True)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return answer(engine, messages, **kwargs)

    monkeypatch.setattr(FakeEngine, "chat", dies_on_the_third_batch)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        llm.generate(requests, SamplingParams())
    [engine] = FakeEngine.created
    assert [len(call[0]) for call in engine.chat_calls] == [2, 2]
    assert ResponseCache(cache_path).counts() == {"vllm:m": 4}  # the two finished sub-batches

    again = llm.generate(requests, SamplingParams())
    assert [a.cached for a in again] == [True] * 4 + [False]
    assert [len(call[0]) for call in engine.chat_calls] == [2, 2, 1]


def test_a_backfill_run_loads_the_engine_once_and_sends_one_batch(fake_vllm, tmp_path, instance,
                                                                  seed_dir):
    instance.add_dynamic_partitions(SEED_SHARDS, ["shard-a", "shard-b"])
    llm = VllmLLM(model="Qwen/Qwen2.5-7B-Instruct")
    result = dg.materialize(
        [read_caption_seeds, expand_captions], instance=instance,
        resources=make_resources(tmp_path / "data", seed_dir, llm=llm),
        tags={"dagster/asset_partition_range_start": "shard-a",
              "dagster/asset_partition_range_end": "shard-b"}, raise_on_error=False)
    assert failed_only_on_checks(result)  # the stand-in engine's texts fail the caption gates
    [engine] = FakeEngine.created
    [(conversations, _, _)] = engine.chat_calls
    mats = [m for m in result.asset_materializations_for_node("expand_captions")
            if m.asset_key.path == ["expanded_captions"]]
    assert sorted(m.partition for m in mats) == ["shard-a", "shard-b"]
    assert len(conversations) == mats[0].metadata["llm_requests"].value == 8  # 2 shards x 4 seeds x 1
    assert engine.shutdowns == 1 and fake_vllm.cleanups == 1
    assert (tmp_path / "data" / "expanded_captions" / "shard-b.parquet").is_file()
