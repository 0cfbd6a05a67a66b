"""Trainer-ready exports: LLaVA conversations as JSONL, each record pointing to its transferred
embedding in safetensors shards, an index record id -> (file, row), and manifest.json.

Layout of one export folder:
    manifest.json                    counts (records, embeddings, duplicates_dropped), models,
                                     versions, sha256 and size of every file
    records.jsonl                    {"id", "caption_id", "caption_sha256", ..., "conversations",
                                      "embedding": {"file", "row"}}
    records.json                     the same records as one JSON array (LLaVA's json.load)
    README.md                        dataset card: `datasets.load_dataset(folder)` loads records.jsonl
    index.parquet                    id, file, row (random access by id)
    embeddings/embeddings-00000.safetensors   tensors "embeddings": float32 (rows, dim) and
                                     "shift_norm": float32 (rows,), ||u - offset|| before l2norm
    modality_statistics.safetensors  mu_text (and mu_image): the shift that was applied
    unicorn/                         with format "unicorn": what the Unicorn reference trainer reads
        records.json                 [{"id": caption_id, "caption", "caption_sha256", "record_id",
                                       "conversations"}, ...]
        embeddings.safetensors       "embeddings" float32 (n, dim), "shift_norm" float32 (n,)
        embedding_ids.json           [caption_id, ...]: row i is ids[i]
        embeddings.pkl               (format "unicorn_pickle" only) [{"id", "embed"}, ...]

Everything streams: embeddings in row batches, records through polars sinks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import struct
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import polars as pl
from fsspec.implementations.local import LocalFileSystem
from safetensors import safe_open
from safetensors.numpy import save_file

from unicorn_assets.logic.modality import ModalityStatistics, iter_vectors
from unicorn_assets.logic.pairing import DIGEST
from unicorn_assets.logic.quality import Outcome

EXPORT_FORMAT = "unicorn-export/1"
TENSOR, SHIFT_NORM = "embeddings", "shift_norm"
RECORDS, INDEX, MANIFEST, STATISTICS = ("records.jsonl", "index.parquet", "manifest.json",
                                        "modality_statistics.safetensors")
RECORDS_ARRAY, CARD = "records.json", "README.md"
# format "unicorn": the layout the Unicorn reference trainer (Yu-xm/Unicorn) reads
UNICORN_DIR = "unicorn"
UNICORN_RECORDS = f"{UNICORN_DIR}/records.json"
UNICORN_EMBEDDINGS = f"{UNICORN_DIR}/embeddings.safetensors"
UNICORN_IDS = f"{UNICORN_DIR}/embedding_ids.json"
UNICORN_PICKLE = f"{UNICORN_DIR}/embeddings.pkl"
FORMATS = ("llava", "unicorn", "unicorn_pickle")
log = logging.getLogger(__name__)
TURN = pl.Struct({"from": pl.String, "value": pl.String})
PAIR = ["caption_id", DIGEST]  # a record and an embedding pair only when both are equal


def pair_key() -> pl.Expr:
    """caption_id and caption_sha256 as one string (null when either is), for streamed filters."""
    return pl.concat_str("caption_id", pl.lit("\x1f"), DIGEST)


def pretrain_records(captions: pl.LazyFrame, prompts: Sequence[str]) -> pl.LazyFrame:
    """One LLaVA pretraining record per caption: a brief-description prompt (picked by the
    caption id, so a re-export picks the same one) and the caption as the answer, with the
    caption's digest (the record's embedding must carry the same)."""
    if not prompts:
        raise ValueError("no brief-description prompts to choose from")
    pick = (pl.col("caption_id").str.slice(0, 8).str.to_integer(base=16, strict=False)
            .fill_null(0) % len(prompts))
    prompt = pick.replace_strict(dict(enumerate(prompts)), return_dtype=pl.String)
    return captions.select(
        pl.col("caption_id").alias("id"), "caption_id", DIGEST,
        pl.concat_list(
            pl.struct(pl.lit("human").alias("from"), (pl.lit("<image>\n") + prompt).alias("value")),
            pl.struct(pl.lit("gpt").alias("from"), pl.col("caption").alias("value")),
        ).alias("conversations"),
    )


def instruct_records(instructions: pl.LazyFrame) -> pl.LazyFrame:
    return instructions.select("id", "caption_id", DIGEST, "task_type", "conversations")


def duplicate_caption_ids(captions: pl.LazyFrame) -> pl.Series:
    """The caption_id of every caption whose exact text comes earlier in (shard, caption_id)
    order: of the same caption in several shards, the first shard in sorted key order keeps it.
    Streams: only the captions whose text hash repeats (few) are ever collected."""
    text_hash = pl.col("caption").hash()
    repeated = (captions.group_by(text_hash.alias("text_hash")).len()
                .filter(pl.col("len") > 1).collect()["text_hash"])
    candidates = (captions.filter(text_hash.is_in(repeated.implode()))
                  .select("caption_id", "shard", "caption").collect())
    return (candidates.sort("shard", "caption_id")
            .filter(~pl.col("caption").is_first_distinct())["caption_id"])


def drop_duplicate_captions(records: pl.LazyFrame, captions: pl.LazyFrame
                            ) -> tuple[pl.LazyFrame, int]:
    """`records` without those of duplicate captions (see duplicate_caption_ids), and how many
    records that leaves out."""
    dropped = duplicate_caption_ids(captions)
    if dropped.is_empty():
        return records, 0
    duplicate = pl.col("caption_id").is_in(dropped.implode())
    return records.filter(~duplicate), records.filter(duplicate).select(pl.len()).collect().item()


def new_file_mode() -> int:
    """The mode open() gives a new file under this process's umask: 0644 under umask 022."""
    try:  # Linux: read it, since setting it to read it races with other threads' new files
        status = Path("/proc/self/status").read_text()
        umask = int(next(line.split()[1] for line in status.splitlines()
                         if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def save_tensors(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file, with the file then given the mode any other export file has
    (save_file creates it 0600, unreadable to the trainer's other users)."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, new_file_mode())


class _ShardWriter:
    """Copies embedding rows into one preallocated buffer and writes it as a safetensors file
    each time it holds `rows_per_file` rows: memory stays at one file's worth."""

    def __init__(self, folder: Path, rows_per_file: int, dim: int, metadata: dict[str, str]):
        self.folder, self.metadata = folder, metadata
        self.buffer = np.empty((rows_per_file, dim), dtype=np.float32)
        self.norms = np.empty(rows_per_file, dtype=np.float32)
        self.filled = 0
        self.ids: list[pl.DataFrame] = []
        self.pointers: list[pl.DataFrame] = []
        self.rows: dict[str, int] = {}

    def add(self, vectors: np.ndarray, keys: pl.DataFrame) -> None:
        """`keys`: the caption_id, caption_sha256 and shift_norm of each row of `vectors`."""
        norms = keys[SHIFT_NORM].to_numpy()
        start = 0
        while start < len(vectors):
            take = min(len(self.buffer) - self.filled, len(vectors) - start)
            self.buffer[self.filled : self.filled + take] = vectors[start : start + take]
            self.norms[self.filled : self.filled + take] = norms[start : start + take]
            self.ids.append(keys.slice(start, take))
            self.filled += take
            start += take
            if self.filled == len(self.buffer):
                self.flush()

    def flush(self) -> None:
        if not self.filled:
            return
        name = f"embeddings/embeddings-{len(self.rows):05d}.safetensors"
        (self.folder / "embeddings").mkdir(parents=True, exist_ok=True)
        save_tensors({TENSOR: self.buffer[: self.filled], SHIFT_NORM: self.norms[: self.filled]},
                      self.folder / name, self.metadata)
        self.rows[name] = self.filled
        self.pointers.append(pl.concat(self.ids).select(PAIR).with_columns(
            pl.Series("file", [name] * self.filled, dtype=pl.String),
            pl.Series("row", np.arange(self.filled), dtype=pl.Int64)))
        self.filled, self.ids = 0, []


@dataclass(frozen=True)
class WrittenExport:
    records: int
    embeddings: int
    embedding_files: dict[str, int]  # file -> rows
    formats: tuple[str, ...] = ("llava",)


def write_export(folder: Path, records: pl.LazyFrame, embeddings: pl.LazyFrame,
                 stats: ModalityStatistics, rows_per_file: int,
                 formats: Sequence[str] = ("llava",), captions: pl.LazyFrame | None = None,
                 dataset: str = "unicorn") -> WrittenExport:
    """Write the embeddings the records use, then the records and the index, into `folder`.
    A record uses the embedding of equal caption_id AND caption_sha256: an embedding of another
    text never pairs (the record is left without one, which records_resolve refuses).
    Refuses embeddings shifted with any statistics but `stats` (the export's single version).
    `formats`: "llava" is always written; "unicorn" (and "unicorn_pickle") add the reference
    trainer's layout under unicorn/, which needs `captions` (caption_id, caption_sha256, caption)."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; use some of {list(FORMATS)}")
    unicorn = bool({"unicorn", "unicorn_pickle"} & set(formats))
    if unicorn and captions is None:
        raise ValueError("the unicorn export format needs the captions (their text)")
    # a filter on the (small) set of used keys streams; a semi join would buffer the embeddings
    keys = records.select(pair_key().unique().alias("key")).collect()["key"].drop_nulls()
    used = embeddings.filter(pair_key().is_in(keys.implode()))
    writer = _ShardWriter(folder, rows_per_file, stats.dim, {
        "statistics_version": stats.version, "model_id": stats.model_id, "dim": str(stats.dim)})
    versions: set[str] = set()
    for vectors, rest in iter_vectors(used, *PAIR, SHIFT_NORM, "statistics_version"):
        versions.update(rest["statistics_version"].unique().to_list())
        writer.add(vectors, rest)
    writer.flush()
    if versions - {stats.version}:
        raise ValueError(f"transferred_embeddings holds rows shifted with statistics "
                         f"{sorted(versions - {stats.version})}, not the current {stats.version}: "
                         "re-materialise transferred_embeddings before exporting")
    pointers = (pl.concat(writer.pointers) if writer.pointers else
                pl.DataFrame(schema={"caption_id": pl.String, DIGEST: pl.String, "file": pl.String,
                                     "row": pl.Int64}))
    joined = records.join(pointers.lazy(), on=PAIR, how="left", maintain_order="left")
    pl.collect_all([
        joined.with_columns(pl.struct("file", "row").alias("embedding")).drop("file", "row")
        .sink_ndjson(folder / RECORDS, lazy=True),
        joined.select("id", "file", "row").sink_parquet(folder / INDEX, lazy=True),
    ])
    jsonl_to_array(folder / RECORDS, folder / RECORDS_ARRAY)
    (folder / CARD).write_text(dataset_card(dataset, stats), encoding="utf-8")
    if unicorn:
        write_unicorn(folder, records, captions, pointers, writer.rows, stats.dim,
                      pickle_too="unicorn_pickle" in formats)
    stat_tensors = {"mu_text": stats.mu_text}
    if stats.mu_image is not None:
        stat_tensors["mu_image"] = stats.mu_image
    save_tensors(stat_tensors, folder / STATISTICS, {"statistics_version": stats.version})
    n_records = pl.scan_parquet(folder / INDEX).select(pl.len()).collect().item()
    return WrittenExport(n_records, pointers.height, writer.rows,
                         tuple(f for f in FORMATS if f == "llava" or f in formats
                               or (f == "unicorn" and unicorn)))


def jsonl_to_array(source: Path, target: Path) -> None:
    """Copy a JSON-lines file into one JSON array, line by line (memory: one line)."""
    with open(source, encoding="utf-8") as lines, open(target, "w", encoding="utf-8") as out:
        out.write("[")
        first = True
        for line in lines:
            if line.strip():
                out.write(("\n" if first else ",\n") + line.rstrip("\n"))
                first = False
        out.write("\n]\n")


def dataset_card(dataset: str, stats: ModalityStatistics) -> str:
    """A Hugging Face dataset card whose `configs` point `load_dataset(folder)` at the records
    (without it the library picks index.parquet, the only Parquet file)."""
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: {RECORDS}
---
# {dataset}

LLaVA-format conversations made from text alone by Unicorn. Each record's `embedding` points to
its row in `embeddings/*.safetensors` (tensor `{TENSOR}`, float32, {stats.dim}-d, from
{stats.model_id}; `{SHIFT_NORM}` beside it), which stands in for the image features.
Transfer: {stats.formula}. At inference, for a real image embedding e:
{INFERENCE_LINE.get(stats.method, "")}
`manifest.json` lists every file with its sha256. `records.json` is the same records as one JSON
array (for trainers that `json.load` the data file).
"""


INFERENCE_LINE = {
    "mean_shift": "e' = l2norm(e - mu_image), mu_image the mean over your images (the paper).",
    "mean_shift_to_image_mean": "use e as it is (the vectors were moved to the image mean).",
    "realign": "use e as it is (ReAlign moved the vectors into the image distribution).",
    "none": "use e as it is (no transfer was applied; the modality gap remains).",
}


def write_unicorn(folder: Path, records: pl.LazyFrame, captions: pl.LazyFrame,
                  pointers: pl.DataFrame, files: dict[str, int], dim: int,
                  pickle_too: bool) -> None:
    """The Unicorn reference trainer's layout: records keyed by caption id with a `caption` key,
    and one embedding per caption id, in the order of `pointers` (the export's shard files)."""
    (folder / UNICORN_DIR).mkdir(exist_ok=True)
    texts = captions.select("caption_id", DIGEST, "caption")
    tmp = folder / UNICORN_DIR / ".records.jsonl"
    (records.join(texts, on=PAIR, how="inner", maintain_order="left")
     .select(pl.col("caption_id").alias("id"), "caption", DIGEST, pl.col("id").alias("record_id"),
             "conversations")
     .sink_ndjson(tmp))
    jsonl_to_array(tmp, folder / UNICORN_RECORDS)
    tmp.unlink()
    ids = pointers["caption_id"]
    with open(folder / UNICORN_IDS, "w", encoding="utf-8") as out:
        out.write("[")
        out.writelines(("" if row == 0 else ",\n") + json.dumps(caption_id)
                       for row, caption_id in enumerate(ids))
        out.write("]\n")
    write_safetensors_streamed(folder / UNICORN_EMBEDDINGS, len(ids), dim,
                               lambda: _rows(folder, files, TENSOR),
                               lambda: _rows(folder, files, SHIFT_NORM))
    if pickle_too:
        log.warning("writing %s: pickle runs code when loaded; load it only from a source you "
                    "trust (the safetensors beside it holds the same vectors)", UNICORN_PICKLE)
        write_embedding_pickle(folder / UNICORN_PICKLE, ids, _rows(folder, files, TENSOR))


def _rows(folder: Path, files: dict[str, int], tensor: str) -> Iterator[np.ndarray]:
    """The rows of `tensor` over the export's shard files in order, one file at a time."""
    for name in files:
        with safe_open(str(folder / name), "np") as handle:
            yield handle.get_tensor(tensor)


def write_safetensors_streamed(path: Path, rows: int, dim: int, embeddings, norms) -> None:
    """A safetensors file of "embeddings" float32 (rows, dim) and "shift_norm" float32 (rows,),
    written chunk by chunk (the format: u64 header length, JSON header, raw little-endian data)."""
    size = rows * dim * 4
    header = {TENSOR: {"dtype": "F32", "shape": [rows, dim], "data_offsets": [0, size]},
              SHIFT_NORM: {"dtype": "F32", "shape": [rows], "data_offsets": [size, size + rows * 4]}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for part in (embeddings(), norms()):
            out.writelines(np.ascontiguousarray(chunk, dtype="<f4").tobytes() for chunk in part)
    os.chmod(path, new_file_mode())


def write_embedding_pickle(path: Path, ids: Sequence[str], vectors: Iterator[np.ndarray]) -> None:
    """The reference trainer's pickle: a list of {"id", "embed": float32 ndarray (dim,)}, written
    item by item (a protocol-2 list opened once, items appended in batches), not built in memory."""
    with open(path, "wb") as out:
        out.write(b"\x80\x02" + pickle.EMPTY_LIST)
        row = 0
        for chunk in vectors:
            out.write(pickle.MARK)
            for vector in chunk:
                item = pickle.dumps({"id": ids[row], "embed": np.array(vector, dtype=np.float32)},
                                    protocol=2)
                out.write(item[2:-1])  # without its PROTO header and STOP
                row += 1
            out.write(pickle.APPENDS)
        out.write(pickle.STOP)
    os.chmod(path, new_file_mode())


def sha256_file(fs: fsspec.AbstractFileSystem, path: str) -> str:
    with fs.open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_table(folder: Path, rows: dict[str, int]) -> dict[str, dict[str, Any]]:
    """{relative path: sha256, bytes (and rows for embedding files)} of every file but the manifest."""
    fs = LocalFileSystem()
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        name = path.relative_to(folder).as_posix()
        out[name] = {"sha256": sha256_file(fs, str(path)), "bytes": path.stat().st_size,
                     **({"rows": rows[name]} if name in rows else {})}
    return out


def manifest(dataset: str, written: WrittenExport, stats: ModalityStatistics,
             files: dict[str, dict[str, Any]], duplicates_dropped: int = 0,
             **extra: Any) -> dict[str, Any]:
    out = {
        "format": EXPORT_FORMAT, "dataset": dataset,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "counts": {"records": written.records, "embeddings": written.embeddings,
                   "duplicates_dropped": duplicates_dropped},
        "records_file": RECORDS, "records_array_file": RECORDS_ARRAY, "index_file": INDEX,
        "statistics_file": STATISTICS, "formats": list(written.formats),
        "embedding": {"dim": stats.dim, "dtype": "float32", "tensor": TENSOR,
                      "shift_norm_tensor": SHIFT_NORM,
                      "unnormalised": f"v * {SHIFT_NORM} = u - offset, the public code's "
                                      "un-normalised vector",
                      "model_id": stats.model_id, "pretrained": stats.pretrained},
        "statistics_version": stats.version,
        "transfer": stats.parameters(),
        "inference_transform": stats.inference_transform(),
        **extra,
        "files": files,
    }
    if "unicorn" in written.formats:
        out["unicorn"] = {"records_file": UNICORN_RECORDS, "embeddings_file": UNICORN_EMBEDDINGS,
                          "ids_file": UNICORN_IDS, "record_key": "id = caption_id",
                          **({"pickle_file": UNICORN_PICKLE}
                             if "unicorn_pickle" in written.formats else {})}
    if not stats.pretrained:
        out["note"] = ("embeddings come from an untrained CLIP model (random weights): they mean "
                       "nothing; for pipeline tests only")
    return out


def git_revision() -> str:
    """The project's git commit (+dirty when tracked files changed); UNICORN_GIT_REVISION wins
    (set it where the code runs from a package, not a checkout)."""
    if os.environ.get("UNICORN_GIT_REVISION"):
        return os.environ["UNICORN_GIT_REVISION"]
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


# --- publishing: the previous export is replaced whole ---------------------------------------

def staging_folder(fs: fsspec.AbstractFileSystem, target: str) -> Path:
    """A fresh folder to build the export in: beside the target when local (so the final rename
    stays on one filesystem), else a local temporary folder that is uploaded."""
    if isinstance(fs, LocalFileSystem):
        parent = Path(target).parent
        parent.mkdir(parents=True, exist_ok=True)
        folder = parent / f".{Path(target).name}.staging-{uuid.uuid4().hex[:12]}"
        folder.mkdir()
        return folder
    return Path(tempfile.mkdtemp(prefix="unicorn-export-"))


def publish(staging: Path, fs: fsspec.AbstractFileSystem, target: str) -> None:
    """Replace `target` with `staging`. Locally by two renames, so a reader sees the old export or
    the new one, never a mix. On an object store, where nothing renames, the data files are
    uploaded first and manifest.json last (the manifest is the commit point: read it first and
    verify checksums), then files of the previous export that the new one lacks are deleted."""
    if isinstance(fs, LocalFileSystem):
        target_path = Path(target)
        old = target_path.with_name(f".{target_path.name}.old-{uuid.uuid4().hex[:12]}")
        if target_path.exists():
            os.rename(target_path, old)
        os.rename(staging, target_path)
        shutil.rmtree(old, ignore_errors=True)
        return
    root = target.rstrip("/")
    names = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    for name in [n for n in names if n != MANIFEST] + [MANIFEST]:
        fs.put_file(str(staging / name), f"{root}/{name}")
    keep = {f"{root}/{name}" for name in names}
    for path in fs.find(root):
        if path not in keep:
            fs.rm(path)
    shutil.rmtree(staging, ignore_errors=True)


# --- verification (the export's checks; also run on the staging folder before publishing) ----

@dataclass(frozen=True)
class ExportFolder:
    fs: fsspec.AbstractFileSystem
    path: str
    polars_options: dict[str, str] | None = None

    @property
    def location(self) -> str:
        """The folder as a local path or a URI (s3://...)."""
        return self.uri("").rstrip("/")

    def file(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    def uri(self, name: str) -> str:
        path = self.file(name)
        return path if isinstance(self.fs, LocalFileSystem) else self.fs.unstrip_protocol(path)

    def read_manifest(self) -> dict[str, Any] | None:
        if not self.fs.exists(self.file(MANIFEST)):
            return None
        with self.fs.open(self.file(MANIFEST), "rb") as handle:
            return json.load(handle)


def checksums_match(folder: ExportFolder) -> Outcome:
    """Every file the manifest lists exists with its size and sha256, and no other file is there."""
    meta = folder.read_manifest()
    if meta is None:
        return Outcome(False, f"{folder.path}: no {MANIFEST}")
    listed = meta["files"]
    present = {p.removeprefix(folder.path.rstrip("/") + "/") for p in folder.fs.find(folder.path)}
    missing = sorted(set(listed) - present)
    unlisted = sorted(present - set(listed) - {MANIFEST})
    mismatched = sorted(name for name in set(listed) & present
                        if sha256_file(folder.fs, folder.file(name)) != listed[name]["sha256"])
    ok = not (missing or unlisted or mismatched)
    return Outcome(ok, f"{len(listed)} files listed: {len(missing)} missing, {len(mismatched)} "
                   f"differ from their checksum, {len(unlisted)} not in the manifest",
                   {"files": len(listed), "missing": missing[:10], "mismatched": mismatched[:10],
                    "unlisted": unlisted[:10]})


def records_resolve(folder: ExportFolder) -> Outcome:
    """Every record id is in the index exactly once and points to an existing embedding row."""
    meta = folder.read_manifest()
    if meta is None:
        return Outcome(False, f"{folder.path}: no {MANIFEST}")
    rows = pl.DataFrame({"file": list(meta["files"]),
                         "n_rows": [f.get("rows", 0) for f in meta["files"].values()]},
                        schema={"file": pl.String, "n_rows": pl.Int64})
    ids = pl.scan_ndjson(folder.uri(meta["records_file"]), storage_options=folder.polars_options,
                         infer_schema_length=None).select("id")
    index = pl.scan_parquet(folder.uri(meta["index_file"]), storage_options=folder.polars_options)
    per_id = index.group_by("id").agg(pl.len().alias("entries"), pl.col("file").first(),
                                      pl.col("row").first())
    report = (ids.join(per_id, on="id", how="left").join(rows.lazy(), on="file", how="left")
              .select(pl.len().alias("records"),
                      (pl.col("entries").fill_null(0) != 1).sum().alias("not_once"),
                      (pl.col("row").is_null() | pl.col("n_rows").is_null()
                       | (pl.col("row") < 0) | (pl.col("row") >= pl.col("n_rows"))).sum()
                      .alias("dangling"))
              .collect().row(0, named=True))
    orphans = index.join(ids, on="id", how="anti").select(pl.len()).collect().item()
    count_ok = report["records"] == meta["counts"]["records"]
    ok = report["not_once"] == 0 and report["dangling"] == 0 and orphans == 0 and count_ok
    return Outcome(ok, f"{report['records']} records: {report['not_once']} not indexed exactly "
                   f"once, {report['dangling']} point to no embedding, {orphans} index entries "
                   f"without a record" + ("" if count_ok else "; the manifest's record count is "
                                          "wrong"),
                   {**report, "orphan_index_entries": orphans,
                    "manifest_records": meta["counts"]["records"]})
