"""The index page's training section: every run found under ``checkpoints/``.

- ``checkpoints/<stage>/**/metrics.jsonl`` (clip, pretrain, finetune; ``--name`` runs in their
  own folders): loss and learning-rate curves, held-out metric curves, and the last value of
  every held-out metric in a table with its controls (``<key>_blank``, ``<key>_shuffled``) and
  chance level (``..._chance@k``) beside it when the run logged them.
- ``checkpoints/finetune/<name>/metrics.json``: the test results per fine-tuning run (Dice, or
  accuracy and AUC), compared in one chart.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from curation.report.common import esc
from curation.report.svg import bar_chart, line_chart

CONTROLS = ("blank", "shuffled")
MAX_RUNS = 40


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(float(v)) else None


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The rows of a metrics.jsonl and how many lines were unreadable."""
    rows, bad = [], 0
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return [], 1
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows, bad


def find_runs(checkpoints: Path) -> list[tuple[str, str, Path]]:
    """(stage, run name, folder) of every folder holding metrics.jsonl or metrics.json."""
    if not checkpoints.is_dir():
        return []
    folders = sorted({p.parent for pat in ("metrics.jsonl", "metrics.json") for p in checkpoints.rglob(pat)})
    out = []
    for folder in folders:
        rel = folder.relative_to(checkpoints).parts
        if not rel:
            continue
        out.append((rel[0], "/".join(rel[1:]) or "(default)", folder))
    return out[:MAX_RUNS]


def _short(key: str) -> str:
    """A legend name: held-out keys without their ``val/`` prefix."""
    return key[4:] if key.startswith("val/") else key


def _series(rows: list[dict[str, Any]], keys: list[str]) -> dict[str, tuple[list[float], list[float]]]:
    out: dict[str, tuple[list[float], list[float]]] = {}
    for k in keys:
        xs, ys = [], []
        for i, r in enumerate(rows):
            y = _num(r.get(k))
            if y is None:
                continue
            x = _num(r.get("step"))
            xs.append(x if x is not None else float(i))
            ys.append(y)
        if ys:
            out[_short(k)] = (xs, ys)
    return out


def _base(key: str) -> str:
    for c in CONTROLS:
        if key.endswith("_" + c):
            return key[: -len(c) - 1]
    return key


def _chance_key(key: str, keys: set[str]) -> str | None:
    m = re.match(r"(.*?)_R@(\d+)$", key)
    if not m:
        return None
    cand = f"{m.group(1)}_chance@{m.group(2)}"
    return cand if cand in keys else None


def last_values(rows: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and _num(v) is not None:
                out[k] = float(v)
    return out


def metric_table(last: dict[str, float]) -> str:
    """Held-out metrics (``val/``, ``test/``, retrieval ``_R@k`` ...) with controls and chance."""
    held = {k: v for k, v in last.items() if "/" in k or "_R@" in k}
    bases = sorted({_base(k) for k in held if "chance@" not in k})
    if not bases:
        return ""
    has_ctrl = {c: any(f"{b}_{c}" in held for b in bases) for c in CONTROLS}
    has_chance = any(_chance_key(b, set(held)) for b in bases)
    head = "<tr><th>metric (last value)</th><th>value</th>" + "".join(
        f"<th>_{c} control</th>" for c in CONTROLS if has_ctrl[c]) + ("<th>chance</th>" if has_chance else "") + "</tr>"
    rows = []
    for b in bases:
        if b not in held:
            continue
        cells = [f"<td>{esc(b)}</td><td>{held[b]:.4g}</td>"]
        for c in CONTROLS:
            if has_ctrl[c]:
                v = held.get(f"{b}_{c}")
                cells.append(f"<td>{'–' if v is None else format(v, '.4g')}</td>")
        if has_chance:
            ck = _chance_key(b, set(held))
            cells.append(f"<td>{'–' if ck is None else format(held[ck], '.4g')}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>" + head + "".join(rows) + "</table>"


def run_charts(rows: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for r in rows for k, v in r.items() if k != "step" and _num(v) is not None})
    charts = []
    losses = [k for k in keys if "loss" in k.lower() and "/" not in k]
    if losses:
        charts.append(line_chart("Training loss", _series(rows, losses), ylabel="loss"))
    val_losses = [k for k in keys if "loss" in k.lower() and "/" in k]
    if val_losses:
        charts.append(line_chart("Held-out loss", _series(rows, val_losses), ylabel="loss"))
    if "lr" in keys:
        charts.append(line_chart("Learning rate", _series(rows, ["lr"]), ylabel="lr"))
    recall = [k for k in keys if re.search(r"_R@1$", _base(k)) and "chance" not in k]
    if recall:
        main = sorted({_base(k) for k in recall})[:4]
        shown = [k for b in main for k in [b, *(f"{b}_{c}" for c in CONTROLS)] if k in keys]
        shown += [ck for b in main if (ck := _chance_key(b, set(keys)))]
        series = _series(rows, shown)
        if any(len(xs) > 1 for xs, _ in series.values()):  # one evaluation: the bar chart below says it
            dashed = [_short(k) for k in shown if k != _base(k) or "chance" in k]
            charts.append(line_chart("Held-out recall@1", series, ylabel="recall", dashed=dashed,
                                     caption="dashed: _blank / _shuffled controls and chance" if dashed else ""))
    controlled = sorted({_base(k) for k in keys if _base(k) != k and "_R@" in k})[:6]
    if controlled:
        last = last_values(rows)
        cols = ["value", *(f"_{c}" for c in CONTROLS), "chance"]
        vals = [[last.get(b, 0.0), *(last.get(f"{b}_{c}", 0.0) for c in CONTROLS),
                 last.get(_chance_key(b, set(keys)) or "", 0.0)] for b in controlled]
        charts.append(bar_chart("Retrieval against its controls", [(b.split("/")[-1], v[0]) for b, v in zip(controlled, vals)],
                                ylabel="recall (last evaluation)", series=cols, values=vals,
                                caption="_blank: an all-zero volume as query; _shuffled: another subject's volume; "
                                        "a result near its controls does not depend on the volume"))
    other = [k for k in keys if "/" in k and "loss" not in k.lower() and "_R@" not in k and "chance" not in k
             and not k.startswith(("val/n_", "test/n_")) and "median_rank" not in k][:4]
    if other:
        charts.append(line_chart("Other held-out metrics", _series(rows, other), ylabel="value"))
    return charts


def _finetune_headline(metrics: dict[str, Any]) -> tuple[str, float | None]:
    test = metrics.get("test") if isinstance(metrics.get("test"), dict) else {}
    for key in ("dice_mean", "accuracy", "auc"):
        v = _num(test.get(key))
        if v is not None:
            return key, v
    return "", None


def finetune_table(runs: list[tuple[str, dict[str, Any]]]) -> str:
    if not runs:
        return ""
    head = ("<tr><th>run</th><th>task</th><th>encoder</th><th>init</th><th>train fraction</th><th>steps</th>"
            "<th>dice_mean</th><th>accuracy</th><th>auc</th><th>per class</th><th>n train / test</th></tr>")
    rows, bars = [], []
    for name, m in runs:
        test = m.get("test") if isinstance(m.get("test"), dict) else {}
        per = test.get("dice") if isinstance(test.get("dice"), dict) else {}
        per_text = ", ".join(f"{esc(k)}: {'–' if _num(v) is None else format(float(v), '.3f')}" for k, v in sorted(per.items()))
        def cell(key: str) -> str:
            v = _num(test.get(key))
            return "–" if v is None else f"{v:.3f}"
        init = str(m.get("init", "–"))
        rows.append(f"<tr><td>{esc(name)}</td><td>{esc(m.get('task', '–'))}</td><td>{esc(m.get('encoder', '–'))}</td>"
                    f"<td>{esc(Path(init).name if '/' in init else init)}</td><td>{esc(m.get('train_fraction', '–'))}</td>"
                    f"<td>{esc(m.get('step', '–'))}</td><td>{cell('dice_mean')}</td><td>{cell('accuracy')}</td>"
                    f"<td>{cell('auc')}</td><td>{per_text or '–'}</td>"
                    f"<td>{esc(m.get('n_train', '–'))} / {esc(m.get('n_test', '–'))}</td></tr>")
        key, v = _finetune_headline(m)
        if v is not None:
            bars.append((f"{name} ({key})", v))
    chart = bar_chart("Fine-tuning: test result per run", bars, ylabel="test metric",
                      caption="dice_mean for seg, else accuracy") if bars else ""
    return (f'<div class="charts">{chart}</div>' if chart else "") + "<table>" + head + "".join(rows) + "</table>"


def runs_section(checkpoints: Path) -> str:
    runs = find_runs(checkpoints)
    if not runs:
        return "<p>No training runs in this workdir (no <code>checkpoints/*/metrics.jsonl</code>).</p>"
    out, finetunes = [], []
    for stage, name, folder in runs:
        if (folder / "metrics.json").is_file():
            try:
                m = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
                if isinstance(m, dict):
                    finetunes.append((name if stage == "finetune" else f"{stage}/{name}", m))
            except (OSError, ValueError):
                out.append(f'<p class="err">{esc(folder.name)}/metrics.json is unreadable.</p>')
        jsonl = folder / "metrics.jsonl"
        if not jsonl.is_file():
            continue
        rows, bad = read_jsonl(jsonl)
        steps = [s for r in rows if (s := _num(r.get("step"))) is not None]
        note = f"{len(rows)} logged rows" + (f", last step {int(max(steps))}" if steps else "")
        note += f"; {bad} unreadable line(s) skipped" if bad else ""
        rel = f"checkpoints/{stage}/{name if name != '(default)' else ''}".rstrip("/")
        out.append(f"<h3>{esc(stage)} · {esc(name)}</h3><p class=\"note\">{esc(rel)}/metrics.jsonl: {esc(note)}</p>")
        charts = run_charts(rows)
        if charts:
            out.append('<div class="charts">' + "".join(charts) + "</div>")
        out.append(metric_table(last_values(rows)))
    if finetunes:
        out.append("<h3>Fine-tuning results</h3>" + finetune_table(finetunes))
    return "".join(out)
