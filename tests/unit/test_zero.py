"""The DeepSpeed config builder."""

from aigc.config import FinetuneConfig, load_config
from aigc.zero import deepspeed_config, resolve_precision


def cfg(*overrides):
    return load_config(FinetuneConfig, None, list(overrides))


def test_batch_arithmetic_and_stage():
    ds = deepspeed_config(cfg("optim.micro_batch_size=4", "optim.grad_accum=3", "zero.stage=3"), world_size=2, use_cuda=False)
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 3
    assert "offload_optimizer" not in ds["zero_optimization"]


def test_cpu_is_fp32_with_torch_adam_and_no_overlap():
    ds = deepspeed_config(cfg(), world_size=2, use_cuda=False)
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["zero_optimization"]["overlap_comm"] is False  # gloo on CPU


def test_offload_uses_deepspeed_cpu_adam():
    ds = deepspeed_config(cfg("zero.stage=3", "zero.offload_optimizer=true", "zero.offload_param=true"), 8, use_cuda=True,
                          bf16_supported=True)
    z = ds["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert "torch_adam" not in ds["optimizer"]["params"]  # DeepSpeedCPUAdam is required with offload
    assert ds["bf16"]["enabled"] and z["overlap_comm"] is True


def test_precision_resolution():
    assert resolve_precision("auto", use_cuda=False, bf16_supported=False) == "fp32"
    assert resolve_precision("auto", use_cuda=True, bf16_supported=True) == "bf16"
    assert resolve_precision("auto", use_cuda=True, bf16_supported=False) == "fp16"
    assert resolve_precision("fp32", use_cuda=True, bf16_supported=True) == "fp32"

