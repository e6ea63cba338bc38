"""A real 4-trial search on 2 CPU cores: Ray Tune over Ray Train + DeepSpeed, ASHA, resume, report, winner.

One search serves every assertion (a search is minutes on 2 cores): it is interrupted once a trial has
finished (SIGUSR1, which Tune treats like Ctrl-C), then resumed by running it again, with Tune's saved state
rewound so the trials that ended look unfinished (as when the interrupt lands just after a trial's end).

The grid puts two strong learning rates first and two weak ones after. With 2 trials at a time a weak one
starts only when a strong one has ended, so when it reaches ASHA's first rung (step 10) a strong result is
on record there and ASHA must stop it: at step 10, lr 1e-4 is ~0.8 nats/token behind lr 3e-3 on this model
(measured), far beyond run-to-run noise. (ASHA may also stop the second strong trial: at a rung with one
result on record, anything worse is stopped.)
"""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS, EVERY = 40, 10


def _overrides(storage: Path) -> list[str]:
    return [
        f"search.storage_path={storage}", "search.name=it", "search.algorithm=grid", "search.num_samples=1",
        "search.asha.grace_period=1", "search.asha.reduction_factor=2",
        # the shipped ranges are replaced by fixed choices (low/high of the YAML layer cleared explicitly)
        "space.lr={kind: choice, values: [3.0e-3, 1.0e-2, 1.0e-4, 5.0e-5], low: null, high: null}",
        "space.weight_decay={kind: choice, values: [0.01]}",
        "space.dropout={kind: choice, values: [0.0], low: null, high: null}",
        "base.data.format=text", "base.model.name_or_path=null", "base.data.block_size=128",
        "base.data.embedded={n_train: 1500, n_validation: 150, n_test: 50, seed: 0}",
        f"base.optim.max_steps={MAX_STEPS}", f"base.eval.every_steps={EVERY}", "base.optim.warmup_steps=5",
        "base.eval.log_every=20",
        # one worker a trial, still 2 trials at a time: this search tests Tune's side (ASHA, resume, report); the
        # bucket search (test_s3_runs) and the pipeline job run the shipped 2 workers a trial. Fixture 121.6 -> 95.1 s
        "base.scaling.num_workers=1", "base.scaling.cpus_per_worker=0.98",
    ]


def _finished(sdir: Path) -> set[str]:
    """Trials that have ended: exported (trial.json) or stopped by ASHA (its ledger)."""
    done = {p.parent.name.removeprefix("trial-") for p in (sdir / "trials").glob("trial-*/trial.json")}
    ledger = sdir / "asha_stops.jsonl"
    if ledger.is_file():
        done |= {json.loads(x)["trial_id"] for x in ledger.read_text().splitlines() if x.strip()}
    return done


def _interrupt_when_one_finishes(sdir: Path, stop: threading.Event) -> threading.Thread:
    def watch():
        while not stop.wait(1.0):
            if _finished(sdir):
                os.kill(os.getpid(), signal.SIGUSR1)  # Tune: stop, save the experiment state, return
                return

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def _forget_ends(sdir: Path, tids: set[str]) -> None:
    """Tune's state as an interrupt leaves it when it lands between a trial's end (its trial.json, or
    ASHA's ledger line) and Tune saving that end (CI hit this): the trials are still RUNNING there."""
    state = sorted((sdir / "tune").glob("experiment_state-*.json"))[-1]  # the one Tuner.restore reads
    raw = json.loads(state.read_text())
    for entry in raw["trial_data"]:
        trial = json.loads(entry[0])
        if trial["trial_id"] in tids:
            trial["status"] = "RUNNING"
            entry[0] = json.dumps(trial)
    state.write_text(json.dumps(raw))


def _result_lines(sdir: Path, tid: str) -> int:
    return len((sdir / "tune" / tid / "result.json").read_text().splitlines())


def _attempts(sdir: Path, tid: str) -> int:
    return len((sdir / "trials" / f"trial-{tid}" / "attempts.jsonl").read_text().splitlines())


def test_reaper_frees_only_groups_whose_creator_died(ray_local):
    """A stopped trial's Train placement group outlives its killed controller; the search frees it."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from aigc.raycompat import reap_orphaned_placement_groups

    @ray.remote(num_cpus=0)
    class Creator:
        def make(self):
            self.pg = placement_group([{"CPU": 0.1}])
            ray.get(self.pg.ready())
            return self.pg.id.hex()

    drivers = placement_group([{"CPU": 0.1}])  # made by the driver: never touched
    ray.get(drivers.ready())
    alive, doomed = Creator.remote(), Creator.remote()
    ray.get(alive.make.remote())
    doomed_pg = ray.get(doomed.make.remote())
    ray.kill(doomed)
    deadline = time.time() + 30
    while time.time() < deadline and ray.util.placement_group_table()[doomed_pg]["state"] != "REMOVED":
        if reap_orphaned_placement_groups():
            break
        time.sleep(0.5)
    table = ray.util.placement_group_table()
    assert table[doomed_pg]["state"] == "REMOVED"
    assert table[drivers.id.hex()]["state"] == "CREATED"
    assert sum(1 for v in table.values() if v["state"] == "CREATED") == 2  # the driver's and the live actor's
    ray.kill(alive)
    remove_placement_group(drivers)
    reap_orphaned_placement_groups()


@pytest.fixture(scope="module")
def search(ray_local, tmp_path_factory):
    from aigc.config import load_config
    from aigc.search import SearchConfig, run_search, search_dir_of

    cfg = load_config(SearchConfig, ROOT / "tune" / "configs" / "tiny-cpu.yaml",
                      _overrides(tmp_path_factory.mktemp("searches")))
    sdir = search_dir_of(cfg)
    t0 = time.time()
    stop = threading.Event()
    _interrupt_when_one_finishes(sdir, stop)
    try:
        first = run_search(cfg)
    finally:
        stop.set()
    before = {tid: (_result_lines(sdir, tid), _attempts(sdir, tid),
                    (sdir / "trials" / f"trial-{tid}" / "trial.json").stat().st_mtime_ns
                    if (sdir / "trials" / f"trial-{tid}" / "trial.json").is_file() else None)
              for tid in _finished(sdir)}
    _forget_ends(sdir, set(before))  # whatever Tune saved, the resume must go by the trials' own files
    t1 = time.time()
    second = run_search(cfg)
    print(f"search: first run {t1 - t0:.0f} s (interrupted), resumed run {time.time() - t1:.0f} s")
    return {"cfg": cfg, "sdir": sdir, "first": first, "second": second, "before": before}


def test_interrupted_search_resumes_without_rerunning_finished_trials(search):
    first, second, sdir = search["first"], search["second"], search["sdir"]
    assert first.interrupted and first.winner_dir is None
    assert second.resumed and not second.interrupted
    assert search["before"], "the first run was interrupted after a trial had finished"
    for tid, (lines, attempts, mtime) in search["before"].items():
        assert _result_lines(sdir, tid) == lines, f"{tid} reported again after the resume"
        assert _attempts(sdir, tid) == attempts == 1, f"{tid} was started again after the resume"
        if mtime is not None:
            assert (sdir / "trials" / f"trial-{tid}" / "trial.json").stat().st_mtime_ns == mtime
    assert len(second.trials) == 4 and all(t["status"] != "running" for t in second.trials)
    # the report's learning curves have every validation, also those made while the search was interrupted
    from aigc.report_data import load_search

    for t in load_search(sdir).trials:
        assert [h["step"] for h in t.history] == list(range(EVERY, t.steps + 1, EVERY)), t.trial_id


def test_asha_stops_weak_trials_early(search):
    rows = {r["trial_id"]: r for r in search["second"].trials}
    stopped = [r for r in rows.values() if r["status"] == "stopped by ASHA"]
    assert len(stopped) >= 1
    for r in stopped:
        assert r["asha_stopped"] and r["steps"] < MAX_STEPS and r["asha_stop_step"] == r["steps"]
    weak = [r for r in rows.values() if r["lr"] <= 1e-4]
    assert all(r["status"] == "stopped by ASHA" and r["steps"] == EVERY for r in weak), weak
    completed = [r for r in rows.values() if r["status"] == "completed"]
    assert completed and all(r["steps"] == MAX_STEPS for r in completed)
    assert all(r["error"] is None for r in rows.values())


def test_trials_csv_and_report_list_every_trial(search):
    sdir, second = search["sdir"], search["second"]
    ids = {t["trial_id"] for t in second.trials}
    rows = list(csv.DictReader((sdir / "trials.csv").open()))
    assert {r["trial_id"] for r in rows} == ids and len(rows) == 4
    losses = [float(r["best_val_loss"]) for r in rows]
    assert losses == sorted(losses) and [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    for r in rows:
        assert float(r["lr"]) in (3e-3, 1e-2, 1e-4, 5e-5)
        assert float(r["cpu_hours"]) > 0 and float(r["wall_s"]) > 0
        assert int(r["steps"]) in range(EVERY, MAX_STEPS + 1, EVERY)
    page = (sdir / "report.html").read_text()
    md = (sdir / "report.md").read_text()
    assert all(t in page and t in md for t in ids)
    assert page.count("data:image/png;base64,") == 5 and "src='plots/" not in page
    assert str(sdir / "winner") in page and "stopped by ASHA" in page
    for name in ("learning_curves", "loss_vs_hparams", "parallel_coordinates", "best_so_far", "importance"):
        data = (sdir / "plots" / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[-8:-4] == b"IEND" and len(data) > 5000


def test_the_search_and_each_trial_are_tracked_in_mlflow(search):
    """The search is one MLflow run (continued across the interrupt), each trial one child run with its
    hyperparameters and validation losses by step, linked from the report; the winner is the challenger."""
    from mlflow import MlflowClient

    from aigc.modeldir import files_fingerprint, verify_model_dir
    from aigc.report_data import load_search

    sdir = search["sdir"]
    uri = f"sqlite:///{sdir.parent / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = client.get_run(json.loads((sdir / "mlflow_run.json").read_text())["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["search.name"] == "it"
    assert {"report.html", "report.md", "trials.csv", "search.yaml", "plots", "evaluation"} <= \
        {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_trial = {r.data.tags["aigc.trial_id"]: r for r in children}
    assert len(children) == len(by_trial) == 4  # one run per trial, also for those restarted by the resume
    rows = {r["trial_id"]: r for r in csv.DictReader((sdir / "trials.csv").open())}
    for t in load_search(sdir).trials:
        run = by_trial[t.trial_id]
        assert float(run.data.params["lr"]) == pytest.approx(t.params["lr"])
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
        assert steps and set(steps) <= {h["step"] for h in t.history}
        assert rows[t.trial_id]["mlflow_run"] == run.info.run_id  # the report links the trial to its run
    challenger = client.get_model_version_by_alias("aigc", "challenger")
    assert challenger.run_id == parent.info.run_id
    assert challenger.tags["aigc.fingerprint"] == files_fingerprint(verify_model_dir(sdir / "winner"))


def test_winner_is_the_lowest_loss_trial_and_loads_with_plain_transformers(search):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aigc.modeldir import verify_model_dir

    sdir, second = search["sdir"], search["second"]
    best = min((t for t in second.trials if t["best_val_loss"] is not None), key=lambda t: t["best_val_loss"])
    assert second.best_trial == best["trial_id"]
    assert Path(second.winner_dir) == sdir / "winner"
    meta = verify_model_dir(sdir / "winner")  # every checksum
    assert meta["trial"] == best["trial_id"]
    assert meta["metrics"]["val_loss"] == pytest.approx(best["best_val_loss"])
    assert meta["step"] == best["best_step"]
    assert meta["hyperparameters"]["lr"] == pytest.approx(best["lr"])
    assert meta["search_config"]["search"]["name"] == "it"
    assert meta["config"]["optim"]["lr"] == pytest.approx(best["lr"])  # the trial's own training config

    model = AutoModelForCausalLM.from_pretrained(sdir / "winner")
    tok = AutoTokenizer.from_pretrained(sdir / "winner")
    ids = tok("Introducing the new", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)


def test_aigc_report_regenerates_the_report(search, tmp_path):
    from aigc.cli import main

    assert main(["report", str(search["sdir"]), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "trials.csv").read_text() == (search["sdir"] / "trials.csv").read_text()
    assert (tmp_path / "plots" / "importance.png").is_file()


def test_failing_trials_are_recorded_retried_and_do_not_kill_the_search(ray_local, tmp_path, capsys):
    """The base model's weights go bad on shared storage after the driver checked the tokenizer: every
    worker fails to load it. Train does not restart the workers (base.scaling.max_failures=0); Tune retries
    the trial once (search.max_failures=1), and it ends as an error with the worker's exception in trials.csv
    and the report, and the search still ends with a report and no winner; the entry point says so and exits 1."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    from aigc.config import TinyArch
    from aigc.corpus import sample_ads
    from aigc.modeling import build_tiny_gpt2, train_tokenizer

    base = tmp_path / "base"
    tok = train_tokenizer([d["text"] for d in sample_ads(300, seed=1)], vocab_size=300)
    build_tiny_gpt2(TinyArch(), len(tok), 64, tok.eos_token_id).save_pretrained(base)
    tok.save_pretrained(base)
    AutoModelForCausalLM.from_pretrained(base)  # loads before the damage
    (base / "model.safetensors").write_bytes(b"\x00" * 64)  # truncated: not a safetensors file any more

    spec = importlib.util.spec_from_file_location("tune_search_entry", ROOT / "tune" / "search.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    sdir = tmp_path / "searches" / "broken"
    rc = entry.main(["--config", str(ROOT / "tune" / "configs" / "tiny-cpu.yaml"),
                     f"search.storage_path={tmp_path / 'searches'}", "search.name=broken", "search.algorithm=grid",
                     "search.num_samples=1", "search.max_failures=1", "base.scaling.max_failures=0",
                     "space.lr={kind: choice, values: [1.0e-3], low: null, high: null}",
                     "space.weight_decay={kind: choice, values: [0.01]}",
                     "space.dropout={kind: choice, values: [0.0], low: null, high: null}",
                     f"base.model.name_or_path={base}", "base.data.format=text", "base.data.block_size=64",
                     "base.scaling.num_workers=1",
                     "base.data.embedded={n_train: 300, n_validation: 60, n_test: 20, seed: 0}"])
    out = capsys.readouterr()
    assert rc == 1
    assert "no winner" in out.err and "1 of 1 trials failed" in out.err
    rows = list(csv.DictReader((sdir / "trials.csv").open()))
    assert len(rows) == 1 and all(r["status"] == "error" for r in rows)
    assert all("SafetensorError" in r["error"] or "safetensors" in r["error"].lower() for r in rows), rows
    for r in rows:  # the first attempt and its one retry
        assert _attempts(sdir, r["trial_id"]) == 2 and r["num_failures"] == "2"
    page = (sdir / "report.html").read_text()
    assert "<h2>Errors</h2>" in page and all(r["trial_id"] in page for r in rows)
    assert not (sdir / "winner").exists()
