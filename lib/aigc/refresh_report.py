"""The refresh report: every model of a refresh's lineage scored on every held-out set it has seen arrive.

One plot, `loss_by_window.png`: x is the data in the order it arrived (the original test set, then each window's
held-out test rows), y the model's mean nats per held-out completion (per document for text data), one line per
model (promoted generations solid, rejected candidates dashed), and the exact floor where the rows carry their
nats (the embedded task and its drift). Under drift it shows the incumbent's loss rising on each new week, each
promoted model bringing it back down, and the older data held within `refresh.max_regression`. Then the
decisions (parent, window, gain, regression, why) and the windows (files with their sha256).

Scores are computed in the driver with the shared loader, a few hundred rows per set, and cached in
`report/scores.json` by model fingerprint and data file sha256, so a cycle scores only what is new.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot, as matplotlib asks (aigc.report_plots does the same)
import matplotlib.pyplot as plt  # noqa: E402

from aigc.config import DataSection  # noqa: E402
from aigc.evaluate import completion_nats, document_nats
from aigc.modeldir import load_model
from aigc.refresh_config import REPORT_DIR
from aigc.report import CSS
from aigc.report_plots import _colours, _save, fmt
from aigc.taskdata import chat_row, prompt_completion_row, read_rows
from aigc.template import ensure_chat_template

PLOT = "loss_by_window.png"
SCORES = "scores.json"


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def score(model_dir: str, rows: list[dict[str, Any]], data: DataSection) -> float:
    """Mean nats per held-out row: of its completion given its prompt (task data, `completion_nats`), or of the
    whole document (text); rows training would drop (too long) are left out."""
    loaded = load_model(model_dir)
    if data.format == "text":
        nats = document_nats(loaded.model, loaded.tokenizer, [r[data.text_column] for r in rows])
    else:
        if data.format == "chat":
            ensure_chat_template(loaded.tokenizer)
        nats = [n for n in completion_nats(loaded.model, loaded.tokenizer, canonical(rows, data), data) if n is not None]
    return sum(nats) / max(len(nats), 1)


def canonical(rows: list[dict[str, Any]], data: DataSection) -> list[dict[str, Any]]:
    """Task rows as the loader makes them (`aigc.taskdata`: messages as JSON, or prompt + suffix and completion);
    a row the loader would reject is left out."""
    check = chat_row if data.format == "chat" else prompt_completion_row
    problems: list[str] = []
    return [c for c in (check(r, data, "", problems) for r in rows) if c is not None]


def score_table(models: list[dict[str, Any]], datasets: list[tuple[str, str]], data: DataSection, rows_per_set: int,
                cache_path: Path) -> tuple[dict[tuple[str, str], float], dict[str, float]]:
    """(model id, data set name) -> score for every pair, and each data set's floor (the mean of its rows' exact
    `nats`, when they all carry one). Computed scores are added to the cache at `cache_path`."""
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    table, floors = {}, {}
    for name, path in datasets:
        rows = [row for _, row in read_rows(path)][:rows_per_set]
        if rows and all(isinstance(r.get("nats"), (int, float)) for r in rows):
            floors[name] = sum(float(r["nats"]) for r in rows) / len(rows)
        digest = _sha(path)
        for m in models:
            key = f"{m['fingerprint']}/{digest}/{rows_per_set}"
            if key not in cache:
                cache[key] = score(m["dir"], rows, data)
            table[(m["model"], name)] = cache[key]
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_name(f".{cache_path.name}.tmp")
    tmp.write_text(json.dumps(cache, indent=2))
    os.replace(tmp, cache_path)
    return table, floors


def plot(models: list[dict[str, Any]], names: list[str], table: dict[tuple[str, str], float], floors: dict[str, float],
         path: Path, unit: str) -> None:
    fig, ax = plt.subplots(figsize=(10, 5.2))
    x = list(range(len(names)))
    # a diverged candidate's loss would flatten every other line: the axis ends a quarter above the promoted ones
    shown = [table[(m["model"], n)] for m in models if m["decision"]["promote"] for n in names] + list(floors.values())
    top = max(shown) * 1.25 if shown else None
    for m, colour in zip(models, _colours(len(models)), strict=True):
        promoted = m["decision"]["promote"]
        off = top is not None and any(table[(m["model"], n)] > top for n in names)
        label = f"{m['model']} (gen {m['generation']}{'' if promoted else ', rejected'}{', off the chart' if off else ''})"
        ax.plot(x, [table[(m["model"], n)] for n in names], marker="o", color=colour if promoted else "#8c959f",
                linestyle="-" if promoted else "--", linewidth=2 if promoted else 1, label=label)
    if floors:
        fx = [i for i, n in enumerate(names) if n in floors]
        ax.plot(fx, [floors[names[i]] for i in fx], color="black", linestyle=":", marker="_", label="exact floor")
    if top is not None:
        ax.set_ylim(bottom=0, top=top)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel(unit)
    ax.set_title("Each model on each held-out set, in the order the data arrived")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)


def render(models: list[dict[str, Any]], served: dict[str, Any] | None, names: list[str],
           table: dict[tuple[str, str], float], floors: dict[str, float], plot_path: Path, unit: str,
           title: str) -> str:
    e = html.escape
    head = "".join(f"<th>{e(n)}</th>" for n in names)
    rows = []
    for m in models:
        cells = "".join(f"<td>{fmt(table[(m['model'], n)], 3)}</td>" for n in names)
        cls = "best" if served and m["model"] == served["model"] else ""
        rows.append(f"<tr class='{cls}'><td class='l'><code>{e(m['model'])}</code></td><td>{m['generation']}</td>"
                    f"{cells}</tr>")
    if floors:
        rows.append("<tr><td class='l'>exact floor</td><td></td>"
                    + "".join(f"<td>{fmt(floors[n], 3) if n in floors else ''}</td>" for n in names) + "</tr>")
    decisions = []
    for m in models:
        d = m["decision"]
        gain = "" if d.get("gain") is None else f"{d['gain']:+.2%}"
        reg = "" if d.get("regression") is None else f"{d['regression']:+.2%}"
        files = "<br>".join(f"<code>{e(f['path'])}</code> {e(f['sha256'][:12])}" for f in m["window"].get("files", []))
        decisions.append(f"<tr><td class='l'><code>{e(m['model'])}</code></td><td class='l'>{e(m.get('parent') or '')}"
                         f"</td><td class='ex l'>{files}</td><td>{gain}</td><td>{reg}</td>"
                         f"<td class='ex l'>{e(d['reason'])}</td></tr>")
    b64 = base64.b64encode(plot_path.read_bytes()).decode()
    history = "".join(f"<li><code>{e(h['model'])}</code> since {e(time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(h['since'])))}"
                      f": {e(h['why'])}</li>" for h in (served or {}).get("history", []))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Refresh report: {e(title)}</title>
<style>{CSS}</style></head><body>
<h1>Refresh report</h1>
<p class="sub">{e(title)} &middot; generated {e(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>
<div class="box"><ul><li>serving: <code>{e(served['model'] if served else 'nothing yet')}</code>
{e(' (' + served['fingerprint'] + ')') if served else ''}</li><li>{len(models)} models, {len(names)} held-out sets</li></ul></div>
<h2>Each model on each held-out set ({e(unit)})</h2>
<figure><img alt="loss by window" src="data:image/png;base64,{b64}"><figcaption>x: the held-out sets in the order their
data arrived (the original test set first); lower is better. Solid: promoted generations; dashed: rejected
candidates; dotted: the exact floor no model can beat (rows that carry their nats).</figcaption></figure>
<table><thead><tr><th class='l'>model</th><th>gen</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>
<h2>Decisions</h2>
<table><thead><tr><th class='l'>model</th><th class='l'>parent</th><th class='l'>window (files, sha256)</th>
<th>gain on new</th><th>regression on old</th><th class='l'>decision</th></tr></thead><tbody>{''.join(decisions)}</tbody></table>
<h2>What Serve ran</h2><ul>{history}</ul>
</body></html>
"""


def write_report(out_dir: Path, models: list[dict[str, Any]], served: dict[str, Any] | None,
                 datasets: list[tuple[str, str]], data: DataSection, rows_per_set: int, title: str) -> str:
    """Score every model on every held-out set (cached), draw the plot, write `report.html`; returns its path."""
    table, floors = score_table(models, datasets, data, rows_per_set, out_dir / SCORES)
    names = [n for n, _ in datasets]
    unit = "nats per document" if data.format == "text" else "nats per completion"
    plot(models, names, table, floors, out_dir / PLOT, unit)
    out = out_dir / "report.html"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render(models, served, names, table, floors, out_dir / PLOT, unit, title))
    os.replace(tmp, out)
    return str(out)


def report_dir(root: Path) -> Path:
    return root / REPORT_DIR
