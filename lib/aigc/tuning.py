"""The Ray Tune pieces a search's driver runs with: ASHA that keeps a ledger, the seeded searcher, trial tracking.

Imports Tune, so `aigc.search` imports this module only once a search is about to run (its config is
validated without Ray). What these classes need of Tune's private parts is in `aigc.raycompat`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from aigc import raycompat, tracking
from aigc.layout import TRACKING_RECORD, TUNE_RESULTS, read_json_lines, trial_run_name
from aigc.search_config import SearchConfig, full_rounds

METRIC, MODE = "val_loss", "min"
class TrackTrials(Callback):
    """Each trial as a child run of the search's MLflow run, logged from the search's driver: its hyperparameters
    when it starts, its validation metrics at their optimizer step, FINISHED or FAILED at its end. The child's
    run id goes into the trial's run folder (`mlflow_run.json`), where the report links it and a resumed search
    finds the same run again.

    Not Ray's `MLflowLoggerCallback`: that one steps metrics by Tune's iteration count (the fine-tune runs use the
    optimizer step), logs Tune's bookkeeping fields as metrics, starts a second run when a resumed search
    restarts a trial, and keeps its run ids to itself."""

    SKIP = (*AUTO_RESULT_KEYS, "step", "trial_id", "done")  # Tune's fields, not the trial's metrics

    def __init__(self, parent: tracking.TrackedRun, trials_dir: Path):
        self.parent, self.trials_dir = parent, Path(trials_dir)
        self.runs: dict[str, tracking.TrackedRun] = {}

    def _guarded(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # a tracking store that is down must not stop the search (its files have it all)
            print(f"[aigc] tracking: could not {what} in MLflow: {e}", flush=True)
            return None

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        name = trial_run_name(trial.trial_id)
        run = self._guarded(f"start the run of trial {trial.trial_id}", self.parent.start_child, name,
                            params=trial.config, tags={tracking.KIND_TAG: "trial", "aigc.trial_id": trial.trial_id},
                            record=self.trials_dir / name / TRACKING_RECORD)
        if run:
            self.runs[trial.trial_id] = run

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        run = self.runs.get(trial.trial_id)
        if run and result.get("step") is not None:
            self._guarded(f"log step {result['step']} of trial {trial.trial_id}", run.log_metrics, result,
                          step=result["step"], exclude=self.SKIP)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FAILED")

    def _end(self, trial: Any, status: str) -> None:
        run = self.runs.pop(trial.trial_id, None)
        if run:
            self._guarded(f"end the run of trial {trial.trial_id}", run.end, status)


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
