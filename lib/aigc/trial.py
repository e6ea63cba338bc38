"""One trial of a search: what runs in Tune's trial actor, and the actor that runs the trial's fine-tune.

Tune starts a fresh process for each trial and unpickles `run_trial` there, which imports this module. So it
imports no more than a trial needs to name its run, record its attempts, forward its reports to Tune and wait
(Tune, the configs, storage): not `aigc.search` or `aigc.finetune`, which would cost every trial ~4 s of
importing transformers, DeepSpeed and the data pipeline in a process that trains nothing, nor MLflow. The
fine-tune runs in `TrialDriver`, its own actor, which imports `aigc.finetune` when it starts the run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from aigc import storage
from aigc.config import FinetuneConfig, build, run_dir_of, run_location
from aigc.layout import ASHA_LEDGER, TRIAL_ATTEMPTS, TRIAL_DONE, TRIALS_DIR, read_json_lines, trial_run_name
from aigc.search_config import SearchConfig, search_dir_of, search_location, set_param

# Metrics the Train loop reports that Tune reserves for itself: a worker's `done: true` would make Tune stop
# the trial (and kill its actor) before the driver exports the trained model.
RENAMED_METRICS = {"done": "run_done"}


class ForwardToTune(TuneReportCallback):
    """`TuneReportCallback` that renames the metrics Tune reserves (see RENAMED_METRICS). Make it inside the
    Tune trial whose report queue it holds."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        metrics = [{RENAMED_METRICS.get(k, k): v for k, v in m.items()} for m in metrics]
        super().after_report(run_context, metrics, checkpoint)


def trial_config(cfg: SearchConfig, params: dict[str, Any], trial_id: str) -> FinetuneConfig:
    """The base config with the sampled hyperparameters set, named after the Tune trial, stored in the search."""
    data = cfg.base.model_dump(mode="json")
    for name, value in params.items():
        set_param(data, name, value)
    data["run"].update(name=trial_run_name(trial_id), storage_path=storage.join(search_location(cfg), TRIALS_DIR),
                       evaluate=False, samples=0)
    data["tracking"]["enabled"] = False  # the search's driver tracks each trial as its child run (tuning.TrackTrials)
    return build(FinetuneConfig, data, f"trial {trial_id}")


class TrialDriver:
    """Runs one trial's fine-tuning driver *outside* the Tune trial's placement group.

    Tune places a trial's actor in a 0.02-CPU placement group that captures every task the actor starts, so
    the driver's own Ray tasks (the model export asks for 1 CPU) could never be scheduled from there. This
    actor is created with the default scheduling strategy; it is owned by the trial actor and dies with it
    when Tune stops the trial.
    """

    def run(self, tcfg: dict[str, Any], callback: Any, prepared: Any) -> dict[str, Any]:
        # here, not at the top: this module is what the trial's own actor imports (see the module docstring)
        from aigc.finetune import run_finetune

        r = run_finetune(FinetuneConfig.model_validate(tcfg), callbacks=[callback], prepared=prepared)
        return {"best_dir": r.best_dir, "best_metrics": r.best_metrics, "final_metrics": r.metrics}


def ended_before(sdir: Path, run_dir: Path, trial_id: str, location: str | None = None) -> str | None:
    """How a trial ended, when its own files say it has: exported its model, or stopped by ASHA. `location`: the
    trial run's object-store copy, where its end is recorded too.

    Tune saves a trial's end in its experiment state a moment after the trial writes it here; a search
    interrupted in that moment restores the trial as unfinished and starts it again.
    """
    if (run_dir / TRIAL_DONE).is_file() or (location and storage.exists(storage.join(location, TRIAL_DONE))):
        return "finished"
    if any(s.get("trial_id") == trial_id for s in read_json_lines(sdir / ASHA_LEDGER)):
        return "was stopped by ASHA"
    return None


def run_trial(params: dict[str, Any], search: dict[str, Any] | None = None, prepared: list[Any] | None = None) -> None:
    """One Tune trial: a full fine-tune of the base config with `params` set. `prepared`: `[ref]`, the object ref
    of the search's `aigc.finetune.Prepared` in a list, so that this actor passes it on without loading it."""
    cfg = SearchConfig.model_validate(search)
    trial_id = tune.get_context().get_trial_id()
    tcfg = trial_config(cfg, params, trial_id)
    run_dir, loc = run_dir_of(tcfg), run_location(tcfg)
    remote = storage.is_uri(loc)
    ended = ended_before(search_dir_of(cfg), run_dir, trial_id, loc if remote else None)
    if ended:  # Tune was interrupted before it recorded the end: do not train (or export) it again
        print(f"[aigc] trial {trial_id} {ended} before the search was interrupted; not run again", flush=True)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    if remote:  # this node's staging copy may be stale or missing: the bucket has every attempt so far
        storage.pull_files(loc, run_dir, [TRIAL_ATTEMPTS])
    with open(run_dir / TRIAL_ATTEMPTS, "a") as f:  # a retried or resumed trial adds a line
        f.write(json.dumps({"started": time.time(), "pid": os.getpid()}) + "\n")
    if remote:  # the search's driver reads a bucket's trials from the bucket
        storage.push_files(run_dir, loc, [TRIAL_ATTEMPTS])
    t0 = time.time()
    callback = ForwardToTune()  # made here, inside the Tune session whose report queue it holds
    driver = ray.remote(TrialDriver).options(num_cpus=0, scheduling_strategy="DEFAULT").remote()
    try:
        out = ray.get(driver.run.remote(tcfg.model_dump(mode="json"), callback, prepared[0]))
    finally:
        ray.kill(driver)
    (run_dir / TRIAL_DONE).write_text(json.dumps({"trial_id": trial_id, "params": params,
                                                  "wall_s": time.time() - t0, **out}, indent=2, default=str))
    if remote:
        storage.push_files(run_dir, loc, [TRIAL_DONE])
