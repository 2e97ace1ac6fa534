"""A release manifest in the formats trainers already read: WebDataset shards or CSV.

Both follow open_clip_train: ``--dataset-type webdataset`` shards hold ``KEY.png`` (the slice),
``KEY.txt`` (its caption) and ``KEY.json`` (slice metadata, no patient data), with a
``sizes.json`` beside them so ``--train-num-samples`` can be left out; CSV files have
``filepath`` (absolute PNG path) and ``title`` (caption) columns, comma-separated (pass
``--csv-separator ,``; open_clip's default is a tab). One file set per split, rows in release
order, only the rows training may use (``usable_caption_rows``). Output is deterministic (tar
members carry no time or owner), so an export can be compared or checksummed.
"""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from curation.privacy.scrub import one_line
from curation.store.fsutil import atomic_path, atomic_write_text
from curation.store.layout import Workdir
from curation.store.manifest import read_manifest, release_manifests, resolve_manifest, usable_caption_rows
from curation.store.splits import SPLITS

FORMATS = ("webdataset", "csv")
META_COLUMNS = ("slice_id", "volume_id", "dataset", "modality", "body_region", "plane", "index", "position",
                "split", "caption_model", "prompt_version", "image_sha256")


@dataclass
class ExportResult:
    """What an export wrote: the folder, the files, rows per split, and rows skipped (one line each)."""

    manifest: Path
    out: Path
    files: list[Path] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def usage(self, fmt: str) -> str:
        """The open_clip_train flags that read this export: train data and, when the release has
        a val split, val data (open_clip's --val-data), with the sample counts webdataset needs."""
        n_train, n_val = self.rows.get("train", 0), self.rows.get("val", 0)
        if not n_train:
            return "no usable train rows in this release: nothing for open_clip_train to train on"
        if fmt == "csv":
            val = f"--val-data {self.out / 'val.csv'} " if n_val else ""
            return (f"--train-data {self.out / 'train.csv'} {val}"
                    "--csv-separator , --csv-img-key filepath --csv-caption-key title")
        flags = f"--dataset-type webdataset --train-data '{self.shards('train')}' --train-num-samples {n_train}"
        if n_val:
            flags += f" --val-data '{self.shards('val')}' --val-num-samples {n_val}"
        return flags

    def shards(self, split: str) -> Path:
        """The shards of ``split`` as one brace pattern (``train-{000000..000003}.tar``), as
        open_clip_train's --train-data / --val-data take them (one shard: its own name)."""
        names = sorted(p.name for p in self.files if p.name.startswith(f"{split}-") and p.name.endswith(".tar"))
        if len(names) == 1:
            return self.out / names[0]
        return self.out / f"{split}-{{000000..{len(names) - 1:06d}}}.tar"


def export_release(workdir: str | Path, manifest: str | Path | None = None, fmt: str = "webdataset",
                   out: str | Path | None = None, shard_size: int = 10_000) -> ExportResult:
    """Write a release as WebDataset shards or CSV files, one set per split.

    Args:
        workdir: the workdir.
        manifest: a release manifest (path or name such as ``v2``); None: the latest release.
        fmt: "webdataset" or "csv".
        out: output folder; None: ``exports/<release>-<fmt>/`` under the workdir.
        shard_size: samples per WebDataset shard.

    Raises:
        FileNotFoundError: no release manifest. ValueError: unknown format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format must be webdataset or csv, not {fmt!r}")
    wd = Workdir(workdir)
    if manifest is not None:
        path = resolve_manifest(workdir, manifest)
    else:
        releases = release_manifests(workdir)
        if not releases:
            raise FileNotFoundError(f"{wd.manifests}: no release manifest (run `curate caption` first)")
        path = releases[-1]
    df = read_manifest(path)
    df = df[usable_caption_rows(df)]
    result = ExportResult(manifest=path, out=Path(out) if out else wd.exports / f"{path.stem}-{fmt}")
    result.out.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    root = wd.root.resolve()
    for split, _ in SPLITS:
        rows = df[df["split"] == split]
        present = []
        for row in rows.to_dict("records"):
            image, problem = _inside_workdir(root, row.get("image_path"))
            if problem:
                result.errors.append(f"{one_line(row.get('slice_id'), 120)}: {problem}; left out")
            else:
                present.append((row, image))
        result.rows[split] = len(present)
        if fmt == "csv":
            result.files.append(_write_csv(result.out / f"{split}.csv", present))
        else:
            for i in range(0, len(present), shard_size):
                shard = result.out / f"{split}-{i // shard_size:06d}.tar"
                chunk = present[i : i + shard_size]
                result.files.append(_write_shard(shard, chunk, start=i))
                sizes[shard.name] = len(chunk)
    if fmt == "webdataset":
        atomic_write_text(result.out / "sizes.json", json.dumps(sizes, indent=1))
    return result


def _inside_workdir(root: Path, value: object) -> tuple[Path, str]:
    """The slice PNG ``value`` names (relative to the workdir), resolved, or why it is refused:
    an absolute path, ``..`` or a link leading out of the workdir, a missing or special file."""
    if not isinstance(value, str) or not value.strip():
        return root, "no image_path"
    rel = Path(value)
    if rel.is_absolute() or ".." in rel.parts:
        return root, "image_path is not inside the workdir (absolute or '..'); refused"
    image = (root / rel).resolve()
    if image != root and root not in image.parents:
        return root, "image_path leads outside the workdir (a link); refused"
    try:
        st = os.stat(image)
    except OSError:
        return root, f"slice PNG {one_line(value, 200)} missing"
    if not stat.S_ISREG(st.st_mode):
        return root, f"slice PNG {one_line(value, 200)} is not a regular file; refused"
    return image, ""


def _write_csv(path: Path, present: list[tuple[dict, Path]]) -> Path:
    table = pd.DataFrame({"filepath": [str(image.resolve()) for _, image in present],
                          "title": [row["caption"] for row, _ in present],
                          "slice_id": [row["slice_id"] for row, _ in present]})
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path


def _write_shard(path: Path, chunk: list[tuple[dict, Path]], start: int) -> Path:
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for n, (row, image) in enumerate(chunk, start=start):
            key = f"{n:08d}"  # no dots: WebDataset splits a member name at its first dot
            meta = {c: _plain(row.get(c)) for c in META_COLUMNS if c in row}
            for suffix, data in (("png", image.read_bytes()), ("txt", str(row["caption"]).encode()),
                                 ("json", json.dumps(meta, sort_keys=True).encode())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return path


def _plain(value: object) -> object:
    """JSON-safe scalars (numpy numbers and NaN become plain numbers and null)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value
