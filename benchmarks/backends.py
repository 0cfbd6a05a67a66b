"""2. Backend choice: generated tokens/s of the llama_cpp and transformers LLM resources on the same
GGUF file (SmolLM2-135M-Instruct; transformers dequantises it to float32) and the same Stage 1
prompts, sampling parameters and seeds. The response cache is off; model load is timed apart.
transformers runs its batched path (batch_size requests per generate call) and, to show what
batching buys, a naive loop of one request per call."""

from __future__ import annotations

import os
import time
from typing import Any

from benchmarks.common import Row, coco_captions, interleaved, median
from unicorn_assets.logic.prompts import load_prompt_set
from unicorn_resources.llm import ChatRequest, LlamaCppLLM, SamplingParams, TransformersLLM

FULL = {"prompts": 8, "max_tokens": 24, "runs": 3}
SMOKE = {"prompts": 2, "max_tokens": 2, "runs": 1}
BENCH = "2. Backend choice"


def requests(n: int) -> list[ChatRequest]:
    prompts = load_prompt_set("stage1_expand", "v1")
    styles = list(prompts.styles)
    return [ChatRequest.of(prompts.messages(styles[i % len(styles)], caption=rec["caption"]),
                           seed=1000 + i)
            for i, rec in enumerate(coco_captions(n, one_per_image=True))]


def throughput(llm: Any, batch: list[ChatRequest], params: SamplingParams) -> dict[str, float]:
    started = time.perf_counter()
    completions = llm.generate(batch, params)
    seconds = time.perf_counter() - started
    tokens = sum(c.completion_tokens for c in completions)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def loaded(llm: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    llm._load()  # what setup_for_execution does once per run
    return llm, time.perf_counter() - started


def run(size: dict[str, Any]) -> list[Row]:
    batch = requests(size["prompts"])
    params = SamplingParams(max_tokens=size["max_tokens"])
    llama, llama_load = loaded(LlamaCppLLM(cache_enabled=False))
    cores = os.cpu_count() or 1
    llama_all, _ = loaded(LlamaCppLLM(cache_enabled=False, n_threads=cores))
    hf, hf_load = loaded(TransformersLLM(cache_enabled=False, batch_size=size["prompts"]))
    hf_single = hf.model_copy(update={"batch_size": 1})  # shares the loaded model
    for llm in (llama, llama_all, hf):  # warm up: not timed
        throughput(llm, batch[:1], params)
    results = interleaved(size["runs"],
                          llama_cpp=lambda: throughput(llama, batch, params),
                          llama_cpp_all_cores=lambda: throughput(llama_all, batch, params),
                          transformers=lambda: throughput(hf, batch, params),
                          transformers_loop=lambda: throughput(hf_single, batch, params))
    rate = {name: median([r["tokens_per_s"] for r in rs]) for name, rs in results.items()}
    details = {
        "prompts": size["prompts"], "max_tokens": size["max_tokens"],
        "model_file": llama.resolved_path.rsplit("/", 1)[-1],
        "load_seconds": {"llama_cpp": round(llama_load, 2), "transformers": round(hf_load, 2)},
        "tokens": {name: [r["tokens"] for r in rs] for name, rs in results.items()},
        "seconds": {name: [round(r["seconds"], 3) for r in rs] for name, rs in results.items()},
    }
    return [
        Row(BENCH, f"tokens/s, transformers (float32, batch of {size['prompts']})",
            rate["transformers"], "tokens/s", f"llama_cpp ({details['model_file']})", rate["llama_cpp"],
            runs=size["runs"], note=f"same GGUF, prompts and seeds; load: llama_cpp "
            f"{llama_load:.1f} s, transformers {hf_load:.1f} s (dequantise)", details=details),
        Row(BENCH, f"tokens/s, transformers batched ({size['prompts']} per call)",
            rate["transformers"], "tokens/s", "transformers, one request per call",
            rate["transformers_loop"], runs=size["runs"],
            note="what batching buys over a naive loop on the same model"),
        Row(BENCH, f"tokens/s, llama_cpp with n_threads={cores} (all cores)",
            rate["llama_cpp_all_cores"], "tokens/s", "llama_cpp with n_threads unset (the default)",
            rate["llama_cpp"], runs=size["runs"],
            note="unset, llama-cpp-python generates on cpu_count // 2 threads"),
    ]
