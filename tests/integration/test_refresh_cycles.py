"""The refresh for real: Ray Train fine-tunes, Serve updates, MLflow, and the refresh job killed with SIGKILL.

One story on the module's local Ray, each step asserting what the issue asks of it (the decision logic, file
settling, lineage and the lock are unit-tested in tests/unit/test_refresh.py):

1. week 1 of the embedded drift arrives (and a file still being written); `jobs/refresh.py` runs as its own
   driver and is SIGKILLed during training, again during the Serve update, and a third run ends the cycle: the
   candidate is promoted (better on the week, within the bound on the original test set), its window trained
   once, Serve answers with it, the registry's `champion` is it, and a client loop saw no failed request;
2. week 2 with an absurd learning rate and tracking off: rejected, the incumbent keeps serving, the lineage says
   why, and MLflow's store is not touched;
3. `rollback` serves the initial model again with zero failed requests, and `champion` follows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from conftest import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
APP = "refreshed"


class Probe:
    """A client asking the app for a completion every `every` seconds until stopped: every status it got."""

    def __init__(self, url: str, every: float = 0.25):
        self.url, self.every, self.stop, self.codes, self.fingerprints = url, every, threading.Event(), Counter(), []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = {"model": APP, "prompt": "Product: Nimbus soundbar\n", "max_tokens": 2}
        with requests.Session() as s:
            while not self.stop.is_set():
                try:
                    r = s.post(f"{self.url}/v1/completions", json=body, timeout=60)
                    self.codes[r.status_code] += 1
                    if r.status_code == 200:
                        self.fingerprints.append(r.json()["system_fingerprint"])
                except requests.RequestException as e:
                    self.codes[type(e).__name__] += 1
                time.sleep(self.every)

    def __enter__(self) -> Probe:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=90)


def served_fp(url: str) -> str:
    return requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]["system_fingerprint"]


def start_job(args: list[str], address: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": address}
    return subprocess.Popen([sys.executable, "jobs/refresh.py", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 600) -> str:
    """SIGKILL the job once `ready(output so far)` holds (checked twice a second, whether or not it prints);
    returns its output."""
    out: list[str] = []
    drain = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    drain.start()
    deadline = time.time() + timeout
    while not ready("".join(out)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    drain.join(timeout=10)
    return "".join(out)


def test_refresh_promotes_rejects_survives_kills_and_rolls_back(ray_local, embedded_base, tmp_path):
    from aigc.config import load_config
    from aigc.modeldir import files_fingerprint, read_metadata
    from aigc.refresh import read_lineage, run_refresh, run_rollback
    from aigc.refresh_config import INITIAL, SERVED, STATE, RefreshConfig
    from aigc.tracking import CHALLENGER, CHAMPION, open_tracker

    root, incoming, port = tmp_path / "root", tmp_path / "incoming", free_port()
    url = f"http://127.0.0.1:{port}"
    overrides = [
        f"refresh.storage_path={root}", f"refresh.incoming={incoming}", f"refresh.initial_model={embedded_base.path}",
        "refresh.settle_s=600", "refresh.min_gain=0.01", "refresh.max_regression=0.02", "refresh.eval_rows=30",
        "refresh.every=null", "refresh.max_cycles=null", "drift.weeks=2", "drift.rows_per_week=400",
        "finetune.data.source=embedded", "finetune.data.format=chat", "finetune.data.block_size=192",
        "finetune.data.embedded={n_train: 200, n_validation: 40, n_test: 60, seed: 0}",
        "finetune.optim.max_steps=30", "finetune.optim.warmup_steps=2", "finetune.optim.micro_batch_size=4",
        "finetune.eval.every_steps=10", "finetune.eval.task_examples=4", "finetune.eval.task_max_tokens=24",
        "finetune.eval.patience=null", "finetune.eval.keep_top_k=1", "finetune.run.samples=0",
        "finetune.scaling.num_workers=1", "finetune.scaling.max_failures=0",
        f"deploy.app_name={APP}", f"deploy.port={port}", "deploy.ready_timeout_s=240",
        "deploy.args={num_cpus: 0.1, health_check_period_s: 2, graceful_shutdown_timeout_s: 5}",
    ]
    address = ray_local.address_info["gcs_address"]
    incoming.mkdir()
    (incoming / "growing.jsonl").write_text('{"prompt": "still being written')  # modified now: not settled

    # 1. week 1: killed during training, killed during the Serve update, then the cycle ends
    first = start_job(["--config", "jobs/configs/refresh-tiny-cpu.yaml", *overrides], address)
    log = kill_when(first, lambda out: any(p.stat().st_size for p in root.glob("cand-*/metrics.jsonl")))
    assert "[aigc] refresh: window " in log, log[-3000:]
    assert json.loads((root / STATE).read_text())["phase"] == "window"
    with Probe(url) as probe:
        second = start_job(["--config", "jobs/configs/refresh-tiny-cpu.yaml", *overrides], address)
        log2 = kill_when(second, lambda out: "[aigc] refresh: promoting" in out)
        assert "promoting" in log2, log2[-3000:]
        assert json.loads((root / STATE).read_text())["phase"] == "promoting"
        third = subprocess.run([sys.executable, "jobs/refresh.py", "--config", "jobs/configs/refresh-tiny-cpu.yaml",
                                *overrides], cwd=ROOT, env={**os.environ, "RAY_ADDRESS": address},
                               capture_output=True, text=True, timeout=600)
        assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
        time.sleep(2)
    assert set(probe.codes) == {200}, probe.codes  # Serve answered every request through both updates
    served = json.loads((root / SERVED).read_text())
    cand = read_lineage(root)[served["model"]]
    assert served["model"] != INITIAL and cand["parent"] == INITIAL and cand["decision"]["promote"]
    assert [f["path"] for f in cand["window"]["files"]] == ["week-01/part-0.jsonl"]  # not growing.jsonl
    assert cand["decision"]["gain"] >= 0.01 and cand["decision"]["regression"] <= 0.02
    assert cand["metrics"]["candidate"]["new"]["test_loss"] < cand["metrics"]["incumbent"]["new"]["test_loss"]
    assert "greedy_valid_pct" in cand["metrics"]["candidate"]["old"]  # the task metrics of the embedded task
    steps = [r["step"] for r in map(json.loads, (root / served["model"] / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # resumed where the kill left it: trained once
    assert len(list(root.glob("cand-*"))) == 1 and not (root / STATE).exists()
    assert served_fp(url) == served["fingerprint"] == cand["fingerprint"] == probe.fingerprints[-1]
    cfg = load_config(RefreshConfig, ROOT / "jobs/configs/refresh-tiny-cpu.yaml", overrides)
    tracker = open_tracker(cfg.tracking, root)
    assert tracker.version_by_alias(CHAMPION).fingerprint == served_fp(url)
    assert tracker.version_by_alias(CHALLENGER).fingerprint == cand["fingerprint"]
    runs = tracker.client.search_runs([tracker.experiment_id], "tags.`aigc.kind` = 'refresh'")
    assert len(runs) == 1 and runs[0].data.tags["aigc.decision"] == "promoted" and "gain" in runs[0].data.metrics
    assert (root / "report" / "report.html").stat().st_size > 10_000

    # 2. week 2, an absurd learning rate, tracking off: rejected; the store untouched
    db = (root / "mlflow.db").stat()
    bad = load_config(RefreshConfig, ROOT / "jobs/configs/refresh-tiny-cpu.yaml",
                      [*overrides, "finetune.optim.lr=1.0", "finetune.optim.max_steps=10", "tracking.enabled=false"])
    (result,) = run_refresh(bad)
    assert result.outcome == "rejected" and result.served == served["model"]
    assert "rejected" in read_lineage(root)[result.model]["decision"]["reason"]
    assert served_fp(url) == served["fingerprint"]
    assert (root / "mlflow.db").stat().st_mtime_ns == db.st_mtime_ns and len(
        tracker.client.search_runs([tracker.experiment_id], "tags.`aigc.kind` = 'refresh'")) == 1

    # 3. rollback to the model served before, with zero failed requests
    with Probe(url) as probe:
        back = run_rollback(cfg)
        time.sleep(2)
    assert back["model"] == INITIAL and set(probe.codes) == {200}, probe.codes
    initial_fp = files_fingerprint(read_metadata(embedded_base.path))
    assert served_fp(url) == initial_fp == tracker.version_by_alias(CHAMPION).fingerprint
