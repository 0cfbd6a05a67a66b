"""Seed shards: tolerant parsing of JSONL / CSV / Parquet. The partition key of a seed file and
the discovery of shards are in unicorn_resources/keys.py.

Every line that cannot become a seed becomes a reject row (file, line, reason, fix), so that
nothing vanishes silently. Whether a bad line fails the whole shard is the caller's tolerance.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from typing import Literal

import polars as pl

from unicorn_assets.logic.text import excerpt, normalise_ws, stable_id, stable_int
from unicorn_resources.keys import SEED_EXTENSIONS, SeedError

SEED_SCHEMA = pl.Schema(
    {
        "seed_id": pl.String,
        "shard": pl.String,
        "caption": pl.String,
        "seed_kind": pl.String,
        "label": pl.String,
        "source_file": pl.String,
        "source_line": pl.Int64,
        "meta": pl.String,
    }
)
REJECT_SCHEMA = pl.Schema(
    {
        "shard": pl.String,
        "source_file": pl.String,
        "source_line": pl.Int64,
        "reason": pl.String,
        "detail": pl.String,
        "raw": pl.String,
    }
)
# Reasons that mean the input line was malformed (the tolerance applies to these), as opposed
# to well-formed lines dropped on purpose (empty or duplicate captions).
BAD_LINE_REASONS = frozenset(
    {"bad_json", "bad_encoding", "line_too_long", "missing_caption", "bad_caption_type",
     "empty_file", "unreadable_file"}
)


@dataclass(frozen=True)
class SeedReadOptions:
    caption_column: str = "caption"
    label_column: str = "label"
    id_column: str = "id"
    max_line_bytes: int = 64 * 1024
    on_bad_line: Literal["skip", "fail"] = "skip"
    label_templates: tuple[str, ...] = ()
    templates_per_label: int = 10


@dataclass
class SeedReadResult:
    seeds: pl.DataFrame
    rejects: pl.DataFrame
    lines_read: int
    counts: dict[str, int] = field(default_factory=dict)


class _Collector:
    def __init__(self, shard: str, source: str, opts: SeedReadOptions):
        self.shard, self.source, self.opts = shard, source, opts
        self.rows: list[dict] = []
        self.rejects: list[dict] = []
        self.lines = 0

    def reject(self, line: int, reason: str, detail: str, raw: str = "") -> None:
        self.rejects.append(
            {"shard": self.shard, "source_file": self.source, "source_line": line,
             "reason": reason, "detail": f"{self.source}:{line}: {detail}", "raw": excerpt(raw)}
        )

    def record(self, line: int, rec: dict, raw: str) -> None:
        opts = self.opts
        text, kind = rec.get(opts.caption_column), "caption"
        if text is None and rec.get(opts.label_column) is not None:
            text, kind = rec.get(opts.label_column), "label"
        if text is None:
            found = ", ".join(sorted(map(str, rec))) or "none"
            self.reject(
                line, "missing_caption",
                f"no {opts.caption_column!r} (or {opts.label_column!r}) field; found: {found}. "
                f"Add a {opts.caption_column!r} field, or set caption_column to the field that "
                "holds the caption.",
                raw,
            )
            return
        if not isinstance(text, str):
            self.reject(line, "bad_caption_type",
                        f"{opts.caption_column!r} must be a string, got {type(text).__name__}", raw)
            return
        rid, label = rec.get(opts.id_column), rec.get(opts.label_column)
        meta = {k: v for k, v in rec.items()
                if k not in (opts.caption_column, opts.label_column, opts.id_column)}
        self.rows.append(
            {"raw_id": None if rid is None or rid == "" else str(rid), "text": text, "kind": kind,
             "label": None if label is None else normalise_ws(str(label)),
             "source_line": line, "meta": json.dumps(meta, sort_keys=True, default=str)}
        )


def read_seed_bytes(data: bytes, source: str, shard: str, opts: SeedReadOptions) -> SeedReadResult:
    """Parse one seed file's bytes into seeds and rejects (see module doc)."""
    col = _Collector(shard, source, opts)
    lower = source.lower()
    if not data.strip():
        col.reject(0, "empty_file", "the file is empty; add seed records or remove the file")
    elif lower.endswith(".jsonl"):
        _parse_jsonl(data, col)
    elif lower.endswith(".csv"):
        _parse_csv(data, col)
    elif lower.endswith(".parquet"):
        _parse_parquet(data, col)
    else:
        raise SeedError(f"{source}: not a seed file; seed files end in {', '.join(SEED_EXTENSIONS)}")

    seeds, dropped = _finish(col, opts)
    rejects = pl.DataFrame(col.rejects + dropped, schema=REJECT_SCHEMA)
    bad = rejects.filter(pl.col("reason").is_in(list(BAD_LINE_REASONS)))
    if opts.on_bad_line == "fail" and bad.height:
        listing = "\n  ".join(bad["detail"].head(5).to_list())
        more = f"\n  … and {bad.height - 5} more" if bad.height > 5 else ""
        raise SeedError(
            f"{source}: {bad.height} malformed line(s) and on_bad_line='fail':\n  {listing}{more}\n"
            "Fix those lines, or set on_bad_line='skip' to skip them into the rejects output."
        )
    counts = rejects.group_by("reason").len().sort("reason")
    return SeedReadResult(
        seeds=seeds, rejects=rejects, lines_read=col.lines,
        counts=dict(zip(counts["reason"].to_list(), counts["len"].to_list())),
    )


def _parse_jsonl(data: bytes, col: _Collector) -> None:
    for number, raw in enumerate(io.BytesIO(data), start=1):
        col.lines = number
        if not raw.strip():
            continue
        if len(raw) > col.opts.max_line_bytes:
            col.reject(number, "line_too_long",
                       f"line is {len(raw):,} bytes, over max_line_bytes={col.opts.max_line_bytes:,}; "
                       "split or shorten the record, or raise max_line_bytes",
                       raw[:200].decode("utf-8", "replace"))
            continue
        try:
            text = raw.decode("utf-8-sig")  # a byte-order mark is allowed on the first line
        except UnicodeDecodeError as err:
            col.reject(number, "bad_encoding",
                       f"not valid UTF-8 (byte {err.start}); re-encode the file as UTF-8",
                       raw.decode("utf-8", "replace"))
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as err:
            col.reject(number, "bad_json", f"invalid JSON ({err.msg} at column {err.colno}); "
                       "each line must be one JSON object", text)
            continue
        if not isinstance(rec, dict):
            col.reject(number, "bad_json",
                       f"expected a JSON object, got {type(rec).__name__}; each line must be one "
                       "JSON object", text)
            continue
        col.record(number, rec, text)


def _parse_csv(data: bytes, col: _Collector) -> None:
    text = data.decode("utf-8-sig", errors="surrogateescape")
    csv.field_size_limit(sys.maxsize)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = reader.fieldnames or []
    opts = col.opts
    if opts.caption_column not in fields and opts.label_column not in fields:
        col.reject(1, "missing_caption",
                   f"the CSV header has no {opts.caption_column!r} (or {opts.label_column!r}) column; "
                   f"found: {', '.join(fields) or 'none'}. Rename the caption column to "
                   f"{opts.caption_column!r}, or set caption_column.", ",".join(fields))
        return
    start = 2
    for row in reader:
        number, start = start, reader.line_num + 1
        col.lines = reader.line_num
        raw = ",".join(v if isinstance(v, str) else "" for v in row.values())
        if len(raw.encode("utf-8", "surrogateescape")) > opts.max_line_bytes:
            col.reject(number, "line_too_long",
                       f"row is over max_line_bytes={opts.max_line_bytes:,}; shorten the record, "
                       "or raise max_line_bytes", raw[:200].encode("utf-8", "surrogateescape")
                       .decode("utf-8", "replace"))
            continue
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError:
            col.reject(number, "bad_encoding", "not valid UTF-8; re-encode the file as UTF-8",
                       raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
            continue
        rec = {k: v for k, v in row.items() if k is not None and v not in (None,)}
        if rec.get(opts.caption_column) == "" and opts.label_column in rec:
            rec.pop(opts.caption_column)
        if rec.get(opts.label_column) == "":
            rec.pop(opts.label_column)
        col.record(number, rec, raw)


def _parse_parquet(data: bytes, col: _Collector) -> None:
    try:
        frame = pl.read_parquet(io.BytesIO(data))
    except Exception as err:  # noqa: BLE001 - any decoder error means an unreadable file
        col.reject(0, "unreadable_file", f"not a readable Parquet file ({err}); rewrite it")
        return
    opts = col.opts
    if opts.caption_column not in frame.columns and opts.label_column not in frame.columns:
        col.reject(1, "missing_caption",
                   f"no {opts.caption_column!r} (or {opts.label_column!r}) column; found: "
                   f"{', '.join(frame.columns) or 'none'}. Rename the caption column to "
                   f"{opts.caption_column!r}, or set caption_column.")
        return
    for number, rec in enumerate(frame.iter_rows(named=True), start=1):
        col.lines = number
        rec = {k: v for k, v in rec.items() if v is not None}
        col.record(number, rec, json.dumps(rec, default=str)[:200])


def _finish(col: _Collector, opts: SeedReadOptions) -> tuple[pl.DataFrame, list[dict]]:
    """Normalise, expand labels into templates, fill ids, and drop empties and duplicates."""
    dropped: list[dict] = []
    out: list[dict] = []
    seen_text: dict[str, int] = {}
    seen_id: dict[str, int] = {}
    for row in col.rows:
        caption = normalise_ws(row["text"])
        line = row["source_line"]
        if not caption:
            dropped.append(_drop(col, line, "empty_caption", "caption is empty after whitespace "
                                 "normalisation", row["text"]))
            continue
        base_id = row["raw_id"] or stable_id(row["kind"], caption)
        if row["kind"] == "label":
            expanded = [
                (f"{base_id}-t{j}", template.replace("<label>", caption))
                for j, template in enumerate(_pick_templates(caption, opts))
            ]
        else:
            expanded = [(base_id, caption)]
        for seed_id, text in expanded:
            if text in seen_text:
                dropped.append(_drop(col, line, "duplicate_caption",
                                     f"same caption as line {seen_text[text]}", text))
                continue
            if seed_id in seen_id:
                dropped.append(_drop(col, line, "duplicate_id",
                                     f"id {seed_id!r} already used on line {seen_id[seed_id]}; "
                                     "give every record its own id", text))
                continue
            seen_text[text], seen_id[seed_id] = line, line
            out.append(
                {"seed_id": seed_id, "shard": col.shard, "caption": text,
                 "seed_kind": row["kind"], "label": row["label"],
                 "source_file": col.source, "source_line": line, "meta": row["meta"]}
            )
    return pl.DataFrame(out, schema=SEED_SCHEMA), dropped


def _pick_templates(label: str, opts: SeedReadOptions) -> list[str]:
    templates = list(opts.label_templates)
    if not templates:
        raise SeedError("label seeds need label_templates; none were configured")
    n = min(opts.templates_per_label, len(templates))
    start = stable_int("label-templates", label) % len(templates)
    return [templates[(start + i) % len(templates)] for i in range(n)]


def _drop(col: _Collector, line: int, reason: str, detail: str, raw: str) -> dict:
    return {"shard": col.shard, "source_file": col.source, "source_line": line, "reason": reason,
            "detail": f"{col.source}:{line}: {detail}", "raw": excerpt(raw)}
