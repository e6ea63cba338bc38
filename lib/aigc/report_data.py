"""A search as the report sees it: its trials read back from the search folder, ranked, and the numbers
the report derives from them (summary, parameter importance).

Reads only files (`aigc.layout` names them), never a live Ray, so a search that is still running, was
interrupted or crashed is read as far as it got.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from aigc.config import ScalingSection
from aigc.layout import (
    ASHA_LEDGER,
    BEST_DIR,
    METRICS_LOG,
    SEARCH_YAML,
    TRACKING_RECORD,
    TRIAL_DONE,
    TRIALS_DIR,
    TUNE_DIR,
    TUNE_ERROR,
    TUNE_PARAMS,
    TUNE_RESULTS,
    TUNE_STATE_GLOB,
    WINNER_DIR,
    read_json_lines,
    trial_run_name,
)
from aigc.modeldir import METADATA
from aigc.placement import trial_resources
from aigc.raycompat import tune_trial_states
from aigc.search_config import flat_space

# Columns of the trials table from a trial's evaluation (the winner's full table is its own section).
TRIAL_TASK_COLUMNS = ("floor_ratio", "greedy_valid_pct", "greedy_faithful_pct")
# Columns of the trials table from what a trial trains: its share of the model, and a LoRA adapter's size.
TRIAL_SIZE_COLUMNS = ("trainable_pct", "adapter_mb")


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
    evaluation: dict[str, Any] | None = None  # the best model's before/after evaluation, when the trial ran one
    adapter: bool = False  # trains a LoRA adapter (base.model.peft.method)
    mlflow_run: dict[str, Any] | None = None  # the trial's MLflow run ({"run_id", "url", ...}) when it was tracked

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
            "best_val_loss": b and b["val_loss"], "best_epsilon": b and b.get("epsilon"), "best_val_ppl": b and b.get("val_ppl"),
            "best_step": b and b["step"], "final_val_loss": f and f["val_loss"], "final_val_ppl": f and f.get("val_ppl"),
            "steps": self.steps, "asha_stopped": self.asha_stop_step is not None, "asha_stop_step": self.asha_stop_step,
            "early_stopped": self.status == "early-stopped", "error": self.error, "num_failures": self.num_failures,
            "wall_s": round(self.wall_s, 1), "cpu_hours": round(self.cpu_hours, 5), "gpu_hours": round(self.gpu_hours, 5),
            "model_dir": self.model_dir, **{k: self.tuned.get(k) for k in TRIAL_TASK_COLUMNS}, **self.sizes(),
            "mlflow_run": (self.mlflow_run or {}).get("run_id"), "mlflow_url": (self.mlflow_run or {}).get("url"),
        }

    def sizes(self) -> dict[str, float | None]:
        """Trainable share of the parameters (%) when not all train and, for a LoRA trial, the adapter's size in
        MB: the exported adapter holds exactly the trainable tensors, in fp32 (4 bytes each, plus a few KB)."""
        last = self.history[-1] if self.history else {}
        trainable, total = last.get("trainable_params"), last.get("total_params")
        if not trainable or not total or trainable == total:
            return dict.fromkeys(TRIAL_SIZE_COLUMNS)
        return {"trainable_pct": 100 * trainable / total, "adapter_mb": trainable * 4 / 1e6 if self.adapter else None}

    @property
    def tuned(self) -> dict[str, Any]:
        """The fine-tuned side of the trial's evaluation ({} when it was not evaluated)."""
        return (self.evaluation or {}).get("finetuned") or {}


@dataclass
class SearchData:
    """A search as read from disk: its config (as a plain dict) and its trials, ranked best first."""

    search_dir: str
    config: dict[str, Any]
    trials: list[TrialRecord]
    winner: dict[str, Any] | None = None  # {"path", "trial", "metrics", "step", "evaluation"} from winner/aigc.json
    started: float | None = None  # unix time of the first trial start

    @property
    def name(self) -> str:
        return self.config.get("search", {}).get("name") or Path(self.search_dir).name

    @property
    def space(self) -> dict[str, dict[str, Any]]:
        return flat_space(self.config.get("space") or {})

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



# --------------------------------------------------------------------------------------------- load


def _history(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validation reports by step; a retried or resumed trial may repeat a step: the later report wins."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in results:
        if r.get("val_loss") is None or r.get("step") is None:
            continue
        by_step[int(r["step"])] = {k: r.get(k) for k in ("step", "val_loss", "val_ppl", "train_loss", "best_val_loss",
                                                          "lr", "tokens_seen", "stopped_early", "run_done", "epsilon",
                                                          "timestamp", "time_total_s", "trainable_params",
                                                          "total_params")}
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
    held = trial_resources(ScalingSection.model_validate(base.get("scaling") or {}))
    cpus, gpus = held.get("CPU", 0.0), held.get("GPU", 0.0)
    max_steps = (base.get("optim") or {}).get("max_steps")
    asha_on = ((config.get("search") or {}).get("asha") or {}).get("enabled", True)
    space = list(flat_space(config.get("space") or {}))
    adapter = ((base.get("model") or {}).get("peft") or {}).get("method", "none") != "none"

    exp = sdir / TUNE_DIR
    # One state file per driver session, named by its start time; the newest session's holds the current
    # status (not the newest mtime: Tune rewrites the older files when it syncs the experiment folder).
    state_files = sorted(exp.glob(TUNE_STATE_GLOB), key=lambda p: p.name)
    states = tune_trial_states(state_files[-1]) if state_files else {}
    stops = {s["trial_id"]: s for s in read_json_lines(sdir / ASHA_LEDGER)}
    ids = sorted(set(states) | {p.name for p in exp.iterdir() if p.is_dir() and (p / TUNE_PARAMS).is_file()}
                 if exp.is_dir() else set(states))
    trials, starts = [], []
    for tid in ids:
        tdir, st = exp / tid, states.get(tid, {})
        params = st.get("config") or {}
        if (tdir / TUNE_PARAMS).is_file():
            params = json.loads((tdir / TUNE_PARAMS).read_text())
        params = {k: v for k, v in params.items() if not space or k in space}
        results = read_json_lines(tdir / TUNE_RESULTS)
        run_dir = sdir / TRIALS_DIR / trial_run_name(tid)
        # Tune's result.json misses the reports that arrived while a search was being interrupted (the Train
        # run resumes after them); the run's own log has every one. Tune's line wins where both have a step.
        run_log = [{**r, "run_done": r.get("done")} for r in read_json_lines(run_dir / METRICS_LOG)]
        hist = _history(run_log + results)
        err, err_text = _error(tdir / TUNE_ERROR)
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
        best_dir = run_dir / BEST_DIR / METADATA
        evaluation = json.loads(best_dir.read_text()).get("evaluation") if best_dir.is_file() else None
        tracked = run_dir / TRACKING_RECORD
        trials.append(TrialRecord(
            trial_id=tid, status=status, params=params, history=hist, error=err, error_text=err_text,
            asha_stop_step=(stop or {}).get("step"), wall_s=wall, cpu_hours=wall * cpus / 3600,
            gpu_hours=wall * gpus / 3600, num_failures=int(st.get("num_failures") or 0),
            model_dir=str(best_dir.parent) if best_dir.is_file() else None, evaluation=evaluation, adapter=adapter,
            mlflow_run=json.loads(tracked.read_text()) if tracked.is_file() else None,
        ))
    trials.sort(key=lambda t: (t.best_val_loss is None, t.best_val_loss if t.best_val_loss is not None else 0, t.trial_id))
    winner = None
    if (sdir / WINNER_DIR / METADATA).is_file():
        meta = json.loads((sdir / WINNER_DIR / METADATA).read_text())
        winner = {"path": str(sdir / WINNER_DIR), "trial": meta.get("trial"), "metrics": meta.get("metrics", {}),
                  "step": meta.get("step"), "evaluation": meta.get("evaluation")}
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
