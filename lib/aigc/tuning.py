"""The Ray Tune pieces a search runs with: ASHA that keeps a ledger, the seeded searcher, report forwarding.

Imports Tune, so `aigc.search` imports this module only once a search is about to run (its config is
validated without Ray). What these classes need of Tune's private parts is in `aigc.raycompat`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from aigc import raycompat
from aigc.layout import TUNE_RESULTS, read_json_lines
from aigc.search_config import SearchConfig, full_rounds

METRIC, MODE = "val_loss", "min"
# Metrics the Train loop reports that Tune reserves for itself: a worker's `done: true` would make Tune stop
# the trial (and kill its actor) before the driver exports the trained model.
RENAMED_METRICS = {"done": "run_done"}


class ForwardToTune(TuneReportCallback):
    """`TuneReportCallback` that renames the metrics Tune reserves (see RENAMED_METRICS). Make it inside the
    Tune trial whose report queue it holds."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        metrics = [{RENAMED_METRICS.get(k, k): v for k, v in m.items()} for m in metrics]
        super().after_report(run_context, metrics, checkpoint)


class RecordingASHA(AsyncHyperBandScheduler):
    """ASHA that writes each stop to the search's ledger (for the report), never stops a trial at its last
    validation (it has finished training and is about to export its model), and on a resumed search
    rebuilds its rungs from the trials' results on disk (Tune does not save scheduler state, so without this
    the trials still to come would be judged against nobody)."""

    def __init__(self, ledger: Path, tune_dir: Path, *, max_t: int, **asha: Any):
        super().__init__(max_t=max_t, **asha)
        self.ledger, self.tune_dir, self.horizon = ledger, tune_dir, max_t
        self.replayed = False

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        if not self.replayed:
            self.replayed = True
            for results in self.tune_dir.glob(f"*/{TUNE_RESULTS}"):
                seen = [r for r in read_json_lines(results) if r.get("step") is not None and r.get(METRIC) is not None]
                raycompat.replay_into_asha(self, results.parent.name, seen, "step", METRIC)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get("step", 0) >= self.horizon:
            return TrialScheduler.CONTINUE
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP:
            with open(self.ledger, "a") as f:
                f.write(json.dumps({"trial_id": trial.trial_id, "step": result.get("step"),
                                    "val_loss": result.get(METRIC), "time": time.time()}) + "\n")
        return decision


def asha_steps(cfg: SearchConfig) -> dict[str, int]:
    """ASHA's grace period and horizon in optimizer steps (Tune's time attribute here is `step`)."""
    a, every = cfg.search.asha, cfg.base.eval.every_steps
    return {"grace_period": a.grace_period * every,
            "max_t": min((a.max_t or full_rounds(cfg.base)) * every, cfg.base.optim.max_steps)}


def scheduler(cfg: SearchConfig, ledger: Path, tune_dir: Path) -> RecordingASHA | None:
    """The search's trial scheduler: ASHA on validation loss in optimizer steps, or None (FIFO) when off."""
    if not cfg.search.asha.enabled:
        return None
    steps = asha_steps(cfg)
    return RecordingASHA(ledger, tune_dir, time_attr="step", max_t=steps["max_t"], grace_period=steps["grace_period"],
                         reduction_factor=cfg.search.asha.reduction_factor, stop_last_trials=False)


class SeededVariants(BasicVariantGenerator):
    """Random or grid variants from a seeded generator, with their own trials-at-once limit (Tune applies
    `max_concurrent_trials` only to a Searcher). A resumed search restores the generator, and the limit
    saved with it, from disk; `resume_limit`, when set, replaces that limit with this driver's (the cluster
    it resumes on may be another size)."""

    resume_limit = 0  # set by the driver before `Tuner.restore`; 0 keeps the saved limit

    def set_state(self, state: dict) -> None:  # called on resume
        super().set_state(state)
        raycompat.set_restored_variant_limit(self, SeededVariants.resume_limit or self.max_concurrent)


def searcher(cfg: SearchConfig, concurrency: int) -> tuple[Any, int | None]:
    """(search algorithm, max_concurrent_trials for TuneConfig): Tune applies that limit only to a Searcher
    (Optuna); a seeded variant generator carries its own."""
    if cfg.search.algorithm == "optuna":
        import optuna  # the optional extra: imported only when asked for (check_algorithm says how to get it)
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=cfg.search.seed)), concurrency
    return SeededVariants(random_state=cfg.search.seed, max_concurrent=concurrency), None
