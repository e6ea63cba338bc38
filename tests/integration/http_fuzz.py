"""Hypothesis strategies for fuzzing the Serve app's HTTP edge from its own OpenAPI document.

`requests_from(openapi, ...)` draws whole HTTP requests: a method (the documented one mostly, any other
sometimes), a path (the documented ones and a few that are not), headers (a right, wrong, malformed or
missing API key, odd content types, stray headers) and a body: JSON drawn from the route's request schema
(`aigc.serving.api.openapi_body`), then often broken (a field dropped, retyped or added), or arbitrary
JSON, raw bytes, or deeply nested arrays. `check_response` holds every answer to the edge's contract:
2xx or 4xx, never 5xx, and every 4xx an OpenAI error body.

(schemathesis does this from an OpenAPI document too; it is not installed, and the subset of JSON Schema
that pydantic emits for our request models is small enough to map here.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
EXTRA_PATHS = ["/", "/v1", "/v1/completion", "/v1/models/tiny", "/v1/embeddings", "/%ff", "/v1/completions/x"]

# arbitrary JSON, small: the `Any`-typed sampling fields and extra keys take these
json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=8)
# text with the characters that break naive code: lone surrogates, NUL, controls, astral characters
odd_text = st.one_of(st.text(max_size=40), st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=3),
                     st.sampled_from(["\ud800", "\x00", "a\udfffb", "\U0001F600", "<|endoftext|>", " ", ""]))


def from_schema(schema: dict[str, Any], root: dict[str, Any]) -> st.SearchStrategy:
    """Values that `schema` (the subset pydantic emits: $ref to $defs, anyOf, type, items, properties,
    additionalProperties, enum, const) accepts, drawn to probe edges (huge and negative numbers, odd text)."""
    if "$ref" in schema:
        return from_schema(root["$defs"][schema["$ref"].rsplit("/", 1)[-1]], root)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, root) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if kind is None:  # Any: checked by SamplingParams at the edge, so anything may come
        return json_value
    if kind == "string":
        return odd_text
    if kind == "integer":
        return st.one_of(st.integers(-3, 10), st.integers(min_value=-(2**64), max_value=2**64))
    if kind == "number":
        return st.one_of(st.floats(-3, 3), st.floats(allow_nan=True, allow_infinity=True))
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), root), max_size=4)
    if kind == "object":
        props = schema.get("properties")
        if props is None:
            return st.dictionaries(st.text(max_size=8), from_schema(schema.get("additionalProperties") or {}, root),
                                   max_size=3)
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {k: from_schema(v, root) for k, v in props.items() if k in required},
            optional={k: from_schema(v, root) for k, v in props.items() if k not in required})
    raise ValueError(f"schema type {kind!r} is not mapped")


@st.composite
def _broken(draw, base: st.SearchStrategy, model: str) -> Any:
    """A body from the schema, usually naming the served model (else the first check ends it), then
    perhaps broken: a field removed, set to arbitrary JSON, or an unknown field added."""
    body = draw(base)
    if draw(st.integers(0, 9)) < 8:
        body["model"] = model
    how = draw(st.sampled_from(["keep", "keep", "keep", "drop", "retype", "extra"]))
    if how == "drop" and body:
        body.pop(draw(st.sampled_from(sorted(body))))
    elif how == "retype" and body:
        body[draw(st.sampled_from(sorted(body)))] = draw(json_value)
    elif how == "extra":
        body[draw(st.text(min_size=1, max_size=10))] = draw(json_value)
    return body


def _encode(obj: Any) -> bytes:
    # ensure_ascii: lone surrogates travel as \ud800 escapes, as a hostile client would send them
    return json.dumps(obj, allow_nan=True).encode()


@dataclass
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None


def requests_from(openapi: dict[str, Any], model: str, key: str) -> st.SearchStrategy[HttpRequest]:
    """Whole HTTP requests for the app that `openapi` documents, serving `model` behind `key`."""
    routes = {}  # path -> (documented method, body strategy or None)
    for path, ops in openapi["paths"].items():
        for method, op in ops.items():
            schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            routes[path] = (method.upper(), None if schema is None else _broken(from_schema(schema, schema), model))
    documented = sorted(routes)

    @st.composite
    def one(draw) -> HttpRequest:
        path = draw(st.one_of(st.sampled_from(documented), st.sampled_from(EXTRA_PATHS)))
        method, shaped = routes.get(path, ("GET", None))
        if draw(st.integers(0, 9)) >= 8:
            method = draw(st.sampled_from(METHODS))
        auth = draw(st.sampled_from([f"Bearer {key}"] * 6 + [None, "Bearer", "Bearer wrong", f"Basic {key}",
                                                              f"bearer  {key} ", "Bearer \u00e9\u00ff"]))
        headers = {"Content-Type": draw(st.sampled_from(["application/json"] * 4 + ["text/plain", "", "x/y; a=b"]))}
        if auth is not None:
            headers["Authorization"] = auth
        if draw(st.booleans()):
            name = draw(st.sampled_from(["X-Request-Id", "Accept", "Accept-Encoding", "X-Fuzz", "User-Agent"]))
            headers[name] = draw(st.from_regex(r"[!-~][ -~]{0,19}", fullmatch=True))  # what an HTTP client sends
        body = None
        if method not in ("GET", "HEAD", "OPTIONS") or draw(st.integers(0, 9)) == 0:
            kinds = ["shaped"] * 6 + ["json", "bytes", "deep"] if shaped is not None else ["json", "bytes", "deep"]
            kind = draw(st.sampled_from(kinds))
            if kind == "shaped":
                body = _encode(draw(shaped))
            elif kind == "json":
                body = _encode(draw(json_value))
            elif kind == "bytes":
                body = draw(st.binary(max_size=64))
            else:  # nesting far past the limit, inside an object, as the hostile body that once got a 500
                depth = draw(st.sampled_from([33, 1000, 100_000]))
                body = b'{"model": "' + model.encode() + b'", "prompt": ' + b"[" * depth + b"]" * depth + b"}"
        return HttpRequest(method, path, headers, body)

    return one()


def check_response(req: HttpRequest, status: int, headers: dict[str, str], content: bytes) -> None:
    """The edge's contract for one answer: 2xx or 4xx; a 4xx is an OpenAI error body (HEAD has none);
    a 2xx stream carries no error event."""
    where = f"{req.method} {req.path} {req.body[:200] if req.body else None!r} -> {status}: {content[:300]!r}"
    assert 200 <= status < 300 or 400 <= status < 500, where
    if status >= 400 and req.method != "HEAD":
        err = json.loads(content)["error"]
        assert set(err) == {"message", "type", "param", "code"}, where
        assert isinstance(err["message"], str) and err["message"] and err["type"] == "invalid_request_error", where
        assert err["param"] is None or isinstance(err["param"], str), where
        assert err["code"] is None or isinstance(err["code"], str), where
    if status < 300 and headers.get("content-type", "").startswith("text/event-stream"):
        assert b"server_error" not in content and content.endswith(b"data: [DONE]\n\n"), where
