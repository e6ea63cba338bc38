"""The refresh job's config: where new data arrives, when a candidate is promoted, how it is fine-tuned and served.

    refresh:   the incoming folder, settling, replay share, the promotion gate, the loop, the storage root
    finetune:  the candidate's fine-tune (same keys as a job config: full or LoRA); its `data` is the original data
    deploy:    the Serve app the champion runs on (the pipeline's deploy section)
    tracking:  MLflow: a run per cycle, the candidate as `challenger`, the promoted model as `champion`
    drift:     the embedded drift: each cycle first receives the next week of `aigc.corpus.DRIFT_WEEKS`

Importable without Ray, torch or FastAPI: the job checks a config before anything heavy loads.
"""

from __future__ import annotations

from pydantic import Field

from aigc.config import EMBEDDED_BASE, FinetuneConfig, RunSection, Strict, TrackingSection
from aigc.pipeline_config import DeploySection

MARKER = "_SUCCESS"  # a folder holding this file is complete: its data files are taken without waiting to settle

# The storage root (`refresh.storage_path`), read and written by `aigc.refresh` and `aigc.refresh_report`:
LOCK = "refresh.lock"  # flock held by the cycle or rollback in progress; its text names the holder
STATE = "state.json"  # the cycle (or rollback) in flight and its phase; absent between cycles
SERVED = "served.json"  # the model Serve runs, and the history of what it ran
LINEAGE_DIR = "lineage"  # lineage/<model>.json: one record per model (parent, data window, config, metrics, decision)
WINDOWS_DIR = "windows"  # windows/<window id>/: the window's files and its train/validation/test rows
DRIFT_DIR = "drift"  # the embedded drift's original data (week 0) under the root; the weeks go to refresh.incoming
REPORT_DIR = "report"  # report.html, its plot, and the cache of the scores it plots
INITIAL = "initial"  # the model id (and run name, when fine-tuned) of the model served before any cycle


class RefreshError(RuntimeError):
    """A cycle cannot go on (too few new rows, a file changed while read, a Serve update that never answered)."""


class RefreshBusy(RefreshError):
    """Another cycle or rollback holds the storage root's lock."""


class RefreshSection(Strict):
    """One refresh cycle: new settled files -> a candidate fine-tuned from the served model -> promoted if better."""

    storage_path: str = Field(
        "~/aigc/refresh", description="the refresh's storage root: state, lineage, windows, candidates' runs, the "
                                      "report, the lock, and the default MLflow store (mlflow.db)")
    incoming: str = Field("~/aigc/incoming", description="folder where new data files arrive (searched recursively)")
    pattern: str = Field("*.jsonl", min_length=1, description="glob of the data files in `incoming` (names starting "
                                                              "with '.' or '_' are never data: writers' temp files)")
    settle_s: float = Field(
        60.0, ge=0.0, description="a file is taken once unchanged (modification time) for this long, so a file still "
                                  f"being written is never read; a folder holding a `{MARKER}` file is taken at once")
    initial_model: str | None = Field(
        None, description="the model served before the first cycle (a model directory, or 'embedded' for the "
                          "embedded base); None: fine-tune finetune.model.name_or_path on finetune.data first")
    replay_fraction: float = Field(
        0.3, ge=0.0, lt=1.0, description="share of the candidate's training rows drawn from earlier data (the "
                                         "original train split and the served model's earlier windows) so it does "
                                         "not forget: 0.3 adds 3 old rows for every 7 new ones")
    validation_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="share of the new rows held out for "
                                                                         "validation (best checkpoint), by row hash")
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5, description="share of the new rows held out as the new data's "
                                                                  "test set (the gate's 'new'), by row hash")
    min_gain: float = Field(
        0.01, ge=0.0, description="promote only if the candidate's test loss on the new data is at least this "
                                  "fraction below the incumbent's (0.01 = 1%)")
    max_regression: float = Field(
        0.02, ge=0.0, description="and only if its loss on the original test set is at most this fraction above the "
                                  "incumbent's (forgetting; 0.02 = 2%)")
    eval_rows: int = Field(200, ge=1, description="rows of each held-out set the refresh report scores every model on")
    every: float | None = Field(None, ge=0.0, description="seconds from one cycle's start to the next's in a loop; "
                                                          "None: one cycle and exit (cron, a CronJob)")
    max_cycles: int | None = Field(None, ge=1, description="with `every`: cycles before the loop ends; None: forever")
    lock_timeout_s: float = Field(
        0.0, ge=0.0, description="how long a cycle waits for another one holding the lock; 0: exit at once saying so")


class DriftSection(Strict):
    """The embedded drift (`aigc.corpus.DRIFT_WEEKS`): the original data is week 0 of the drifting grammar, and each
    cycle first writes the next week's batch into `refresh.incoming` (a folder with a `_SUCCESS` marker)."""

    weeks: int = Field(0, ge=0, le=3, description="weeks of drift to deliver, one per cycle; 0: off (real data)")
    rows_per_week: int = Field(600, ge=10, description="task rows in each week's batch")
    seed: int = Field(0, description="seed of the weekly batches")


class RefreshConfig(Strict):
    """`aigc refresh` / `jobs/refresh.py`: keep the served model current (see `aigc.refresh`)."""

    refresh: RefreshSection = Field(default_factory=RefreshSection, description="data arrival, the promotion gate, "
                                                                                "the loop and the storage root")
    finetune: FinetuneConfig = Field(
        default_factory=FinetuneConfig,
        description="the candidate's fine-tune (model.peft for LoRA, optim, scaling, eval); its data section is the "
                    "original data (test split: the gate's 'old'); run.name and run.storage_path are the refresh's")
    deploy: DeploySection = Field(default_factory=DeploySection, description="the Serve app the champion runs on")
    tracking: TrackingSection = Field(default_factory=TrackingSection,
                                      description="MLflow: a run per cycle; aliases challenger and champion")
    drift: DriftSection = Field(default_factory=DriftSection, description="the embedded drift (demo and tests)")

    def problems(self) -> list[str]:
        out = [f"finetune.{p}" for p in self.finetune.problems()]
        f, r = self.finetune, self.refresh
        for key in ("name", "storage_path"):
            if getattr(f.run, key) != RunSection.model_fields[key].default:
                out.append(f"finetune.run.{key}: set by the refresh (each candidate's run is named after its data "
                           f"window, under refresh.storage_path); remove it")
        if f.tracking != TrackingSection():
            out.append("finetune.tracking: a refresh is tracked through its own `tracking` section; set tracking.* instead")
        if f.data.source == "hub":
            out.append("finetune.data.source: the refresh reads the original data's rows for replay and its test set "
                       "from files; use embedded or files")
        if f.data.source == "files" and not f.data.test_files:
            out.append("finetune.data.test_files: the refresh needs the original test set (the gate's 'old') as files")
        if r.initial_model is None and f.model.name_or_path is None:
            out.append("refresh.initial_model: with no initial model the refresh fine-tunes finetune.model.name_or_path "
                       f"first; give one of them (e.g. finetune.model.name_or_path={EMBEDDED_BASE})")
        if r.validation_fraction + r.test_fraction >= 0.8:
            out.append("refresh.test_fraction: validation_fraction + test_fraction leave under 20% of new rows to train on")
        if r.max_cycles is not None and r.every is None:
            out.append("refresh.max_cycles: only used with refresh.every (a loop); one invocation is one cycle")
        if "://" in r.storage_path:
            out.append(f"refresh.storage_path: a local or shared folder (the lock is a file lock), got {r.storage_path!r}")
        if self.drift.weeks:
            if f.data.source != "embedded" or f.data.format == "text":
                out.append("drift.weeks: the embedded drift is brief -> ad task data: needs finetune.data.source=embedded "
                           "and data.format chat or prompt_completion")
        out += self.deploy.problems("refresh (the champion)")
        return out
