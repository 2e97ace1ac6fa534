"""The one private file: ``private/source_map.jsonl`` (owner-only), never to be shared.

Line 1 holds the workdir's random id key (pseudonymous ids are HMACs under it, so a list of
patient names or MRNs cannot be hashed and compared against manifests); every further line maps
a pseudonymous id (volume, case or skipped input) to its real paths. Lines are appended under an
exclusive lock, so worker processes and shards may write at once; a reader takes the last entry
per id and ignores a torn last line (kill -9). Resume never needs this file (fingerprints come
from the sources found on disk); `curate lookup` reads it.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from typing import Any

from curation.store.layout import Workdir

_SEEN: dict[tuple[str, int], set[str]] = {}  # per process: lines already in the file


class PrivateMap:
    """The private id key and id -> real path entries of one workdir."""

    def __init__(self, workdir: str | os.PathLike) -> None:
        self.path = Workdir(workdir).private_map

    def key(self) -> bytes:
        """The workdir's id key, created (owner-only) on first use."""
        if not self.path.exists():
            self._create()
        with open(self.path, encoding="utf-8") as fh:
            first = fh.readline()
        try:
            return bytes.fromhex(json.loads(first)["key"])
        except (ValueError, KeyError, TypeError):
            raise OSError(f"{self.path}: damaged private map (no id key on line 1); restore it from a backup "
                          "or move it away (new ids for pseudonymised volumes)") from None

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps({"key": secrets.token_hex(32)}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, self.path)  # atomic and exclusive: a concurrent creator's key wins
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)

    def register(self, entries: list[dict[str, Any]]) -> None:
        """Append entries (each with an ``id``) not yet in the file."""
        self.key()
        ident = (str(self.path), self.path.stat().st_ino)
        if ident not in _SEEN:
            _SEEN[ident] = {json.dumps(e, sort_keys=True) for e in self.entries()}
        seen = _SEEN[ident]
        lines = [json.dumps(e, sort_keys=True, default=str) for e in entries]
        new = [ln for ln in dict.fromkeys(lines) if ln not in seen]
        if not new:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                fh.write("".join(ln + "\n" for ln in new))
                fh.flush()
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        seen.update(new)

    def entries(self) -> list[dict[str, Any]]:
        """Every entry (after the key line), oldest first; torn or foreign lines skipped."""
        if not self.path.exists():
            return []
        out = []
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            fh.readline()
            for line in fh:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and "id" in entry:
                    out.append(entry)
        return out

    def lookup(self, ident: str) -> list[dict[str, Any]]:
        """The latest entry of each real source behind ``ident`` (a volume, case or input id)."""
        found: dict[str, dict[str, Any]] = {}
        for entry in self.entries():
            if ident in (entry.get("id"), entry.get("case_id")):
                found[f"{entry.get('id')}|{entry.get('source')}"] = entry
        return list(found.values())
