"""Steady-state training throughput: Ray Train + DeepSpeed ZeRO-2 (2 workers) against a plain single-process
PyTorch loop on the same model, data and machine, measured in one run and printed as a ratio.

    .venv/bin/python bench/train_throughput.py                     # ~3 minutes on 2 CPU cores
    .venv/bin/python bench/train_throughput.py --steps 120 --n-embd 256 --n-layer 4

Both sides train the same GPT-2 (same initial weights, tokenizer and packed blocks) with the same global batch
(2 workers x 8 blocks = 16 blocks in the baseline) and AdamW. Steady state: the baseline skips its first
`--warmup` steps; the Ray side divides the tokens between its first and last validation by the training time
in between (data + compute, validation and checkpoint time excluded; aigc.train records it as train_seconds).
Target: ratio >= 0.8.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from aigc.config import FinetuneConfig, TinyArch, load_config
from aigc.data import load_splits, pack_ids
from aigc.finetune import read_metrics_log, run_finetune
from aigc.modeldir import save_model_dir
from aigc.modeling import build_tiny_gpt2, param_groups, train_tokenizer


def baseline_tokens_per_s(model_dir: str, blocks: torch.Tensor, steps: int, warmup: int, batch: int, lr: float) -> float:
    from aigc.modeldir import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(model_dir).model.train()
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=lr)
    t_start, tokens = None, 0
    for step in range(steps):
        if step == warmup:
            t_start, tokens = time.perf_counter(), 0
        i = (step * batch) % (len(blocks) - batch)
        ids = blocks[i:i + batch]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += ids.numel()
    return tokens / (time.perf_counter() - t_start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--block-size", type=int, default=128)
    a = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="aigc-bench-"))
    overrides = [
        f"run.storage_path={work}", "run.name=bench", "run.evaluate=false", "run.samples=0",
        f"data.block_size={a.block_size}", f"optim.max_steps={a.steps}", f"optim.warmup_steps={a.warmup}",
        f"eval.every_steps={a.warmup}", "eval.max_batches=1", "eval.patience=null", "zero.stage=2",
        "scaling.num_workers=2", "optim.micro_batch_size=8",
    ]
    cfg = load_config(FinetuneConfig, None, overrides)
    splits = load_splits(cfg.data)
    texts = [r["text"] for r in splits.train.rows()]
    tok = train_tokenizer(iter(texts), 512)
    arch = TinyArch(n_layer=a.n_layer, n_embd=a.n_embd, n_head=4, vocab_size=512)
    model = build_tiny_gpt2(arch, len(tok), a.block_size, tok.eos_token_id)
    base = save_model_dir(model, tok, work / "base-model", config={"bench": True})
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    blocks = torch.from_numpy(pack_ids(ids, tok.eos_token_id, a.block_size, np.int64)["ids"][:-1])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {a.n_layer} layers x {a.n_embd} wide = {n_params / 1e6:.1f}M params; {len(blocks)} blocks of "
          f"{a.block_size} tokens; global batch 16 blocks; {a.steps} steps")

    base_tps = baseline_tokens_per_s(str(base), blocks, a.steps, a.warmup, 16, cfg.optim.lr)
    print(f"baseline (1 process, {os.cpu_count()} threads): {base_tps:,.0f} tokens/s")

    cfg = load_config(FinetuneConfig, None, [*overrides, f"model.name_or_path={base}"])
    result = run_finetune(cfg)
    log = read_metrics_log(result.run_dir)
    first, last = log[0], log[-1]
    ray_tps = (last["tokens_seen"] - first["tokens_seen"]) / (last["train_seconds"] - first["train_seconds"])
    print(f"Ray Train + DeepSpeed ZeRO-2 (2 workers x 1 CPU): {ray_tps:,.0f} tokens/s "
          f"(steps {first['step']}..{last['step']})")
    print(f"RATIO ray/baseline = {ray_tps / base_tps:.2f}  (target >= 0.8)")


if __name__ == "__main__":
    main()
