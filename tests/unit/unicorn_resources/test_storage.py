"""Storage: atomic writes, one Parquet file per partition that a re-run replaces, the DuckDB
catalog (queried through the duckdb Python API, without Dagster), and lazy loading."""

import logging
import subprocess
import sys
import threading
import time
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
    Catalog,
    CatalogLocked,
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
    with Catalog(str(data / "catalog.duckdb")).connect() as con:
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
    with Catalog(str(data / "catalog.duckdb")).connect() as con:
        assert con.execute("select sum(n) from corpus_count").fetchone() == (8,)


# the columns the next materialisation of `versioned_rows` adds: a newer version of the asset
NEW_COLUMNS: dict[str, pl.Series] = {}


@dg.asset(partitions_def=seed_shards)
def versioned_rows(context: dg.AssetExecutionContext) -> dict[str, pl.DataFrame]:
    return {key: pl.DataFrame({"shard": [key, key]}).with_columns(*NEW_COLUMNS.values())
            for key in context.partition_keys}


@dg.asset
def versioned_corpus(versioned_rows: pl.LazyFrame) -> pl.DataFrame:
    return versioned_rows.sort("shard").collect()


def test_a_lazy_corpus_reads_shards_of_older_and_newer_versions(tmp_path: Path, instance):
    """Shard a written before a column was added, b after (in either order of the files): one
    scan with the column null for a, as the eager path reads them."""
    data = tmp_path / "data"
    instance.add_dynamic_partitions(SEED_SHARDS, ["a", "b", "c"])
    NEW_COLUMNS.clear()
    run(instance, data, [versioned_rows], "b")
    NEW_COLUMNS["sha256"] = pl.Series("sha256", ["d1", "d2"])
    run(instance, data, [versioned_rows], "a")
    NEW_COLUMNS.clear()
    run(instance, data, [versioned_rows], "c")
    result = run(instance, data, [versioned_rows.to_source_asset(), versioned_corpus])
    assert result.success
    corpus = pl.read_parquet(data / "versioned_corpus.parquet")
    assert corpus.rows() == [("a", "d1"), ("a", "d2"), ("b", None), ("b", None), ("c", None),
                             ("c", None)]


def test_a_column_whose_type_changed_between_shards_is_named(tmp_path: Path, instance):
    data = tmp_path / "data"
    instance.add_dynamic_partitions(SEED_SHARDS, ["a", "b"])
    NEW_COLUMNS.update(score=pl.Series("score", [1, 2]))
    run(instance, data, [versioned_rows], "a")
    NEW_COLUMNS.update(score=pl.Series("score", [0.5, 0.7]))
    run(instance, data, [versioned_rows], "b")
    NEW_COLUMNS.clear()
    result = run(instance, data, [versioned_rows.to_source_asset(), versioned_corpus],
                 raise_on_error=False)
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.event_specific_data.error.to_string()
    assert "versioned_rows: column 'score' is Int64 in" in message and "but Float64 in" in message
    assert "re-materialise versioned_rows for the older shards" in message


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
    with Catalog(str(data / "catalog.duckdb")).connect() as con:
        assert con.execute("select count(*) from shard_rows").fetchone() == (5,)
        assert con.execute("select count(*) from corpus_count").fetchone() == (2,)
    with pytest.raises(ValueError, match="local storage only"):
        ParquetIOManager(base_uri="s3://bucket/x").rebuild_catalog()


# ---------------------------------------------------------------- a catalog held by another process

HOLD = ("import duckdb, sys; con = duckdb.connect(sys.argv[1]); print('open', flush=True); "
        "sys.stdin.readline(); con.close()")


class CatalogHolder:
    """Another process with the catalog open for writing, as a DuckDB shell has it: DuckDB locks
    the file for as long as it is open."""

    def __init__(self, path: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "open"

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=30)


def views(data: Path) -> dict[str, int]:
    with Catalog(str(data / "catalog.duckdb")).connect() as con:
        names = [r[0] for r in con.execute("select view_name from duckdb_views() "
                                           "where not internal").fetchall()]
        return {n: con.execute(f'select count(*) from "{n}"').fetchone()[0] for n in names}


def warnings_of(instance, result) -> list[str]:
    return [e.user_message for e in instance.all_logs(result.run_id)
            if e.level == logging.WARNING and e.dagster_event is None]


def test_a_write_waits_for_a_catalog_held_open_then_creates_its_view(tmp_path: Path, instance):
    data = tmp_path / "data"
    data.mkdir()
    instance.add_dynamic_partitions(SEED_SHARDS, ["a"])
    ROWS.update(a=3)
    holder = CatalogHolder(data / "catalog.duckdb")
    timer = threading.Timer(2.0, holder.release)
    timer.start()
    try:
        started = time.monotonic()
        result = run(instance, data, [shard_rows], "a")
        assert result.success and time.monotonic() - started >= 2.0  # it waited
    finally:
        timer.join()
        holder.release()
    assert views(data) == {"shard_rows": 3}
    assert not warnings_of(instance, result)


def test_a_catalog_held_for_the_whole_run_leaves_the_view_pending_and_warns(tmp_path: Path,
                                                                            instance):
    data = tmp_path / "data"
    data.mkdir()
    instance.add_dynamic_partitions(SEED_SHARDS, ["a"])
    ROWS.update(a=2)
    io = ParquetIOManager(base_uri=str(data), catalog_wait_seconds=0.5)
    holder = CatalogHolder(data / "catalog.duckdb")
    try:
        result = dg.materialize([shard_rows], instance=instance, partition_key="a",
                                resources={"io_manager": io})
        assert result.success  # the data is written; only its view waits
        (warning,) = warnings_of(instance, result)
        assert "catalog view 'shard_rows' not refreshed" in warning
        assert "locked by another process" in warning and "unicorn catalog" in warning
        # `unicorn catalog` says the same, and fails, while the file is held
        with pytest.raises(CatalogLocked, match="locked by another process"):
            io.rebuild_catalog()
    finally:
        holder.release()
    assert "shard_rows" not in views(data)
    # The next write creates the pending view (and its own) once the lock is free.
    result = dg.materialize([shard_rows.to_source_asset(), corpus_count], instance=instance,
                            resources={"io_manager": io})
    assert result.success and not warnings_of(instance, result)
    assert views(data) == {"shard_rows": 2, "corpus_count": 1}
    assert not any(io.catalog().pending_dir.iterdir())


def test_a_pending_view_whose_files_are_gone_is_dropped(tmp_path: Path):
    folder = tmp_path / "a"
    folder.mkdir()
    pl.DataFrame({"x": [1]}).write_parquet(folder / "one.parquet")
    catalog = Catalog(str(tmp_path / "catalog.duckdb"))
    catalog._add_pending("gone", f"{tmp_path}/gone/*.parquet")  # as a give-up leaves it
    assert catalog.refresh_view("a", f"{folder}/*.parquet", ["x"])
    with Catalog(str(tmp_path / "catalog.duckdb")).connect() as con:
        assert [r[0] for r in con.execute("select view_name from duckdb_views() "
                                          "where not internal").fetchall()] == ["a"]
    assert not any(catalog.pending_dir.iterdir())


def test_the_views_name_their_files_relative_to_the_catalog_so_the_folder_can_move(
        tmp_path: Path):
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    pl.DataFrame({"x": [1, 2]}).write_parquet(data / "a" / "one.parquet")
    Catalog(str(data / "catalog.duckdb")).refresh_views({"a": f"{data}/a/*.parquet"})
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    data.rename(moved)
    with Catalog(str(moved / "catalog.duckdb")).connect() as con:
        assert con.execute("select count(*) from a").fetchone() == (2,)
        (sql,) = con.execute("select sql from duckdb_views() where view_name = 'a'").fetchone()
        assert str(tmp_path) not in sql


def test_a_failed_catalog_refresh_leaves_every_view_as_it_was(tmp_path: Path):
    folder = tmp_path / "a"
    folder.mkdir()
    pl.DataFrame({"x": [1, 2]}).write_parquet(folder / "one.parquet")
    catalog = Catalog(str(tmp_path / "catalog.duckdb"))
    catalog.refresh_views({"a": f"{folder}/*.parquet"})
    with pytest.raises(duckdb.IOException, match="No files found"):  # b has no files yet
        catalog.refresh_views({"a": f"{folder}/one.parquet", "b": f"{tmp_path}/b/*.parquet"})
    with Catalog(str(tmp_path / "catalog.duckdb")).connect() as con:
        (sql,) = con.execute("select sql from duckdb_views() where view_name = 'a'").fetchone()
        assert "'a/*.parquet'" in sql  # not replaced: the transaction was rolled back
        assert con.execute("select count(*) from a").fetchone() == (2,)


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
