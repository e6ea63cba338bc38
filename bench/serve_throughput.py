"""Serving throughput and latency: Ray Serve (batched, KV cache) against a naive one-at-a-time baseline.

    PYTHONPATH=lib .venv/bin/python bench/serve_throughput.py                 # tiny model built here, ~3 min
    PYTHONPATH=lib .venv/bin/python bench/serve_throughput.py --model DIR --max-tokens 64 --replicas 2

In one run, on one machine, with the same model directory:
  baseline  one request at a time through `transformers` `model.generate` in this process
  direct    one request at a time through `aigc.generation.generate` in this process (no HTTP)
  serve     the Serve app (`aigc.serving`) over HTTP at concurrency 1, 8 and 32 (closed loop: each
            client sends its next request when the previous answer arrives)
Every request samples `--max-tokens` new tokens (temperature 1); tokens/s counts the completion tokens
actually returned. Printed: tokens/s, p50/p99 latency, Serve's tokens/s over the baseline's, and the p50
that Serve adds at concurrency 1 (serve p50 - direct p50). Targets: >= 4x at 32, < 5 ms added at 1.
"""

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time

PROMPTS = ["Introducing the", "Save big on", "Our new", "Limited time:", "Discover the", "Meet the all-new"]


def tiny_model_dir(out: str) -> str:
    """The embedded default: tokenizer trained on the generated corpus, tiny random GPT-2 (as in the tests)."""
    from aigc.config import TinyArch
    from aigc.corpus import generate
    from aigc.modeldir import save_model_dir
    from aigc.modeling import build_tiny_gpt2, train_tokenizer

    texts = [d["text"] for d in generate(300, seed=1)]
    tok = train_tokenizer(texts, vocab_size=300)
    arch = TinyArch(n_layer=2, n_embd=32, n_head=2, vocab_size=300)
    model = build_tiny_gpt2(arch, len(tok), 128, tok.eos_token_id)
    return str(save_model_dir(model, tok, os.path.join(out, "tiny"), config={"bench": True}, metrics={}, step=0))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summary(name: str, tokens: int, wall: float, lat: list[float]) -> dict:
    return {"name": name, "tok_s": tokens / wall, "p50": pct(lat, 0.5) * 1e3, "p99": pct(lat, 0.99) * 1e3,
            "n": len(lat)}


def run_baseline(model_dir: str, n: int, max_tokens: int) -> tuple[dict, dict]:
    import torch

    from aigc.generation import SamplingParams, generate
    from aigc.modeldir import load_model

    lm = load_model(model_dir)
    model, tok = lm.model, lm.tokenizer
    hf_lat, hf_tokens, ours_lat, ours_tokens = [], 0, [], 0
    for i in range(n + 2):  # the first two warm up
        ids = tok(PROMPTS[i % len(PROMPTS)], return_tensors="pt")
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=True, top_k=0, pad_token_id=tok.pad_token_id)
        if i >= 2:
            hf_lat.append(time.perf_counter() - t0)
            hf_tokens += out.shape[1] - ids["input_ids"].shape[1]
    t_hf = sum(hf_lat)
    for i in range(n + 2):
        params = SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=i)
        t0 = time.perf_counter()
        c = generate(model, tok, [PROMPTS[i % len(PROMPTS)]], params)[0]
        if i >= 2:
            ours_lat.append(time.perf_counter() - t0)
            ours_tokens += len(c.token_ids)
    return summary("baseline (HF generate, 1 at a time)", hf_tokens, t_hf, hf_lat), summary(
        "direct (aigc generate, 1 at a time)", ours_tokens, sum(ours_lat), ours_lat
    )


async def drive(url: str, model: str, concurrency: int, n: int, max_tokens: int) -> dict:
    import aiohttp

    lat: list[float] = []
    tokens = 0
    counter = iter(range(n))
    errors = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal tokens, errors
        for i in counter:
            body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": 1.0, "seed": i}
            t0 = time.perf_counter()
            async with session.post(f"{url}/v1/completions", json=body) as r:
                data = await r.json()
            if r.status != 200:
                errors += 1
                continue
            lat.append(time.perf_counter() - t0)
            tokens += data["usage"]["completion_tokens"]

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    if errors:
        print(f"  ! {errors} failed requests at concurrency {concurrency}")
    return summary(f"serve, concurrency {concurrency}", tokens, wall, lat)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: build the tiny one in a temp dir)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--baseline-requests", type=int, default=30)
    p.add_argument("--requests-per-client", type=int, default=8, help="at concurrency c: c * this requests")
    p.add_argument("--min-requests", type=int, default=30)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per replica")
    p.add_argument("overrides", nargs="*", help="extra ServeArgs a.b=value (e.g. batching.max_batch_size=16)")
    a = p.parse_args()

    import ray
    from ray import serve

    from aigc.serving import build_app

    tmp = tempfile.mkdtemp(prefix="aigc-bench-")
    model_dir = a.model or tiny_model_dir(tmp)
    print(f"model {model_dir}, {a.max_tokens} new tokens per request, {os.cpu_count()} CPU cores")
    base, direct = run_baseline(model_dir, a.baseline_requests, a.max_tokens)

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model_dir": model_dir, "model_name": "bench", "num_cpus": a.num_cpus,
            "autoscaling.min_replicas": a.replicas, "autoscaling.max_replicas": a.replicas}
    args.update(dict(o.split("=", 1) for o in a.overrides))
    serve.run(build_app({k: str(v) if k != "model_dir" else v for k, v in args.items()}), name="bench",
              route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        asyncio.run(drive(url, "bench", 4, 16, a.max_tokens))  # warm-up: connections, batch queue
        for c in a.concurrency:
            rows.append((c, asyncio.run(drive(url, "bench", c, max(a.min_requests, c * a.requests_per_client),
                                              a.max_tokens))))
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\n{'':38s} {'tokens/s':>10s} {'p50 ms':>9s} {'p99 ms':>9s} {'n':>5s} {'x baseline':>11s}")
    for r in [base, direct] + [r for _, r in rows]:
        ratio = r["tok_s"] / base["tok_s"]
        print(f"{r['name']:38s} {r['tok_s']:10.0f} {r['p50']:9.1f} {r['p99']:9.1f} {r['n']:5d} {ratio:10.2f}x")
    by_c = dict(rows)
    if 1 in by_c:
        added = by_c[1]["p50"] - direct["p50"]
        print(f"\np50 added by Serve at concurrency 1: {added:.1f} ms (serve {by_c[1]['p50']:.1f} - direct "
              f"{direct['p50']:.1f}); target < 5 ms: {'met' if added < 5 else 'NOT met'}")
    if 32 in by_c:
        ratio = by_c[32]["tok_s"] / base["tok_s"]
        print(f"tokens/s at concurrency 32 over the baseline: {ratio:.2f}x; target >= 4x: "
              f"{'met' if ratio >= 4 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
