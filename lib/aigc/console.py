"""What a run prints: aigc's own lines and Ray's essential ones (the dashboard URL, errors) by default,
everything with `AIGC_LOG_LEVEL=debug` (what `--verbose` sets).

    AIGC_LOG_LEVEL=info    # default: [aigc] lines, warnings and errors; known dependency noise filtered
    AIGC_LOG_LEVEL=debug   # everything Ray, Tune, Train, Ray Data, DeepSpeed and transformers print

`setup()` runs first in every job entry function (before Ray is imported: Ray reads its log knobs at import)
and `init_ray` passes `runtime_env()` so every Ray worker process, on this machine or a cluster's, runs
`setup_worker()` with the same level. Known noise is named below by message *and* where it comes from; a
warning or error that is not on these lists always shows. Long work (training steps) gets a progress bar
when the driver's stdout is a terminal and plain periodic lines otherwise (job logs, CI, pipes).

This module imports nothing heavy at the top: it must run before Ray, torch and transformers are imported.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import warnings
from typing import Any

from tqdm import tqdm

LEVEL_ENV = "AIGC_LOG_LEVEL"
PROGRESS_ENV = "AIGC_PROGRESS"  # "bar" | "lines": chosen by the driver (is its stdout a terminal), read by workers
LEVELS = ("info", "debug")

# Python warnings from dependencies, filtered by (category, module that issues it, message start). The same
# text from any other module, and every other warning, still shows.
KNOWN_WARNINGS: list[tuple[type[Warning], str, str]] = [
    # DeepSpeed 0.19's ZeRO calls torch's deprecated collective on every step; torch warns from its wrapper
    # module, and the registry is reset by catch_warnings blocks elsewhere, so it repeats dozens of times.
    (FutureWarning, "torch.distributed.c10d_logger", "`torch.distributed.all_gather_into_tensor` is deprecated"),
    # Ray Train 2.60's own DatasetManager actor sets the option Ray Data 2.60 deprecates.
    (DeprecationWarning, "ray.data._internal.execution.interfaces.execution_options",
     "`ExecutionOptions.exclude_resources` is deprecated"),
]

# Log records from dependencies, filtered by (logger name, message regex) on that very logger. A name
# "package:path.py" is a logger named by its file path (logging.getLogger(__file__)) inside that package.
KNOWN_LOG_RECORDS: list[tuple[str, str]] = [
    # Ray Train 2.60 logs every report of every rank at INFO on a logger named by its file, which Train's own
    # LoggingConfig level (set to WARNING by train_logging()) does not reach.
    ("ray:train/v2/_internal/execution/context.py", r"Reporting training result \d+: "),
    # Ray 2.60 warns on every local start that token auth is on (the project's default, see the job docs).
    ("ray._private.authentication.authentication_token_setup", r"Token authentication is enabled for this Ray"),
    # Ray Data warns once per process because init_ray turns its bars off (job logs are files, not terminals).
    ("ray.data._internal.progress", r"Progress bars disabled\. To enable, set"),
    # Ray Data warns when a dataset runs while Train's workers hold every CPU; aigc materialises the blocks before
    # the workers start and feeds them from the object store, so nothing waits on a CPU (the run goes on).
    ("ray.data.dataset", r"The Ray cluster currently does not have any available CPUs"),
    # transformers 5 warns once when a batch's first or last token is the pad id and no attention_mask is given:
    # packed blocks carry per-example position_ids instead (the block-diagonal mask comes from them, see
    # aigc.taskdata) and their tail is EOS padding with labels -100.
    ("transformers.modeling_utils", r"We strongly recommend passing in an `attention_mask`"),
    # transformers 5 warns that GPT-2's config carries loss_type=None; it then uses the causal-LM loss we want.
    ("transformers.modeling_utils", r"`loss_type=None` was set in the config but it is unrecognized"),
]

# Lines other processes print that Ray forwards to the driver (log_to_driver), for sources no Python filter
# reaches: the raylet, Ray's C++ core worker, and plain print() calls inside dependencies. Ray drops forwarded
# lines that match RAY_DEDUP_LOGS_SKIP_REGEX; each pattern names its source in the text it matches.
KNOWN_FORWARDED_LINES: list[str] = [
    # raylet: Tune + Train start many actors at once on a small machine; expected, not actionable.
    r"WARNING: \d+ PYTHON worker processes have been started on node",
    # Ray Train 2.60's own PreemptionWatcher actor, logged by the C++ core worker of every TrainController.
    r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher'",
    # DeepSpeed prints (print(), not its logger) each time a Train worker loads its CPU shared-memory op.
    r"^DeepSpeed deepspeed\.ops\.comm\.\w+ built successfully$",
    # DeepSpeed's zero_to_fp32 prints its progress while the export task consolidates a checkpoint.
    r"^Processing zero checkpoint '", r"^Parsing checkpoint created by deepspeed==",
    r"^Detected checkpoint of type zero stage ", r"^Reconstructed fp32 state dict with \d+ params",
    r"Loading checkpoint shards: +\d+%\|",  # ... and its tqdm bar
    # Ray Serve's proxy and controller log each lifecycle step at INFO; the pipeline prints the endpoint itself.
    r"^INFO \S+ \S+ (proxy|controller) ",
    # Ray Serve's access log of the pipeline's own smoke requests (aigc's request log line stays).
    r"^INFO \S+ \S+ \S+ \S+ \S+ -- (GET|POST) /\S* \d{3} [\d.]+ms$",
]

# Library chatter below WARNING, silenced by level at `info` (their warnings and errors still show).
QUIET_LOGGERS = ("ray.tune", "ray.serve", "ray.data", "DeepSpeed", "mlflow")

# Environment the libraries read at import, set (unless the user set it) before any of them is imported.
QUIET_ENV = {
    "RAY_DATA_LOG_LEVEL": "WARNING",  # Ray Data's per-dataset "Starting execution / finished" INFO lines
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" / "Writing model shards" bars
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets' "Generating split" / "Filter" bars
    # Train V2 routes print() in workers into its logger, which tees to stdout again; the progress bar
    # (tqdm_ray) and print0 need the plain print that Ray forwards.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Tune 2.60's new console output prints its experiment header box even at verbose=0; the classic
    # reporter prints nothing at verbose=0 (trial errors are still logged at ERROR).
    "RAY_AIR_NEW_OUTPUT": "0",
    # MLflow logs "Creating initial MLflow database tables..." and its migrations at INFO on its own stderr handler
    "MLFLOW_LOGGING_LEVEL": "WARNING",
}


def level() -> str:
    """The current level: AIGC_LOG_LEVEL, `info` when unset. An unknown value is an error, not a guess."""
    value = os.environ.get(LEVEL_ENV, "info").strip().lower() or "info"
    if value not in LEVELS:
        raise ValueError(f"{LEVEL_ENV}={value!r}: expected one of {', '.join(LEVELS)}")
    return value


def verbose() -> bool:
    return level() == "debug"


class _DropKnown(logging.Filter):
    """Drops records whose message matches one of `patterns` (attached to the logger that emits them)."""

    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(p.search(msg) for p in self.patterns)


def install_filters() -> None:
    """Install the warning and log-record filters and the quiet levels in this process (idempotent)."""
    for category, module, message in KNOWN_WARNINGS:
        # the same matching Python's -W option does: message start (case-insensitive), exact module
        warnings.filterwarnings("ignore", message=re.escape(message), category=category,
                                module=re.escape(module) + r"\Z")
    by_logger: dict[str, list[str]] = {}
    for name, pattern in KNOWN_LOG_RECORDS:
        by_logger.setdefault(_logger_name(name), []).append(pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        logger.filters = [f for f in logger.filters if not isinstance(f, _DropKnown)]
        logger.addFilter(_DropKnown(patterns))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _logger_name(name: str) -> str:
    """A logger name, or for "package:path.py" the file path that names it (found without importing)."""
    if ":" not in name:
        return name
    package, path = name.split(":", 1)
    spec = importlib.util.find_spec(package)
    return os.path.join(os.path.dirname(spec.origin), path) if spec and spec.origin else name


def _skip_regex() -> str:
    ours = "|".join(f"(?:{p})" for p in KNOWN_FORWARDED_LINES)
    theirs = os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX")
    return f"(?:{theirs})|{ours}" if theirs and ours not in theirs else (theirs or ours)


def setup() -> str:
    """Configure this (driver) process for the current level; returns it. Call before importing Ray."""
    lvl = level()
    os.environ[LEVEL_ENV] = lvl  # inherited by the workers of a local cluster
    os.environ.setdefault(PROGRESS_ENV, "bar" if sys.stdout.isatty() and lvl != "debug" else "lines")
    if lvl == "debug":
        return lvl
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] = _skip_regex()
    # Ray merges lines that look alike across processes; every trial's [aigc] line says something different.
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", r"\[aigc\]")
    _ray_dedup_regexes()
    _hf_bars_off()
    install_filters()
    return lvl


def _hf_bars_off() -> None:
    """datasets and huggingface_hub read their progress-bar switches (QUIET_ENV) at import; where a module that
    imports them at its top (aigc.data, a benchmark) came first, turn their bars off through their own API."""
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()


def _ray_dedup_regexes() -> None:
    """Ray 2.60 compiles RAY_DEDUP_LOGS_{SKIP,ALLOW}_REGEX into its two log deduplicators when `ray` is first
    imported. Where something imported Ray before setup() (a config check that loads Serve's schema), give
    the same regexes to those two objects (private: ray._private.ray_logging, checked for Ray 2.60)."""
    mod = sys.modules.get("ray._private.ray_logging")
    for dedup in (getattr(mod, "stdout_deduplicator", None), getattr(mod, "stderr_deduplicator", None)):
        if dedup is not None and hasattr(dedup, "skip_re") and hasattr(dedup, "allow_re"):
            dedup.skip_re = re.compile(os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"])
            dedup.allow_re = re.compile(os.environ["RAY_DEDUP_LOGS_ALLOW_REGEX"])


def setup_worker() -> None:
    """Ray's worker_process_setup_hook: the driver's level in every worker process (see runtime_env)."""
    if verbose():
        return
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    install_filters()


def runtime_env() -> dict[str, Any]:
    """What `ray.init` passes so every worker process, on any cluster, runs `setup_worker()`. The level itself
    travels as AIGC_LOG_LEVEL: inherited from the driver on a local cluster, from the job's runtime_env
    env_vars on a remote one (`ray job submit --runtime-env-json '{"env_vars": {"AIGC_LOG_LEVEL": "debug"}}'`).
    No env_vars here: Ray refuses a key that the job's runtime_env sets too."""
    return {"worker_process_setup_hook": f"{__name__}.setup_worker"}


def tune_verbosity() -> int | None:
    """Tune's RunConfig(verbose=...): silent at info (the search prints its own trial table), Ray's default
    (status tables every 30 s, per-trial boxes) at debug."""
    return None if verbose() else 0


def train_logging() -> Any:
    """Train's RunConfig(logging_config=...): WARNING at info (no "Reporting training result" or worker-group
    lines on the console; Ray's session log files keep everything), Train's default at debug."""
    if verbose():
        return None
    from ray.train import LoggingConfig  # on call: this module runs before Ray is imported (see the top)

    return LoggingConfig(log_level="WARNING")


class Progress:
    """Progress of long work: a bar when the driver is on a terminal, plain lines otherwise.

    `update(n)` moves the bar (cheap: call it every step); `log(line, short)` prints `line` in lines mode and
    shows `short` beside the bar in bar mode; `write(line)` always prints (validation results). Inside a Ray
    worker the bar is Ray's tqdm_ray, which the driver draws, so bars of concurrent trials do not collide.
    """

    def __init__(self, total: int, desc: str, initial: int = 0):
        self.desc, self.bar = desc, None
        if os.environ.get(PROGRESS_ENV) == "bar":
            self.bar = _make_bar(total, desc)
            self.bar.update(initial)

    def update(self, n: int) -> None:
        if self.bar is not None and n > self.bar.n:
            self.bar.update(n - self.bar.n)

    def log(self, line: str, short: str = "") -> None:
        if self.bar is None:
            self.write(line)
        elif short:
            self.bar.set_description(f"{self.desc} | {short}")

    @staticmethod
    def write(line: str) -> None:
        # sys.__stdout__: the process's own stdout, which Ray forwards, even where a library swapped sys.stdout
        print(line, flush=True, file=sys.__stdout__)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _make_bar(total: int, desc: str) -> Any:
    """Ray's tqdm_ray inside Ray (a worker sends its state to the driver, which draws it), else plain tqdm."""
    import ray  # on call: this module runs before Ray is imported (see the top)

    if ray.is_initialized():
        from ray.experimental import tqdm_ray

        return tqdm_ray.tqdm(total=total, desc=desc, unit="step")
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)
