"""The search report: what people read after a search, rebuilt from what is on disk.

    aigc report SEARCH_DIR          # finished or partial search; rewrites the files below in SEARCH_DIR

Writes `report.html` (self-contained: CSS inline, plots as base64 PNGs, opens offline), `report.md` (links
the PNGs under `plots/`), `trials.csv` (one row per trial) and `plots/*.png`. Everything is read from the
search folder (`aigc.layout` names its files, `aigc.report_data` reads them, `aigc.report_plots` draws), so
a search that is still running, was interrupted or crashed reports what it has so far. This module renders
the tables and pages.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aigc import storage
from aigc.comparison import comparison_rows, example_lines
from aigc.layout import PLOTS_DIR, REPORT_HTML, REPORT_MD, TRIALS_CSV, WINNER_DIR
from aigc.report_data import TRIAL_SIZE_COLUMNS, TRIAL_TASK_COLUMNS, SearchData, load_search, summary
from aigc.report_plots import PLOTS, STATUS_COLOURS, draw_plots, fmt

FILES = (REPORT_HTML, REPORT_MD, TRIALS_CSV, *(f"{PLOTS_DIR}/{p}.png" for p in PLOTS))


@dataclass
class Report:
    """A written report: the search it was read from and the files written."""

    data: SearchData
    files: dict[str, str]  # relative name -> absolute path


# ------------------------------------------------------------------------------------------- render


def _columns(data: SearchData) -> list[str]:
    return ["rank", "trial_id", "status", *data.param_names, "best_val_loss", "best_epsilon", "best_val_ppl", "best_step",
            "final_val_loss", "final_val_ppl", *TRIAL_TASK_COLUMNS, *TRIAL_SIZE_COLUMNS, "steps", "asha_stopped", "asha_stop_step", "early_stopped", "error",
            "num_failures", "wall_s", "cpu_hours", "gpu_hours", "mlflow_run", "model_dir"]


# How the HTML and Markdown tables show a column (trials.csv keeps full precision).
CELL_FORMATS = {"best_val_loss": "{:.4f}", "best_epsilon": "{:.3f}", "final_val_loss": "{:.4f}", "best_val_ppl": "{:.2f}",
                "final_val_ppl": "{:.2f}", "wall_s": "{:.0f}", "cpu_hours": "{:.4f}", "gpu_hours": "{:.4f}",
                "floor_ratio": "{:.3f}", "greedy_valid_pct": "{:.1f}", "greedy_faithful_pct": "{:.1f}",
                "trainable_pct": "{:.2f}", "adapter_mb": "{:.3f}"}
ALWAYS_SHOWN = {"rank", "trial_id", "status", "best_val_loss", "final_val_loss", "steps"}


def _cell(col: str, v: Any) -> str:
    if isinstance(v, float) and col in CELL_FORMATS and not math.isnan(v):
        return CELL_FORMATS[col].format(v)
    return fmt(v)


def _table_columns(data: SearchData, rows: list[dict[str, Any]]) -> list[str]:
    """The CSV's columns minus the bookkeeping ones and those empty (or all zero) in every row."""
    hidden = {"model_dir", "asha_stopped", "early_stopped"}
    return [c for c in _columns(data) if c not in hidden
            and (c in ALWAYS_SHOWN or c in data.param_names or any(r.get(c) not in (None, "", 0, 0.0) for r in rows))]


def _rows(data: SearchData) -> list[dict[str, Any]]:
    return [{"rank": i + 1 if t.best_val_loss is not None else "", **t.row()} for i, t in enumerate(data.trials)]


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_csv(data: SearchData, path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_columns(data), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in _rows(data):
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    _write(path, buf.getvalue())


def _space_lines(data: SearchData) -> list[tuple[str, str]]:
    out = []
    for name, spec in data.space.items():
        if spec.get("kind") == "choice":
            out.append((name, f"choice {spec.get('values')}"))
        else:
            out.append((name, f"{spec.get('kind')} [{fmt(spec.get('low'))}, {fmt(spec.get('high'))}]"))
    return out


def _headline(data: SearchData, s: dict[str, Any]) -> list[str]:
    """The summary sentences, shared by the HTML and Markdown reports (plain text, not escaped)."""
    cfg = data.config.get("search") or {}
    counts = ", ".join(f"{n} {k}" for k, n in sorted(s["counts"].items()))
    lines = [f"{s['trials']} trials ({counts}); algorithm {cfg.get('algorithm', '?')}"
             + (", ASHA on validation loss" if (cfg.get("asha") or {}).get("enabled", True) else "")]
    if "best" in s:
        b = s["best"]
        lines.append(f"Best: trial {b.trial_id}, validation loss {b.best_val_loss:.4f} (perplexity "
                     f"{math.exp(min(b.best_val_loss, 50)):.2f}) at step {b.best_step}")
        lines.append("Best configuration: " + ", ".join(f"{k} = {fmt(v, 4)}" for k, v in b.params.items()))
        lines.append(f"Median trial: validation loss {s['median_val_loss']:.4f} (perplexity {s['median_ppl']:.2f}); "
                     f"the best is {s['gap']:.4f} nats/token lower ({s['gap_pct']:.1f}%)")
    if data.winner:
        lines.append(f"Winning model: {data.winner['path']} (trial {data.winner['trial']})")
    elif "best" in s:
        lines.append("Winning model: not exported yet (the search has not finished)")
    compute = f"Compute: {s['steps']} optimizer steps"
    if "steps_fraction" in s:
        compute += f" ({100 * s['steps_fraction']:.0f}% of training every trial to the end)"
    compute += f", {s['cpu_hours']:.3f} CPU-hours"
    if s["gpu_hours"]:
        compute += f", {s['gpu_hours']:.3f} GPU-hours"
    lines.append(compute)
    unfinished = s["counts"].get("running", 0) + s["counts"].get("pending", 0)
    if unfinished:
        lines.append(f"Partial search: {unfinished} trial(s) not finished (running, pending or interrupted); "
                     "resume with the same command and config")
    return lines


WINNER_NOTE = ("Test split, the base model against the winner (aigc.evaluate). Trials are not evaluated (they run "
               "with run.evaluate=false to stay cheap); the winner is evaluated once, after the search.")


def _winner_evaluation(data: SearchData) -> tuple[list[tuple[str, str, str]], list[dict[str, Any]]]:
    """The winner's base-vs-fine-tuned rows and its example completions ([], [] when it was not evaluated)."""
    ev = (data.winner or {}).get("evaluation") or {}
    if not ev.get("base") or not ev.get("finetuned"):
        return [], []
    return comparison_rows(ev["base"], ev["finetuned"]), ev["finetuned"].get("examples") or []


def _examples_html(examples: list[dict[str, Any]]) -> str:
    """The winner's example prompts and greedy completions as a table (valid/faithful columns when known)."""
    if not examples:
        return ""
    e = html.escape
    marks = [k for k in ("valid", "faithful") if k in examples[0]]
    head = "<tr><th class='l'>test prompt</th><th class='l'>winner's greedy completion</th>" + "".join(
        f"<th>{k}</th>" for k in marks) + "</tr>"
    body = "".join("<tr><td class='l ex'>" + e(x["prompt"]).replace("\n", "<br>") + f"</td><td class='l ex'>"
                   f"{e(x['completion'])}</td>" + "".join(f"<td>{'yes' if x.get(k) else 'no'}</td>" for k in marks)
                   + "</tr>" for x in examples)
    return f"<table style='margin-top:12px'>{head}{body}</table>"


CAPTIONS = {
    "learning_curves": "Validation loss against optimizer step for every trial. Dashed lines ending in x were "
                       "stopped by ASHA; the thick line is the best trial.",
    "loss_vs_hparams": "Best validation loss each trial reached, against each hyperparameter (log axis where the "
                       "space is log-uniform). Hollow markers were stopped by ASHA, so their loss is from fewer steps.",
    "parallel_coordinates": "Each line is a trial across the hyperparameters and its best validation loss; colour "
                            "is the loss (yellow = best). Axis ends show the lowest and highest value the trials tried.",
    "best_so_far": "The lowest validation loss seen so far, against wall time since the search started.",
    "importance": "A simple ranking: |Spearman rank correlation| between each hyperparameter and the validation "
                  "loss at the last step every trial reached. Indicative only with few trials.",
}

CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px auto;
 max-width:1300px;color:#1f2328;padding:0 16px}
h1{font-size:26px;margin-bottom:4px}h2{font-size:19px;margin-top:32px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.sub{color:#57606a;margin-top:0}.box{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:12px 18px}
.box li{margin:4px 0}table{border-collapse:collapse;font-size:13px;width:100%}
th,td{border:1px solid #d0d7de;padding:4px 7px;text-align:right;white-space:nowrap}
th{background:#f6f8fa;position:sticky;top:0}td.l,th.l{text-align:left}tr.best td{background:#fff8c5;font-weight:600}
.chip{display:inline-block;border-radius:10px;padding:1px 8px;color:#fff;font-size:12px}
figure{margin:18px 0}figure img{max-width:100%;border:1px solid #d0d7de;border-radius:4px}
figcaption{color:#57606a;font-size:13px;margin-top:4px}pre{background:#f6f8fa;padding:10px;overflow-x:auto;font-size:12px}
code{background:#eff1f3;padding:1px 4px;border-radius:3px}td.ex{white-space:normal;vertical-align:top}.err{color:#cf222e;white-space:normal;text-align:left;max-width:320px}
"""


def render_html(data: SearchData, plot_paths: dict[str, Path]) -> str:
    s = summary(data)
    e = html.escape
    rows = _rows(data)
    shown = _table_columns(data, rows)
    head = "".join(f"<th class='{'l' if c in ('trial_id', 'status', 'error') else ''}'>{e(c)}</th>" for c in shown)
    body = []
    best_id = s["best"].trial_id if "best" in s else None
    for r in rows:
        cells = []
        for c in shown:
            v = r.get(c)
            if c == "status":
                cells.append(f"<td class='l'><span class='chip' style='background:{STATUS_COLOURS.get(v, '#57606a')}'>"
                             f"{e(str(v))}</span></td>")
            elif c == "error":  # the full text is in the Errors section
                short = v if not v or len(v) <= 90 else v[:87] + "..."
                cells.append(f"<td class='err' title='{e(v or '')}'>{e(short or '')}</td>")
            elif c == "trial_id":
                cells.append(f"<td class='l'><code>{e(str(v))}</code></td>")
            elif c == "mlflow_run":  # the trial's MLflow run: a link on a tracking server, else its id
                run, url = f"<code>{e(v or '')}</code>", r.get("mlflow_url")
                link = f"<a href='{e(url)}'>{run}</a>" if url else run
                cells.append(f"<td class='l'>{link}</td>")
            else:
                cells.append(f"<td>{e(_cell(c, v))}</td>")
        body.append(f"<tr class='{'best' if r['trial_id'] == best_id else ''}'>{''.join(cells)}</tr>")
    figs = []
    for name in PLOTS:
        b64 = base64.b64encode(plot_paths[name].read_bytes()).decode()
        figs.append(f"<figure><img alt='{e(name)}' src='data:image/png;base64,{b64}'>"
                    f"<figcaption>{e(CAPTIONS[name])}</figcaption></figure>")
    errors = [f"<h3><code>{e(t.trial_id)}</code></h3><pre>{e(t.error_text or '')}</pre>" for t in data.trials if t.error_text]
    space = "".join(f"<li><code>{e(n)}</code>: {e(d)}</li>" for n, d in _space_lines(data))
    rows_ev, examples = _winner_evaluation(data)
    winner_ev = ""
    if rows_ev:
        winner_ev = ("<h2>Winner against its base</h2><table style='width:auto'><tr><th class='l'></th><th>base</th>"
                     "<th>winner</th></tr>" + "".join(f"<tr><td class='l'>{e(label)}</td><td>{e(b)}</td><td>{e(a)}</td></tr>"
                                                      for label, b, a in rows_ev) + "</table>"
                     + _examples_html(examples) + f"<p class='sub'>{e(WINNER_NOTE)}</p>")
    tracked = ("; mlflow_run: the trial's run in the MLflow store (tracking.uri), a child of the search's run"
               if "mlflow_run" in shown else "")
    best_cfg = ""
    if "best" in s:
        b = s["best"]
        best_cfg = ("<table style='width:auto'><tr><th class='l'>hyperparameter</th><th>value</th></tr>"
                    + "".join(f"<tr><td class='l'><code>{e(k)}</code></td><td>{e(fmt(v, 5))}</td></tr>"
                              for k, v in b.params.items()) + "</table>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Search report: {e(data.name)}</title>
<style>{CSS}</style></head><body>
<h1>Search report: {e(data.name)}</h1>
<p class="sub">{e(data.search_dir)} &middot; generated {e(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>
<div class="box"><ul>{''.join(f'<li>{e(x)}</li>' for x in _headline(data, s))}</ul></div>
<h2>Best configuration</h2>{best_cfg or '<p>No trial has reported a validation loss yet.</p>'}
{winner_ev}
<h2>Trials, ranked by best validation loss</h2>
<div style="overflow-x:auto"><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>
<p class="sub">wall_s: seconds from the trial's start to its end (or its last report); CPU/GPU-hours: wall time x
the resources the trial held. Trial models: <code>trials/trial-&lt;id&gt;/best</code>{tracked}.</p>
<h2>Plots</h2>{''.join(figs)}
<h2>Search space</h2><ul>{space}</ul>
{'<h2>Errors</h2>' + ''.join(errors) if errors else ''}
</body></html>
"""


def render_md(data: SearchData) -> str:
    s = summary(data)
    rows = _rows(data)
    cols = _table_columns(data, rows)
    lines = [f"# Search report: {data.name}", "", f"`{data.search_dir}`", ""]
    lines += [f"- {x}" for x in _headline(data, s)]
    rows_ev, examples = _winner_evaluation(data)
    if rows_ev:
        lines += ["", "## Winner against its base", "", "| | base | winner |", "|---|---|---|"]
        lines += [f"| {label} | {b} | {a} |" for label, b, a in rows_ev]
        lines += ["", *(["Winner's greedy completions for test prompts:", "", "```", *example_lines({"examples": examples}),
                         "```", ""]
                        if examples else []), WINNER_NOTE]
    lines += ["", "## Trials, ranked by best validation loss", "",
              "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(c, r.get(c)).replace("|", "\\|") for c in cols) + " |")
    lines += ["", "## Plots", ""]
    for name in PLOTS:
        lines += [f"![{name}]({PLOTS_DIR}/{name}.png)", "", CAPTIONS[name], ""]
    lines += ["## Search space", ""] + [f"- `{n}`: {d}" for n, d in _space_lines(data)]
    errs = [t for t in data.trials if t.error_text]
    if errs:
        lines += ["", "## Errors", ""]
        for t in errs:
            lines += [f"### {t.trial_id}", "", "```", (t.error_text or "").strip(), "```", ""]
    return "\n".join(lines) + "\n"


TEXT_HIDDEN = {"best_val_ppl", "final_val_ppl", "cpu_hours", "gpu_hours", "error", "mlflow_run"}  # in report.md, too wide here


def render_text(data: SearchData) -> str:
    """The trials table for a terminal or job log: report.md's rows and cells, aligned, narrower."""
    rows = _rows(data)
    cols = [c for c in _table_columns(data, rows) if c not in TEXT_HIDDEN]
    cells = [cols] + [[_cell(c, r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("[aigc] " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def render(data: SearchData, out_dir: str | os.PathLike) -> dict[str, str]:
    """Write every report file for `data` into `out_dir`; returns {relative name: path}."""
    out = Path(out_dir)
    plots = draw_plots(data, out)
    write_csv(data, out / TRIALS_CSV)
    _write(out / REPORT_MD, render_md(data))
    _write(out / REPORT_HTML, render_html(data, plots))
    return {name: str(out / name) for name in FILES}


def write_report(search_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 location: str | None = None) -> Report:
    """Read a search folder and write its report into it (or into `out_dir`). `location`: where the search is
    stored when that is not `search_dir` (an object-store search, read from the driver's staging copy): the
    report names it, and its winner there."""
    data = load_search(search_dir)
    out = out_dir or data.search_dir
    if location:
        shown = storage.redact(location)
        data = replace(data, search_dir=shown,
                       winner=data.winner and {**data.winner, "path": storage.join(shown, WINNER_DIR)})
    return Report(data, render(data, out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="aigc report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("search_dir", help="the search folder: <search.storage_path>/<search.name>")
    p.add_argument("--out", help="write the report here instead of into the search folder")
    args = p.parse_args(argv)
    try:
        rep = write_report(args.search_dir, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = summary(rep.data)
    print(f"[aigc] {s['trials']} trials; " + (f"best {s['best'].trial_id} val loss {s['best'].best_val_loss:.4f}"
                                              if "best" in s else "no results yet"))
    for name in (REPORT_HTML, REPORT_MD, TRIALS_CSV):
        print(f"[aigc] {rep.files[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
