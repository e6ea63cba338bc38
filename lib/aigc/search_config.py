"""A search's config: the trial template (`base`), the space of hyperparameters, how the search runs; with
the arithmetic the checks and the cluster planning need (`total_trials`, `full_rounds`).

Needs no Ray: the entry points validate a search config (and `aigc.clustercheck` checks one against a cluster)
before Ray is imported. `aigc.search` runs it.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from aigc import storage
from aigc.config import ConfigError, FinetuneConfig, Strict, TrackingSection, expand
from aigc.layout import staging_dir
from aigc.storage import scheme_problem


class ParamSpec(Strict):
    """How one hyperparameter is drawn. `kind` picks which of the other fields apply."""

    kind: Literal["loguniform", "uniform", "choice"] = Field(
        description="how values are drawn: loguniform or uniform between low and high, or one of values (choice)"
    )
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
    # LoRA's rank and adapter dropout regularise like weight decay and dropout do (base.model.peft.method=lora)
    "lora.r": _Param("model.peft.r", ("choice",), 0, True, math.inf, True, integer=True),
    "lora.alpha": _Param("model.peft.alpha", ("loguniform", "uniform", "choice"), 0.0, True, math.inf, True),
    "lora.dropout": _Param("model.peft.dropout", ("uniform", "choice"), 0.0, False, 1.0, True),
    # DP-SGD (base.privacy.enabled): the clip and the noise trade quality against epsilon, shown beside the loss
    "max_grad_norm": _Param("privacy.max_grad_norm", ("loguniform", "choice"), 0.0, True, math.inf, True),
    "noise_multiplier": _Param("privacy.noise_multiplier", ("loguniform", "uniform", "choice"), 0.0, True, math.inf, True),
}


def set_param(config: dict[str, Any], name: str, value: float) -> None:
    """Set hyperparameter `name` (a key of PARAMS) in a FinetuneConfig dict, at its full dotted path."""
    p = PARAMS[name]
    *sections, key = p.path.split(".")
    node = config
    for s in sections:
        node = node[s]
    node[key] = int(value) if p.integer else float(value)


def flat_space(space: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A dumped `space` section with nested groups flattened to PARAMS names (`lora: {r: ...}` -> `lora.r`),
    the parameters left out dropped."""
    out = {}
    for k, v in (space or {}).items():
        if isinstance(v, dict) and "kind" not in v:
            out.update({f"{k}.{sub}": spec for sub, spec in v.items() if spec})
        elif v:
            out[k] = v
    return out


class LoraSpace(Strict):
    """LoRA's hyperparameters (base.model.peft.method must be lora); a parameter left out keeps base's value."""

    r: ParamSpec | None = Field(None, description="model.peft.r, the adapter rank (choice of integers)")
    alpha: ParamSpec | None = Field(None, description="model.peft.alpha, the adapter scaling numerator")
    dropout: ParamSpec | None = Field(None, description="model.peft.dropout, on the adapter's input")


class SpaceSection(Strict):
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
    max_grad_norm: ParamSpec | None = Field(None, description="privacy.max_grad_norm (needs base.privacy.enabled)")
    noise_multiplier: ParamSpec | None = Field(
        None, description="privacy.noise_multiplier (needs base.privacy.enabled, without base.privacy.target_epsilon)"
    )
    lora: LoraSpace | None = Field(None, description="LoRA's rank, alpha and dropout: lora.r, lora.alpha, lora.dropout")

    def searched(self) -> dict[str, ParamSpec]:
        """The parameters searched, by PARAMS name (`lora.r` for `lora: {r: ...}`)."""
        out = {}
        for name in PARAMS:
            group, _, sub = name.rpartition(".")
            node = getattr(self, group) if group else self
            if node is not None and (spec := getattr(node, sub)) is not None:
                out[name] = spec
        return out


class AshaSpec(Strict):
    """Asynchronous successive halving on validation loss, counted in validation rounds (eval.every_steps)."""

    enabled: bool = Field(True, description="false: every trial trains to base.optim.max_steps (FIFO)")
    grace_period: int = Field(1, ge=1, description="validation rounds every trial gets before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1.0, description="keep the best 1/reduction_factor at each rung")
    max_t: int | None = Field(
        None, ge=1, description="rounds of a full trial; None = ceil(base.optim.max_steps / base.eval.every_steps)"
    )


class SearchSection(Strict):
    """How the search runs and where it is stored."""

    name: str = Field(
        "search", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description="the search's folder under storage_path; running a search of that name again resumes it",
    )
    storage_path: str = Field(
        "~/aigc/searches", description="a local or shared folder, or an object store URI (aigc.storage); the search is "
        "<path>/<name>")
    algorithm: Literal["random", "grid", "optuna"] = Field(
        "random", description="random sampling, every grid point, or Optuna TPE (pip install 'aigc[optuna]')"
    )
    num_samples: int = Field(
        8, ge=1, description="trials (random, optuna); for grid, how many times the whole grid is repeated"
    )
    seed: int = Field(0, description="seed of the sampler, so a search draws the same trials every time")
    asha: AshaSpec = Field(
        default_factory=AshaSpec, description="early stopping of the trials behind the others (ASHA)"
    )
    max_concurrent: int | None = Field(
        None, ge=1, description="trials at once; None = as many as the cluster's resources fit (never more)"
    )
    max_failures: int = Field(
        1, ge=-1, description="retries of a failed trial (its Train run resumes from its last checkpoint); -1 = unlimited"
    )
    resume_errored: bool = Field(False, description="on resume, also retry trials that had ended in an error")


class SearchConfig(Strict):
    """A search: the trial template (`base`, same keys as a job config), the space, and the search settings."""

    base: FinetuneConfig = Field(
        default_factory=FinetuneConfig, description="every trial's fine-tuning config, before the space sets its values"
    )
    space: SpaceSection = Field(
        default_factory=SpaceSection, description="the hyperparameters searched, and how each is drawn"
    )
    search: SearchSection = Field(
        default_factory=SearchSection, description="how the search runs: algorithm, trials, concurrency, storage"
    )
    tracking: TrackingSection = Field(
        default_factory=TrackingSection,
        description="MLflow: the search as a run, each trial as a child run, the winner as a registered version",
    )

    def problems(self) -> list[str]:
        out = [f"base.{p}" for p in self.base.problems()]
        if self.base.tracking != TrackingSection():  # the trials are tracked by the search, as its child runs
            out.append("base.tracking: a search is tracked through its own `tracking` section (the trials become its "
                       "child runs); set tracking.* instead")
        searched = self.space.searched()
        if not searched:
            out.append("space: no hyperparameter is searched; give at least one of " + ", ".join(PARAMS))
        for name, spec in searched.items():
            out += _spec_problems(name, spec, self.base)
        lora = sorted(n for n in searched if n.startswith("lora."))
        if lora and self.base.model.peft.method == "none":
            out.append(f"space.{lora[0]}: LoRA settings are searched but base.model.peft.method is 'none'; set "
                       "base.model.peft.method=lora")
        s, a = self.search, self.search.asha
        if problem := scheme_problem(s.storage_path):
            out.append(f"search.storage_path: {problem}")
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
    if PARAMS[name].path.startswith("privacy.") and not base.privacy.enabled:
        out.append(f"{key}: searches {p.path}, which needs base.privacy.enabled=true")
    if name == "noise_multiplier" and base.privacy.target_epsilon is not None:
        out.append(f"{key}: a searched noise multiplier replaces base.privacy.target_epsilon; remove that")
    if name == "warmup_steps":
        for k, v in checks:
            if v >= base.optim.max_steps:
                out.append(f"{k}: {v:g} warmup steps must be below base.optim.max_steps={base.optim.max_steps}")
    return out


def full_rounds(base: FinetuneConfig) -> int:
    """Validation rounds of a trial trained to the end (the loop also validates at max_steps)."""
    return math.ceil(base.optim.max_steps / base.eval.every_steps)


def search_location(cfg: SearchConfig) -> str:
    """Where the search is stored: `<search.storage_path>/<search.name>`, a local folder or an object-store URI."""
    return storage.join(expand(cfg.search.storage_path), cfg.search.name)


def search_dir_of(cfg: SearchConfig) -> Path:
    """The search's local folder (its layout: `aigc.layout`): the search folder itself, or for an object-store
    search the driver's staging copy."""
    loc = search_location(cfg)
    return staging_dir(loc, cfg.search.name) if storage.is_uri(loc) else Path(loc)


def total_trials(cfg: SearchConfig) -> int:
    """Trials the search runs: num_samples, or for grid, num_samples x the grid's points."""
    if cfg.search.algorithm != "grid":
        return cfg.search.num_samples
    return cfg.search.num_samples * math.prod(len(s.candidates()) for s in cfg.space.searched().values())


def check_algorithm(cfg: SearchConfig) -> None:
    """A ConfigError when the algorithm needs a package that is not installed."""
    if cfg.search.algorithm == "optuna":
        if importlib.util.find_spec("optuna") is None:  # looked for, not imported: this module stays light
            raise ConfigError(["search.algorithm: 'optuna' needs the optional extra: pip install 'aigc[optuna]' "
                               "(or optuna>=4)"], "search config")
