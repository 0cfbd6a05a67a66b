"""Seed shards: tolerant parsing of JSONL / CSV / Parquet. The partition key of a seed file and
the discovery of shards are in unicorn_resources/keys.py.

Every line that cannot become a seed becomes a reject row (file, line, reason, fix), so that
nothing vanishes silently. Whether a bad line fails the whole shard is the caller's tolerance.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import polars as pl

from unicorn_assets.logic.text import (
    excerpt,
    indefinite_article,
    normalise_ws,
    stable_id,
    stable_int,
)
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
    {"bad_json", "bad_csv", "bad_encoding", "line_too_long", "missing_caption", "null_caption",
     "bad_caption_type", "control_character", "empty_file", "unreadable_file"}
)
# Control characters (C0, DEL, C1) other than the ordinary whitespace ones (tab, line feed,
# vertical tab, form feed, carriage return), which whitespace normalisation turns into a space.
# A caption holding one (NUL, BEL, ESC, ...) is rejected, not cleaned: it is a sign of a binary
# or mis-decoded record, and removing ESC alone would leave a terminal code's "[31m" behind.
CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
_C0_NAMES = ["NUL", "SOH", "STX", "ETX", "EOT", "ENQ", "ACK", "BEL", "BS", "HT", "LF", "VT",
             "FF", "CR", "SO", "SI", "DLE", "DC1", "DC2", "DC3", "DC4", "NAK", "SYN", "ETB",
             "CAN", "EM", "SUB", "ESC", "FS", "GS", "RS", "US"]


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
             "reason": reason, "detail": f"{self.source}:{line}: {detail}",
             "raw": excerpt(escape_controls(raw))}
        )

    def record(self, line: int, rec: dict, raw: str) -> None:
        """One parsed record. A field that is there but null (JSON null, a Parquet null, an empty
        CSV cell) counts as null, not as missing."""
        opts = self.opts
        cap, lab = opts.caption_column, opts.label_column
        text, kind = rec.get(cap), "caption"
        # One rule in every format: a caption that is null or blank (empty, or only whitespace)
        # beside a label makes a label seed. CSV has no null (an empty cell is read as one), so
        # without this a JSONL "" beside a label was dropped as empty while the same CSV row
        # made label seeds.
        if (text is None and rec.get(lab) is not None
                or _blank(text) and not _blank(rec.get(lab)) and rec.get(lab) is not None):
            text, kind = rec.get(lab), "label"
        if text is None:
            if cap in rec or lab in rec:
                nulls = " and ".join(repr(k) for k in (cap, lab) if k in rec)
                self.reject(line, "null_caption",
                            f"{nulls} {'is' if ' and ' not in nulls else 'are'} null; give the "
                            "record a caption text, or remove the record", raw)
                return
            found = ", ".join(sorted(map(str, rec))) or "none"
            self.reject(
                line, "missing_caption",
                f"no {cap!r} (or {lab!r}) field; found: {found}. Add a {cap!r} field, or set "
                "caption_column to the field that holds the caption.",
                raw,
            )
            return
        if not isinstance(text, str):
            self.reject(line, "bad_caption_type",
                        f"{cap!r} must be a string, got {type(text).__name__}", raw)
            return
        rid, label = rec.get(opts.id_column), rec.get(lab)
        for name, value in ((cap if kind == "caption" else lab, text), (lab, label)):
            found = CONTROL_CHARACTER.search(value) if isinstance(value, str) else None
            if found:
                self.reject(line, "control_character",
                            f"{name!r} holds the control character {describe_control(found[0])} "
                            f"at character {found.start() + 1}; remove it (a tab or line break "
                            "is fine: it becomes a space)", raw)
                return
        meta = {k: v for k, v in rec.items() if k not in (cap, lab, opts.id_column)}
        self.rows.append(
            {"raw_id": None if rid is None or rid == "" else str(rid), "text": text, "kind": kind,
             "label": None if label is None else normalise_ws(str(label)),
             "source_line": line, "meta": json.dumps(meta, sort_keys=True, default=str)}
        )


def _blank(value: object) -> bool:
    """A string that is empty or only whitespace."""
    return isinstance(value, str) and not value.strip()


def describe_control(char: str) -> str:
    """'U+001B (ESC)' for a C0 control character, 'U+0085' for a C1 one."""
    code = ord(char)
    name = _C0_NAMES[code] if code < 32 else "DEL" if code == 0x7F else ""
    return f"U+{code:04X}" + (f" ({name})" if name else "")


def escape_controls(text: str) -> str:
    """`text` with its control characters written as \\xNN, for a reject's `raw` excerpt."""
    return CONTROL_CHARACTER.sub(lambda m: f"\\x{ord(m[0]):02x}", text)


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
    """Strict CSV: a record whose quotes do not close (a quote never closed, or text after a
    closing quote) rejects its first line, and parsing goes on from the line after it, so the
    records after the damage are kept; a record with another number of fields than the header
    is rejected."""
    text = data.decode("utf-8-sig", errors="surrogateescape")
    csv.field_size_limit(sys.maxsize)
    opts = col.opts
    fields: list[str] | None = None
    for first, last, row in _csv_records(io.StringIO(text, newline="").readlines(), col):
        col.lines = last
        if fields is None:
            fields = row
            if opts.caption_column not in fields and opts.label_column not in fields:
                col.reject(first, "missing_caption",
                           f"the CSV header has no {opts.caption_column!r} (or "
                           f"{opts.label_column!r}) column; found: {', '.join(fields) or 'none'}. "
                           f"Rename the caption column to {opts.caption_column!r}, or set "
                           "caption_column.", ",".join(fields))
                return
            continue
        raw = ",".join(row)
        if len(row) != len(fields):
            where = f" (lines {first}-{last})" if last > first else ""
            col.reject(first, "bad_csv",
                       f"the record{where} has {len(row)} field(s), the header {len(fields)}; "
                       'quote a field that holds a comma ("..."), and give every row the '
                       "header's fields", _readable(raw))
            continue
        if len(raw.encode("utf-8", "surrogateescape")) > opts.max_line_bytes:
            col.reject(first, "line_too_long",
                       f"row is over max_line_bytes={opts.max_line_bytes:,}; shorten the record, "
                       "or raise max_line_bytes", _readable(raw[:200]))
            continue
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError:
            col.reject(first, "bad_encoding", "not valid UTF-8; re-encode the file as UTF-8",
                       _readable(raw))
            continue
        # CSV has no null: an empty caption or label cell is read as one
        rec = {k: (None if v == "" and k in (opts.caption_column, opts.label_column) else v)
               for k, v in zip(fields, row, strict=True)}
        col.record(first, rec, raw)


def _csv_records(lines: list[str], col: _Collector) -> Iterator[tuple[int, int, list[str]]]:
    """(first line, last line, fields) of each CSV record of `lines` (physical lines, their
    endings kept), the header first; blank lines are skipped. A record the CSV reader refuses
    (strict quoting) is rejected, and reading starts again at the line after its first."""
    pos = 0  # index of the first line the current reader reads
    header = True
    while pos < len(lines):
        reader = csv.reader((lines[i] for i in range(pos, len(lines))), strict=True)
        done = 0  # lines the reader had read up to the end of its last record
        try:
            for row in reader:
                first, done = pos + done + 1, reader.line_num
                if row:
                    header = False
                    yield first, pos + done, row
            return
        except csv.Error as err:
            first = pos + done + 1
            col.reject(first, "bad_csv", _csv_problem(str(err)), _readable(lines[first - 1]))
            if header:
                return  # without a header no row can be read
            pos = first


def _readable(text: str) -> str:
    """Text decoded with surrogateescape, its undecodable bytes shown as U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _csv_problem(error: str) -> str:
    if "unexpected end of data" in error:
        return ("a quote opened in this record is never closed, so it would swallow every line "
                "after it (those were read on their own); close the field's quote "
                '("..."), or double a quote inside a quoted field ("")')
    return (f"not valid CSV ({error}): a quote in this record is not closed where its field ends; "
            'close every quoted field just before the comma or line end, and double a quote '
            'inside it, e.g. "a ""big"" dog"')


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
    keep_null = (opts.caption_column, opts.label_column)  # a null caption is reported as null
    for number, rec in enumerate(frame.iter_rows(named=True), start=1):
        col.lines = number
        rec = {k: v for k, v in rec.items() if v is not None or k in keep_null}
        col.record(number, rec, json.dumps(rec, default=str)[:200])


def _finish(col: _Collector, opts: SeedReadOptions) -> tuple[pl.DataFrame, list[dict]]:
    """Normalise, expand labels into templates, fill ids, and drop empties and duplicates."""
    dropped: list[dict] = []
    out: list[dict] = []
    seen_text: dict[str, int] = {}
    seen_id: dict[str, int] = {}
    # The ids the file gives (first line of each): a made id (a label's "<id>-t<n>", a digest
    # of the text) never takes one of them, whichever line comes first (see `_made_id_clash`).
    given: dict[str, int] = {}
    for row in col.rows:
        if row["raw_id"] is not None and normalise_ws(row["text"]):
            given.setdefault(row["raw_id"], row["source_line"])
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
                (f"{base_id}-t{j}", fill_template(template, caption))
                for j, template in enumerate(_pick_templates(caption, opts))
            ]
        else:
            expanded = [(base_id, caption)]
        if row["raw_id"] is not None and given[row["raw_id"]] != line:
            dropped.append(_drop(col, line, "duplicate_id",
                                 f"id {row['raw_id']!r} already used on line "
                                 f"{given[row['raw_id']]}; give every record its own id",
                                 row["text"]))
            continue
        clash = _made_id_clash(row, [i for i, _ in expanded], given)
        if clash:
            dropped.append(_drop(col, line, "duplicate_id", clash, row["text"]))
            continue
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


def _made_id_clash(row: dict, ids: list[str], given: dict[str, int]) -> str | None:
    """Why the ids made for `row` (a label's template ids, or the digest id of a record without
    one) cannot be used: one of them is an id another line gives. The given id wins, whatever the
    order of the lines; None when there is no clash."""
    made = ids if row["kind"] == "label" or row["raw_id"] is None else []
    for seed_id in made:
        if seed_id in given and given[seed_id] != row["source_line"]:
            what = (f"label {normalise_ws(row['text'])!r} makes the seed id {seed_id!r} (its "
                    f"{'id' if row['raw_id'] is not None else 'digest'} plus a template number)"
                    if row["kind"] == "label" else f"the digest id {seed_id!r} of this caption")
            return (f"{what}, which line {given[seed_id]} gives as its id; give this record "
                    f"(or line {given[seed_id]}) another id")
    return None


_ARTICLE_BEFORE_LABEL = re.compile(r"\b([Aa])n? (?=<label>)")


def fill_template(template: str, label: str) -> str:
    """`template` with `label` in place of <label>, and an "a" or "an" just before it chosen
    for the label ("a <label>" with "Atlantic Puffin" gives "an Atlantic Puffin"; see
    `indefinite_article`)."""
    article = indefinite_article(label)
    return _ARTICLE_BEFORE_LABEL.sub(
        lambda m: (article if m[1] == "a" else article.capitalize()) + " ", template
    ).replace("<label>", label)


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
