"""`curate lookup`: a pseudonymous id back to its real source, from the workdir's private map."""

from __future__ import annotations

from pathlib import Path

import typer

from med3dinsight.common import WorkdirOpt, fail, out


def lookup_cmd(
    ident: str = typer.Argument(..., help="A volume_id, case_id or input-... id from a manifest, report or log line."),
    workdir: Path = WorkdirOpt,
) -> None:
    """Show the real source path(s) behind a pseudonymous id (reads private/source_map.jsonl).

    The output holds real paths, which may carry patient identifiers: keep it private.
    """
    from curation.privacy.private_map import PrivateMap
    from curation.store.layout import Workdir

    pmap = PrivateMap(workdir)
    if not pmap.path.exists():
        raise fail(f"{Workdir(workdir).private_map}: no private map (nothing pseudonymised in this workdir)", 1)
    entries = pmap.lookup(ident)
    if not entries:
        raise fail(f"{ident}: not in {pmap.path}", 1)
    for e in entries:
        out.print(f"{e.get('id')}\tcase {e.get('case_id')}\t{e.get('source')}"
                  + (f"\tlabel {e['label']}" if e.get("label") else "")
                  + (f"\tseries {e['series_key']}" if e.get("series_key") else ""),
                  markup=False, highlight=False, soft_wrap=True)
