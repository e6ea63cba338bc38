"""aigc.tracking against a real MLflow SQLite store in tmp_path: params flattened, metrics by step, artifacts,
registered versions tagged with their fingerprint, aliases that move, a resumed run continued, and nothing
written when tracking is disabled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aigc.config import ConfigError, FinetuneConfig, TrackingSection, build
from aigc.layout import TRACKING_RECORD
from aigc.modeldir import files_fingerprint, read_metadata, write_metadata
from aigc.search_config import SearchConfig
from aigc.tracking import (
    CHALLENGER,
    CHAMPION,
    PARENT_TAG,
    TRUNCATED,
    flatten_params,
    open_tracker,
    resolve_uri,
)


def fake_model_dir(path: Path, weights: bytes) -> Path:
    """An aigc model directory as far as the registry looks: files and their checksums in aigc.json."""
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(weights)
    write_metadata(path, config={}, metrics={}, step=7, role="best")
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One store for the module (a new SQLite store runs MLflow's migrations: seconds); each test has its own
    experiment and registered model in it."""
    return tmp_path_factory.mktemp("tracking") / "root"


@pytest.fixture
def tracker(root, request, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's defaults (./mlruns) would land here
    name = request.node.name.removeprefix("test_")[:40]
    return open_tracker(TrackingSection(experiment=name, registered_model=name), root)


def test_flatten_params_joins_keys_and_respects_the_value_limit():
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    flat = flatten_params({"optim": {"lr": 0.003, "betas": [0.9, 0.95]}, "model": {"name_or_path": None},
                           "data": {"hub_name": "x" * (MAX_PARAM_VAL_LENGTH + 10)}})
    assert flat["optim.lr"] == "0.003" and flat["optim.betas"] == "[0.9, 0.95]" and flat["model.name_or_path"] == "None"
    assert len(flat["data.hub_name"]) == MAX_PARAM_VAL_LENGTH and flat["data.hub_name"].endswith(TRUNCATED)


def test_run_has_its_config_metrics_by_step_and_artifacts(tracker, root, tmp_path):
    assert tracker.uri == f"sqlite:///{root / 'mlflow.db'}" and (root / "mlflow.db").is_file()
    config = SearchConfig().model_dump(mode="json")  # over 100 params: more than one of MLflow's batches
    run = tracker.start_run("r1", params=config, tags={"aigc.kind": "search"})
    for step, loss in ((10, 3.0), (20, 2.5)):
        run.log_metrics({"step": step, "val_loss": loss, "lr": 1e-3, "done": False, "note": "x"}, step=step)
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 10}\n')
    run.log_artifacts([log, tmp_path / "missing.json"])
    run.log_evaluation({"base": {"test_ppl": 40.0, "test_loss": 3.7}, "finetuned": {"test_ppl": 9.0, "test_loss": 2.2}})
    run.end()

    c = tracker.client
    got = c.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "r1"
    assert got.data.params["base.optim.lr"] == "0.003" and got.data.params["space.lr.kind"] == "loguniform"
    assert len(got.data.params) == len(flatten_params(config)) > 100
    assert [(m.step, m.value) for m in c.get_metric_history(run.run_id, "val_loss")] == [(10, 3.0), (20, 2.5)]
    assert {"step", "done", "note"}.isdisjoint(got.data.metrics)
    assert got.data.metrics["finetuned.test_ppl"] == 9.0 and got.data.metrics["base.test_ppl"] == 40.0
    assert {a.path for a in c.list_artifacts(run.run_id)} == {"metrics.jsonl", "evaluation"}
    table = (Path(got.info.artifact_uri) / "evaluation" / "comparison.md").read_text()
    assert "| test perplexity | 40.00 | 9.00 |" in table
    # the artifacts live under the storage root, not in MLflow's default ./mlruns
    assert Path(got.info.artifact_uri).is_relative_to(root / "mlartifacts")
    assert not (tmp_path / "mlruns").exists()


def test_a_recorded_run_is_continued_and_children_nest(tracker, tmp_path):
    record = tmp_path / "run" / TRACKING_RECORD
    first = tracker.start_run("r", params={"a": 1}, record=record)
    first.log_metrics({"loss": 2.0}, step=10)
    first.end("KILLED")
    again = tracker.start_run("r", params={"a": 2, "b": 3}, record=record)  # a resume: same run, RUNNING again
    assert again.run_id == first.run_id == json.loads(record.read_text())["run_id"]
    got = tracker.client.get_run(again.run_id)
    assert got.info.status == "RUNNING" and got.data.params == {"a": "1", "b": "3"}  # a param keeps its first value
    child = again.start_child("trial-1", params={"lr": 0.1})
    assert tracker.client.get_run(child.run_id).data.tags[PARENT_TAG] == again.run_id
    fresh = tracker.start_run("r", record=tmp_path / "other" / TRACKING_RECORD)
    assert fresh.run_id != first.run_id


def test_registered_versions_carry_the_fingerprint_and_aliases_move(tracker, tmp_path):
    from aigc.serving.api import system_fingerprint

    one, two = fake_model_dir(tmp_path / "one", b"1"), fake_model_dir(tmp_path / "two", b"2")
    run = tracker.start_run("r")
    v1 = run.register_model(one, alias=CHALLENGER)
    assert v1.version == "1" and v1.aliases == (CHALLENGER,) and v1.run_id == run.run_id
    assert v1.fingerprint == files_fingerprint(read_metadata(one)) == system_fingerprint(read_metadata(one))
    assert Path(v1.source) == one.resolve()
    tracker.set_alias(CHAMPION, v1.version)
    v2 = run.register_model(two, alias=CHALLENGER)  # the challenger moves to the new candidate
    assert v2.version == "2"
    assert tracker.version_by_alias(CHALLENGER).version == "2" and tracker.version_by_alias(CHAMPION).version == "1"
    again = tracker.register_model(two, alias=CHAMPION)  # promoting it: found by fingerprint, not registered twice
    assert again.version == "2" and set(again.aliases) == {CHAMPION, CHALLENGER}
    assert tracker.version("1").aliases == ()
    assert tracker.find_version(v1.fingerprint).version == "1" and tracker.find_version("fp_none") is None
    assert tracker.version_by_alias("nobody") is None


def test_disabled_tracking_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert open_tracker(TrackingSection(enabled=False), tmp_path / "root") is None
    assert list(tmp_path.iterdir()) == []


def test_tracking_config():
    assert resolve_uri(TrackingSection(uri="sqlite:///~/x.db"), "/r").startswith("sqlite:////")
    assert resolve_uri(TrackingSection(uri="http://mlflow:5000"), "/r") == "http://mlflow:5000"
    with pytest.raises(ConfigError, match=r"tracking\.uri"):
        build(FinetuneConfig, {"tracking": {"uri": "no scheme"}})
    with pytest.raises(ConfigError, match=r"base\.tracking: a search is tracked through its own"):
        build(SearchConfig, {"base": {"tracking": {"enabled": False}}})
    assert build(SearchConfig, {"tracking": {"enabled": False}}).tracking.enabled is False


def test_the_pipeline_makes_the_deployed_winner_champion(root, tmp_path, monkeypatch):
    """What the pipeline does once Serve answers: the winner the search registered (as challenger) becomes the
    champion, found by its fingerprint (no second version); with tracking off, nothing is written."""
    from aigc.pipeline import mark_champion
    from aigc.pipeline_config import PipelineConfig

    monkeypatch.chdir(tmp_path)
    winner = fake_model_dir(tmp_path / "winner", b"w")
    cfg = build(PipelineConfig, {"search": {"storage_path": str(root)},
                                 "tracking": {"experiment": "pipeline", "registered_model": "pipeline"}})
    search = open_tracker(cfg.tracking, cfg.search.storage_path)
    registered = search.start_run("search").register_model(winner, alias=CHALLENGER)
    champion = mark_champion(cfg, str(winner))
    assert champion.version == registered.version and set(champion.aliases) == {CHAMPION, CHALLENGER}
    assert search.version_by_alias(CHAMPION).fingerprint == files_fingerprint(read_metadata(winner))

    off = build(PipelineConfig, {"search": {"storage_path": str(tmp_path / "off")}, "tracking": {"enabled": False}})
    assert mark_champion(off, str(winner)) is None and not (tmp_path / "off").exists()


def test_the_report_links_each_tracked_trial_to_its_run(tmp_path):
    """A trial's run id (a link when the store is a server) in the report's mlflow_run column; no column
    when no trial was tracked."""
    import csv

    from aigc.report import render
    from aigc.report_data import SearchData, TrialRecord

    url = "http://mlflow:5000/#/experiments/1/runs/abc123"
    history = [{"step": 10, "val_loss": 1.0, "timestamp": 110.0}]
    trials = [TrialRecord("t1", "completed", {"lr": 0.01}, history, mlflow_run={"run_id": "abc123", "url": url}),
              TrialRecord("t2", "completed", {"lr": 0.02}, history, mlflow_run={"run_id": "def456", "url": None})]
    config = {"search": {"name": "s"}, "space": {"lr": {"kind": "choice", "values": [0.01, 0.02]}}}
    files = render(SearchData(str(tmp_path), config, trials), tmp_path / "tracked")
    page = (tmp_path / "tracked" / "report.html").read_text()
    assert f"<a href='{url}'><code>abc123</code></a>" in page and "<td class='l'><code>def456</code></td>" in page
    assert {r["trial_id"]: r["mlflow_run"] for r in csv.DictReader(open(files["trials.csv"]))} == \
        {"t1": "abc123", "t2": "def456"}
    for t in trials:
        t.mlflow_run = None
    render(SearchData(str(tmp_path), config, trials), tmp_path / "untracked")
    assert "mlflow_run" not in (tmp_path / "untracked" / "report.html").read_text()
