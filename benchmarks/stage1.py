"""1. Stage 1 against the raw backend: captions/s through the whole `expanded_captions`
materialisation (Dagster run on a persistent instance, resource setup with the model load, filters,
Parquet writes, catalog refresh, asset checks) against a bare loop that loads the same llama.cpp
model and calls it on the same prompts, sampling seeds and token budget. Both include the model
load; the response cache is off."""

from __future__ import annotations

import os
import time
from typing import Any

import dagster as dg
import polars as pl

from benchmarks.common import (
    Row,
    coco_captions,
    failed_checks,
    interleaved,
    median,
    pipeline,
    run_metadata,
    workdir,
    write_seed_shards,
)
from unicorn_assets.expansion import ExpansionConfig
from unicorn_assets.logic.expansion import plan_expansions
from unicorn_assets.logic.prompts import load_prompt_set
from unicorn_assets.partitions import SEED_SHARDS

FULL = {"seeds": 64, "max_tokens": 48, "runs": 5}
SMOKE = {"seeds": 2, "max_tokens": 4, "runs": 1}
SHARD = "bench-stage1"
BENCH = "1. Stage 1 vs raw llama.cpp"

seeds_job = dg.define_asset_job("bench_seeds", selection=dg.AssetSelection.groups("unicorn_seeds"))
stage1_job = dg.define_asset_job(  # the multi-asset with its checks
    "bench_stage1",
    selection=dg.AssetSelection.assets("expanded_captions", "expanded_caption_rejects"))


def raw_loop(llm: Any, requests: list[tuple[list[dict], int]], config: ExpansionConfig) -> dict:
    """Load the model as LlamaCppLLM does, then one create_chat_completion per request."""
    from llama_cpp import Llama

    started = time.perf_counter()
    model = Llama(model_path=llm.resolved_path, n_ctx=llm.n_ctx, n_threads=llm.n_threads,
                  n_batch=llm.n_batch, verbose=False)
    loaded = time.perf_counter()
    tokens = 0
    for messages, seed in requests:
        response = model.create_chat_completion(
            messages=messages, temperature=config.temperature, top_p=config.top_p,
            max_tokens=config.max_tokens, repeat_penalty=config.repeat_penalty, seed=seed)
        tokens += response["usage"]["completion_tokens"]
    finished = time.perf_counter()
    model.close()  # the pipeline's wall time includes the resource teardown too
    return {"seconds": time.perf_counter() - started, "load_average": os.getloadavg()[0],
            "load_seconds": loaded - started,
            "generation_seconds": finished - loaded, "tokens": tokens}


def run(size: dict[str, Any]) -> list[Row]:
    config = ExpansionConfig(expansions_per_seed=1, max_tokens=size["max_tokens"])
    run_config = {"ops": {"expand_captions": {"config": config.model_dump()}}}
    llm_section = {"backend": "llama_cpp", "cache_enabled": False}
    with workdir("stage1") as tmp:
        write_seed_shards(tmp / "seeds", {SHARD: coco_captions(size["seeds"], one_per_image=True)})
        with pipeline(tmp, tmp / "seeds", llm_section, [seeds_job, stage1_job]) as (instance, defs):
            instance.add_dynamic_partitions(SEED_SHARDS, [SHARD])
            defs.resolve_job_def("bench_seeds").execute_in_process(instance=instance,
                                                                   partition_key=SHARD)
            llm = defs.resources["llm"]
            seeds = pl.read_parquet(defs.resources["io_manager"].uri("caption_seeds", SHARD))
            prompts = load_prompt_set(config.prompt, config.prompt_version)
            plan = plan_expansions(seeds, prompts, config.styles, config.expansions_per_seed,
                                   config.sampling_seed)
            requests = [(prompts.messages(style, caption=caption), seed) for style, caption, seed
                        in plan.select("style", "seed_caption", "sampling_seed").iter_rows()]
            job = defs.resolve_job_def("bench_stage1")

            def materialise() -> dict:
                started = time.perf_counter()
                result = job.execute_in_process(instance=instance, partition_key=SHARD,
                                                run_config=run_config, raise_on_error=False)
                seconds = time.perf_counter() - started
                if not run_metadata(result, "expanded_captions", "llm_requests"):
                    raise RuntimeError(f"the Stage 1 run {result.run_id} wrote no captions")
                return {"seconds": seconds, "load_average": os.getloadavg()[0],
                        "generation_seconds": run_metadata(result, "expanded_captions",
                                                           "generation_seconds")[0],
                        "tokens": run_metadata(result, "expanded_captions", "tokens_generated")[0],
                        "failed_checks": failed_checks(result)}

            # warm both paths once (imports, page cache of the GGUF file): not timed
            materialise()
            raw_loop(llm, requests[:1], config)
            results = interleaved(size["runs"], pipeline=materialise,
                                  raw=lambda: raw_loop(llm, requests, config))

    n = len(requests)
    pipe, raw = results["pipeline"], results["raw"]
    pipe_rate = median([n / r["seconds"] for r in pipe])
    raw_rate = median([n / r["seconds"] for r in raw])
    pipe_gen = median([r["generation_seconds"] for r in pipe])
    raw_gen = median([r["generation_seconds"] for r in raw])
    overhead = median([r["seconds"] - r["generation_seconds"] for r in pipe])
    details = {
        "seeds": size["seeds"], "requests": n, "max_tokens": size["max_tokens"],
        "expansions_per_seed": 1, "model": llm.model_id, "load_time": "included in both",
        "pipeline_seconds": [round(r["seconds"], 3) for r in pipe],
        "ratio_per_round": [round(r["seconds"] / p["seconds"], 3) for p, r in zip(pipe, raw)],
        "load_average_after_each": {"pipeline": [round(r["load_average"], 2) for r in pipe],
                                    "raw": [round(r["load_average"], 2) for r in raw]},
        "raw_seconds": [round(r["seconds"], 3) for r in raw],
        "pipeline_generation_seconds_per_round": [round(r["generation_seconds"], 3) for r in pipe],
        "raw_generation_seconds_per_round": [round(r["generation_seconds"], 3) for r in raw],
        "pipeline_tokens": [r["tokens"] for r in pipe], "raw_tokens": [r["tokens"] for r in raw],
        "same_tokens": {r["tokens"] for r in pipe} == {r["tokens"] for r in raw},
        "pipeline_generation_seconds": round(pipe_gen, 3),
        "raw_generation_seconds": round(raw_gen, 3),
        "raw_load_seconds": round(median([r["load_seconds"] for r in raw]), 3),
        "pipeline_seconds_outside_model": round(overhead, 3),
        "failed_checks": sorted({c for r in pipe for c in r["failed_checks"]}),
    }
    paired = median(details["ratio_per_round"])  # each round ran both, back to back
    details["ratio_of_medians"] = round(pipe_rate / raw_rate, 3)
    return [
        Row(BENCH, f"captions/s, expanded_captions materialisation ({size['seeds']} seeds, "
            f"{size['max_tokens']} tokens)", pipe_rate, "captions/s", "bare llama.cpp loop",
            raw_rate, ratio=paired, target=">= 0.9", met=paired >= 0.9, runs=size["runs"],
            note=f"paired ratio (median over rounds; ratio of medians {pipe_rate / raw_rate:.3f}); "
            f"same prompts, seeds, budget, tokens equal: {details['same_tokens']}; model load in "
            f"both; {overhead:.2f} s/run outside the model", details=details),
        Row(BENCH, "seconds in the model call inside the asset", pipe_gen, "s",
            "bare loop, model calls only", raw_gen, runs=size["runs"],
            note="the same model work on both sides: the gap in the row above is orchestration"),
    ]
