"""A fine-tune whose storage is an S3 bucket (moto's real S3 protocol server on a loopback port): checkpoints,
model directories and the run's own files live there, a fresh driver resumes from it, and a Serve replica's
loader downloads the model, verified, refusing a tampered object."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import ray
from test_finetune import tiny_cfg

from aigc import storage
from aigc.config import ConfigError
from aigc.finetune import read_metrics_log, run_finetune
from aigc.modeldir import METADATA, ModelDirError, files_fingerprint, verify_model_dir
from aigc.serving.app import build_app, local_model_dir

pytestmark = pytest.mark.integration
QUIET = ["eval.every_steps=2", "run.evaluate=false", "run.samples=0", "tracking.enabled=false"]


@pytest.fixture(scope="module")
def s3_run(s3_server, ray_local, tmp_path_factory):
    """A 4-step run to s3://aigc/runs/s3run, then the same name to 6 steps from a driver with no local copy."""
    root = f"{s3_server.root}/runs"
    tmp = tmp_path_factory.mktemp("s3")
    first = run_finetune(tiny_cfg(tmp, "s3run", f"run.storage_path={root}", "optim.max_steps=4", *QUIET))
    shutil.rmtree(first.run_dir)  # a new driver machine: only the bucket remembers the run
    second = run_finetune(tiny_cfg(tmp, "s3run", f"run.storage_path={root}", "optim.max_steps=6", *QUIET))
    return first, second, f"{root}/s3run"


def test_the_run_lives_in_the_bucket_and_a_fresh_driver_resumes_from_it(s3_run):
    first, second, loc = s3_run
    assert first.location == second.location == loc and second.run_dir == first.run_dir  # the driver's staging copy
    names = storage.listdir(loc)
    assert {"config.yaml", "metrics.jsonl", "summary.json", "base", "best", "final"} <= set(names)
    assert any(n.startswith("checkpoint_") for n in names)  # Ray Train wrote its checkpoints to the bucket
    log = json.loads(storage.read_text(f"{loc}/summary.json"))
    assert log["location"] == loc
    # continued to 6 from the bucket's checkpoint and metrics log, not from the start
    assert [r["step"] for r in read_metrics_log(second.run_dir)] == [2, 4, 6]
    assert [json.loads(line)["step"] for line in storage.read_text(f"{loc}/metrics.jsonl").splitlines()] == [2, 4, 6]
    for d in ("best", "final"):
        assert set(storage.published_files(f"{loc}/{d}")) >= {"model.safetensors", METADATA}
    assert verify_model_dir(second.final_dir)["step"] == 6


def test_a_replica_loads_the_model_from_the_bucket_and_refuses_a_tampered_object(s3_run, tmp_path):
    _, second, loc = s3_run
    best = f"{loc}/best"
    assert build_app({"model_dir": best}) is not None  # the driver-side check: reachable and published
    with pytest.raises(ConfigError, match="not a published directory"):
        build_app({"model_dir": f"{loc}/nothing-here"})
    # the replica's loader, in a Ray worker (the environment Serve replicas get): a verified copy keyed by fingerprint
    path = ray.get(ray.remote(local_model_dir).remote(best))
    meta = verify_model_dir(path)
    assert os.path.basename(path).startswith(files_fingerprint(meta)) and meta == verify_model_dir(second.best_dir)
    # same size, other bytes: the marker's sizes agree, the sha256 in aigc.json does not
    tampered = f"{loc}/tampered"
    storage.publish_dir(second.best_dir, tampered)
    data = bytearray(storage.read_bytes(f"{tampered}/model.safetensors"))
    data[-1] ^= 0xFF
    storage.write_bytes(f"{tampered}/model.safetensors", bytes(data))
    with pytest.raises(ModelDirError, match="model.safetensors: sha256 mismatch"):
        storage.fetch_dir(tampered, tmp_path / "cache" / "fp", verify=verify_model_dir)
    assert not (tmp_path / "cache" / "fp").exists()


def test_a_lora_fine_tune_starts_from_a_model_in_the_bucket(s3_run, tmp_path):
    """`model.name_or_path` a bucket's model directory (what `run.base_cache` on an object store resolves to):
    the driver reads its tokenizer and LoRA targets through its verified copy, the workers load it from the
    bucket, and the adapter records the URI as its base with that base's fingerprint."""
    from aigc.modeldir import fingerprint

    _, _, loc = s3_run
    base = f"{loc}/best"
    out = run_finetune(tiny_cfg(tmp_path, "from-bucket", f"model.name_or_path={base}", "model.peft.method=lora",
                                "model.peft.r=2", "optim.lr=1e-2", "optim.max_steps=2", "optim.warmup_steps=1",
                                *QUIET))
    meta = verify_model_dir(out.best_dir)
    assert meta["adapter"]["base"] == {"name_or_path": base, "fingerprint": fingerprint(base)}
    assert meta["step"] == 2 and read_metrics_log(out.run_dir)[-1]["trainable_params"] > 0


def test_a_search_on_the_bucket_keeps_trials_winner_and_report_there_and_resumes_from_it(s3_server, ray_local):
    """Tune's folder, each trial's run, the winner and the report in the bucket; the driver works in a staging
    copy that a rerun rebuilds from the bucket, and the rerun resumes the finished search without training."""
    from pathlib import Path

    from aigc.config import load_config
    from aigc.modeldir import local_dir
    from aigc.search import run_search
    from aigc.search_config import SearchConfig, search_dir_of

    root = f"{s3_server.root}/searches"
    cfg = load_config(SearchConfig, Path(__file__).resolve().parents[2] / "tune/configs/tiny-cpu.yaml", [
        f"search.storage_path={root}", "search.name=s3search", "search.algorithm=grid", "search.num_samples=1",
        "search.asha.enabled=false", "tracking.enabled=false",
        "space.lr={kind: choice, values: [3.0e-3, 1.0e-4], low: null, high: null}",
        "space.weight_decay={kind: choice, values: [0.01]}",
        "space.dropout={kind: choice, values: [0.0], low: null, high: null}",
        "base.data.format=text", "base.model.name_or_path=null", "base.data.block_size=64",
        "base.data.embedded={n_train: 600, n_validation: 100, n_test: 50, seed: 0}", "base.model.arch.n_embd=32",
        "base.model.arch.vocab_size=400", "base.optim.max_steps=10", "base.optim.warmup_steps=2",
        "base.eval.every_steps=5", "base.run.evaluate=false"])
    first = run_search(cfg)
    loc = f"{root}/s3search"
    assert {"search.yaml", "tune", "trials", "base", "winner", "report.html", "trials.csv"} <= set(storage.listdir(loc))
    runs = storage.listdir(f"{loc}/trials")
    assert len(runs) == 2 and len(first.trials) == 2 and not first.errors
    for run in runs:  # each trial an object-store run: its checkpoints, metrics log and end in the bucket
        names = set(storage.listdir(f"{loc}/trials/{run}"))
        assert {"metrics.jsonl", "trial.json", "best"} <= names and any(n.startswith("checkpoint_") for n in names)
    assert first.winner_dir == f"{loc}/winner" and first.best_params["lr"] == 3.0e-3
    report = storage.read_text(f"{loc}/report.html")  # names the bucket, not the driver's staging copy
    assert f"{loc}/winner" in report and str(search_dir_of(cfg)) not in report
    meta = verify_model_dir(local_dir(first.winner_dir))  # a verified copy, as a Serve replica loads it
    assert meta["trial"] == first.best_trial and meta["step"] == 10

    staging = search_dir_of(cfg)
    again = run_search(cfg)  # a driver with a stale staging copy: rebuilt from the bucket, nothing trains again
    assert again.resumed and again.best_trial == first.best_trial and again.winner_dir == first.winner_dir
    for run in runs:
        assert len((staging / "trials" / run / "attempts.jsonl").read_text().splitlines()) == 1
