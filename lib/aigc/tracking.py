"""Experiment tracking and the model registry: one module over MLflow's client, called from the driver side.

    tracker = open_tracker(cfg.tracking, cfg.run.storage_path)   # None when tracking.enabled is false
    run = tracker.start_run("my-run", params=cfg.model_dump(mode="json"), record=run_dir / TRACKING_RECORD)
    run.log_metrics({"val_loss": 2.1, "lr": 3e-3}, step=50)
    run.log_artifacts([run_dir / "metrics.jsonl"])
    run.register_model(best_dir, alias=CHALLENGER)                 # a version tagged with the model's fingerprint
    run.end()
    tracker.register_model(deployed_dir, alias=CHAMPION)           # finds that version again, moves the alias

Who calls it: `aigc.finetune` (params at the start, the metrics of every validation from Train's controller, the
before/after tables and the run's logs at the end, the best model as `challenger`), `aigc.search` and
`aigc.tuning` (the search as a run, each trial as its child run from a Tune callback on the search's driver, the
report, the winner as `challenger`) and `aigc.pipeline` (the deployed winner becomes `champion`). Never a Train
worker: every rank would log the same numbers again, and a SQLite store wants one writer at a time.

The store is `tracking.uri`; by default `sqlite:///<storage root>/mlflow.db` with the artifacts in
`<storage root>/mlartifacts` (the experiment is created with that artifact location: MLflow's own default is
`./mlruns` in whatever the current directory is). A run folder remembers its MLflow run in `mlflow_run.json`, so
running the same run or search again (a resume) logs to the same MLflow run and a fresh folder starts a new one.

Registered versions carry the tag `aigc.fingerprint`, the model directory's fingerprint (what Serve answers as
`system_fingerprint`): registering a model again finds its version instead of adding one, and the `champion`
alias can be checked against what Serve runs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from aigc.comparison import comparison_rows
from aigc.config import TrackingSection, expand
from aigc.layout import TRACKING_ARTIFACTS, TRACKING_DB

CHAMPION, CHALLENGER = "champion", "challenger"  # what Serve runs; the last candidate
KIND_TAG, FINGERPRINT_TAG, ROLE_TAG = "aigc.kind", "aigc.fingerprint", "aigc.role"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag that nests a run under another (the UI shows the tree)
TRUNCATED = "...[truncated]"


# ---------------------------------------------------------------------------------------------- pure


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level, keys joined by dots ({"optim": {"lr": 1}} -> {"optim.lr": 1})."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


def flatten_params(tree: Mapping[str, Any]) -> dict[str, str]:
    """A config as MLflow params: flattened keys, values as text (lists as JSON), each cut to MLflow's limit
    on a param value (MAX_PARAM_VAL_LENGTH characters; the cut ones end in TRUNCATED)."""
    out = {}
    for key, value in flatten(tree).items():
        text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            text = text[: MAX_PARAM_VAL_LENGTH - len(TRUNCATED)] + TRUNCATED
        out[key] = text
    return out


def numeric_metrics(metrics: Mapping[str, Any], exclude: Iterable[str] = ()) -> dict[str, float]:
    """The int and float values of a report (booleans, strings and nested values are not metrics)."""
    skip = set(exclude)
    return {k: float(v) for k, v in metrics.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


def resolve_uri(section: TrackingSection, storage_root: str | os.PathLike) -> str:
    """`tracking.uri`, or the default SQLite database in the storage root; `~` expanded in a sqlite path."""
    if section.uri is None:
        return f"sqlite:///{Path(expand(str(storage_root))) / TRACKING_DB}"
    head = "sqlite:///"
    if section.uri.startswith(head + "~"):
        return head + os.path.expanduser(section.uri[len(head):])
    return section.uri


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def comparison_markdown(evaluation: Mapping[str, Any]) -> str:
    """The before/after table of an evaluation ({"base", "finetuned"}) as Markdown (the driver prints the same rows)."""
    rows = comparison_rows(evaluation["base"], evaluation["finetuned"])
    return "\n".join(["| | base | fine-tuned |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]) + "\n"


# ------------------------------------------------------------------------------------------ the store


@cache
def _client(uri: str) -> MlflowClient:
    """One client per store and process (the first one on a new SQLite file creates MLflow's tables: seconds)."""
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@dataclass(frozen=True)
class ModelVersionInfo:
    """A registered version: its number, the fingerprint it was tagged with, where it is, the run that made it."""

    version: str
    fingerprint: str | None
    source: str
    run_id: str | None
    aliases: tuple[str, ...] = ()


def _version_info(mv: Any) -> ModelVersionInfo:
    return ModelVersionInfo(str(mv.version), (mv.tags or {}).get(FINGERPRINT_TAG), mv.source, mv.run_id or None,
                            tuple(mv.aliases or ()))


@dataclass(frozen=True)
class Tracker:
    """A tracking store and experiment, and the registered model its exported models become versions of.
    Plain strings, so it pickles to Train's controller and into Tune's saved callbacks; the MLflow client is
    made once per process."""

    uri: str
    experiment_id: str
    registered_model: str

    @property
    def client(self) -> MlflowClient:
        return _client(self.uri)

    def run_url(self, run_id: str) -> str | None:
        """The run's page on a tracking server (None for a database or folder: open it with `mlflow ui`)."""
        return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}" if _is_server(self.uri) else None

    # ------------------------------------------------------------------------------------------- runs

    def start_run(self, name: str, *, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None,
                  parent_run_id: str | None = None, record: str | os.PathLike | None = None) -> TrackedRun:
        """A run named `name` with `params` flattened (`flatten_params`), nested under `parent_run_id` when given.

        With `record` (a run folder's `mlflow_run.json`): when it names a live run of this store, that run is
        continued (status RUNNING again; only params it does not have yet are added, since MLflow refuses to change
        one); otherwise a new run is made and recorded there."""
        run = self._recorded_run(record) if record else None
        if run is None:
            all_tags = {**(tags or {}), **({PARENT_TAG: parent_run_id} if parent_run_id else {})}
            run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
            if record:
                self._write_record(Path(record), run.info.run_id)
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
        tracked = TrackedRun(self, run.info.run_id)
        tracked.log_params(params or {}, logged=run.data.params)
        return tracked

    def _recorded_run(self, record: str | os.PathLike) -> Any:
        path = Path(record)
        if not path.is_file():
            return None
        rec = json.loads(path.read_text())
        if rec.get("uri") != self.uri or rec.get("experiment_id") != self.experiment_id:
            return None  # the folder was tracked in another store: start afresh in this one
        try:
            run = self.client.get_run(rec["run_id"])
        except MlflowException:  # deleted from the store since
            return None
        return run if run.info.lifecycle_stage == "active" else None

    def _write_record(self, path: Path, run_id: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"run_id": run_id, "experiment_id": self.experiment_id, "uri": self.uri,
                                   "url": self.run_url(run_id)}, indent=2))
        os.replace(tmp, path)

    # --------------------------------------------------------------------------------------- registry

    def find_version(self, fp: str) -> ModelVersionInfo | None:
        """The version tagged with fingerprint `fp`, if one is registered (the oldest, should there be several)."""
        found = self.client.search_model_versions(
            f"name = '{self.registered_model}' and tags.`{FINGERPRINT_TAG}` = '{fp}'")
        if not found:
            return None
        return self.version(min(found, key=lambda mv: int(mv.version)).version)

    def version(self, version: str | int) -> ModelVersionInfo:
        """A version with its aliases (searching versions returns them without)."""
        return _version_info(self.client.get_model_version(self.registered_model, str(version)))

    def version_by_alias(self, alias: str) -> ModelVersionInfo | None:
        """The version `alias` points at; None when the alias (or the registered model) does not exist."""
        try:
            return _version_info(self.client.get_model_version_by_alias(self.registered_model, alias))
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                return None
            raise

    def set_alias(self, alias: str, version: str | int) -> None:
        """Point `alias` at `version` (an alias names one version: it moves off the one it was on)."""
        self.client.set_registered_model_alias(self.registered_model, alias, str(version))

    def register_model(self, model_dir: str | os.PathLike, *, run_id: str | None = None,
                       alias: str | None = None) -> ModelVersionInfo:
        """`model_dir` (an aigc model directory) as a version of the registered model, tagged with its fingerprint
        and role; the version that already has that fingerprint when there is one. Then `alias` moves to it.

        The version's source is the directory itself (registering does not copy the weights): keep it where it is."""
        # here, not at the top: modeldir imports transformers, and Train's controller imports this module (runlog)
        from aigc.modeldir import files_fingerprint, read_metadata

        meta = read_metadata(model_dir)
        fp = files_fingerprint(meta)
        found = self.find_version(fp)
        if found is None:
            try:
                self.client.create_registered_model(self.registered_model)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            mv = self.client.create_model_version(
                self.registered_model, source=str(Path(model_dir).resolve()), run_id=run_id,
                tags={FINGERPRINT_TAG: fp, ROLE_TAG: str(meta.get("role", ""))},
                description=f"aigc model directory, step {meta.get('step')}")
            found = _version_info(mv)
        if alias:
            self.set_alias(alias, found.version)
        return self.version(found.version)


def open_tracker(section: TrackingSection, storage_root: str | os.PathLike) -> Tracker | None:
    """The store and experiment of `section` (created on first use), or None when tracking is disabled: then
    nothing is created or written."""
    if not section.enabled:
        return None
    uri = resolve_uri(section, storage_root)
    if section.uri is None:
        Path(expand(str(storage_root))).mkdir(parents=True, exist_ok=True)
    client = _client(uri)
    exp = client.get_experiment_by_name(section.experiment)
    if exp is None:
        # on a server, the server's artifact store; else an explicit folder in the storage root
        location = None if _is_server(uri) else str(Path(expand(str(storage_root))) / TRACKING_ARTIFACTS)
        try:
            exp_id = client.create_experiment(section.experiment, artifact_location=location)
        except MlflowException as e:  # another driver created it a moment ago
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp_id = client.get_experiment_by_name(section.experiment).experiment_id
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":  # deleted in the UI: its name stays taken until restored
            client.restore_experiment(exp_id)
    return Tracker(uri, exp_id, section.registered_model)


@dataclass(frozen=True)
class TrackedRun:
    """One MLflow run of a tracker (picklable: Train's controller and Tune's callbacks hold one)."""

    tracker: Tracker
    run_id: str

    @property
    def url(self) -> str | None:
        return self.tracker.run_url(self.run_id)

    def log_params(self, params: Mapping[str, Any], logged: Mapping[str, str] | None = None) -> None:
        """`params` flattened; keys in `logged` (already on the run) are left as they are."""
        new = [Param(k, v) for k, v in flatten_params(params).items() if k not in (logged or {})]
        for chunk in _chunks(new, MAX_PARAMS_TAGS_PER_BATCH):
            self.tracker.client.log_batch(self.run_id, params=chunk)

    def log_metrics(self, metrics: Mapping[str, Any], step: int, exclude: Iterable[str] = ("step",)) -> None:
        """The numeric values of `metrics` at `step` (the step itself is the x axis, not a metric)."""
        now = int(time.time() * 1000)
        items = [Metric(k, v, now, int(step)) for k, v in numeric_metrics(metrics, exclude).items()]
        for chunk in _chunks(items, MAX_METRICS_PER_BATCH):
            self.tracker.client.log_batch(self.run_id, metrics=chunk)

    def log_artifacts(self, paths: Iterable[str | os.PathLike], artifact_path: str | None = None) -> None:
        """Files and folders (a folder keeps its name) as the run's artifacts; a path that does not exist is
        skipped (a resumed run may not have written every file)."""
        for p in map(Path, paths):
            if p.is_dir():
                self.tracker.client.log_artifacts(self.run_id, str(p), "/".join(filter(None, [artifact_path, p.name])))
            elif p.is_file():
                self.tracker.client.log_artifact(self.run_id, str(p), artifact_path)

    def log_evaluation(self, evaluation: Mapping[str, Any]) -> None:
        """A before/after evaluation ({"base", "finetuned"}): evaluation/comparison.md (the table the driver
        prints), evaluation/evaluation.json (everything), and each side's numbers as metrics `base.*`, `finetuned.*`."""
        self.tracker.client.log_text(self.run_id, comparison_markdown(evaluation), "evaluation/comparison.md")
        self.tracker.client.log_dict(self.run_id, dict(evaluation), "evaluation/evaluation.json")
        sides = {f"{side}.{k}": v for side in ("base", "finetuned") for k, v in (evaluation.get(side) or {}).items()}
        self.log_metrics(sides, step=0)

    def register_model(self, model_dir: str | os.PathLike, alias: str | None = None) -> ModelVersionInfo:
        """`Tracker.register_model` with this run as the version's run."""
        return self.tracker.register_model(model_dir, run_id=self.run_id, alias=alias)

    def start_child(self, name: str, **kwargs: Any) -> TrackedRun:
        """A run nested under this one (see `Tracker.start_run`)."""
        return self.tracker.start_run(name, parent_run_id=self.run_id, **kwargs)

    def end(self, status: str = "FINISHED") -> None:
        """FINISHED, FAILED or KILLED (a run continued later is set RUNNING again)."""
        self.tracker.client.set_terminated(self.run_id, status)
