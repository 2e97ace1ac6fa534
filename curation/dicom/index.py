"""A header index: file summaries keyed by path, size and mtime, so a rerun reads no header twice.

The index is one SQLite file (in the workdir's cache); lookups go file by file, so memory does
not grow with the tree. Keys are keyed hashes of path|size|mtime (with the workdir's id key,
when given) and values are `curation.dicom.header.Header` summaries, which hold no patient
identifier, no free text and no real path: the index can sit beside other caches.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

from curation.dicom.header import FrameKey, Header
from curation.privacy.scrub import keyed_hash

INDEX_VERSION = "2"  # bump when Header, its parts or the skip reasons change meaning (2: frame plausibility)
FILE_NAME = "dicom_headers.sqlite"


def file_key(path: Path, st: os.stat_result, key: bytes | None) -> str:
    text = f"{INDEX_VERSION}|{path}|{st.st_size}|{st.st_mtime_ns}"
    if key:
        return keyed_hash(key, text, 32)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _encode(header: Header | None, skip: str, sop: str) -> str:
    if header is None:
        return json.dumps({"skip": skip})
    return json.dumps({"g": header.group, "size": header.size, "m": header.modality, "n": header.n_frames,
                       "s": header.skip, "mo": header.mosaic, "sop": sop,
                       "f": [[f.frame, f.position, f.orientation, f.parts, f.order] for f in header.frames]})


def _decode(path: Path, text: str) -> tuple[Header | None, str, str]:
    v = json.loads(text)
    if "skip" in v:
        return None, v["skip"], ""
    frames = tuple(FrameKey(f[0], None if f[1] is None else tuple(f[1]), None if f[2] is None else tuple(f[2]),
                            tuple(f[3]), tuple(f[4])) for f in v["f"])
    return Header(path, v["g"], tuple(v["size"]), v["m"], v["n"], v["s"], v["mo"], frames), "", v["sop"]


class HeaderIndex:
    """Cached header summaries under ``folder`` (no-op when ``folder`` is None)."""

    def __init__(self, folder: Path | None, key: bytes | None = None) -> None:
        self.key = key
        self.db: sqlite3.Connection | None = None
        self.pending: list[tuple[str, str]] = []
        self.keys: dict[Path, str] = {}
        if folder is None:
            return
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(Path(folder) / FILE_NAME, timeout=30)
            self.db.execute("PRAGMA synchronous = OFF")  # a cache: a crash costs a reread, not an fsync per batch
            self.db.execute("CREATE TABLE IF NOT EXISTS headers (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
        except (OSError, sqlite3.Error):  # an unusable cache only costs time
            self.db = None

    def get(self, path: Path, st: os.stat_result) -> tuple[Header | None, str, str] | None:
        """(header, skip reason, hashed SOP UID) as cached, or None when not cached."""
        if self.db is None:
            return None
        key = file_key(path, st, self.key)
        try:
            row = self.db.execute("SELECT v FROM headers WHERE k = ?", (key,)).fetchone()
            if row is not None:
                return _decode(path, row[0])
        except (sqlite3.Error, ValueError, KeyError, TypeError, IndexError):
            pass
        self.keys[path] = key  # the put() that follows a miss reuses it
        return None

    def put(self, path: Path, st: os.stat_result, header: Header | None, skip: str = "", sop: str = "") -> None:
        if self.db is None:
            return
        key = self.keys.pop(path, None) or file_key(path, st, self.key)
        self.pending.append((key, _encode(header, skip, sop)))
        if len(self.pending) >= 1000:
            self.flush()

    def flush(self) -> None:
        if self.db is None or not self.pending:
            return
        try:
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO headers (k, v) VALUES (?, ?)", self.pending)
        except sqlite3.Error:
            pass
        self.pending = []

    def close(self) -> None:
        self.flush()
        if self.db is not None:
            self.db.close()
            self.db = None
