"""The OpenAI wire format, free of any HTTP framework and of Ray: errors, the completions request, key
checks, request parsing into SamplingParams and token ids, and the response and SSE builders.

Every engine sits behind the same edge: what a request may ask for is decided here, once.
"""

import hashlib
import hmac
import json
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from pydantic import ValidationError

from aigc.config import Strict
from aigc.generation import SamplingParams, encode
from aigc.serving.args import LimitsArgs, ServeArgs

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "max_tokens", "stop", "seed")
SSE_DONE = "data: [DONE]\n\n"  # the last event of every stream


class ApiError(Exception):
    """An OpenAI-format error: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        """The JSON error body (also the payload of an error event in a stream)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str] | None:
        """Response headers the status calls for (RFC 6750: a 401 names the scheme)."""
        return {"WWW-Authenticate": "Bearer"} if self.status == 401 else None


# ------------------------------------------------------------------------------------------ requests


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
        """(field, message) for each field set to something this server does not implement."""
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


@dataclass
class ParsedCompletion:
    """A valid completions request, ready for an engine: one SamplingParams for every prompt."""

    request: CompletionRequest
    params: SamplingParams
    prompts: list[str]
    prompt_ids: list[list[int]]  # each prompt's tokens, as the generation path encodes them


def validation_error(err: ValidationError) -> ApiError:
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


def accepted_keys(args: ServeArgs, environ: Mapping[str, str] = os.environ) -> list[str]:
    """`api_keys` plus the comma-separated keys in the `api_keys_env` variable; empty means no auth."""
    keys = list(args.api_keys)
    if args.api_keys_env and environ.get(args.api_keys_env):
        keys += [k.strip() for k in environ[args.api_keys_env].split(",") if k.strip()]
    return keys


def authorize(headers: Mapping[str, str], keys: Sequence[str]) -> None:
    """Raise a 401 ApiError unless `headers` (lower-case names, as ASGI gives them) carry one of `keys`
    as a Bearer token. Every key is compared, each in constant time, so the answer's timing tells
    neither how much of a key matched nor which key it was."""
    if not keys:
        return
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    given = token.strip().encode()
    if not any([hmac.compare_digest(given, k.encode()) for k in keys]):  # a list: no early exit
        raise ApiError(401, "incorrect API key provided", code="invalid_api_key")


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """A request body -> its JSON object; anything else is a 400 naming `body`."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"body: invalid JSON ({e})", "body") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"body: must be a JSON object, got {type(body).__name__}", "body")
    return body


def parse_completion(body: Mapping[str, Any], limits: LimitsArgs, tokenizer: Any, *, model: str,
                     context: int) -> ParsedCompletion:
    """A completions body -> the parsed request, its SamplingParams and its prompts' token ids, checked
    against `limits`, the served `model` id and the model's `context` (positions). Raises an ApiError
    (4xx) that names the first bad field."""
    try:
        req = CompletionRequest.model_validate(body, strict=True)
    except ValidationError as e:
        raise validation_error(e) from None
    if req.model != model:
        raise ApiError(404, f"model: '{req.model}' does not exist; this server has '{model}'", "model",
                       "model_not_found")
    bad = req.unsupported()
    if bad:
        raise ApiError(400, "; ".join(f"{k}: {m}" for k, m in bad), bad[0][0])
    given = {k: getattr(req, k) for k in SAMPLING_FIELDS if getattr(req, k) is not None}
    given.setdefault("max_tokens", limits.default_max_tokens)
    try:
        params = SamplingParams.model_validate(given, strict=True)
    except ValidationError as e:
        raise validation_error(e) from None
    if params.max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens: {params.max_tokens} exceeds this server's limit of "
                            f"{limits.max_tokens}", "max_tokens")
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts or len(prompts) > limits.max_prompts:
        raise ApiError(400, f"prompt: give 1 to {limits.max_prompts} prompts, got {len(prompts)}", "prompt")
    max_prompt_tokens = min(limits.max_prompt_tokens or context - 1, context - 1)  # >= 1 position to generate
    ids = []
    for i, p in enumerate(prompts):
        where = "prompt" if isinstance(req.prompt, str) else f"prompt[{i}]"
        if not p.strip():
            raise ApiError(400, f"{where}: must not be empty", "prompt")
        if len(p) > limits.max_prompt_chars:
            raise ApiError(400, f"{where}: {len(p)} characters exceeds the limit of {limits.max_prompt_chars}",
                           "prompt")
        tokens = encode(tokenizer, p)  # as the generation path does
        if len(tokens) > max_prompt_tokens:
            raise ApiError(400, f"{where}: {len(tokens)} tokens exceeds the limit of {max_prompt_tokens}",
                           "prompt")
        if len(tokens) + params.max_tokens > context:
            raise ApiError(400, f"max_tokens: {where} has {len(tokens)} tokens, and {len(tokens)} + max_tokens "
                                f"({params.max_tokens}) exceeds the model's context of {context}", "max_tokens")
        ids.append(tokens)
    return ParsedCompletion(req, params, prompts, ids)


# ----------------------------------------------------------------------------------------- responses


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _TokenIds(TypedDict, total=False):
    prompt_token_ids: list[int]  # vLLM's `return_token_ids` extension
    token_ids: list[int]


class CompletionChoice(_TokenIds):
    text: str
    index: int
    logprobs: None
    finish_reason: str | None


class CompletionResponse(TypedDict):
    """A whole completion, or one chunk of a stream (one choice; `usage` only in the last chunk)."""

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None


def completion_id() -> str:
    """A new request id (also the key of the request's log line)."""
    return f"cmpl-{uuid.uuid4().hex}"


def system_fingerprint(meta: Mapping[str, Any]) -> str:
    """The model's identity from its weights' checksums: a redeployed winner answers with a new one."""
    files = json.dumps(meta.get("files", {}), sort_keys=True).encode()
    return "fp_" + hashlib.sha256(files).hexdigest()[:12]


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(index: int, text: str, finish_reason: str | None) -> CompletionChoice:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def completion_response(rid: str, model: str, fingerprint: str, choices: list[CompletionChoice],
                        usage: Usage | None) -> CompletionResponse:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint, "choices": choices, "usage": usage}


def model_list(model: str, created: int, context: int, fingerprint: str) -> dict[str, Any]:
    """The `GET /v1/models` body: the one served model."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "aigc",
                                        "max_model_len": context, "system_fingerprint": fingerprint}]}


def sse(obj: Any) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
