"""A llama.cpp generation killed with SIGKILL halfway keeps what had finished: the response cache
holds each completion as soon as it is done, so the re-run pays only for the rest (slow: the real
SmolLM2-135M model on the CPU, 20 short requests, about 10-60 s)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import unicorn_resources
from unicorn_resources.llm import ChatRequest, LlamaCppLLM, ResponseCache, SamplingParams

pytestmark = pytest.mark.slow

PARAMS = SamplingParams(max_tokens=12)
CAPTIONS = ["A red bus parked on a street.", "Two dogs run across a beach.",
            "A bowl of fruit on a wooden table.", "A man rides a bicycle past a shop.",
            "A kitchen with a white stove.", "A cat sleeps on a sofa.",
            "A train waits at a platform.", "Children fly a kite in a park.",
            "A plate of pasta beside a glass of wine.", "A boat on a calm lake."]
N_REQUESTS = 20

# The run to kill: it prints "finished" after each completion the model returns.
CHILD = """
import sys
from test_llm_crash import PARAMS, crash_requests, llama_at
llm = llama_at(sys.argv[1])
model = llm._load()
complete = model.create_chat_completion
def announced(**kwargs):
    answer = complete(**kwargs)
    print("finished", flush=True)
    return answer
model.create_chat_completion = announced
llm.generate(crash_requests(), PARAMS)
print("all done", flush=True)
"""


def crash_requests() -> list[ChatRequest]:
    return [ChatRequest.of([{"role": "user", "content": f"Describe this image: {caption}"}],
                           seed=seed)
            for seed in range(N_REQUESTS // len(CAPTIONS)) for caption in CAPTIONS]


def llama_at(cache_path: str) -> LlamaCppLLM:
    return LlamaCppLLM(cache_path=cache_path, n_ctx=256, n_threads=1)


def kill_after(cache_path: Path, finished: int, log: Path) -> subprocess.Popen:
    """Start the run in a process of its own and SIGKILL it once `finished` completions are done."""
    code_root = Path(unicorn_resources.__file__).parents[1]
    path = [str(code_root), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    with log.open("w") as stderr:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(cache_path)], env=env,
                                 stdout=subprocess.PIPE, stderr=stderr, text=True)
    watchdog = threading.Timer(240, child.kill)
    watchdog.start()
    try:
        seen = 0
        for line in child.stdout:
            seen += line.strip() == "finished"
            if seen == finished:
                os.kill(child.pid, signal.SIGKILL)
                break
        child.wait(timeout=60)
    finally:
        watchdog.cancel()
        child.stdout.close()
    assert seen == finished, f"the run ended after {seen} completions: {log.read_text()[-2000:]}"
    return child


def test_a_run_killed_halfway_keeps_what_finished_and_the_rerun_pays_for_the_rest(tmp_path):
    cache_path = tmp_path / "llm_cache.sqlite"
    half = N_REQUESTS // 2
    child = kill_after(cache_path, half, tmp_path / "child.log")
    assert child.returncode == -signal.SIGKILL
    kept = sum(ResponseCache(cache_path).counts().values())
    assert kept >= half - 1  # the one whose commit the kill may have beaten is lost

    llm = llama_at(str(cache_path))
    model = llm._load()
    calls = []
    complete = model.create_chat_completion
    model.create_chat_completion = lambda **kwargs: calls.append(1) or complete(**kwargs)
    requests = crash_requests()
    answers = llm.generate(requests, PARAMS)
    hits = sum(a.cached for a in answers)
    assert hits == kept and len(calls) == N_REQUESTS - hits
    assert len(calls) <= 0.55 * N_REQUESTS
    assert [a.cached for a in answers] == [True] * hits + [False] * (N_REQUESTS - hits)
    # What the cache kept is the model's own answer to that request, not a neighbour's.
    [again] = llm._generate(requests[hits - 1 : hits], PARAMS)
    assert again.text == answers[hits - 1].text
    llm.teardown_after_execution(None)
