"""The new-shard sensor, evaluated as the daemon does (evaluate_tick) on a real instance over a
real seed folder; its requests are applied and its runs executed."""

from __future__ import annotations

import json
import os

import dagster as dg
import polars as pl
import pytest

from dagster_project.automation import build_new_shard_sensor
from dagster_project.jobs import unicorn_shard_job
from tests.support import (
    coco_captions,
    make_resources,
    sensor_for,
    sensor_pipeline,
    tick,
    write_jsonl,
)
from unicorn_assets.partitions import SEED_SHARDS


def test_new_files_become_partitions_and_runs_and_the_cursor_survives(instance, seed_dir, tmp_path):
    sensor = sensor_for()
    resources = make_resources(tmp_path / "data", seed_dir)
    first = tick(sensor, instance, resources, None)
    assert sorted(instance.get_dynamic_partitions(SEED_SHARDS)) == ["shard-a", "shard-b"]
    assert sorted(r.partition_key for r in first.run_requests) == ["shard-a", "shard-b"]
    assert all(r.run_key.startswith(f"{r.partition_key}@sha256:") for r in first.run_requests)
    assert set(json.loads(first.cursor)["files"]) == {"shard-a", "shard-b"}

    # The requested run works: seeds and Stage 1 for that shard.
    request = first.run_requests[0]
    result = sensor_pipeline(resources).resolve_job_def("unicorn_shard_job").execute_in_process(
        instance=instance, partition_key=request.partition_key, tags=request.tags)
    assert result.success
    written = pl.read_parquet(tmp_path / "data" / "caption_seeds" / f"{request.partition_key}.parquet")
    assert written.height == 4

    # A restarted daemon passes the stored cursor back: nothing is requested twice.
    again = tick(sensor_for(), instance, resources, first.cursor)
    assert again.run_requests == [] and "no new or changed" in again.skip_message

    # Without a cursor (reset), the same content gives the same run keys, which Dagster dedupes,
    # and shards already materialised are not requested again.
    reset = tick(sensor_for(), instance, resources, None)
    assert [r.partition_key for r in reset.run_requests] == ["shard-b"]
    assert reset.run_requests[0].run_key in {r.run_key for r in first.run_requests}


def test_changed_content_is_requested_again_but_a_touch_is_not(instance, seed_dir, tmp_path):
    sensor, resources = sensor_for(), make_resources(tmp_path / "data", seed_dir)
    first = tick(sensor, instance, resources, None)

    path = seed_dir / "shard-a.jsonl"
    stat = path.stat()
    os.utime(path, (stat.st_atime + 100, stat.st_mtime + 100))
    touched = tick(sensor, instance, resources, first.cursor)
    assert touched.run_requests == []
    assert json.loads(touched.cursor)["files"]["shard-a"]["stat"] != \
        json.loads(first.cursor)["files"]["shard-a"]["stat"]

    write_jsonl(path, coco_captions(4, offset=20))
    changed = tick(sensor, instance, resources, touched.cursor)
    assert [r.partition_key for r in changed.run_requests] == ["shard-a"]
    old_key = next(r.run_key for r in first.run_requests if r.partition_key == "shard-a")
    assert changed.run_requests[0].run_key != old_key
    assert changed.run_requests[0].tags["unicorn/trigger"] == "changed_seed_file"
    assert changed.dynamic_partitions_requests == []  # the key already exists


def test_invalid_files_are_reported_and_skipped(instance, seed_dir, tmp_path, capfd):
    write_jsonl(seed_dir / "bad name!.jsonl", coco_captions(2))
    write_jsonl(seed_dir / "shard-a.csv", coco_captions(2))  # same key as shard-a.jsonl
    (seed_dir / "empty.jsonl").write_bytes(b"")
    (seed_dir / "README.md").write_text("not a seed file, silently ignored")
    sensor, resources = sensor_for(), make_resources(tmp_path / "data", seed_dir)

    first = tick(sensor, instance, resources, None)
    assert [r.partition_key for r in first.run_requests] == ["shard-b"]  # shard-a's files clash
    problems = json.loads(first.cursor)["problems"]
    assert len(problems) == 3
    assert any("bad name!.jsonl" in p and "Rename" in p for p in problems)
    assert any("would all be shard 'shard-a'" in p for p in problems)
    assert any("empty.jsonl" in p for p in problems)
    (observation,) = first.asset_events
    assert observation.asset_key == dg.AssetKey("caption_seed_rejects")
    assert observation.metadata["invalid_seed_file_count"].value == 3
    logged = capfd.readouterr().err
    assert "skipped: " in logged and "bad name!.jsonl" in logged

    # Reported once: the same problems on the next tick add no observation.
    assert tick(sensor, instance, resources, first.cursor).asset_events == []
    # Once fixed, the empty file becomes a shard.
    write_jsonl(seed_dir / "empty.jsonl", coco_captions(2, offset=30))
    fixed = tick(sensor, instance, resources, first.cursor)
    assert [r.partition_key for r in fixed.run_requests] == ["empty"]
    assert fixed.asset_events[0].metadata["invalid_seed_file_count"].value == 2


def test_folders_and_links_are_reported_by_the_sensor(instance, seed_dir, tmp_path, capfd):
    write_jsonl(seed_dir / "nested" / "shard-c.jsonl", coco_captions(2, offset=8))
    (seed_dir / "shard-d.jsonl").symlink_to(seed_dir / "nested" / "shard-c.jsonl")
    sensor, resources = sensor_for(), make_resources(tmp_path / "data", seed_dir)

    first = tick(sensor, instance, resources, None)
    assert sorted(r.partition_key for r in first.run_requests) == ["shard-a", "shard-b"]
    problems = json.loads(first.cursor)["problems"]
    assert [p.split(": ")[0] for p in problems] == [str(seed_dir / "nested"),
                                                   str(seed_dir / "shard-d.jsonl")]
    assert first.asset_events[0].metadata["invalid_seed_file_count"].value == 2
    logged = capfd.readouterr().err
    assert f"skipped: {seed_dir / 'nested'}: a folder" in logged
    assert f"skipped: {seed_dir / 'shard-d.jsonl'}: a symbolic link" in logged


def test_new_keys_per_tick_are_capped(instance, tmp_path):
    folder = tmp_path / "seeds"
    for i in range(5):
        write_jsonl(folder / f"part-{i}.jsonl", coco_captions(2, offset=2 * i))
    sensor, resources = sensor_for(cap=2), make_resources(tmp_path / "data", folder)
    cursor, seen = None, []
    for expected in (2, 2, 1, 0):
        data = tick(sensor, instance, resources, cursor)
        assert len(data.run_requests) == expected
        assert len(data.dynamic_partitions_requests or []) == (1 if expected else 0)
        seen += [r.partition_key for r in data.run_requests]
        cursor = data.cursor
    assert seen == [f"part-{i}" for i in range(5)]
    assert instance.get_dynamic_partitions(SEED_SHARDS) == seen


def test_a_missing_seed_location_fails_the_tick_with_the_fix(instance, tmp_path):
    resources = make_resources(tmp_path / "data", tmp_path / "nowhere")
    with pytest.raises(Exception, match="not a folder or prefix"):
        tick(sensor_for(), instance, resources, None)


def test_settings_come_from_the_profile():
    from dagster_project.automation import AutomationSettings

    settings = AutomationSettings.from_profile(
        {"automation": {"new_shard_sensor": {"max_shards_per_tick": 3, "running": True}}})
    sensor = build_new_shard_sensor(unicorn_shard_job, settings.new_shard_sensor)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert "At most 3 shards per tick" in sensor.description
    with pytest.raises(ValueError, match="max_shard"):
        AutomationSettings.from_profile({"automation": {"new_shard_sensor": {"max_shard": 3}}})
