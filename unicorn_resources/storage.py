"""Storage over a base URI (a local folder or s3://): atomic writes, a Parquet IO manager, a DuckDB catalog."""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import dagster as dg
import fsspec
import polars as pl
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractBufferedFile
from pydantic import Field

from unicorn_resources.keys import UnsafeKeyError, key_path, key_problem


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


class UnsafeKeyFailure(dg.Failure, UnsafeKeyError):
    """An unsafe partition key as a step sees it: the step fails at once, with no retry (a retry
    cannot make a key safe)."""


def partition_path(folder: str, key: str, suffix: str = "") -> str:
    """`<folder>/<key><suffix>` through the key gate (unicorn_resources.keys.key_path), for
    Dagster code: an unsafe key fails the step before anything is read or written."""
    try:
        return key_path(folder, key, suffix)
    except UnsafeKeyError as err:
        raise UnsafeKeyFailure(description=str(err), allow_retries=False) from None


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


# A temporary file of atomic_write is `.<name>.unicorn-tmp-<host>-<pid>-<hex>`: hidden, never
# `*.parquet` (so no reader or catalog glob sees it), and naming the process that owns it, so a
# later write into the folder can remove the ones whose writer died (kill -9, lost node).
TEMP_MARK = ".unicorn-tmp-"
_TEMP = re.compile(r"\..+\.unicorn-tmp-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[0-9a-f]{32}")
_LEGACY_TEMP = re.compile(r"\..+\.tmp-[0-9a-f]{32}")  # `.<name>.tmp-<hex>`, before the mark
# A temporary of another host (or an old unmarked one) is removed once untouched this long: its
# writer cannot be asked, and no write goes a day without writing a byte.
STALE_TEMP_SECONDS = 24 * 3600
# A process that started this long after a temporary was last written cannot have written it
# (its pid is a reused one); the margin absorbs clock skew between a host and a file server.
_PID_REUSE_MARGIN = 60.0
# A process sweeps a folder at most this often: a listing of a folder of 10,000 images costs
# milliseconds, and each of its writes would otherwise pay it.
SWEEP_INTERVAL_SECONDS = 60.0
_last_sweep: dict[str, float] = {}


def host_tag() -> str:
    """This host, as temporary-file names carry it (a digest: host names can be long)."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def temp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}{TEMP_MARK}{host_tag()}-{os.getpid()}-"
                            f"{uuid.uuid4().hex}")


def _process_state(pid: int) -> tuple[str, float] | None:
    """(state letter, start time as a Unix time) of `pid` from /proc, or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        fields = stat[stat.rindex(")") + 2:].split()
        return fields[0], boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def writer_alive(pid: int, written_at: float) -> bool:
    """Whether process `pid` of this host may still be writing a temporary last written at
    `written_at`: it exists, is not a zombie, and did not start after that (a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    state = _process_state(pid)
    if state is None:
        return True
    letter, started = state
    return letter != "Z" and started <= written_at + _PID_REUSE_MARGIN


def sweep_stale_temps(folder: Path, now: float | None = None) -> list[Path]:
    """Remove the temporaries in `folder` that no live writer owns; returns them. Those of this
    host go once their process is gone; those of another host (or unmarked ones of older
    versions) once untouched for STALE_TEMP_SECONDS."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    for entry in entries:
        owner = _TEMP.fullmatch(entry.name)
        if owner is None and not _LEGACY_TEMP.fullmatch(entry.name):
            continue
        try:
            written_at = entry.stat(follow_symlinks=False).st_mtime
            if owner and owner["host"] == host_tag():
                stale = not writer_alive(int(owner["pid"]), written_at)
            else:
                stale = now - written_at > STALE_TEMP_SECONDS
            if stale and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except FileNotFoundError:
            continue  # its writer renamed it into place meanwhile
    return removed


def _sweep_now_and_then(folder: Path) -> None:
    now = time.monotonic()
    last = _last_sweep.get(str(folder))
    if last is None or now - last >= SWEEP_INTERVAL_SECONDS:
        _last_sweep[str(folder)] = now
        sweep_stale_temps(folder)


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, write: Callable[[Any], None]) -> None:
    """Write `path` so that readers see the old file or the whole new one, never a part.

    Locally: write a hidden temporary file beside it (see TEMP_MARK), then rename over it; the
    file gets the mode open() gives (0644 under umask 022). Temporaries left in the folder by
    dead writers are removed first (see sweep_stale_temps). On an object store an object appears
    only when its upload completes; a write that raises is discarded (its multipart upload
    aborted), never completed: closing the file would publish what was written so far.
    """
    if is_local(fs):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        _sweep_now_and_then(target.parent)
        tmp = temp_path(target)
        try:
            with open(tmp, "xb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        handle = fs.open(path, "wb")
        try:
            write(handle)
        except BaseException:
            if isinstance(handle, AbstractBufferedFile):
                handle.discard()
                handle.closed = True  # close() would upload the buffer
            else:
                handle.close()
            raise
        handle.close()


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


def scan_shards(name: str, uris: list[str], options: dict | None) -> pl.LazyFrame:
    """One lazy scan over shard files written by different versions of an asset: the union of
    their columns (read from each file's footer), null where a file has none, as the eager path's
    diagonal concat gives. A column whose type differs between files is refused, naming both."""
    union: dict[str, tuple[pl.DataType, str]] = {}
    for uri in uris:
        for column, dtype in pl.scan_parquet(uri, storage_options=options).collect_schema().items():
            seen = union.setdefault(column, (dtype, uri))
            if seen[0] != dtype:
                raise ValueError(
                    f"{name}: column {column!r} is {seen[0]} in {seen[1]} but {dtype} in {uri}: "
                    f"the shards were written by different versions; re-materialise {name} for "
                    "the older shards")
    return pl.scan_parquet(uris, storage_options=options, missing_columns="insert",
                           schema=pl.Schema({c: dtype for c, (dtype, _) in union.items()}))


class ParquetIOManager(dg.ConfigurableIOManager):
    """Stores each asset (partition) as one Parquet file under `base_uri`:
    `<base>/<asset>/<partition>.parquet` for per-shard assets, `<base>/<asset>.parquet` otherwise.

    A write replaces the file atomically, so re-running a partition never duplicates it. An input
    annotated `pl.LazyFrame` is scanned lazily (corpus-wide assets stream over every shard).
    """

    base_uri: str = "data"
    s3: S3Options = S3Options()
    catalog_path: str | None = None  # DuckDB catalog of views; default <base>/catalog.duckdb (local)
    # How long a write waits for a catalog that another process holds open before it leaves the
    # view pending (created by the next write, or `unicorn catalog`) and warns.
    catalog_wait_seconds: float = Field(default=15.0, ge=0.0, le=600.0)

    def uri(self, asset: str, partition: str | None = None) -> str:
        """The file of `asset` (of one partition); a partition key goes through the key gate."""
        if partition is None:
            return join(self.base_uri, f"{asset}.parquet")
        return partition_path(join(self.base_uri, asset), partition, ".parquet")

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
        targets = {partition: self.uri(name, partition) for partition in frames}  # keys first
        for partition, frame in frames.items():
            if not isinstance(frame, (pl.DataFrame, pl.LazyFrame)):
                raise TypeError(f"{name}: ParquetIOManager stores polars DataFrames, got "
                                f"{type(frame).__name__}")
            uri = targets[partition]
            fs, path = self.s3.fs(uri)
            write_parquet(fs, path, frame)
            uris.append(uri)
        context.add_output_metadata({"path": dg.MetadataValue.path(uris[0]) if len(uris) == 1
                                     else dg.MetadataValue.json(uris)})
        if is_local(fs):
            columns = {c for frame in frames.values() for c in frame.collect_schema().names()}
            self.catalog().refresh_view(name, self._glob(name, context.has_asset_partitions),
                                        columns, log=context.log)

    def store_shards(self, asset: str, frames: dict[str, pl.DataFrame], log: Any = None
                     ) -> dict[str, str]:
        """Write some partitions of a per-shard asset outside an Output, as handle_output does;
        returns {partition: URI}. A multi-shard step whose other shards failed stores its healthy
        shards this way: Dagster records the partitions of an Output all or none."""
        uris = {}
        for partition, frame in frames.items():
            uris[partition] = self.uri(asset, partition)
            fs, path = self.s3.fs(uris[partition])
            write_parquet(fs, path, frame)
        if uris and is_local(fs):
            columns = {c for frame in frames.values() for c in frame.collect_schema().names()}
            self.catalog().refresh_view(asset, self._glob(asset, True), columns, log=log)
        return uris

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
            return scan_shards(name, uris, options) if uris else pl.LazyFrame()
        frames = [pl.read_parquet(u, storage_options=options) for u in uris]
        return pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]

    def _glob(self, name: str, partitioned: bool) -> str:
        base = str(Path(self.base_uri).resolve())
        return f"{base}/{name}/*.parquet" if partitioned else f"{base}/{name}.parquet"

    def catalog(self) -> Catalog:
        return Catalog(self.catalog_path or join(self.base_uri, "catalog.duckdb"),
                       self.catalog_wait_seconds)

    def rebuild_catalog(self) -> list[str]:
        """(Re)create the catalog view of every asset stored under a local base_uri. A file or
        folder whose name breaks the key rule (a hidden temporary, a stray name) is no asset of
        ours and gets no view, so no name from the folder reaches the catalog's SQL unchecked."""
        base = Path(self.base_uri)
        if "://" in self.base_uri or not base.is_dir():
            raise ValueError(f"no local data under {self.base_uri}; the DuckDB catalog covers "
                             "local storage only")
        views = {p.stem: False for p in base.glob("*.parquet")}
        views.update({d.name: True for d in base.iterdir()
                      if d.is_dir() and any(d.glob("*.parquet"))})
        views = {name: partitioned for name, partitioned in views.items()
                 if key_problem(name) is None}
        self.catalog().refresh_views({name: self._glob(name, partitioned)
                                      for name, partitioned in views.items()})
        return sorted(views)


class CatalogLocked(RuntimeError):
    """The catalog stayed locked by another process for the whole wait."""


# Catalog path -> when a refresh last gave up on it. Within GIVE_UP_MEMORY seconds of that, a
# refresh tries once and does not wait again: a catalog left open in a DuckDB shell would
# otherwise cost every write of a run the whole wait.
_GAVE_UP: dict[str, float] = {}
GIVE_UP_MEMORY = 60.0


class Catalog:
    """A DuckDB file of views over the Parquet files, so the data can be queried without Dagster:
    `unicorn sql "select count(*) from expanded_captions"`.

    The views name their files relative to the catalog's folder, so the catalog keeps working
    when the data folder moves. DuckDB resolves a relative path against the current directory
    unless `file_search_path` names the folder: `connect()` sets it (so does `unicorn sql`); a
    DuckDB shell started in the catalog's folder needs nothing.

    Another process holding the file (a DuckDB shell, a notebook: DuckDB locks the file while it is
    open) makes a refresh wait, with backoff, up to `wait_seconds`. If it is still locked then, the
    view is written down as pending (`<catalog>.pending/`) and the next refresh that gets the lock
    creates it, with every other pending view, in the same transaction."""

    def __init__(self, path: str, wait_seconds: float = 15.0):
        self.path = path
        self.wait_seconds = wait_seconds

    @property
    def folder(self) -> str:
        return str(Path(self.path).resolve().parent)

    def connect(self, read_only: bool = True):
        """A DuckDB connection to the catalog whose views find their files from anywhere."""
        import duckdb

        con = duckdb.connect(self.path, read_only=read_only)
        con.execute(f"set file_search_path = {_literal(self.folder)}")
        return con

    def _relative(self, glob: str) -> str:
        """`glob` (absolute) as the view names it: relative to the catalog's folder."""
        return os.path.relpath(glob, self.folder)

    @property
    def pending_dir(self) -> Path:
        return Path(f"{self.path}.pending")

    def refresh_view(self, name: str, glob: str, columns: Collection[str] | None = None,
                     log: Any = None) -> bool:
        """(Re)create the view `name` over the files of `glob`; returns whether it did. Given the
        `columns` of the frame just written, only when the view is missing, reads another glob or
        has other columns: DuckDB finds the glob's files at query time, so a new file alone needs
        nothing. The check reads the catalog only, never the Parquet files. Views left pending by
        an earlier refresh are created with it. When the catalog stays locked, the view is left
        pending and `log` (a run's log) gets a warning that names the fix."""
        try:
            return self._with_lock(lambda: self._refresh({name: glob}, columns))
        except CatalogLocked as err:
            self._add_pending(name, glob)
            if log:
                log.warning(f"catalog view {name!r} not refreshed: {err}. It is pending: the next "
                            "write after the lock is released creates it, or run `unicorn catalog`")
            return False

    def refresh_views(self, views: dict[str, str]) -> None:
        """(Re)create every view of {name: glob}, and the pending ones, in one transaction.
        Raises CatalogLocked (the views are then left pending) when the catalog stays locked."""
        try:
            self._with_lock(lambda: self._refresh(views, None))
        except CatalogLocked:
            for name, glob in views.items():
                self._add_pending(name, glob)
            raise

    def _with_lock(self, attempt: Callable[[], bool]) -> bool:
        import duckdb

        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        gave_up = _GAVE_UP.get(self.path)
        recently = gave_up is not None and time.monotonic() - gave_up < GIVE_UP_MEMORY
        deadline = time.monotonic() + (0.0 if recently else self.wait_seconds)
        delay = 0.05
        while True:
            try:
                done = attempt()
                _GAVE_UP.pop(self.path, None)
                return done
            except duckdb.IOException as err:
                if "lock" not in str(err).lower():
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    _GAVE_UP[self.path] = time.monotonic()
                    raise CatalogLocked(f"{self.path} is locked by another process "
                                        f"({str(err).splitlines()[0]})") from err
                time.sleep(min(delay, left))
                delay = min(delay * 2, 2.0)

    def _refresh(self, views: dict[str, str], columns: Collection[str] | None) -> bool:

        pending = {}
        for name, glob in self._pending().items():
            if globlib.glob(glob):
                pending[name] = glob
            else:  # its files are gone since: nothing to show, and DuckDB would refuse the view
                self._drop_pending(name, glob)
        if columns is not None and not pending:
            ((name, glob),) = views.items()
            if self._view_matches(name, glob, set(columns)):
                return False
        todo = {**pending, **views}
        with self.connect(read_only=False) as con:
            # One transaction: a failure part-way leaves every view as it was, none dropped.
            con.execute("begin transaction")
            try:
                for name, glob in todo.items():
                    con.execute(f"create or replace view {_ident(name)} as select * from "
                                f"read_parquet({_literal(self._relative(glob))}, "
                                "union_by_name = true)")
                con.execute("commit")
            except BaseException:
                con.execute("rollback")
                raise
        for name, glob in pending.items():
            self._drop_pending(name, glob)
        return True

    def _pending_file(self, name: str) -> Path:
        return self.pending_dir / f"{name.encode().hex()}.json"

    def _pending(self) -> dict[str, str]:
        out = {}
        if self.pending_dir.is_dir():
            for path in sorted(self.pending_dir.glob("*.json")):
                try:
                    entry = json.loads(path.read_text())
                    out[entry["name"]] = entry["glob"]
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # half-written by a crash: the next give-up rewrites it
        return out

    def _add_pending(self, name: str, glob: str) -> None:
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        target = self._pending_file(name)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
        tmp.write_text(json.dumps({"name": name, "glob": glob}))
        os.replace(tmp, target)

    def _drop_pending(self, name: str, glob: str) -> None:
        path = self._pending_file(name)
        try:
            if json.loads(path.read_text()).get("glob") == glob:  # not re-pended since
                path.unlink()
        except (OSError, ValueError):
            pass

    def _view_matches(self, name: str, glob: str, columns: set[str]) -> bool:

        if not Path(self.path).exists():
            return False
        with self.connect() as con:  # readers may share it
            view = con.execute("select sql from duckdb_views() where view_name = ? and "
                               "schema_name = 'main'", [name]).fetchone()
            if view is None or _literal(self._relative(glob)) not in view[0]:
                return False
            found = con.execute("select column_name from duckdb_columns() where table_name = ? "
                                "and schema_name = 'main'", [name]).fetchall()
        return {row[0] for row in found} == columns


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    with fs.open(path, "rb") as handle:
        return handle.read()

