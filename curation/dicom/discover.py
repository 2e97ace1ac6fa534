"""Find the DICOM series under a folder at header speed: headers only, in parallel, cached.

Each file's head is read once (`curation.dicom.scan`; pydicom, stopping before the pixel data,
for what the scanner does not handle) into a small `Header`, in worker processes from 400 files
up; a header index (`curation.dicom.index`, keyed by path, size and mtime) lets a rerun skip even
that. A file that is not an image, whose declared frames cannot be in its pixel data, or that
cannot be read at all is one line in ``skipped``; nothing about one file stops the others. Files of
one SeriesInstanceUID are split into parts (`curation.dicom.parts`) and the series policy
decides which parts become volumes. Localizers, secondary captures and dose reports are set
aside with a reason, not loaded.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from curation.dicom.header import (
    FrameKey,
    Header,
    Identity,
    Skip,
    frame_geometry,
    identity,
    n_frames,
    quiet,
    read_dataset,
    read_header,
    reason,
    skip_kind,
    text,
)
from curation.dicom.index import HeaderIndex
from curation.dicom.mosaic import mosaic_images
from curation.dicom.parts import choose_parts, frame_parts, split_parts
from curation.dicom.scan import IDENTITY_TAGS, Fallback, Lite
from curation.dicom.series import DicomSeries, SeriesList, series_key
from curation.imageio.files import walk_files
from curation.imageio.volume_io import VolumeError

PARALLEL_MIN_FILES = 400  # below this, starting worker processes costs more than it saves
CHUNK = 200
Read = tuple[Path, "Header | None", "Identity | None", str, str]  # path, header, identity, skip, sop


def _sop_hash(sop: str) -> str:
    return hashlib.sha256(sop.encode()).hexdigest()[:24] if sop else ""


def _group(ds: Dataset, path: Path) -> str:
    uid = text(ds, "SeriesInstanceUID")
    return series_key(uid) if uid else series_key(f"no-series-uid:{path.parent}")


def summarize(path: Path, ds: Dataset, group: str) -> Header:
    """The cacheable summary of one file (``group``: its series' hashed UID)."""
    frames = []
    for fr in frame_geometry(ds):
        parts, order = frame_parts(ds, fr.frame)
        frames.append(FrameKey(fr.frame, None if fr.position is None else tuple(map(float, fr.position)),
                               None if fr.orientation is None else tuple(map(float, fr.orientation)),
                               parts, order))
    return Header(path=path, group=group, size=(int(ds.Rows), int(ds.Columns)),
                  modality=text(ds, "Modality") or None, n_frames=n_frames(ds), skip=skip_kind(ds),
                  mosaic=mosaic_images(ds), frames=tuple(frames))


@quiet
def _read_one(path: Path, fast: bool = True) -> Read:
    """(path, header, identity, "" or why it is not used, hashed SOP UID) of one file; never raises."""
    try:
        if fast:
            ds = read_dataset(path, pixels=False)
        else:
            ds, fault = read_header(path, fast=False)
            if fault:
                raise Skip(fault)
        try:
            header = summarize(path, ds, _group(ds, path))
            return path, header, _identity(ds), "", _sop_hash(text(ds, "SOPInstanceUID"))
        except Fallback:
            raise
        except Exception as exc:  # malformed values surface only when converted
            return path, None, None, f"bad header values ({reason(exc)})", ""
    except Skip as why:
        return path, None, None, str(why), ""
    except Fallback:  # the scan lacked something this file needs: read it with pydicom
        return _read_one(path, fast=False) if fast else (path, None, None, "unreadable DICOM (scan)", "")
    except Exception as exc:  # one odd file (a name, a permission, a decoder) never stops discovery
        return path, None, None, f"unreadable ({reason(exc)})", ""


_IDENTITIES: dict[tuple, Identity] = {}  # raw identity values -> Identity, per process


def _identity(ds: Any) -> Identity:
    """`identity` of ``ds``, decoded once per distinct set of raw values (the files of a series share them)."""
    if not isinstance(ds, Lite):
        return identity(ds)
    key = ds.key(IDENTITY_TAGS)
    who = _IDENTITIES.get(key)
    if who is None:
        if len(_IDENTITIES) >= 4096:
            _IDENTITIES.clear()
        who = _IDENTITIES[key] = identity(ds)
    return who


def _read_chunk(paths: list[Path]) -> list[Read]:
    return [_read_one(p) for p in paths]


def _list_files(root: Path, problems: list[tuple[Path, str]]) -> list[Path]:
    """Every regular file under ``root`` (hidden ones aside), by the one walk every source uses: no
    link out of ``root`` is followed, and FIFOs, devices, undecodable names and folders that cannot
    be listed go to ``problems`` (one line each) instead of hanging or stopping the run."""
    found = walk_files(root, problems, keep_undecodable=True)
    if root.is_file():
        return found
    return [p for p in found if not any(x.startswith(".") for x in p.relative_to(root).parts)]


def _read_all(paths: list[Path], index: HeaderIndex, workers: int) -> Iterable[tuple[Read, bool]]:
    """Every file's (read, came from the index), cached ones first read from the index."""
    todo = []
    for path in paths:
        try:
            st = path.stat()
        except OSError as exc:
            yield (path, None, None, f"unreadable ({reason(exc)})", ""), False
            continue
        cached = index.get(path, st)
        if cached is None:
            todo.append((path, st))
        else:
            header, skip, sop = cached
            yield (path, header, None, skip, sop), True
    chunks = [todo[i:i + CHUNK] for i in range(0, len(todo), CHUNK)]
    stats = {p: st for p, st in todo}
    if workers > 1 and len(todo) >= PARALLEL_MIN_FILES:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(_read_chunk, [[p for p, _ in c] for c in chunks])
            for chunk in results:
                yield from _store(chunk, stats, index)
    else:
        for c in chunks:
            yield from _store(_read_chunk([p for p, _ in c]), stats, index)


def _store(chunk: list[Read], stats: dict, index: HeaderIndex) -> Iterable[tuple[Read, bool]]:
    for read in chunk:
        path, header, _, skip, sop = read
        if header is not None or not skip.startswith(("unreadable", "bad header")):
            index.put(path, stats[path], header, skip, sop)  # failed reads are retried next time
        yield read, False


def _merge(a: Identity | None, b: Identity) -> Identity:
    if a is None:
        return b
    return Identity(a.tokens | b.tokens, a.identifiers | b.identifiers, min(a.patient, b.patient) or a.patient
                    or b.patient, a.description or b.description, a.number or b.number)


@quiet
def find_series(root: str | Path, series_parts: str = "anatomical", cache_dir: Path | None = None,
                id_key: bytes | None = None, workers: int | None = None) -> SeriesList:
    """Group the DICOM images under ``root`` into series and their parts, reading headers only.

    Args:
        root: a folder (searched recursively) or one file.
        series_parts: which parts of a split series become volumes: ``all``, ``first`` or
            ``anatomical`` (first time point of fMRI/DWI/perfusion, every part of anatomical,
            multi-echo or Dixon series); see `curation.dicom.parts.choose_parts`.
        cache_dir: where the header index lives (None: no index).
        id_key: the workdir's key, so index keys are keyed hashes of the paths.
        workers: processes reading headers (default: the CPUs, at most 8).

    Non-DICOM files, DICOMDIRs, objects without pixel data, unreadable files and duplicate
    SOP instances end up in ``result.skipped``; localizers, secondary captures and dose
    reports in ``result.skipped_series``.
    """
    root = Path(root)
    if not root.exists():
        raise VolumeError(f"{root}: no such file or folder")
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    index = HeaderIndex(cache_dir, id_key)
    result = SeriesList()
    headers: list[Header] = []
    groups: dict[str, list[int]] = {}
    people: dict[str, Identity] = {}
    seen: set[str] = set()
    try:
        for (path, header, who, skip, sop), _cached in _read_all(_list_files(root, result.skipped), index, workers):
            if header is None:
                result.skipped.append((path, skip))
                continue
            if sop and sop in seen:
                result.skipped.append((path, "duplicate of another file (same SOPInstanceUID)"))
                continue
            seen.add(sop)
            groups.setdefault(header.group, []).append(len(headers))
            headers.append(header)
            if who is not None:
                people[header.group] = _merge(people.get(header.group), who)
    finally:
        index.close()
    for group, members in groups.items():
        members.sort(key=lambda n: str(headers[n].path))
        who = people.get(group) or _identity_of(headers[members[0]].path)
        _add_series(result, group, [headers[n] for n in members], who, series_parts)
    result.sort(key=lambda s: (str(s.files[0]), s.part_index))
    result.skipped_series.sort(key=lambda sr: str(sr[0].files[0]))
    return result


def _identity_of(path: Path) -> Identity:
    """Identity of a series whose headers came from the index (one header read per series)."""
    try:
        return identity(read_dataset(path, pixels=False))
    except Skip:
        return Identity(frozenset(), frozenset(), "", "", "")


def _add_series(result: SeriesList, group: str, members: list[Header], who: Identity, policy: str) -> None:
    def series(files: list[Header], key: str, **kw) -> DicomSeries:
        return DicomSeries(files=[h.path for h in files], series_key=key, modality=files[0].modality,
                           description=who.description, number=who.number,
                           n_frames=sum(h.n_frames for h in files), patient_tokens=sorted(who.tokens),
                           identifiers=sorted(who.identifiers), patient_key=who.patient,
                           rows=files[0].size[0], cols=files[0].size[1], **kw)

    images = [h for h in members if not h.skip]
    if not images:
        result.skipped_series.append((series(members, series_key(f"{group}#skipped")), members[0].skip))
        return
    units = [(n, fk) for n, h in enumerate(images) for fk in h.frames]
    parts = split_parts(images, units)
    for n in choose_parts(parts, policy):
        part = parts[n]
        order = sorted({h for h, _ in part.units})
        chosen: dict[int, list[int]] = {h: [] for h in order}
        for h, fk in part.units:
            chosen[h].append(fk.frame)
        frames = [None if len(chosen[h]) == len(images[h].frames) else tuple(sorted(chosen[h])) for h in order]
        files = [images[h] for h in order]
        # one part keeps the key of the whole series (ids of unsplit series do not change)
        key = group if len(parts) == 1 else series_key(f"{group}#{part.label}")
        made = series(files, key, part=part.label, part_index=n + 1, n_parts=len(parts),
                      frames=None if all(f is None for f in frames) else frames)
        if made.frames is not None:
            made.n_frames = sum(len(chosen[h]) for h in order)
        result.append(made)
