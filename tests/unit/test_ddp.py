"""The stage-0 engine (plain DDP, optionally DP-SGD) in one process: gradient accumulation means what DeepSpeed's
does, and a checkpoint resumes exactly (weights, Adam moments, lr schedule, step, accountant, noise)."""

from __future__ import annotations

import torch

from aigc.config import OptimSection, TinyArch
from aigc.ddp import build_engine, fp32_state_dict, is_ddp_checkpoint
from aigc.modeling import build_tiny_gpt2, set_dropout
from aigc.privacy import DPPlan

VOCAB = 300
OPTIM = dict(lr=1e-2, warmup_steps=2, max_steps=10, micro_batch_size=4)


def engine(grad_accum: int = 1, dp: DPPlan | None = None):
    model = build_tiny_gpt2(TinyArch(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB), VOCAB, 32, 0, seed=0)
    set_dropout(model, 0.0)
    return build_engine(model.train(), OptimSection(**OPTIM, grad_accum=grad_accum), torch.device("cpu"), "fp32", dp)


def batches(n: int, size: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randint(1, VOCAB, (size, 12), generator=g)
        out.append({"input_ids": x, "labels": x.clone()})
    return out


def train(e, data) -> None:
    for b in data:
        e.backward(e(**b).loss)
        e.step()


def weights(e) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in e.module.state_dict().items()}


def test_gradient_accumulation_averages_the_window_like_one_big_batch():
    whole, halves = engine(1), engine(2)
    data = batches(2, size=4)
    train(whole, data)
    train(halves, [{k: v[i:i + 2] for k, v in b.items()} for b in data for i in (0, 2)])
    assert whole.global_steps == halves.global_steps == 2 and halves.micro_steps == 4
    for k, v in weights(whole).items():
        torch.testing.assert_close(weights(halves)[k], v, rtol=1e-5, atol=1e-5)  # Adam: float sums in another order
    assert whole.scheduler.get_last_lr() == halves.scheduler.get_last_lr()


def check_exact_resume(tmp_path, dp: DPPlan | None) -> None:
    data = batches(6)
    first = engine(dp=dp)
    train(first, data[:3])
    first.save_checkpoint(str(tmp_path), tag="ds", client_state={"step": 3, "epoch": 0})
    saved = weights(first)
    train(first, data[3:])
    second = engine(dp=dp)
    _, client = second.load_checkpoint(str(tmp_path), tag="ds")
    assert client == {"step": 3, "epoch": 0} and second.global_steps == 3
    if dp:  # the accountant continues: epsilon after 3 + 3 steps, not 3
        assert second.accountant.history == [(dp.noise_multiplier, dp.sample_rate, 3)]
    train(second, data[3:])
    assert second.global_steps == first.global_steps == 6
    for k, v in weights(first).items():
        assert torch.equal(weights(second)[k], v), k  # bit-identical
    assert second.scheduler.get_last_lr() == first.scheduler.get_last_lr()
    assert is_ddp_checkpoint(str(tmp_path), "ds") and not is_ddp_checkpoint(str(tmp_path), "other")
    exported = fp32_state_dict(str(tmp_path), "ds")
    assert all(torch.equal(exported[k], v) for k, v in saved.items())


def test_checkpoint_resumes_exactly(tmp_path):
    check_exact_resume(tmp_path, None)


def test_dp_checkpoint_resumes_exactly_with_its_accountant_and_noise(tmp_path):
    dp = DPPlan(1.0, 0.5, 0.05, 1e-3, "rdp", None, 80, 4)
    check_exact_resume(tmp_path, dp)
    e = engine(dp=dp)
    e.load_checkpoint(str(tmp_path), tag="ds")
    fresh = engine(dp=dp)
    train(fresh, batches(3))
    assert e.epsilon() == fresh.epsilon() > 0
