"""The DeepSpeed config builder: a pure function of the typed config (the lr schedule is `aigc.schedule`)."""

from __future__ import annotations

from typing import Any

from aigc.config import FinetuneConfig


def resolve_precision(precision: str, use_cuda: bool, bf16_supported: bool) -> str:
    """`auto` -> bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU (CPU bf16 is slow in DeepSpeed)."""
    if precision != "auto":
        return precision
    if not use_cuda:
        return "fp32"
    return "bf16" if bf16_supported else "fp16"


def deepspeed_config(cfg: FinetuneConfig, world_size: int, use_cuda: bool, bf16_supported: bool = False) -> dict:
    """The `deepspeed.initialize` config dict for this run.

    Batch arithmetic: train_batch_size = micro_batch_size * grad_accum * world_size blocks per optimizer
    step, e.g. 8 * 1 * 2 = 16 blocks * 128 tokens = 2,048 tokens/step for the tiny CPU default.
    """
    o, z = cfg.optim, cfg.zero
    precision = resolve_precision(o.precision, use_cuda, bf16_supported)
    zero: dict[str, Any] = {"stage": z.stage, "contiguous_gradients": True, "overlap_comm": z.overlap_comm and use_cuda}
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_cuda}
    if z.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_cuda}
    if z.stage == 3:
        # gather the full weights on rank 0 only when asked; exports consolidate from the checkpoint instead
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        if z.param_persistence_threshold is not None:
            # DeepSpeed keeps tensors under 1e5 elements whole on every rank: a tiny model is never really sharded
            zero["stage3_param_persistence_threshold"] = z.param_persistence_threshold
    # DeepSpeedCPUAdam is required with optimizer offload (it compiles once, ~35 s); otherwise torch's
    # AdamW runs on whatever device holds the partition, with no op to compile.
    adam = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
    if not z.offload_optimizer:
        adam["torch_adam"] = True
    return {
        "train_micro_batch_size_per_gpu": o.micro_batch_size,
        "gradient_accumulation_steps": o.grad_accum,
        "train_batch_size": o.micro_batch_size * o.grad_accum * world_size,
        "gradient_clipping": o.grad_clip,
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,  # aigc prints its own rank-0 progress
        "wall_clock_breakdown": False,
    }
