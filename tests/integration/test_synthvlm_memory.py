"""Bounded memory in the SynthVLM branch: images are written as they are rendered (a crash keeps
the finished ones and a re-run renders only the rest), and the export streams one image at a
time. A stand-in renderer draws seeded noise, so the tests run in seconds on a real instance."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import polars as pl
import pytest

from tests.support import NOISE_RENDER_CALLS as CALLS
from tests.support import NoiseDiffusion, make_resources, noise_picture
from unicorn_assets.logic import synthvlm as logic
from unicorn_assets.logic.images import encode_image
from unicorn_assets.partitions import SEED_SHARDS, seed_shards
from unicorn_assets.synthvlm import (
    ExportConfig,
    file_digest,
    file_reader,
    storage_uri,
    synthetic_images,
    synthvlm_dataset,
)
from unicorn_resources.quality_gates import QualityGates
from unicorn_resources.storage import ParquetIOManager, S3Options, write_bytes

SHARD = "shard-a"
# stored as the upstream asset stores it; only synthetic_images runs
CANDIDATES = dg.AssetSpec("synthvlm_candidates", partitions_def=seed_shards)


def candidates(n: int) -> pl.DataFrame:
    captions = [f"A red bicycle number {i} leans against a white wall in the sun" for i in range(n)]
    return pl.DataFrame({
        "caption_id": [f"cap{i:03d}" for i in range(n)], "seed_id": [f"seed{i:03d}" for i in range(n)],
        "shard": [SHARD] * n, "caption": captions, "n_words": [len(c.split()) for c in captions],
        "repeated_trigram_ratio": [0.0] * n, "special_char_ratio": [0.0] * n,
        "caption_quality": [1.0] * n, "judgement": ["yes"] * n}, schema=logic.CANDIDATE_SCHEMA)


@pytest.fixture
def shard(tmp_path: Path, instance: dg.DagsterInstance):
    """Five candidate captions of one shard, stored as synthvlm_candidates stores them."""
    data = tmp_path / "data"
    frame = candidates(5)
    (data / "synthvlm_candidates").mkdir(parents=True)
    frame.write_parquet(data / "synthvlm_candidates" / f"{SHARD}.parquet")
    instance.add_dynamic_partitions(SEED_SHARDS, [SHARD])
    resources = make_resources(data, tmp_path / "seeds")
    return {"data": data, "candidates": frame, "instance": instance, "resources": resources,
            "folder": data / "synthetic_images" / SHARD}


def render(shard: dict, **diffusion: Any) -> dg.ExecuteInProcessResult:
    CALLS.clear()
    return dg.materialize(
        [CANDIDATES, synthetic_images], selection=[dg.AssetKey("synthetic_images")],
        partition_key=SHARD, instance=shard["instance"], raise_on_error=False,
        resources={**shard["resources"], "diffusion": NoiseDiffusion(**diffusion)},
        run_config={"ops": {"synthetic_images": {"config": {"chunk_size": 2,
                                                            "images_per_caption": 2}}}})


def image_meta(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    return {k: v.value for k, v in
            result.asset_materializations_for_node("synthetic_images")[0].metadata.items()}


def test_a_crash_keeps_the_finished_images_and_a_rerun_renders_only_the_rest(shard):
    folder: Path = shard["folder"]
    plan = logic.plan_renders(shard["candidates"], 2)  # 10 images, rendered 2 per call
    folder.mkdir(parents=True)
    (folder / "stray.png").write_bytes(b"an image of an older render")

    crashed = render(shard, fail_from_call=3)
    assert not crashed.success
    finished = plan.head(4)  # the two chunks rendered before the crash
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{i}.png" for i in finished["image_id"]] + ["stray.png"])  # no partial file either
    for image_id, seed in finished.select("image_id", "seed").iter_rows():
        expected = encode_image(noise_picture(seed, 0, 40), "png")
        assert (folder / f"{image_id}.png").read_bytes() == expected
    assert not (shard["data"] / "synthetic_images" / f"{SHARD}.parquet").exists()

    again = render(shard)
    assert again.success
    assert [seed for call in CALLS for seed in call] == plan["seed"].to_list()[4:]
    assert (image_meta(again)["images_reused"], image_meta(again)["images_rendered"]) == (4, 6)
    table = pl.read_parquet(shard["data"] / "synthetic_images" / f"{SHARD}.parquet")
    assert table["image_id"].to_list() == plan["image_id"].to_list()
    for uri, seed, digest, n_bytes in table.select("uri", "seed", "sha256", "n_bytes").iter_rows():
        data = encode_image(noise_picture(seed, 0, 40), "png")
        assert Path(uri).read_bytes() == data
        assert (digest, n_bytes) == (hashlib.sha256(data).hexdigest(), len(data))
    # the orphan goes once every image of the render is written
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{i}.png" for i in table["image_id"])
    records = shard["data"] / "synthetic_images" / ".renders" / SHARD
    assert sorted(p.name for p in records.iterdir()) == sorted(f"{i}.json" for i in table["image_id"])

    victim = Path(table["uri"][1])
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) // 2])  # damaged after it was written
    repaired = render(shard)
    assert repaired.success and CALLS == [[table["seed"][1]]]
    assert victim.read_bytes() == whole

    reshaded = render(shard, shade=1)  # another setting: no earlier image is kept
    assert reshaded.success
    assert sorted(s for call in CALLS for s in call) == sorted(plan["seed"])
    assert image_meta(reshaded)["images_reused"] == 0
    assert victim.read_bytes() == encode_image(noise_picture(table["seed"][1], 1, 40), "png")


def test_reuse_can_be_switched_off(shard):
    assert render(shard).success
    CALLS.clear()
    fresh = dg.materialize(
        [CANDIDATES, synthetic_images], selection=[dg.AssetKey("synthetic_images")],
        partition_key=SHARD, instance=shard["instance"],
        resources={**shard["resources"], "diffusion": NoiseDiffusion()},
        run_config={"ops": {"synthetic_images": {"config": {"reuse_finished": False}}}})
    assert fresh.success and len([s for call in CALLS for s in call]) == 10
    assert image_meta(fresh)["images_reused"] == 0


def selection_of(io: ParquetIOManager, n: int, size: int) -> pl.DataFrame:
    """`n` selected images of `size` random bytes each (the export copies bytes; it never
    decodes), stored where synthetic_images stores them."""
    folder = storage_uri(io, "synthetic_images", SHARD)
    fs, _ = io.s3.fs(folder)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        data = rng.bytes(size)
        uri = f"{folder}/img{i:03d}.png"
        write_bytes(fs, io.s3.fs(uri)[1], data)
        rows.append({"image_id": f"img{i:03d}", "caption_id": f"cap{i:03d}", "seed_id": f"s{i}",
                     "shard": SHARD, "caption": f"caption number {i} of a picture",
                     "image_index": 0, "uri": uri, "format": "png",
                     "sha256": hashlib.sha256(data).hexdigest(), "model_id": "noise",
                     "pretrained": False, "clip_model_id": "noise", "clip_pretrained": False,
                     "clip_cosine": 0.3, "clip_cosine_clipped": 0.3, "clipscore_x2_5": 0.75,
                     "ssim": 0.9, "weighted_score": 0.75, "best_of_n": True, "selected": True,
                     "reason": None, "duplicate_of": None, "rank": i,
                     "score_lambda": 0.5, "target_fraction": 1.0, "target_k": None})
    return pl.DataFrame(rows, schema=logic.SELECTION_SCHEMA)


def export(io: ParquetIOManager, selection: pl.DataFrame, **config: Any) -> dg.Output:
    """Run the export asset's body; its Output (its in-asset check results are not needed)."""
    results = synthvlm_dataset(context=dg.build_asset_context(), config=ExportConfig(**config),
                               io_manager=io, quality_gates=QualityGates(),
                               synthvlm_selection=selection)
    return next(r for r in results if isinstance(r, dg.Output))


def test_the_export_and_its_check_hold_one_image_at_a_time(tmp_path: Path):
    io = ParquetIOManager(base_uri=str(tmp_path / "data"))
    n, size = 24, 2 << 20  # 48 MiB of images
    selection = selection_of(io, n, size)
    root = tmp_path / "data" / "exports" / "synthvlm"
    export(io, selection)  # once first, so that imports and caches are not counted below
    tracemalloc.start()
    try:
        output = export(io, selection)
        outcome = logic.verify_export(str(root), file_reader(io), file_digest(io))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcome.passed, outcome.description
    assert output.value.height == n
    manifest = json.loads((root / "manifest.json").read_text())
    for uri, digest in selection.select("uri", "sha256").iter_rows():
        name = f"images/{SHARD}/{Path(uri).name}"
        assert manifest["sha256"][name] == digest
        assert (root / name).read_bytes() == Path(uri).read_bytes()
    # all images together are 48 MiB; the export and the check hold one chunk of one at a time
    assert peak < 2 * size, f"peak {peak / 2**20:.1f} MiB for {n} images of {size / 2**20} MiB"


def test_the_export_refuses_an_image_changed_since_it_was_scored(tmp_path: Path):
    io = ParquetIOManager(base_uri=str(tmp_path / "data"))
    selection = selection_of(io, 3, 1000)
    victim = Path(selection["uri"][1])
    victim.write_bytes(victim.read_bytes()[::-1])
    with pytest.raises(ValueError, match=r"img001.png: the selected image is changed since it "
                       r"was scored; re-materialise synthetic_images"):
        export(io, selection)
    images = tmp_path / "data" / "exports" / "synthvlm" / "images" / SHARD
    assert sorted(p.name for p in images.iterdir()) == ["img000.png"]  # no copy of the changed one
    assert not (images.parent.parent / "manifest.json").exists()


def test_the_export_streams_on_s3_and_publishes_no_changed_image(tmp_path: Path):
    """The same against a real S3-compatible server (moto) on loopback, where an upload is
    published when it closes: a copy that fails its checksum is taken back."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = S3Options(endpoint_url=f"http://{host}:{port}", access_key_id="test",
                       secret_access_key="test", region="us-east-1")
        boto3.client("s3", endpoint_url=s3.endpoint_url, region_name=s3.region,
                     aws_access_key_id="test", aws_secret_access_key="test"
                     ).create_bucket(Bucket="unicorn-export")
        io = ParquetIOManager(base_uri="s3://unicorn-export/data", s3=s3)
        selection = selection_of(io, 3, 300_000)
        export(io, selection)
        root = "s3://unicorn-export/data/exports/synthvlm"
        assert logic.verify_export(root, file_reader(io), file_digest(io)).passed
        fs, _ = s3.fs(root)
        changed = io.s3.fs(selection["uri"][1])[1]
        write_bytes(fs, changed, fs.cat_file(changed)[::-1])
        with pytest.raises(ValueError, match="img001.png: the selected image is changed"):
            export(io, selection, export_dir="s3://unicorn-export/second")
        fs.invalidate_cache()
        assert fs.find("unicorn-export/second") == [
            f"unicorn-export/second/images/{SHARD}/img000.png"]
    finally:
        server.stop()
