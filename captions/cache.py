"""Durable, content-addressed caption cache (SQLite, one row per paid or offline answer).

Key = sha256 over (image_sha256, provider, model, prompt_version, generation params as sorted
JSON). WAL journal with ``synchronous=FULL`` and one committed transaction per answer, so a
``kill -9`` at any moment keeps every answer that arrived before it. One writer process at a
time; any number of readers. A committed key is never overwritten: the first paid answer wins.

A file that is not a readable cache (corrupt, truncated, not SQLite, unreadable) raises
``CacheError`` naming the file and the fault; nothing in it is changed. ``usage`` says whether the
token counts were reported by the server or estimated (open-model servers that send no usage);
caches written before that column existed get it added (NULL reads as reported).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from captions.errors import CacheError

COLUMNS: tuple[str, ...] = (
    "key",
    "slice_id",
    "image_sha256",
    "provider",
    "text",
    "model",
    "prompt_version",
    "params",
    "finish_reason",
    "refused",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "request_id",
    "mode",
    "created_at",
    "usage",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS captions (
    key TEXT PRIMARY KEY,
    slice_id TEXT,
    image_sha256 TEXT,
    provider TEXT,
    text TEXT,
    model TEXT,
    prompt_version TEXT,
    params TEXT,
    finish_reason TEXT,
    refused INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    cost_usd REAL,
    request_id TEXT,
    mode TEXT,
    created_at TEXT,
    usage TEXT
)
"""
_CHUNK = 500  # keys per SELECT ... IN (...), under SQLite's variable limit


def cache_key(
    image_sha256: str, provider: str, model: str, prompt_version: str, params: dict[str, Any]
) -> str:
    """Content address of one captioning request."""
    payload = json.dumps(
        [image_sha256, provider, model, prompt_version, params], sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class CaptionCache:
    """SQLite caption cache; use as a context manager or call ``close()``.

    Thread-safe (one connection behind a lock), so an event loop can commit from a worker
    thread and keep fsync off the loop.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per answer.
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0,
                                       check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        try:
            self._db.row_factory = sqlite3.Row
            # Read before anything is written: a file that is not a database fails here untouched.
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and "captions" not in tables:
                raise CacheError(f"{self.path}: not a caption cache (an SQLite file without a captions "
                                 "table); move it aside or pass another --workdir")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(captions)")}
            if "usage" not in columns:
                self._db.execute("ALTER TABLE captions ADD COLUMN usage TEXT")
        except sqlite3.Error as exc:
            self._db.close()
            raise self._error(exc) from None
        except CacheError:
            self._db.close()
            raise

    def _error(self, exc: sqlite3.Error) -> CacheError:
        """One line naming the file and the fault (never a traceback)."""
        fault = " ".join(str(exc).split()) or type(exc).__name__
        hint = ("; move it aside (a new cache starts empty) or restore a backup"
                if "not a database" in fault or "malformed" in fault else "")
        return CacheError(f"{self.path}: caption cache unusable: {fault}{hint}")

    def __enter__(self) -> CaptionCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _query(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, tuple(args)).fetchall()
            except sqlite3.Error as exc:
                raise self._error(exc) from None

    def __len__(self) -> int:
        return int(self._query("SELECT count(*) FROM captions")[0][0])

    def __contains__(self, key: str) -> bool:
        return bool(self._query("SELECT 1 FROM captions WHERE key=?", (key,)))

    def get(self, key: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM captions WHERE key=?", (key,))
        return _as_dict(rows[0]) if rows else None

    def get_many(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Rows for the keys that are cached, by key."""
        out: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(list(dict.fromkeys(keys)), _CHUNK):
            marks = ",".join("?" * len(chunk))
            for row in self._query(f"SELECT * FROM captions WHERE key IN ({marks})", chunk):
                out[row["key"]] = _as_dict(row)
        return out

    def refused_flags(self, keys: Iterable[str]) -> dict[str, bool]:
        """``{key: refused}`` for the keys that are cached (no texts read)."""
        out: dict[str, bool] = {}
        for chunk in _chunks(list(dict.fromkeys(keys)), _CHUNK):
            marks = ",".join("?" * len(chunk))
            for key, refused in self._query(f"SELECT key, refused FROM captions WHERE key IN ({marks})", chunk):
                out[key] = bool(refused)
        return out

    def cached_keys(self, keys: Iterable[str]) -> set[str]:
        """Subset of ``keys`` already in the cache (no row bodies read)."""
        found: set[str] = set()
        for chunk in _chunks(list(dict.fromkeys(keys)), _CHUNK):
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in self._query(f"SELECT key FROM captions WHERE key IN ({marks})", chunk))
        return found

    def put(self, row: dict[str, Any]) -> bool:
        """Commit one answer durably. Returns False when the key was already cached."""
        return self.put_many([row]) == 1

    def put_many(self, rows: Iterable[dict[str, Any]]) -> int:
        """Commit several answers in one transaction (offline and batch results)."""
        values = [_values(row) for row in rows]
        if not values:
            return 0
        marks = ",".join("?" * len(COLUMNS))
        with self._lock:
            before = self._db.total_changes
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany(
                        f"INSERT INTO captions ({','.join(COLUMNS)}) VALUES ({marks}) "
                        "ON CONFLICT(key) DO NOTHING",
                        values,
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise self._error(exc) from None
            return self._db.total_changes - before

    def rows(self) -> list[dict[str, Any]]:
        return [_as_dict(r) for r in self._query("SELECT * FROM captions ORDER BY created_at, key")]

    def to_dataframe(self) -> pd.DataFrame:
        """The whole cache as a DataFrame (``refused`` as bool)."""
        with self._lock:
            try:
                df = pd.read_sql_query("SELECT * FROM captions ORDER BY created_at, key", self._db)
            except (sqlite3.Error, pd.errors.DatabaseError) as exc:
                raise self._error(sqlite3.DatabaseError(str(exc))) from None
        df["refused"] = df["refused"].astype(bool)
        return df


def _values(row: dict[str, Any]) -> tuple[Any, ...]:
    row = dict(row)
    row.setdefault("created_at", _now())
    if isinstance(row.get("params"), dict):
        row["params"] = json.dumps(row["params"], sort_keys=True)
    row["refused"] = int(bool(row.get("refused", False)))
    if not row.get("key"):
        raise ValueError("cache row without a key")
    return tuple(row.get(col) for col in COLUMNS)


def _as_dict(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    out["refused"] = bool(out["refused"])
    return out


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
