"""A fine-tune whose storage is an S3 bucket (moto's real S3 protocol server on a loopback port): checkpoints,
model directories and the run's own files live there, a fresh driver resumes from it, and a Serve replica's
loader downloads the model, verified, refusing a tampered object."""

from __future__ import annotations

import json
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
    meta = verify_model_dir(path)  # (an earlier run's copy of the same files may serve: its provenance may differ)
    assert path.endswith(files_fingerprint(meta)) and meta["files"] == verify_model_dir(second.best_dir)["files"]
    # same size, other bytes: the marker's sizes agree, the sha256 in aigc.json does not
    tampered = f"{loc}/tampered"
    storage.publish_dir(second.best_dir, tampered)
    data = bytearray(storage.read_bytes(f"{tampered}/model.safetensors"))
    data[-1] ^= 0xFF
    storage.write_bytes(f"{tampered}/model.safetensors", bytes(data))
    with pytest.raises(ModelDirError, match="model.safetensors: sha256 mismatch"):
        storage.fetch_dir(tampered, tmp_path / "cache" / "fp", verify=verify_model_dir)
    assert not (tmp_path / "cache" / "fp").exists()
