"""Storage: atomic writes, one Parquet file per partition that a re-run replaces, the DuckDB
catalog (queried through the duckdb Python API, without Dagster), and lazy loading."""

from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from tests.support import coco_captions
from unicorn_assets.partitions import SEED_SHARDS, seed_shards
from unicorn_resources.storage import (
    ROW_GROUP_ROWS,
    ParquetIOManager,
    atomic_write,
    write_bytes,
    write_parquet,
)

FS = LocalFileSystem()


def test_atomic_write_replaces_the_whole_file(tmp_path: Path):
    target = tmp_path / "deep" / "dir" / "file.bin"
    write_bytes(FS, str(target), b"old")
    write_bytes(FS, str(target), b"new content")
    assert target.read_bytes() == b"new content"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path):
    target = tmp_path / "file.parquet"
    frame = pl.DataFrame({"caption": [c["caption"] for c in coco_captions(3)]})
    write_parquet(FS, str(target), frame)

    def crash(handle):
        handle.write(b"PAR1 half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(FS, str(target), crash)
    assert pl.read_parquet(target).equals(frame)
    assert [p.name for p in tmp_path.iterdir()] == ["file.parquet"]


# ---------------------------------------------------------------- the IO manager in Dagster

ROWS: dict[str, int] = {}


@dg.asset(partitions_def=seed_shards)
def shard_rows(context: dg.AssetExecutionContext) -> dict[str, pl.DataFrame]:
    caps = [c["caption"] for c in coco_captions(10)]
    return {key: pl.DataFrame({"shard": [key] * ROWS[key], "caption": caps[: ROWS[key]]})
            for key in context.partition_keys}


@dg.asset
def corpus_count(shard_rows: pl.LazyFrame) -> pl.DataFrame:
    assert isinstance(shard_rows, pl.LazyFrame)
    return shard_rows.group_by("shard").agg(pl.len().alias("n")).sort("shard").collect()


@dg.asset(partitions_def=seed_shards)
def wrong_keys(context: dg.AssetExecutionContext) -> dict[str, pl.DataFrame]:
    return {"not-this-run": pl.DataFrame({"x": [1]})}


def run(instance, data: Path, assets, key: str | None = None, **kwargs):
    return dg.materialize(assets, instance=instance, partition_key=key,
                          resources={"io_manager": ParquetIOManager(base_uri=str(data))}, **kwargs)


def test_rematerialising_a_partition_replaces_it(tmp_path: Path, instance):
    data = tmp_path / "data"
    instance.add_dynamic_partitions(SEED_SHARDS, ["a", "b"])
    ROWS.update(a=3, b=4)
    run(instance, data, [shard_rows], "a")
    run(instance, data, [shard_rows], "b")
    ROWS["a"] = 5
    result = run(instance, data, [shard_rows], "a")
    assert result.success
    assert sorted(p.name for p in (data / "shard_rows").iterdir()) == ["a.parquet", "b.parquet"]
    assert pl.read_parquet(data / "shard_rows" / "a.parquet").height == 5
    assert pl.read_parquet(data / "shard_rows" / "b.parquet").height == 4
    meta = result.asset_materializations_for_node("shard_rows")[0].metadata
    assert meta["path"].value == str(data / "shard_rows" / "a.parquet")

    # the DuckDB catalog shows each partition once, read without Dagster
    with duckdb.connect(str(data / "catalog.duckdb"), read_only=True) as con:
        rows = con.execute("select shard, count(*) from shard_rows group by shard "
                           "order by shard").fetchall()
    assert rows == [("a", 5), ("b", 4)]


def test_an_unpartitioned_asset_scans_every_shard_lazily(tmp_path: Path, instance):
    data = tmp_path / "data"
    instance.add_dynamic_partitions(SEED_SHARDS, ["a", "b"])
    ROWS.update(a=2, b=6)
    for key in ("a", "b"):
        run(instance, data, [shard_rows], key)
    result = run(instance, data, [shard_rows.to_source_asset(), corpus_count])
    assert result.success
    counts = pl.read_parquet(data / "corpus_count.parquet")
    assert counts.rows() == [("a", 2), ("b", 6)]
    with duckdb.connect(str(data / "catalog.duckdb"), read_only=True) as con:
        assert con.execute("select sum(n) from corpus_count").fetchone() == (8,)


def test_the_catalog_can_be_rebuilt_from_the_files(tmp_path: Path, instance):
    data = tmp_path / "data"
    instance.add_dynamic_partitions(SEED_SHARDS, ["a", "b"])
    ROWS.update(a=2, b=3)
    for key in ("a", "b"):
        run(instance, data, [shard_rows], key)
    run(instance, data, [shard_rows.to_source_asset(), corpus_count])
    (data / "catalog.duckdb").unlink()
    io = ParquetIOManager(base_uri=str(data))
    assert io.rebuild_catalog() == ["corpus_count", "shard_rows"]
    with duckdb.connect(str(data / "catalog.duckdb"), read_only=True) as con:
        assert con.execute("select count(*) from shard_rows").fetchone() == (5,)
        assert con.execute("select count(*) from corpus_count").fetchone() == (2,)
    with pytest.raises(ValueError, match="local storage only"):
        ParquetIOManager(base_uri="s3://bucket/x").rebuild_catalog()


def test_a_missing_partition_file_is_named(tmp_path: Path, instance):
    data = tmp_path / "data"
    instance.add_dynamic_partitions(SEED_SHARDS, ["a", "b"])
    ROWS.update(a=1, b=1)
    run(instance, data, [shard_rows], "a")
    result = run(instance, data, [shard_rows.to_source_asset(), corpus_count],
                 raise_on_error=False)
    assert not result.success
    error = result.get_step_failure_events()[0].step_failure_data.error.to_string()
    assert "shard_rows: 1 partition file(s) not written yet" in error
    assert str(data / "shard_rows" / "b.parquet") in error
    assert "Materialise shard_rows for those shards first" in error


def test_a_partitioned_asset_must_yield_its_run_partitions(tmp_path: Path, instance):
    instance.add_dynamic_partitions(SEED_SHARDS, ["a"])
    result = run(instance, tmp_path / "data", [wrong_keys], "a", raise_on_error=False)
    assert not result.success
    error = result.get_step_failure_events()[0].step_failure_data.error.to_string()
    assert "exactly the run's partitions ['a'], got ['not-this-run']" in error
    assert not (tmp_path / "data" / "wrong_keys").exists()


def test_uris_for_local_and_s3_bases():
    local = ParquetIOManager(base_uri="/srv/data/")
    assert local.uri("expanded_captions", "coco-a") == "/srv/data/expanded_captions/coco-a.parquet"
    assert local.uri("corpus") == "/srv/data/corpus.parquet"
    s3 = ParquetIOManager(base_uri="s3://bucket/unicorn")
    assert s3.uri("caption_seeds", "x") == "s3://bucket/unicorn/caption_seeds/x.parquet"


# ---------------------------------------------------------------- bounded row groups

BIG_ROWS = ROW_GROUP_ROWS * 5 // 2  # two and a half row groups


def big_frame(rows: int = BIG_ROWS) -> pl.LazyFrame:
    """Rows of a float vector, as corpus-wide embeddings are stored, and a text column."""
    return pl.LazyFrame({"i": pl.int_range(rows, eager=True)}).with_columns(
        pl.concat_arr(pl.col("i").cast(pl.Float32), pl.lit(1.0, pl.Float32)).alias("embedding"),
        pl.format("caption {}", "i").alias("caption"))


def row_groups(path: Path) -> list[int]:
    meta = pq.ParquetFile(path).metadata
    return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]


@dg.asset(partitions_def=seed_shards)
def big_shards(context: dg.AssetExecutionContext) -> dict[str, pl.DataFrame]:
    return {key: big_frame().collect() for key in context.partition_keys}


@dg.asset
def big_corpus() -> pl.LazyFrame:
    return big_frame()


def test_the_io_manager_writes_bounded_row_groups(tmp_path: Path, instance):
    """Streaming readers decode whole row groups: a file written in polars' default groups (512^2
    rows) would make every reader of a corpus of embeddings hold hundreds of MiB at once."""
    data = tmp_path / "data"
    instance.add_dynamic_partitions(SEED_SHARDS, ["a"])
    assert run(instance, data, [big_shards], "a").success  # an eager DataFrame per shard
    assert run(instance, data, [big_corpus]).success  # a LazyFrame, streamed by sink_parquet
    for path in (data / "big_shards" / "a.parquet", data / "big_corpus.parquet"):
        groups = row_groups(path)
        assert sum(groups) == BIG_ROWS, path
        assert max(groups) <= ROW_GROUP_ROWS, (path, groups)
        assert pl.read_parquet(path).equals(big_frame().collect()), path
    write_parquet(FS, str(tmp_path / "plain.parquet"), big_frame(ROW_GROUP_ROWS).collect())
    assert row_groups(tmp_path / "plain.parquet") == [ROW_GROUP_ROWS]
    # the bound is the writer's doing: polars' defaults put the same frame in one big group
    big_frame().collect().write_parquet(tmp_path / "default.parquet")
    assert row_groups(tmp_path / "default.parquet") == [BIG_ROWS]
