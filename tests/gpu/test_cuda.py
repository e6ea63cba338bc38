"""What only a CUDA GPU can show: the worker's DeepSpeed engine in bf16 on the GPU (ZeRO 2, 3, 3 + CPU
offload), its checkpoint exported by the same `export_checkpoint` the driver uses, and the one generation
path on the GPU. Skipped without CUDA (see conftest.py); CI has no GPU.

No Ray here: the code under test is `aigc.train.build_worker_model` (what every Train worker calls), the
DeepSpeed config builder, the exporter and `aigc.generation`, on a one-process NCCL group. Ray Train's
placement of workers on GPUs is the autoscaling test's business (tests/integration/test_autoscaling.py).

    DS_ACCELERATOR=cuda python -m pytest tests/gpu -v -s
"""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

STEPS, MICRO, BLOCK = 60, 16, 128


@pytest.fixture(scope="module")
def corpus_model(tmp_path_factory):
    """A GPT-2-small-wide model (8 x 768) built from a config, a local tokenizer, packed train/val blocks."""
    import torch

    from aigc.config import TinyArch
    from aigc.corpus import sample_ads
    from aigc.data import pack_ids
    from aigc.modeldir import save_model_dir
    from aigc.modeling import build_tiny_gpt2, train_tokenizer

    docs = [d["text"] for d in sample_ads(6000, seed=3)]
    tok = train_tokenizer(docs[:5000], vocab_size=2048)
    model = build_tiny_gpt2(TinyArch(n_layer=8, n_embd=768, n_head=12, vocab_size=2048), len(tok), BLOCK,
                            tok.eos_token_id)
    base = save_model_dir(model, tok, tmp_path_factory.mktemp("base") / "model", config={"gpu_check": True})

    def blocks(texts):
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        return torch.from_numpy(pack_ids(ids, tok.eos_token_id, BLOCK, "int64")["ids"])

    return {"base": str(base), "train": blocks(docs[:5000]), "val": blocks(docs[5000:])[:64]}


@pytest.fixture(scope="module")
def process_group():
    """One NCCL group of one process for the module, as each Ray Train worker process has one (DeepSpeed
    caches a clone of the world group, so the group must not be torn down between engines)."""
    import deepspeed
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="nccl")
    yield
    dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _no_leaked_process_group():
    """Overrides conftest's per-test teardown: the module's group lives until the module ends."""
    yield


def _val_loss(forward, val):
    import torch

    with torch.no_grad():
        losses = [float(forward(val[i:i + MICRO].cuda())) for i in range(0, len(val), MICRO)]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("zero", ["2", "3", "3-offload"])
def test_engine_trains_in_bf16_and_exports_what_it_trained(zero, corpus_model, process_group, tmp_path):
    import torch

    from aigc.config import FinetuneConfig, load_config
    from aigc.finetune import export_checkpoint
    from aigc.modeldir import load_model, verify_model_dir
    from aigc.train import CKPT_TAG, HF_SUBDIR, build_worker_model

    stage, offload = int(zero[0]), zero.endswith("offload")
    cfg = load_config(FinetuneConfig, None, [
        f"zero.stage={stage}", f"zero.offload_optimizer={str(offload).lower()}",
        f"zero.offload_param={str(offload).lower()}", "scaling.use_gpu=true", "scaling.num_workers=1",
        f"optim.micro_batch_size={MICRO}", f"optim.max_steps={STEPS}", "optim.warmup_steps=5", "optim.lr=1e-3",
        f"eval.every_steps={STEPS}",
        f"run.torch_extensions_dir={Path.home() / '.cache' / 'aigc' / 'torch_extensions'}",
    ])
    built = build_worker_model(cfg, corpus_model["base"], world_size=1)
    engine = built.engine
    assert built.precision == "bf16" and torch.cuda.is_bf16_supported()
    assert engine.device.type == "cuda"
    if not offload:
        assert next(p for p in engine.module.parameters()).device.type == "cuda"

    def forward(ids):
        return engine(input_ids=ids, labels=ids).loss

    engine.eval()
    before = _val_loss(forward, corpus_model["val"])
    engine.train()
    train = corpus_model["train"]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step in range(STEPS):
        i = (step * MICRO) % (len(train) - MICRO)
        loss = forward(train[i:i + MICRO].cuda())
        engine.backward(loss)
        engine.step()
    torch.cuda.synchronize()
    tps = STEPS * MICRO * BLOCK / (time.perf_counter() - t0)
    engine.eval()
    after = _val_loss(forward, corpus_model["val"])
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"\n[gpu] ZeRO-{zero}: val loss {before:.3f} -> {after:.3f} in {STEPS} steps | {tps / 1e3:.1f}k tok/s | "
          f"peak {peak:.2f} GiB | {built.trainable / 1e6:.1f}M params")
    assert engine.global_steps == STEPS
    assert after < before - 1.0, (before, after)

    # the worker's checkpoint layout, consolidated by the driver's exporter, loads and scores the same
    ckpt = tmp_path / "ckpt"
    engine.save_checkpoint(str(ckpt), tag=CKPT_TAG)
    engine.module.config.save_pretrained(ckpt / HF_SUBDIR)
    built.tokenizer.save_pretrained(ckpt / HF_SUBDIR)
    out = export_checkpoint(str(ckpt), str(tmp_path / "model"), {"zero": zero}, {"val_loss": after, "step": STEPS})
    verify_model_dir(out)
    exported = load_model(out, device="cuda", dtype=torch.bfloat16).model
    exported_loss = _val_loss(lambda ids: exported(input_ids=ids, labels=ids).loss, corpus_model["val"])
    assert exported_loss == pytest.approx(after, rel=2e-2), (exported_loss, after)
    if zero == "2":
        _keep["trained"] = out


_keep: dict[str, str] = {}  # the ZeRO-2 run's exported model, for the generation test


def test_generation_on_the_gpu_matches_the_cpu_and_batches(corpus_model):
    """The trained model greedy-decodes the same tokens on the GPU (fp32, padded batch of mixed prompts) as
    on the CPU one prompt at a time; then bf16 throughput at batch 1 and 32 (printed, not asserted)."""
    import torch

    from aigc.generation import SamplingParams, generate
    from aigc.modeldir import load_model

    if "trained" not in _keep:
        pytest.skip("needs the ZeRO-2 run above")
    prompts = ["Introducing the", "Save big on", "Limited time: our", "Discover the new premium wireless"]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    cpu = load_model(_keep["trained"], device="cpu", dtype=torch.float32)
    gpu = load_model(_keep["trained"], device="cuda", dtype=torch.float32)
    alone = [generate(cpu.model, cpu.tokenizer, [p], greedy)[0].token_ids for p in prompts]
    batched = [c.token_ids for c in generate(gpu.model, gpu.tokenizer, prompts, greedy)]
    same = sum(a == b for a, b in zip(alone, batched, strict=True))
    assert same >= len(prompts) - 1, (alone, batched)  # fp32 GPU vs CPU: at most one near-tie may flip

    seeded = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=16, seed=7)
    assert generate(gpu.model, gpu.tokenizer, ["Save big on"], seeded)[0].token_ids == \
        generate(gpu.model, gpu.tokenizer, ["Save big on"], seeded)[0].token_ids

    bf16 = load_model(_keep["trained"], device="cuda", dtype=torch.bfloat16)
    params = SamplingParams(temperature=0.8, max_tokens=64, seed=1)
    rates = {}
    for batch in (1, 32):
        rows = [prompts[i % len(prompts)] for i in range(batch)]
        generate(bf16.model, bf16.tokenizer, rows, params)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = generate(bf16.model, bf16.tokenizer, rows, params)
        torch.cuda.synchronize()
        rates[batch] = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)
        assert all(o.token_ids for o in outs)
    print(f"\n[gpu] generation bf16: batch 1 {rates[1]:.0f} tok/s, batch 32 {rates[32]:.0f} tok/s "
          f"({rates[32] / rates[1]:.1f}x)")
    assert math.isfinite(rates[32])
