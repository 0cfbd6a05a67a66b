"""Partition keys are hostile: Dagster registers any string as a dynamic partition (the Python
API, the UI's GraphQL addDynamicPartition), and every path made from a key goes through one gate
(unicorn_resources.keys.key_path). Unit tests of the gate, then hostile keys added straight to
a real instance and materialised: the runs fail with the gate's message, and not one file of
the whole temporary tree changes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from dagster_project.definitions import ASSET_CHECKS, ASSETS
from dagster_project.jobs import JOBS
from tests.support import coco_captions, make_resources, materialize_shard, write_jsonl
from unicorn_assets.logic import synthvlm as synthvlm_logic
from unicorn_assets.partitions import SEED_SHARDS
from unicorn_assets.synthvlm import RenderConfig, synthetic_images
from unicorn_resources.keys import (
    KEY_RULE,
    SeedError,
    UnsafeKeyError,
    check_key,
    discover_shards,
    is_inside,
    key_path,
    key_problem,
    shard_key_for,
)
from unicorn_resources.storage import Catalog, ParquetIOManager

HOSTILE = ["../../outside/pwn", "../caption_seeds/real", "/etc/x", "nl\n"]

# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize("key", ["real", "coco-val2017_a.v2", "k" * 128, "a.", "COM0", "CONSOLE",
                                 "nul-shard", "LPT10", "x.CON"])
def test_safe_keys_pass(key):
    assert key_problem(key) is None
    assert check_key(key) == key


@pytest.mark.parametrize("key, problem", [
    ("../../outside/pwn", "starts with '.'"),
    ("../caption_seeds/real", "starts with '.'"),
    ("/etc/x", "starts with '/'"),
    ("nl\n", "contains '\\n'"),  # `^...$` let this one through: `$` matches before a final \n
    ("a/b", "contains '/'"),
    ("a\\b", "contains '\\\\'"),
    ("a..b", "contains '..'"),
    ("", "empty"),
    ("k" * 129, "129 characters, over 128"),
    ("caf\u00e9", "contains '\u00e9'"),
    ("CON", "'CON' is a device name on Windows"),
    ("con.jsonl", "'con' is a device name on Windows"),
    ("Nul.tar.gz", "'Nul' is a device name on Windows"),
    ("com7", "'com7' is a device name on Windows"),
    ("LPT1.x", "'LPT1' is a device name on Windows"),
    ("aux", "'aux' is a device name on Windows"),
    ("prn", "'prn' is a device name on Windows"),
])
def test_unsafe_keys_are_refused_with_the_key_and_the_rule(key, problem):
    assert problem in key_problem(key)
    with pytest.raises(UnsafeKeyError) as err:
        check_key(key)
    message = str(err.value)
    assert f"partition key {key!r}" in message and problem in message and KEY_RULE in message
    assert "delete_dynamic_partition" in message  # the fix
    suggestion = message.split("e.g. ")[1].split("'")[1]
    assert key_problem(suggestion) is None  # what it suggests is itself safe


@pytest.mark.parametrize("name", ["nl\n.jsonl", "CON.jsonl", "aux.csv", "lpt3.parquet",
                                  ".x.jsonl", "a\tb.jsonl"])
def test_seed_file_names_follow_the_same_rule(name):
    with pytest.raises(SeedError, match="cannot be a partition key") as err:
        shard_key_for(f"/seeds/{name}")
    stem = name.rsplit(".", 1)[0]
    assert key_problem(stem) in str(err.value) and KEY_RULE in str(err.value)
    shards, problems = discover_shards(["/seeds/good.jsonl", f"/seeds/{name}"])
    assert shards == {"good": "/seeds/good.jsonl"} and len(problems) == 1


def test_key_path_stays_inside_its_folder(tmp_path: Path):
    folder = str(tmp_path / "data" / "expanded_captions")
    assert key_path(folder, "real", ".parquet") == f"{folder}/real.parquet"
    assert key_path(folder + "/", "real") == f"{folder}/real"
    assert key_path("s3://bucket/unicorn/caption_seeds", "real", ".parquet") \
        == "s3://bucket/unicorn/caption_seeds/real.parquet"
    for key in HOSTILE:
        with pytest.raises(UnsafeKeyError, match="cannot be used in a file path"):
            key_path(folder, key, ".parquet")
        with pytest.raises(UnsafeKeyError):
            key_path("s3://bucket/unicorn/caption_seeds", key, ".parquet")
    with pytest.raises(UnsafeKeyError, match="suffix"):
        key_path(folder, "real", "/../../x")


def test_containment_is_checked_on_resolved_paths_and_normalised_uris(tmp_path: Path):
    real = tmp_path / "real_folder"
    real.mkdir()
    (tmp_path / "linked").symlink_to(real)
    assert is_inside(str(tmp_path / "linked"), str(tmp_path / "linked" / "a.parquet"))
    assert not is_inside(str(tmp_path / "data"), str(tmp_path / "data" / ".." / "x.parquet"))
    assert not is_inside(str(tmp_path / "data"), str(tmp_path / "data"))
    assert not is_inside(str(tmp_path / "data"), str(tmp_path / "database" / "x"))
    assert is_inside("s3://b/u/seeds", "s3://b/u/seeds/a.parquet")
    assert not is_inside("s3://b/u/seeds", "s3://b/u/seeds/../other/a.parquet")
    assert not is_inside("s3://b/u/seeds", "s3://b/u/seeds2/a.parquet")
    assert not is_inside("s3://b/u/seeds", "gs://b/u/seeds/a.parquet")


def test_the_io_manager_refuses_unsafe_keys():
    io = ParquetIOManager(base_uri="/srv/data")
    assert io.uri("caption_seeds", "real") == "/srv/data/caption_seeds/real.parquet"
    for key in HOSTILE:
        with pytest.raises(UnsafeKeyError, match="cannot be used in a file path"):
            io.uri("caption_seeds", key)


# ---------------------------------------------------------------- hostile keys in real runs


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under `root` (but the Dagster home, which runs do write), with its
    content hash, size and mtime."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(folder, d) != root / "dagster_home"]
        for name in dirs:
            found[os.path.relpath(Path(folder, name), root) + "/"] = ()
        for name in files:
            path = Path(folder, name)
            stat = path.stat()
            found[os.path.relpath(path, root)] = (
                hashlib.sha256(path.read_bytes()).hexdigest(), stat.st_size, stat.st_mtime_ns)
    return found


def step_errors(result: dg.ExecuteInProcessResult) -> list[str]:
    return [e.step_failure_data.error.to_string() for e in result.all_events
            if e.event_type_value == "STEP_FAILURE"]


def assert_refused(result: dg.ExecuteInProcessResult, keys: list[str]) -> None:
    """The run failed at its first step, at once (no retry: none can make a key safe), with the
    gate's message naming one of `keys`, and materialised nothing."""
    assert not result.success
    errors = step_errors(result)
    assert len(errors) == 1, errors
    assert any(f"partition key {key!r} cannot be used in a file path" in errors[0]
               for key in keys), errors[0]
    assert KEY_RULE in errors[0]
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert not result.get_asset_materialization_events()


@pytest.fixture
def hostile_setup(tmp_path: Path, instance, fake_llm):
    """Two real shards materialised (seeds + Stage 1), a Parquet file outside the data folder
    where `../../outside/pwn` points, and the hostile keys registered straight on the instance."""
    seeds, data = tmp_path / "seeds", tmp_path / "data"
    write_jsonl(seeds / "real.jsonl", coco_captions(3))
    write_jsonl(seeds / "other.jsonl", coco_captions(3, offset=3))
    resources = make_resources(data, seeds, llm=fake_llm)
    for key in ("real", "other"):
        assert materialize_shard(instance, resources, key).success
    outside = tmp_path / "outside" / "pwn.parquet"
    outside.parent.mkdir()
    # readable as the seeds of the shard it pretends to be, so nothing but the gate stops a run
    pl.read_parquet(data / "caption_seeds" / "real.parquet").write_parquet(outside)
    instance.add_dynamic_partitions(SEED_SHARDS, HOSTILE)
    defs = dg.Definitions(assets=ASSETS, asset_checks=ASSET_CHECKS, jobs=JOBS,
                          resources=resources)
    return defs, instance


def test_hostile_keys_change_no_file_stage1_only_or_shard_job(tmp_path: Path, hostile_setup):
    defs, instance = hostile_setup
    before = snapshot(tmp_path)
    job = defs.resolve_job_def("unicorn_shard_job")
    for key in HOSTILE:
        stage1_only = job.execute_in_process(
            instance=instance, partition_key=key, raise_on_error=False,
            asset_selection=[dg.AssetKey("expanded_captions"),
                             dg.AssetKey("expanded_caption_rejects")])
        assert_refused(stage1_only, [key])
        assert_refused(job.execute_in_process(instance=instance, partition_key=key,
                                              raise_on_error=False), [key])
        assert snapshot(tmp_path) == before, key


def test_a_run_over_a_range_with_a_hostile_key_writes_no_shard(tmp_path: Path, hostile_setup):
    """A backfill run spans several keys: one unsafe key refuses the run before any shard,
    the safe ones included, is read or written."""
    defs, instance = hostile_setup
    before = snapshot(tmp_path)
    # the registration order is real, other, then the hostile keys: the range holds them all
    tags = {"dagster/asset_partition_range_start": "other",
            "dagster/asset_partition_range_end": HOSTILE[1]}
    result = defs.resolve_job_def("unicorn_shard_job").execute_in_process(
        instance=instance, tags=tags, raise_on_error=False,
        asset_selection=[dg.AssetKey("expanded_captions"), dg.AssetKey("expanded_caption_rejects")])
    assert_refused(result, HOSTILE[:2])
    assert snapshot(tmp_path) == before


def test_synthvlm_image_folders_go_through_the_gate(tmp_path: Path, instance):
    """synthetic_images replaces its shard's image folder whole (deleting other files there): a
    key reaching it unchecked would empty another asset's folder. Its folder has its own gate,
    not only the IO manager's."""
    data = tmp_path / "data"
    resources = make_resources(data, tmp_path / "seeds", diffusion={"tiny_random": True})
    seeds = data / "caption_seeds"
    write_jsonl(seeds / "kept.jsonl", coco_captions(2))
    before = snapshot(tmp_path)
    key = "../caption_seeds"
    instance.add_dynamic_partitions(SEED_SHARDS, [key])
    context = dg.build_asset_context(partition_key=key, instance=instance)
    candidates = pl.DataFrame(schema=synthvlm_logic.CANDIDATE_SCHEMA)
    with pytest.raises(UnsafeKeyError, match=r"partition key '\.\./caption_seeds'") as err:
        list(synthetic_images(context, config=RenderConfig(), diffusion=resources["diffusion"],
                              io_manager=resources["io_manager"],
                              quality_gates=resources["quality_gates"],
                              synthvlm_candidates=candidates))
    assert isinstance(err.value, dg.Failure) and not err.value.allow_retries
    assert snapshot(tmp_path) == before


def test_the_catalog_makes_views_of_safe_names_only(tmp_path: Path):
    """Folder and file names under the data folder reach the catalog's SQL as view names: one
    that breaks the key rule (a quote, a hidden temporary) is no asset and gets no view."""
    data = tmp_path / "data"
    frame = pl.DataFrame({"caption": [c["caption"] for c in coco_captions(2)]})
    for path in (data / "shard_rows" / "a.parquet", data / "corpus.parquet",
                 data / 'x" as select 1; drop view "corpus' / "a.parquet",
                 data / ".corpus.parquet"):
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(path)
    io = ParquetIOManager(base_uri=str(data))
    assert io.rebuild_catalog() == ["corpus", "shard_rows"]
    with Catalog(str(data / "catalog.duckdb")).connect() as con:
        views = {row[0] for row in con.execute("select view_name from duckdb_views() "
                                               "where not internal").fetchall()}
        assert views == {"corpus", "shard_rows"}
        assert con.execute("select count(*) from corpus").fetchone() == (2,)
