"""The learning-rate schedule: linear warmup, then constant, cosine or linear decay to `optim.min_lr_ratio`,
a pure function of the typed config (`lr_lambda`) and the LambdaLR DeepSpeed steps (`make_scheduler`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from aigc.config import OptimSection


def lr_lambda(o: OptimSection) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step `s`: linear warmup, then cosine/linear decay to min_lr_ratio."""

    def f(s: int) -> float:
        if s < o.warmup_steps:
            return (s + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (s - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * decay

    return f


def make_scheduler(o: OptimSection) -> Callable[[Any], Any]:
    """A callable `optimizer -> LambdaLR` for `deepspeed.initialize(lr_scheduler=...)`; DeepSpeed steps it
    once per optimizer step and saves its state in the checkpoint."""
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o))
