"""DuckDB over the Parquet manifests: `curate query` and `curate stats`."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pandas as pd

from curation.store.layout import Workdir
from curation.store.manifest import release_manifests

READ_ONLY_STATEMENTS = {"SELECT"}  # WITH ... SELECT, DESCRIBE, SHOW and SUMMARIZE parse as SELECT


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def locked_down(con: duckdb.DuckDBPyConnection, readable: list[Path] | tuple = ()) -> duckdb.DuckDBPyConnection:
    """No file, network or extension access from SQL any more (``readable`` files excepted),
    and no way to change that back: DuckDB's ``enable_external_access=false`` and
    ``lock_configuration=true``."""
    if readable:
        con.execute(f"SET allowed_paths = [{', '.join(_quote(str(p)) for p in readable)}]")
    for setting in ("autoinstall_known_extensions", "autoload_known_extensions", "enable_external_access"):
        con.execute(f"SET {setting} = false")
    con.execute("SET lock_configuration = true")
    return con


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """``sql`` must be one query (SELECT, WITH ... SELECT, DESCRIBE, SHOW, SUMMARIZE); ValueError
    (one line) for anything else: several statements, COPY, ATTACH, INSTALL/LOAD, PRAGMA, SET,
    CREATE, INSERT, EXPORT ..."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise ValueError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    if len(statements) != 1:
        raise ValueError(f"curate query runs one SELECT statement, got {len(statements)} statements")
    kind = str(statements[0].type).rsplit(".", 1)[-1]
    if kind not in READ_ONLY_STATEMENTS:
        raise ValueError(f"curate query is read-only: {kind} statements are refused (use SELECT ... FROM volumes, "
                         "slices, captions)")


def connect(workdir: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with views ``volumes``, ``slices`` and ``captions`` (latest release),
    locked down: SQL can read these manifests and nothing else on the machine."""
    con = duckdb.connect(":memory:")
    wd = Workdir(workdir)
    views = {"volumes": wd.volumes_manifest, "slices": wd.slices_manifest}
    releases = release_manifests(workdir)
    if releases:
        views["captions"] = releases[-1]
        for p in releases:
            views[p.stem] = p
    cache_pq = wd.caption_table
    if cache_pq.exists():
        views["caption_cache"] = cache_pq
    readable = []
    for name, path in views.items():
        if path.exists():
            real = Path(path).resolve()
            readable.append(real)
            con.execute(f"CREATE VIEW \"{name}\" AS SELECT * FROM read_parquet({_quote(str(real))})")
    return locked_down(con, sorted(set(readable)))


def run_query(workdir: Path, sql: str) -> pd.DataFrame:
    """The result of one read-only query (`check_read_only`) over the manifests."""
    con = connect(workdir)
    try:
        check_read_only(con, sql)
        return con.execute(sql).df()
    finally:
        con.close()


def format_frame(df: pd.DataFrame, fmt: str, out: Path | None = None) -> str:
    """Render a result as table|csv|json; parquet needs ``out``."""
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        return df.to_json(orient="records", lines=True, default_handler=str)
    if fmt == "parquet":
        if out is None:
            raise ValueError("--format parquet needs --output FILE")
        out.parent.mkdir(parents=True, exist_ok=True)
        df.to_parquet(out, index=False)
        return f"wrote {len(df)} rows to {out}"
    if fmt == "table":
        with pd.option_context("display.max_rows", 200, "display.max_columns", 50, "display.width", 200):
            return df.to_string(index=False) if len(df) else "(no rows)"
    raise ValueError(f"unknown format {fmt!r}; choose table, csv, json or parquet")


def _du(path: Path) -> int:
    total = 0
    if not path.exists():
        return 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def stats(workdir: Path) -> dict[str, pd.DataFrame | dict]:
    """Counts per dataset/modality/plane, errors, and disk used per workdir folder."""
    con = connect(workdir)
    out: dict[str, pd.DataFrame | dict] = {}
    names = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    if "volumes" in names:
        out["volumes"] = con.execute(
            "SELECT dataset, subset, modality, status, count(*) AS volumes FROM volumes GROUP BY ALL ORDER BY ALL"
        ).df()
        out["errors"] = con.execute("SELECT volume_id, error FROM volumes WHERE status <> 'ok' ORDER BY 1").df()
    if "slices" in names:
        out["slices"] = con.execute(
            "SELECT v.dataset, v.modality, s.plane, count(*) AS slices FROM slices s "
            "JOIN volumes v USING (volume_id) GROUP BY ALL ORDER BY ALL"
        ).df()
    if "captions" in names:
        out["captions"] = con.execute("SELECT split, count(*) AS captions FROM captions GROUP BY ALL ORDER BY ALL").df()
    con.close()
    out["disk"] = {name: _du(path) for name, path in Workdir(workdir).disk_folders().items()}
    return out
