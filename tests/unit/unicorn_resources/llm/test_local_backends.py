"""The llama_cpp and transformers backends against the real offline SmolLM2-135M GGUF file, at tiny
token budgets (slow: a real model on the CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from unicorn_assets.logic.prompts import load_prompt_set
from unicorn_resources.llm import (
    ChatRequest,
    LlamaCppLLM,
    SamplingParams,
    TransformersLLM,
    default_gguf_path,
)

pytestmark = pytest.mark.slow

PROMPTS = load_prompt_set("stage1_expand", "v1")
EXPAND = ChatRequest.of(PROMPTS.messages("objects", caption="A red bus parked on a street."),
                        seed=11)
HELLO = ChatRequest.of([{"role": "user", "content": "Say hello."}], seed=12)


def test_the_offline_model_is_installed():
    path = Path(default_gguf_path())
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    llm = LlamaCppLLM(cache_enabled=False, n_ctx=512, n_threads=2)
    yield llm
    llm.teardown_after_execution(None)


def test_llama_cpp_and_torch_share_torchs_openmp_runtime():
    """A fresh process that loads the llama.cpp backend maps one libgomp, the one torch ships."""
    code = ("import json; from unicorn_resources.llm import LlamaCppLLM; "
            "LlamaCppLLM(n_ctx=256, cache_enabled=False)._load(); import torch; "
            "print(json.dumps(sorted({line.split()[-1] for line in open('/proc/self/maps') "
            "if 'libgomp' in line})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(loaded) == 1 and "/torch/lib/" in loaded[0], loaded


def test_llama_cpp_generates_within_the_token_budget(llama):
    params = SamplingParams(max_tokens=12)
    out = llama.generate([EXPAND, HELLO], params)
    assert len(out) == 2
    assert llama.model_id == f"llama_cpp:{Path(default_gguf_path()).name}"
    for completion in out:
        assert completion.text.strip() and not completion.cached
        assert 0 < completion.completion_tokens <= 12
        assert completion.finish_reason in ("stop", "length")
    assert out[0].prompt_tokens > out[1].prompt_tokens > 0  # the expansion prompt is longer
    assert out[0].finish_reason == "length"  # 12 tokens cannot finish a paragraph


def test_llama_cpp_sampling_seed_makes_it_reproducible(llama):
    params = SamplingParams(temperature=1.0, max_tokens=16)
    first = llama.generate([EXPAND], params)[0].text
    assert llama.generate([EXPAND], params)[0].text == first
    others = {llama.generate([ChatRequest(EXPAND.messages, seed=s)], params)[0].text
              for s in (1, 2, 3)}
    assert len(others | {first}) > 1  # another seed samples another text


def test_llama_cpp_answers_repeats_from_the_cache(tmp_path):
    llm = LlamaCppLLM(cache_path=str(tmp_path / "cache.sqlite"), n_ctx=512, n_threads=2)
    params = SamplingParams(max_tokens=8)
    fresh = llm.generate([HELLO], params)[0]
    again = llm.generate([HELLO], params)[0]
    assert not fresh.cached and again.cached and again.text == fresh.text
    llm.teardown_after_execution(None)


def test_llama_cpp_chat_format_overrides_the_files_template(llama):
    """A GGUF file without a chat template (Gemma 3 270M's) needs a chat format named: it is
    passed to llama.cpp, changes the prompt the model sees, and is part of the model id (and so of
    the response cache key)."""
    other = LlamaCppLLM(cache_enabled=False, n_ctx=512, n_threads=2, chat_format="llama-2")
    assert other.model_id == llama.model_id + ":llama-2"
    params = SamplingParams(max_tokens=1)
    own = llama.generate([HELLO], params)[0].prompt_tokens
    assert other.generate([HELLO], params)[0].prompt_tokens != own
    other.teardown_after_execution(None)


def test_transformers_batches_with_left_padding(tmp_path):
    """Greedy decoding: a short prompt padded on the left beside a long one gives the same tokens
    as the short prompt alone."""
    llm = TransformersLLM(cache_enabled=False, batch_size=2, n_threads=2)
    params = SamplingParams(temperature=0.0, max_tokens=6)
    batched = llm.generate([EXPAND, HELLO], params)
    alone = llm.generate([HELLO], params)[0]
    assert llm.model_id == f"transformers:{Path(default_gguf_path()).name}"
    assert llm._tokenizer.padding_side == "left"
    assert batched[1].text == alone.text and batched[1].text.strip()
    assert batched[1].completion_tokens == alone.completion_tokens <= 6
    assert batched[0].prompt_tokens > batched[1].prompt_tokens == alone.prompt_tokens
    assert batched[0].completion_tokens == 6 and batched[0].finish_reason == "length"
