"""The LLM response cache: hits and misses, what the key covers, turning it off, clearing it,
completions kept as they finish (a crash loses only the work in progress), several processes on
one file, and a Stage-1 re-run that the cache answers completely."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import polars as pl
import pytest
from pydantic import PrivateAttr
from typer.testing import CliRunner

from tests.support import make_resources, materialize_shard
from unicorn_resources.llm import (
    ChatRequest,
    Completion,
    FakeLLM,
    GenerationError,
    ResponseCache,
    SamplingParams,
    request_key,
)

PARAMS = SamplingParams(max_tokens=32)


def chat(text: str, seed: int | None = 1, schema: dict | None = None) -> ChatRequest:
    return ChatRequest.of([{"role": "system", "content": "Describe images."},
                           {"role": "user", "content": f'Expand "{text}".'}], seed, schema)


@pytest.fixture
def backend_calls(monkeypatch) -> list[int]:
    """The size of every batch that reaches FakeLLM's model (the cache misses)."""
    calls: list[int] = []
    original = FakeLLM._generate

    def counting(self, requests, params):
        calls.append(len(requests))
        return original(self, requests, params)

    monkeypatch.setattr(FakeLLM, "_generate", counting)
    return calls


def cached_llm(tmp_path: Path, **kwargs) -> FakeLLM:
    return FakeLLM(cache_path=str(tmp_path / "cache" / "llm.sqlite"), **kwargs)


def test_repeated_requests_are_answered_from_the_cache(tmp_path, backend_calls):
    llm = cached_llm(tmp_path)
    requests = [chat(f"a dog {i}", seed=i) for i in range(5)]
    first = llm.generate(requests, PARAMS)
    second = llm.generate(requests, PARAMS)
    assert backend_calls == [5]
    assert not any(c.cached for c in first) and all(c.cached for c in second)
    assert [c.text for c in second] == [c.text for c in first]
    assert [c.completion_tokens for c in second] == [c.completion_tokens for c in first]


def test_only_misses_reach_the_model_and_answers_keep_request_order(tmp_path, backend_calls):
    llm = cached_llm(tmp_path)
    old = [chat("a cat", seed=1), chat("a cat", seed=2)]
    llm.generate(old, PARAMS)
    new = [chat("a bus", seed=1)]
    mixed = [old[1], new[0], old[0], new[0]]  # the repeated new request is sent once
    answers = llm.generate(mixed, PARAMS)
    assert backend_calls == [2, 1]
    assert [c.cached for c in answers] == [True, False, True, False]
    uncached = FakeLLM(cache_enabled=False).generate(mixed, PARAMS)
    assert [c.text for c in answers] == [c.text for c in uncached]


@pytest.mark.parametrize("change", [
    "model", "message", "role", "seed", "no_seed", "schema", "temperature", "top_p",
    "max_tokens", "repeat_penalty",
])
def test_key_changes_with_every_part_of_the_request(change):
    request, params, model = chat("a red kite"), SamplingParams(), "llama_cpp:a.gguf"
    base = request_key(model, request, params)
    assert request_key(model, chat("a red kite"), SamplingParams()) == base
    changed = {
        "model": lambda: request_key("llama_cpp:b.gguf", request, params),
        "message": lambda: request_key(model, chat("a red kite."), params),
        "role": lambda: request_key(model, ChatRequest(
            (("user", request.messages[0][1]), request.messages[1]), 1), params),
        "seed": lambda: request_key(model, chat("a red kite", seed=2), params),
        "no_seed": lambda: request_key(model, chat("a red kite", seed=None), params),
        "schema": lambda: request_key(model, chat("a red kite", schema={"type": "object"}), params),
        "temperature": lambda: request_key(model, request, SamplingParams(temperature=0.0)),
        "top_p": lambda: request_key(model, request, SamplingParams(top_p=0.5)),
        "max_tokens": lambda: request_key(model, request, SamplingParams(max_tokens=161)),
        "repeat_penalty": lambda: request_key(model, request, SamplingParams(repeat_penalty=1.0)),
    }[change]()
    assert changed != base


def test_a_changed_request_misses(tmp_path, backend_calls):
    llm = cached_llm(tmp_path)
    llm.generate([chat("a boat")], PARAMS)
    llm.generate([chat("a boat", seed=2)], PARAMS)
    llm.generate([chat("a boat")], SamplingParams(max_tokens=33))
    llm.generate([chat("a boat")], PARAMS)
    assert backend_calls == [1, 1, 1]


def test_disabled_cache_asks_the_model_every_time_and_writes_nothing(tmp_path, backend_calls):
    llm = cached_llm(tmp_path, cache_enabled=False)
    requests = [chat("a tram", seed=i) for i in range(3)]
    llm.generate(requests, PARAMS)
    answers = llm.generate(requests, PARAMS)
    assert backend_calls == [3, 3]
    assert not any(c.cached for c in answers)
    assert not (tmp_path / "cache").exists()


def test_clear_deletes_all_entries_or_one_models(tmp_path, backend_calls):
    llm = cached_llm(tmp_path)
    cache = llm.response_cache()
    llm.generate([chat("a bird", seed=i) for i in range(3)], PARAMS)
    cache.put_many("other:model", [("k", Completion("text", 1, 1, "stop"))])
    assert cache.counts() == {"fake:deterministic": 3, "other:model": 1}
    assert cache.clear("other:model") == 1
    assert cache.counts() == {"fake:deterministic": 3}
    assert cache.clear() == 3
    assert cache.counts() == {}
    llm.generate([chat("a bird", seed=0)], PARAMS)
    assert backend_calls == [3, 1]


def test_cli_cache_clear_empties_the_profiles_cache(tmp_path, monkeypatch):
    from dagster_project import definitions
    from dagster_project.cli import app

    profile = tmp_path / "profile.yaml"
    profile.write_text(f"storage:\n  base_uri: {tmp_path / 'data'}\nllm:\n  backend: fake\n")
    monkeypatch.setenv("UNICORN_PROFILE_FILE", str(profile))
    monkeypatch.setattr(definitions, "defs", definitions.build_definitions())
    llm = definitions.defs.resources["llm"]
    assert Path(llm.cache_path) == tmp_path / "data" / "llm_cache.sqlite"
    llm.generate([chat("a kite", seed=i) for i in range(4)], PARAMS)

    runner = CliRunner()
    info = runner.invoke(app, ["cache", "info"])
    assert info.exit_code == 0 and "fake:deterministic\t4" in info.output
    cleared = runner.invoke(app, ["cache", "clear"])
    assert cleared.exit_code == 0, cleared.output
    assert "4 cached completion(s) deleted" in cleared.output
    assert llm.response_cache().counts() == {}


def test_a_failed_call_keeps_what_finished_and_returns_nothing(tmp_path, backend_calls):
    class FailsAfterTwo(FakeLLM):
        def _generate(self, requests, params):
            done = FakeLLM._generate(self, requests[:2], params)
            raise GenerationError("server went away", dict(enumerate(done)))

    requests = [chat("a horse", seed=i) for i in range(5)]
    with pytest.raises(GenerationError, match="server went away"):
        FailsAfterTwo(cache_path=str(tmp_path / "c.sqlite")).generate(requests, PARAMS)
    answers = FakeLLM(cache_path=str(tmp_path / "c.sqlite")).generate(requests, PARAMS)
    assert [c.cached for c in answers] == [True, True, False, False, False]
    assert backend_calls[-1] == 3


def test_wrong_answer_count_from_a_backend_fails(tmp_path):
    class DropsOne(FakeLLM):
        def _generate(self, requests, params):
            return FakeLLM._generate(self, requests, params)[:-1]

    with pytest.raises(GenerationError, match="2 completions for 3 requests"):
        DropsOne(cache_path=str(tmp_path / "c.sqlite")).generate(
            [chat("x", seed=i) for i in range(3)], PARAMS)
    assert ResponseCache(tmp_path / "c.sqlite").counts() == {}


class OneAtATime(FakeLLM):
    """FakeLLM that yields each completion as it is made, as llama_cpp does. Before each request
    it notes how many rows another connection sees in the cache; at request `dies_at` it fails
    with a plain error, as a crashed model would."""

    dies_at: int = -1
    _rows_seen: list = PrivateAttr(default_factory=list)

    def _generate(self, requests, params):
        for i, request in enumerate(requests):
            self._rows_seen.append(sum(ResponseCache(self.cache_path).counts().values()))
            if i == self.dies_at:
                raise RuntimeError("the model process died")
            yield from FakeLLM._generate(self, [request], params)


def test_each_completion_is_in_the_cache_as_soon_as_it_is_done(tmp_path, backend_calls):
    path = str(tmp_path / "c.sqlite")
    requests = [chat("a horse", seed=i) for i in range(6)]
    dying = OneAtATime(cache_path=path, dies_at=3)
    with pytest.raises(RuntimeError, match="died"):
        dying.generate(requests, PARAMS)
    assert dying._rows_seen == [0, 1, 2, 3]  # committed one by one, before the batch ended
    assert ResponseCache(path).counts() == {"fake:deterministic": 3}

    answers = FakeLLM(cache_path=path).generate(requests, PARAMS)
    assert [c.cached for c in answers] == [True] * 3 + [False] * 3
    assert backend_calls[-1] == 3  # the re-run paid only for what had not finished
    fresh = FakeLLM(cache_enabled=False).generate(requests, PARAMS)
    assert [c.text for c in answers] == [c.text for c in fresh]


def test_groups_a_backend_yields_are_kept_as_each_finishes(tmp_path):
    class InPairs(FakeLLM):
        def _generate(self, requests, params):
            for start in range(0, len(requests), 2):
                yield FakeLLM._generate(self, requests[start : start + 2], params)
                if start == 2:
                    raise GenerationError("the engine stopped")

    path = str(tmp_path / "c.sqlite")
    with pytest.raises(GenerationError, match="engine stopped"):
        InPairs(cache_path=path).generate([chat("a fox", seed=i) for i in range(7)], PARAMS)
    assert ResponseCache(path).counts() == {"fake:deterministic": 4}


def test_a_streaming_backend_with_too_few_or_too_many_answers_fails(tmp_path):
    class Yields(FakeLLM):
        extra: int = 0

        def _generate(self, requests, params):
            made = FakeLLM._generate(self, requests, params)
            yield from (made + made)[: len(requests) + self.extra]

    requests = [chat("y", seed=i) for i in range(3)]
    with pytest.raises(GenerationError, match="2 completions for 3 requests"):
        Yields(cache_path=str(tmp_path / "few.sqlite"), extra=-1).generate(requests, PARAMS)
    with pytest.raises(GenerationError, match="4 completions for 3 requests"):
        Yields(cache_path=str(tmp_path / "many.sqlite"), extra=1).generate(requests, PARAMS)


def _generate_one_at_a_time(path: str, worker: int) -> None:
    requests = [chat("a crowd", seed=i) for i in range(worker * 10, worker * 10 + 30)]
    answers = OneAtATime(cache_path=path).generate(requests, PARAMS)
    fresh = FakeLLM(cache_enabled=False).generate(requests, PARAMS)
    assert [c.text for c in answers] == [c.text for c in fresh]


def test_several_processes_commit_one_at_a_time_into_one_file(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_generate_one_at_a_time, args=(path, w)) for w in range(3)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
    assert [p.exitcode for p in workers] == [0, 0, 0]
    assert ResponseCache(path).counts() == {"fake:deterministic": 50}  # seeds 0..49, overlapping


def _write_and_read(path: str, worker: int) -> None:
    cache = ResponseCache(path, busy_timeout_s=30)
    for batch in range(10):
        keys = [f"w{worker}-b{batch}-{i}" for i in range(20)]
        cache.put_many(f"model-{worker}", [(k, Completion(k, 1, 2, "stop")) for k in keys])
        found = cache.get_many(keys)
        assert [found[k].text for k in keys] == keys


def test_several_processes_share_one_cache_file(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_write_and_read, args=(path, w)) for w in range(3)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
    assert [p.exitcode for p in workers] == [0, 0, 0]
    assert ResponseCache(path).counts() == {"model-0": 200, "model-1": 200, "model-2": 200}
    with sqlite3.connect(path) as con:
        assert con.execute("pragma journal_mode").fetchone() == ("wal",)


def test_journal_mode_is_checked():
    with pytest.raises(ValueError, match="journal mode"):
        ResponseCache("x.sqlite", journal_mode="wal; drop table completions")


def _stage1_metadata(result) -> dict:
    [mat] = [m for m in result.asset_materializations_for_node("expand_captions")
             if m.asset_key.path == ["expanded_captions"]]
    return {k: v.value for k, v in mat.metadata.items()}


def test_second_identical_stage1_run_makes_no_llm_calls(tmp_path, instance, seed_dir,
                                                         backend_calls):
    resources = make_resources(tmp_path / "data", seed_dir, llm=FakeLLM())
    captions = tmp_path / "data" / "expanded_captions" / "shard-a.parquet"

    first = materialize_shard(instance, resources, "shard-a")
    first_frame = pl.read_parquet(captions)
    calls_after_first = list(backend_calls)
    second = materialize_shard(instance, resources, "shard-a")

    assert first.success and second.success
    before, after = _stage1_metadata(first), _stage1_metadata(second)
    assert calls_after_first == [before["llm_requests"]] and before["llm_requests"] > 0
    assert backend_calls == calls_after_first  # the second run never reached the model
    assert before["cache_hits"] == 0 and before["cache_hit_rate"] == 0.0
    assert after["cache_hits"] == after["llm_requests"] == before["llm_requests"]
    assert after["cache_hit_rate"] == 1.0 and after["tokens_generated"] == 0
    assert pl.read_parquet(captions).equals(first_frame)
    assert (tmp_path / "data" / "llm_cache.sqlite").is_file()
