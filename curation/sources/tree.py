"""`Tree`: the regular files under a dataset root, walked once, safely (`walk_files`): links out
of the root, FIFOs and undecodable names are set aside with one line each, never opened."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from curation.imageio.files import Problems, regular_fault, walk_files


class Tree:
    """Every usable file under ``root``; ``problems`` holds what was set aside (path, reason)."""

    def __init__(self, root: Path, problems: Problems | None = None) -> None:
        self.root = Path(root)
        self.problems: Problems = problems if problems is not None else []
        self.files = walk_files(self.root, self.problems)
        self._set = set(self.files)
        self._folders: dict[Path, list[Path]] = {}
        for f in self.files:
            self._folders.setdefault(f.parent, []).append(f)

    def take_special(self, folder: Path, accept) -> list[tuple[Path, str]]:
        """Set-aside non-regular files (FIFOs, sockets, devices) directly in ``folder`` whose
        names ``accept`` takes: (path, fault), removed from ``problems`` so that the caller
        records each once (an error row where a volume was expected)."""
        taken = []
        for entry in list(self.problems):
            path, reason = entry
            if path.parent == Path(folder) and "not a regular file" in reason and accept(path):
                self.problems.remove(entry)
                taken.append((path, reason.rsplit("; skipped", 1)[0]))
        return sorted(taken)

    def has(self, path: Path) -> bool:
        """``path`` is a usable file: one of the tree's (as found, not through a link), or,
        outside the root (``--label-root``, a sibling labels folder), a regular file."""
        path = Path(path)
        if path in self._set:
            return True
        try:
            path.relative_to(self.root)
            return False  # under the root but set aside (or absent)
        except ValueError:
            return not regular_fault(path)

    def in_folder(self, folder: Path, pattern: str = "*") -> list[Path]:
        """The files directly in ``folder`` whose names match ``pattern`` (sorted)."""
        folder = Path(folder)
        if folder in self._folders:
            found = self._folders[folder]
        else:
            try:
                folder.relative_to(self.root)
                return []
            except ValueError:
                pass
            try:
                found = sorted(folder / n for n in os.listdir(folder))
            except OSError:
                return []
            found = [p for p in found if not regular_fault(p)]
        return [p for p in found if fnmatch.fnmatch(p.name, pattern)]

    def glob(self, pattern: str) -> list[Path]:
        """Files anywhere under the root whose names match ``pattern`` (sorted)."""
        return [p for p in self.files if fnmatch.fnmatch(p.name, pattern)]

    def folders_named(self, name: str) -> list[Path]:
        """Folders called ``name`` that hold at least one file (sorted)."""
        return sorted({f.parent for f in self.files if f.parent.name == name})
