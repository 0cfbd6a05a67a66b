"""The `openai` backend against loopback servers: small in-process HTTP servers for protocol
behaviour (concurrency cap, spreading, retries, malformed answers), and a real llama.cpp server
(`python -m llama_cpp.server`, SmolLM2) for the end-to-end runs (marked slow)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

import dagster as dg
import pytest

from tests.support import (
    coco_captions,
    failed_only_on_checks,
    make_resources,
    materialize_shard,
    write_jsonl,
)
from unicorn_resources.llm import (
    ChatRequest,
    GenerationError,
    OpenAILLM,
    ResponseCache,
    SamplingParams,
    default_gguf_path,
)

PARAMS = SamplingParams(max_tokens=16)
SHORT_RUN = {"ops": {"expand_captions": {"config": {"max_tokens": 16}}}}


def chat(text: str, seed: int | None = 7, schema: dict | None = None) -> ChatRequest:
    return ChatRequest.of([{"role": "user", "content": text}], seed, schema)


def completion_body(content: str) -> bytes:
    return json.dumps({
        "id": "c", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
    }).encode()


def echo(body: dict, attempt: int) -> tuple[int, dict, bytes]:
    """A well-formed answer that repeats the request's last message."""
    return 200, {}, completion_body(f"echo: {body['messages'][-1]['content']}")


class Tracker:
    """Requests in flight across every FakeServer that shares it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.in_flight = self.peak = 0

    def enter(self):
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)

    def leave(self):
        with self.lock:
            self.in_flight -= 1


class FakeServer:
    """A loopback chat-completions endpoint whose answers come from `behaviour(body, attempt)`;
    `attempt` counts the POSTs carrying the same first message."""

    def __init__(self, behaviour: Callable = echo, delay: float = 0.0,
                 tracker: Tracker | None = None):
        self.behaviour, self.delay, self.tracker = behaviour, delay, tracker or Tracker()
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []  # the Authorization header of each request
        self.attempts: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                server.tracker.enter()
                try:
                    with server.tracker.lock:
                        server.bodies.append(body)
                        server.auth.append(self.headers.get("authorization"))
                        key = body["messages"][-1]["content"]
                        server.attempts[key] = server.attempts.get(key, 0) + 1
                        attempt = server.attempts[key]
                    time.sleep(server.delay)
                    status, headers, payload = server.behaviour(body, attempt)
                finally:
                    server.tracker.leave()
                self.send_response(status)
                self.send_header("content-type", headers.pop("content-type", "application/json"))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"

    def __enter__(self) -> Self:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def llm_for(*urls: str, **kwargs) -> OpenAILLM:
    return OpenAILLM(model="m", base_urls=list(urls), cache_enabled=False,
                     **{"max_retries": 0, **kwargs})


# ---- protocol behaviour, against in-process servers ---------------------------------------------

def test_requests_run_concurrently_up_to_the_cap_spread_over_base_urls():
    tracker = Tracker()
    with FakeServer(delay=0.2, tracker=tracker) as a, FakeServer(delay=0.2, tracker=tracker) as b:
        requests = [chat(f"caption {i}") for i in range(12)]
        answers = llm_for(a.url, b.url, max_in_flight=4).generate(requests, PARAMS)
    assert [c.text for c in answers] == [f"echo: caption {i}" for i in range(12)]
    assert tracker.peak == 4
    assert len(a.bodies) + len(b.bodies) == 12 and a.bodies and b.bodies


def test_request_body_carries_sampling_seed_schema_and_key():
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    with FakeServer() as server:
        llm_for(server.url, api_key="k-123").generate(
            [chat("one", seed=11), chat("two", seed=None, schema=schema)],
            SamplingParams(temperature=0.3, top_p=0.8, max_tokens=12, repeat_penalty=1.2))
        llm_for(server.url, structured_output="json_object",
                repeat_penalty_param="repeat_penalty").generate([chat("three", schema=schema)],
                                                                PARAMS)
        llm_for(server.url, structured_output="none", repeat_penalty_param=None).generate(
            [chat("four", schema=schema)], PARAMS)
    one, two, three, four = sorted(server.bodies, key=lambda b: ["one", "two", "three", "four"]
                                   .index(b["messages"][0]["content"]))
    assert one["model"] == "m" and one["seed"] == 11
    assert (one["temperature"], one["top_p"], one["max_tokens"]) == (0.3, 0.8, 12)
    assert one["repetition_penalty"] == 1.2 and "response_format" not in one
    assert "seed" not in two
    assert two["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "output", "schema": schema, "strict": True}}
    assert three["response_format"] == {"type": "json_object", "schema": schema}
    assert three["repeat_penalty"] == PARAMS.repeat_penalty and "repetition_penalty" not in three
    assert "response_format" not in four and "repetition_penalty" not in four
    assert server.auth[:2] == ["Bearer k-123"] * 2


def test_each_answer_is_cached_while_the_call_still_runs(tmp_path):
    """Request n is answered once the cache holds the n answers before it (or after 3 s)."""
    cache = ResponseCache(tmp_path / "c.sqlite")
    rows_seen = []

    def after_the_earlier_answers_are_cached(body, attempt):
        n, deadline = int(body["messages"][-1]["content"]), time.monotonic() + 3
        while sum(cache.counts().values()) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        rows_seen.append(sum(cache.counts().values()))
        return echo(body, attempt)

    with FakeServer(after_the_earlier_answers_are_cached) as server:
        llm = OpenAILLM(model="m", base_urls=[server.url], max_in_flight=1, max_retries=0,
                        cache_path=str(cache.path))
        answers = llm.generate([chat(str(n)) for n in range(4)], PARAMS)
    assert rows_seen == [0, 1, 2, 3]
    assert [c.text for c in answers] == ["echo: 0", "echo: 1", "echo: 2", "echo: 3"]


def test_rate_limit_is_retried_with_backoff_then_succeeds():
    def limited(body, attempt):
        return (429, {}, b'{"error": {"message": "slow down"}}') if attempt == 1 else echo(body, 1)

    with FakeServer(limited) as server:
        started = time.perf_counter()
        answers = llm_for(server.url, max_retries=2).generate([chat("a"), chat("b")], PARAMS)
        waited = time.perf_counter() - started
    assert [c.text for c in answers] == ["echo: a", "echo: b"]
    assert server.attempts == {"a": 2, "b": 2}
    assert waited >= 0.5 * 0.75  # the first backoff step, less at most 25 % jitter


def test_server_errors_exhaust_the_retries_then_fail_the_call():
    busy = FakeServer(lambda body, attempt: (503, {}, b'{"error": {"message": "busy"}}'))
    started = time.perf_counter()
    with busy as server, pytest.raises(GenerationError, match=r"HTTP 503 \(after 2 retries") as err:
        llm_for(server.url, max_retries=2).generate([chat("a")], PARAMS)
    waited = time.perf_counter() - started
    assert server.attempts == {"a": 3}
    assert waited >= (0.5 + 1.0) * 0.75  # exponential: 0.5 s then 1 s, each less its jitter
    assert err.value.retryable


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_other_client_errors_fail_at_once_without_retry(status):
    refusing = FakeServer(lambda body, attempt: (status, {}, b'{"error": {"message": "no"}}'))
    with refusing as server, pytest.raises(GenerationError,
                                           match=f"HTTP {status} \\(not retried") as err:
        llm_for(server.url, max_retries=3).generate([chat("a")], PARAMS)
    assert server.attempts == {"a": 1}
    assert not err.value.retryable and not err.value.allow_retries


def test_api_key_is_redacted_from_errors():
    def echoes_key(body, attempt):
        return 401, {}, b'{"error": {"message": "Incorrect API key provided: sk-secret-42"}}'

    with FakeServer(echoes_key) as server, pytest.raises(GenerationError) as err:
        llm_for(server.url, api_key="sk-secret-42").generate([chat("a")], PARAMS)
    assert "sk-secret-42" not in str(err.value) and "***" in str(err.value)


def test_an_answer_that_is_not_a_chat_completion_fails_clearly():
    html = (200, {"content-type": "text/html"}, b"<html>gateway login</html>")
    with FakeServer(lambda body, attempt: html) as server, pytest.raises(
            GenerationError, match="did not answer a chat completion"):
        llm_for(server.url).generate([chat("a")], PARAMS)
    empty = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                        "choices": []}).encode()
    with FakeServer(lambda body, attempt: (200, {}, empty)) as server, pytest.raises(
            GenerationError, match="holds no message content"):
        llm_for(server.url).generate([chat("a")], PARAMS)


def test_timeout_fails_clearly():
    with FakeServer(delay=1.5) as server, pytest.raises(
            GenerationError, match="no answer within timeout_s=0.3"):
        llm_for(server.url, timeout_s=0.3).generate([chat("a")], PARAMS)


def step_failures(result: dg.ExecuteInProcessResult) -> list[str]:
    return [e.step_failure_data.error.message for e in result.all_events if e.is_step_failure]


def test_malformed_json_fails_the_run_and_writes_no_partition(tmp_path, instance, seed_dir):
    def malformed(body, attempt):
        # valid for the first requests, then a body cut off mid-object
        return echo(body, attempt) if len(server.bodies) <= 3 else (200, {}, b'{"id": "c", "cho')

    with FakeServer(malformed) as server:
        llm = llm_for(server.url, max_in_flight=1, max_retries=2)
        resources = make_resources(tmp_path / "data", seed_dir, llm=llm)
        result = materialize_shard(instance, resources, "shard-a", raise_on_error=False)
    assert not result.success
    [message] = step_failures(result)  # one attempt: not retried by the asset's RetryPolicy
    assert "the server answered malformed JSON" in message
    assert "3 of 4 requests had finished" in message  # 4 seeds, one expansion each
    assert (tmp_path / "data" / "caption_seeds" / "shard-a.parquet").is_file()
    assert not (tmp_path / "data" / "expanded_captions" / "shard-a.parquet").exists()
    assert not (tmp_path / "data" / "expanded_caption_rejects" / "shard-a.parquet").exists()


# ---- a real llama.cpp server on loopback ---------------------------------------------------------

API_KEY_ENV = "UNICORN_TEST_LLM_API_KEY"
SERVER_KEY = "sk-loopback-7f3a9c"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`python -m llama_cpp.server` serving the offline SmolLM2 GGUF on a loopback port."""

    def __init__(self, port: int, log: Path, api_key: str | None = None):
        self.port, self.log, self.api_key = port, log, api_key
        self.url = f"http://127.0.0.1:{port}/v1"
        self.proc: subprocess.Popen | None = None
        self.completed = 0  # chat completions answered, from the server's access log
        self.on_completed: Callable[[int], None] = lambda n: None

    def start(self, timeout: float = 90) -> LlamaServer:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", default_gguf_path(),
               "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "1024"]
        if self.api_key:
            cmd += ["--api_key", self.api_key]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        threading.Thread(target=self._drain, args=(self.proc,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited: {self.log.read_text()[-2000:]}")
            try:
                request = urllib.request.Request(
                    f"{self.url}/models", headers={"Authorization": f"Bearer {self.api_key}"})
                with urllib.request.urlopen(request, timeout=2):
                    return self
            except OSError:
                time.sleep(0.3)
        pytest.fail(f"llama_cpp.server not ready in {timeout}s: {self.log.read_text()[-2000:]}")

    def _drain(self, proc: subprocess.Popen) -> None:
        with self.log.open("a") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if '"POST /v1/chat/completions HTTP/1.1" 200' in line:
                    self.completed += 1
                    self.on_completed(self.completed)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@contextmanager
def llama_server(tmp: Path, api_key: str | None = None) -> Iterator[LlamaServer]:
    server = LlamaServer(free_port(), tmp / "llama_server.log", api_key)
    try:
        yield server.start()
    finally:
        server.kill()


@pytest.fixture(scope="module")
def shared_llama_server(tmp_path_factory) -> Iterator[LlamaServer]:
    """One real server for this module's tests; it demands SERVER_KEY."""
    with llama_server(tmp_path_factory.mktemp("llama"), SERVER_KEY) as server:
        yield server


def real_llm(server: LlamaServer, **kwargs) -> OpenAILLM:
    return OpenAILLM(**{"model": "smollm2", "base_urls": [server.url],
                        "api_key": dg.EnvVar(API_KEY_ENV), "structured_output": "json_object",
                        "repeat_penalty_param": "repeat_penalty", "max_retries": 1, **kwargs})


@pytest.mark.slow
def test_real_server_concurrent_answers_match_one_at_a_time(shared_llama_server):
    requests = [chat(f"Describe a {thing} in one sentence.", seed=i)
                for i, thing in enumerate(["kite", "tram", "lamp", "boat", "dog", "bench"])]
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    kwargs = {"api_key": SERVER_KEY, "cache_enabled": False}
    one_by_one = real_llm(shared_llama_server, max_in_flight=1, **kwargs).generate(requests, greedy)
    together = real_llm(shared_llama_server, max_in_flight=3, **kwargs).generate(requests, greedy)
    assert [c.text for c in together] == [c.text for c in one_by_one]
    assert all(c.text.strip() and 0 < c.completion_tokens <= 16 for c in together)


@pytest.mark.slow
def test_real_server_json_schema_output(shared_llama_server):
    schema = {"type": "object", "properties": {"colour": {"type": "string"}},
              "required": ["colour"]}
    [answer] = real_llm(shared_llama_server, api_key=SERVER_KEY, cache_enabled=False).generate(
        [chat("Name the colour of the sky as JSON.", schema=schema)],
        SamplingParams(temperature=0.0, max_tokens=24))
    assert isinstance(json.loads(answer.text)["colour"], str)


@pytest.mark.slow
def test_real_server_wrong_key_fails_at_once(shared_llama_server):
    with pytest.raises(GenerationError, match=r"HTTP 401 \(not retried") as err:
        real_llm(shared_llama_server, api_key="sk-wrong", cache_enabled=False).generate(
            [chat("hello")], PARAMS)
    assert "sk-wrong" not in str(err.value)


@pytest.mark.slow
def test_real_server_stage1_run_takes_the_key_from_env_and_never_records_it(
        tmp_path, instance, monkeypatch, shared_llama_server):
    monkeypatch.setenv(API_KEY_ENV, SERVER_KEY)
    seeds = tmp_path / "seeds"
    write_jsonl(seeds / "shard-k.jsonl", coco_captions(2))
    resources = make_resources(tmp_path / "data", seeds, llm=real_llm(shared_llama_server,
                                                                     max_in_flight=2))
    result = materialize_shard(instance, resources, "shard-k", run_config=SHORT_RUN,
                               raise_on_error=False)
    assert failed_only_on_checks(result)  # 16-token captions fail the caption gates
    [mat] = [m for m in result.asset_materializations_for_node("expand_captions")
             if m.asset_key.path == ["expanded_captions"]]
    assert mat.metadata["llm_requests"].value == 2  # 2 seeds, one expansion each
    assert mat.metadata["model_id"].value == "openai:smollm2"
    records = instance.all_logs(result.run_id)
    assert records and not any(SERVER_KEY in dg.serialize_value(r) for r in records)
    run = instance.get_run_by_id(result.run_id)
    assert SERVER_KEY not in json.dumps(run.run_config) + json.dumps(run.tags)


@pytest.mark.slow
def test_server_killed_mid_run_writes_no_partition_and_the_retry_reuses_the_cache(
        tmp_path, instance):
    seeds = tmp_path / "seeds"
    write_jsonl(seeds / "shard-x.jsonl", coco_captions(4, offset=10))
    captions = tmp_path / "data" / "expanded_captions" / "shard-x.parquet"
    seen: dict[str, object] = {}
    with llama_server(tmp_path) as server:
        def kill_after_two(n: int) -> None:
            if n == 2:
                server.kill()
                threading.Thread(target=restart_after_failure, daemon=True).start()

        def restart_after_failure() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and "failure" not in seen:
                runs = instance.get_runs(limit=1)
                retry = runs and instance.all_logs(
                    runs[0].run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY)
                if retry:
                    seen["failure"] = retry[0].dagster_event.event_specific_data.error.to_string()
                    seen["partition_written"] = captions.exists()
                time.sleep(0.1)
            server.start()  # same port, within the RetryPolicy's 10 s delay

        server.on_completed = kill_after_two
        llm = OpenAILLM(model="smollm2", base_urls=[server.url], max_in_flight=2, max_retries=1,
                        structured_output="json_object", repeat_penalty_param="repeat_penalty")
        resources = make_resources(tmp_path / "data", seeds, llm=llm)
        result = materialize_shard(instance, resources, "shard-x", run_config=SHORT_RUN,
                                   raise_on_error=False)

    assert "server unreachable after 1 retries" in seen["failure"]
    assert seen["partition_written"] is False
    assert failed_only_on_checks(result) and captions.is_file()
    [mat] = [m for m in result.asset_materializations_for_node("expand_captions")
             if m.asset_key.path == ["expanded_captions"]]
    requests, hits = mat.metadata["llm_requests"].value, mat.metadata["cache_hits"].value
    assert requests == 4 and 1 <= hits < requests  # what finished before the kill was not paid again
