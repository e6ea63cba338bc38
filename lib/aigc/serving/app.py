"""Serve a model directory on Ray Serve behind an OpenAI-compatible HTTP API.

    aigc serve --model DIR                                  # local Ray (or the running `ray start` cluster)
    serve run serve.app:app_builder model_dir=DIR           # the same app through Serve's CLI
    serve deploy serve/config.yaml                          # a cluster, with autoscaling from the config

One deployment (`Model`) is both the HTTP ingress and the model: `__init__` loads the directory
through the shared loader (checksums verified, safetensors only), and every request goes through the
shared generation path (`aigc.generation.BatchStream`) with continuous batching: one decode batch per
replica that requests join at the next step and leave when done. (`@serve.batch` forms a batch, runs it
to the end and only then takes the next one; under steady load that fragments into small batches.)
Serve itself does the rest: replicas autoscale on ongoing requests, `max_ongoing_requests` caps a
replica's concurrency, and `max_queued_requests` turns overload into a quick 503. HTTP reaches the ingress
replicas through Serve's proxy, or through HAProxy where the nodes set RAY_SERVE_ENABLE_HA_PROXY=1 (opt-in:
docs/serving.md says why).

Routes (under the route prefix):
    POST /v1/completions        OpenAI completions, JSON or server-sent events (`stream: true`, ends `[DONE]`)
    POST /v1/chat/completions   OpenAI chat, likewise; messages rendered with the model directory's chat
                                template (aigc.template: the ids training used for the same prompt)
    GET  /v1/models             the served model (and its adapters)
    GET  /ready                 readiness: generates one token through the loaded model
Both POST routes take the same path: key check, parsing into SamplingParams and token ids
(aigc.serving.api), prompt moderation, the engine, output moderation, then JSON or SSE.

LoRA adapters on the base (`adapters`, `adapter_folder`): each is its own model id, "<base>:<adapter>" (Ray
Serve LLM's convention). A second deployment, the `Router`, is then the HTTP ingress: it checks the key and
the body, answers 404 for a model it does not serve, and forwards the parsed body over a handle with the
model id as Serve's `multiplexed_model_id` (only for an adapter: base requests spread over all replicas), so
Serve prefers a replica that already holds that adapter. A replica loads an adapter when first asked for it
(`@serve.multiplexed`, the `max_adapters_per_replica` most recently used kept) onto its one base model, each
adapter with its own decode batch (aigc.serving.engine.AdapterHost), and answers through the same edge as the
base: validation, moderation, metrics, no prompt text in logs.
Metrics (`ray_aigc_*` on Ray's metrics export port): requests, errors, prompt/completion tokens,
latency, time-to-first-token and inter-token latency histograms, batch sizes, queued and running requests.
"""

import argparse
import asyncio
import importlib.util
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from transformers import AutoConfig

from aigc import storage
from aigc.config import ConfigError, expand
from aigc.generation import max_positions
from aigc.modeldir import (
    ModelDirError,
    files_fingerprint,
    fingerprint,
    load_model,
    local_dir,
    read_metadata,
)
from aigc.raycompat import cluster_address
from aigc.sampling import TokenLogprob
from aigc.serving.adapters import adapter_meta, available, find, listed
from aigc.serving.adapters import problems as adapter_problems
from aigc.serving.api import (
    SSE_DONE,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    Head,
    ParsedCompletion,
    Result,
    Usage,
    accepted_keys,
    authorize,
    model_list,
    model_not_found,
    openapi_body,
    parse_chat,
    parse_completion,
    parse_json_body,
    sse,
    system_fingerprint,
    usage,
)
from aigc.serving.args import (
    DEPLOYMENT,
    DEPLOYMENT_FIELDS,
    ROUTER,
    ROUTER_FIELDS,
    ServeArgs,
    adapter_model_id,
    deployment_options,
    parse_args,
    router_options,
    split_model_id,
)
from aigc.serving.engine import AdapterHost, BatchingEngine, CompletionEngine, LoadedAdapter
from aigc.serving.metrics import Metrics
from aigc.serving.moderation import load_moderator
from aigc.serving.vllm_engine import VllmEngine
from aigc.template import ensure_chat_template

logger = logging.getLogger("ray.serve")

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MODELS = "/v1/models"
READY = "/ready"
# The app's HTTP routes, path -> (method, the ingress's handler): ModelServer's, or the Router's in front of
# adapters. The ingress dispatches them itself (`HttpIngress`).
ROUTES: dict[str, tuple[str, str]] = {COMPLETIONS: ("POST", "completions"), CHAT: ("POST", "chat_completions"),
                                      MODELS: ("GET", "models"), READY: ("GET", "ready")}


def openapi() -> dict[str, Any]:
    """The app's OpenAPI document: its routes, and the JSON bodies the POST routes read (the routes take the
    raw request so that parsing stays in aigc.serving.api; `openapi_body` gives each body's schema). Clients
    and the fuzz test (tests/integration/http_fuzz.py) read it; the app does not serve it."""
    bodies = {COMPLETIONS: CompletionRequest, CHAT: ChatCompletionRequest}
    paths = {path: {method.lower(): {"operationId": name, **(openapi_body(bodies[path]) if path in bodies else {}),
                                     "responses": {"200": {"description": "OK"}}}}
             for path, (method, name) in ROUTES.items()}
    return {"openapi": "3.1.0", "info": {"title": "aigc", "version": "1"}, "paths": paths}


def error_response(e: ApiError) -> JSONResponse:
    """The OpenAI-format error response of `e`."""
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


def route_path(scope: Mapping[str, Any]) -> str:
    """A request's path below the app's route prefix (Serve moves the prefix into `root_path`)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


class HttpIngress:
    """The app's HTTP entry point: Serve calls `__call__` with each request (a deployment without an ASGI
    app), which dispatches `ROUTES` to the handler methods of the same names and answers everything else,
    and every ApiError, as an OpenAI error body. No FastAPI: its ASGI stack (middleware, routing, dependency
    solving) cost 0.5 ms a request on the 2-core machine (an empty FastAPI ingress against an empty plain
    deployment, both reading the body, 590 interleaved requests each), for four fixed routes. Serve tags its
    own access log and HTTP metrics with the route prefix then; aigc's metrics carry the route."""

    async def __call__(self, request: Request) -> Response:
        path, method = route_path(request.scope), request.method
        try:
            if path not in ROUTES:
                raise ApiError(404, f"{method} {path}: Not Found", code="not_found")
            allowed, handler = ROUTES[path]
            if method != allowed and not (method == "HEAD" and allowed == "GET"):
                raise ApiError(405, f"{method} {path}: Method Not Allowed; use {allowed}", allow=allowed)
            return await getattr(self, handler)(request)
        except ApiError as e:
            return error_response(e)


def _refused(owner: Any, request: Request, route: str, t0: float) -> JSONResponse | None:
    """The key check of a route that generates nothing (`owner`: a ModelServer or Router, with `keys` and
    `metrics`): None when authorized, else the 401, counted."""
    try:
        authorize(request.headers, owner.keys)
    except ApiError as e:
        owner.metrics.record(route, e.status, time.perf_counter() - t0, e.type)
        return error_response(e)
    return None


def _generation_failed() -> ApiError:
    return ApiError(500, "internal error while generating", type_="server_error")


# what a POST route parses its body with: parse_completion or parse_chat
Parser = Callable[..., ParsedCompletion]
PARSERS: dict[str, Parser] = {COMPLETIONS: parse_completion, CHAT: parse_chat}


@dataclass
class _Target:
    """The model a request runs on: its id (what the answer's `model` says), its engine and fingerprint, and
    what to call when the request is done (an adapter's lease)."""

    model: str
    engine: CompletionEngine
    fingerprint: str
    release: Callable[[], None] = lambda: None


@dataclass
class _Call:
    """One generating request in flight (completions or chat): what it asked for, and per sequence (a
    prompt's n-th sample) what it got so far."""

    route: str
    head: Head
    t0: float
    parsed: ParsedCompletion
    blocked: list[bool]  # the prompt moderation's verdicts, per prompt
    engine: CompletionEngine
    results: list[Result] = field(init=False)
    first: float | None = None  # when the first text came
    last: float | None = None  # when the last text came

    def __post_init__(self):
        self.results = [Result(prompt_blocked=self.blocked[s.prompt]) for s in self.parsed.sequences]

    @property
    def rid(self) -> str:
        return self.head.id

    @property
    def prompt_tokens(self) -> int:
        return sum(len(x) for x in self.parsed.prompt_ids)

    def usage(self) -> Usage:
        return usage(self.prompt_tokens, sum(r.n_tokens for r in self.results))

    def took(self, index: int, text: str, reason: str | None) -> None:
        now = time.perf_counter() if text else None
        self.first, self.last = self.first or now, now or self.last
        self.results[index].finish_reason = reason or self.results[index].finish_reason

    def inter_token(self) -> float | None:
        """The mean time between tokens after the first (from the first text to the last, over the tokens
        generated after the first one in every sequence); None with fewer than 2 tokens."""
        later = sum(max(r.n_tokens - 1, 0) for r in self.results)
        if self.first is None or self.last is None or not later:
            return None
        return (self.last - self.first) / later * len(self.results)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; a 413 naming `body` once it passes `limit` bytes (before reading any of it when
    the client declared a larger Content-Length)."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:  # '²'.isdigit() too
        raise ApiError(413, f"request body: {declared} bytes exceeds the limit of {limit} bytes", "body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body: more than the limit of {limit} bytes", "body")
        chunks.append(chunk)
    return b"".join(chunks)


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


def engine_kind(engine: str, device: str, adapters: bool = False) -> str:
    """The engine a replica runs: `engine` as asked, or for "auto" vLLM on a GPU where vLLM is installed
    (the replica's environment: `vllm_python`, or a serving image with it) unless the app serves adapters on
    its base (aigc's engine switches them per step), else aigc's."""
    if engine != "auto":
        if engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise RuntimeError(f"engine vllm: vLLM is not installed in this replica's environment ({sys.executable}); "
                                "build one with `make vllm-env` and set vllm_python to its Python")
        return engine
    return "vllm" if device == "cuda" and not adapters and importlib.util.find_spec("vllm") is not None else "aigc"


def saved_dtype(config: Any) -> str:
    """`dtype: auto` for vLLM: the dtype the weights were saved in, as aigc's engine loads them. (vLLM's own "auto"
    casts a float32 checkpoint to float16 on a GPU and to bfloat16 on a CPU, where its bfloat16 path died with
    SIGILL inside a Serve replica on the development machine.) "auto" when the config does not say."""
    dtype = getattr(config, "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else "auto"


def local_model_dir(model_dir: str) -> str:
    """`model_dir` itself (~ expanded), or for an object-store URI the replica's verified copy (`modeldir.local_dir`)."""
    return local_dir(model_dir) if storage.is_uri(model_dir) else expand(model_dir)


class ModelCore:
    """One replica: the loaded model behind an engine (and the adapters loaded onto it), and the edge (keys,
    validation, moderation, metrics, logs without prompt text). `ModelServer` adds the HTTP routes; behind a
    Router it is `ModelReplica`, called over handles (Serve allows one FastAPI ingress per app)."""

    def __init__(self, args: dict[str, Any]):
        self.args = ServeArgs.model_validate(args)
        torch.set_num_threads(self.args.torch_threads)
        device = self.args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = None if self.args.dtype == "auto" else getattr(torch, self.args.dtype)
        self.engine_kind = engine_kind(self.args.engine, device, self.args.serves_adapters)
        vllm = self.engine_kind == "vllm"
        loaded = load_model(local_model_dir(self.args.model_dir), device=device, dtype=dtype, weights=not vllm)
        config = AutoConfig.from_pretrained(loaded.path) if vllm else None
        ctx = max_positions(config if vllm else loaded.model)
        self.tok, self.name, self.ctx = loaded.tokenizer, self.args.served_name, ctx
        if ensure_chat_template(self.tok):  # a directory exported before templates were saved with it
            logger.warning("%s has no chat template; chat uses aigc's default (aigc.template)", self.args.model_dir)
        self.fingerprint, self.created = system_fingerprint(loaded.meta), int(time.time())
        self.keys = accepted_keys(self.args)
        self.moderator = load_moderator(self.args.moderation)
        self.metrics = Metrics()
        self.host: AdapterHost | None = None
        self.base_fingerprint: str | None = None
        if self.args.serves_adapters:
            # what each adapter recorded of its base must be these weights: refuse a wrong one before serving
            self.base_fingerprint = fingerprint(expand(self.args.model_dir))
            for path in listed(self.args).values():
                adapter_meta(path, self.base_fingerprint, self.args.model_dir)
            self.host = AdapterHost(loaded.model, self.tok, self.args.batching, self.metrics, self.base_fingerprint)
            self.engine: CompletionEngine = self.host.base
            # Serve's LRU of loaded adapters, sized by the args (hence applied here, as Ray Serve LLM does, to a
            # function: Serve keeps its LRU on the function object, which a bound method cannot carry)
            async def load(model_id: str) -> LoadedAdapter:
                return await self._load_adapter(model_id)

            self._adapter = serve.multiplexed(max_num_models_per_replica=self.args.max_adapters_per_replica)(load)
        elif vllm:  # the weights load in vLLM's engine; on a CPU without CUDA graphs (vLLM's CPU build)
            self.engine = VllmEngine.create(loaded.path, self.tok.eos_token_id, self.metrics,
                                            dtype=saved_dtype(config) if self.args.dtype == "auto" else self.args.dtype,
                                            max_model_len=self.ctx,
                                            **{"enforce_eager": device == "cpu", **self.args.vllm_args})
        else:
            self.engine = BatchingEngine(loaded.model, self.tok, self.args.batching, self.metrics)
        logger.info("serving %s (%s) from %s on %s with %s's engine; %d API key(s)%s", self.name, self.fingerprint,
                    self.args.model_dir, device, self.engine_kind, len(self.keys),
                    "; adapters on demand" if self.host else "")

    async def _load_adapter(self, model_id: str) -> LoadedAdapter:
        """Serve's multiplexed loader: the adapter model id `model_id` names, loaded onto the base."""
        name = split_model_id(model_id, self.name)
        path = find(self.args, name) if name is not None else None
        if path is None or self.host is None:
            raise model_not_found(model_id, self._served(), name)
        meta = adapter_meta(path, self.base_fingerprint or "", self.args.model_dir)
        return await self.host.load(name, path, meta)

    async def _target(self, model_id: str) -> _Target:
        """The base (`model_id` empty: Serve's id of a request without one) or the adapter `model_id` names,
        loaded if need be; a 404 ApiError for an adapter the app does not serve, a 400 for one that cannot be
        served on this base."""
        if not model_id or model_id == self.name:
            return _Target(self.name, self.engine, self.fingerprint)
        try:
            split_model_id(model_id, self.name)
            loaded: LoadedAdapter = await self._adapter(model_id)
        except KeyError:
            raise model_not_found(model_id, self._served()) from None
        except ModelDirError as e:
            logger.error("adapter %s refused: %s", model_id, e)
            raise ApiError(400, f"model: {e}", "model", "model_not_loadable") from None
        loaded.acquire()  # in the step the load returned in: an unload waits for this request
        return _Target(model_id, loaded.engine, files_fingerprint(loaded.meta), loaded.release)

    def _adapters(self) -> list[tuple[str, str]]:
        """(model id, fingerprint) of each adapter served now for this base (one recorded for another base, or
        one still being copied in, is not)."""
        out = []
        for name, path in (available(self.args).items() if self.base_fingerprint else ()):
            try:
                out.append((adapter_model_id(self.name, name),
                            files_fingerprint(adapter_meta(path, self.base_fingerprint, self.args.model_dir))))
            except ModelDirError:
                continue
        return out

    def _served(self) -> list[str]:
        return [self.name, *(m for m, _ in self._adapters())]

    async def _choice(self, call: _Call, index: int) -> AsyncIterator[tuple[int, str, str | None, list[TokenLogprob]]]:
        """(index, new text, finish_reason, new logprobs) for one sequence, with the output moderation applied."""
        r, seq = call.results[index], call.parsed.sequences[index]
        if r.prompt_blocked:
            yield index, "", "content_filter", []
            return
        text, hit = "", False
        # a JSON answer takes the deltas at the end (one wake-up, not one per token); moderation cuts the same text
        eager = bool(call.parsed.request.stream)
        async with aclosing(call.engine.stream(call.parsed.prompt_ids[seq.prompt], seq.params, eager)) as deltas:
            async for d in deltas:
                r.n_tokens, r.token_ids = d.n_tokens, d.token_ids or r.token_ids
                r.prompt_logprobs = d.prompt_logprobs or r.prompt_logprobs
                if d.text and self.moderator.check(text + d.text, "output"):
                    hit = True  # the text that completed a blocked term is not sent; leaving the stream ends the row
                    break
                text += d.text
                r.logprobs += d.logprobs or []
                yield index, d.text, d.finish_reason, d.logprobs or []
        if hit:
            yield index, "", "content_filter", []

    def _choices(self, call: _Call) -> AsyncIterator[tuple[int, str, str | None, list[TokenLogprob]]]:
        return _merge([self._choice(call, i) for i in range(len(call.results))])

    async def generate(self, route: str, body: dict[str, Any]) -> AsyncIterator[Any]:
        """The Router's call (a streaming handle; the key and the body were checked there): the answer to a
        generating request on the model Serve routed it with (`multiplexed_model_id`; none: the base). Yields
        ("json", status, body bytes), or ("sse", headers) and then the stream's events."""
        t0 = time.perf_counter()
        try:
            target = await self._target(serve.get_multiplexed_model_id())
        except ApiError as e:
            self.metrics.record(route, e.status, time.perf_counter() - t0, e.type)
            yield "json", e.status, error_response(e).body
            return
        try:
            answer = await self._answer(route, PARSERS[route], body, t0, target)
            if isinstance(answer, StreamingResponse):
                yield "sse", {"X-Request-Id": answer.headers["x-request-id"]}
                async for event in answer.body_iterator:
                    yield event
            else:
                yield "json", answer.status_code, answer.body
        finally:
            target.release()

    async def _answer(self, route: str, parse: Parser, body: dict[str, Any], t0: float, target: _Target):
        """A generating request's body on `target`: `parse` (the route's own), prompt moderation, then JSON or SSE."""
        try:
            parsed = parse(body, self.args.limits, self.tok, model=target.model, context=self.ctx)
        except ApiError as e:
            self.metrics.record(route, e.status, time.perf_counter() - t0, e.type)
            return error_response(e)
        blocked = [self.moderator.check(t, "prompt") is not None for t in parsed.prompts]
        call = _Call(route, parsed.head(target.model, target.fingerprint), t0, parsed, blocked, target.engine)
        self.metrics.prompt_tokens.inc(call.prompt_tokens)  # > 0: empty prompts are rejected
        if not parsed.request.stream:
            return await self._complete_json(call)
        return StreamingResponse(self._complete_sse(call), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": call.rid})

    async def _complete_json(self, call: _Call) -> JSONResponse:
        try:
            async with aclosing(self._choices(call)) as merged:
                async for index, text, reason, _ in merged:
                    call.took(index, text, reason)
                    call.results[index].text += text
        except Exception:
            logger.exception("%s failed", call.rid)
            self._finish(call, 500, "server_error")
            return error_response(_generation_failed())
        if self.args.log_prompts:
            logger.info("%s output=%r", call.rid, [r.text for r in call.results])
        self._finish(call, 200)
        return JSONResponse(call.parsed.response(call.head, call.results, call.usage()))

    async def _complete_sse(self, call: _Call) -> AsyncIterator[str]:
        code, error, parsed = 200, None, call.parsed
        try:
            for chunk in parsed.opening(call.head):
                yield sse(chunk)
            async with aclosing(self._choices(call)) as merged:
                async for index, text, reason, new in merged:
                    call.took(index, text, reason)
                    for chunk in parsed.chunks(call.head, index, text, reason, call.results[index], new):
                        yield sse(chunk)
            if parsed.request.stream_options and parsed.request.stream_options.include_usage:
                yield sse(parsed.usage_chunk(call.head, call.usage()))
        except asyncio.CancelledError:
            code, error = 499, "cancelled"  # the client went away
            raise
        except Exception:
            logger.exception("%s failed", call.rid)
            code, error = 500, "server_error"
            yield sse(_generation_failed().body())
        finally:
            self._finish(call, code, error)
        yield SSE_DONE

    def _finish(self, call: _Call, code: int, error: str | None = None) -> None:
        """Metrics and the request's one log line (counts and timings; text only with log_prompts)."""
        seconds = time.perf_counter() - call.t0
        self.metrics.record(call.route, code, seconds, error)
        done = call.usage()["completion_tokens"]
        if done:  # a Ray counter refuses inc(0)
            self.metrics.completion_tokens.inc(done)
        if call.first is not None:
            self.metrics.ttft.observe(call.first - call.t0)
        gap = call.inter_token()
        if gap is not None:
            self.metrics.inter_token.observe(gap)
        extra = f" prompt={call.parsed.prompts!r}" if self.args.log_prompts else ""
        logger.info("%s %d prompt_tokens=%d completion_tokens=%d finish=%s %.1fms%s", call.rid, code,
                    call.prompt_tokens, done, [r.finish_reason for r in call.results], seconds * 1e3, extra)

    def model_list(self) -> dict[str, Any]:
        """The `GET /v1/models` body: the base, then the adapters served now (the Router's call too)."""
        return model_list(self.name, self.created, self.ctx, self.fingerprint, self._adapters())

    def info(self) -> dict[str, Any]:
        """What a deploy onto this running app needs (aigc.pipeline): the base's model id and fingerprint,
        and where adapters are looked up."""
        return {"model": self.name, "model_dir": self.args.model_dir, "base_fingerprint": self.base_fingerprint,
                "adapter_folder": self.args.adapter_folder}

    async def readiness(self) -> tuple[int, dict[str, Any]]:
        """(status, body) of `GET /ready`: one token through the base model (the Router's call too)."""
        t0 = time.perf_counter()
        try:
            n = await self.engine.check()
        except Exception as e:  # a replica that cannot generate is not ready
            logger.exception("readiness probe failed")
            self.metrics.record(READY, 503, time.perf_counter() - t0, "server_error")
            return 503, ApiError(503, f"not ready: {type(e).__name__}", type_="server_error").body()
        self.metrics.record(READY, 200, time.perf_counter() - t0)
        return 200, {"status": "ready", "model": self.name, "system_fingerprint": self.fingerprint,
                     "generated_tokens": n, "latency_ms": round((time.perf_counter() - t0) * 1e3, 2)}

    async def check_health(self) -> None:
        """Serve's health check: the replica is replaced if this raises (e.g. the model is broken)."""
        await self.engine.check()


@serve.deployment(name=DEPLOYMENT)
class ModelServer(HttpIngress, ModelCore):
    """The model's replica as the app's HTTP ingress (an app without adapters)."""

    async def completions(self, request: Request):
        return await self._generate(request, COMPLETIONS, parse_completion)

    async def chat_completions(self, request: Request):
        return await self._generate(request, CHAT, parse_chat)

    async def _generate(self, request: Request, route: str, parse: Parser):
        """Every generating route: key, body, then `_answer` on the base."""
        t0 = time.perf_counter()
        try:
            authorize(request.headers, self.keys)
            limits = self.args.limits
            body = parse_json_body(await read_body(request, limits.max_body_bytes), limits.max_json_depth)
        except ApiError as e:
            self.metrics.record(route, e.status, time.perf_counter() - t0, e.type)
            return error_response(e)
        return await self._answer(route, parse, body, t0, _Target(self.name, self.engine, self.fingerprint))

    async def models(self, request: Request):
        t0 = time.perf_counter()
        if (refused := _refused(self, request, MODELS, t0)) is not None:
            return refused
        self.metrics.record(MODELS, 200, time.perf_counter() - t0)
        return JSONResponse(self.model_list())

    async def ready(self, request: Request):
        status, body = await self.readiness()
        return JSONResponse(body, status_code=status)


@serve.deployment(name=DEPLOYMENT)
class ModelReplica(ModelCore):
    """The model's replica behind the Router (an app that serves adapters): `generate`, `model_list`,
    `readiness` and `info` over handles."""


@serve.deployment(name=ROUTER)
class Router(HttpIngress):
    """The HTTP ingress of an app that serves adapters: key and body checked, an unknown model answered 404
    here, and the rest forwarded to the model's replicas with the adapter's model id as Serve's
    `multiplexed_model_id`, so the request goes to a replica that already holds that adapter where one does."""

    def __init__(self, model: DeploymentHandle, args: dict[str, Any]):
        self.args = ServeArgs.model_validate(args)
        self.model, self.name = model, self.args.served_name
        self.keys = accepted_keys(self.args)
        self.metrics = Metrics()

    def _served(self) -> list[str]:
        return [self.name, *(adapter_model_id(self.name, n) for n in available(self.args))]

    def _multiplexed_id(self, body: dict[str, Any]) -> str:
        """The adapter model id a body asks for, "" for the base (and for a `model` that is no string, which the
        replica's parsing names); a 404 ApiError naming a model or adapter the app does not serve."""
        model = body.get("model")
        if not isinstance(model, str):
            return ""
        try:
            adapter = split_model_id(model, self.name)
        except KeyError:
            raise model_not_found(model, self._served()) from None
        if adapter is not None and find(self.args, adapter) is None:
            raise model_not_found(model, self._served(), adapter)
        return model if adapter is not None else ""

    async def _forward(self, request: Request, route: str):
        t0 = time.perf_counter()
        try:
            authorize(request.headers, self.keys)
            limits = self.args.limits
            body = parse_json_body(await read_body(request, limits.max_body_bytes), limits.max_json_depth)
            model_id = self._multiplexed_id(body)
        except ApiError as e:
            self.metrics.record(route, e.status, time.perf_counter() - t0, e.type)
            return error_response(e)
        handle = self.model.options(stream=True, **({"multiplexed_model_id": model_id} if model_id else {}))
        events = handle.generate.remote(route, body)
        try:
            first = await events.__anext__()
        except Exception:
            logger.exception("forwarding to %s failed", DEPLOYMENT)
            self.metrics.record(route, 500, time.perf_counter() - t0, "server_error")
            return error_response(_generation_failed())
        if first[0] == "json":
            return Response(first[2], status_code=first[1], media_type="application/json")

        async def rest() -> AsyncIterator[str]:
            done = False
            try:
                async for event in events:
                    yield event
                done = True
            finally:
                if not done:  # the client went away: stop the replica's generation too
                    events.cancel()

        return StreamingResponse(rest(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **first[1]})

    async def completions(self, request: Request):
        return await self._forward(request, COMPLETIONS)

    async def chat_completions(self, request: Request):
        return await self._forward(request, CHAT)

    async def models(self, request: Request):
        t0 = time.perf_counter()
        if (refused := _refused(self, request, MODELS, t0)) is not None:
            return refused
        body = await self.model.model_list.remote()
        self.metrics.record(MODELS, 200, time.perf_counter() - t0)
        return JSONResponse(body)

    async def ready(self, request: Request):
        status, body = await self.model.readiness.remote()
        return JSONResponse(body, status_code=status)

    async def info(self) -> dict[str, Any]:
        """The model deployment's `info` (aigc.pipeline deploys an adapter onto a running app with it)."""
        return await self.model.info.remote()


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
    if parsed is not None and not problems:
        problems += adapter_problems(parsed)
    if problems or parsed is None:
        raise ConfigError(problems, "serve args")
    # the replica gets only what it uses, so Serve-option changes don't look like a new model to Serve
    replica = parsed.model_dump(exclude=DEPLOYMENT_FIELDS)
    if not parsed.serves_adapters:
        return ModelServer.options(**deployment_options(parsed)).bind(replica)
    model = ModelReplica.options(**deployment_options(parsed)).bind(replica)
    return Router.options(**router_options(parsed)).bind(model, parsed.model_dump(include=ROUTER_FIELDS))


def _model_dir_problems(model_dir: str) -> list[str]:
    """Catch an obviously wrong directory here rather than in every replica. Where this machine cannot
    see the path (a cluster's shared storage), the replicas' loader is the check; it verifies the
    checksums in any case."""
    path = expand(model_dir)
    if storage.is_uri(path):  # reachable and published (the replicas download and verify it)
        try:
            storage.published_files(path)
        except storage.StorageError as e:
            return [f"model_dir: {e}"]
        return []
    if not os.path.isdir(os.path.dirname(path)):
        return []
    try:
        read_metadata(path)
    except ModelDirError as e:
        return [f"model_dir: {e}"]
    return []


def app_builder(args: dict[str, Any]):
    """`serve run serve.app:app_builder model_dir=DIR [a.b=value ...]` and serve/config.yaml's `args:`."""
    return build_app(args)


def port_taken(host: str, port: int) -> str | None:
    """Why a new Serve proxy should not take `host:port`, or None. Serve's proxy binds with SO_REUSEPORT, so a second
    local Ray on a port another one serves binds too, and the kernel then splits the connections between the two
    apps without an error: something that accepts a connection there is refused up front."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        if s.connect_ex(("127.0.0.1" if host in ("0.0.0.0", "") else host, port)) == 0:
            return f"something already listens on {host}:{port} (another `aigc serve`, or Serve of another Ray?)"
    return None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


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
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host of Serve's ingress (0.0.0.0 to expose)")
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

    # no address, no RAY_ADDRESS and no `ray start` cluster: ray.init starts a Ray that lives (and takes
    # the app with it) only as long as this process, so we stay in the foreground
    owned = cluster_address(ns.address) is None
    if owned and (taken := port_taken(ns.host, ns.port)):
        print(f"--port {ns.port}: {taken}; choose another --port, or stop what holds it")
        return 2
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
    print(f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
          f"       -d '{{\"model\": \"{args.served_name}\", \"messages\": [{{\"role\": \"user\", "
          f"\"content\": \"Write an ad for running shoes\"}}], \"max_tokens\": 32}}'")
    for name in available(args):
        print(f"  adapter {name!r}: \"model\": \"{adapter_model_id(args.served_name, name)}\"")
    if not (ns.blocking or owned):
        print(f"deployed to the running Ray cluster; remove it with: serve delete {ns.app_name}")
        return 0
    print("Ctrl-C to stop")
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop: the same clean shutdown as Ctrl-C
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
