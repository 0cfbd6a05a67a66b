"""4. Stage 3 throughput, and the Stage 3 row of 6. Memory.

- CLIP text encoding: embeddings/s of the clip resource (the tiny, randomly initialised open_clip
  model of the local profile) on real COCO captions, against a bare open_clip loop over the same
  model config, batch size and captions.
- Mean shift + export: GB/s of float32 embeddings through Stage 3's streamed path, against a plain
  numpy copy of an array of the same size in memory (the machine's memory bandwidth: no path
  that reads and writes every float can beat it).
- Memory at 1M x 768: peak RSS of that path over one million 768-d embeddings (2.9 GiB of
  float32), in a subprocess, against the size of the whole array."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import polars as pl

from benchmarks.common import (
    Row,
    coco_captions,
    failed_checks,
    interleaved,
    median,
    peak_rss,
    pipeline,
    workdir,
)
from tests.support import COCO_PAIRS
from unicorn_assets.logic.modality import NEEDS_IMAGES

FULL = {"captions": 4096, "batch_size": 256, "runs": 3,
        "corpus_rows": 262_144, "corpus_shards": 4, "dim": 768,
        "memory_rows": [100_000, 1_000_000], "memory_shards": 10}
SMOKE = {"captions": 64, "batch_size": 32, "runs": 1,
         "corpus_rows": 2_048, "corpus_shards": 2, "dim": 768,
         "memory_rows": [1_000, 4_000], "memory_shards": 2}
BENCH = "4. Stage 3 throughput"
MEMORY = "6. Memory"
GIB = 2**30
POLARS_ROW_GROUP_ROWS = 512**2  # DataFrame.write_parquet's default row group

# The corpus-wide part of Stage 3 as the unicorn_corpus_job runs it, with its asset checks:
# streamed statistics, the streamed mean shift to Parquet, and the pretrain export.
corpus_job = dg.define_asset_job("bench_stage3_corpus", selection=dg.AssetSelection.assets(
    "modality_statistics", "transferred_embeddings", "pretrain_dataset"))


def raw_clip_loop(model_name: str, texts: list[str], batch_size: int) -> Any:
    """open_clip without the resource: create the model, tokenise and encode batch by batch."""
    import open_clip
    import torch

    from unicorn_resources.clip import BUNDLED_MODEL_CONFIGS

    open_clip.add_model_config(BUNDLED_MODEL_CONFIGS)
    model = open_clip.create_model(model_name, pretrained=None).eval()
    tokenizer = open_clip.get_tokenizer(model_name)

    def encode() -> np.ndarray:
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                features = model.encode_text(tokenizer(texts[start : start + batch_size]))
                out.append(torch.nn.functional.normalize(features, dim=-1).numpy())
        return np.concatenate(out)

    return encode


def clip_rows(size: dict[str, Any]) -> list[Row]:
    from unicorn_resources.clip import OpenClipResource

    texts = [rec["caption"] for rec in coco_captions(size["captions"])]
    clip = OpenClipResource(batch_size=size["batch_size"])
    raw = raw_clip_loop(clip.model_name, texts, size["batch_size"])
    clip.encode_text(texts[:8]), raw()  # warm up: not timed

    def rate(fn) -> float:
        started = time.perf_counter()
        vectors = fn()
        seconds = time.perf_counter() - started
        if vectors.shape[0] != len(texts):
            raise RuntimeError(f"{vectors.shape[0]} embeddings for {len(texts)} captions")
        return len(texts) / seconds

    results = interleaved(size["runs"], resource=lambda: rate(lambda: clip.encode_text(texts)),
                          raw=lambda: rate(raw))
    return [Row(
        BENCH, f"embeddings/s, clip resource encode_text ({clip.model_name}, CPU)",
        median(results["resource"]), "embeddings/s", "bare open_clip loop",
        median(results["raw"]), runs=size["runs"],
        note=f"{len(texts)} real captions, batch {size['batch_size']}; GPU: none on this machine",
        details={"model_id": clip.model_id, "embedding_dim": clip.embedding_dim,
                 "resource": [round(x, 1) for x in results["resource"]],
                 "raw": [round(x, 1) for x in results["raw"]]})]


def write_corpus(data: Path, rows: int, shards: int, dim: int, model_id: str,
                 row_group_size: int | None = None) -> list[str]:
    """Per shard, what the upstream assets would have stored: `caption_embeddings` (random unit
    vectors, float32) and the `expanded_captions` columns the export reads, written by the IO
    manager's own write_parquet (or, given `row_group_size`, in row groups of that many rows).
    Written shard by shard, so this process never holds the whole corpus either."""
    from fsspec.implementations.local import LocalFileSystem

    from unicorn_assets.logic.modality import embedding_dtype
    from unicorn_assets.logic.text import caption_sha256_series
    from unicorn_resources.storage import write_parquet

    def store(frame: pl.DataFrame, path: Path) -> None:
        if row_group_size:
            frame.write_parquet(path, compression="zstd", statistics=True,
                                row_group_size=row_group_size)
        else:
            write_parquet(LocalFileSystem(), str(path), frame)

    keys = [f"emb-{i:03d}" for i in range(shards)]
    rng = np.random.default_rng(0)
    (data / "caption_embeddings").mkdir(parents=True, exist_ok=True)
    (data / "expanded_captions").mkdir(parents=True, exist_ok=True)
    (data / "instructions").mkdir(parents=True, exist_ok=True)
    for i, key in enumerate(keys):
        n = rows // shards + (1 if i < rows % shards else 0)
        vectors = rng.standard_normal((n, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids = pl.int_range(i * rows, i * rows + n, eager=True).map_elements(
            lambda x: f"{x:016x}", return_dtype=pl.String).alias("caption_id")
        # distinct texts: the export drops captions repeated across shards
        texts = ("A red bus is parked beside a stone wall, frame " + ids).alias("caption")
        digests = caption_sha256_series(texts)  # what Stage 1 stores and Stage 2/3 copy
        store(pl.DataFrame({"caption_id": ids, "caption_sha256": digests, "shard": key,
                            "model_id": model_id,
                            "embedding": pl.Series(vectors, dtype=embedding_dtype(dim))}),
              data / "caption_embeddings" / f"{key}.parquet")
        del vectors
        store(pl.DataFrame({"caption_id": ids, "seed_id": ids, "shard": key, "caption": texts,
                            "caption_sha256": digests, "model_id": "llama_cpp:bench",
                            "prompt_version": "stage1_expand/v1"}),
              data / "expanded_captions" / f"{key}.parquet")
        # no instruction records (the pretrain export needs none), but the file the corpus
        # job's pairing check reads
        store(pl.DataFrame(schema={"id": pl.String, "caption_id": pl.String,
                                   "caption_sha256": pl.String, "shard": pl.String}),
              data / "instructions" / f"{key}.parquet")
    return keys


WIDE_CLIP = "tiny-clip-wide"


def wide_clip_config(folder: Path, dim: int) -> Path:
    """The tiny CLIP's config with an embedding width of `dim` (random weights), so the reference
    images embed as wide as the benchmark's caption embeddings."""
    from unicorn_resources.clip import BUNDLED_MODEL_CONFIGS

    config = json.loads((Path(BUNDLED_MODEL_CONFIGS) / "tiny-clip.json").read_text())
    path = folder / f"{WIDE_CLIP}.json"
    path.write_text(json.dumps({**config, "embed_dim": dim}))
    return path


def transfer_config(method: str) -> dict[str, Any]:
    """modality_statistics' run config for `method`: realign (and mean_shift_to_image_mean) take
    their image statistics from the 79 real COCO images in ../shared/data."""
    config: dict[str, Any] = {"transfer": {"method": method}}
    if method in NEEDS_IMAGES:
        config["reference_images"] = str(COCO_PAIRS.parent)
    return {"ops": {"modality_statistics": {"config": config}}}


def corpus_run(tmp: Path, rows: int, shards: int, dim: int, runs: int,
               row_group_size: int | None = None, method: str = "mean_shift"
               ) -> list[dict[str, Any]]:
    """Materialise statistics -> transfer -> pretrain export (and their checks) `runs` times over a
    corpus of rows x dim float32 embeddings, with transfer `method`."""
    from unicorn_assets.partitions import SEED_SHARDS

    clip = None
    if method in NEEDS_IMAGES:  # image statistics at the corpus width
        clip = {"model_name": WIDE_CLIP, "model_config_path": str(wide_clip_config(tmp, dim))}
    with pipeline(tmp, tmp / "seeds", {"backend": "fake"}, [corpus_job], clip) as (instance, defs):
        keys = write_corpus(tmp / "data", rows, shards, dim, defs.resources["clip"].model_id,
                            row_group_size)
        instance.add_dynamic_partitions(SEED_SHARDS, keys)
        job, results = defs.resolve_job_def("bench_stage3_corpus"), []
        for _ in range(runs):
            started = time.perf_counter()
            result = job.execute_in_process(instance=instance, raise_on_error=False,
                                            run_config=transfer_config(method))
            seconds = time.perf_counter() - started
            if not result.success:
                raise RuntimeError(f"Stage 3 corpus run failed; failed checks "
                                   f"{failed_checks(result)}")
            steps = {e.step_key: e.event_specific_data.duration_ms / 1000
                     for e in result.all_events if e.event_type_value == "STEP_SUCCESS"}
            results.append({"seconds": seconds, "steps": steps,
                            "failed_checks": failed_checks(result)})
    return results


def copy_seconds(rows: int, dim: int) -> float:
    """A plain numpy copy of a rows x dim float32 array into a preallocated one."""
    source = np.random.default_rng(1).standard_normal((rows, dim), dtype=np.float32)
    target = np.empty_like(source)
    np.copyto(target, source)  # fault the pages in: not timed
    started = time.perf_counter()
    np.copyto(target, source)
    return time.perf_counter() - started


def corpus_rows(size: dict[str, Any]) -> list[Row]:
    rows, dim = size["corpus_rows"], size["dim"]
    gb = rows * dim * 4 / 1e9
    with workdir("stage3") as tmp:
        path = corpus_run(tmp, rows, size["corpus_shards"], dim, size["runs"] + 1)[1:]  # 1st warms
    copies = [copy_seconds(rows, dim) for _ in range(size["runs"])]
    path_rate, copy_rate = median([gb / r["seconds"] for r in path]), median([gb / s for s in copies])
    steps = {step: median([r["steps"][step] for r in path]) for step in path[0]["steps"]}
    heavy = {step: round(gb / sec, 3) for step, sec in sorted(steps.items(), key=lambda x: -x[1])
             if sec > 0.05 * sum(steps.values())}
    return [Row(
        BENCH, f"GB/s of float32, mean shift + export ({rows:,} x {dim}, with checks)",
        path_rate, "GB/s", "numpy copy of the same array in memory", copy_rate, runs=size["runs"],
        note="statistics, shift streamed to Parquet, pretrain export and their checks; "
        "the steps over 5 % of the time, in GB/s: "
        + ", ".join(f"{step} {rate:.2f}" for step, rate in heavy.items()),
        details={"rows": rows, "dim": dim, "gigabytes": round(gb, 3),
                 "step_seconds": {k: round(v, 3) for k, v in steps.items()},
                 "path_seconds": [round(r["seconds"], 2) for r in path],
                 "copy_seconds": [round(s, 4) for s in copies]})]


def memory_rows(size: dict[str, Any]) -> list[Row]:
    """Peak RSS of the corpus path in a subprocess: at a small and at the large size with the
    shard files as the IO manager writes them, and at the large size with polars' default row
    groups (512^2 rows: how the IO manager wrote them before ROW_GROUP_ROWS), with the default
    transfer (mean_shift); and at the large size with realign (its statistics take a second
    streamed pass for the drift)."""
    dim, small, large = size["dim"], *size["memory_rows"]
    peaks = {}
    for label, rows, groups, method in (
            ("small", small, 0, "mean_shift"), ("large", large, 0, "mean_shift"),
            ("large_default_row_groups", large, POLARS_ROW_GROUP_ROWS, "mean_shift"),
            ("large_realign", large, 0, "realign")):
        with workdir("stage3-memory") as tmp:
            rc, peak, wall = peak_rss(
                [sys.executable, "-m", "benchmarks.stage3", "--child", str(tmp), str(rows),
                 str(size["memory_shards"]), str(dim), str(groups), method], dict(os.environ),
                tmp / "child.log")
            if rc:
                raise RuntimeError(f"the Stage 3 memory run at {rows:,} rows failed:\n"
                                   f"{(tmp / 'child.log').read_text()[-3000:]}")
            peaks[label] = {"rows": rows, "method": method,
                            "input_row_group_rows": groups or "IO manager default",
                            "peak_mib": round(peak, 1), "wall_seconds": round(wall, 1),
                            **json.loads((tmp / "child.json").read_text())}
    array_mib = large * dim * 4 / 2**20
    growth = ((peaks["large"]["peak_mib"] - peaks["small"]["peak_mib"])
              / ((large - small) * dim * 4 / 2**20))
    return [Row(
        MEMORY, f"peak RSS, Stage 3 corpus path at {large:,} x {dim} (subprocess)",
        peaks["large"]["peak_mib"], "MiB", f"the whole float32 array ({large:,} x {dim})", array_mib,
        target="< 1 (streamed)", met=peaks["large"]["peak_mib"] < array_mib, runs=1,
        note=f"{large // size['memory_shards']:,} rows per shard file; at {small:,} rows: "
        f"{peaks['small']['peak_mib']:,.0f} MiB, so the peak grows by {growth:.0%} of the added "
        f"array; with polars' default row groups ({POLARS_ROW_GROUP_ROWS:,} rows) in the shard "
        f"files: {peaks['large_default_row_groups']['peak_mib']:,.0f} MiB; with transfer realign "
        f"(its drift a second streamed pass): {peaks['large_realign']['peak_mib']:,.0f} MiB; the "
        "statistics step alone: "
        + ", ".join(f"{label} {peaks[label]['statistics_seconds']:.1f} s"
                    for label in ("large", "large_realign")),
        details={"runs": peaks, "shards": size["memory_shards"]})]


def run(size: dict[str, Any]) -> list[Row]:
    return [*clip_rows(size), *corpus_rows(size), *memory_rows(size)]


def child(folder: Path, rows: int, shards: int, dim: int, row_group_size: int,
          method: str) -> None:
    """One corpus run in this process (for peak RSS): inputs written shard by shard, then the
    three corpus assets and their checks."""
    started = time.perf_counter()
    result = corpus_run(folder, rows, shards, dim, runs=1, row_group_size=row_group_size,
                        method=method)[0]
    (folder / "child.json").write_text(json.dumps({
        "run_seconds": round(result["seconds"], 1),
        "statistics_seconds": round(result["steps"]["modality_statistics"], 1),
        "total_seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="internal: the Stage 3 memory subprocess")
    parser.add_argument("--child", nargs=6, required=True,
                        metavar=("FOLDER", "ROWS", "SHARDS", "DIM", "ROW_GROUP_ROWS", "METHOD"))
    folder, rows, shards, dim, groups, method = parser.parse_args().child
    child(Path(folder), int(rows), int(shards), int(dim), int(groups), method)
