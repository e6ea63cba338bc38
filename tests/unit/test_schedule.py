"""The lr schedule: its multiplier per step, and the LambdaLR that DeepSpeed steps."""

import math

import torch

from aigc.config import FinetuneConfig, load_config
from aigc.schedule import lr_lambda, make_scheduler


def cfg(*overrides):
    return load_config(FinetuneConfig, None, list(overrides))


def test_schedule_warmup_then_cosine_to_floor():
    o = cfg("optim.warmup_steps=10", "optim.max_steps=110", "optim.min_lr_ratio=0.1").optim
    f = lr_lambda(o)
    assert math.isclose(f(0), 0.1) and math.isclose(f(9), 1.0)
    assert math.isclose(f(10), 1.0) and math.isclose(f(60), 0.55) and math.isclose(f(110), 0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))
    lin = lr_lambda(cfg("optim.schedule=linear", "optim.warmup_steps=0", "optim.max_steps=100").optim)
    assert math.isclose(lin(50), 0.1 + 0.9 * 0.5)


def test_scheduler_sets_the_optimizer_lr_to_base_lr_times_the_multiplier():
    o = cfg("optim.lr=0.01", "optim.warmup_steps=4", "optim.max_steps=20", "eval.every_steps=10").optim
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=o.lr)
    sched, f = make_scheduler(o)(opt), lr_lambda(o)
    for step in range(20):
        assert math.isclose(opt.param_groups[0]["lr"], o.lr * f(step)), step
        opt.step()
        sched.step()
