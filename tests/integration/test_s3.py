"""Seeds, the Parquet IO manager and the sensor against a real S3-compatible server on loopback
(moto's ThreadedMotoServer), reached through s3fs and polars with the S3Options of a profile."""

from __future__ import annotations

import io
import json

import boto3
import dagster as dg
import polars as pl
import pytest
import s3fs
from moto.server import ThreadedMotoServer

from dagster_project.profiles import build_resources, load_profile
from tests.support import coco_captions, materialize_shard, sensor_for, tick
from unicorn_assets.caption_seeds import read_shard
from unicorn_resources.seed_source import SeedSource
from unicorn_resources.storage import S3Options, atomic_write, write_bytes

BUCKET = "unicorn-test"


@pytest.fixture(scope="module")
def s3_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, request):
    """A fresh bucket, a boto3 client on it, and the S3 settings a profile would carry."""
    client = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    bucket = f"{BUCKET}-{request.node.name.replace('_', '-')[:40].strip('-')}"
    client.create_bucket(Bucket=bucket)
    options = {"endpoint_url": s3_endpoint, "access_key_id": "test",
               "secret_access_key": "test", "region": "us-east-1"}
    return client, bucket, options


def s3_resources(bucket: str, options: dict, tmp_path) -> dict:
    """The `cluster` profile's shape: data and seeds on S3; the LLM cache on a local file."""
    return build_resources({
        "storage": {"base_uri": f"s3://{bucket}/data", "s3": dict(options)},
        "seeds": {"location": f"s3://{bucket}/seeds", "s3": dict(options)},
        "llm": {"backend": "fake", "cache_path": str(tmp_path / "llm_cache.sqlite")},
        "quality_gates": {"caption_min_median_words": 5},
    })


def put_jsonl(client, bucket: str, key: str, records: list[dict]) -> None:
    client.put_object(Bucket=bucket, Key=key,
                      Body="".join(json.dumps(r) + "\n" for r in records).encode())


def keys_under(client, bucket: str, prefix: str) -> list[str]:
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_seeds_are_listed_and_read_from_s3(s3):
    client, bucket, options = s3
    put_jsonl(client, bucket, "seeds/shard-a.jsonl", coco_captions(3))
    put_jsonl(client, bucket, "seeds/shard-b.jsonl", coco_captions(2, offset=3))
    client.put_object(Bucket=bucket, Key="seeds/bad name.jsonl", Body=b'{"caption": "x"}\n')
    source = SeedSource(location=f"s3://{bucket}/seeds", s3=S3Options(**options))
    shards, problems = source.shards()
    assert shards == {"shard-a": f"s3://{bucket}/seeds/shard-a.jsonl",
                      "shard-b": f"s3://{bucket}/seeds/shard-b.jsonl"}
    assert len(problems) == 1 and "bad name.jsonl" in problems[0]
    result = read_shard(source, "shard-a")
    assert result.seeds["caption"].to_list() == [r["caption"].strip() for r in coco_captions(3)]
    # A file added after a listing is seen by the next one (no stale s3fs listing cache).
    put_jsonl(client, bucket, "seeds/shard-c.jsonl", coco_captions(2, offset=5))
    assert "shard-c" in source.shards()[0]


def test_a_missing_prefix_fails_with_the_fix(s3):
    client, bucket, options = s3
    put_jsonl(client, bucket, "seeds/shard-a.jsonl", coco_captions(1))
    source = SeedSource(location=f"s3://{bucket}/missing-prefix",
                        s3=S3Options(**options))
    with pytest.raises(Exception, match="not a folder or prefix"):
        source.shards()


def test_seeds_and_stage1_write_parquet_to_s3_and_a_rerun_replaces_it(s3, instance, tmp_path):
    client, bucket, options = s3
    put_jsonl(client, bucket, "seeds/shard-a.jsonl", coco_captions(4))
    resources = s3_resources(bucket, options, tmp_path)
    result = materialize_shard(instance, resources, "shard-a")
    assert result.success
    storage = {"aws_endpoint_url": options["endpoint_url"], "aws_access_key_id": "test",
               "aws_secret_access_key": "test", "aws_region": "us-east-1", "aws_allow_http": "true"}
    captions = pl.read_parquet(f"s3://{bucket}/data/expanded_captions/shard-a.parquet",
                               storage_options=storage)
    assert captions.height > 0 and set(captions["shard"]) == {"shard-a"}
    # Stage 1 read its input, caption_seeds, back from S3 through the IO manager.
    seeds = pl.read_parquet(io.BytesIO(client.get_object(
        Bucket=bucket, Key="data/caption_seeds/shard-a.parquet")["Body"].read()))
    assert set(captions["seed_id"]) <= set(seeds["seed_id"]) and seeds.height == 4

    # New seed content, re-materialised: still one object per partition, with the new content.
    put_jsonl(client, bucket, "seeds/shard-a.jsonl", coco_captions(2, offset=10))
    assert materialize_shard(instance, resources, "shard-a").success
    assert keys_under(client, bucket, "data/caption_seeds/") == ["data/caption_seeds/shard-a.parquet"]
    replaced = pl.read_parquet(io.BytesIO(client.get_object(
        Bucket=bucket, Key="data/caption_seeds/shard-a.parquet")["Body"].read()))
    assert replaced["caption"].to_list() == [r["caption"].strip()
                                             for r in coco_captions(2, offset=10)]
    assert keys_under(client, bucket, "data/expanded_captions/") == [
        "data/expanded_captions/shard-a.parquet"]


def test_a_sensor_tick_over_an_s3_prefix(s3, instance, tmp_path):
    client, bucket, options = s3
    put_jsonl(client, bucket, "seeds/shard-a.jsonl", coco_captions(2))
    resources = s3_resources(bucket, options, tmp_path)
    sensor = sensor_for()
    first = tick(sensor, instance, resources, None)
    (request,) = first.run_requests
    assert request.partition_key == "shard-a" and "@etag:" in request.run_key
    assert instance.get_dynamic_partitions("seed_shards") == ["shard-a"]

    put_jsonl(client, bucket, "seeds/shard-b.jsonl", coco_captions(2, offset=2))
    put_jsonl(client, bucket, "seeds/shard-a.jsonl", coco_captions(2))  # same bytes again
    second = tick(sensor, instance, resources, first.cursor)
    assert [r.partition_key for r in second.run_requests] == ["shard-b"]

    put_jsonl(client, bucket, "seeds/shard-a.jsonl", coco_captions(3))  # new content
    third = tick(sensor, instance, resources, second.cursor)
    assert [r.partition_key for r in third.run_requests] == ["shard-a"]
    assert third.run_requests[0].run_key != request.run_key


PROFILE = """
storage:
  base_uri: s3://{bucket}/data
  s3: &s3
    endpoint_url: {{env: TEST_S3_ENDPOINT}}
    access_key_id: {{env: TEST_S3_KEY}}
    secret_access_key: {{env: TEST_S3_SECRET}}
    region: {{env: TEST_S3_REGION, default: us-east-1}}
seeds:
  location: s3://{bucket}/seeds
  s3: *s3
llm: {{backend: fake, cache_path: {cache}}}
quality_gates: {{caption_min_median_words: 5}}
"""


def test_credentials_from_the_environment_through_a_profile(s3, instance, tmp_path, monkeypatch):
    client, bucket, options = s3
    put_jsonl(client, bucket, "seeds/shard-a.jsonl", coco_captions(3))
    path = tmp_path / "profile.yaml"
    path.write_text(PROFILE.format(bucket=bucket, cache=tmp_path / "cache.sqlite"))
    monkeypatch.setenv("UNICORN_PROFILE_FILE", str(path))
    monkeypatch.setenv("TEST_S3_ENDPOINT", options["endpoint_url"])
    monkeypatch.setenv("TEST_S3_KEY", "test")
    monkeypatch.setenv("TEST_S3_SECRET", "test")
    resources = build_resources(load_profile())
    assert isinstance(resources["io_manager"].s3.secret_access_key, dg.EnvVar)  # not in the UI
    assert materialize_shard(instance, resources, "shard-a").success
    assert keys_under(client, bucket, "data/expanded_captions/") == [
        "data/expanded_captions/shard-a.parquet"]


def test_the_image_and_export_writer_replaces_objects_whole(s3):
    client, bucket, options = s3
    fs, path = S3Options(**options).fs(f"s3://{bucket}/exports/manifest.json")
    write_bytes(fs, path, b'{"version": 1}')
    write_bytes(fs, path, b'{"version": 2}')
    assert keys_under(client, bucket, "exports/") == ["exports/manifest.json"]
    body = client.get_object(Bucket=bucket, Key="exports/manifest.json")["Body"].read()
    assert json.loads(body) == {"version": 2}


class WriterDied(Exception):
    pass


@pytest.mark.parametrize("megabytes", [0, 11], ids=["one-request", "multipart"])
def test_a_write_that_raises_publishes_nothing(s3, megabytes):
    """The writer fails after some bytes (a crash inside Parquet encoding, say): the old object
    stays whole, no partial object appears, and no multipart upload is left open."""
    client, bucket, options = s3
    fs = s3fs.S3FileSystem(key="test", secret="test", default_block_size=5 * 2**20,
                           client_kwargs={"endpoint_url": options["endpoint_url"],
                                          "region_name": "us-east-1"}, skip_instance_cache=True)
    client.put_object(Bucket=bucket, Key="data/old.parquet", Body=b"old, whole")

    def dies_midway(handle):
        handle.write(b"x" * (megabytes * 2**20 + 1024))
        raise WriterDied

    for key in ("data/old.parquet", "data/new.parquet"):
        with pytest.raises(WriterDied):
            atomic_write(fs, f"{bucket}/{key}", dies_midway)
    assert keys_under(client, bucket, "data/") == ["data/old.parquet"]
    assert client.get_object(Bucket=bucket, Key="data/old.parquet")["Body"].read() == b"old, whole"
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
