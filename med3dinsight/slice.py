"""`curate slice` and `curate merge`: volumes -> preprocessed arrays + slice manifests."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from curation.slicing.config import PreprocessConfig as P
from curation.slicing.config import SliceConfig as S
from curation.sources import DATASETS
from med3dinsight.common import WorkdirOpt, console, default_of, fail, option, out, say
from med3dinsight.common import progress_bar as _progress


def _fail(exc: BaseException, code: int = 2) -> typer.Exit:
    """One plain-text line (paths and hints like ``[ray]`` are not markup), then exit ``code``.
    Ray's connection errors run to several lines; the first says what happened."""
    say((str(exc).strip().splitlines() or [type(exc).__name__])[0], "error", "red")
    return typer.Exit(code)


def slice_cmd(
    dataset: str = typer.Option(..., "--dataset", help="Layout of --root: 3dseg8 (MSD task folders, LiTS/BraTS/MedicalNet layouts, anything else by the nifti rules) | nifti (any folder of NIfTI files) | dicom (any tree of DICOM series; always pseudonymised) | msd (one Decathlon task folder)."),
    root: Path = typer.Option(..., "--root", help="Folder holding the dataset (must exist); nothing outside it is read.", exists=True, file_okay=False),
    workdir: Path = WorkdirOpt,
    grid_size: int = option(P, "grid_size", help="Side in voxels of the cubic training volume (volumes/<id>/volume.npy is N^3; paper: 128); slice indices run 0..N-1."),
    spacing: float = option(P, "spacing", help="Finest display-volume voxel size in mm: finer source axes shrink to it, coarser ones are kept as acquired."),
    min_foreground: float = option(S, "min_foreground", help="Index only slices whose body (foreground) fraction is at least this, from 0 to 1; others get no row."),
    ct_window: str = typer.Option(",".join(f"{v:g}" for v in default_of(P, "ct_window")), "--ct-window", help="LOW,HIGH in Hounsfield units mapped to [0,1] for CT training volumes (MR uses the foreground's 0.5-99.5th percentiles)."),
    label_root: Optional[Path] = typer.Option(None, "--label-root", help="nifti: folder of label files matched to the images by name (default: a sibling labels/ folder, <stem>_seg files, or a case folder's one segmentation file)."),
    workers: int = option(S, "workers", help="Worker processes (with --executor ray and no --ray-address: the CPUs of the local Ray)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: process only every n-th volume from i (then `curate merge`); auto: this SLURM array task's (SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT)."),
    executor: str = typer.Option("local", "--executor", help="local: this machine (--workers processes); ray: one Ray task per volume (pip install 'med3dinsight[ray]'). See docs/cluster.md."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="--executor ray: the cluster to join (auto: the one `ray start --head` made; ray://host:10001); default: start a local Ray."),
    render_all: bool = option(S, "render_all", help="Render every slice PNG now (tens of GB on a full 3DSeg-8)."),
    render_size: int = option(S, "render_size", help="Side in pixels of the slice PNGs that --render-all writes now (cache/png/<size>/)."),
    strict: bool = option(S, "strict", help="Exit non-zero if any volume failed (default: only when none succeeded)."),
    modality: Optional[str] = option(S, "modality", help="Force the modality of every volume (CT, MR); default: dataset.json, DICOM header, known sub-datasets, then a guess."),
    body_region: Optional[str] = option(S, "body_region", help="Force the body region (brain, head, chest, abdomen, pelvis, heart)."),
    pseudonymize: bool = option(S, "pseudonymize", help="Keyed pseudonymous ids only in manifests, records, reports and logs; real paths go to private/source_map.jsonl (always on for --dataset dicom). See `curate lookup`."),
    max_voxels: int = option(S, "max_voxels", help="Refuse a source whose header declares more voxels than this, before reading it (0: no limit)."),
    series_parts: str = option(S, "series_parts", help="all | first | anatomical: which parts of a split DICOM series (echoes, magnitude/phase, diffusion, time points) become volumes; anatomical keeps every echo/image type of a series and the first volume of fMRI/DWI/perfusion time series."),
) -> None:
    """Load volumes, preprocess them (RAS, isotropic, [0,1], cube, grid^3) and index every slice.

    Writes volumes/<id>/ (volume.npy, label.npy, display.npy.zst) and manifests/volumes.parquet
    + manifests/slices.parquet. A rerun skips finished volumes. The same per-volume work runs
    here (--executor local) or on Ray (--executor ray); on SLURM, one --shard auto per array
    task (docs/cluster.md). Bad files get one line each and a status=error row; the exit status
    is non-zero only when nothing succeeded (with --shard: when the dataset has no volumes at
    all), or with --strict when anything failed.
    """
    if dataset not in DATASETS:  # before any worker starts or progress bar shows
        close = difflib.get_close_matches(dataset, DATASETS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise fail(f"--dataset {dataset!r}: unknown dataset; choose from {', '.join(DATASETS)}{hint}", 2)
    from curation.slicing.prestart import start_slice_workers

    start_slice_workers(workers, executor)  # the workers' imports, beside this process's own
    from curation.slicing.preprocess import PreprocessConfig
    from curation.slicing.stage import SliceConfig, make_executor, parse_shard, run_slice

    try:
        lo, hi = (float(v) for v in ct_window.split(","))
    except ValueError:
        raise typer.BadParameter("--ct-window takes LOW,HIGH in HU, e.g. -1000,1000") from None
    if series_parts not in ("all", "first", "anatomical"):
        raise typer.BadParameter("--series-parts takes all, first or anatomical")
    try:
        shard_in = parse_shard(shard)
        where = make_executor(executor, workers, ray_address)
    except (ValueError, ImportError) as exc:
        raise _fail(exc) from None
    cfg = SliceConfig(
        workdir=workdir,
        pre=PreprocessConfig(grid_size=grid_size, spacing=spacing, ct_window=(lo, hi)),
        min_foreground=min_foreground,
        workers=workers,
        shard=shard_in,
        render_all=render_all,
        render_size=render_size,
        strict=strict,
        modality=modality,
        body_region=body_region,
        pseudonymize=pseudonymize,
        max_voxels=max_voxels or None,
        series_parts=series_parts,
    )
    with _progress() as progress:
        task = progress.add_task("slicing", total=None, note="")

        def on_progress(done: int, total: int, name: str) -> None:
            progress.update(task, completed=done, total=total, note=name[-40:])

        try:
            summary = run_slice(dataset, root, cfg, label_root=label_root, on_progress=on_progress, log=say,
                                executor=where)
        except (FileNotFoundError, ValueError, ConnectionError) as exc:
            raise _fail(exc) from None
    table = Table(title="curate slice", show_header=False)
    table.add_row("processed", str(summary.processed))
    table.add_row("resumed (already done)", str(summary.skipped))
    table.add_row("errors", str(summary.errors))
    if cfg.shard is not None:  # the shard's own manifest
        table.add_row("slices indexed (this shard)", str(summary.slices))
    else:
        table.add_row("slices indexed (this run)", str(summary.run_slices))
        table.add_row("slices in the workdir (all datasets)", str(summary.slices))
    rate = summary.processed / summary.seconds if summary.seconds > 0 else 0.0
    table.add_row("time", f"{summary.seconds:.1f} s ({rate:.2f} volumes/s)")
    table.add_row("volumes manifest", str(summary.volumes_path))
    table.add_row("slices manifest", str(summary.slices_path))
    out.print(table)
    ok = summary.processed + summary.skipped
    if ok + summary.errors == 0:
        if cfg.shard is None or summary.discovered == 0:
            console.print(f"[red]error:[/red] {root}: no {dataset} volumes found (check --dataset and --root)")
            raise typer.Exit(1)
        console.print(f"shard {cfg.shard[0]}/{cfg.shard[1]}: no volumes of the {summary.discovered} found fall in this shard")
    if strict and summary.errors:
        raise typer.Exit(1)
    # A shard whose few volumes all failed is no failed job: its error rows are recorded, and
    # failing would hold back the `curate merge` that waits on every shard (afterok).
    if ok == 0 and cfg.shard is None:
        raise typer.Exit(1)


def merge_cmd(workdir: Path = WorkdirOpt) -> None:
    """Combine the shard manifests written by `curate slice --shard i/n` into the main manifests."""
    from curation.slicing.stage import merge_shards

    try:
        vp, sp, nv, ns = merge_shards(workdir, log=say)
    except FileNotFoundError as exc:
        raise _fail(exc) from None
    out.print(f"merged {nv} volumes -> {vp}\nmerged {ns} slices -> {sp}")
