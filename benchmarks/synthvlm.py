"""6. Memory, SynthVLM branch: peak RSS of rendering and exporting N and 10 N images, each size in a
fresh subprocess. `synthetic_images` renders and writes them, `synthvlm_dataset` copies them into
the export, and its blocking check `records_resolve` hashes them, all through Dagster on a real
instance. The renderer is a stand-in that returns seeded noise at SDXL's 1024 x 1024: rendering
with the tiny random SDXL at that size takes seconds an image on a CPU, and the figure measured is
the branch's own memory, not the model's. Noise PNGs (about 3 MiB) are larger than SDXL's photos."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import Row, coco_captions, peak_rss, workdir

FULL = {"images": (40, 400), "resolution": 1024}
SMOKE = {"images": (4, 40), "resolution": 64}
BENCH = "6. Memory"
SHARD = "bench"
TARGET = 1.1  # 10 x the images may cost at most 10 % more memory


def run(size: dict[str, Any]) -> list[Row]:
    small, large = size["images"]
    resolution = size["resolution"]
    runs = {}
    for n in (small, large):
        with workdir("synthvlm-memory") as tmp:
            rc, peak, wall = peak_rss(
                [sys.executable, "-m", "benchmarks.synthvlm", "--child", str(tmp), str(n),
                 str(resolution)], dict(os.environ), tmp / "child.log")
            if rc:
                raise RuntimeError(f"the SynthVLM memory run at {n} images failed:\n"
                                   f"{(tmp / 'child.log').read_text()[-3000:]}")
            runs[n] = {"peak_mib": round(peak, 1), "wall_seconds": round(wall, 1),
                       **json.loads((tmp / "child.json").read_text())}
    ratio = runs[large]["peak_mib"] / runs[small]["peak_mib"]
    added = runs[large]["image_mib"] - runs[small]["image_mib"]
    return [Row(
        BENCH, f"peak RSS, SynthVLM render + export of {large} images at {resolution}² "
        "(subprocess)", runs[large]["peak_mib"], "MiB", f"same at {small} images",
        runs[small]["peak_mib"], target=f"< {TARGET} (flat)", met=ratio < TARGET, runs=1,
        note=f"stand-in renderer (seeded noise); synthetic_images, synthvlm_dataset and its "
        f"check; {added:,.0f} MiB more image files at {large} images, "
        f"{runs[large]['peak_mib'] - runs[small]['peak_mib']:+,.0f} MiB of peak",
        details={"runs": runs, "resolution": resolution, "chunk_size": runs[large]["chunk_size"]})]


def child(folder: Path, n: int, resolution: int) -> None:
    """Render `n` images of one shard, select them all, export them and check the export."""
    import time

    import dagster as dg
    import polars as pl

    from tests.support import NoiseDiffusion
    from unicorn_assets.logic import synthvlm as logic
    from unicorn_assets.partitions import SEED_SHARDS, seed_shards
    from unicorn_assets.synthvlm import (
        RenderConfig,
        synthetic_images,
        synthvlm_dataset,
        synthvlm_dataset_records_resolve,
    )
    from unicorn_resources.llm import FakeLLM
    from unicorn_resources.quality_gates import QualityGates
    from unicorn_resources.storage import ParquetIOManager

    started = time.perf_counter()
    candidates = dg.AssetSpec("synthvlm_candidates", partitions_def=seed_shards)
    data = folder / "data"
    # one image per caption, each caption read differently and all selected: the export copies
    # every image rendered
    captions = list(dict.fromkeys(r["caption"] for r in coco_captions(n + n // 5 + 10)))[:n]
    (data / "synthvlm_candidates").mkdir(parents=True)
    pl.DataFrame({
        "caption_id": [f"c{i:05d}" for i in range(len(captions))],
        "seed_id": [f"s{i:05d}" for i in range(len(captions))], "shard": SHARD,
        "caption": captions, "n_words": [len(c.split()) for c in captions],
        "repeated_trigram_ratio": 0.0, "special_char_ratio": 0.0, "caption_quality": 1.0,
        "judgement": "yes"}, schema=logic.CANDIDATE_SCHEMA,
    ).write_parquet(data / "synthvlm_candidates" / f"{SHARD}.parquet")
    io = ParquetIOManager(base_uri=str(data))
    resources = {"io_manager": io, "diffusion": NoiseDiffusion(resolution=resolution),
                 "llm": FakeLLM(), "quality_gates": QualityGates()}
    (folder / "home").mkdir()
    with dg.DagsterInstance.from_config(str(folder / "home")) as instance:
        instance.add_dynamic_partitions(SEED_SHARDS, [SHARD])
        rendered = dg.materialize([candidates, synthetic_images], partition_key=SHARD,
                                  selection=[dg.AssetKey("synthetic_images")], instance=instance,
                                  resources=resources, run_config={"ops": {"synthetic_images": {
                                      "config": {"images_per_caption": 1}}}})
        images = pl.read_parquet(data / "synthetic_images" / f"{SHARD}.parquet")
        # every image selected, so that the export copies them all (scores do not matter here)
        images.with_columns(
            clip_model_id=pl.lit("none"), clip_pretrained=False, clip_cosine=0.3,
            clip_cosine_clipped=0.3, clipscore_x2_5=0.75, ssim=0.9, weighted_score=0.75,
            best_of_n=True, selected=True, reason=pl.lit(None, pl.String),
            duplicate_of=pl.lit(None, pl.String),
            rank=pl.int_range(pl.len(), dtype=pl.Int64), score_lambda=0.5, target_fraction=1.0,
            target_k=pl.lit(None, pl.Int64),
        ).select(logic.SELECTION_SCHEMA.names()).cast(dict(logic.SELECTION_SCHEMA)).write_parquet(
            data / "synthvlm_selection.parquet")
        exported = dg.materialize(
            [dg.AssetSpec("synthvlm_selection"), synthvlm_dataset,
             synthvlm_dataset_records_resolve],
            selection=[dg.AssetKey("synthvlm_dataset")], instance=instance, resources=resources)
        checks = [e.asset_check_evaluation_data for e in exported.all_events
                  if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    if not (rendered.success and exported.success and checks and all(c.passed for c in checks)):
        raise RuntimeError(f"render {rendered.success}, export {exported.success}, checks "
                           f"{[c.passed for c in checks]}")
    exported_rows = pl.scan_parquet(data / "synthvlm_dataset.parquet").select(pl.len()).collect()
    if not exported_rows.item() == images.height == n:
        raise RuntimeError(f"{n} images planned, {images.height} rendered, "
                           f"{exported_rows.item()} exported")
    (folder / "child.json").write_text(json.dumps({
        "images": n, "image_bytes": int(images["n_bytes"].sum()),
        "image_mib": round(images["n_bytes"].sum() / 2**20, 1),
        "chunk_size": RenderConfig().chunk_size,
        "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="internal: the SynthVLM memory subprocess")
    parser.add_argument("--child", nargs=3, required=True, metavar=("FOLDER", "IMAGES", "SIDE"))
    folder, n, side = parser.parse_args().child
    child(Path(folder), int(n), int(side))
