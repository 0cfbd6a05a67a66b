"""The SynthVLM branch in-process on a real DagsterInstance: two shards of real COCO captions,
Stage 1 with FakeLLM, then tiny SDXL renders, tiny-CLIP scores, selection and the LLaVA export."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest

from dagster_project.definitions import ASSET_CHECKS, ASSETS
from dagster_project.jobs import JOBS, SYNTHVLM_JOBS
from tests.support import ROOT, coco_captions, make_resources, write_jsonl
from unicorn_assets.logic.images import decode_image
from unicorn_assets.logic.synthvlm import verify_export, verify_image_files
from unicorn_assets.logic.text import caption_sha256
from unicorn_assets.partitions import SEED_SHARDS
from unicorn_assets.synthvlm import file_reader, synthvlm_assets, synthvlm_checks

SHARDS = ["shard-a", "shard-b"]
RESOLUTION = 96  # above the tiny CLIP's 64 px input, so the SSIM resize does something


def _failed_checks(result: dg.ExecuteInProcessResult) -> list[str]:
    return [f"{e.asset_check_evaluation_data.asset_check_key.asset_key.to_user_string()}:"
            f"{e.asset_check_evaluation_data.asset_check_key.name}"
            for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"
            and not e.asset_check_evaluation_data.passed]


def _checks_run(result: dg.ExecuteInProcessResult) -> set[str]:
    return {e.asset_check_evaluation_data.asset_check_key.name for e in result.all_events
            if e.event_type_value == "ASSET_CHECK_EVALUATION"}


@pytest.fixture(scope="module")
def branch(tmp_path_factory):
    """Runs Stage 1 and the SynthVLM branch once for the module (tiny models, 2 shards)."""
    root = tmp_path_factory.mktemp("synthvlm")
    seeds = root / "seeds"
    write_jsonl(seeds / "shard-a.jsonl", coco_captions(6))
    write_jsonl(seeds / "shard-b.jsonl", coco_captions(6, offset=6))
    data = root / "data"
    resources = make_resources(
        data, seeds, diffusion={"tiny_random": True, "resolution": RESOLUTION, "steps": 3,
                                "batch_size": 4})
    defs = dg.Definitions(assets=ASSETS + synthvlm_assets,
                          asset_checks=ASSET_CHECKS + synthvlm_checks,
                          jobs=JOBS + SYNTHVLM_JOBS, resources=resources)
    (root / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(root / "dagster_home")) as instance:
        instance.add_dynamic_partitions(SEED_SHARDS, SHARDS)
        results = {}
        for key in SHARDS:
            stage1 = defs.resolve_job_def("unicorn_shard_job").execute_in_process(
                instance=instance, partition_key=key)
            assert stage1.success
            results[key] = defs.resolve_job_def("synthvlm_job").execute_in_process(
                instance=instance, partition_key=key, raise_on_error=False)
        corpus = defs.resolve_job_def("synthvlm_corpus_job").execute_in_process(
            instance=instance, raise_on_error=False)
        yield {"defs": defs, "instance": instance, "data": data, "shard_runs": results,
               "corpus": corpus, "io": resources["io_manager"]}


def test_every_asset_materialises_and_every_check_passes(branch):
    for key, result in branch["shard_runs"].items():
        assert result.success, key
        assert _failed_checks(result) == [], key
        assert {"files_decode", "no_nan_scores", "score_ranges", "every_image_scored"} \
            <= _checks_run(result)
    corpus = branch["corpus"]
    assert corpus.success
    assert _failed_checks(corpus) == []
    assert {"selection_ratio", "records_resolve"} <= _checks_run(corpus)


def test_images_are_files_and_the_table_holds_no_bytes(branch):
    data: Path = branch["data"]
    for key in SHARDS:
        images = pl.read_parquet(data / "synthetic_images" / f"{key}.parquet")
        candidates = pl.read_parquet(data / "synthvlm_candidates" / f"{key}.parquet")
        assert images.height == 2 * candidates.height > 0
        assert pl.Binary not in images.schema.dtypes()
        files = sorted(p.name for p in (data / "synthetic_images" / key).iterdir())
        assert files == sorted(f"{i}.png" for i in images["image_id"])
        for uri in images["uri"]:
            assert decode_image(Path(uri).read_bytes()).size == (RESOLUTION, RESOLUTION)
        assert images["seed"].n_unique() == images.height
        assert (images["model_id"].str.contains("untrained")).all()


def test_image_checks_fail_on_a_broken_file(branch):
    data: Path = branch["data"]
    images = pl.read_parquet(data / "synthetic_images" / "shard-a.parquet")
    read = file_reader(branch["io"])
    assert verify_image_files(images, read).passed
    resized = images.with_columns(pl.col("render_settings").str.replace(
        f'"resolution": {RESOLUTION}', '"resolution": 1024'))
    assert verify_image_files(resized, read).metadata["wrong_size"] == images.height
    target = Path(images["uri"][0])
    original = target.read_bytes()
    try:
        target.write_bytes(original[: len(original) // 2])
        outcome = verify_image_files(images, read)
        assert not outcome.passed
        assert outcome.metadata["hash_mismatch"] == 1 and outcome.metadata["undecodable"] == 1
        target.unlink()
        assert verify_image_files(images, read).metadata["missing"] == 1
    finally:
        target.write_bytes(original)


def test_selection_keeps_the_configured_share(branch):
    selection = pl.read_parquet(branch["data"] / "synthvlm_selection.parquet")
    captions = selection.filter("best_of_n").height
    assert selection.group_by("caption_id").agg(pl.col("best_of_n").sum())["best_of_n"].to_list() \
        == [1] * captions
    distinct = selection.filter("best_of_n")["caption"].n_unique()
    assert selection["selected"].sum() == math.ceil(0.5 * distinct)
    assert set(selection["shard"]) == set(SHARDS)
    chosen = selection.filter("selected")
    # ranked on the paper's scale: max(cos, 0) + 0.5 * SSIM; CLIPScore (x2.5) reported beside it
    assert chosen["weighted_score"].to_list() == pytest.approx(
        (chosen["clip_cosine_clipped"] + 0.5 * chosen["ssim"]).to_list())
    assert chosen["clipscore_x2_5"].to_list() == pytest.approx(
        (2.5 * chosen["clip_cosine_clipped"]).to_list())
    meta = branch["corpus"].asset_materializations_for_node("synthvlm_selection")[0].metadata
    assert meta["weighted_score_threshold"].value == chosen["weighted_score"].min()
    assert meta["score_formula"].value == "weighted_score = clip_cosine_clipped + lambda * ssim"
    assert meta["clip_cosine_clipped_histogram"].value.startswith(
        "![max(CLIP cosine, 0)](data:image/png;base64,")
    assert Path(meta["ssim_histogram_file"].value).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in meta["examples"].value


def test_export_is_llava_with_resolvable_images_and_checksums(branch):
    root = branch["data"] / "exports" / "synthvlm"
    records = json.loads((root / "pretrain.json").read_text())
    manifest = json.loads((root / "manifest.json").read_text())
    selection = pl.read_parquet(branch["data"] / "synthvlm_selection.parquet")
    assert len(records) == manifest["counts"]["records"] == selection["selected"].sum()
    for record in records:
        human, gpt = record["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert human["value"].count("<image>") == 1
        assert gpt["from"] == "gpt" and gpt["value"]
        assert not Path(record["image"]).is_absolute()
        assert (root / record["image"]).is_file()
    assert manifest["note"].startswith("built with untrained models")
    read = file_reader(branch["io"])
    assert verify_export(str(root), read).passed
    victim = root / records[0]["image"]
    original = victim.read_bytes()
    try:
        victim.unlink()
        outcome = verify_export(str(root), read)
        assert not outcome.passed and outcome.metadata["unresolved"] == [records[0]["id"]]
        victim.write_bytes(original[:-1])
        assert verify_export(str(root), read).metadata["checksum_mismatch"] == [records[0]["image"]]
    finally:
        victim.write_bytes(original)


def test_a_caption_selected_twice_is_exported_once(branch):
    """Two selected images whose captions read the same (e.g. one seed line in two shards): the
    export keeps the first in (shard, caption_id) order and counts the other. Runs before the
    re-rendering test below, which replaces shard-a's images."""
    path = branch["data"] / "synthvlm_selection.parquet"
    original = pl.read_parquet(path)
    first, second = original.filter("selected").sort("shard", "caption_id").head(2).iter_rows(
        named=True)
    try:
        original.with_columns(pl.when(pl.col("caption_id") == second["caption_id"])
                              .then(pl.lit(first["caption"])).otherwise("caption")
                              .alias("caption")).write_parquet(path)
        result = dg.materialize(ASSETS + synthvlm_assets, selection=[dg.AssetKey("synthvlm_dataset")],
                                resources=branch["defs"].resources, instance=branch["instance"])
        assert result.success
        root = branch["data"] / "exports" / "synthvlm"
        manifest = json.loads((root / "manifest.json").read_text())
        records = json.loads((root / "pretrain.json").read_text())
        assert manifest["counts"]["duplicates_dropped"] == 1
        assert len(records) == original["selected"].sum() - 1
        captions = [r["conversations"][1]["value"] for r in records]
        assert captions.count(first["caption"]) == 1
        assert second["image_id"] not in {r["id"] for r in records}
        assert first["image_id"] in {r["id"] for r in records}
    finally:
        original.write_parquet(path)
        dg.materialize(ASSETS + synthvlm_assets, selection=[dg.AssetKey("synthvlm_dataset")],
                       resources=branch["defs"].resources, instance=branch["instance"])


def test_top_k_exports_k_distinct_captions_when_the_best_two_read_the_same(branch):
    """The two best captions (of different shards) made to read the same: the selection drops the
    duplicate before taking the top 3, so the export holds 3 pairs of 3 captions (dropping it
    after would leave 2)."""
    data: Path = branch["data"]
    ranked = pl.read_parquet(data / "synthvlm_selection.parquet").filter(
        pl.col("rank").is_not_null()).sort("rank")
    best, second = ranked.head(2).iter_rows(named=True)
    path = data / "synthetic_images" / f"{second['shard']}.parquet"
    scores_path = data / "image_scores" / f"{second['shard']}.parquet"
    original, original_scores = pl.read_parquet(path), pl.read_parquet(scores_path)
    select = [dg.AssetKey("synthvlm_selection"), dg.AssetKey("synthvlm_dataset")]
    twin_text = pl.col("caption_id") == second["caption_id"]
    try:
        # the caption's text, and the digest of the text its scores were made from, both changed
        original.with_columns(pl.when(twin_text).then(pl.lit(best["caption"]))
                              .otherwise("caption").alias("caption")).write_parquet(path)
        original_scores.with_columns(pl.when(twin_text).then(pl.lit(caption_sha256(
            best["caption"]))).otherwise("caption_sha256").alias("caption_sha256")
        ).write_parquet(scores_path)
        result = dg.materialize(
            ASSETS + synthvlm_assets, selection=select, resources=branch["defs"].resources,
            instance=branch["instance"], raise_on_error=False,
            run_config={"ops": {"synthvlm_selection": {"config": {"top_k": 3}}}})
        assert result.success and _failed_checks(result) == []
        selection = pl.read_parquet(data / "synthvlm_selection.parquet")
        twin = selection.filter(pl.col("image_id") == second["image_id"]).row(0, named=True)
        assert (twin["reason"], twin["duplicate_of"]) == ("duplicate_caption", best["image_id"])
        root = data / "exports" / "synthvlm"
        records = json.loads((root / "pretrain.json").read_text())
        manifest = json.loads((root / "manifest.json").read_text())
        captions = [r["conversations"][1]["value"] for r in records]
        assert len(records) == 3 == len(set(captions))
        assert manifest["counts"]["duplicates_dropped"] == 0
        assert manifest["selection"]["duplicate_captions_before_top_k"] == 1
        assert manifest["selection"]["target_k"] == 3
    finally:
        original.write_parquet(path)
        original_scores.write_parquet(scores_path)
        assert dg.materialize(ASSETS + synthvlm_assets, selection=select,
                              resources=branch["defs"].resources,
                              instance=branch["instance"]).success


def test_metadata_records_how_many_captions_each_text_encoder_cuts(branch):
    """SDXL's two tokenizers and CLIP's, on the captions each of them reads, in the metadata of
    the shard's synthetic_images and image_scores materialisations."""
    from unicorn_assets.logic.synthvlm import clipscore_texts

    data: Path = branch["data"]
    resources = branch["defs"].resources
    for key in SHARDS:
        candidates = pl.read_parquet(data / "synthvlm_candidates" / f"{key}.parquet")
        captions = candidates["caption"].to_list()
        run = branch["shard_runs"][key]
        rendered = {k: v.value for k, v in run.asset_materializations_for_node(
            "synthetic_images")[0].metadata.items()}
        sdxl = resources["diffusion"].prompt_token_counts(captions)
        assert set(rendered["sdxl_prompt_truncation"]) == {"tokenizer", "tokenizer_2"}
        for name, (counts, limit) in sdxl.items():
            recorded = rendered["sdxl_prompt_truncation"][name]
            assert recorded["texts"] == len(captions) and recorded["max_tokens"] == limit == 77
            assert recorded["truncated"] == sum(c > 77 for c in counts)
            assert recorded["tokens"]["max"] == max(counts)
        scored = {k: v.value for k, v in run.asset_materializations_for_node(
            "image_scores")[0].metadata.items()}
        counts = resources["clip"].count_tokens(clipscore_texts(captions))
        limit = resources["clip"].max_text_tokens
        recorded = scored["clip_text_truncation"]["clip"]
        assert recorded["truncated"] == sum(c > limit for c in counts)
        assert recorded["truncated_share"] == round(recorded["truncated"] / len(captions), 4)
        assert scored["clip_text_truncated_share"] == recorded["truncated_share"]
    # FakeLLM's captions run past the tiny SDXL's 77 characters, not all past CLIP's 77 BPE tokens
    assert rendered["sdxl_prompt_truncated_share"] > scored["clip_text_truncated_share"]


def test_rerendering_is_deterministic_and_removes_orphans(branch):
    data: Path = branch["data"]
    folder = data / "synthetic_images" / "shard-a"
    before = pl.read_parquet(data / "synthetic_images" / "shard-a.parquet")
    first_pixels = {image_id: np.asarray(decode_image(Path(uri).read_bytes()), dtype=np.int16)
                    for image_id, uri, index in before.select("image_id", "uri", "image_index")
                    .iter_rows() if index == 0}
    (folder / "stray.png").write_bytes(b"left over from an older run")
    job = branch["defs"].resolve_job_def("synthvlm_job")
    again = job.execute_in_process(instance=branch["instance"], partition_key="shard-a",
                                   asset_selection=[dg.AssetKey("synthetic_images")])
    assert again.success
    after = pl.read_parquet(data / "synthetic_images" / "shard-a.parquet")
    assert after.select("image_id", "seed", "sha256").equals(before.select("image_id", "seed",
                                                                           "sha256"))
    assert not (folder / "stray.png").exists()

    fewer = job.execute_in_process(
        instance=branch["instance"], partition_key="shard-a",
        asset_selection=[dg.AssetKey("synthetic_images")],
        run_config={"ops": {"synthetic_images": {"config": {"images_per_caption": 1}}}})
    assert fewer.success
    one = pl.read_parquet(data / "synthetic_images" / "shard-a.parquet")
    assert one.height == before.height // 2 and set(one["image_index"]) == {0}
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{i}.png" for i in one["image_id"])
    # the first image of every caption is the same picture as before: its seed depends on
    # (caption, index) only; a different batch composition may move a pixel value by 1 or 2
    assert set(one["image_id"]) == set(first_pixels)
    for image_id, uri in one.select("image_id", "uri").iter_rows():
        pixels = np.asarray(decode_image(Path(uri).read_bytes()), dtype=np.int16)
        assert np.abs(pixels - first_pixels[image_id]).max() <= 2


def test_selection_refuses_scores_of_an_image_rendered_again_until_it_is_rescored(branch):
    """Stage 1 re-made a caption with another text: its image id stays, the image is rendered
    again, and the scores of the old picture must not be paired with the new one."""
    data: Path = branch["data"]
    path = data / "synthvlm_candidates" / "shard-a.parquet"
    candidates = pl.read_parquet(path)
    changed = candidates["caption_id"][0]
    candidates.with_columns(pl.when(pl.col("caption_id") == changed)
                            .then(pl.lit("A small green boat floats on a calm grey lake."))
                            .otherwise(pl.col("caption")).alias("caption")).write_parquet(path)
    shard_job = branch["defs"].resolve_job_def("synthvlm_job")
    rendered = shard_job.execute_in_process(instance=branch["instance"], partition_key="shard-a",
                                            asset_selection=[dg.AssetKey("synthetic_images")])
    assert rendered.success
    images = pl.read_parquet(data / "synthetic_images" / "shard-a.parquet")
    scores = pl.read_parquet(data / "image_scores" / "shard-a.parquet")
    stale = images.filter(pl.col("caption_id") == changed).join(
        scores.select("image_id", pl.col("sha256").alias("scored")), on="image_id")
    assert stale.height > 0 and (stale["sha256"] != stale["scored"]).all()

    corpus_job = branch["defs"].resolve_job_def("synthvlm_corpus_job")
    refused = corpus_job.execute_in_process(instance=branch["instance"], raise_on_error=False)
    assert not refused.success
    (failure,) = [e for e in refused.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_key == "synthvlm_selection"
    assert (f"{stale.height} image(s) have no score of their own content ({stale.height} scored "
            "with another image or caption text, 0 scored without digests by an older version, "
            "0 never scored; shards ['shard-a'])"
            in failure.event_specific_data.error.to_string())

    rescored = shard_job.execute_in_process(instance=branch["instance"], partition_key="shard-a",
                                            asset_selection=[dg.AssetKey("image_scores")])
    assert rescored.success
    assert corpus_job.execute_in_process(instance=branch["instance"]).success
    selection = pl.read_parquet(data / "synthvlm_selection.parquet")
    assert set(selection.filter(pl.col("caption_id") == changed)["sha256"]) \
        <= set(stale["sha256"])


def _cli(tmp_path: Path, enabled: bool) -> subprocess.CompletedProcess:
    write_jsonl(tmp_path / "seeds" / "cli-a.jsonl", coco_captions(3, offset=20))
    write_jsonl(tmp_path / "seeds" / "cli-b.jsonl", coco_captions(3, offset=23))
    profile = {
        "storage": {"base_uri": str(tmp_path / "data")},
        "seeds": {"location": str(tmp_path / "seeds")},
        "llm": {"backend": "fake"},
        "quality_gates": {"caption_min_median_words": 5},
        "synthvlm": {"enabled": enabled},
        "diffusion": {"tiny_random": True, "resolution": 80, "steps": 2},
    }
    (tmp_path / "profile.yaml").write_text(json.dumps(profile))  # JSON is YAML
    env = {**os.environ, "UNICORN_PROFILE_FILE": str(tmp_path / "profile.yaml"),
           "DAGSTER_HOME": str(tmp_path / "home")}
    return subprocess.run([sys.executable, "-m", "dagster_project.cli", "synthvlm"], cwd=ROOT,
                          check=False, env=env, capture_output=True, text=True, timeout=600)


def test_the_synthvlm_command_runs_the_branch_offline(tmp_path: Path):
    out = _cli(tmp_path, enabled=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 shard(s):" in out.stdout and "FAILED" not in out.stdout
    root = tmp_path / "data" / "exports" / "synthvlm"
    assert f"export: {root} (" in out.stdout
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["counts"]["records"] == len(json.loads((root / "pretrain.json").read_text()))
    assert set(manifest["counts"]["by_shard"]) <= {"cli-a", "cli-b"}


def test_the_synthvlm_command_says_when_the_branch_is_off(tmp_path: Path):
    out = _cli(tmp_path, enabled=False)
    assert out.returncode == 2
    assert "synthvlm: {enabled: true}" in out.stderr
    assert not (tmp_path / "data" / "synthetic_images").exists()


def test_image_files_on_s3_are_replaced_and_orphans_removed(tmp_path: Path):
    """The same file handling against a real S3-compatible server (moto) on loopback."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer
    from PIL import Image

    from unicorn_assets.logic.images import encode_image, sha256
    from unicorn_assets.synthvlm import replace_folder, storage_uri
    from unicorn_resources.storage import ParquetIOManager, S3Options

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        s3 = S3Options(endpoint_url=f"http://127.0.0.1:{port}", access_key_id="test",
                       secret_access_key="test", region="us-east-1")
        io = ParquetIOManager(base_uri="s3://unicorn-test/data", s3=s3)
        boto3.client("s3", endpoint_url=s3.endpoint_url, region_name=s3.region,
                     aws_access_key_id="test", aws_secret_access_key="test"
                     ).create_bucket(Bucket="unicorn-test")
        fs, _ = s3.fs("s3://unicorn-test")
        folder = storage_uri(io, "synthetic_images", "shard-a")
        assert folder == "s3://unicorn-test/data/synthetic_images/shard-a"
        pictures = {f"img{i}.png": encode_image(Image.new("RGB", (32, 32), (40 * i, 90, 200)),
                                                "png") for i in range(3)}
        replace_folder(io, folder, pictures)
        replace_folder(io, folder, {"img0.png": pictures["img0.png"]})  # a smaller re-render
        fs.invalidate_cache()
        assert fs.ls("unicorn-test/data/synthetic_images/shard-a") == [
            "unicorn-test/data/synthetic_images/shard-a/img0.png"]
        frame = pl.DataFrame({"uri": [f"{folder}/img0.png", f"{folder}/img1.png"],
                              "sha256": [sha256(pictures["img0.png"]),
                                         sha256(pictures["img1.png"])],
                              "render_settings": ['{"resolution": 32}'] * 2})
        outcome = verify_image_files(frame, file_reader(io))
        assert not outcome.passed and outcome.metadata["missing"] == 1
        assert verify_image_files(frame.head(1), file_reader(io)).passed
    finally:
        server.stop()

