"""The stage-0 engine (plain DDP, optionally DP-SGD) in one process: gradient accumulation means what DeepSpeed's
does, a checkpoint resumes exactly (weights, Adam moments, lr schedule, step, accountant, noise), and DP with LoRA
clips and noises only the adapter and exports through the driver's exporter."""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from aigc.config import FinetuneConfig, OptimSection, TinyArch, load_config
from aigc.ddp import build_engine, fp32_state_dict, is_ddp_checkpoint
from aigc.finetune import export_checkpoint
from aigc.lora import save_adapter_config, trainable_model
from aigc.modeldir import ADAPTER_DIR, load_model, verify_model_dir
from aigc.modeling import build_tiny_gpt2, set_dropout
from aigc.privacy import DPPlan
from aigc.train import CKPT_TAG, HF_SUBDIR

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


def test_dp_with_lora_clips_and_noises_only_the_adapter_and_exports_adapter_and_merged(tiny_model_dir, tmp_path):
    """privacy + model.peft.method=lora on the stage-0 engine: Opacus' optimizer holds the adapter's tensors only
    (per-example clipping and noise over them), the base is untouched, and the engine's checkpoint exports through
    the driver's exporter as an adapter plus the merged model that plain transformers loads."""
    cfg = load_config(FinetuneConfig, None, ["model.peft.method=lora", "model.peft.r=4", "zero.stage=0",
                                             "model.peft.modules_to_save=[ln_f]", "privacy.enabled=true",
                                             "privacy.noise_multiplier=1.0", "data.format=chat", "data.packing=false"])
    loaded = load_model(tiny_model_dir)
    set_dropout(loaded.model, 0.0)
    model, trainable, total = trainable_model(loaded.model.train(), cfg.model)
    dp = DPPlan(1.0, 0.5, 0.05, 1e-3, "rdp", None, 80, 4)
    e = build_engine(model, OptimSection(**OPTIM), torch.device("cpu"), "fp32", dp)
    names = {id(p): n for n, p in model.named_parameters()}
    clipped = [names[id(p)] for p in e.optimizer.params]  # what Opacus clips per example and noises
    assert sum(p.numel() for p in e.optimizer.params) == trainable < total / 5
    assert clipped and all("lora_" in n or ".modules_to_save." in n for n in clipped)
    before = weights(e)
    train(e, batches(3))
    assert e.global_steps == 3 and e.epsilon() > 0
    after = weights(e)
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved == {k for k in after if "lora_" in k or ".modules_to_save." in k}  # A, B and ln_f; base frozen
    assert all(getattr(p, "grad_sample", None) is None for n, p in model.named_parameters() if n not in clipped)

    ckpt = tmp_path / "ckpt"
    e.save_checkpoint(str(ckpt), tag=CKPT_TAG)
    model.config.save_pretrained(ckpt / HF_SUBDIR)
    loaded.tokenizer.save_pretrained(ckpt / HF_SUBDIR)
    save_adapter_config(model, ckpt / HF_SUBDIR)
    out = export_checkpoint(str(ckpt), str(tmp_path / "out"), cfg.model_dump(mode="json"), {"step": 3})
    meta = verify_model_dir(out)
    assert meta["adapter"] and (tmp_path / "out" / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    ids = torch.tensor([[1, 5, 9, 30, 2, 7]])
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        adapter = PeftModel.from_pretrained(base, str(tmp_path / "out" / ADAPTER_DIR))(input_ids=ids).logits
    torch.testing.assert_close(merged, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(adapter, want, rtol=1e-4, atol=1e-5)
