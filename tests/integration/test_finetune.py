"""Fine-tuning on a real local Ray cluster (2 CPU workers, gloo) with real DeepSpeed ZeRO."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from aigc.config import FinetuneConfig, load_config
from aigc.finetune import read_metrics_log, run_finetune
from aigc.modeldir import METADATA, files_fingerprint, verify_model_dir
from conftest import TEXT_RANDOM

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

# Small enough for 2 cores: ~1,500 documents, 64-token blocks, a few dozen steps.
TINY = [
    "data.embedded.n_train=1500", "data.embedded.n_validation=200", "data.embedded.n_test=200", "data.block_size=64",
    "model.arch.n_embd=32", "model.arch.vocab_size=400", "optim.warmup_steps=2", "optim.lr=5e-3",
    "eval.log_every=10", "eval.keep_top_k=10", "eval.patience=null", "run.samples=1", *TEXT_RANDOM,
]


def mlflow_run(run_dir: str | Path) -> tuple:
    """(client, run id) of a run's MLflow run in the default store of its storage root."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{Path(run_dir).parent / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri), json.loads((Path(run_dir) / "mlflow_run.json").read_text())["run_id"]


def tiny_cfg(tmp_path: Path, name: str, *overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, ROOT / "jobs/configs/tiny-cpu.yaml",
                       [*TINY, f"run.name={name}", f"run.storage_path={tmp_path}", *overrides])


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_run_learns_and_exports(ray_local, tmp_path, stage):
    """Then stage 3's export is checked against DeepSpeed's zero_to_fp32, and stage 2 is re-run under its name."""
    cfg = tiny_cfg(tmp_path, f"zero{stage}", f"zero.stage={stage}", "optim.max_steps=30", "eval.every_steps=10")
    result = run_finetune(cfg)

    log = read_metrics_log(result.run_dir)
    assert [r["step"] for r in log] == [10, 20, 30]
    assert log[-1]["val_loss"] < log[0]["val_loss"]  # it learned
    ev = result.evaluation
    assert ev["finetuned"]["test_ppl"] < ev["base"]["test_ppl"] / 2
    assert ev["finetuned"]["entropy_ratio"] < ev["base"]["entropy_ratio"]

    for d in (result.best_dir, result.final_dir):
        meta = verify_model_dir(d)
        assert {p.name for p in Path(d).iterdir()} == {
            "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            METADATA}
        assert meta["config"]["zero"]["stage"] == stage and meta["step"] in (10, 20, 30)
    assert verify_model_dir(result.best_dir)["metrics"]["val_loss"] == min(r["val_loss"] for r in log)
    assert "evaluation" in verify_model_dir(result.best_dir)
    assert result.samples and result.samples[0]["completion"]
    # tracked in MLflow (the default SQLite store in the storage root): config, metrics by step, the before/after
    # tables and logs, and the best model as the registry's challenger, tagged with the fingerprint Serve reports
    client, run_id = mlflow_run(result.run_dir)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["zero.stage"] == str(stage)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_loss")] == \
        [(r["step"], r["val_loss"]) for r in log]
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "metrics.jsonl", "summary.json", "evaluation"}
    challenger = client.get_model_version_by_alias("aigc", "challenger")
    assert challenger.run_id == run_id and challenger.source == str(Path(result.best_dir).resolve())
    assert challenger.tags["aigc.fingerprint"] == files_fingerprint(verify_model_dir(result.best_dir))
    if stage == 3:
        check_export_equals_zero_to_fp32(cfg, result, log[-1])
    else:
        check_rerun_resumes_at_its_step(tmp_path, result, log)


def check_export_equals_zero_to_fp32(cfg, result, last):
    """The consolidated ZeRO-3 weights are bit-identical to DeepSpeed's own zero_to_fp32, are the trained
    ones (their validation loss is what the workers reported), and plain transformers generates with them."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aigc.evaluate import block_loss
    from aigc.finetune import prepare

    reference = get_fp32_state_dict_from_zero_checkpoint(last["checkpoint"], tag="ds")
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    exported = model.state_dict()  # includes lm_head.weight, tied to the embedding (stored once on disk)
    assert set(reference) == set(exported)
    for k, v in reference.items():
        assert torch.equal(exported[k], v), k  # bit-identical, not just close
    assert "lm_head.weight" not in load_file(Path(result.final_dir) / "model.safetensors")

    val = prepare(cfg, Path(result.run_dir)).packed.datasets["validation"]
    loss, _ = block_loss(model, val.iter_torch_batches(batch_size=8, dtypes=torch.long))
    assert loss == pytest.approx(last["val_loss"], rel=2e-3)
    tok = AutoTokenizer.from_pretrained(result.final_dir)
    out = model.generate(**tok("Save", return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert out.shape[1] > 1




def check_rerun_resumes_at_its_step(tmp_path, first, first_log):
    """Re-running the finished run under its name with more steps continues at its step, in the same MLflow run."""
    second = run_finetune(tiny_cfg(tmp_path, "zero2", "zero.stage=2", "optim.max_steps=40", "eval.every_steps=10",
                                   "run.evaluate=false", "run.samples=0"))
    log = read_metrics_log(second.run_dir)
    assert log[:3] == first_log and [r["step"] for r in log] == [10, 20, 30, 40]  # continued at 31, not from 1
    client, run_id = mlflow_run(second.run_dir)
    assert mlflow_run(first.run_dir)[1] == run_id and client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [10, 20, 30, 40]
    # the data position and token count carried over: tokens grow by the same amount every 10 steps
    tokens = [r["tokens_seen"] for r in log]
    assert tokens[3] - tokens[2] == pytest.approx(tokens[1] - tokens[0], rel=0.05)


def own_train_workers() -> list:
    """RayTrainWorker processes of *this* test's Ray node (children of its raylet), never anyone else's."""
    import psutil
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    return [p for p in psutil.Process(raylet).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline())]


# LoRA under ZeRO-2 with the optimizer state offloaded to host memory (DeepSpeedCPUAdam): the other LoRA runs are
# ZeRO-3 (tests/integration/test_lora_zero3.py), and no other test runs offload on a CPU machine
LORA_OFFLOAD = ["model.peft.method=lora", "model.peft.r=4", "model.peft.alpha=8", "model.train_top_n_blocks=0",
                "optim.lr=1e-2", "zero.stage=2", "zero.offload_optimizer=true"]


def kill_after_first_report(run_dir: Path, pick: Callable[[], Any], timeout: float = 300) -> tuple[threading.Thread,
                                                                                                 list[int]]:
    """A started thread that SIGKILLs the Train worker `pick()` names (None: not up yet) once the run in `run_dir`
    has reported (so a checkpoint exists), and the list it adds the killed pid to."""
    killed: list[int] = []

    def kill():
        deadline = time.time() + timeout
        while time.time() < deadline:
            if run_dir.exists() and read_metrics_log(run_dir) and (victim := pick()) is not None:
                os.kill(victim.pid, signal.SIGKILL)
                killed.append(victim.pid)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread, killed


def test_killed_lora_offload_worker_is_replaced_and_run_finishes(ray_local, tmp_path):
    """A SIGKILLed worker of a LoRA run under ZeRO-2 with optimizer offload: the group restarts from the last
    checkpoint, loads the prebuilt ops, and the adapter trains on. (A full model's worker lost and replaced is the
    ZeRO-3 run across two nodes in test_two_nodes_s3.py; ZeRO-2's full-model resume is the re-run above.)"""
    steps = 40
    cfg = tiny_cfg(tmp_path, "kill", f"optim.max_steps={steps}", "eval.every_steps=10", "scaling.max_failures=2",
                   "run.evaluate=false", "run.samples=0", "tracking.enabled=false", *LORA_OFFLOAD)
    # DeepSpeed's ops as `make setup` builds them (`aigc build-ops`); built here if not yet
    from aigc.train import build_ops

    ops = build_ops()
    assert set(ops) == {"cpu_adam", "deepspeed_shm_comm"}
    built = {name: os.stat(path).st_mtime_ns for name, path in ops.items()}
    killer, killed = kill_after_first_report(tmp_path / "kill", lambda: (own_train_workers() or [None])[-1])
    result = run_finetune(cfg)
    killer.join(timeout=5)
    assert killed, "no worker was killed"
    # both worker groups loaded the prebuilt ops: no run compiled them again
    assert {name: os.stat(path).st_mtime_ns for name, path in ops.items()} == built
    log = read_metrics_log(result.run_dir)
    assert log[-1]["step"] == steps and result.final_dir
    done = [r["step"] for r in log]
    assert done == sorted(done) and done[0] == 10  # restarted from the last checkpoint, never from 0
    meta = verify_model_dir(result.final_dir)
    assert meta["step"] == steps
    # the adapter survived the restart and trained on: every B moved off its zero init
    from safetensors.torch import load_file

    from aigc.modeldir import ADAPTER_DIR, ADAPTER_WEIGHTS
    adapter = load_file(Path(result.final_dir) / ADAPTER_DIR / ADAPTER_WEIGHTS)
    b = [t for k, t in adapter.items() if "lora_B" in k]
    assert b and all(t.numel() and t.abs().max() > 0 for t in b) and log[-1]["val_loss"] < log[0]["val_loss"]
    assert log[-1]["trainable_params"] < 0.2 * log[-1]["total_params"]
    # tracking.enabled=false: no MLflow store, artifacts or run record anywhere (nor MLflow's default ./mlruns)
    left = {p.name for p in tmp_path.rglob("*")} & {"mlflow.db", "mlartifacts", "mlruns", "mlflow_run.json"}
    assert not left and not (Path.cwd() / "mlruns").exists()


def test_ray_data_packing_counts_what_the_packer_makes(ray_local, tmp_path):
    """The distributed read+tokenise+pack (several blocks, parallel tasks) keeps every document once, scrubbed,
    in compact rows (at most 4 bytes a token), and counts what it made; a bad row beyond the driver's sample
    stops it, named."""
    import json

    import numpy as np

    from aigc.config import DataSection
    from aigc.data import DataError, load_splits, to_ray_blocks
    from aigc.modeling import train_tokenizer
    from aigc.pii import scrub_batch
    from aigc.splits import SAMPLE_ROWS

    docs = [f"note {i}: write to user{i}@example.com about order {i * 7}." for i in range(300)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataSection(source="files", train_files=[str(tmp_path / "d.jsonl")], split_ratios=(0.8, 0.1, 0.1),
                     block_size=32, scrub_pii=True)
    splits = load_splits(cfg)
    tok = train_tokenizer(docs, vocab_size=300)
    packed = to_ray_blocks(splits, tok, cfg, docs_per_batch=50)  # 300 documents: 6 map tasks
    assert packed.datasets["train"].num_blocks() > 1
    for name in ("train", "validation", "test"):
        rows = list(packed.datasets[name].iter_rows())
        assert packed.blocks[name] == len(rows) and packed.tokens[name] == sum(int(r["n_tokens"]) for r in rows)
        assert packed.bytes[name] / packed.tokens[name] <= 4 and rows[0]["ids"].dtype == np.uint16
        text = tok.decode([t for r in rows for t in r["ids"][:r["n_tokens"]].tolist()])
        got = [d for d in text.split(tok.eos_token) if d]
        want, _ = scrub_batch([r["text"] for r in splits[name].rows()])
        assert sorted(got) == sorted(want)  # every document once, scrubbed, whatever the blocks
    assert sum(packed.blocks.values()) and packed.pii == {"email": 300, "phone": 0, "card": 0, "national_id": 0}

    bad = [{"text": f"doc {i}"} for i in range(SAMPLE_ROWS + 50)]
    bad[SAMPLE_ROWS + 20] = {"text": 7}
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    cfg = DataSection(source="files", train_files=[str(tmp_path / "bad.jsonl")], block_size=32,
                     validation_files=[str(tmp_path / "d.jsonl")], test_files=[str(tmp_path / "d.jsonl")])
    with pytest.raises(DataError, match=rf"bad.jsonl: column 'text' holds int, not text, in .*line {SAMPLE_ROWS + 21}"):
        to_ray_blocks(load_splits(cfg), tok, cfg)
