"""Files that are safe to open: regular files whose names are text, found without following a
link out of the root they were asked under (`walk_files`), and `check_regular` before any open
(a FIFO where a volume, a companion .hdr/.img or a label is expected would block forever)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from curation.privacy.scrub import one_line

Problems = list[tuple[Path, str]]


def shown(path: str | os.PathLike) -> str:
    """``path`` as one printable line (undecodable bytes as \\xNN, control characters escaped)."""
    return one_line(os.fspath(path))


def is_text_name(name: str) -> bool:
    """Whether a file name is valid UTF-8 (os functions give undecodable bytes as surrogates)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def special_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "not a regular file"


def regular_fault(path: str | os.PathLike) -> str:
    """Why ``path`` cannot be read as a file ("" when it is a regular file): missing, a broken
    link, a FIFO, a socket, a device, a folder. Never opens it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "a broken link" if os.path.islink(path) else "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror or type(exc).__name__})"
    return "" if stat.S_ISREG(st.st_mode) else f"{special_kind(st.st_mode)}, not a regular file"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def walk_files(root: str | os.PathLike, problems: Problems | None = None, keep_undecodable: bool = False) -> list[Path]:
    """Every regular file under ``root`` (sorted), found without following links out of it.

    One (path, reason) in ``problems`` for each thing set aside: a link (to a file or folder)
    that leads outside ``root`` (not followed: its target never appears), a name that is not
    valid UTF-8 (named with its bytes escaped), a FIFO, socket or device, a broken link. Links
    to folders inside ``root`` are not followed either (their files are found where they are).
    ``keep_undecodable``: files whose name is not valid UTF-8 are kept (DICOM: the name never
    reaches an output, only the file's content does) instead of set aside.
    """
    problems = problems if problems is not None else []
    top = os.path.realpath(root)
    out: list[Path] = []
    if os.path.isfile(root):
        fault = regular_fault(root)
        if fault:
            problems.append((Path(shown(root)), f"{fault}; skipped"))
            return []
        return [Path(root)]
    for folder, dirs, names in os.walk(root, followlinks=False, onerror=lambda exc: problems.append(
            (Path(shown(exc.filename or root)), f"unreadable folder ({exc.strerror or type(exc).__name__}); skipped"))):
        keep = []
        for d in sorted(dirs):
            path = os.path.join(folder, d)
            if not is_text_name(d):
                problems.append((Path(shown(path)), "folder name is not valid UTF-8; skipped (rename it)"))
            elif os.path.islink(path):
                if not _inside(os.path.realpath(path), top):
                    problems.append((Path(path), "link to a folder outside --root; not followed"))
            else:
                keep.append(d)
        dirs[:] = keep
        for name in sorted(names):
            path = os.path.join(folder, name)
            if not is_text_name(name) and not keep_undecodable:
                problems.append((Path(shown(path)), "file name is not valid UTF-8; skipped (rename it)"))
                continue
            if os.path.islink(path) and not _inside(os.path.realpath(path), top):
                problems.append((Path(path), "link to a file outside --root; not followed"))
                continue
            fault = regular_fault(path)
            if fault:
                problems.append((Path(path), f"{fault}; skipped"))
                continue
            out.append(Path(path))
    return sorted(out)
