"""Run in the vLLM serving environment (`make vllm-env`) by test_vllm_engine.py: the same requests through
aigc's engine and the vLLM engine on one model directory; prints one JSON object of what each gave."""

import asyncio
import json
import sys


async def main(model_dir: str) -> dict:
    from types import SimpleNamespace

    from aigc.generation import SamplingParams, encode
    from aigc.modeldir import load_model
    from aigc.serving.args import BatchingArgs
    from aigc.serving.engine import BatchingEngine
    from aigc.serving.vllm_engine import VllmEngine

    lm = load_model(model_dir)
    gauge = SimpleNamespace(set=lambda *a, **k: None, observe=lambda *a, **k: None)
    metrics = SimpleNamespace(queued=gauge, running=gauge, batch_size=gauge)
    seen: dict[str, list[float]] = {"queued": [], "running": [], "batch_size": []}  # what the vLLM engine recorded
    recorded = SimpleNamespace(**{k: SimpleNamespace(set=v.append, observe=v.append) for k, v in seen.items()})
    engines = {"aigc": BatchingEngine(lm.model, lm.tokenizer, BatchingArgs(), metrics),
               "vllm": VllmEngine.create(model_dir, lm.tokenizer.eos_token_id, recorded, dtype="float32",
                                         max_model_len=128, enforce_eager=True, max_num_seqs=8)}
    prompts = [encode(lm.tokenizer, p) for p in ["Introducing the", "Save big on", "Our new"]]

    async def run(engine, prompt, params, eager=True):
        deltas = [d async for d in engine.stream(prompt, params, eager)]
        last = deltas[-1]
        lps = [(t.token, t.logprob, list(t.top)) for d in deltas for t in (d.logprobs or [])]
        plps = [None if t is None else (t.token, t.logprob) for t in (deltas[0].prompt_logprobs or [])]
        return {"text": "".join(d.text for d in deltas), "ids": last.token_ids, "finish": last.finish_reason,
                "n": last.n_tokens, "deltas": len(deltas), "logprobs": lps, "prompt_logprobs": plps}

    out: dict = {}
    for name, engine in engines.items():
        greedy = SamplingParams(temperature=0, max_tokens=12, logprobs=2)
        r: dict = {"greedy": [await run(engine, p, greedy) for p in prompts],
                   "greedy_json": [await run(engine, p, greedy, eager=False) for p in prompts],
                   "score": await run(engine, prompts[0] + prompts[1], SamplingParams(max_tokens=0, prompt_logprobs=1))}
        out[name] = r
    # a stop string from the greedy text: the text ends before it
    stop = out["aigc"]["greedy"][1]["text"][3:6]
    seeded = SamplingParams(temperature=1.0, max_tokens=16, seed=7)
    v = engines["vllm"]
    out["vllm"]["stop"] = await run(v, prompts[1], SamplingParams(temperature=0, max_tokens=12, stop=[stop]))
    out["aigc"]["stop"] = await run(engines["aigc"], prompts[1], SamplingParams(temperature=0, max_tokens=12, stop=[stop]))
    out["stop_string"] = stop
    out["vllm"]["seeded"] = [await run(v, prompts[2], seeded) for _ in range(2)]
    # a stream closed after its first delta is aborted; the engine keeps answering
    stream = v.stream(prompts[0], SamplingParams(temperature=0, max_tokens=100))
    await stream.__anext__()
    await stream.aclose()
    out["vllm"]["after_abort"] = await run(v, prompts[0], SamplingParams(temperature=0, max_tokens=12))
    out["vllm"]["check"] = await v.check()
    # six at once: the gauges and batch sizes the replica exports, then nothing left counted
    for k in seen:
        seen[k].clear()
    v.gauges.EVERY_S = 0.0
    await asyncio.gather(*(run(v, p, SamplingParams(temperature=0, max_tokens=12)) for p in prompts * 2))
    out["vllm"]["metrics"] = {**seen, "counts": list(v.counts)}
    v.shutdown()
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(asyncio.run(main(sys.argv[1]))))
