"""The OpenAI wire format, free of any HTTP framework and of Ray: errors, the completions and chat
requests, key checks, request parsing into SamplingParams and token ids, and the response and SSE builders.

Every engine sits behind the same edge: what a request may ask for is decided here, once.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypedDict, TypeVar

from pydantic import ValidationError, field_validator
from pydantic_core import PydanticCustomError

from aigc.config import Strict
from aigc.generation import SamplingParams, TokenLogprob, encode, token_texts
from aigc.modeldir import files_fingerprint
from aigc.serving.args import LimitsArgs, ServeArgs
from aigc.template import ROLES, TemplateError, prompt_ids, render_prompt

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "max_tokens", "stop", "seed", "presence_penalty", "frequency_penalty")
SSE_DONE = "data: [DONE]\n\n"  # the last event of every stream


class ApiError(Exception):
    """An OpenAI-format error: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", allow: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.allow = allow  # a 405's allowed method

    def body(self) -> dict[str, Any]:
        """The JSON error body (also the payload of an error event in a stream)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str] | None:
        """Response headers the status calls for (RFC 6750: a 401 names the scheme; RFC 9110: a 405 the methods)."""
        if self.status == 401:
            return {"WWW-Authenticate": "Bearer"}
        return {"Allow": self.allow} if self.status == 405 and self.allow else None


# ------------------------------------------------------------------------------------------ requests


class StreamOptions(Strict):
    include_usage: bool = False


class OpenAIRequest(Strict):
    """What completions and chat share. Sampling fields are checked by `SamplingParams`, not here; fields
    that change the answer but are not implemented must keep their default (400 otherwise)."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Any = None
    top_p: Any = None
    top_k: Any = None  # not in OpenAI's API; vLLM's extension, via extra_body
    max_tokens: Any = None
    stop: Any = None
    seed: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    n: int = 1  # choices per prompt, up to limits.max_n
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    return_token_ids: bool = False  # vLLM's extension: token ids of the prompt and of each choice

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, message) for each field set to something this server does not implement."""
        return [(name, msg) for name, ok, msg in self._checks() if not ok]

    def _checks(self) -> list[tuple[str, bool, str]]:
        return [("logit_bias", not self.logit_bias, "logit_bias is not supported")]


class CompletionRequest(OpenAIRequest):
    """The OpenAI completions body: `prompt` is text or token ids, one prompt or a list of them."""

    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = None  # sample this many per prompt, answer the n with the best mean logprob
    echo: bool = False  # the prompt before the completion (and its tokens' logprobs, with logprobs)
    logprobs: int | None = None  # each token's logprob and this many alternatives, up to limits.max_logprobs
    suffix: str | None = None

    def _checks(self) -> list[tuple[str, bool, str]]:
        return super()._checks() + [("suffix", self.suffix is None, "suffix is not supported")]


class ChatMessage(Strict):
    """One turn of a conversation: text content only (no parts, images or tool calls)."""

    role: str
    content: str
    name: str | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, v: str) -> str:
        if v not in ROLES:  # the chat template renders these and no others
            raise PydanticCustomError("role", "must be one of {roles} (got {got})",
                                      {"roles": ", ".join(ROLES), "got": repr(v[:32])})
        return v


class ChatCompletionRequest(OpenAIRequest):
    """The OpenAI chat completions body. Tools and structured output are refused, not ignored."""

    messages: list[ChatMessage]
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None

    def _checks(self) -> list[tuple[str, bool, str]]:
        return super()._checks() + [
            ("tools", self.tools is None, "tools are not supported"),
            ("tool_choice", self.tool_choice is None, "tools are not supported"),
            ("functions", self.functions is None, "functions are not supported"),
            ("function_call", self.function_call is None, "functions are not supported"),
            ("parallel_tool_calls", self.parallel_tool_calls is None, "tools are not supported"),
            ("response_format", self.response_format in (None, {"type": "text"}),
             "only response_format {'type': 'text'} is supported"),
        ]


def openapi_body(cls: type[OpenAIRequest]) -> dict[str, Any]:
    """The OpenAPI `requestBody` of a route that reads `cls` (its JSON Schema, `$defs` inside it): the
    routes take the raw request so that parsing stays here, and this puts the body's shape back in the
    app's OpenAPI document for clients and for the fuzz test (tests/integration/http_fuzz.py)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": cls.model_json_schema()}}}}


R = TypeVar("R", bound=OpenAIRequest)
TokenText = Callable[[list[int]], list[str]]
TEXT_FIELDS = ("prompt", "messages")  # hold the user's text: never echoed in an error


def field_path(loc: Sequence[str | int]) -> str:
    """A pydantic error location as the field a client sent: ("messages", 2, "role") -> "messages[2].role".
    Only list items are entered, so a union's member tags (("prompt", "list[str]", 0)) stay out of it."""
    path, in_item = str(loc[0]), False
    for part in loc[1:]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif in_item:
            path += f".{part}"
        else:
            break
        in_item = isinstance(part, int)
    return path


def validation_error(err: ValidationError) -> ApiError:
    """Every problem in one message, each named by its field path; `param` is the first field."""
    problems: dict[str, str] = {}
    for e in err.errors():
        name = field_path(e["loc"]) if e["loc"] else "body"
        if name in problems:  # a union (`prompt: str | list[str]`) reports once per member; keep the first
            continue
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        if name.split("[")[0] not in TEXT_FIELDS and e["type"] not in ("missing", "extra_forbidden"):
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


def parse_json_body(raw: bytes, max_depth: int = LimitsArgs().max_json_depth) -> dict[str, Any]:
    """A request body -> its JSON object; anything else is a 400 naming `body`: not JSON, not an object,
    nested deeper than `max_depth`, a number that is not finite or too long to convert, or a string that
    is not valid Unicode (a lone surrogate from a `\\ud800` escape, which no tokenizer or response can
    encode). Nothing a client sends reaches the code behind as something it cannot handle."""
    try:
        body = json.loads(raw)
    except RecursionError:  # the decoder recursed past Python's limit (~1000 levels): far over ours
        raise ApiError(400, f"body: JSON nested deeper than the limit of {max_depth}", "body") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, and ints over Python's 4300 digits
        raise ApiError(400, f"body: invalid JSON ({e})", "body") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"body: must be a JSON object, got {type(body).__name__}", "body")
    problem = _json_problem(body, max_depth)
    if problem:
        raise ApiError(400, f"body: {problem}", "body")
    return body


def _json_problem(body: Any, max_depth: int) -> str | None:
    """What makes a decoded JSON value unsafe to pass on, or None. Iterative: a hostile body cannot
    make this recurse, and a real one (a few dozen values) costs microseconds."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > max_depth:
                return f"JSON nested deeper than the limit of {max_depth}"
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                if isinstance(k, str):
                    stack.append((k, depth))
                stack.append((v, depth + 1))
        elif isinstance(value, float) and not math.isfinite(value):
            return "numbers must be finite (got NaN or Infinity)"
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return "strings must be valid Unicode (got a lone surrogate escape)"
    return None


def _parse_request(cls: type[R], body: Mapping[str, Any], limits: LimitsArgs, model: str) -> R:
    """What every route checks first: the body's fields and types, the served `model`, the unsupported
    fields, and `n` within `limits`."""
    try:
        req = cls.model_validate(body, strict=True)
    except ValidationError as e:
        raise validation_error(e) from None
    if req.model != model:
        raise model_not_found(req.model, [model])
    bad = req.unsupported()
    if bad:
        raise ApiError(400, "; ".join(f"{k}: {m}" for k, m in bad), bad[0][0])
    _within("n", req.n, 1, limits.max_n)
    return req


MODELS_NAMED = 20  # served model ids a 404 names; the rest are counted


def model_not_found(model: str, served: Sequence[str], adapter: str | None = None) -> ApiError:
    """The 404 for a `model` this server does not serve (`adapter`: the adapter it named, when it named one of
    the served base), naming what it does serve."""
    names = ", ".join(f"'{m}'" for m in served[:MODELS_NAMED])
    if len(served) > MODELS_NAMED:
        names += f" and {len(served) - MODELS_NAMED} more (GET /v1/models lists them)"
    what = f"adapter '{adapter}' of '{served[0]}'" if adapter is not None else f"'{model}'"
    return ApiError(404, f"model: {what} does not exist; this server has {names}", "model", "model_not_found")


def _within(name: str, value: int, low: int, limit: int, what: str = "this server's limit") -> None:
    """A 400 naming `name` and `limit` unless low <= value <= limit."""
    if value > limit:
        raise ApiError(400, f"{name}: {value} exceeds {what} of {limit}", name)
    if value < low:
        raise ApiError(400, f"{name}: must be at least {low} (got {value})", name)


def _sampling(req: OpenAIRequest, limits: LimitsArgs, *, echo: bool = False, **extra: Any) -> SamplingParams:
    """The request's SamplingParams (`extra`: the logprobs fields the route worked out), max_tokens within
    `limits`; max_tokens 0 only with `echo` (scoring the prompt, as OpenAI's legacy completions allowed)."""
    given = {k: getattr(req, k) for k in SAMPLING_FIELDS if getattr(req, k) is not None}
    given.setdefault("max_tokens", limits.default_max_tokens)
    if type(given["max_tokens"]) is int and given["max_tokens"] == 0 and not echo:
        raise ApiError(400, "max_tokens: must be at least 1 (0 only with echo, to score the prompt)", "max_tokens")
    try:
        params = SamplingParams.model_validate({**given, **extra}, strict=True)
    except ValidationError as e:
        raise validation_error(e) from None
    if params.max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens: {params.max_tokens} exceeds this server's limit of "
                            f"{limits.max_tokens}", "max_tokens")
    return params


def _copies(params: SamplingParams, k: int) -> list[SamplingParams]:
    """`k` samples of one prompt: a seeded request's j-th gets seed + j, so n seeded choices differ from one
    another yet repeat from request to request (and choice 0 is what n=1 would give)."""
    if params.seed is None:
        return [params] * k
    return [params] + [params.model_copy(update={"seed": (params.seed + j) % 2**63}) for j in range(1, k)]


def _fit_prompt(text: str, tokenize: Callable[[], list[int]], params: SamplingParams, limits: LimitsArgs,
                context: int, *, where: str, param: str) -> list[int]:
    """A prompt's token ids once its characters (before tokenizing), its tokens and its tokens plus
    `max_tokens` fit `limits` and the model's `context`; else a 400 that starts with `where`."""
    if len(text) > limits.max_prompt_chars:
        raise ApiError(400, f"{where}: {len(text)} characters exceeds the limit of {limits.max_prompt_chars}", param)
    tokens = tokenize()
    max_prompt_tokens = min(limits.max_prompt_tokens or context - 1, context - 1)  # >= 1 position to generate
    if len(tokens) > max_prompt_tokens:
        raise ApiError(400, f"{where}: {len(tokens)} tokens exceeds the limit of {max_prompt_tokens}", param)
    if len(tokens) + params.max_tokens > context:
        raise ApiError(400, f"max_tokens: {where} has {len(tokens)} tokens, and {len(tokens)} + max_tokens "
                            f"({params.max_tokens}) exceeds the model's context of {context}", "max_tokens")
    return tokens


def parse_completion(body: Mapping[str, Any], limits: LimitsArgs, tokenizer: Any, *, model: str,
                     context: int) -> ParsedCompletion:
    """A completions body -> the parsed request, its SamplingParams and its prompts' token ids, checked
    against `limits`, the served `model` id and the model's `context` (positions). A prompt is text or token
    ids (lm-eval-harness sends ids), one or a list. Raises an ApiError (4xx) that names the first bad field."""
    req = _parse_request(CompletionRequest, body, limits, model)
    if req.logprobs is not None:
        _within("logprobs", req.logprobs, 0, limits.max_logprobs)
    k = req.n if req.best_of is None else req.best_of
    if req.best_of is not None:
        _within("best_of", req.best_of, req.n, limits.max_n)
        if req.stream and req.best_of > req.n:
            raise ApiError(400, "best_of: not supported with stream (the best are known only at the end)", "best_of")
    if req.echo and req.stream:
        raise ApiError(400, "echo: not supported with stream", "echo")
    zero = type(req.max_tokens) is int and req.max_tokens == 0
    params = _sampling(
        req, limits, echo=req.echo,
        # best_of ranks its samples by their logprobs, so it needs them whether or not the client does
        logprobs=req.logprobs if req.logprobs is not None or k == req.n else 0,
        prompt_logprobs=(req.logprobs or 0) if req.echo and (req.logprobs is not None or zero) else None,
    )
    single = isinstance(req.prompt, str) or (bool(req.prompt) and isinstance(req.prompt[0], int))
    prompts: list[str | list[int]] = [req.prompt] if single else req.prompt
    if not prompts or len(prompts) > limits.max_prompts:
        raise ApiError(400, f"prompt: give 1 to {limits.max_prompts} prompts, got {len(prompts)}", "prompt")
    texts, ids, vocab = [], [], len(tokenizer)
    for i, p in enumerate(prompts):
        where = "prompt" if single else f"prompt[{i}]"
        if isinstance(p, str):
            if not p.strip():
                raise ApiError(400, f"{where}: must not be empty", "prompt")
            texts.append(p)  # tokenized as the generation path does
            ids.append(_fit_prompt(p, partial(encode, tokenizer, p), params, limits, context, where=where,
                                   param="prompt"))
            continue
        if not p:
            raise ApiError(400, f"{where}: must not be empty", "prompt")
        bad = next((t for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"{where}: token id {bad} is outside the vocabulary (0 to {vocab - 1})", "prompt")
        texts.append(tokenizer.decode(p))  # what moderation checks and echo shows
        ids.append(_fit_prompt("", lambda p=p: list(p), params, limits, context, where=where, param="prompt"))
    seqs = [Seq(i, c) for i in range(len(ids)) for c in _copies(params, k)]
    return ParsedCompletion(req, params, texts, ids, seqs, partial(token_texts, tokenizer))


def parse_chat(body: Mapping[str, Any], limits: LimitsArgs, tokenizer: Any, *, model: str,
               context: int) -> ParsedChat:
    """A chat completions body -> the parsed request, its SamplingParams, the conversation rendered with
    the tokenizer's chat template and its token ids (`aigc.template.prompt_ids`: the ids training used for
    the same prompt). Checked like `parse_completion`, the rendered prompt standing for `prompt`; an
    ApiError (4xx) names the first bad field by its path (`messages[2].role`)."""
    req = _parse_request(ChatCompletionRequest, body, limits, model)
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
        _within("top_logprobs", req.top_logprobs, 0, limits.max_logprobs)
    params = _sampling(req, limits, logprobs=(req.top_logprobs or 0) if req.logprobs else None)
    if not req.messages:
        raise ApiError(400, "messages: must hold at least one message", "messages")
    last = len(req.messages) - 1
    if req.messages[last].role != "user":  # the reply is generated for the user's last turn
        raise ApiError(400, f"messages[{last}].role: the last message must be the user's, got "
                            f"'{req.messages[last].role}'", f"messages[{last}].role")
    if not req.messages[last].content.strip():
        raise ApiError(400, f"messages[{last}].content: must not be empty", f"messages[{last}].content")
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    try:
        text = render_prompt(tokenizer, messages)
        ids = _fit_prompt(text, partial(prompt_ids, tokenizer, messages), params, limits, context,
                          where="messages", param="messages")
    except TemplateError as e:
        raise ApiError(400, f"messages: {e}", "messages") from None
    seqs = [Seq(0, c) for c in _copies(params, req.n)]
    return ParsedChat(req, params, [text], [ids], seqs, partial(token_texts, tokenizer))


# ----------------------------------------------------------------------------------------- responses


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _TokenIds(TypedDict, total=False):
    prompt_token_ids: list[int]  # vLLM's `return_token_ids` extension
    token_ids: list[int]


class CompletionLogprobs(TypedDict):
    """The legacy completions' logprobs: one entry per token (the prompt's first has no logprob)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]  # the alternatives and the chosen token, by token text
    text_offset: list[int]  # where each token starts in the choice's text


class CompletionChoice(_TokenIds):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class AssistantMessage(TypedDict, total=False):
    role: str  # "assistant"; in a stream, only the first chunk's delta has it
    content: str


class TopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]  # the token text's UTF-8 bytes


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(TypedDict):
    content: list[ChatTokenLogprob]
    refusal: None


class ChatChoice(_TokenIds):
    """A chat choice: `message` in a whole answer, `delta` in a stream's chunk."""

    index: int
    message: AssistantMessage
    delta: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class Response(TypedDict, total=False):
    """A whole answer or one chunk of a stream (`usage` only in the whole answer and the last chunk)."""

    id: str
    object: str  # text_completion | chat.completion | chat.completion.chunk
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice] | list[ChatChoice]
    usage: Usage | None
    prompt_token_ids: list[int]  # chat with vLLM's `return_token_ids`: at the top, not in the choice


@dataclass(frozen=True)
class Head:
    """What every object of one answer shares (a stream's chunks too): id, created, model, fingerprint."""

    id: str
    model: str
    system_fingerprint: str
    created: int = field(default_factory=lambda: int(time.time()))

    def body(self, object_: str, choices: list, usage: Usage | None, **extra: Any) -> Response:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model,
                "system_fingerprint": self.system_fingerprint, "choices": choices, "usage": usage, **extra}


def completion_id(prefix: str = "cmpl") -> str:
    """A new request id (also the key of the request's log line); chat's start `chatcmpl-`."""
    return f"{prefix}-{uuid.uuid4().hex}"


def system_fingerprint(meta: Mapping[str, Any]) -> str:
    """The model's identity from its weights' checksums: a redeployed winner answers with a new one."""
    return files_fingerprint(dict(meta))


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(index: int, text: str, finish_reason: str | None) -> CompletionChoice:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None) -> ChatChoice:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}


def chat_delta(index: int, delta: AssistantMessage, finish_reason: str | None = None) -> ChatChoice:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def completion_response(head: Head, choices: list[CompletionChoice], usage: Usage | None) -> Response:
    return head.body("text_completion", choices, usage)


def chat_response(head: Head, choices: list[ChatChoice], usage: Usage | None, **extra: Any) -> Response:
    return head.body("chat.completion", choices, usage, **extra)


def chat_chunk(head: Head, choices: list[ChatChoice], usage: Usage | None = None, **extra: Any) -> Response:
    return head.body("chat.completion.chunk", choices, usage, **extra)


def completion_logprobs(token_text: TokenText, entries: Sequence[TokenLogprob | None], ids: Sequence[int],
                        start: int = 0) -> CompletionLogprobs:
    """The legacy logprobs object of tokens `ids` (`entries`: their logprobs, None for a prompt's first
    token), their text offsets counted from `start`. Token texts come from one `token_text` call."""
    alts = [t for e in entries if e is not None for t, _ in e.top]
    texts = token_text([*ids, *alts])
    names, alt_names = texts[: len(ids)], iter(texts[len(ids) :])
    out: CompletionLogprobs = {"tokens": names, "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for name, e in zip(names, entries, strict=True):
        out["text_offset"].append(start)
        start += len(name)
        out["token_logprobs"].append(None if e is None else e.logprob)
        if e is None:
            out["top_logprobs"].append(None)
            continue
        top = {next(alt_names): lp for _, lp in e.top}
        top.setdefault(name, e.logprob)  # the chosen token too, as vLLM answers (lm-eval reads max(top))
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(token_text: TokenText, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    """The chat logprobs object of generated tokens (`entries`), each with its `top` alternatives."""
    alts = [t for e in entries for t, _ in e.top]
    texts = token_text([*(e.token for e in entries), *alts])
    alt_names = iter(texts[len(entries) :])

    def one(name: str, lp: float) -> TopLogprob:
        return {"token": name, "logprob": lp, "bytes": list(name.encode("utf-8", "replace"))}

    content = [{**one(name, e.logprob), "top_logprobs": [one(next(alt_names), lp) for _, lp in e.top]}
               for name, e in zip(texts, entries, strict=False)]
    return {"content": content, "refusal": None}


@dataclass(frozen=True)
class Seq:
    """One sample to generate: which prompt, under which SamplingParams (the n-th of a prompt differs by seed)."""

    prompt: int
    params: SamplingParams


@dataclass
class Result:
    """What one Seq produced, filled by the replica as its deltas arrive."""

    prompt_blocked: bool = False  # the prompt moderation's verdict: nothing generated, nothing echoed
    text: str = ""
    finish_reason: str | None = None
    n_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # complete once finish_reason is set
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with params.logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with params.prompt_logprobs
    offset: int = 0  # in a stream: characters of the tokens whose logprobs were sent (the next text_offset)

    def mean_logprob(self) -> float:
        return sum(e.logprob for e in self.logprobs) / len(self.logprobs) if self.logprobs else 0.0


@dataclass
class ParsedCompletion:
    """A valid completions request, ready for an engine, and the shape of its answers: the replica's flow
    is the same for every route, these methods are not. `sequences` holds n (or best_of) samples per prompt,
    prompt by prompt; a stream's choice index is the sequence's index (best_of is refused with stream)."""

    request: CompletionRequest
    params: SamplingParams
    prompts: list[str]  # what prompt moderation checks and echo shows; logged only with log_prompts
    prompt_ids: list[list[int]]  # each prompt's tokens, as the generation path encodes them
    sequences: list[Seq]
    token_text: TokenText  # token ids -> each one's text (logprobs name tokens by text)

    def head(self, model: str, fingerprint: str) -> Head:
        """The shared part of this request's answer, with a new id."""
        return Head(completion_id(), model, fingerprint)

    def _chosen(self, results: list[Result]) -> list[tuple[int, Result]]:
        """(prompt, result) of each choice in order: per prompt, its n samples, or its best n of best_of
        by mean token logprob (OpenAI's "highest log probability per token")."""
        k, n = len(self.sequences) // len(self.prompts), self.request.n
        out = []
        for p in range(len(self.prompts)):
            group = results[p * k : (p + 1) * k]
            out += [(p, r) for r in (sorted(group, key=Result.mean_logprob, reverse=True)[:n] if k > n else group)]
        return out

    def _logprobs(self, p: int, r: Result) -> CompletionLogprobs | None:
        if self.request.logprobs is None or r.prompt_blocked:
            return None
        entries, ids = list(r.logprobs), [e.token for e in r.logprobs]
        if self.request.echo:
            prompt = r.prompt_logprobs or [None] * len(self.prompt_ids[p])
            entries, ids = [*prompt, *entries], [*self.prompt_ids[p], *ids]
        return completion_logprobs(self.token_text, entries, ids)

    def response(self, head: Head, results: list[Result], usage: Usage) -> Response:
        """The whole answer: n choices per prompt, prompt by prompt."""
        choices = []
        for i, (p, r) in enumerate(self._chosen(results)):
            echo = self.prompts[p] if self.request.echo and not r.prompt_blocked else ""
            c = choice(i, echo + r.text, r.finish_reason)
            c["logprobs"] = self._logprobs(p, r)
            if self.request.return_token_ids:
                c["prompt_token_ids"], c["token_ids"] = self.prompt_ids[p], list(r.token_ids)
            choices.append(c)
        return completion_response(head, choices, usage)

    def opening(self, head: Head) -> list[Response]:
        """The chunks a stream starts with, before any text."""
        return []

    def _piece(self, r: Result, new: list[TokenLogprob]) -> CompletionLogprobs | None:
        """The logprobs of a stream chunk's tokens, offsets continuing from the last chunk's."""
        if self.request.logprobs is None or not new:
            return None
        out = completion_logprobs(self.token_text, new, [e.token for e in new], r.offset)
        r.offset = out["text_offset"][-1] + len(out["tokens"][-1])
        return out

    def chunks(self, head: Head, index: int, text: str, reason: str | None, result: Result,
               new: list[TokenLogprob]) -> list[Response]:
        """The chunks of one delta of sequence `index` (`new`: the logprobs of the tokens since its last delta;
        `result.token_ids` complete once `reason` is set)."""
        c = choice(index, text, reason)
        c["logprobs"] = self._piece(result, new)
        if reason is not None and self.request.return_token_ids:
            c["token_ids"] = list(result.token_ids)
        return [completion_response(head, [c], None)]

    def usage_chunk(self, head: Head, usage: Usage) -> Response:
        """The last chunk with `stream_options.include_usage`: no choices, the usage."""
        return completion_response(head, [], usage)


@dataclass
class ParsedChat(ParsedCompletion):
    """A valid chat request: `prompts` holds the one rendered conversation, `prompt_ids` its ids, `sequences`
    its n samples; its answers are `chat.completion` objects and `chat.completion.chunk`s."""

    request: ChatCompletionRequest

    def head(self, model: str, fingerprint: str) -> Head:
        return Head(completion_id("chatcmpl"), model, fingerprint)

    def _prompt_ids(self) -> dict[str, list[int]]:
        return {"prompt_token_ids": self.prompt_ids[0]} if self.request.return_token_ids else {}

    def _chat_logprobs(self, entries: list[TokenLogprob]) -> ChatLogprobs | None:
        return chat_logprobs(self.token_text, entries) if self.request.logprobs else None

    def response(self, head: Head, results: list[Result], usage: Usage) -> Response:
        choices = []
        for i, r in enumerate(results):
            c = chat_choice(i, r.text, r.finish_reason)
            c["logprobs"] = None if r.prompt_blocked else self._chat_logprobs(r.logprobs)
            if self.request.return_token_ids:
                c["token_ids"] = list(r.token_ids)
            choices.append(c)
        return chat_response(head, choices, usage, **self._prompt_ids())

    def opening(self, head: Head) -> list[Response]:
        # as OpenAI streams: the role first, then the content in pieces, then the finish_reason
        return [chat_chunk(head, [chat_delta(i, {"role": "assistant", "content": ""}) for i in range(len(self.sequences))],
                           **self._prompt_ids())]

    def chunks(self, head: Head, index: int, text: str, reason: str | None, result: Result,
               new: list[TokenLogprob]) -> list[Response]:
        out = []
        if text or (new and self.request.logprobs):
            piece = chat_delta(index, {"content": text})
            piece["logprobs"] = self._chat_logprobs(new) if new else None
            out.append(chat_chunk(head, [piece]))
        if reason is not None:
            last = chat_delta(index, {}, reason)
            if self.request.return_token_ids:
                last["token_ids"] = list(result.token_ids)
            out.append(chat_chunk(head, [last]))
        return out

    def usage_chunk(self, head: Head, usage: Usage) -> Response:
        return chat_chunk(head, [], usage)


def model_list(model: str, created: int, context: int, fingerprint: str,
               adapters: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """The `GET /v1/models` body: the served model, then its adapters as (model id, fingerprint), each with the
    base as its `parent` (as vLLM lists LoRA adapters)."""
    def card(id_: str, fp: str, **extra: Any) -> dict[str, Any]:
        return {"id": id_, "object": "model", "created": created, "owned_by": "aigc", "max_model_len": context,
                "system_fingerprint": fp, **extra}

    return {"object": "list", "data": [card(model, fingerprint), *(card(a, fp, parent=model) for a, fp in adapters)]}


def sse(obj: Any) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
