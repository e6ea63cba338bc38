"""The engine behind the HTTP edge: token ids and SamplingParams in, `Delta`s out.

`CompletionEngine` is all the replica asks of an engine; `BatchingEngine` is aigc's own, continuous
batching over the shared generation path (`aigc.generation.BatchStream`). Validation, keys, moderation
and metrics of requests stay at the edge (aigc.serving.app), so another engine (vLLM on GPUs) slots in
behind the same API.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from aigc.generation import BatchStream, Delta, SamplingParams, generate
from aigc.serving.args import BatchingArgs
from aigc.serving.metrics import Metrics

logger = logging.getLogger("ray.serve")


class CompletionEngine(Protocol):
    """What the replica needs from an engine."""

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Generate for one prompt: its deltas until the one with a finish_reason. Closing the iterator
        early (client gone, moderation hit) cancels the generation."""
        ...

    async def check(self) -> int:
        """Generate one token through the model (not the request queue); raises if the model cannot run."""
        ...


class BatchingEngine:
    """Continuous batching in a replica: one BatchStream that stays open, one asyncio task stepping it
    while requests run or wait, and a queue per request that receives its deltas.

    Construction runs one probe token, so a replica whose model cannot generate never becomes ready."""

    def __init__(self, model: Any, tokenizer: Any, batching: BatchingArgs, metrics: Metrics):
        self.model, self.tokenizer = model, tokenizer
        self._make = lambda: BatchStream(model, tokenizer, max_batch_size=batching.max_batch_size, keep_finished=False)
        self.batch = self._make()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="aigc-decode") if batching.step_in_thread else None
        self.metrics = metrics
        self.queues: dict[int, asyncio.Queue] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._shown = (-1, -1)
        self.probe()

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> tuple[int, asyncio.Queue]:
        """Queue one prompt for the next step: its row, and the queue its deltas (or an error) arrive on."""
        [row] = self.batch.add([prompt_ids], [params])
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[row] = queue
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()
        return row, queue

    def cancel(self, row: int, reason: str) -> None:
        """Free the row at the next step; nothing more is delivered for it."""
        self.queues.pop(row, None)
        self.batch.finish(row, reason)
        self._wake.set()

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Submit on the first iteration (so a response that is never sent queues nothing), then the
        row's deltas; a stream closed before its last delta cancels the row."""
        row, queue = self.submit(prompt_ids, params)
        finished = False
        try:
            while not finished:
                d = await queue.get()
                if isinstance(d, Exception):
                    raise d
                finished = d.finish_reason is not None
                yield d
        finally:
            if not finished:  # the client went away, moderation stopped it, or a step failed: free the row
                self.cancel(row, "cancelled")

    def probe(self) -> int:
        """One greedy token from a one-token prompt through the generation path (not the request queue:
        a replica busy with long requests is healthy, one whose model cannot run is not)."""
        prompt = [[self.tokenizer.eos_token_id or 0]]
        out = generate(self.model, self.tokenizer, prompt, SamplingParams(temperature=0, max_tokens=1))
        return len(out[0].token_ids)

    async def check(self) -> int:
        if self.executor is None:
            return self.probe()
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.probe)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._gauges()
            if self.batch.idle():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                if self.executor is None:
                    deltas = self.batch.step()
                else:
                    deltas = await loop.run_in_executor(self.executor, self.batch.step)
            except Exception as e:  # a broken step fails the requests in it, not the replica
                logger.exception("decode step failed; failing %d request(s)", len(self.queues))
                for queue in self.queues.values():
                    queue.put_nowait(e)
                self.queues.clear()
                self.batch = self._make()
                continue
            for d in deltas:
                queue = self.queues.get(d.row)
                if queue is not None:
                    queue.put_nowait(d)
                    if d.finish_reason is not None:
                        del self.queues[d.row]
            if self.batch.active:
                self.metrics.batch_size.observe(len(self.batch.active))
            await asyncio.sleep(0)  # between steps the loop takes new requests and sends chunks

    def _gauges(self) -> None:
        now = (self.batch.waiting, len(self.batch.active))
        if now != self._shown:
            self._shown = now
            self.metrics.queued.set(now[0])
            self.metrics.running.set(now[1])
