"""Capacity at the paper's scale (1.2M seeds) on the `cluster` profile: pure arithmetic from the
stated inputs below, each with its source. Nothing here is measured on a GPU.

    .venv/bin/python -m benchmarks.capacity            # prints the table (Markdown)
    .venv/bin/python -m benchmarks.capacity --seeds-per-shard 1000

`benchmarks.run` appends the printed section to BENCHMARKS.md (after the measured rows).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

LAMBDA = "https://github.com/LambdaLabsML/vllm-benchmark/blob/main/benchmark_v0.md"
BASETEN = ("https://www.baseten.co/blog/sdxl-inference-in-under-2-seconds-the-ultimate-guide-to-"
           "stable-diffusion-optimiza/")
H100 = "https://www.nvidia.com/en-us/data-center/h100/"


@dataclass(frozen=True)
class Inputs:
    # --- the paper (Unicorn v2) and the cluster profile (dagster_project/profiles/cluster.yaml)
    seeds: int = 1_200_000                 # paper: 1.2M seed captions
    caption_tokens: int = 170              # paper: 129 words per caption on average, ~1.3 tokens/word
    stage2_fraction: float = 0.3925        # cluster.yaml stage2.sample_fraction (471K of 1.2M)
    qa_pairs: float = 7.0                  # paper: 6-8 QA pairs per record (the mean)
    tokens_per_qa_pair: int = 60           # ours: a ~15-token question and a ~45-token answer
    shard_runs_per_backfill_run: int = 8   # unicorn_assets/partitions.py SHARD_BACKFILL
    seeds_per_shard: int = 10_000          # ours: one seed file per shard (the profile sets none)
    vllm_replicas: int = 4                 # cluster.yaml: 4 x `vllm serve --tensor-parallel-size 4`
    gpus_per_replica: int = 4
    clip_windows_per_caption: int = 3      # chunk_mean: 170 tokens in 77-token windows, 16 overlap
    synthvlm_images_per_caption: int = 2   # unicorn_assets/synthvlm.py images_per_caption
    sdxl_steps: int = 60                   # cluster.yaml diffusion.steps (base + refiner)
    # --- published throughput (output tokens/s of one replica), with the source
    # Llama-3.1-70B, tp=4 on 4xH100-80GB, vLLM v0.6.0, 10 scheduler steps, 5000 prompts (LAMBDA):
    # the stand-in for Qwen2.5-72B (same size class, GQA); v0.5.4 gave 1491.93.
    tok_s_72b: float = 3542.88
    tok_s_72b_low: float = 1491.93
    # Llama-3.1-8B, tp=1 on 1xH100 (LAMBDA), for Qwen2.5-7B (the gpu profile / compose vllm);
    # v0.5.4 gave 3032.04.
    tok_s_7b: float = 8088.35
    tok_s_7b_low: float = 3032.04
    # SDXL 1.0 at 1024x1024, 50 steps, out of the box on an A100: 8-10 s per image (BASETEN); 9 s.
    sdxl_s_per_image_50_steps: float = 9.0
    # CLIP ViT-L/14 text tower: 123M parameters, 2 FLOP per parameter and token, 77-token windows,
    # on an H100 SXM (989 TFLOP/s dense BF16, H100) at 30 % utilisation (ours): arithmetic, not a
    # published benchmark.
    clip_text_params: float = 123e6
    h100_bf16_flops: float = 989e12
    mfu: float = 0.30
    # --- measured here on the demo (benchmarks/capacity.py --measure: the demo's Parquet files
    # and its SQLite event log), scaled by caption length where text dominates
    parquet_bytes_per_caption_at_170_tokens: float = 0.0     # filled from the measurement below
    parquet_bytes_per_embedding: float = 0.0
    parquet_bytes_per_instruction_record: float = 0.0
    event_rows_per_shard_run: float = 0.0
    # PostgreSQL rows per shard of a daemon backfill, seeds + Stage 1 (BENCHMARKS row 11c)
    postgres_rows_per_shard_daemon: float = 18.87


def table(i: Inputs) -> list[tuple[str, str, str]]:
    shards = math.ceil(i.seeds / i.seeds_per_shard)
    shard_runs = math.ceil(shards / i.shard_runs_per_backfill_run)
    records = i.seeds * i.stage2_fraction
    s1_tokens = i.seeds * i.caption_tokens
    s2_tokens = records * i.qa_pairs * i.tokens_per_qa_pair
    fleet = i.vllm_replicas * i.gpus_per_replica

    def gpu_h(tokens: float, tok_s: float, gpus: int) -> float:
        return tokens / tok_s / 3600 * gpus

    clip_windows_s = i.h100_bf16_flops * i.mfu / (2 * i.clip_text_params * 77)
    s3_gpu_h = i.seeds * i.clip_windows_per_caption / clip_windows_s / 3600
    images = i.seeds * i.synthvlm_images_per_caption
    sdxl_gpu_h = images * i.sdxl_s_per_image_50_steps * i.sdxl_steps / 50 / 3600
    rows = [
        ("seeds", f"{i.seeds:,}", "paper"),
        ("shards", f"{shards:,}", f"{i.seeds_per_shard:,} seeds per shard (ours)"),
        ("shard runs (backfill)", f"{shard_runs:,}",
         f"up to {i.shard_runs_per_backfill_run} shards per run (SHARD_BACKFILL); + 1 corpus run"),
        ("Stage 1 output tokens", f"{s1_tokens / 1e6:,.0f} M",
         f"{i.caption_tokens} tokens per caption (paper: 129 words)"),
        ("Stage 1 GPU-hours, Qwen2.5-72B", _range(gpu_h(s1_tokens, i.tok_s_72b, i.gpus_per_replica),
                                                   gpu_h(s1_tokens, i.tok_s_72b_low,
                                                         i.gpus_per_replica)),
         (f"{i.tok_s_72b:,.0f} (v0.6.0) / {i.tok_s_72b_low:,.0f} (v0.5.4) tok/s per 4xH100 "
         f"replica, Llama-3.1-70B [{LAMBDA}]; wall time on the {fleet}-GPU fleet: "
         f"{_range(gpu_h(s1_tokens, i.tok_s_72b, i.gpus_per_replica) / fleet, gpu_h(s1_tokens, i.tok_s_72b_low, i.gpus_per_replica) / fleet)} h")),
        ("Stage 1 GPU-hours, Qwen2.5-7B", _range(gpu_h(s1_tokens, i.tok_s_7b, 1),
                                                  gpu_h(s1_tokens, i.tok_s_7b_low, 1)),
         f"{i.tok_s_7b:,.0f} / {i.tok_s_7b_low:,.0f} tok/s on 1xH100, Llama-3.1-8B [{LAMBDA}]"),
        ("Stage 2 records", f"{records:,.0f}", f"{i.stage2_fraction:.2%} of the captions"),
        ("Stage 2 output tokens", f"{s2_tokens / 1e6:,.0f} M",
         f"{i.qa_pairs:g} QA pairs (paper 6-8) x {i.tokens_per_qa_pair} tokens (ours)"),
        ("Stage 2 GPU-hours, Qwen2.5-72B", _range(gpu_h(s2_tokens, i.tok_s_72b, i.gpus_per_replica),
                                                   gpu_h(s2_tokens, i.tok_s_72b_low,
                                                         i.gpus_per_replica)),
         "same throughput as Stage 1"),
        ("Stage 3 encode GPU-hours (ViT-L/14 text)", f"{s3_gpu_h:.2f}",
         (f"{i.clip_windows_per_caption} windows per caption, {clip_windows_s:,.0f} windows/s: "
         f"FLOP arithmetic at {i.mfu:.0%} of 989 TFLOP/s [{H100}], not a published benchmark")),
        ("SynthVLM (optional) GPU-hours, SDXL", f"{sdxl_gpu_h:,.0f}",
         (f"{images:,} images ({i.synthvlm_images_per_caption} per caption) x "
         f"{i.sdxl_s_per_image_50_steps:g} s per 50 steps x {i.sdxl_steps}/50, A100 [{BASETEN}]")),
    ]
    measured = i.event_rows_per_shard_run > 0
    rows += [
        ("Postgres event rows, in-process figure",
         f"{i.event_rows_per_shard_run * shards:,.0f}" if measured else "not measured",
         f"{i.event_rows_per_shard_run:,.0f} event-log rows per one-shard run of the demo "
         "(SQLite, in process) x shards" if measured else ""),
        ("Postgres rows, daemon-driven (seeds + Stage 1)",
         f"{i.postgres_rows_per_shard_daemon * shards:,.0f}",
         (f"{i.postgres_rows_per_shard_daemon:g} rows per shard (event_logs + runs) of a daemon "
          "backfill on PostgreSQL, row 11c; the whole shard job and its checks write more")),
    ]
    if i.parquet_bytes_per_caption_at_170_tokens:
        s3 = (i.seeds * i.parquet_bytes_per_caption_at_170_tokens
              + i.seeds * i.parquet_bytes_per_embedding
              + records * i.parquet_bytes_per_instruction_record)
        rows += [
            ("S3: captions", _gb(i.seeds * i.parquet_bytes_per_caption_at_170_tokens),
             (f"{i.parquet_bytes_per_caption_at_170_tokens:,.0f} B per caption (demo, scaled to "
             f"{i.caption_tokens} tokens)")),
            ("S3: caption embeddings", _gb(i.seeds * i.parquet_bytes_per_embedding),
             (f"{i.parquet_bytes_per_embedding:,.0f} B per embedding (demo's Parquet, 768-d "
             "float32 per row: the transferred copy doubles it)")),
            ("S3: instruction records", _gb(records * i.parquet_bytes_per_instruction_record),
             (f"{i.parquet_bytes_per_instruction_record:,.0f} B per record (demo, scaled to "
             f"{i.qa_pairs:g} QA pairs)")),
            ("S3: total before exports", _gb(s3), "exports copy the captions and embeddings once"),
        ]
    return rows


def _range(high: float, low: float) -> str:
    return f"{high:,.0f}-{low:,.0f}" if high >= 10 else f"{high:.1f}-{low:.1f}"


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def markdown(i: Inputs) -> str:
    lines = ["## Capacity at the paper's scale (arithmetic, `python -m benchmarks.capacity`)", "",
             ("Pure arithmetic from stated inputs (each with its source); nothing in it ran on a "
             "GPU here. GPU-hours are a range: the high throughput (vLLM v0.6.0, 10 scheduler "
             "steps) first, the older v0.5.4 figure second. Prefill (prompt) tokens are not "
             "counted apart: the published figures are output tokens/s under ShareGPT-like "
             "prompts."), "",
             "| quantity | value | inputs and source |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in table(i)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.capacity", description=__doc__)
    parser.add_argument("--seeds-per-shard", type=int, default=Inputs.seeds_per_shard)
    parser.add_argument("--measure", nargs=2, type=Path, metavar=("DATA", "DAGSTER_HOME"),
                        help="take the Parquet and event-row figures from a demo run's folders")
    args = parser.parse_args(argv)
    inputs = Inputs(**{**MEASURED.__dict__, "seeds_per_shard": args.seeds_per_shard})
    if args.measure:
        inputs = measure(*args.measure, inputs)
        print({k: round(v, 1) for k, v in inputs.__dict__.items() if k.startswith(("parquet", "event"))})
    print(markdown(inputs))


def measure(data: Path, home: Path, base: Inputs) -> Inputs:
    """Bytes per row of the demo's Parquet files (column chunks, so the fixed footer of a small
    file is left out), the text columns scaled to the paper's lengths, and the event-log rows of
    each one-shard `unicorn_shard_job` run in the demo's SQLite instance."""
    import sqlite3

    import pyarrow.parquet as pq

    def per_row(folder: str, scaled: dict[str, float]) -> float:
        total = rows = 0.0
        for path in sorted((data / folder).glob("*.parquet")):
            meta = pq.ParquetFile(path).metadata
            rows += meta.num_rows
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                for c in range(group.num_columns):
                    column = group.column(c)
                    total += column.total_compressed_size * scaled.get(column.path_in_schema.split(".")[0], 1.0)
        return total / rows

    captions = pq.read_table(data / "expanded_captions", columns=["caption"]).column(0).to_pylist()
    words = sum(len(c.split()) for c in captions) / len(captions)
    paper_words = base.caption_tokens / 1.3
    embeddings = pq.read_table(data / "caption_embeddings", columns=["embedding"]).column(0)
    dim = len(embeddings[0].as_py())
    turns = pq.read_table(data / "instructions", columns=["n_turns"]).column(0).to_pylist()
    runs = []
    for db in (home / "history" / "runs").glob("*.db"):
        with sqlite3.connect(db) as con:
            runs.append(con.execute("select count(*) from event_logs").fetchone()[0])
    with sqlite3.connect(home / "history" / "runs.db") as con:
        shard_jobs = {r for (r,) in con.execute(
            "select run_id from runs where pipeline_name = 'unicorn_shard_job'")}
    shard_rows = []
    for run_id in shard_jobs:
        with sqlite3.connect(home / "history" / "runs" / f"{run_id}.db") as con:
            shard_rows.append(con.execute("select count(*) from event_logs").fetchone()[0])
    return Inputs(**{**base.__dict__,
                     "parquet_bytes_per_caption_at_170_tokens": per_row(
                         "expanded_captions", {"caption": paper_words / words}),
                     "parquet_bytes_per_embedding": per_row("caption_embeddings",
                                                            {"embedding": 768 / dim}),
                     "parquet_bytes_per_instruction_record": per_row(
                         "instructions", {"conversations": base.qa_pairs / (sum(turns) / len(turns))}),
                     "event_rows_per_shard_run": sum(shard_rows) / len(shard_rows)})


# Measured with `--measure DATA DAGSTER_HOME` on a `unicorn demo` run on this machine (the bundled
# 3 shards, 82 captions, SmolLM2-135M, tiny-clip; SQLite instance, in process), 2026-11-29.
MEASURED = Inputs(parquet_bytes_per_caption_at_170_tokens=463.4, parquet_bytes_per_embedding=2962.4,
                  parquet_bytes_per_instruction_record=2144.4, event_rows_per_shard_run=172.0)

if __name__ == "__main__":
    main()
