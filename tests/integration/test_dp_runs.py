"""zero.stage 0 (plain DDP, no DeepSpeed) and DP-SGD on a real local Ray cluster with 2 gloo workers, on the embedded
task with canaries in its training rows (aigc.canary): the plain run learns, exports and memorises the canaries;
the DP run on the same data and seed does not, and its epsilon keeps adding up across a resume."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from aigc.canary import make_canaries, model_exposures, with_canaries
from aigc.config import FinetuneConfig, load_config
from aigc.finetune import read_metrics_log
from aigc.modeldir import verify_model_dir
from aigc.pretrain import finetune
from aigc.privacy import DPPlan, projected_epsilon

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

# 4 canaries x 10 copies among 100 task rows; a canary ranked first of 1,000 has exposure log2(1000) = 9.97 bits,
# one at a random rank ~1.4 (the base alone gives these canaries 1.2). Measured in two runs of this file (the same
# both times: same seeds): plain [4.68, 9.97, 8.38, 6.80], mean 7.46; DP at sigma 1.0, epsilon 2.09 at delta 1e-3,
# [0.34, 1.09, 2.94, 2.40], mean 1.69. In-process runs of the same recipe with other seeds: plain 6.5-10, DP 1.6-4.
CANARIES, REPEATS, CANDIDATES = make_canaries(4, seed=0), 10, 999
EXPOSURE_MARGIN = 4.0  # bits between the plain mean and the DP mean (measured 5.8)


def task_cfg(embedded_base, tmp_path: Path, name: str, max_steps: int, *extra: str) -> FinetuneConfig:
    """Full fine-tuning of the embedded base on 100 task rows + the canaries, 2 workers x 4 examples a step,
    lr 1e-2: 40 steps see ~320 of the 140 rows, each canary ~23 times (length bucketing batches the short canary
    rows together, so fewer steps than that leave the plain run's memorisation to chance)."""
    cfg = load_config(FinetuneConfig, ROOT / "jobs/configs/tiny-cpu.yaml", [
        *embedded_base.overrides, "zero.stage=0", "data.packing=false", "data.block_size=192", "data.truncation=drop",
        "data.embedded={n_train: 100, n_validation: 20, n_test: 20, seed: 0}", "optim.lr=1e-2",
        "optim.micro_batch_size=4", "optim.warmup_steps=1", f"optim.max_steps={max_steps}", "eval.max_batches=2",
        f"eval.every_steps={max_steps // 2}", f"eval.log_every={max_steps // 2}",
        "eval.patience=null", "run.evaluate=false", "run.samples=0", f"run.name={name}", f"run.storage_path={tmp_path}",
        *extra])
    return with_canaries(cfg, CANARIES, REPEATS, tmp_path / "data")


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.fixture(scope="module")
def plain(embedded_base, ray_local, tmp_path_factory):
    """The run without DP: its result, config and canary exposures (shared by both tests)."""
    cfg = task_cfg(embedded_base, tmp_path_factory.mktemp("plain"), "ddp", 40)
    result = finetune(cfg)
    return result, cfg, model_exposures(result.final_dir, CANARIES, cfg.data, CANDIDATES)


def test_stage0_ddp_run_learns_exports_and_memorises_its_canaries(plain, capsys):
    result, cfg, exposures = plain
    log = read_metrics_log(result.run_dir)
    assert [r["step"] for r in log] == [20, 40]
    assert log[-1]["train_loss"] < log[0]["train_loss"]  # it learned (steps 21-40 against 1-20)
    assert "epsilon" not in log[-1]
    assert (Path(log[-1]["checkpoint"]) / "ds" / "ddp_state.pt").is_file()  # no DeepSpeed shards
    meta = verify_model_dir(result.final_dir)
    assert meta["config"]["zero"]["stage"] == 0 and meta["step"] == 40
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    tok = AutoTokenizer.from_pretrained(result.final_dir)
    assert model.generate(**tok("Save", return_tensors="pt"), max_new_tokens=4, do_sample=False).shape[1] > 1
    with capsys.disabled():
        print(f"\n[canary] exposure without DP: {[round(x, 2) for x in exposures]}, mean {mean(exposures):.2f} bits")
    assert mean(exposures) > 6.0  # memorised: far above the ~1.4 bits of a secret never seen


def test_dp_run_reports_epsilon_resumes_and_does_not_memorise_the_canaries(plain, embedded_base, tmp_path, capsys):
    def dp_cfg(max_steps: int) -> FinetuneConfig:
        return task_cfg(embedded_base, tmp_path, "dp", max_steps, "privacy.enabled=true",
                        "privacy.noise_multiplier=1.0", "privacy.accountant=rdp", "eval.every_steps=10")

    first = finetune(dp_cfg(20))
    eps = [r["epsilon"] for r in read_metrics_log(first.run_dir)]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]
    second = finetune(dp_cfg(40))  # same run name: resumes at step 20 with the accountant's history
    log = read_metrics_log(second.run_dir)
    assert [r["step"] for r in log] == [10, 20, 30, 40]
    meta = verify_model_dir(second.final_dir)
    dp = DPPlan(**meta["privacy"])
    assert dp.n_examples == 140 and dp.delta == 1e-3 and dp.noise_multiplier == 1.0 and log[-1]["delta"] == dp.delta
    # epsilon after 40 steps, as one accountant of 40 steps says: the resumed run did not start counting at 0
    assert log[-1]["epsilon"] == pytest.approx(projected_epsilon(dp, [], 40), rel=1e-9)
    assert log[-1]["epsilon"] > log[1]["epsilon"] == pytest.approx(projected_epsilon(dp, [], 20), rel=1e-9)
    assert meta["metrics"]["epsilon"] == log[-1]["epsilon"]
    assert f"({verify_model_dir(second.best_dir)['metrics']['epsilon']:.3f}, 0.001)-DP" in capsys.readouterr().out

    _, cfg, plain_exposures = plain
    exposures = model_exposures(second.final_dir, CANARIES, cfg.data, CANDIDATES)
    with capsys.disabled():
        print(f"\n[canary] exposure with DP (epsilon {log[-1]['epsilon']:.2f}, delta {dp.delta:g}): "
              f"{[round(x, 2) for x in exposures]}, mean {mean(exposures):.2f} bits; without DP "
              f"{mean(plain_exposures):.2f}")
    assert mean(exposures) < mean(plain_exposures) - EXPOSURE_MARGIN
