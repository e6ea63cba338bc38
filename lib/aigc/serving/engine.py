"""The engine behind the HTTP edge: token ids and SamplingParams in, `Delta`s out.

`CompletionEngine` is all the replica asks of an engine; `BatchingEngine` is aigc's own, continuous
batching over the shared generation path (`aigc.generation.BatchStream`). Validation, keys, moderation
and metrics of requests stay at the edge (aigc.serving.app), so another engine (vLLM on GPUs) slots in
behind the same API.

LoRA adapters on one base (`AdapterHost`): peft injects every adapter's layers into the one base model and
applies one active adapter (or none) to a forward, so a decode batch holds the rows of one adapter only.
Each loaded adapter gets its own BatchingEngine (its own rows and KV cache) on the shared model, and every
forward of any of them, and every load and unload, runs in one place (the event loop, or the one decode
thread) one at a time, its adapter switched on first. Requests for different adapters therefore take turns
step by step instead of sharing a step; requests for the same adapter batch as on a plain model.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol, TypeVar

from aigc.generation import BatchStream, Delta, SamplingParams, generate
from aigc.modeldir import load_adapter
from aigc.serving.args import BatchingArgs
from aigc.serving.metrics import GaugeGate, Metrics

T = TypeVar("T")

logger = logging.getLogger("ray.serve")


class CompletionEngine(Protocol):
    """What the replica needs from an engine."""

    def stream(self, prompt_ids: list[int], params: SamplingParams, eager: bool = True) -> AsyncIterator[Delta]:
        """Generate for one prompt: its deltas until the one with a finish_reason. Closing the iterator
        early (client gone, moderation hit) cancels the generation. `eager=False`: the caller answers only
        once the text is complete (a JSON response), so the deltas may come all at once at the end."""
        ...

    async def check(self) -> int:
        """Generate one token through the model (not the request queue); raises if the model cannot run."""
        ...


class Runner:
    """Where a model's forwards run: on the event loop, or in a decode thread (`executor`, one thread), each
    inside `activate()` (an adapter's switch; nothing for a plain model). Engines that share a model share
    one executor, so their forwards never overlap."""

    def __init__(self, executor: ThreadPoolExecutor | None = None,
                 activate: Callable[[], AbstractContextManager] = nullcontext):
        self.executor, self.activate = executor, activate

    def call(self, fn: Callable[[], T]) -> T:
        """`fn()` with the model set up for it, here and now (the caller is where forwards run)."""
        with self.activate():
            return fn()

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn()` where the model's forwards run."""
        if self.executor is None:
            return self.call(fn)
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.call, fn)


class _Channel:
    """One request's deltas, from the task that steps the batch to the request's stream. The stream is woken
    for every delta when `eager` (a streamed response sends each token as it comes), else only for the last
    (a JSON answer: one wake-up a request instead of one a token, ~20 us each on a busy event loop)."""

    __slots__ = ("eager", "items", "ready", "waiter")

    def __init__(self, eager: bool):
        self.eager, self.items, self.ready = eager, [], False
        self.waiter: asyncio.Future | None = None

    def put(self, item: Delta | Exception) -> None:
        self.items.append(item)
        if self.eager or isinstance(item, Exception) or item.finish_reason is not None:
            self.ready = True
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)

    async def take(self) -> list[Delta | Exception]:
        """What arrived since the last take, once the stream is to wake."""
        while not self.ready:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        items, self.items, self.ready = self.items, [], False
        return items


def decode_executor(batching: BatchingArgs) -> ThreadPoolExecutor | None:
    """The one decode thread of a model with `batching.step_in_thread`, else None (steps on the event loop)."""
    return ThreadPoolExecutor(1, thread_name_prefix="aigc-decode") if batching.step_in_thread else None


class BatchingEngine:
    """Continuous batching in a replica: one BatchStream that stays open, one asyncio task stepping it
    while requests run or wait, and a channel per request that receives its deltas.

    Construction runs one probe token (unless `probe=False`: the caller runs `check()` where forwards
    run), so a replica whose model cannot generate never becomes ready. `runner`: where and how the
    model's forwards run (default: per `batching.step_in_thread`, the model as it is)."""

    def __init__(self, model: Any, tokenizer: Any, batching: BatchingArgs, metrics: Metrics,
                 runner: Runner | None = None, probe: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self._make = lambda: BatchStream(model, tokenizer, max_batch_size=batching.max_batch_size, keep_finished=False)
        self.batch = self._make()
        self.runner = runner or Runner(decode_executor(batching))
        self.metrics = metrics
        self.queues: dict[int, _Channel] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.gauges = GaugeGate()
        # decode steps run, and rows decoded over them: a request's share of the batch is the difference
        # between its first and last step (one metric call per request, not one per step)
        self._steps = self._rows_stepped = 0
        self.on_counts: Callable[[], None] | None = None  # set by a host that sums its engines' gauges
        if probe:
            self.runner.call(self.probe)

    def submit(self, prompt_ids: list[int], params: SamplingParams, eager: bool = True) -> tuple[int, _Channel]:
        """Queue one prompt for the next step: its row, and the channel its deltas (or an error) arrive on."""
        [row] = self.batch.add([prompt_ids], [params])
        queue = _Channel(eager)
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

    async def stream(self, prompt_ids: list[int], params: SamplingParams, eager: bool = True) -> AsyncIterator[Delta]:
        """Submit on the first iteration (so a response that is never sent queues nothing), then the
        row's deltas (`eager=False`: all at the end, see `_Channel`); a stream closed before its last
        delta cancels the row."""
        row, queue = self.submit(prompt_ids, params, eager)
        finished, since = False, (self._steps, self._rows_stepped)
        try:
            while not finished:
                for d in await queue.take():
                    if isinstance(d, Exception):
                        raise d
                    finished = d.finish_reason is not None
                    yield d
        finally:
            if not finished:  # the client went away, moderation stopped it, or a step failed: free the row
                self.cancel(row, "cancelled")
            if self._steps > since[0]:
                self.metrics.batch_size.observe((self._rows_stepped - since[1]) / (self._steps - since[0]))

    def probe(self) -> int:
        """One greedy token from a one-token prompt through the generation path (not the request queue:
        a replica busy with long requests is healthy, one whose model cannot run is not). Call it where the
        model's forwards run (`check` does)."""
        prompt = [[self.tokenizer.eos_token_id or 0]]
        out = generate(self.model, self.tokenizer, prompt, SamplingParams(temperature=0, max_tokens=1))
        return len(out[0].token_ids)

    async def check(self) -> int:
        return await self.runner.run(self.probe)

    def busy(self) -> bool:
        """Whether any request is queued or decoding here."""
        return bool(self.queues) or not self.batch.idle()

    @property
    def counts(self) -> tuple[int, int]:
        """(requests waiting for a row, requests decoding)."""
        return self.batch.waiting, len(self.batch.active)

    async def _run(self) -> None:
        while True:
            idle = self.batch.idle()
            self._gauges(force=idle)
            if idle:
                self._wake.clear()
                await self._wake.wait()
                continue
            before = len(self.batch.active)
            try:
                deltas = await self.runner.run(self.batch.step)
            except Exception as e:  # a broken step fails the requests in it, not the replica
                logger.exception("decode step failed; failing %d request(s)", len(self.queues))
                for queue in self.queues.values():
                    queue.put(e)
                self.queues.clear()
                self.batch = self._make()
                continue
            for d in deltas:
                queue = self.queues.get(d.row)
                if queue is not None:
                    queue.put(d)
                    if d.finish_reason is not None:
                        del self.queues[d.row]
            self._steps += 1
            self._rows_stepped += max(before, len(self.batch.active))  # the rows before or after it: joins and leaves
            await asyncio.sleep(0)  # between steps the loop takes new requests and sends chunks

    def _gauges(self, force: bool = False) -> None:
        """The queue and running gauges, when `GaugeGate` says they are due (`force`: the batch idles)."""
        now = self.counts
        if self.gauges.due(now, force):
            if self.on_counts is not None:
                self.on_counts()
                return
            self.metrics.queued.set(now[0])
            self.metrics.running.set(now[1])


class LoadedAdapter:
    """One adapter on a replica's base: its engine, its identity, and the requests using it (`leases`).

    Serve's multiplexing calls `__del__` when it unloads the adapter (least recently used first); the adapter
    then leaves the model once its last request is done, so an unload never cuts a running request short."""

    def __init__(self, host: "AdapterHost", key: str, engine: BatchingEngine, meta: dict[str, Any]):
        self.host, self.key, self.engine, self.meta = host, key, engine, meta
        self.leases = 0
        self.unloading = False
        self._loop = asyncio.get_running_loop()

    def acquire(self) -> None:
        """A request starts using the adapter (call it in the same step as the load returns)."""
        self.leases += 1

    def release(self) -> None:
        self.leases -= 1

    def __del__(self) -> None:
        # Serve calls this in a worker thread, and Python again when the object goes: hand it to the loop once
        if self.unloading:
            return
        self.unloading = True
        try:
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self.host.unload(self)))
        except RuntimeError:  # the loop is closed: the replica is going away with its model
            pass


class AdapterHost:
    """One base model in a replica and the LoRA adapters loaded onto it (see the module docstring): the base's
    engine, an engine per loaded adapter, and the model's one place to run forwards, loads and unloads."""

    def __init__(self, model: Any, tokenizer: Any, batching: BatchingArgs, metrics: Metrics, base_fingerprint: str):
        self.model, self.tokenizer, self.batching, self.metrics = model, tokenizer, batching, metrics
        self.base_fingerprint = base_fingerprint
        self.peft: Any = None  # the PeftModel around `model`, once an adapter is loaded
        self.executor = decode_executor(batching)
        self.base = BatchingEngine(model, tokenizer, batching, metrics, Runner(self.executor, self._base_on))
        self.base.on_counts = self._counts
        self.loaded: dict[str, LoadedAdapter] = {}  # by key
        self._serial = 0

    def _base_on(self) -> AbstractContextManager:
        return self.peft.disable_adapter() if self.peft is not None else nullcontext()

    def _switch(self, key: str) -> Callable[[], AbstractContextManager]:
        def on() -> AbstractContextManager:
            self.peft.set_adapter(key, inference_mode=True)
            return nullcontext()
        return on

    async def load(self, name: str, path: str, meta: dict[str, Any]) -> LoadedAdapter:
        """Adapter directory `path` on the base (checksums verified, its base fingerprint checked again) with
        its own engine, probed with one token. Its key in the model is new per load (an adapter loaded again
        after an unload never meets what is left of the old one) and free of the '.' torch refuses in a name."""
        self._serial += 1
        key = f"adapter{self._serial}"
        runner = Runner(self.executor)

        def attach() -> None:
            self.peft = load_adapter(self.peft if self.peft is not None else self.model, path, adapter_name=key,
                                     base_fingerprint=self.base_fingerprint)
            self.peft.eval()

        await runner.run(attach)
        engine = BatchingEngine(self.model, self.tokenizer, self.batching, self.metrics,
                                Runner(self.executor, self._switch(key)), probe=False)
        engine.on_counts = self._counts
        loaded = LoadedAdapter(self, key, engine, meta)
        logger.info("loaded adapter %s from %s as %s", name, path, key)
        self.loaded[key] = loaded
        try:
            await engine.check()
        except Exception:
            await self.unload(loaded)
            raise
        return loaded

    async def unload(self, loaded: LoadedAdapter, poll_s: float = 0.05) -> None:
        """Take `loaded` off the model once no request uses it."""
        while loaded.leases > 0 or loaded.engine.busy():
            await asyncio.sleep(poll_s)
        if self.loaded.pop(loaded.key, None) is not None:
            await Runner(self.executor).run(lambda: self.peft.delete_adapter(loaded.key))
            logger.info("unloaded adapter %s", loaded.key)

    def _counts(self) -> None:
        engines = [self.base, *(a.engine for a in self.loaded.values())]
        self.metrics.queued.set(sum(e.counts[0] for e in engines))
        self.metrics.running.set(sum(e.counts[1] for e in engines))
