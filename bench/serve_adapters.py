"""Replica memory: 8 LoRA adapters served on one base against one merged model, measured in one run.

    PYTHONPATH=lib .venv/bin/python bench/serve_adapters.py                        # GPT-2-small-sized model, ~3 min
    PYTHONPATH=lib .venv/bin/python bench/serve_adapters.py --layers 4 --width 256 --adapters 8 --rank 8

A random GPT-2 (default 12 x 768, vocabulary 8000: ~92M parameters, 370 MB in fp32) is built here with a
tokenizer trained on the embedded corpus, and `--adapters` LoRA adapters on every linear layer (rank `--rank`,
random non-zero weights, as after training) are exported onto it, adapter-only, into an adapter folder; the
first is also exported merged. Two Serve apps run side by side on a private local Ray:

  adapters  the base with `adapter_folder` (Router + one model replica, `max_adapters_per_replica` = all of them)
  merged    the first adapter's merged export served alone (one replica, the plain app)

Each adapter (and the base) answers one greedy request, so every adapter is loaded on the replica, and the merged
app answers one; then each replica's resident set (RSS, psutil) is read. Target
(issue 11): the adapters' replica <= 1.2x the merged model's.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import time
from pathlib import Path

import psutil
import ray
import requests
import torch
from ray import serve
from task_quality import check

from aigc.config import FinetuneConfig, TinyArch, load_config
from aigc.corpus import sample_ads
from aigc.lora import trainable_model
from aigc.modeldir import save_adapter_dir, save_model_dir
from aigc.modeling import build_tiny_gpt2, train_tokenizer
from aigc.serving.app import build_app


def build(out: Path, layers: int, width: int, vocab: int, n: int, rank: int) -> tuple[str, str, str, int]:
    """(base dir, adapter folder, merged dir of adapter 0, the base's parameters)."""
    tok = train_tokenizer([d["text"] for d in sample_ads(2000, seed=1)], vocab_size=vocab)
    model = build_tiny_gpt2(TinyArch(n_layer=layers, n_embd=width, n_head=max(1, width // 64), vocab_size=vocab),
                            len(tok), 256, tok.eos_token_id)
    base = str(save_model_dir(model, tok, out / "base", config={"bench": "serve_adapters"}))
    params = sum(t.numel() for t in model.parameters())
    lora = load_config(FinetuneConfig, None, ["model.peft.method=lora", f"model.peft.r={rank}",
                                              f"model.peft.alpha={2 * rank}"]).model
    g = torch.Generator().manual_seed(0)
    peft, _, _ = trainable_model(model, lora)
    for i in reversed(range(n)):  # adapter 0 last: its merged export merges the model in place
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:  # B starts at zero: a trained adapter's is not
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        save_adapter_dir(peft, tok, out / "folder" / f"a{i}", base=base, merge=False, config={}, metrics={})
    save_adapter_dir(peft, tok, out / "merged", base=base, merge=True, config={}, metrics={})
    return base, str(out / "folder"), str(out / "merged"), params


def replica_rss_mb(app: str) -> float:
    """The resident set of the app's one model replica (a process of this run's Ray node: Ray titles it
    `ray::ServeReplica:<app>:Model`)."""
    raylet = psutil.Process(ray._private.worker._global_node.all_processes["raylet"][0].process.pid)
    [proc] = [c for c in raylet.children(recursive=True) if f"ServeReplica:{app}:Model" in " ".join(c.cmdline())]
    return proc.memory_info().rss / 2**20


def ask(url: str, model: str) -> None:
    r = requests.post(f"{url}/v1/completions", timeout=600,
                      json={"model": model, "prompt": "Introducing the", "max_tokens": 8, "temperature": 0})
    r.raise_for_status()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    a = p.parse_args()

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        base, folder, merged, params = build(Path(tmp), a.layers, a.width, a.vocab, a.adapters, a.rank)
        ray.init(address="local", include_dashboard=False)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        one = {"num_cpus": 0, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
        serve.run(build_app({**one, "model_dir": base, "model_name": "base", "adapter_folder": folder,
                             "max_adapters_per_replica": a.adapters}), name="adapters", route_prefix="/")
        serve.run(build_app({**one, "model_dir": merged, "model_name": "merged"}), name="merged",
                  route_prefix="/merged")
        ask(url, "base")
        base_only = replica_rss_mb("adapters")
        for i in range(a.adapters):
            ask(url, f"base:a{i}")
        ask(f"{url}/merged", "merged")
        rss = {"merged": replica_rss_mb("merged"), "adapters": replica_rss_mb("adapters")}
        serve.shutdown()
        ray.shutdown()

    print(f"\n== replica memory: {a.adapters} adapters (rank {a.rank}) on one base vs one merged model "
          f"({params / 1e6:.1f}M parameters; {time.time() - t0:.0f} s) ==")
    print(f"{'merged model, one replica':44} {rss['merged']:>9.0f} MB")
    print(f"{'base alone, in the adapter app':44} {base_only:>9.0f} MB")
    print(f"{f'base + {a.adapters} adapters loaded, one replica':44} {rss['adapters']:>9.0f} MB")
    ratio = rss["adapters"] / rss["merged"]
    check(f"RATIO {a.adapters} adapters / one merged model", ratio, "<= 1.2", ratio <= 1.2)


if __name__ == "__main__":
    main()
