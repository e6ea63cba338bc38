"""Hyperparameter search: space -> trials -> winner, with Ray Tune over the fine-tuning driver.

Each trial is a full Ray Train + DeepSpeed fine-tune through `aigc.finetune.run_finetune` (the same driver
as `jobs/finetune.py`), launched from a Tune function trainable (`aigc.trial`) whose own actor asks for almost
nothing; its Train reports reach Tune through `TuneReportCallback` (Ray 2.60 rejects `Tuner(trainer)`). The data
and the base model are prepared once per search and shared with every trial. ASHA stops the trials that
fall behind; the best trial's model is copied to `winner/` and the report is written.

The config is `aigc.search_config`, the folder's layout `aigc.layout`, how many trials fit the cluster
`aigc.placement`, the Tune scheduler and searcher `aigc.tuning`, the report `aigc.report`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import ray.data
import yaml
from ray import tune

from aigc import console, storage, tracking, tuning
from aigc.config import ConfigError, FinetuneConfig, to_yaml
from aigc.evaluate import task_eval_inputs
from aigc.finetune import (
    Prepared,
    evaluate_against_base,
    export_checkpoint,
    init_ray,
    prepare,
)
from aigc.layout import (
    ASHA_LEDGER,
    BASE_DIR,
    BEST_DIR,
    METRICS_LOG,
    PLOTS_DIR,
    REPORT_HTML,
    REPORT_MD,
    RUN_CONFIG,
    SEARCH_YAML,
    TRACKING_RECORD,
    TRIAL_ATTEMPTS,
    TRIAL_DONE,
    TRIALS_CSV,
    TRIALS_DIR,
    TUNE_DIR,
    TUNE_STATE_GLOB,
    WINNER_DIR,
    trial_run_name,
)
from aigc.modeldir import ModelDirError, copy_model_dir, read_metadata, verify_model_dir
from aigc.placement import (
    TRIAL_DRIVER_CPU,
    NodeType,
    autoscaler_node_types,
    cluster_capacity,
    describe,
    fitting_trials,
    trial_bundles,
)
from aigc.pretrain import resolve_base
from aigc.raycompat import PlacementGroupReaper
from aigc.report import render_text, write_report
from aigc.report_data import load_search
from aigc.search_config import (
    PARAMS,
    SearchConfig,
    check_algorithm,
    search_dir_of,
    search_location,
    total_trials,
)
from aigc.trial import run_trial

# ----------------------------------------------------------------------------------------------- space


def tune_space(cfg: SearchConfig) -> dict[str, Any]:
    """The Tune param space: distributions for random/optuna, `grid_search` lists for grid."""
    out = {}
    for name, spec in cfg.space.searched().items():
        values = [int(v) for v in spec.candidates()] if PARAMS[name].integer else spec.candidates()
        if cfg.search.algorithm == "grid":
            out[name] = tune.grid_search(values)
        elif spec.kind == "loguniform":
            out[name] = tune.loguniform(spec.low, spec.high)
        elif spec.kind == "uniform":
            out[name] = tune.uniform(spec.low, spec.high)
        else:
            out[name] = tune.choice(values)
    return out


# ---------------------------------------------------------------------------------------- concurrency


def cluster_nodes() -> list[dict[str, float]]:
    """The resources of every alive node of the connected cluster."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def plan_concurrency(cfg: SearchConfig, nodes: list[dict[str, float]], types: list[NodeType] = ()) -> int:
    """Trials at once: what fits the cluster (live nodes plus what the autoscaler may add), capped by
    search.max_concurrent and the number of trials.

    A trial that cannot fit at all would wait forever; that is a configuration error, raised here."""
    limit = total_trials(cfg)
    bundles = limit * (1 + cfg.base.scaling.num_workers)
    fits = fitting_trials(cluster_capacity(nodes, list(types), most=bundles), cfg.base.scaling, limit=limit)
    if fits == 0:
        sc = cfg.base.scaling
        per = f"{sc.cpus_per_worker:g} CPU" + (f" + {sc.gpus_per_worker:g} GPU" if sc.use_gpu else "")
        have = describe(nodes)
        if types:
            have += "; and the autoscaler may add " + ", ".join(
                f"{t.max_workers} x {t.name} {describe([t.resources])}" for t in types)
        raise ConfigError([
            f"base.scaling.num_workers: one trial needs {sc.num_workers} workers x ({per}) "
            f"(base.scaling.cpus_per_worker={sc.cpus_per_worker:g}"
            + (f", base.scaling.gpus_per_worker={sc.gpus_per_worker:g}" if sc.use_gpu else "")
            + f") plus {TRIAL_DRIVER_CPU} CPU for the trial, but the cluster's nodes have {have}; "
            "lower these or add nodes"], "search for this cluster")
    cap = cfg.search.max_concurrent or fits
    return max(1, min(fits, cap, total_trials(cfg)))


# --------------------------------------------------------------------------------- staging and resume


# The files of an object-store search its driver keeps a staging copy of: its own, Tune's folder, and of each
# trial run what the report reads (the models stay in the bucket until the winner is exported)
SEARCH_FILES = [SEARCH_YAML, ASHA_LEDGER, TRACKING_RECORD]
TRIAL_FILES = [RUN_CONFIG, METRICS_LOG, TRIAL_DONE, TRIAL_ATTEMPTS]


def pull_search(location: str, sdir: Path) -> None:
    """An object-store search's files into its staging folder: to resume it, and to report on it after Tune ran
    its trials (on any node: their files are in the bucket)."""
    sdir.mkdir(parents=True, exist_ok=True)
    storage.pull_files(location, sdir, SEARCH_FILES, dirs=(TUNE_DIR,))
    trials = storage.join(location, TRIALS_DIR)
    if storage.exists(trials):
        for run in storage.listdir(trials):
            storage.pull_files(storage.join(trials, run), sdir / TRIALS_DIR / run, TRIAL_FILES)


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


# Keys that may change when an interrupted search is resumed; anything else would mix two searches.
RESUMABLE_CHANGES = ("search.max_concurrent", "search.max_failures", "search.resume_errored",
                     "base.scaling.max_failures", "base.eval.log_every", "base.run.torch_extensions_dir")


def check_resume(cfg: SearchConfig, sdir: Path) -> bool:
    """True when `sdir` holds a started search to resume; a ConfigError when it was started with another
    config. (A folder whose search never reached Tune, e.g. a data error, is simply started again.)"""
    saved_path = sdir / SEARCH_YAML
    if not saved_path.is_file() or not any((sdir / TUNE_DIR).glob(TUNE_STATE_GLOB)):
        return False
    saved = tracking.flatten(yaml.safe_load(saved_path.read_text()) or {})
    now = tracking.flatten(cfg.model_dump(mode="json"))
    differ = sorted(k for k in set(saved) | set(now)
                    if saved.get(k) != now.get(k) and not k.startswith(RESUMABLE_CHANGES))
    if differ:
        raise ConfigError([f"{k}: {saved.get(k)!r} in the existing search, {now.get(k)!r} now" for k in differ]
                          + [f"search.name: {sdir} holds a search with another config; resume it unchanged or "
                             "choose a new search.name"], "resume")
    return True


# ------------------------------------------------------------------------------------------- driver


@dataclass
class SearchResult:
    """What `run_search` returns: where the search is, its ranked trials, the winner and the report."""

    search_dir: str
    trials: list[dict[str, Any]]  # the report's ranked table rows
    best_trial: str | None
    best_params: dict[str, Any]
    best_metrics: dict[str, Any]
    winner_dir: str | None
    report: dict[str, str]  # name -> path
    interrupted: bool = False
    concurrency: int = 0
    resumed: bool = False
    errors: dict[str, str] = field(default_factory=dict)


def check_batch_sizes(cfg: SearchConfig, train_blocks: int) -> None:
    """Every micro-batch size in the space must leave each worker at least one optimizer step of data
    (the driver checks only the base config's)."""
    spec = cfg.space.micro_batch_size
    if spec is None:
        return
    w, accum = cfg.base.scaling.num_workers, cfg.base.optim.grad_accum
    bad = [f"space.micro_batch_size.values[{i}]: {int(v)} x {w} workers x {accum} grad_accum = {int(v) * w * accum} "
           f"blocks a step, but the train split has {train_blocks}" for i, v in enumerate(spec.candidates())
           if int(v) * w * accum > train_blocks]
    if bad:
        raise ConfigError(bad, "search space for this data")


def _share_ready(prepared: Any, num_workers: int) -> Any:
    """The prepared data with train/validation re-blocked so that each rank's equal shard is whole blocks.

    `run_finetune` cuts per-rank shards with `Dataset.split(equal=True)`; on unaligned blocks that launches
    1-CPU split tasks, which cannot start while the other trials' workers hold every CPU (each trial would
    wait for the others to end). Splitting once here, while the cluster is free, leaves nothing to cut later.
    """
    datasets = dict(prepared.packed.datasets)
    for name in ("train", "validation"):
        shards = datasets[name].split(num_workers, equal=True)
        datasets[name] = (shards[0].union(*shards[1:]) if len(shards) > 1 else shards[0]).materialize()
    # The HF splits stay on the driver: trials need only the packed blocks.
    return replace(prepared, packed=replace(prepared.packed, datasets=datasets), splits=None)


def run_search(cfg: SearchConfig, tune_callbacks: list[Any] | None = None) -> SearchResult:
    """Run (or resume) a search to the end, export the winner, write the report. See the module docstring."""
    problems = cfg.problems()
    if problems:
        raise ConfigError(problems, "search config")
    check_algorithm(cfg)
    sdir, loc = search_dir_of(cfg), search_location(cfg)
    remote = storage.is_uri(loc)
    if remote:  # an object-store search: its driver works in a staging copy, its trials store in the bucket
        storage.check_writable(loc)  # a missing or unauthorised bucket fails here, before any trial starts
        shutil.rmtree(sdir, ignore_errors=True)  # the bucket is the search: start from its files, not a stale copy
        pull_search(loc, sdir)
    resuming = check_resume(cfg, sdir)

    init_ray()
    # Trials are compared with each other and a resumed search re-prepares the data: both need the packed
    # blocks in the same order every time, which Ray Data guarantees only when asked to preserve it.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    live, types = cluster_nodes(), autoscaler_node_types()
    concurrency = plan_concurrency(cfg, live, types)
    fit_now = fitting_trials(live, cfg.base.scaling, limit=concurrency)
    if fit_now < concurrency:  # only possible with autoscaled types: otherwise the live nodes are the plan
        print(f"[aigc] {fit_now} of the {concurrency} concurrent trials fit the nodes up now; the rest wait for "
              "the autoscaler to add " + ", ".join(t.name for t in types), flush=True)
    sdir.mkdir(parents=True, exist_ok=True)
    (sdir / SEARCH_YAML).write_text(to_yaml(cfg))
    if remote:
        storage.push_files(sdir, loc, [SEARCH_YAML])
    print(f"[aigc] search {cfg.search.name}: {total_trials(cfg)} trials, {concurrency} at a time "
          f"({cfg.search.algorithm}{', ASHA' if cfg.search.asha.enabled else ''}) -> {sdir}", flush=True)
    # search.yaml keeps what was asked for (a resume compares it); the trials fine-tune the resolved base
    cfg = cfg.model_copy(update={"base": resolve_base(cfg.base)})
    tracked = start_tracking(cfg, sdir)

    with PlacementGroupReaper():  # frees the reservations of trials Tune stopped (see its docstring)
        full = prepare(cfg.base, sdir)
        if remote and Path(full.base) == sdir / BASE_DIR:  # a base built here: the trials' workers read the bucket's
            full = replace(full, base=storage.publish_dir_once(sdir / BASE_DIR, storage.join(loc, BASE_DIR)))
        prepared = _share_ready(full, cfg.base.scaling.num_workers)
        check_batch_sizes(cfg, prepared.packed.blocks["train"])
        trainable = tune.with_resources(
            # the prepared data as a ref in a list: the trial's actor hands it to its driver without loading it
            tune.with_parameters(run_trial, search=cfg.model_dump(mode="json"), prepared=[ray.put(prepared)]),
            trial_bundles(cfg.base.scaling)[0],  # the trial's own actor; its Train workers ask for theirs
        )
        exp = storage.join(loc, TUNE_DIR)  # Tune's own folder: in the bucket for an object-store search
        tuning.SeededVariants.resume_limit = concurrency
        if resuming and tune.Tuner.can_restore(exp):
            print(f"[aigc] resuming the search in {storage.redact(exp)}: finished trials are kept, unfinished ones "
                  "continue", flush=True)
            tuner = tune.Tuner.restore(exp, trainable, resume_unfinished=True,
                                       resume_errored=cfg.search.resume_errored)
        else:
            search_alg, max_concurrent = tuning.searcher(cfg, concurrency)
            tuner = tune.Tuner(
                trainable,
                param_space=tune_space(cfg),
                tune_config=tune.TuneConfig(
                    metric=tuning.METRIC, mode=tuning.MODE, num_samples=cfg.search.num_samples,
                    search_alg=search_alg, scheduler=tuning.scheduler(cfg, sdir / ASHA_LEDGER, sdir / TUNE_DIR),
                    max_concurrent_trials=max_concurrent, reuse_actors=False,
                    trial_name_creator=_trial_dirname, trial_dirname_creator=_trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=TUNE_DIR, storage_path=loc,
                    callbacks=[*(tune_callbacks or []), *([tuning.TrackTrials(tracked, sdir / TRIALS_DIR)] if tracked else [])],
                    failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures),
                    verbose=console.tune_verbosity(),  # silent at info: the trial table is printed below
                ),
            )
        tuner.fit()  # errors are per trial (recorded on disk); Ctrl-C / SIGUSR1 stops it with the state saved
    if remote:
        storage.push_files(sdir, loc, [ASHA_LEDGER, TRACKING_RECORD])
        pull_search(loc, sdir)  # Tune's folder and the trials' files, written on whichever nodes ran them
    interrupted = _interrupted(sdir)

    winner = None if interrupted else export_winner(cfg, sdir)
    winner_at = storage.join(loc, WINNER_DIR) if winner and remote else winner
    if winner and remote:
        storage.publish_dir(winner, winner_at)
    if winner and cfg.base.run.evaluate:
        evaluate_winner(cfg.base, full, winner, read_from=winner_at if remote else None)
        if remote:  # its aigc.json now holds the evaluation
            storage.publish_dir(winner, winner_at)
    report = write_report(sdir, location=loc if remote else None)
    if remote:
        storage.push_files(sdir, loc, [REPORT_HTML, REPORT_MD, TRIALS_CSV, PLOTS_DIR])
    if tracked:
        finish_tracking(tracked, sdir, report.files, winner, interrupted)
    data = report.data
    print(render_text(data), flush=True)
    best = data.trials[0] if data.trials and data.trials[0].best_val_loss is not None else None
    return SearchResult(
        search_dir=str(sdir), trials=[t.row() for t in data.trials], best_trial=best.trial_id if best else None,
        best_params=dict(best.params) if best else {}, best_metrics=dict(best.best_metrics) if best else {},
        winner_dir=str(winner_at) if winner else None, report=report.files, interrupted=interrupted,
        concurrency=concurrency, resumed=resuming, errors={t.trial_id: t.error for t in data.trials if t.error},
    )


def start_tracking(cfg: SearchConfig, sdir: Path) -> tracking.TrackedRun | None:
    """The search's MLflow run with its config as params (the same MLflow run when the search resumes); its trials
    become child runs (`tuning.TrackTrials`). None when `tracking.enabled` is false."""
    # an object-store search's default SQLite store lives beside its staging folder, as a fine-tune's does
    tracker = tracking.open_tracker(cfg.tracking, sdir.parent if storage.is_uri(cfg.search.storage_path)
                                    else cfg.search.storage_path)
    if tracker is None:
        return None
    return tracker.start_run(cfg.search.name, params=cfg.model_dump(mode="json"), tags={tracking.KIND_TAG: "search"},
                             record=sdir / TRACKING_RECORD)


def finish_tracking(run: tracking.TrackedRun, sdir: Path, report: dict[str, str], winner: Path | None,
                    interrupted: bool) -> None:
    """The report (HTML, Markdown, trials.csv, plots) and search.yaml as artifacts; the winner's evaluation and
    metrics, and the winner registered as the `challenger`; the run FINISHED, or KILLED when the search was
    interrupted (running it again continues the same MLflow run)."""
    run.log_artifacts([sdir / SEARCH_YAML])
    for name, path in report.items():
        run.log_artifacts([path], artifact_path=os.path.dirname(name) or None)
    registered = None
    if winner:
        meta = read_metadata(winner)
        run.log_metrics({f"winner.{k}": v for k, v in meta.get("metrics", {}).items()}, step=meta.get("step") or 0)
        if meta.get("evaluation"):
            run.log_evaluation(meta["evaluation"])
        registered = run.register_model(winner, alias=tracking.CHALLENGER)
    run.end("KILLED" if interrupted else "FINISHED")
    print(f"[aigc] tracked: MLflow run {run.run_id} in {run.tracker.uri} (a child run per trial)"
          + (f"; the winner is {run.tracker.registered_model} version {registered.version} ({tracking.CHALLENGER})"
             if registered else ""), flush=True)


def evaluate_winner(base_cfg: FinetuneConfig, prepared: Prepared, winner: Path, read_from: str | None = None) -> None:
    """The base-vs-winner evaluation (task metrics where the data has them) into the winner's aigc.json, once:
    trials skip evaluation to stay cheap, and a resumed search whose winner has it already does not redo it.
    `read_from`: the winner's object-store copy, which the evaluation tasks load (they may run on any node)."""
    if "evaluation" in read_metadata(winner):
        return
    evaluate_against_base(base_cfg, prepared, str(winner), task_eval_inputs(base_cfg, prepared.splits),
                          read_from=read_from)


def _interrupted(sdir: Path) -> bool:
    return any(t.status in ("running", "pending", "interrupted") for t in load_search(sdir).trials)


def export_winner(cfg: SearchConfig, sdir: Path) -> Path | None:
    """Copy the model of the trial with the lowest validation loss to `<search>/winner`, atomically."""
    data = load_search(sdir)
    ranked = [t for t in data.trials if t.best_val_loss is not None]
    if not ranked:
        print("[aigc] no trial reported a validation loss: no winner", flush=True)
        return None
    best = ranked[0]
    run_dir = sdir / TRIALS_DIR / trial_run_name(best.trial_id)
    best_dir = run_dir / BEST_DIR
    trial_loc = storage.join(search_location(cfg), TRIALS_DIR, trial_run_name(best.trial_id))
    remote = storage.is_uri(trial_loc)
    try:
        if remote:  # the trial's export, from the bucket (verified), when it got that far
            shutil.rmtree(best_dir, ignore_errors=True)
            storage.fetch_dir(storage.join(trial_loc, BEST_DIR), best_dir, verify=verify_model_dir)
        meta = verify_model_dir(best_dir)
        if meta.get("step") != best.best_step:
            raise ModelDirError(f"{best_dir}: step {meta.get('step')} is not the best step {best.best_step}")
    except (ModelDirError, storage.StorageError):
        _export_best_checkpoint(run_dir, best_dir, trial_loc if remote else None)  # stopped before its own export
    out = copy_model_dir(best_dir, sdir / WINNER_DIR, trial=best.trial_id, search=cfg.search.name,
                         hyperparameters=best.params, metrics=best.best_metrics,
                         search_config=cfg.model_dump(mode="json"), role="winner")
    print(f"[aigc] winner: trial {best.trial_id} (val loss {best.best_val_loss:.4f} at step {best.best_step}) "
          f"-> {out}", flush=True)
    return out


def _export_best_checkpoint(run_dir: Path, best_dir: Path, location: str | None = None) -> None:
    """Export the lowest-validation-loss checkpoint a Train run kept (ASHA may have stopped it before the
    driver's own export); `location`: the run's object-store folder, where its checkpoints are."""
    where = location or str(run_dir)
    names = storage.listdir(where) if storage.exists(where) else []
    ckpts = []
    for name in (n for n in names if n.startswith("checkpoint_")):
        m = storage.join(where, name, "metrics.json")
        if storage.exists(m):
            metrics = json.loads(storage.read_text(m))
            ckpts.append((metrics.get("val_loss", math.inf), storage.join(where, name), metrics))
    if not ckpts:
        raise RuntimeError(f"{storage.redact(where)}: no checkpoint to export the winner from")
    _, ckpt, metrics = min(ckpts, key=lambda c: c[0])
    config = yaml.safe_load((run_dir / RUN_CONFIG).read_text())
    with tempfile.TemporaryDirectory(prefix="aigc-ckpt-") as tmp:
        local = ckpt
        if location:
            local = os.path.join(tmp, "ckpt")
            storage.download_dir(ckpt, local)
        export_checkpoint(local, str(best_dir), config, metrics, role="best", run=run_dir.name,
                          source_checkpoint=storage.redact(ckpt))
