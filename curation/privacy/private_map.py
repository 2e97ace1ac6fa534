"""The one private file: ``private/source_map.jsonl`` (owner-only), never to be shared.

Line 1 holds the workdir's random id key (pseudonymous ids are HMACs under it, so a list of
patient names or MRNs cannot be hashed and compared against manifests); every further line maps
a pseudonymous id (volume, case or skipped input) to its real paths. Lines are appended under an
exclusive lock, so worker processes and shards may write at once; a reader takes the last entry
per id and ignores a torn last line (kill -9). Resume never needs this file (fingerprints come
from the sources found on disk); `curate lookup` reads it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import stat
from pathlib import Path
from typing import IO, Any

from curation.store.layout import Workdir

_SEEN: dict[tuple[str, int], set[str]] = {}  # per process: lines already in the file


class PrivateMapError(OSError):
    """The private folder or file is not safe to use (one line naming it and the fault)."""


def _check_owner_only(path: Path, st: os.stat_result, kind: str) -> None:
    """Refuse what someone else owns or could write (a planted key or map is never adopted)."""
    if kind == "folder" and not stat.S_ISDIR(st.st_mode):
        raise PrivateMapError(f"{path}: expected the private folder, found something else; move it away")
    if kind == "file" and not stat.S_ISREG(st.st_mode):
        raise PrivateMapError(f"{path}: the private map is not a regular file; move it away")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise PrivateMapError(f"{path}: the private {kind} belongs to another user (uid {st.st_uid}); "
                              "refusing to use it: move it away")
    loose = 0o022 if kind == "folder" else 0o077
    if st.st_mode & loose:
        fix = "chmod 700" if kind == "folder" else "chmod 600"
        raise PrivateMapError(f"{path}: the private {kind} is open to other users (mode {stat.S_IMODE(st.st_mode):o}); "
                              f"refusing to use it: check its contents, then {fix} it or move it away")


class PrivateMap:
    """The private id key and id -> real path entries of one workdir."""

    def __init__(self, workdir: str | os.PathLike) -> None:
        self.path = Workdir(workdir).private_map

    def _check_folder(self) -> None:
        folder = self.path.parent
        try:
            st = os.lstat(folder)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise PrivateMapError(f"{folder}: the private folder is a symbolic link; refusing to use it: move it away")
        _check_owner_only(folder, st, "folder")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(folder, 0o700)  # ours and not writable by others: only tightened

    def _open(self, mode: str = "r") -> IO[str]:
        """The map opened without following links, after checking it is ours and owner-only."""
        self._check_folder()
        flags = (os.O_RDONLY if mode == "r" else os.O_WRONLY | os.O_APPEND) | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.path, flags | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EMLINK):
                raise PrivateMapError(f"{self.path}: the private map is a symbolic link; refusing to use it: "
                                      "move it away") from None
            raise
        try:
            _check_owner_only(self.path, os.fstat(fd), "file")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return os.fdopen(fd, mode, encoding="utf-8", errors="replace" if mode == "r" else "strict")

    def key(self) -> bytes:
        """The workdir's id key, created (owner-only) on first use; a private folder or map that
        another user owns or could write is refused (`PrivateMapError`), never adopted."""
        self._check_folder()
        if not os.path.lexists(self.path):
            self._create()
        with self._open() as fh:
            first = fh.readline()
        try:
            return bytes.fromhex(json.loads(first)["key"])
        except (ValueError, KeyError, TypeError):
            raise OSError(f"{self.path}: damaged private map (no id key on line 1); restore it from a backup "
                          "or move it away (new ids for pseudonymised volumes)") from None

    def _create(self) -> None:
        self.path.parent.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(self.path.parent, 0o700)
        except FileExistsError:
            pass
        self._check_folder()
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
        with self._open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                fh.write("".join(ln + "\n" for ln in new))
                fh.flush()
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        seen.update(new)

    def entries(self) -> list[dict[str, Any]]:
        """Every entry (after the key line), oldest first; torn or foreign lines skipped."""
        if not os.path.lexists(self.path):
            return []
        out = []
        with self._open() as fh:
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
