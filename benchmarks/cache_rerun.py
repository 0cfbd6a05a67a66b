"""Stage 1 run twice, identically, with the real llama.cpp backend: the second run must be answered
by the response cache (no LLM call) and take under 10 % of the first run's wall time.

    .venv/bin/python benchmarks/cache_rerun.py [--seeds 6] [--sampling-seeds 1234 99]

Each sampling seed is a fresh pair of runs (first: empty cache; second: identical). Everything runs
in this process on a temporary Dagster instance; results go to benchmarks/cache_rerun.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import dagster as dg

from dagster_project.profiles import build_resources
from unicorn_assets.caption_seeds import read_caption_seeds
from unicorn_assets.expansion import expand_captions
from unicorn_assets.partitions import SEED_SHARDS
from unicorn_resources.llm import LlamaCppLLM

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT.parent / "shared" / "data" / "coco_val2017_captions_dev.jsonl"
SHARD = "bench"


def write_seeds(folder: Path, n: int) -> None:
    """The first `n` COCO captions of distinct images."""
    rows, images = [], set()
    with COCO.open() as handle:
        for line in handle:
            rec = json.loads(line)
            if rec["image_id"] not in images:
                images.add(rec["image_id"])
                rows.append(line if line.endswith("\n") else line + "\n")
            if len(rows) == n:
                break
    folder.mkdir(parents=True)
    (folder / f"{SHARD}.jsonl").write_text("".join(rows))


def count_backend_calls() -> list[int]:
    """Record the size of every batch that reaches the model (the cache misses)."""
    calls: list[int] = []
    original = LlamaCppLLM._generate

    def counting(self, requests, params):
        calls.append(len(requests))
        return original(self, requests, params)

    LlamaCppLLM._generate = counting
    return calls


def stage1_metadata(result: dg.ExecuteInProcessResult) -> dict:
    [mat] = [m for m in result.asset_materializations_for_node("expand_captions")
             if m.asset_key.path == ["expanded_captions"]]
    keys = ("llm_requests", "cache_hits", "cache_hit_rate", "tokens_generated",
            "generation_seconds", "model_id")
    return {k: mat.metadata[k].value for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6, help="seed captions in the shard")
    parser.add_argument("--sampling-seeds", type=int, nargs="+", default=[1234, 99])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args()

    calls = count_backend_calls()
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        write_seeds(tmp_path / "seeds", args.seeds)
        resources = build_resources({
            "storage": {"base_uri": str(tmp_path / "data")},
            "seeds": {"location": str(tmp_path / "seeds")},
            "llm": {"backend": "llama_cpp"},
        })
        (tmp_path / "dagster_home").mkdir()
        with dg.DagsterInstance.local_temp(str(tmp_path / "dagster_home")) as instance:
            instance.add_dynamic_partitions(SEED_SHARDS, [SHARD])
            for sampling_seed in args.sampling_seeds:
                run_config = {"ops": {"expand_captions": {"config": {
                    "sampling_seed": sampling_seed}}}}
                runs = []
                for attempt in ("first", "second"):
                    before = len(calls)
                    started = time.perf_counter()
                    result = dg.materialize([read_caption_seeds, expand_captions],
                                            partition_key=SHARD, resources=resources,
                                            instance=instance, run_config=run_config)
                    seconds = time.perf_counter() - started
                    runs.append({"run": attempt, "wall_seconds": round(seconds, 3),
                                 "backend_calls": len(calls) - before,
                                 "requests_sent_to_model": sum(calls[before:]),
                                 **stage1_metadata(result)})
                ratio = runs[1]["wall_seconds"] / runs[0]["wall_seconds"]
                pairs.append({"sampling_seed": sampling_seed, "runs": runs,
                              "second_over_first": round(ratio, 4)})
                print(f"sampling_seed {sampling_seed}: first {runs[0]['wall_seconds']:.2f}s "
                      f"({runs[0]['llm_requests']} requests, {runs[0]['tokens_generated']} tokens"
                      f"), second {runs[1]['wall_seconds']:.2f}s (hit rate "
                      f"{runs[1]['cache_hit_rate']:.0%}, {runs[1]['backend_calls']} model calls)"
                      f": {ratio:.1%} of the first")

    report = {
        "benchmark": "Stage 1 re-run answered by the LLM response cache",
        "backend": "llama_cpp", "model_id": pairs[0]["runs"][0]["model_id"],
        "seed_captions": args.seeds,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "pairs": pairs,
        "max_second_over_first": max(p["second_over_first"] for p in pairs),
        "second_runs_made_no_llm_calls": all(p["runs"][1]["backend_calls"] == 0 for p in pairs),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"max second/first: {report['max_second_over_first']:.1%}; "
          f"second runs made no LLM calls: {report['second_runs_made_no_llm_calls']}; "
          f"written to {args.out}")


if __name__ == "__main__":
    main()
