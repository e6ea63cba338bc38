"""Serve a model directory on Ray Serve behind an OpenAI-compatible HTTP API.

    aigc serve --model DIR                                  # local Ray (or the running `ray start` cluster)
    serve run serve.app:app_builder model_dir=DIR           # the same app through Serve's CLI
    serve deploy serve/config.yaml                          # a cluster, with autoscaling from the config

One deployment (`Model`) is both the FastAPI ingress and the model: `__init__` loads the directory
through the shared loader (checksums verified, safetensors only), and every request goes through the
shared generation path (`aigc.generation.BatchStream`) with continuous batching: one decode batch per
replica that requests join at the next step and leave when done. (`@serve.batch` forms a batch, runs it
to the end and only then takes the next one; under steady load that fragments into small batches.)
Serve itself does the rest: replicas autoscale on ongoing requests, `max_ongoing_requests` caps a
replica's concurrency, and `max_queued_requests` turns overload into a quick 503 at the proxy.

Routes (under the route prefix):
    POST /v1/completions   OpenAI completions, JSON or server-sent events (`stream: true`, ends `[DONE]`)
    GET  /v1/models        the one served model
    GET  /ready            readiness: generates one token through the loaded model
Metrics (`ray_aigc_*` on Ray's metrics export port): requests, errors, prompt/completion tokens,
latency and time-to-first-token histograms, batch sizes, queued and running requests.
"""

import argparse
import asyncio
import hashlib
import hmac
import importlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from aigc.config import ConfigError, Strict, build, deep_merge, expand, parse_overrides
from aigc.generation import BatchStream, SamplingParams, encode, generate, max_positions

logger = logging.getLogger("ray.serve")

DEPLOYMENT = "Model"
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "max_tokens", "stop", "seed")


# ---------------------------------------------------------------------------------------------- args


class LimitsArgs(Strict):
    """What one request may ask for; anything beyond is a 4xx that names the field."""

    max_tokens: int = Field(256, ge=1, description="cap on a request's max_tokens")
    default_max_tokens: int = Field(16, ge=1, description="max_tokens when a request gives none (OpenAI: 16)")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="cap on a prompt's tokens; None = the model's positions - 1"
    )
    max_prompt_chars: int = Field(32_768, ge=1, description="cap on a prompt's characters (checked before tokenizing)")
    max_prompts: int = Field(8, ge=1, description="prompts in one request (`prompt` may be a list)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="cap on the request body; larger -> 413")


class BatchingArgs(Strict):
    """Continuous batching: each decode step runs every running request in one forward, and requests
    that arrived meanwhile join at the next step (prefilled together, then merged into the batch)."""

    max_batch_size: int = Field(32, ge=1, description="requests decoding at once; more wait for a free row")
    step_in_thread: bool = Field(
        False,
        description="run steps in a worker thread: the HTTP loop stays responsive during long steps (large "
        "models, GPUs) at the cost of a thread hop per step (~1 ms on a busy CPU, so off for small models)",
    )


class AutoscalingArgs(Strict):
    """Serve's request-based autoscaler (`autoscaling_config`); replicas follow ongoing requests."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    # a replica decodes up to max_batch_size rows per step at little more than the cost of one, so it
    # is "busy" only well above 2 ongoing requests (Serve's default)
    target_ongoing_requests: float = Field(8.0, gt=0.0)
    upscale_delay_s: float = Field(10.0, ge=0.0)
    downscale_delay_s: float = Field(60.0, ge=0.0)
    look_back_period_s: float | None = Field(None, gt=0.0, description="averaging window; None = Serve's (30 s)")
    metrics_interval_s: float | None = Field(None, gt=0.0, description="metric push period; None = Serve's (10 s)")


class ModerationArgs(Strict):
    """The moderation hook on prompts and outputs; a hit answers `finish_reason: "content_filter"`."""

    blocked_terms: list[str] = Field(default_factory=list, description="the default hook: a block list")
    case_sensitive: bool = False
    hook: str | None = Field(
        None, description="'module:factory' returning a Moderator; called with `options` as keyword arguments"
    )
    options: dict[str, Any] = Field(default_factory=dict)


class ServeArgs(Strict):
    """Everything the app builder takes: `aigc serve`, `serve run ... key=value` and serve/config.yaml."""

    model_dir: str = Field(..., min_length=1, description="an exported aigc model directory (verified on load)")
    model_name: str | None = Field(None, description="the id clients send as `model`; None = the directory name")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when the replica has a GPU")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    torch_threads: int = Field(1, ge=1, description="intra-op threads per replica (1 CPU replica = 1 thread)")
    limits: LimitsArgs = Field(default_factory=LimitsArgs)
    batching: BatchingArgs = Field(default_factory=BatchingArgs)
    autoscaling: AutoscalingArgs = Field(default_factory=AutoscalingArgs)
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs per replica")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per replica; > 0 makes the cluster autoscaler add GPU nodes")
    max_ongoing_requests: int = Field(64, ge=1, description="requests a replica holds at once (>= one full batch)")
    max_queued_requests: int = Field(256, ge=-1, description="requests queued at each proxy; beyond -> 503; -1 = no cap")
    max_surge_percent: int = Field(
        100, ge=0, le=100, description="extra replicas during a redeploy; > 0 keeps old ones serving until new are ready"
    )
    graceful_shutdown_timeout_s: float = Field(60.0, gt=0.0, description="time a stopping replica gets to finish")
    health_check_period_s: float = Field(10.0, gt=0.0, description="Serve calls check_health (one real token)")
    api_keys: list[str] = Field(default_factory=list, description="accepted Bearer keys; none and no env -> open")
    api_keys_env: str | None = Field("AIGC_API_KEYS", description="env var (on the replicas) with comma-separated keys")
    log_prompts: bool = Field(False, description="log prompt and output text (off: only counts and timings)")
    moderation: ModerationArgs = Field(default_factory=ModerationArgs)

    def problems(self) -> list[str]:
        out = []
        a, lim = self.autoscaling, self.limits
        if lim.default_max_tokens > lim.max_tokens:
            out.append(f"limits.default_max_tokens: {lim.default_max_tokens} > limits.max_tokens={lim.max_tokens}")
        if a.min_replicas > a.max_replicas:
            out.append(f"autoscaling.min_replicas: {a.min_replicas} > autoscaling.max_replicas={a.max_replicas}")
        if a.initial_replicas is not None and not a.min_replicas <= a.initial_replicas <= a.max_replicas:
            out.append(f"autoscaling.initial_replicas: {a.initial_replicas} is outside [min_replicas, max_replicas]")
        if self.device == "cuda" and self.num_gpus == 0:
            out.append("num_gpus: device is 'cuda' but num_gpus=0 (the replica would get no GPU)")
        if self.moderation.hook and ":" not in self.moderation.hook:
            out.append(f"moderation.hook: expected 'module:factory', got {self.moderation.hook!r}")
        return out

    @property
    def served_name(self) -> str:
        return self.model_name or os.path.basename(os.path.normpath(self.model_dir)) or "model"


def parse_args(raw: Mapping[str, Any] | ServeArgs) -> ServeArgs:
    """App-builder arguments -> ServeArgs. Nested YAML (serve/config.yaml) and flat `a.b=value` strings
    (`serve run ... autoscaling.max_replicas=4`) both work; every problem is reported at once."""
    if isinstance(raw, ServeArgs):
        return raw
    tree: dict[str, Any] = {}
    overrides = []
    for key, value in raw.items():
        if isinstance(value, str) and key not in ("model_dir", "model_name"):
            overrides.append(f"{key}={value}")  # CLI strings parse as YAML scalars: "4" -> 4, "true" -> True
        else:
            tree = deep_merge(tree, _nest(key, value))
    parsed, problems = parse_overrides(overrides)
    if problems:
        raise ConfigError(problems, "serve args")
    return build(ServeArgs, deep_merge(tree, parsed), "serve args")


def _nest(key: str, value: Any) -> dict[str, Any]:
    """"a.b" -> {"a": {"b": value}}."""
    for part in reversed(key.split(".")[1:]):
        value = {part: value}
    return {key.split(".")[0]: value}


# Serve's own options: changing only these is a lightweight update (replicas keep running, no reload)
DEPLOYMENT_FIELDS = {
    "num_cpus", "num_gpus", "max_ongoing_requests", "max_queued_requests", "max_surge_percent",
    "graceful_shutdown_timeout_s", "health_check_period_s", "autoscaling",
}


def deployment_options(args: ServeArgs) -> dict[str, Any]:
    """Serve deployment options from the args (a `deployments:` entry in a Serve config file overrides them)."""
    return {
        "name": DEPLOYMENT,
        "ray_actor_options": {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        "autoscaling_config": args.autoscaling.model_dump(exclude_none=True),
        "max_ongoing_requests": args.max_ongoing_requests,
        "max_queued_requests": args.max_queued_requests,
        "max_surge_percent": args.max_surge_percent,
        "graceful_shutdown_timeout_s": args.graceful_shutdown_timeout_s,
        "health_check_period_s": args.health_check_period_s,
    }


# ---------------------------------------------------------------------------------------- moderation


class Moderator(Protocol):
    """A moderation hook: return a reason to block `text`, or None. `kind` is "prompt" or "output"."""

    def check(self, text: str, kind: Literal["prompt", "output"]) -> str | None: ...


class BlockList:
    """The default hook: any listed term (case-insensitive unless told) blocks prompt or output."""

    def __init__(self, blocked_terms: list[str], case_sensitive: bool = False):
        self.case_sensitive = case_sensitive
        self.terms = [t if case_sensitive else t.lower() for t in blocked_terms if t]

    def check(self, text: str, kind: Literal["prompt", "output"]) -> str | None:
        hay = text if self.case_sensitive else text.lower()
        return next((f"blocked term in {kind}" for t in self.terms if t in hay), None)


def load_moderator(m: ModerationArgs) -> Moderator:
    if m.hook is None:
        return BlockList(m.blocked_terms, m.case_sensitive)
    module, _, attr = m.hook.partition(":")
    return getattr(importlib.import_module(module), attr)(**m.options)


# ------------------------------------------------------------------------------------- HTTP contract


class ApiError(Exception):
    """An OpenAI-format error: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


class StreamOptions(Strict):
    include_usage: bool = False


class CompletionRequest(Strict):
    """The OpenAI completions body. Sampling fields are checked by `SamplingParams`, not here; fields
    that change the answer but are not implemented must keep their default (400 otherwise)."""

    model: str
    prompt: str | list[str]
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Any = None
    top_p: Any = None
    top_k: Any = None  # not in OpenAI's API; vLLM's extension, via extra_body
    max_tokens: Any = None
    stop: Any = None
    seed: Any = None
    n: int = 1
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    return_token_ids: bool = False  # vLLM's extension: token ids of the prompt and of each choice

    def unsupported(self) -> list[tuple[str, str]]:
        checks = [
            ("n", self.n == 1, "only n=1 is supported"),
            ("best_of", self.best_of in (None, 1), "only best_of=1 is supported"),
            ("echo", not self.echo, "echo is not supported"),
            ("logprobs", self.logprobs is None, "logprobs are not supported"),
            ("suffix", self.suffix is None, "suffix is not supported"),
            ("presence_penalty", self.presence_penalty == 0, "penalties are not supported"),
            ("frequency_penalty", self.frequency_penalty == 0, "penalties are not supported"),
            ("logit_bias", not self.logit_bias, "logit_bias is not supported"),
        ]
        return [(name, msg) for name, ok, msg in checks if not ok]


def _validation_error(err: ValidationError) -> ApiError:
    """Every problem in one message, each named by its top-level field; `param` is the first field."""
    problems: dict[str, str] = {}
    for e in err.errors():
        name = str(e["loc"][0]) if e["loc"] else "body"
        if name in problems:  # a union (`prompt: str | list[str]`) reports once per member; keep the first
            continue
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        if name != "prompt" and e["type"] not in ("missing", "extra_forbidden"):  # never echo prompt text
            msg += f" (got {e.get('input')!r})"
        problems[name] = f"{name}: {msg}"
    return ApiError(400, "; ".join(problems.values()), next(iter(problems), None))


# ------------------------------------------------------------------------------------------ replica


@dataclass
class _Job:
    """One prompt of a request: what it asks for and what it got so far."""

    prompt_ids: list[int]
    params: SamplingParams
    n_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # filled when the row finishes


class _Metrics:
    """`ray.serve.metrics` (exported on Ray's metrics port with deployment/replica/application tags)."""

    LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter("aigc_requests", "HTTP requests by route and status", tag_keys=("route", "code"))
        self.errors = Counter("aigc_errors", "requests answered with an error, by type", tag_keys=("route", "type"))
        self.prompt_tokens = Counter("aigc_prompt_tokens", "prompt tokens of completion requests")
        self.completion_tokens = Counter("aigc_completion_tokens", "generated tokens")
        self.latency = Histogram(
            "aigc_request_latency_s", "request latency by route", boundaries=self.LATENCY_S, tag_keys=("route",)
        )
        self.ttft = Histogram("aigc_time_to_first_token_s", "time to the first generated text", boundaries=self.LATENCY_S)
        self.batch_size = Histogram("aigc_batch_size", "requests in each decode step", boundaries=[1, 2, 4, 8, 16, 32, 64, 128])
        self.queued = Gauge("aigc_queue_length", "requests in this replica waiting for a row in the batch")
        self.running = Gauge("aigc_running_requests", "requests in this replica decoding")

    def record(self, route: str, code: int, seconds: float, error_type: str | None = None) -> None:
        self.requests.inc(tags={"route": route, "code": str(code)})
        self.latency.observe(seconds, tags={"route": route})
        if error_type:
            self.errors.inc(tags={"route": route, "type": error_type})


api = FastAPI(title="aigc", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    msg = f"{request.method} {request.url.path}: {exc.detail}"
    return ApiError(exc.status_code, msg, code="not_found" if exc.status_code == 404 else None).response()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Engine:
    """Continuous batching in a replica: one BatchStream that stays open, one asyncio task stepping it
    while requests run or wait, and a queue per request that receives its deltas."""

    def __init__(self, model: Any, tokenizer: Any, batching: BatchingArgs, metrics: "_Metrics"):
        self._make = lambda: BatchStream(model, tokenizer, max_batch_size=batching.max_batch_size, keep_finished=False)
        self.stream = self._make()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="aigc-decode") if batching.step_in_thread else None
        self.metrics = metrics
        self.queues: dict[int, asyncio.Queue] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._shown = (-1, -1)

    def submit(self, job: _Job) -> tuple[int, asyncio.Queue]:
        [row] = self.stream.add([job.prompt_ids], [job.params])
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[row] = queue
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()
        return row, queue

    def cancel(self, row: int, reason: str) -> None:
        """Free the row at the next step; nothing more is delivered for it."""
        self.queues.pop(row, None)
        self.stream.finish(row, reason)
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._gauges()
            if self.stream.idle():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                if self.executor is None:
                    deltas = self.stream.step()
                else:
                    deltas = await loop.run_in_executor(self.executor, self.stream.step)
            except Exception as e:  # a broken step fails the requests in it, not the replica
                logger.exception("decode step failed; failing %d request(s)", len(self.queues))
                for queue in self.queues.values():
                    queue.put_nowait(e)
                self.queues.clear()
                self.stream = self._make()
                continue
            for d in deltas:
                queue = self.queues.get(d.row)
                if queue is not None:
                    queue.put_nowait(d)
                    if d.finish_reason is not None:
                        del self.queues[d.row]
            if self.stream.active:
                self.metrics.batch_size.observe(len(self.stream.active))
            await asyncio.sleep(0)  # between steps the loop takes new requests and sends chunks

    def _gauges(self) -> None:
        now = (self.stream.waiting, len(self.stream.active))
        if now != self._shown:
            self._shown = now
            self.metrics.queued.set(now[0])
            self.metrics.running.set(now[1])


async def _merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[Any]:
    """Items of several async iterators as they come; closing the merge closes them all."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for item in only:
                yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(s: AsyncIterator[Any]) -> None:
        try:
            async for item in s:
                await queue.put(item)
            await queue.put(done)
        except Exception as e:
            await queue.put(e)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:  # on early exit (client gone): stop the pumps first, so each stream's cleanup runs once
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()


@serve.deployment(name=DEPLOYMENT)
@serve.ingress(api)
class ModelServer:
    """One replica: the loaded model, a batcher over the shared generation path, and the HTTP routes."""

    def __init__(self, args: dict[str, Any]):
        import torch

        from aigc.modeldir import load_model

        self.args = ServeArgs.model_validate(args)
        torch.set_num_threads(self.args.torch_threads)
        device = self.args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = None if self.args.dtype == "auto" else getattr(torch, self.args.dtype)
        loaded = load_model(expand(self.args.model_dir), device=device, dtype=dtype)
        self.model, self.tok = loaded.model, loaded.tokenizer
        self.name = self.args.served_name
        self.ctx = max_positions(self.model)
        self.max_prompt_tokens = min(self.args.limits.max_prompt_tokens or self.ctx - 1, self.ctx - 1)
        # the weights' checksums identify the model: a redeployed winner answers with a new fingerprint
        files = json.dumps(loaded.meta.get("files", {}), sort_keys=True).encode()
        self.fingerprint = "fp_" + hashlib.sha256(files).hexdigest()[:12]
        self.created = int(time.time())
        self.keys = list(self.args.api_keys)
        if self.args.api_keys_env and os.environ.get(self.args.api_keys_env):
            self.keys += [k.strip() for k in os.environ[self.args.api_keys_env].split(",") if k.strip()]
        self.moderator = load_moderator(self.args.moderation)
        self.metrics = _Metrics()
        self.engine = _Engine(self.model, self.tok, self.args.batching, self.metrics)
        self._probe()  # a replica that cannot generate never becomes ready
        logger.info("serving %s (%s) from %s on %s; %d API key(s)", self.name, self.fingerprint,
                    self.args.model_dir, device, len(self.keys))

    # ------------------------------------------------------------------------------- generation

    async def _choice(self, index: int, job: _Job, blocked: bool) -> AsyncIterator[tuple[int, str, str | None]]:
        """(index, new text, finish_reason) for one prompt, with the output moderation applied."""
        if blocked:
            yield index, "", "content_filter"
            return
        row, queue = self.engine.submit(job)
        text, finished = "", False
        try:
            while not finished:
                d = await queue.get()
                if isinstance(d, Exception):
                    raise d
                job.n_tokens = d.n_tokens
                job.token_ids = d.token_ids or job.token_ids
                if d.text and self.moderator.check(text + d.text, "output"):
                    # the text that completed a blocked term is not sent; the row stops here
                    finished = True
                    self.engine.cancel(row, "content_filter")
                    yield index, "", "content_filter"
                    return
                text += d.text
                finished = d.finish_reason is not None
                yield index, d.text, d.finish_reason
        finally:
            if not finished:  # the client went away (or an error): free the row
                self.engine.cancel(row, "cancelled")

    # ------------------------------------------------------------------------------- requests

    def _authorize(self, request: Request) -> None:
        if not self.keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not any(hmac.compare_digest(token.strip().encode(), k.encode()) for k in self.keys):
            raise ApiError(401, "incorrect API key provided", code="invalid_api_key")

    async def _body(self, request: Request) -> dict[str, Any]:
        limit = self.args.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body: {declared} bytes exceeds the limit of {limit} bytes", "body")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body: more than the limit of {limit} bytes", "body")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"body: invalid JSON ({e})", "body") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"body: must be a JSON object, got {type(body).__name__}", "body")
        return body

    def _parse(self, body: dict[str, Any]) -> tuple[CompletionRequest, SamplingParams, list[str], list[list[int]]]:
        try:
            req = CompletionRequest.model_validate(body, strict=True)
        except ValidationError as e:
            raise _validation_error(e) from None
        if req.model != self.name:
            raise ApiError(404, f"model: '{req.model}' does not exist; this server has '{self.name}'", "model",
                           "model_not_found")
        bad = req.unsupported()
        if bad:
            raise ApiError(400, "; ".join(f"{k}: {m}" for k, m in bad), bad[0][0])
        given = {k: getattr(req, k) for k in SAMPLING_FIELDS if getattr(req, k) is not None}
        given.setdefault("max_tokens", self.args.limits.default_max_tokens)
        try:
            params = SamplingParams.model_validate(given, strict=True)
        except ValidationError as e:
            raise _validation_error(e) from None
        if params.max_tokens > self.args.limits.max_tokens:
            raise ApiError(400, f"max_tokens: {params.max_tokens} exceeds this server's limit of "
                                f"{self.args.limits.max_tokens}", "max_tokens")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        lim = self.args.limits
        if not prompts or len(prompts) > lim.max_prompts:
            raise ApiError(400, f"prompt: give 1 to {lim.max_prompts} prompts, got {len(prompts)}", "prompt")
        ids = []
        for i, p in enumerate(prompts):
            where = "prompt" if isinstance(req.prompt, str) else f"prompt[{i}]"
            if not p.strip():
                raise ApiError(400, f"{where}: must not be empty", "prompt")
            if len(p) > lim.max_prompt_chars:
                raise ApiError(400, f"{where}: {len(p)} characters exceeds the limit of {lim.max_prompt_chars}",
                               "prompt")
            tokens = encode(self.tok, p)  # as the generation path does
            if len(tokens) > self.max_prompt_tokens:
                raise ApiError(400, f"{where}: {len(tokens)} tokens exceeds the limit of {self.max_prompt_tokens}",
                               "prompt")
            if len(tokens) + params.max_tokens > self.ctx:
                raise ApiError(400, f"max_tokens: {where} has {len(tokens)} tokens, and {len(tokens)} + max_tokens "
                                    f"({params.max_tokens}) exceeds the model's context of {self.ctx}", "max_tokens")
            ids.append(tokens)
        return req, params, prompts, ids

    def _envelope(self, rid: str, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.name,
                "system_fingerprint": self.fingerprint, "choices": choices, "usage": usage}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        t0 = time.perf_counter()
        route = "/v1/completions"
        try:
            self._authorize(request)
            req, params, texts, ids = self._parse(await self._body(request))
        except ApiError as e:
            self.metrics.record(route, e.status, time.perf_counter() - t0, e.type)
            return e.response()
        rid = f"cmpl-{uuid.uuid4().hex}"
        blocked = [self.moderator.check(t, "prompt") is not None for t in texts]
        jobs = [_Job(x, params) for x in ids]
        streams = [self._choice(i, job, blk) for i, (job, blk) in enumerate(zip(jobs, blocked, strict=True))]
        prompt_tokens = sum(len(x) for x in ids)
        self.metrics.prompt_tokens.inc(prompt_tokens)  # > 0: empty prompts are rejected

        def usage() -> dict[str, int]:
            done = sum(j.n_tokens for j in jobs)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}

        def finish(code: int, first: float | None, reasons: list[str | None], error: str | None = None) -> None:
            seconds = time.perf_counter() - t0
            self.metrics.record(route, code, seconds, error)
            if usage()["completion_tokens"]:  # a Ray counter refuses inc(0)
                self.metrics.completion_tokens.inc(usage()["completion_tokens"])
            if first is not None:
                self.metrics.ttft.observe(first - t0)
            extra = f" prompt={texts!r}" if self.args.log_prompts else ""
            logger.info("%s %d prompt_tokens=%d completion_tokens=%d finish=%s %.1fms%s", rid, code,
                        prompt_tokens, usage()["completion_tokens"], reasons, seconds * 1e3, extra)

        if not req.stream:
            reasons: list[str | None] = [None] * len(jobs)
            parts: list[list[str]] = [[] for _ in jobs]
            first = None
            try:
                async with aclosing(_merge(streams)) as merged:
                    async for index, text, reason in merged:
                        first = first or (time.perf_counter() if text else None)
                        parts[index].append(text)
                        reasons[index] = reason or reasons[index]
            except Exception:
                logger.exception("%s failed", rid)
                finish(500, first, reasons, "server_error")
                return ApiError(500, "internal error while generating", type_="server_error").response()
            choices = []
            for i, job in enumerate(jobs):
                choice = {"text": "".join(parts[i]), "index": i, "logprobs": None, "finish_reason": reasons[i]}
                if req.return_token_ids:
                    choice["prompt_token_ids"], choice["token_ids"] = job.prompt_ids, list(job.token_ids)
                choices.append(choice)
            if self.args.log_prompts:
                logger.info("%s output=%r", rid, [c["text"] for c in choices])
            finish(200, first, reasons)
            return JSONResponse(self._envelope(rid, choices, usage()))

        async def events() -> AsyncIterator[str]:
            reasons: list[str | None] = [None] * len(jobs)
            first, code, error = None, 200, None
            try:
                async with aclosing(_merge(streams)) as merged:
                    async for index, text, reason in merged:
                        first = first or (time.perf_counter() if text else None)
                        reasons[index] = reason
                        choice = {"text": text, "index": index, "logprobs": None, "finish_reason": reason}
                        if reason is not None and req.return_token_ids:
                            choice["token_ids"] = list(jobs[index].token_ids)
                        yield _sse(self._envelope(rid, [choice], None))
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse(self._envelope(rid, [], usage()))
            except asyncio.CancelledError:
                code, error = 499, "cancelled"  # the client went away
                raise
            except Exception:
                logger.exception("%s failed", rid)
                code, error = 500, "server_error"
                yield _sse({"error": {"message": "internal error while generating", "type": "server_error",
                                      "param": None, "code": None}})
            finally:
                finish(code, first, reasons, error)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": rid})

    @api.get("/v1/models")
    async def models(self, request: Request):
        t0 = time.perf_counter()
        try:
            self._authorize(request)
        except ApiError as e:
            self.metrics.record("/v1/models", e.status, time.perf_counter() - t0, e.type)
            return e.response()
        self.metrics.record("/v1/models", 200, time.perf_counter() - t0)
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "aigc", "max_model_len": self.ctx,
                                            "system_fingerprint": self.fingerprint}]}

    def _probe(self) -> int:
        """One greedy token from a one-token prompt through the generation path (not the request queue:
        a replica busy with long requests is healthy, one whose model cannot run is not)."""
        out = generate(self.model, self.tok, [[self.tok.eos_token_id or 0]], SamplingParams(temperature=0, max_tokens=1))
        return len(out[0].token_ids)

    async def _probe_async(self) -> int:
        if self.engine.executor is None:
            return self._probe()
        return await asyncio.get_running_loop().run_in_executor(self.engine.executor, self._probe)

    @api.get("/ready")
    async def ready(self):
        t0 = time.perf_counter()
        try:
            n = await self._probe_async()
        except Exception as e:  # a replica that cannot generate is not ready
            logger.exception("readiness probe failed")
            self.metrics.record("/ready", 503, time.perf_counter() - t0, "server_error")
            return ApiError(503, f"not ready: {type(e).__name__}", type_="server_error").response()
        self.metrics.record("/ready", 200, time.perf_counter() - t0)
        return {"status": "ready", "model": self.name, "system_fingerprint": self.fingerprint, "generated_tokens": n,
                "latency_ms": round((time.perf_counter() - t0) * 1e3, 2)}

    async def check_health(self) -> None:
        """Serve's health check: the replica is replaced if this raises (e.g. the model is broken)."""
        await self._probe_async()


# ---------------------------------------------------------------------------------------- building


def build_app(args: ServeArgs | Mapping[str, Any]):
    """The Serve application for `args`; raises ConfigError listing every problem before any Ray call."""
    problems, parsed = [], None
    try:
        parsed = parse_args(args)
    except ConfigError as e:
        problems += e.problems
    model_dir = parsed.model_dir if parsed else args.get("model_dir") if isinstance(args, Mapping) else None
    if isinstance(model_dir, str | os.PathLike):
        problems += _model_dir_problems(str(model_dir))
    if problems or parsed is None:
        raise ConfigError(problems, "serve args")
    # the replica gets only what it uses, so Serve-option changes don't look like a new model to Serve
    return ModelServer.options(**deployment_options(parsed)).bind(parsed.model_dump(exclude=DEPLOYMENT_FIELDS))


def _model_dir_problems(model_dir: str) -> list[str]:
    """Catch an obviously wrong directory here rather than in every replica. Where this machine cannot
    see the path (a cluster's shared storage), the replicas' loader is the check; it verifies the
    checksums in any case."""
    from aigc.modeldir import ModelDirError, read_metadata

    path = expand(model_dir)
    if "://" in path or not os.path.isdir(os.path.dirname(path)):
        return []
    try:
        read_metadata(path)
    except ModelDirError as e:
        return [f"model_dir: {e}"]
    return []


def app_builder(args: dict[str, Any]):
    """`serve run serve.app:app_builder model_dir=DIR [a.b=value ...]` and serve/config.yaml's `args:`."""
    return build_app(args)


def main(argv: list[str] | None = None) -> int:
    """`aigc serve --model DIR [--name NAME] [--route-prefix /] [--port 8000] [--blocking] [a.b=value ...]`"""
    parser = argparse.ArgumentParser(
        prog="aigc serve", description="Serve a model directory with Ray Serve (OpenAI-compatible HTTP).",
        epilog="Extra a.b=value arguments set any ServeArgs field, e.g. autoscaling.max_replicas=4 num_cpus=2.",
    )
    parser.add_argument("--model", required=True, help="exported aigc model directory")
    parser.add_argument("--name", default=None, help="model id clients send (default: the directory name)")
    parser.add_argument("--app-name", default="aigc", help="Serve application name")
    parser.add_argument("--route-prefix", default="/", help="HTTP route prefix of the app")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host of Serve's proxy (0.0.0.0 to expose)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--address", default=None, help="Ray address (default: a running cluster, else local)")
    parser.add_argument("--blocking", action="store_true", help="stay in the foreground until Ctrl-C")
    parser.add_argument("overrides", nargs="*", help="a.b=value settings of ServeArgs")
    ns = parser.parse_args(argv)
    raw: dict[str, Any] = {"model_dir": ns.model}
    if ns.name:
        raw["model_name"] = ns.name
    for item in ns.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"{item!r}: overrides look like key=value")
        raw[key] = value
    try:
        app = build_app(raw)
    except ConfigError as e:
        print(e)
        return 2

    import ray
    from ray._private.services import canonicalize_bootstrap_address

    # no address, no RAY_ADDRESS and no `ray start` cluster: ray.init starts a Ray that lives (and takes
    # the app with it) only as long as this process, so we stay in the foreground
    owned = canonicalize_bootstrap_address(ns.address) is None
    ray.init(address=ns.address)
    serve.start(http_options={"host": ns.host, "port": ns.port})
    serve.run(app, name=ns.app_name, route_prefix=ns.route_prefix)
    prefix = ns.route_prefix.rstrip("/")
    url = f"http://{'127.0.0.1' if ns.host == '0.0.0.0' else ns.host}:{ns.port}{prefix}"
    args = parse_args(raw)
    auth = " -H 'Authorization: Bearer $AIGC_API_KEY'" if args.api_keys or args.api_keys_env in os.environ else ""
    print(f"serving {args.served_name!r} at {url}/v1  (the OpenAI client's base_url)")
    print(f"  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} \\\n"
          f"       -d '{{\"model\": \"{args.served_name}\", \"prompt\": \"Introducing the\", \"max_tokens\": 32}}'")
    if not (ns.blocking or owned):
        print(f"deployed to the running Ray cluster; remove it with: serve delete {ns.app_name}")
        return 0
    print("Ctrl-C to stop")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if owned:
            serve.shutdown()
        else:
            serve.delete(ns.app_name)
        ray.shutdown()
    return 0
