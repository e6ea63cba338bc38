"""The report's plots: one PNG per view of a search, drawn with matplotlib's Agg backend (files, no display)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # set before pyplot is imported, as matplotlib asks: PNG files, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from aigc.layout import PLOTS_DIR
from aigc.report_data import SearchData, TrialRecord, importance

PLOTS = ("learning_curves", "loss_vs_hparams", "parallel_coordinates", "best_so_far", "importance")
STATUS_COLOURS = {"completed": "#1a7f37", "stopped by ASHA": "#9a6700", "early-stopped": "#0969da",
                  "error": "#cf222e", "running": "#6639ba", "pending": "#57606a", "interrupted": "#57606a"}


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#57606a")
    ax.set_xticks([])
    ax.set_yticks([])


def _colours(n: int) -> list[Any]:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def fmt(v: Any, digits: int = 4) -> str:
    """How the report shows a value: floats to `digits` places (or significant digits when tiny or huge),
    True as yes, None and nan as nothing."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.{digits}f}".rstrip("0").rstrip(".") or "0"
    return str(v)


def plot_learning_curves(data: SearchData, path: Path) -> None:
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
                      + " ".join(f"{k}={fmt(v, 2)}" for k, v in t.params.items()))
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
            ax.set_xticks(distinct, [fmt(float(x), 3) for x in distinct], rotation=30)
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
        ax.text(j, -0.06, fmt(float(raw_lo), 3), ha="center", va="top", fontsize=8)
        ax.text(j, 1.06, fmt(float(raw_hi), 3), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(axes)))
    ax.set_xticklabels([a + (" (log)" if a != "best val loss" and data.is_log(a) else "") for a in axes])
    ax.set_yticks([])
    ax.set_ylim(-0.15, 1.15)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(lmin, lmax))
    fig.colorbar(sm, ax=ax, label="best validation loss")
    ax.set_title("Parallel coordinates: one line per trial (thick = best, dashed = stopped by ASHA)", pad=18)
    _save(fig, path)


def plot_best_so_far(data: SearchData, path: Path) -> None:
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


def draw_plots(data: SearchData, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Draw every plot of `data` into `<out_dir>/plots/`; returns {plot name: PNG path}."""
    paths = {name: Path(out_dir) / PLOTS_DIR / f"{name}.png" for name in PLOTS}
    paths[PLOTS[0]].parent.mkdir(parents=True, exist_ok=True)
    plot_learning_curves(data, paths["learning_curves"])
    plot_loss_vs_hparams(data, paths["loss_vs_hparams"])
    plot_parallel(data, paths["parallel_coordinates"])
    plot_best_so_far(data, paths["best_so_far"])
    plot_importance(data, paths["importance"])
    return paths
