"""Storage over a base URI (a local folder or s3://): atomic writes, a Parquet IO manager, a DuckDB catalog."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import dagster as dg
import fsspec
import polars as pl
from fsspec.implementations.local import LocalFileSystem


class S3Options(dg.Config):
    """Connection settings for s3:// URIs; each may be an `EnvVar`. Unset values fall back to the
    usual AWS environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, …)."""

    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    region: str | None = None

    def storage_options(self, uri: str) -> dict[str, Any]:
        if not uri.startswith("s3://"):
            return {}
        opts: dict[str, Any] = {}
        if self.access_key_id:
            opts["key"] = self.access_key_id
        if self.secret_access_key:
            opts["secret"] = self.secret_access_key
        client: dict[str, Any] = {}
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        if self.region:
            client["region_name"] = self.region
        if client:
            opts["client_kwargs"] = client
        return opts

    def polars_options(self, uri: str) -> dict[str, str] | None:
        """The same settings in the form polars' cloud readers take."""
        if not uri.startswith("s3://"):
            return None
        opts = {k: v for k, v in {
            "aws_access_key_id": self.access_key_id, "aws_secret_access_key": self.secret_access_key,
            "aws_endpoint_url": self.endpoint_url, "aws_region": self.region or "us-east-1",
        }.items() if v}
        if self.endpoint_url and self.endpoint_url.startswith("http://"):
            opts["aws_allow_http"] = "true"
        return opts

    def fs(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, path = fsspec.core.url_to_fs(uri, **self.storage_options(uri))
        return fs, path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, write: Callable[[Any], None]) -> None:
    """Write `path` so that readers see the old file or the whole new one, never a part.

    Locally: write a hidden temporary file beside it, then rename over it. On an object store
    an object appears only when its upload completes, so a direct write is already atomic.
    """
    if is_local(fs):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        with fs.open(path, "wb") as handle:
            write(handle)


# Rows per Parquet row group. Streaming readers decode whole row groups, several at a time, so this
# bounds their memory: 48 MiB of 768-d float32 embeddings, where polars' default (512^2 rows)
# holds 768 MiB (benchmarks/FINDINGS.md, 6. Memory).
ROW_GROUP_ROWS = 16_384


def write_parquet(fs: fsspec.AbstractFileSystem, path: str,
                  frame: pl.DataFrame | pl.LazyFrame) -> None:
    """Write `frame` in row groups of at most ROW_GROUP_ROWS rows. A LazyFrame is streamed into
    the file, never collected whole."""
    options = {"compression": "zstd", "statistics": True, "row_group_size": ROW_GROUP_ROWS}
    if isinstance(frame, pl.LazyFrame):
        atomic_write(fs, path, lambda handle: frame.sink_parquet(handle, **options))
        return
    atomic_write(fs, path, lambda handle: frame.write_parquet(handle, **options))


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    atomic_write(fs, path, lambda handle: handle.write(data))


# Bytes read at a time when a file is copied or hashed: its memory, whatever the file's size.
COPY_CHUNK = 1 << 20


class ChecksumMismatch(ValueError):
    """A file's content is not the one its recorded SHA-256 names."""


def file_sha256(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, int]:
    """(SHA-256 hex digest, size in bytes) of a file, read COPY_CHUNK bytes at a time."""
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as handle:
        while block := handle.read(COPY_CHUNK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def copy_file(src_fs: fsspec.AbstractFileSystem, src: str, dst_fs: fsspec.AbstractFileSystem,
              dst: str, expected_sha256: str | None = None) -> tuple[str, int]:
    """Copy `src` to `dst` (an atomic write) COPY_CHUNK bytes at a time, hashing them as they pass;
    returns (SHA-256, size). With `expected_sha256`, a source whose content differs raises
    ChecksumMismatch, and `dst` does not receive it."""
    digest, size = hashlib.sha256(), 0

    def write(out: Any) -> None:
        nonlocal size
        with src_fs.open(src, "rb") as handle:
            while block := handle.read(COPY_CHUNK):
                digest.update(block)
                size += len(block)
                out.write(block)
        if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
            raise ChecksumMismatch(f"{src}: SHA-256 {digest.hexdigest()}, expected "
                                   f"{expected_sha256}")

    try:
        atomic_write(dst_fs, dst, write)
    except ChecksumMismatch:
        if not is_local(dst_fs) and dst_fs.exists(dst):
            dst_fs.rm(dst)  # an object store publishes an upload when it closes: take it back
        raise
    return digest.hexdigest(), size


class ParquetIOManager(dg.ConfigurableIOManager):
    """Stores each asset (partition) as one Parquet file under `base_uri`:
    `<base>/<asset>/<partition>.parquet` for per-shard assets, `<base>/<asset>.parquet` otherwise.

    A write replaces the file atomically, so re-running a partition never duplicates it. An input
    annotated `pl.LazyFrame` is scanned lazily (corpus-wide assets stream over every shard).
    """

    base_uri: str = "data"
    s3: S3Options = S3Options()
    catalog_path: str | None = None  # DuckDB catalog of views; default <base>/catalog.duckdb (local)

    def uri(self, asset: str, partition: str | None = None) -> str:
        if partition is None:
            return join(self.base_uri, f"{asset}.parquet")
        return join(self.base_uri, asset, f"{partition}.parquet")

    def _name(self, key: dg.AssetKey) -> str:
        return "__".join(key.path)

    def handle_output(self, context: dg.OutputContext,
                      obj: pl.DataFrame | dict[str, pl.DataFrame] | None) -> None:
        """A per-shard asset yields {partition key: frame} (one entry per partition of the run,
        so a backfill run may carry many); an unpartitioned asset yields a frame, or a LazyFrame
        that is streamed to its file (corpus-wide results larger than memory)."""
        if obj is None:
            return
        name = self._name(context.asset_key)
        if context.has_asset_partitions:
            if not isinstance(obj, dict) or set(obj) != set(context.asset_partition_keys):
                raise TypeError(
                    f"{name}: a partitioned asset must yield {{partition key: DataFrame}} for "
                    f"exactly the run's partitions {sorted(context.asset_partition_keys)}, got "
                    f"{sorted(obj) if isinstance(obj, dict) else type(obj).__name__}")
            frames = obj
        else:
            frames = {None: obj}
        uris = []
        for partition, frame in frames.items():
            if not isinstance(frame, (pl.DataFrame, pl.LazyFrame)):
                raise TypeError(f"{name}: ParquetIOManager stores polars DataFrames, got "
                                f"{type(frame).__name__}")
            uri = self.uri(name, partition)
            fs, path = self.s3.fs(uri)
            write_parquet(fs, path, frame)
            uris.append(uri)
        context.add_output_metadata({"path": dg.MetadataValue.path(uris[0]) if len(uris) == 1
                                     else dg.MetadataValue.json(uris)})
        if is_local(fs):
            columns = {c for frame in frames.values() for c in frame.collect_schema().names()}
            self.catalog().refresh_view(name, self._glob(name, context.has_asset_partitions),
                                        columns, log=context.log)

    def load_input(self, context: dg.InputContext) -> pl.DataFrame | pl.LazyFrame:
        name = self._name(context.asset_key)
        if context.has_asset_partitions:
            uris = [self.uri(name, key) for key in context.asset_partition_keys]
        else:
            uris = [self.uri(name)]
        fs, _ = self.s3.fs(uris[0])
        missing = [u for u in uris if not fs.exists(self.s3.fs(u)[1])]
        if missing:
            raise FileNotFoundError(
                f"{name}: {len(missing)} partition file(s) not written yet, e.g. {missing[0]}. "
                f"Materialise {name} for those shards first."
            )
        lazy = context.dagster_type.typing_type is pl.LazyFrame
        options = self.s3.polars_options(uris[0])
        if lazy:
            return pl.scan_parquet(uris, storage_options=options) if uris else pl.LazyFrame()
        frames = [pl.read_parquet(u, storage_options=options) for u in uris]
        return pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]

    def _glob(self, name: str, partitioned: bool) -> str:
        base = str(Path(self.base_uri).resolve())
        return f"{base}/{name}/*.parquet" if partitioned else f"{base}/{name}.parquet"

    def catalog(self) -> Catalog:
        return Catalog(self.catalog_path or join(self.base_uri, "catalog.duckdb"))

    def rebuild_catalog(self) -> list[str]:
        """(Re)create the catalog view of every asset stored under a local base_uri."""
        base = Path(self.base_uri)
        if "://" in self.base_uri or not base.is_dir():
            raise ValueError(f"no local data under {self.base_uri}; the DuckDB catalog covers "
                             "local storage only")
        views = {p.stem: False for p in base.glob("*.parquet")}
        views.update({d.name: True for d in base.iterdir()
                      if d.is_dir() and any(d.glob("*.parquet"))})
        catalog = self.catalog()
        for name, partitioned in views.items():
            catalog.refresh_view(name, self._glob(name, partitioned))
        return sorted(views)


class Catalog:
    """A DuckDB file of views over the Parquet files, so the data can be queried without Dagster:
    `duckdb data/catalog.duckdb -c "select count(*) from expanded_captions"`."""

    def __init__(self, path: str):
        self.path = path

    def refresh_view(self, name: str, glob: str, columns: Collection[str] | None = None,
                     log: Any = None, attempts: int = 20) -> bool:
        """(Re)create the view `name` over the files of `glob`; returns whether it did. Given the
        `columns` of the frame just written, only when the view is missing, reads another glob or
        has other columns: DuckDB finds the glob's files at query time, so a new file alone needs
        nothing. The check reads the catalog only, never the Parquet files."""
        import duckdb

        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        sql = (f'create or replace view "{name}" as select * from '
               f"read_parquet('{glob}', union_by_name = true)")
        for attempt in range(attempts):
            try:
                if columns is not None and self._view_matches(name, glob, set(columns)):
                    return False
                with duckdb.connect(self.path) as con:
                    con.execute(sql)
                return True
            except duckdb.IOException as err:  # another process holds the catalog's write lock
                if attempt == attempts - 1:
                    if log:
                        log.warning(f"catalog view {name!r} not refreshed ({err}); "
                                    "run `unicorn catalog` to rebuild it")
                    return False
                time.sleep(0.25)

    def _view_matches(self, name: str, glob: str, columns: set[str]) -> bool:
        import duckdb

        if not Path(self.path).exists():
            return False
        with duckdb.connect(self.path, read_only=True) as con:  # readers may share it
            view = con.execute("select sql from duckdb_views() where view_name = ? and "
                               "schema_name = 'main'", [name]).fetchone()
            if view is None or f"'{glob}'" not in view[0]:
                return False
            found = con.execute("select column_name from duckdb_columns() where table_name = ? "
                                "and schema_name = 'main'", [name]).fetchall()
        return {row[0] for row in found} == columns


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    with fs.open(path, "rb") as handle:
        return handle.read()

