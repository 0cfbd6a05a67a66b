"""A response cache for LLM completions: one SQLite file, keyed on the exact request.

Several processes (one per Dagster run) may read and write the same file at once: every call opens
its own connection, each write is one short transaction, and a lock is waited on up to
`busy_timeout_s`. A generate call keeps one connection (`writer`) and commits completions as they
finish, so a crash or a kill loses only the work in progress.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path

from unicorn_resources.llm.types import ChatRequest, Completion, SamplingParams

KEY_VERSION = 1  # bump when the key's fields change, so old entries stop matching
JOURNAL_MODES = ("wal", "delete", "truncate", "persist")
_CHUNK = 500  # keys per SELECT, under SQLite's limit on bound parameters

_SCHEMA = """
create table if not exists completions (
    key text primary key,
    model_id text not null,
    text text not null,
    prompt_tokens integer not null,
    completion_tokens integer not null,
    finish_reason text not null,
    created_at real not null
)
"""


def request_key(model_id: str, request: ChatRequest, params: SamplingParams) -> str:
    """sha256 over everything that changes the answer: model, messages, sampling, seed, schema."""
    payload = {"v": KEY_VERSION, "model": model_id, "messages": request.messages,
               "params": params.as_dict(), "seed": request.seed, "json_schema": request.json_schema}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """`journal_mode="wal"` lets readers and a writer work at once on one host; on a network
    filesystem (NFS, EFS) use "delete": SQLite's WAL needs memory shared between processes."""

    def __init__(self, path: str | Path, journal_mode: str = "wal", busy_timeout_s: float = 60.0):
        if journal_mode not in JOURNAL_MODES:
            raise ValueError(f"LLM cache journal mode {journal_mode!r}: use one of {JOURNAL_MODES}")
        self.path = Path(path)
        self.journal_mode = journal_mode
        self.busy_timeout_s = busy_timeout_s

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = sqlite3.connect(self.path, timeout=self.busy_timeout_s)
        except sqlite3.Error as err:
            raise RuntimeError(f"LLM cache {self.path}: cannot open it ({err}); set the llm's "
                               "cache_path to a writable file, or cache_enabled: false") from err
        with closing(con):
            con.execute(f"pragma journal_mode={self.journal_mode}")
            con.execute("pragma synchronous=normal")
            con.execute(_SCHEMA)
            yield con

    def get_many(self, keys: Sequence[str]) -> dict[str, Completion]:
        found: dict[str, Completion] = {}
        unique = list(dict.fromkeys(keys))
        with self._connect() as con:
            for start in range(0, len(unique), _CHUNK):
                chunk = unique[start : start + _CHUNK]
                rows = con.execute(
                    "select key, text, prompt_tokens, completion_tokens, finish_reason from "
                    f"completions where key in ({','.join('?' * len(chunk))})", chunk)
                for key, text, prompt_tokens, completion_tokens, finish_reason in rows:
                    found[key] = Completion(text, prompt_tokens, completion_tokens, finish_reason,
                                            cached=True)
        return found

    def put_many(self, model_id: str, items: Iterable[tuple[str, Completion]]) -> None:
        """Store completions; an entry already there is kept (the first answer stays the answer)."""
        items = list(items)
        if items:
            with self.writer(model_id) as put:
                put(items)

    @contextmanager
    def writer(self, model_id: str) -> Iterator[Callable[[Iterable[tuple[str, Completion]]], None]]:
        """`put(items)` on one open connection: each call is one transaction, committed on return
        (in WAL mode a commit is an append without fsync, so committing often costs little)."""
        with self._connect() as con:
            def put(items: Iterable[tuple[str, Completion]]) -> None:
                now = time.time()
                rows = [(key, model_id, c.text, c.prompt_tokens, c.completion_tokens,
                         c.finish_reason, now) for key, c in items]
                if rows:
                    with con:
                        con.executemany(
                            "insert or ignore into completions values (?, ?, ?, ?, ?, ?, ?)", rows)

            yield put

    def clear(self, model_id: str | None = None) -> int:
        """Delete every entry (or those of one model); returns how many were deleted."""
        if not self.path.exists():
            return 0
        with self._connect() as con:
            with con:
                if model_id is None:
                    deleted = con.execute("delete from completions").rowcount
                else:
                    deleted = con.execute("delete from completions where model_id = ?",
                                          (model_id,)).rowcount
            con.execute("vacuum")
        return deleted

    def counts(self) -> dict[str, int]:
        """{model id: number of cached completions}."""
        if not self.path.exists():
            return {}
        with self._connect() as con:
            return dict(con.execute("select model_id, count(*) from completions group by model_id "
                                    "order by model_id"))
