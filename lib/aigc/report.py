"""The search report: what people read after a search, rebuilt from what is on disk.

    aigc report SEARCH_DIR          # finished or partial search; rewrites the files below in SEARCH_DIR

Writes `report.html` (self-contained: CSS inline, plots as base64 PNGs, opens offline), `report.md` (links
the PNGs under `plots/`), `trials.csv` (one row per trial) and `plots/*.png`. Everything is read from the
search folder (see `aigc.search` for its layout), so a search that is still running, was interrupted or
crashed reports what it has so far.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

# Kept in step with aigc.search (not imported from it: the report must not need Ray or pydantic models).
TUNE_DIR, TRIALS_DIR, WINNER_DIR = "tune", "trials", "winner"
SEARCH_YAML, ASHA_LEDGER, TRIAL_DONE = "search.yaml", "asha_stops.jsonl", "trial.json"
METRICS_LOG = "metrics.jsonl"  # aigc.finetune's log of every report of a Train run
TRIAL_DRIVER_CPU = 0.02

PLOTS = ("learning_curves", "loss_vs_hparams", "parallel_coordinates", "best_so_far", "importance")
FILES = ("report.html", "report.md", "trials.csv", *(f"plots/{p}.png" for p in PLOTS))
STATUS_COLOURS = {"completed": "#1a7f37", "stopped by ASHA": "#9a6700", "early-stopped": "#0969da",
                  "error": "#cf222e", "running": "#6639ba", "pending": "#57606a", "interrupted": "#57606a"}


@dataclass
class TrialRecord:
    """One trial as the report sees it."""

    trial_id: str
    status: str  # completed | stopped by ASHA | early-stopped | error | running | pending
    params: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per validation, by step
    error: str | None = None  # last line of the error (the exception)
    error_text: str | None = None
    asha_stop_step: int | None = None
    wall_s: float = 0.0
    cpu_hours: float = 0.0
    gpu_hours: float = 0.0
    num_failures: int = 0
    model_dir: str | None = None

    @property
    def best(self) -> dict[str, Any] | None:
        return min(self.history, key=lambda h: h["val_loss"]) if self.history else None

    @property
    def best_val_loss(self) -> float | None:
        return self.best["val_loss"] if self.history else None

    @property
    def best_step(self) -> int | None:
        return self.best["step"] if self.history else None

    @property
    def best_metrics(self) -> dict[str, Any]:
        return dict(self.best) if self.history else {}

    @property
    def final(self) -> dict[str, Any] | None:
        return self.history[-1] if self.history else None

    @property
    def steps(self) -> int:
        return int(self.history[-1]["step"]) if self.history else 0

    def row(self) -> dict[str, Any]:
        b, f = self.best, self.final
        return {
            "trial_id": self.trial_id, "status": self.status, **self.params,
            "best_val_loss": b and b["val_loss"], "best_val_ppl": b and b.get("val_ppl"),
            "best_step": b and b["step"], "final_val_loss": f and f["val_loss"], "final_val_ppl": f and f.get("val_ppl"),
            "steps": self.steps, "asha_stopped": self.asha_stop_step is not None, "asha_stop_step": self.asha_stop_step,
            "early_stopped": self.status == "early-stopped", "error": self.error, "num_failures": self.num_failures,
            "wall_s": round(self.wall_s, 1), "cpu_hours": round(self.cpu_hours, 5), "gpu_hours": round(self.gpu_hours, 5),
            "model_dir": self.model_dir,
        }


@dataclass
class SearchData:
    """A search as read from disk: its config (as a plain dict) and its trials, ranked best first."""

    search_dir: str
    config: dict[str, Any]
    trials: list[TrialRecord]
    winner: dict[str, Any] | None = None  # {"path", "trial", "metrics"} from winner/aigc.json
    started: float | None = None  # unix time of the first trial start

    @property
    def name(self) -> str:
        return self.config.get("search", {}).get("name") or Path(self.search_dir).name

    @property
    def space(self) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in (self.config.get("space") or {}).items() if v}

    @property
    def param_names(self) -> list[str]:
        names = list(self.space)
        for t in self.trials:
            names += [k for k in t.params if k not in names]
        return names

    @property
    def max_steps(self) -> int | None:
        return (self.config.get("base") or {}).get("optim", {}).get("max_steps")

    def is_log(self, name: str) -> bool:
        spec = self.space.get(name) or {}
        if spec.get("kind") == "loguniform":
            return True
        vals = [v for v in (spec.get("values") or []) if v]
        return spec.get("kind") == "choice" and len(vals) >= 2 and min(vals) > 0 and max(vals) / min(vals) >= 20


@dataclass
class Report:
    data: SearchData
    files: dict[str, str]  # relative name -> absolute path


# --------------------------------------------------------------------------------------------- load


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line being written right now
                    pass
    return out


def _trial_states(exp: Path) -> dict[str, dict[str, Any]]:
    """trial_id -> {"status", "config", "num_failures", "start_time"} from Tune's latest experiment state."""
    # One file per driver session, named by its start time; the newest session's holds the current status
    # (not the newest mtime: Tune rewrites the older files when it syncs the experiment folder).
    states = sorted(exp.glob("experiment_state-*.json"), key=lambda p: p.name)
    if not states:
        return {}
    try:
        raw = json.loads(states[-1].read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    out = {}
    for entry in raw.get("trial_data", []):
        try:
            trial = json.loads(entry[0]) if isinstance(entry[0], str) else entry[0]
            meta = json.loads(entry[1]) if isinstance(entry[1], str) else entry[1]
        except (IndexError, TypeError, json.JSONDecodeError):
            continue
        if "trial_id" in trial:
            out[trial["trial_id"]] = {"status": trial.get("status"), "config": trial.get("config") or {},
                                      "num_failures": (meta or {}).get("num_failures", 0),
                                      "start_time": (meta or {}).get("start_time")}
    return out


def _history(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validation reports by step; a retried or resumed trial may repeat a step: the later report wins."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in results:
        if r.get("val_loss") is None or r.get("step") is None:
            continue
        by_step[int(r["step"])] = {k: r.get(k) for k in ("step", "val_loss", "val_ppl", "train_loss", "best_val_loss",
                                                          "lr", "tokens_seen", "stopped_early", "run_done",
                                                          "timestamp", "time_total_s")}
    return [by_step[s] for s in sorted(by_step)]


def _error(path: Path) -> tuple[str | None, str | None]:
    if not path.is_file():
        return None, None
    text = path.read_text(errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(" ")]
    last = next((ln for ln in reversed(lines) if not ln.startswith(("Failure #", "File ", "^"))), lines[-1] if lines else "")
    return last[:300], text


def load_search(search_dir: str | os.PathLike) -> SearchData:
    """Read a search folder (finished, running or interrupted) into a ranked SearchData."""
    sdir = Path(search_dir).expanduser().resolve()
    if not (sdir / SEARCH_YAML).is_file() and not (sdir / TUNE_DIR).is_dir():
        raise FileNotFoundError(f"{sdir}: not a search folder (no {SEARCH_YAML} or {TUNE_DIR}/)")
    config = yaml.safe_load((sdir / SEARCH_YAML).read_text()) if (sdir / SEARCH_YAML).is_file() else {}
    base = config.get("base") or {}
    sc = base.get("scaling") or {}
    workers = sc.get("num_workers", 1)
    cpus = TRIAL_DRIVER_CPU + workers * sc.get("cpus_per_worker", 1.0)
    gpus = workers * sc.get("gpus_per_worker", 1.0) if sc.get("use_gpu") else 0.0
    max_steps = (base.get("optim") or {}).get("max_steps")
    asha_on = ((config.get("search") or {}).get("asha") or {}).get("enabled", True)
    space = [k for k, v in (config.get("space") or {}).items() if v]

    exp = sdir / TUNE_DIR
    states = _trial_states(exp)
    stops = {s["trial_id"]: s for s in read_json_lines(sdir / ASHA_LEDGER)}
    ids = sorted(set(states) | {p.name for p in exp.iterdir() if p.is_dir() and (p / "params.json").is_file()}
                 if exp.is_dir() else set(states))
    trials, starts = [], []
    for tid in ids:
        tdir, st = exp / tid, states.get(tid, {})
        params = st.get("config") or {}
        if (tdir / "params.json").is_file():
            params = json.loads((tdir / "params.json").read_text())
        params = {k: v for k, v in params.items() if not space or k in space}
        results = read_json_lines(tdir / "result.json")
        run_dir = sdir / TRIALS_DIR / f"trial-{tid}"
        # Tune's result.json misses the reports that arrived while a search was being interrupted (the Train
        # run resumes after them); the run's own log has every one. Tune's line wins where both have a step.
        run_log = [{**r, "run_done": r.get("done")} for r in read_json_lines(run_dir / METRICS_LOG)]
        hist = _history(run_log + results)
        err, err_text = _error(tdir / "error.txt")
        done = json.loads((run_dir / TRIAL_DONE).read_text()) if (run_dir / TRIAL_DONE).is_file() else None
        tune_status = st.get("status") or ("TERMINATED" if done else "RUNNING")
        stop = stops.get(tid)
        last = hist[-1] if hist else {}
        if tune_status == "ERROR":
            status = "error"
        elif tune_status == "TERMINATED":
            if stop is None and asha_on and not done and not last.get("stopped_early") and not last.get("run_done") \
                    and max_steps and last.get("step", 0) < max_steps:
                stop = {"step": last.get("step")}  # stopped without a ledger line (e.g. a ledger lost with a node)
            status = ("stopped by ASHA" if stop else "early-stopped" if last.get("stopped_early") else "completed")
            if stop and stop.get("step") is not None:  # the run may report once more before Tune's stop lands
                hist = [h for h in hist if h["step"] <= stop["step"]]
        else:
            status = "pending" if tune_status == "PENDING" and not results else "running"
        wall = float(done["wall_s"]) if done else float(max((r.get("time_total_s") or 0) for r in results) if results else 0)
        if results:
            first = results[0]
            starts.append((first.get("timestamp") or 0) - (first.get("time_total_s") or 0))
        best_dir = run_dir / "best" / "aigc.json"
        trials.append(TrialRecord(
            trial_id=tid, status=status, params=params, history=hist, error=err, error_text=err_text,
            asha_stop_step=(stop or {}).get("step"), wall_s=wall, cpu_hours=wall * cpus / 3600,
            gpu_hours=wall * gpus / 3600, num_failures=int(st.get("num_failures") or 0),
            model_dir=str(best_dir.parent) if best_dir.is_file() else None,
        ))
    trials.sort(key=lambda t: (t.best_val_loss is None, t.best_val_loss if t.best_val_loss is not None else 0, t.trial_id))
    winner = None
    if (sdir / WINNER_DIR / "aigc.json").is_file():
        meta = json.loads((sdir / WINNER_DIR / "aigc.json").read_text())
        winner = {"path": str(sdir / WINNER_DIR), "trial": meta.get("trial"), "metrics": meta.get("metrics", {}),
                  "step": meta.get("step")}
    return SearchData(str(sdir), config, trials, winner, min(starts) if starts else None)


# -------------------------------------------------------------------------------------------- stats


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (what Spearman's rho needs)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation; nan when either side is constant or there are fewer than 3 points."""
    if len(x) < 3:
        return math.nan
    rx, ry = _rank(np.asarray(x, float)), _rank(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def loss_at(t: TrialRecord, step: int) -> float | None:
    """Validation loss at `step`, or at the last validation before it."""
    before = [h for h in t.history if h["step"] <= step]
    return before[-1]["val_loss"] if before else None


def importance(data: SearchData) -> tuple[int | None, list[tuple[str, float]]]:
    """Each hyperparameter's |Spearman rho| with the validation loss at the last step *every* trial reached
    (so trials ASHA stopped early compare fairly); returns (that step, [(name, signed rho)] by |rho|)."""
    ranked = [t for t in data.trials if t.history]
    if not ranked:
        return None, []
    common = min(t.steps for t in ranked)
    out = []
    for name in data.param_names:
        pts = [(t.params[name], loss_at(t, common)) for t in ranked if name in t.params and loss_at(t, common) is not None]
        xs = [math.log10(x) if data.is_log(name) and x > 0 else x for x, _ in pts]
        out.append((name, spearman(xs, [y for _, y in pts])))
    out.sort(key=lambda kv: -abs(kv[1]) if not math.isnan(kv[1]) else 1.0)
    return common, out


def summary(data: SearchData) -> dict[str, Any]:
    ranked = [t for t in data.trials if t.best_val_loss is not None]
    counts: dict[str, int] = {}
    for t in data.trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    out: dict[str, Any] = {"trials": len(data.trials), "counts": counts, "ranked": len(ranked),
                           "cpu_hours": sum(t.cpu_hours for t in data.trials),
                           "gpu_hours": sum(t.gpu_hours for t in data.trials),
                           "steps": sum(t.steps for t in data.trials)}
    if data.max_steps and data.trials:
        out["steps_fraction"] = out["steps"] / (len(data.trials) * data.max_steps)
    if ranked:
        best, median = ranked[0], float(np.median([t.best_val_loss for t in ranked]))
        out.update(best=best, median_val_loss=median, gap=median - best.best_val_loss,
                   gap_pct=100 * (median - best.best_val_loss) / median if median else 0.0,
                   median_ppl=math.exp(min(median, 50.0)))
    return out


# -------------------------------------------------------------------------------------------- plots


def _fig():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _fig().close(fig)
    os.replace(tmp, path)


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#57606a")
    ax.set_xticks([])
    ax.set_yticks([])


def _colours(n: int) -> list[Any]:
    cmap = _fig().get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.{digits}f}".rstrip("0").rstrip(".") or "0"
    return str(v)


def plot_learning_curves(data: SearchData, path: Path) -> None:
    plt = _fig()
    fig, ax = plt.subplots(figsize=(9, 5))
    with_hist = [t for t in data.trials if t.history]
    if not with_hist:
        _empty(ax, "no validation results yet")
    best_id = with_hist[0].trial_id if with_hist else None
    for t, c in zip(with_hist, _colours(len(with_hist)), strict=True):
        s = [h["step"] for h in t.history]
        y = [h["val_loss"] for h in t.history]
        ls = "--" if t.status == "stopped by ASHA" else ":" if t.status == "error" else "-"
        ax.plot(s, y, ls, color=c, lw=2.8 if t.trial_id == best_id else 1.4, marker="o", ms=3,
                label=f"{t.trial_id} ({t.status}{', best' if t.trial_id == best_id else ''}) "
                      + " ".join(f"{k}={_fmt(v, 2)}" for k, v in t.params.items()))
        if t.asha_stop_step is not None:
            ax.plot([s[-1]], [y[-1]], "x", color=c, ms=10, mew=2.5)
    if with_hist:
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(with_hist) > 16 else 1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Learning curves: validation loss of every trial (x = stopped by ASHA, dashed)")
    _save(fig, path)


def plot_loss_vs_hparams(data: SearchData, path: Path) -> None:
    plt = _fig()
    names = data.param_names or ["(none)"]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    ranked = [t for t in data.trials if t.best_val_loss is not None]
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names, strict=False):
        pts = [(t.params.get(name), t.best_val_loss, t) for t in ranked if t.params.get(name) is not None]
        if not pts:
            _empty(ax, f"{name}: no results")
            continue
        for status, marker, face in (("completed", "o", True), ("early-stopped", "s", True),
                                     ("stopped by ASHA", "o", False), ("error", "^", True), ("running", "D", False)):
            sel = [(x, y) for x, y, t in pts if t.status == status]
            if sel:
                c = STATUS_COLOURS[status]
                ax.scatter([x for x, _ in sel], [y for _, y in sel], marker=marker, s=40, label=status,
                           facecolors=c if face else "none", edgecolors=c, linewidths=1.5)
        bx, by, _ = min(pts, key=lambda p: p[1])
        ax.scatter([bx], [by], marker="*", s=220, color="#d4a72c", edgecolors="k", zorder=5, label="best")
        if data.is_log(name):
            ax.set_xscale("log")
        distinct = sorted({x for x, _, _ in pts})
        if len(distinct) <= 4:  # a choice (or a fixed value): tick exactly the values tried
            ax.set_xticks(distinct, [_fmt(float(x), 3) for x in distinct], rotation=30)
            ax.minorticks_off()
        ax.set_xlabel(name + (" (log scale)" if data.is_log(name) else ""))
        ax.set_ylabel("best validation loss")
        ax.grid(alpha=0.3)
    if ranked:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle("Best validation loss against each hyperparameter (hollow = stopped by ASHA)")
    fig.tight_layout()
    _save(fig, path)


def plot_parallel(data: SearchData, path: Path) -> None:
    plt = _fig()
    fig, ax = plt.subplots(figsize=(9, 4.8))
    ranked = [t for t in data.trials if t.best_val_loss is not None]
    axes = data.param_names + ["best val loss"]
    if not ranked:
        _empty(ax, "no validation results yet")
        _save(fig, path)
        return

    def value(t: TrialRecord, name: str) -> float:
        v = t.best_val_loss if name == "best val loss" else t.params.get(name, math.nan)
        return math.log10(v) if name != "best val loss" and data.is_log(name) and v and v > 0 else v

    cols = np.array([[value(t, a) for a in axes] for t in ranked], float)
    lo, hi = np.nanmin(cols, axis=0), np.nanmax(cols, axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    norm = (cols - lo) / span
    losses = cols[:, -1]
    cmap = plt.get_cmap("viridis_r")
    lmin, lmax = float(losses.min()), float(losses.max())
    for i in range(len(ranked))[::-1]:  # best drawn last, on top
        frac = (losses[i] - lmin) / (lmax - lmin) if lmax > lmin else 0.0
        ax.plot(range(len(axes)), norm[i], color=cmap(frac), lw=3 if i == 0 else 1.4,
                ls="--" if ranked[i].status == "stopped by ASHA" else "-", alpha=0.95)
    for j, a in enumerate(axes):
        ax.axvline(j, color="#888", lw=0.8)
        raw_lo, raw_hi = lo[j], hi[j]
        if a != "best val loss" and data.is_log(a):
            raw_lo, raw_hi = 10 ** raw_lo, 10 ** raw_hi
        ax.text(j, -0.06, _fmt(float(raw_lo), 3), ha="center", va="top", fontsize=8)
        ax.text(j, 1.06, _fmt(float(raw_hi), 3), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(axes)))
    ax.set_xticklabels([a + (" (log)" if a != "best val loss" and data.is_log(a) else "") for a in axes])
    ax.set_yticks([])
    ax.set_ylim(-0.15, 1.15)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(lmin, lmax))
    fig.colorbar(sm, ax=ax, label="best validation loss")
    ax.set_title("Parallel coordinates: one line per trial (thick = best, dashed = stopped by ASHA)", pad=18)
    _save(fig, path)


def plot_best_so_far(data: SearchData, path: Path) -> None:
    plt = _fig()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    pts = sorted((h["timestamp"], h["val_loss"], t.trial_id) for t in data.trials for h in t.history
                 if h.get("timestamp") is not None)
    if not pts:
        _empty(ax, "no validation results yet")
        _save(fig, path)
        return
    t0 = data.started if data.started is not None else pts[0][0]
    xs = [(p[0] - t0) / 60 for p in pts]
    ax.scatter(xs, [p[1] for p in pts], s=12, color="#8c959f", alpha=0.7, label="every validation")
    best = np.minimum.accumulate([p[1] for p in pts])
    ax.step(xs, best, where="post", color="#cf222e", lw=2.2, label="best so far")
    ax.set_xlabel("wall time since the search started (minutes)")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Best validation loss so far against wall time")
    _save(fig, path)


def plot_importance(data: SearchData, path: Path) -> None:
    plt = _fig()
    fig, ax = plt.subplots(figsize=(7, 0.6 * max(len(data.param_names), 2) + 1.6))
    step, imp = importance(data)
    scored = [(n, r) for n, r in imp if not math.isnan(r)]
    if not scored:
        _empty(ax, "parameter importance needs at least 3 trials with results\nand hyperparameters that vary")
    else:
        names = [n for n, _ in scored][::-1]
        rhos = [r for _, r in scored][::-1]
        ax.barh(names, [abs(r) for r in rhos], color=["#1a7f37" if r < 0 else "#cf222e" for r in rhos])
        for i, r in enumerate(rhos):
            ax.text(abs(r) + 0.01, i, f"rho = {r:+.2f}", va="center", fontsize=8)
        ax.set_xlim(0, 1.15)
        ax.set_xlabel(f"|Spearman rank correlation| with validation loss at step {step} (reached by every trial)")
    ax.set_title("Parameter importance (green: higher value -> lower loss; red: higher -> higher loss)", fontsize=10)
    _save(fig, path)


# ------------------------------------------------------------------------------------------- render


def _columns(data: SearchData) -> list[str]:
    return ["rank", "trial_id", "status", *data.param_names, "best_val_loss", "best_val_ppl", "best_step",
            "final_val_loss", "final_val_ppl", "steps", "asha_stopped", "asha_stop_step", "early_stopped", "error",
            "num_failures", "wall_s", "cpu_hours", "gpu_hours", "model_dir"]


# How the HTML and Markdown tables show a column (trials.csv keeps full precision).
CELL_FORMATS = {"best_val_loss": "{:.4f}", "final_val_loss": "{:.4f}", "best_val_ppl": "{:.2f}",
                "final_val_ppl": "{:.2f}", "wall_s": "{:.0f}", "cpu_hours": "{:.4f}", "gpu_hours": "{:.4f}"}
ALWAYS_SHOWN = {"rank", "trial_id", "status", "best_val_loss", "final_val_loss", "steps"}


def _cell(col: str, v: Any) -> str:
    if isinstance(v, float) and col in CELL_FORMATS and not math.isnan(v):
        return CELL_FORMATS[col].format(v)
    return _fmt(v)


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
            out.append((name, f"{spec.get('kind')} [{_fmt(spec.get('low'))}, {_fmt(spec.get('high'))}]"))
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
        lines.append("Best configuration: " + ", ".join(f"{k} = {_fmt(v, 4)}" for k, v in b.params.items()))
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
code{background:#eff1f3;padding:1px 4px;border-radius:3px}.err{color:#cf222e;white-space:normal;text-align:left;max-width:320px}
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
    best_cfg = ""
    if "best" in s:
        b = s["best"]
        best_cfg = ("<table style='width:auto'><tr><th class='l'>hyperparameter</th><th>value</th></tr>"
                    + "".join(f"<tr><td class='l'><code>{e(k)}</code></td><td>{e(_fmt(v, 5))}</td></tr>"
                              for k, v in b.params.items()) + "</table>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Search report: {e(data.name)}</title>
<style>{CSS}</style></head><body>
<h1>Search report: {e(data.name)}</h1>
<p class="sub">{e(data.search_dir)} &middot; generated {e(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>
<div class="box"><ul>{''.join(f'<li>{e(x)}</li>' for x in _headline(data, s))}</ul></div>
<h2>Best configuration</h2>{best_cfg or '<p>No trial has reported a validation loss yet.</p>'}
<h2>Trials, ranked by best validation loss</h2>
<div style="overflow-x:auto"><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>
<p class="sub">wall_s: seconds from the trial's start to its end (or its last report); CPU/GPU-hours: wall time x
the resources the trial held. Trial models: <code>trials/trial-&lt;id&gt;/best</code>.</p>
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
    lines += ["", "## Trials, ranked by best validation loss", "",
              "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(c, r.get(c)).replace("|", "\\|") for c in cols) + " |")
    lines += ["", "## Plots", ""]
    for name in PLOTS:
        lines += [f"![{name}](plots/{name}.png)", "", CAPTIONS[name], ""]
    lines += ["## Search space", ""] + [f"- `{n}`: {d}" for n, d in _space_lines(data)]
    errs = [t for t in data.trials if t.error_text]
    if errs:
        lines += ["", "## Errors", ""]
        for t in errs:
            lines += [f"### {t.trial_id}", "", "```", (t.error_text or "").strip(), "```", ""]
    return "\n".join(lines) + "\n"


TEXT_HIDDEN = {"best_val_ppl", "final_val_ppl", "cpu_hours", "gpu_hours", "error"}  # in report.md, too wide here


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
    (out / "plots").mkdir(parents=True, exist_ok=True)
    plots = {name: out / "plots" / f"{name}.png" for name in PLOTS}
    plot_learning_curves(data, plots["learning_curves"])
    plot_loss_vs_hparams(data, plots["loss_vs_hparams"])
    plot_parallel(data, plots["parallel_coordinates"])
    plot_best_so_far(data, plots["best_so_far"])
    plot_importance(data, plots["importance"])
    write_csv(data, out / "trials.csv")
    _write(out / "report.md", render_md(data))
    _write(out / "report.html", render_html(data, plots))
    return {name: str(out / name) for name in FILES}


def write_report(search_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Report:
    data = load_search(search_dir)
    return Report(data, render(data, out_dir or data.search_dir))


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
    for name in ("report.html", "report.md", "trials.csv"):
        print(f"[aigc] {rep.files[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
