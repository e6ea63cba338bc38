"""LoRA under Ray Train + DeepSpeed ZeRO-3 on the session's pre-trained base: the adapter really sharded
(persistence threshold 0), exported whole from the fp32 master weights after a training step, merged equal to
the adapter model, and resumed exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from aigc.config import FinetuneConfig, load_config
from aigc.finetune import read_metrics_log
from aigc.modeldir import ADAPTER_DIR, ADAPTER_WEIGHTS, fingerprint, load_model, verify_model_dir
from aigc.pretrain import finetune
from aigc.train import CKPT_TAG

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

# 2 workers, ZeRO-3 with every tensor sharded (the default threshold, 1e5 elements, would keep all of this
# tiny model whole on every rank and hide the size-0 adapter bug). A constant lr after warmup, so that a run
# stopped at step 10 and resumed to 20 follows the same schedule as one trained to 20 at once. Validation only
# at steps 10 and 20, and the exports are of checkpoints saved right after a training step.
LORA = [
    "run.samples=0", "run.evaluate=false", "data.format=text", "data.block_size=64",
    "data.embedded={n_train: 600, n_validation: 64, n_test: 64, seed: 0}",
    "model.peft.method=lora", "model.peft.r=4", "model.peft.alpha=8", "model.train_top_n_blocks=0",
    "zero.stage=3", "zero.param_persistence_threshold=0",
    "optim.schedule=constant", "optim.warmup_steps=2", "optim.lr=1e-2", "optim.micro_batch_size=4",
    "eval.every_steps=10", "eval.log_every=10", "eval.patience=null", "eval.keep_top_k=4",
]


def lora_cfg(embedded_base, tmp_path: Path, name: str, *overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, ROOT / "jobs/configs/tiny-cpu.yaml",
                       [*embedded_base.overrides, *LORA, f"run.storage_path={tmp_path}", f"run.name={name}", *overrides])


def test_lora_zero3_exports_the_trained_adapter_merged_and_resumes_exactly(embedded_base, ray_local, tmp_path):
    whole = finetune(lora_cfg(embedded_base, tmp_path, "whole", "optim.max_steps=20"))
    first = finetune(lora_cfg(embedded_base, tmp_path, "resumed", "optim.max_steps=10"))
    assert [r["step"] for r in read_metrics_log(first.run_dir)] == [10]
    resumed = finetune(lora_cfg(embedded_base, tmp_path, "resumed", "optim.max_steps=20", "export.merge=false"))

    log = read_metrics_log(whole.run_dir)
    assert [r["step"] for r in log] == [10, 20]
    assert 0 < log[-1]["trainable_params"] / log[-1]["total_params"] < 0.1

    # the export holds every adapter tensor whole, equal to the fp32 master weights of the last checkpoint
    meta = verify_model_dir(whole.final_dir)
    assert meta["adapter"]["base"] == {"name_or_path": embedded_base.path, "fingerprint": fingerprint(embedded_base.path)}
    adapter = load_file(Path(whole.final_dir) / ADAPTER_DIR / ADAPTER_WEIGHTS)
    master = {k.replace(".default.", "."): v for k, v in
              get_fp32_state_dict_from_zero_checkpoint(log[-1]["checkpoint"], tag=CKPT_TAG).items() if "lora_" in k}
    assert set(adapter) == set(master) and len(adapter) == 2 * 4 * 2  # blocks x (c_attn, c_fc, 2 c_proj) x (A, B)
    for k, v in adapter.items():
        assert v.numel() > 0 and torch.equal(v, master[k]), k
        assert "lora_B" not in k or v.abs().max() > 0, k  # B starts at zero: it trained

    # the merged model (plain transformers) answers as the adapter on its base does
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    base = load_model(embedded_base.path).model
    with torch.no_grad():
        on_base = PeftModel.from_pretrained(base, Path(whole.final_dir) / ADAPTER_DIR)(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(whole.final_dir)(input_ids=ids).logits
    assert (merged - on_base).abs().max() <= 1e-5

    # resumed at 10: same adapter and Adam state, so step 20 is the uninterrupted run's step 20
    resumed_log = read_metrics_log(resumed.run_dir)
    assert [r["step"] for r in resumed_log] == [10, 20]  # the second leg continued at 11
    assert resumed_log[-1]["train_loss"] == log[-1]["train_loss"]  # bit-identical on CPU
    assert resumed_log[-1]["val_loss"] == log[-1]["val_loss"]
    # its adapter-only export loads on the base and answers as the uninterrupted run's merged model
    assert not verify_model_dir(resumed.final_dir)["adapter"]["merged"]
    with torch.no_grad():
        got = load_model(resumed.final_dir).model(input_ids=ids).logits
    assert (got - merged).abs().max() <= 1e-4
