"""Hyperparameter search: Ray Tune over the fine-tuning driver, ASHA on validation loss, report, winner.

Each trial is a full Ray Train + DeepSpeed fine-tune through `aigc.finetune.run_finetune` (the same driver
as `jobs/finetune.py`), launched from a Tune function trainable whose own actor asks for almost nothing;
its Train reports reach Tune through `TuneReportCallback` (Ray 2.60 rejects `Tuner(trainer)`). The data
and the base model are prepared once per search and shared with every trial.

On disk, under `<search.storage_path>/<search.name>/`:

    search.yaml            the resolved search config (what the report and a resume compare against)
    base/                  the embedded base model (when no model.name_or_path is given)
    tune/<trial_id>/       Tune's per-trial params.json, result.json (one line per validation), error.txt
    trials/trial-<id>/     each trial's Train run: checkpoints, best/ and final/ model directories
    asha_stops.jsonl       one line per trial that ASHA stopped: when and at what loss
    winner/                the best trial's model directory (checksummed; what Serve deploys)
    report.html, report.md, trials.csv, plots/   see `aigc.report`
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field

from aigc import console
from aigc.clustercheck import NodeType, bin_pack, load_cluster, node_types
from aigc.config import ConfigError, FinetuneConfig, Strict, build, expand, to_yaml

TRIAL_DRIVER_CPU = 0.02  # the trial's own actor only waits on its Train run; its workers hold the real CPUs
TUNE_DIR, TRIALS_DIR, WINNER_DIR = "tune", "trials", "winner"
SEARCH_YAML, ASHA_LEDGER, TRIAL_DONE = "search.yaml", "asha_stops.jsonl", "trial.json"
METRIC, MODE = "val_loss", "min"
# Metrics the Train loop reports that Tune reserves for itself: a worker's `done: true` would make Tune stop
# the trial (and kill its actor) before the driver exports the trained model.
RENAMED_METRICS = {"done": "run_done"}

# --------------------------------------------------------------------------------------------- config


class ParamSpec(Strict):
    """How one hyperparameter is drawn. `kind` picks which of the other fields apply."""

    kind: Literal["loguniform", "uniform", "choice"]
    low: float | None = Field(None, description="lower end of a loguniform/uniform range")
    high: float | None = Field(None, description="upper end of a loguniform/uniform range")
    values: list[float] | None = Field(None, description="the candidates of a choice")
    grid_points: int = Field(
        3, ge=2, le=20, description="search.algorithm=grid only: points from low to high (log-spaced for loguniform)"
    )

    def candidates(self) -> list[float]:
        """The grid this spec stands for (choice: its values)."""
        if self.kind == "choice":
            return list(self.values or [])
        if self.kind == "loguniform":
            return [float(v) for v in np.geomspace(self.low, self.high, self.grid_points)]
        return [float(v) for v in np.linspace(self.low, self.high, self.grid_points)]


@dataclass(frozen=True)
class _Param:
    path: str  # the FinetuneConfig key it sets
    kinds: tuple[str, ...]
    lo: float  # allowed values: lo (<= or <) v (<= or <) hi, as the FinetuneConfig field allows
    lo_open: bool
    hi: float
    hi_open: bool
    integer: bool = False


# name -> what it sets and what the target field accepts (mirrors the bounds in aigc.config)
PARAMS: dict[str, _Param] = {
    "lr": _Param("optim.lr", ("loguniform", "choice"), 0.0, True, 1.0, False),
    "weight_decay": _Param("optim.weight_decay", ("loguniform", "choice"), 0.0, False, 1.0, False),
    "dropout": _Param("model.dropout", ("uniform", "choice"), 0.0, False, 1.0, True),
    "warmup_steps": _Param("optim.warmup_steps", ("choice",), 0, False, math.inf, True, integer=True),
    "micro_batch_size": _Param("optim.micro_batch_size", ("choice",), 1, False, math.inf, True, integer=True),
}


class SpaceConfig(Strict):
    """The search space; a parameter left out (null) keeps the value in `base`."""

    lr: ParamSpec | None = Field(
        default_factory=lambda: ParamSpec(kind="loguniform", low=3e-4, high=3e-2), description="optim.lr"
    )
    weight_decay: ParamSpec | None = Field(
        default_factory=lambda: ParamSpec(kind="choice", values=[0.0, 0.01, 0.1]), description="optim.weight_decay"
    )
    dropout: ParamSpec | None = Field(
        default_factory=lambda: ParamSpec(kind="uniform", low=0.0, high=0.2), description="model.dropout"
    )
    warmup_steps: ParamSpec | None = Field(None, description="optim.warmup_steps (choice of integers)")
    micro_batch_size: ParamSpec | None = Field(None, description="optim.micro_batch_size (choice of integers)")

    def searched(self) -> dict[str, ParamSpec]:
        return {name: spec for name in PARAMS if (spec := getattr(self, name)) is not None}


class AshaConfig(Strict):
    """Asynchronous successive halving on validation loss, counted in validation rounds (eval.every_steps)."""

    enabled: bool = Field(True, description="false: every trial trains to base.optim.max_steps (FIFO)")
    grace_period: int = Field(1, ge=1, description="validation rounds every trial gets before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1.0, description="keep the best 1/reduction_factor at each rung")
    max_t: int | None = Field(
        None, ge=1, description="rounds of a full trial; None = ceil(base.optim.max_steps / base.eval.every_steps)"
    )


class SearchSection(Strict):
    """How the search runs and where it is stored."""

    name: str = Field("search", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    storage_path: str = Field("~/aigc/searches", description="local or shared folder; the search is <path>/<name>")
    algorithm: Literal["random", "grid", "optuna"] = Field(
        "random", description="random sampling, every grid point, or Optuna TPE (pip install 'aigc[optuna]')"
    )
    num_samples: int = Field(
        8, ge=1, description="trials (random, optuna); for grid, how many times the whole grid is repeated"
    )
    seed: int = Field(0, description="seed of the sampler, so a search draws the same trials every time")
    asha: AshaConfig = Field(default_factory=AshaConfig)
    max_concurrent: int | None = Field(
        None, ge=1, description="trials at once; None = as many as the cluster's resources fit (never more)"
    )
    max_failures: int = Field(
        1, ge=-1, description="retries of a failed trial (its Train run resumes from its last checkpoint); -1 = unlimited"
    )
    resume_errored: bool = Field(False, description="on resume, also retry trials that had ended in an error")


class SearchConfig(Strict):
    """A search: the trial template (`base`, same keys as a job config), the space, and the search settings."""

    base: FinetuneConfig = Field(default_factory=FinetuneConfig)
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    search: SearchSection = Field(default_factory=SearchSection)

    def problems(self) -> list[str]:
        out = [f"base.{p}" for p in self.base.problems()]
        searched = self.space.searched()
        if not searched:
            out.append("space: no hyperparameter is searched; give at least one of " + ", ".join(PARAMS))
        for name, spec in searched.items():
            out += _spec_problems(name, spec, self.base)
        s, a = self.search, self.search.asha
        if "://" in s.storage_path:
            out.append(f"search.storage_path: the report and the winner are written to a local or shared folder, "
                       f"got the URI {s.storage_path!r}")
        rounds = full_rounds(self.base)
        if a.max_t is not None and a.max_t > rounds:
            out.append(f"search.asha.max_t: {a.max_t} rounds > the {rounds} validation rounds a trial has "
                       f"(base.optim.max_steps={self.base.optim.max_steps} / base.eval.every_steps="
                       f"{self.base.eval.every_steps})")
        if a.enabled and a.grace_period >= (a.max_t or rounds):
            out.append(f"search.asha.grace_period: {a.grace_period} rounds leaves ASHA nothing to stop "
                       f"(a full trial is {a.max_t or rounds} rounds); lower it or set search.asha.enabled=false")
        return out


def _spec_problems(name: str, spec: ParamSpec, base: FinetuneConfig) -> list[str]:
    p, key = PARAMS[name], f"space.{name}"
    out = []
    if spec.kind not in p.kinds:
        return [f"{key}.kind: {spec.kind!r} is not allowed for {name}; use one of {list(p.kinds)}"]
    if spec.kind == "choice":
        for f in ("low", "high"):
            if getattr(spec, f) is not None:
                out.append(f"{key}.{f}: not used by kind 'choice' (give values)")
        if not spec.values:
            return out + [f"{key}.values: a choice needs at least one value"]
        if len(set(spec.values)) != len(spec.values):
            out.append(f"{key}.values: duplicates in {spec.values}")
        checks = [(f"{key}.values[{i}]", v) for i, v in enumerate(spec.values)]
    else:
        if spec.values is not None:
            out.append(f"{key}.values: not used by kind {spec.kind!r} (give low and high)")
        missing = [f for f in ("low", "high") if getattr(spec, f) is None]
        if missing:
            return out + [f"{key}.{f}: required for kind {spec.kind!r}" for f in missing]
        if spec.low >= spec.high:
            out.append(f"{key}.low: must be below {key}.high (got low={spec.low}, high={spec.high})")
        if spec.kind == "loguniform" and spec.low <= 0:
            out.append(f"{key}.low: a log-uniform range needs low > 0 (got {spec.low}); "
                       f"to include 0 use kind: choice")
        checks = [(f"{key}.low", spec.low), (f"{key}.high", spec.high)]
    for k, v in checks:
        if p.integer and not float(v).is_integer():
            out.append(f"{k}: {name} takes whole numbers (got {v})")
        below = v <= p.lo if p.lo_open else v < p.lo
        above = v >= p.hi if p.hi_open else v > p.hi
        if below or above:
            lo, hi = ("(" if p.lo_open else "[") + f"{p.lo:g}", f"{p.hi:g}" + (")" if p.hi_open else "]")
            out.append(f"{k}: {v} is outside what {p.path} accepts: {lo}, {hi}")
    if name == "warmup_steps":
        for k, v in checks:
            if v >= base.optim.max_steps:
                out.append(f"{k}: {v:g} warmup steps must be below base.optim.max_steps={base.optim.max_steps}")
    return out


def full_rounds(base: FinetuneConfig) -> int:
    """Validation rounds of a trial trained to the end (the loop also validates at max_steps)."""
    return math.ceil(base.optim.max_steps / base.eval.every_steps)


def search_dir_of(cfg: SearchConfig) -> Path:
    return Path(expand(cfg.search.storage_path)) / cfg.search.name


def trial_run_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def trial_config(cfg: SearchConfig, params: dict[str, Any], trial_id: str) -> FinetuneConfig:
    """The base config with the sampled hyperparameters set, named after the Tune trial, stored in the search."""
    data = cfg.base.model_dump(mode="json")
    for name, value in params.items():
        section, key = PARAMS[name].path.split(".")
        data[section][key] = int(value) if PARAMS[name].integer else float(value)
    data["run"].update(name=trial_run_name(trial_id), storage_path=str(search_dir_of(cfg) / TRIALS_DIR),
                       evaluate=False, samples=0)
    return build(FinetuneConfig, data, f"trial {trial_id}")


def tune_space(cfg: SearchConfig) -> dict[str, Any]:
    """The Tune param space: distributions for random/optuna, `grid_search` lists for grid."""
    from ray import tune

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


def total_trials(cfg: SearchConfig) -> int:
    if cfg.search.algorithm != "grid":
        return cfg.search.num_samples
    return cfg.search.num_samples * math.prod(len(s.candidates()) for s in cfg.space.searched().values())


def asha_steps(cfg: SearchConfig) -> dict[str, int]:
    """ASHA's grace period and horizon in optimizer steps (Tune's time attribute here is `step`)."""
    a, every = cfg.search.asha, cfg.base.eval.every_steps
    return {"grace_period": a.grace_period * every,
            "max_t": min((a.max_t or full_rounds(cfg.base)) * every, cfg.base.optim.max_steps)}


# ---------------------------------------------------------------------------------------- concurrency


def trial_bundles(base: FinetuneConfig) -> tuple[dict[str, float], list[dict[str, float]]]:
    """What one trial holds while it trains: its Tune actor, and one bundle per Train worker."""
    sc = base.scaling
    worker = {"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})}
    return {"CPU": TRIAL_DRIVER_CPU}, [dict(worker) for _ in range(sc.num_workers)]


def fitting_trials(nodes: list[dict[str, float]], base: FinetuneConfig, limit: int = 10_000) -> int:
    """How many trials' bundles the nodes hold at once, added one trial at a time as Tune starts them and
    packed as Ray's autoscaler packs (`aigc.clustercheck.bin_pack`; a Train worker's bundle sits on one node).

    e.g. one node {CPU: 2}, 2 workers x 0.49 CPU + 0.02 for the trial actor = 1.0 CPU a trial -> 2 trials.
    """
    actor, workers = trial_bundles(base)
    asked = set(actor) | {r for w in workers for r in w}
    free = [{r: v for r, v in n.items() if r in asked} for n in nodes]  # node:<ip>, memory, ... never asked for
    n = 0
    while n < limit:
        unplaced, left = bin_pack(free, [actor, *workers])
        if unplaced:
            break
        free, n = left, n + 1
    return n


# The cluster launcher writes the cluster.yaml it was given here on the head node; its autoscaler reads it
# (`--autoscaling-config`), and so does Ray Tune (ray.tune.execution.cluster_info) to tell a launched cluster.
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


def autoscaler_node_types(bootstrap: Path = BOOTSTRAP_CONFIG) -> list[NodeType]:
    """The worker types the cluster can grow by: from the autoscaler's config in the GCS (autoscaler v2,
    KubeRay) or else the cluster launcher's bootstrap config on this head, read as `aigc.clustercheck`
    reads cluster.yaml. Empty on a fixed cluster."""
    try:
        import ray._private.state

        cc = ray._private.state.state.get_cluster_config()
    except Exception:  # not connected, or a Ray without the call: treat as no autoscaler
        cc = None
    if cc is not None and cc.node_group_configs:
        return [NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.min_count),
                         10_000 if g.max_count < 0 else int(g.max_count))
                for g in cc.node_group_configs if g.max_count != 0 and g.resources]
    path = bootstrap.expanduser()
    if not path.is_file():
        return []
    try:
        launched = load_cluster(path)
        cap = int(launched.get("max_workers", 10_000))
        types = [replace(t, resources={k: float(v) for k, v in t.resources.items()},
                         max_workers=min(cap, t.max_workers))
                 for t in node_types(launched).values() if not t.is_head]
    except (ConfigError, AttributeError, TypeError, ValueError) as e:
        print(f"[aigc] warning: cannot read the autoscaler config {path} ({e}); planning from live nodes only",
              flush=True)
        return []
    return [t for t in types if t.max_workers > 0 and t.resources]


def cluster_capacity(live: list[dict[str, float]], types: list[NodeType], most: int = 10_000) -> list[dict[str, float]]:
    """The nodes the cluster can have: the live ones plus, per autoscaled type, the workers it may still add
    (a live node whose CPU and GPU counts match a type counts against that type's max_workers), at most
    `most` of each type (n bundles never use more than n nodes of one type)."""
    nodes = [dict(n) for n in live]
    unmatched = list(live)
    for t in types:
        same = [n for n in unmatched
                if all(float(n.get(r, 0.0)) == float(t.resources.get(r, 0.0)) for r in ("CPU", "GPU"))]
        for n in same[: t.max_workers]:
            unmatched.remove(n)
        nodes += [dict(t.resources) for _ in range(min(most, max(0, t.max_workers - len(same))))]
    return nodes


def cluster_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _describe(nodes: list[dict[str, float]]) -> str:
    return "; ".join("{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(n.items()) if k in ("CPU", "GPU")) + "}"
                     for n in nodes) or "no alive nodes"


def plan_concurrency(cfg: SearchConfig, nodes: list[dict[str, float]], types: list[NodeType] = ()) -> int:
    """Trials at once: what fits the cluster (live nodes plus what the autoscaler may add), capped by
    search.max_concurrent and the number of trials.

    A trial that cannot fit at all would wait forever; that is a configuration error, raised here."""
    limit = total_trials(cfg)
    bundles = limit * (1 + cfg.base.scaling.num_workers)
    fits = fitting_trials(cluster_capacity(nodes, list(types), most=bundles), cfg.base, limit=limit)
    if fits == 0:
        sc = cfg.base.scaling
        per = f"{sc.cpus_per_worker:g} CPU" + (f" + {sc.gpus_per_worker:g} GPU" if sc.use_gpu else "")
        have = _describe(nodes)
        if types:
            have += "; and the autoscaler may add " + ", ".join(
                f"{t.max_workers} x {t.name} {_describe([t.resources])}" for t in types)
        raise ConfigError([
            f"base.scaling.num_workers: one trial needs {sc.num_workers} workers x ({per}) "
            f"(base.scaling.cpus_per_worker={sc.cpus_per_worker:g}"
            + (f", base.scaling.gpus_per_worker={sc.gpus_per_worker:g}" if sc.use_gpu else "")
            + f") plus {TRIAL_DRIVER_CPU} CPU for the trial, but the cluster's nodes have {have}; "
            "lower these or add nodes"], "search for this cluster")
    cap = cfg.search.max_concurrent or fits
    return max(1, min(fits, cap, total_trials(cfg)))


# --------------------------------------------------------------------------------------- the trials


def _forward_callback() -> Any:
    """`TuneReportCallback` that renames the metrics Tune reserves (see RENAMED_METRICS)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ForwardToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            metrics = [{RENAMED_METRICS.get(k, k): v for k, v in m.items()} for m in metrics]
            super().after_report(run_context, metrics, checkpoint)

    return ForwardToTune()


class _TrialDriver:
    """Runs one trial's fine-tuning driver *outside* the Tune trial's placement group.

    Tune places a trial's actor in a 0.02-CPU placement group that captures every task the actor starts, so
    the driver's own Ray tasks (the model export asks for 1 CPU) could never be scheduled from there. This
    actor is created with the default scheduling strategy; it is owned by the trial actor and dies with it
    when Tune stops the trial.
    """

    def run(self, tcfg: dict[str, Any], callback: Any, prepared: Any) -> dict[str, Any]:
        from aigc.finetune import run_finetune

        r = run_finetune(FinetuneConfig.model_validate(tcfg), callbacks=[callback], prepared=prepared)
        return {"best_dir": r.best_dir, "best_metrics": r.best_metrics, "final_metrics": r.metrics}


def ended_before(sdir: Path, run_dir: Path, trial_id: str) -> str | None:
    """How a trial ended, when its own files say it has: exported its model, or stopped by ASHA.

    Tune saves a trial's end in its experiment state a moment after the trial writes it here; a search
    interrupted in that moment restores the trial as unfinished and starts it again.
    """
    from aigc.report import read_json_lines

    if (run_dir / TRIAL_DONE).is_file():
        return "finished"
    if any(s.get("trial_id") == trial_id for s in read_json_lines(sdir / ASHA_LEDGER)):
        return "was stopped by ASHA"
    return None


def _trial(params: dict[str, Any], search: dict[str, Any] | None = None, prepared: Any = None) -> None:
    """One Tune trial: a full fine-tune of the base config with `params` set."""
    import ray
    from ray import tune

    from aigc.finetune import run_dir_of

    cfg = SearchConfig.model_validate(search)
    trial_id = tune.get_context().get_trial_id()
    tcfg = trial_config(cfg, params, trial_id)
    run_dir = run_dir_of(tcfg)
    ended = ended_before(search_dir_of(cfg), run_dir, trial_id)
    if ended:  # Tune was interrupted before it recorded the end: do not train (or export) it again
        print(f"[aigc] trial {trial_id} {ended} before the search was interrupted; not run again", flush=True)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "attempts.jsonl", "a") as f:  # a retried or resumed trial adds a line
        f.write(json.dumps({"started": time.time(), "pid": os.getpid()}) + "\n")
    t0 = time.time()
    callback = _forward_callback()  # made here, inside the Tune session whose report queue it holds
    driver = ray.remote(_TrialDriver).options(num_cpus=0, scheduling_strategy="DEFAULT").remote()
    try:
        out = ray.get(driver.run.remote(tcfg.model_dump(mode="json"), callback, prepared))
    finally:
        ray.kill(driver)
    (run_dir / TRIAL_DONE).write_text(json.dumps({"trial_id": trial_id, "params": params,
                                                  "wall_s": time.time() - t0, **out}, indent=2, default=str))


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def _asha(cfg: SearchConfig, ledger: Path) -> Any:
    from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

    class RecordingASHA(AsyncHyperBandScheduler):
        """ASHA that writes each stop to the search's ledger (for the report), never stops a trial at its
        last validation (it has finished training and is about to export its model), and on a resumed
        search rebuilds its rungs from the trials' results on disk (Tune does not save scheduler state, so
        without this the trials still to come would be judged against nobody)."""

        _replayed = False

        def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
            super().on_trial_add(tune_controller, trial)
            if not self._replayed:
                self._replayed = True
                self._replay(ledger.parent / TUNE_DIR)

        def _replay(self, exp: Path) -> None:
            from aigc.report import read_json_lines

            (bracket,) = self._brackets  # one bracket: asynchronous successive halving
            for results in exp.glob("*/result.json"):
                seen = [r for r in read_json_lines(results) if r.get("step") is not None and r.get(METRIC) is not None]
                for milestone, recorded in bracket._rungs:
                    first = next((r for r in seen if r["step"] >= milestone), None)
                    if first is not None and first["step"] < self._max_t:
                        recorded[results.parent.name] = self._metric_op * first[METRIC]

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            if result.get("step", 0) >= self._max_t:
                return TrialScheduler.CONTINUE
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision == TrialScheduler.STOP:
                with open(ledger, "a") as f:
                    f.write(json.dumps({"trial_id": trial.trial_id, "step": result.get("step"),
                                        "val_loss": result.get(METRIC), "time": time.time()}) + "\n")
            return decision

    steps = asha_steps(cfg)
    return RecordingASHA(time_attr="step", max_t=steps["max_t"], grace_period=steps["grace_period"],
                         reduction_factor=cfg.search.asha.reduction_factor, stop_last_trials=False)


# The trials-at-once limit of *this* run of the driver: a resumed search restores its searcher (and the limit
# saved with it) from disk, but the cluster it resumes on may be another size.
_LIMIT = {"trials": 0}


def _searcher(cfg: SearchConfig, concurrency: int) -> tuple[Any, int | None]:
    """(search algorithm, max_concurrent_trials for TuneConfig): Tune applies that limit only to a Searcher
    (Optuna); a seeded variant generator carries its own."""
    if cfg.search.algorithm == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=cfg.search.seed)), concurrency
    from ray.tune.search.basic_variant import BasicVariantGenerator

    class SeededVariants(BasicVariantGenerator):
        def set_state(self, state: dict) -> None:  # called on resume
            super().set_state(state)
            from aigc.search import _LIMIT

            self.max_concurrent = _LIMIT["trials"] or self.max_concurrent

    return SeededVariants(random_state=cfg.search.seed, max_concurrent=concurrency), None


def check_algorithm(cfg: SearchConfig) -> None:
    if cfg.search.algorithm == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError(["search.algorithm: 'optuna' needs the optional extra: pip install 'aigc[optuna]' "
                               "(or optuna>=4)"], "search config") from None


# Keys that may change when an interrupted search is resumed; anything else would mix two searches.
RESUMABLE_CHANGES = ("search.max_concurrent", "search.max_failures", "search.resume_errored",
                     "base.scaling.max_failures", "base.eval.log_every", "base.run.torch_extensions_dir")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def check_resume(cfg: SearchConfig, sdir: Path) -> bool:
    """True when `sdir` holds a started search to resume; a ConfigError when it was started with another
    config. (A folder whose search never reached Tune, e.g. a data error, is simply started again.)"""
    saved_path = sdir / SEARCH_YAML
    if not saved_path.is_file() or not any((sdir / TUNE_DIR).glob("experiment_state-*.json")):
        return False
    saved = _flatten(yaml.safe_load(saved_path.read_text()) or {})
    now = _flatten(cfg.model_dump(mode="json"))
    differ = sorted(k for k in set(saved) | set(now)
                    if saved.get(k) != now.get(k) and not k.startswith(RESUMABLE_CHANGES))
    if differ:
        raise ConfigError([f"{k}: {saved.get(k)!r} in the existing search, {now.get(k)!r} now" for k in differ]
                          + [f"search.name: {sdir} holds a search with another config; resume it unchanged or "
                             "choose a new search.name"], "resume")
    return True


# -------------------------------------------------------------------------------------------- driver


@dataclass
class SearchResult:
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


def reap_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creating actor has died; returns how many.

    When Tune stops a trial (ASHA) or a search is interrupted, the trial's actor dies and takes its Train
    controller with it, but the controller's worker placement group lives as long as the *job* (Ray's rule
    for groups made by non-detached actors). Ray Train's own PlacementGroupCleaner frees it through the
    state API, which needs the dashboard (absent on `ray.init(include_dashboard=False)`) and a single Ray
    instance per host; without it the reservation (here 2 x 0.49 CPU) stays and the next trial waits for
    ever. A group whose creator is dead can never be used again: removing it is always safe.
    """
    import ray
    from ray._private.state import state  # private: the public table drops the creator fields used below
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    removed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        made_by_actor = pg.creator_actor_id and not ray.ActorID(pg.creator_actor_id).is_nil()  # not a driver's
        if (made_by_actor and pg.creator_actor_dead and pg.state != gcs_pb2.PlacementGroupTableData.REMOVED
                and not pg.is_detached and not pg.creator_job_dead and pg.creator_job_id.hex() == job):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
    return removed


class _Reaper:
    """Runs `reap_orphaned_placement_groups` every few seconds while a search runs (see its docstring)."""

    def __init__(self, every_s: float = 3.0):
        import threading

        self._stop, self._every = threading.Event(), every_s
        self._thread = threading.Thread(target=self._loop, name="aigc-pg-reaper", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            self.sweep()

    def sweep(self) -> None:
        try:
            n = reap_orphaned_placement_groups()
        except Exception as e:  # a private Ray API: never let it take the search down
            print(f"[aigc] could not check for orphaned placement groups: {type(e).__name__}: {e}", flush=True)
            self._stop.set()
            return
        if n:
            print(f"[aigc] freed {n} placement group(s) left by stopped trials", flush=True)

    def __enter__(self) -> _Reaper:
        self.sweep()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sweep()


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
    sdir = search_dir_of(cfg)
    resuming = check_resume(cfg, sdir)

    console.setup()  # before Ray is imported
    from ray import tune

    from aigc.finetune import init_ray, prepare
    from aigc.report import render_text, write_report

    init_ray()
    import ray.data

    # Trials are compared with each other and a resumed search re-prepares the data: both need the packed
    # blocks in the same order every time, which Ray Data guarantees only when asked to preserve it.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    live, types = cluster_nodes(), autoscaler_node_types()
    concurrency = plan_concurrency(cfg, live, types)
    fit_now = fitting_trials(live, cfg.base, limit=concurrency)
    if fit_now < concurrency:  # only possible with autoscaled types: otherwise the live nodes are the plan
        print(f"[aigc] {fit_now} of the {concurrency} concurrent trials fit the nodes up now; the rest wait for "
              "the autoscaler to add " + ", ".join(t.name for t in types), flush=True)
    sdir.mkdir(parents=True, exist_ok=True)
    (sdir / SEARCH_YAML).write_text(to_yaml(cfg))
    print(f"[aigc] search {cfg.search.name}: {total_trials(cfg)} trials, {concurrency} at a time "
          f"({cfg.search.algorithm}{', ASHA' if cfg.search.asha.enabled else ''}) -> {sdir}", flush=True)

    with _Reaper():  # frees the reservations of trials Tune stopped (see reap_orphaned_placement_groups)
        prepared = _share_ready(prepare(cfg.base, sdir), cfg.base.scaling.num_workers)
        check_batch_sizes(cfg, prepared.packed.blocks["train"])
        trainable = tune.with_resources(
            tune.with_parameters(_trial, search=cfg.model_dump(mode="json"), prepared=prepared),
            {"CPU": TRIAL_DRIVER_CPU},
        )
        exp = sdir / TUNE_DIR
        _LIMIT["trials"] = concurrency
        if resuming and tune.Tuner.can_restore(str(exp)):
            print(f"[aigc] resuming the search in {exp}: finished trials are kept, unfinished ones continue", flush=True)
            tuner = tune.Tuner.restore(str(exp), trainable, resume_unfinished=True,
                                       resume_errored=cfg.search.resume_errored)
        else:
            search_alg, max_concurrent = _searcher(cfg, concurrency)
            tuner = tune.Tuner(
                trainable,
                param_space=tune_space(cfg),
                tune_config=tune.TuneConfig(
                    metric=METRIC, mode=MODE, num_samples=cfg.search.num_samples, search_alg=search_alg,
                    scheduler=_asha(cfg, sdir / ASHA_LEDGER) if cfg.search.asha.enabled else None,
                    max_concurrent_trials=max_concurrent, reuse_actors=False,
                    trial_name_creator=_trial_dirname, trial_dirname_creator=_trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=TUNE_DIR, storage_path=str(sdir), callbacks=tune_callbacks,
                    failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures),
                    verbose=console.tune_verbosity(),  # silent at info: the trial table is printed below
                ),
            )
        tuner.fit()  # errors are per trial (recorded on disk); Ctrl-C / SIGUSR1 stops it with the state saved
    interrupted = _interrupted(sdir)

    winner = None if interrupted else export_winner(cfg, sdir)
    report = write_report(sdir)
    data = report.data
    print(render_text(data), flush=True)
    best = data.trials[0] if data.trials and data.trials[0].best_val_loss is not None else None
    return SearchResult(
        search_dir=str(sdir), trials=[t.row() for t in data.trials], best_trial=best.trial_id if best else None,
        best_params=dict(best.params) if best else {}, best_metrics=dict(best.best_metrics) if best else {},
        winner_dir=str(winner) if winner else None, report=report.files, interrupted=interrupted,
        concurrency=concurrency, resumed=resuming, errors={t.trial_id: t.error for t in data.trials if t.error},
    )


def _interrupted(sdir: Path) -> bool:
    from aigc.report import load_search

    return any(t.status in ("running", "pending", "interrupted") for t in load_search(sdir).trials)


def export_winner(cfg: SearchConfig, sdir: Path) -> Path | None:
    """Copy the model of the trial with the lowest validation loss to `<search>/winner`, atomically."""
    from aigc.modeldir import ModelDirError, copy_model_dir, verify_model_dir
    from aigc.report import load_search

    data = load_search(sdir)
    ranked = [t for t in data.trials if t.best_val_loss is not None]
    if not ranked:
        print("[aigc] no trial reported a validation loss: no winner", flush=True)
        return None
    best = ranked[0]
    run_dir = sdir / TRIALS_DIR / trial_run_name(best.trial_id)
    best_dir = run_dir / "best"
    try:
        meta = verify_model_dir(best_dir)
        if meta.get("step") != best.best_step:
            raise ModelDirError(f"{best_dir}: step {meta.get('step')} is not the best step {best.best_step}")
    except ModelDirError:
        _export_best_checkpoint(run_dir, best_dir)  # the trial was stopped before its own export
    out = copy_model_dir(best_dir, sdir / WINNER_DIR, trial=best.trial_id, search=cfg.search.name,
                         hyperparameters=best.params, metrics=best.best_metrics,
                         search_config=cfg.model_dump(mode="json"), role="winner")
    print(f"[aigc] winner: trial {best.trial_id} (val loss {best.best_val_loss:.4f} at step {best.best_step}) "
          f"-> {out}", flush=True)
    return out


def _export_best_checkpoint(run_dir: Path, best_dir: Path) -> None:
    """Export the lowest-validation-loss checkpoint a Train run kept (ASHA may have stopped it before the
    driver's own export)."""
    from aigc.finetune import export_checkpoint

    ckpts = []
    for m in run_dir.glob("checkpoint_*/metrics.json"):
        metrics = json.loads(m.read_text())
        ckpts.append((metrics.get("val_loss", math.inf), str(m.parent), metrics))
    if not ckpts:
        raise RuntimeError(f"{run_dir}: no checkpoint to export the winner from")
    _, ckpt, metrics = min(ckpts, key=lambda c: c[0])
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    export_checkpoint(ckpt, str(best_dir), config, metrics, role="best", run=run_dir.name, source_checkpoint=ckpt)
