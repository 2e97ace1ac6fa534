"""The `curate` app: one command per stage, each in its own module of this package."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from med3dinsight.caption import caption_cmd
from med3dinsight.common import WorkdirOpt, new_app, out, run_console
from med3dinsight.explore import query_cmd, report_cmd, stats_cmd
from med3dinsight.lookup import lookup_cmd
from med3dinsight.rank import rank_cmd
from med3dinsight.release_export import export_cmd
from med3dinsight.slice import merge_cmd, slice_cmd

app = new_app("Curate 3D CT/MRI volumes into slice data: sample-data, slice, merge, rank, caption, export, query, stats, report, lookup.")


@app.command("sample-data")
def sample_data(
    workdir: Path = WorkdirOpt,
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder to write the sample dataset into, as given (relative: to the current folder); default: <workdir>/data/sample."),
    resolution: int = typer.Option(2, "--resolution", help="Voxel size in mm of the MNI152 template used (1 or 2; 1 is about 8x the voxels)."),
) -> None:
    """Build a small real dataset from volumes that installed packages ship (no download).

    nilearn's MNI152 T1 template with grey/white-matter masks as labels (an MSD task folder),
    nibabel's test MR volumes (MedicalNet-style images/ folder and list file) and DICOM from
    pydicom / pydicom-data. Use the 3dseg8/ folder with `--dataset 3dseg8` and dicom/ with
    `--dataset dicom`. A rerun leaves files that are already right alone.
    """
    from curation.sample.sample_data import default_out, make_sample_data

    roots = make_sample_data(out_dir if out_dir is not None else default_out(workdir), resolution=resolution)
    for name, root in roots.items():
        out.print(f"{name:8s} {root}", markup=False, highlight=False, soft_wrap=True)
    where = "" if workdir == Path(".") else f" --workdir {workdir}"
    out.print(f"next: curate slice --dataset 3dseg8 --root {roots['3dseg8']}{where}", markup=False, highlight=False,
              soft_wrap=True)


app.command("slice")(slice_cmd)
app.command("merge")(merge_cmd)
app.command("rank")(rank_cmd)
app.command("caption")(caption_cmd)
app.command("export")(export_cmd)
app.command("query")(query_cmd)
app.command("report")(report_cmd)
app.command("stats")(stats_cmd)
app.command("lookup")(lookup_cmd)


def run() -> None:
    """Console script `curate`: one line per fault, tracebacks with --debug."""
    run_console(app)


if __name__ == "__main__":  # pragma: no cover
    run()
