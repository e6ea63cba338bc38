"""zero.stage 0 (plain DDP, no DeepSpeed) and DP-SGD on a real local Ray cluster with 2 gloo workers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from aigc.config import FinetuneConfig, load_config
from aigc.finetune import read_metrics_log, run_finetune
from aigc.modeldir import verify_model_dir
from aigc.pretrain import finetune
from aigc.privacy import DPPlan, projected_epsilon
from conftest import TEXT_RANDOM

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_stage0_ddp_run_learns_and_exports(ray_local, tmp_path):
    cfg = load_config(FinetuneConfig, ROOT / "jobs/configs/tiny-cpu.yaml", [
        *TEXT_RANDOM, "zero.stage=0", "data.embedded={n_train: 1000, n_validation: 100, n_test: 100, seed: 0}",
        "data.block_size=64", "model.arch.n_embd=32", "model.arch.vocab_size=400", "optim.warmup_steps=2",
        "optim.lr=5e-3", "optim.max_steps=20", "optim.grad_accum=2", "eval.every_steps=10", "eval.patience=null",
        "run.evaluate=false", "run.samples=0", "run.name=ddp", f"run.storage_path={tmp_path}"])
    result = run_finetune(cfg)
    log = read_metrics_log(result.run_dir)
    assert [r["step"] for r in log] == [10, 20]
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 0.1 and log[0]["val_loss"] < math.log(400) - 0.5  # it learned
    assert "epsilon" not in log[-1]
    assert (Path(log[-1]["checkpoint"]) / "ds" / "ddp_state.pt").is_file()  # no DeepSpeed shards
    meta = verify_model_dir(result.final_dir)
    assert meta["config"]["zero"]["stage"] == 0 and meta["step"] == 20
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    tok = AutoTokenizer.from_pretrained(result.final_dir)
    assert model.generate(**tok("Save", return_tensors="pt"), max_new_tokens=4, do_sample=False).shape[1] > 1


def test_dp_run_reports_epsilon_and_resume_keeps_adding_it_up(embedded_base, ray_local, tmp_path, capsys):
    def dp_cfg(max_steps: int) -> FinetuneConfig:
        return load_config(FinetuneConfig, ROOT / "jobs/configs/tiny-cpu.yaml", [
            *embedded_base.overrides, "zero.stage=0", "privacy.enabled=true", "privacy.noise_multiplier=1.0",
            "privacy.accountant=rdp", "data.packing=false", "data.block_size=192", "data.truncation=drop",
            "data.embedded={n_train: 300, n_validation: 20, n_test: 20, seed: 0}", "model.train_top_n_blocks=1",
            "optim.micro_batch_size=4", "optim.warmup_steps=1", f"optim.max_steps={max_steps}",
            "eval.every_steps=5", "eval.max_batches=2", "eval.patience=null", "run.evaluate=false", "run.samples=0",
            "run.name=dp", f"run.storage_path={tmp_path}"])

    first = finetune(dp_cfg(10))
    eps = [r["epsilon"] for r in read_metrics_log(first.run_dir)]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]
    second = finetune(dp_cfg(20))  # same run name: resumes at step 10 with the accountant's history
    log = read_metrics_log(second.run_dir)
    assert [r["step"] for r in log] == [5, 10, 15, 20]
    meta = verify_model_dir(second.final_dir)
    dp = DPPlan(**meta["privacy"])
    assert dp.delta == 1e-3 and dp.noise_multiplier == 1.0 and log[-1]["delta"] == dp.delta
    # epsilon after 20 steps, as one accountant of 20 steps says: the resumed run did not start counting at 0
    assert log[-1]["epsilon"] == pytest.approx(projected_epsilon(dp, [], 20), rel=1e-9)
    assert log[-1]["epsilon"] > log[1]["epsilon"] == pytest.approx(projected_epsilon(dp, [], 10), rel=1e-9)
    assert meta["metrics"]["epsilon"] == log[-1]["epsilon"]
    assert f"({verify_model_dir(second.best_dir)['metrics']['epsilon']:.3f}, 0.001)-DP" in capsys.readouterr().out
