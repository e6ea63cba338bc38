"""The Serve app's edge without Ray: what imports stay light, API keys, parsing a completions or chat request
into SamplingParams and token ids (every bad field a 4xx that names it), and the answers' shapes."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from aigc.sampling import TokenLogprob
from aigc.serving import api
from aigc.serving.api import (
    ApiError,
    Result,
    accepted_keys,
    authorize,
    completion_logprobs,
    parse_chat,
    parse_completion,
    parse_json_body,
)
from aigc.serving.args import LimitsArgs, ServeArgs
from aigc.template import DEFAULT_CHAT_TEMPLATE, ensure_chat_template, prompt_ids, render_prompt
from conftest import save_random_adapter_dir

LIB = Path(__file__).parents[2] / "lib"
NAME, CTX = "tiny", 128  # the served id and the tiny model's positions (conftest's tiny_model_dir)
LIMITS = LimitsArgs(max_tokens=120, max_prompt_chars=2000)


def _imported_after(module: str) -> list[str]:
    """Which of ray, torch and fastapi a fresh interpreter holds after importing `module`."""
    code = (f"import json, sys, {module}; "
            "print(json.dumps(sorted(m for m in ('ray', 'torch', 'fastapi') if m in sys.modules)))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(LIB), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_config_and_serve_args_import_without_ray_torch_or_fastapi():
    # the cluster check and the pipeline's config read these before anything heavy may load
    assert _imported_after("aigc.config") == []
    assert _imported_after("aigc.serving.args") == []
    assert _imported_after("aigc.serving.api") == ["torch"]  # SamplingParams; still no Ray, no FastAPI


# ---------------------------------------------------------------------------------------------- keys


def test_no_keys_means_open():
    authorize({}, [])


def test_a_listed_bearer_key_passes():
    authorize({"authorization": "Bearer k2"}, ["k1", "k2"])
    authorize({"authorization": "bearer  k1 "}, ["k1", "k2"])  # scheme in any case, token trimmed


@pytest.mark.parametrize("headers, message", [
    ({}, "missing API key"),
    ({"authorization": "Basic k1"}, "missing API key"),
    ({"authorization": "Bearer"}, "missing API key"),
    ({"authorization": "Bearer nope"}, "incorrect API key"),
    ({"authorization": "Bearer k1k2"}, "incorrect API key"),
])
def test_a_missing_or_wrong_key_is_a_401(headers, message):
    with pytest.raises(ApiError) as e:
        authorize(headers, ["k1", "k2"])
    assert e.value.status == 401 and message in e.value.message and e.value.code == "invalid_api_key"
    assert e.value.headers() == {"WWW-Authenticate": "Bearer"}
    assert e.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("token", ["k1", "k3", "wrong"])
def test_every_key_is_compared_in_constant_time(monkeypatch, token):
    compared = []

    def compare_digest(a, b):
        compared.append(b)
        return a == b

    monkeypatch.setattr(api.hmac, "compare_digest", compare_digest)
    try:
        authorize({"authorization": f"Bearer {token}"}, ["k1", "k2", "k3"])
    except ApiError:
        pass
    # hmac's comparison for each key, and no early exit: timing tells neither which key nor how much matched
    assert compared == [b"k1", b"k2", b"k3"]


def test_keys_come_from_the_args_and_the_env_variable():
    args = ServeArgs(model_dir="m", api_keys=["a"], api_keys_env="KEYS")
    assert accepted_keys(args, {"KEYS": " b, ,c "}) == ["a", "b", "c"]
    assert accepted_keys(args, {}) == ["a"]
    assert accepted_keys(ServeArgs(model_dir="m", api_keys_env=None), {"AIGC_API_KEYS": "x"}) == []


# ------------------------------------------------------------------------------------------- parsing


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _parse(body, tok, limits=LIMITS):
    return parse_completion(body, limits, tok, model=NAME, context=CTX)


def test_a_good_request_becomes_sampling_params_and_token_ids(tok):
    p = _parse({"model": NAME, "prompt": "Save big", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9,
                "top_k": 4, "seed": 3, "stop": "!", "stream": True, "return_token_ids": True}, tok)
    assert (p.params.max_tokens, p.params.temperature, p.params.top_p, p.params.top_k, p.params.seed,
            p.params.stop) == (5, 0.5, 0.9, 4, 3, ["!"])
    assert p.prompts == ["Save big"] and p.prompt_ids == [tok.encode("Save big")]
    assert p.request.stream and p.request.return_token_ids
    many = _parse({"model": NAME, "prompt": ["Save", "Our new"]}, tok)
    assert many.prompt_ids == [tok.encode("Save"), tok.encode("Our new")]
    assert many.params.max_tokens == LIMITS.default_max_tokens  # OpenAI's default when none is given


BAD = [
    # (name, body, status, the field the error names)
    ("prompt of wrong type", {"model": NAME, "prompt": 5}, 400, "prompt"),
    ("temperature of wrong type", {"model": NAME, "prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ("max_tokens of wrong type", {"model": NAME, "prompt": "a", "max_tokens": 2.5}, 400, "max_tokens"),
    ("unknown model", {"model": "gpt-9", "prompt": "a"}, 404, "model"),
    ("missing model", {"prompt": "a"}, 400, "model"),
    ("missing prompt", {"model": NAME}, 400, "prompt"),
    ("negative temperature", {"model": NAME, "prompt": "a", "temperature": -0.5}, 400, "temperature"),
    ("top_p zero", {"model": NAME, "prompt": "a", "top_p": 0}, 400, "top_p"),
    ("top_p above one", {"model": NAME, "prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ("negative seed", {"model": NAME, "prompt": "a", "seed": -1}, 400, "seed"),
    ("max_tokens over the cap", {"model": NAME, "prompt": "a", "max_tokens": 121}, 400, "max_tokens"),
    ("five stop strings", {"model": NAME, "prompt": "a", "stop": list("abcde")}, 400, "stop"),
    ("empty prompt", {"model": NAME, "prompt": ""}, 400, "prompt"),
    ("blank prompt in a list", {"model": NAME, "prompt": ["a", "  "]}, 400, "prompt"),
    ("no prompts", {"model": NAME, "prompt": []}, 400, "prompt"),
    ("too many prompts", {"model": NAME, "prompt": ["a"] * 9}, 400, "prompt"),
    ("too many prompt tokens", {"model": NAME, "prompt": "the " * 300}, 400, "prompt"),
    ("too many prompt chars", {"model": NAME, "prompt": "x" * 2001}, 400, "prompt"),
    ("prompt + max_tokens over the context", {"model": NAME, "prompt": "the " * 100, "max_tokens": 64}, 400,
     "max_tokens"),
    ("unknown field", {"model": NAME, "prompt": "a", "temprature": 1}, 400, "temprature"),
    ("stream of wrong type", {"model": NAME, "prompt": "a", "stream": "yes"}, 400, "stream"),
    ("n over the limit", {"model": NAME, "prompt": "a", "n": 9}, 400, "n"),
    ("n zero", {"model": NAME, "prompt": "a", "n": 0}, 400, "n"),
    ("best_of below n", {"model": NAME, "prompt": "a", "n": 3, "best_of": 2}, 400, "best_of"),
    ("best_of over the limit", {"model": NAME, "prompt": "a", "best_of": 9}, 400, "best_of"),
    ("best_of with stream", {"model": NAME, "prompt": "a", "best_of": 2, "stream": True}, 400, "best_of"),
    ("logprobs over the limit", {"model": NAME, "prompt": "a", "logprobs": 6}, 400, "logprobs"),
    ("negative logprobs", {"model": NAME, "prompt": "a", "logprobs": -1}, 400, "logprobs"),
    ("echo with stream", {"model": NAME, "prompt": "a", "echo": True, "stream": True}, 400, "echo"),
    ("max_tokens 0 without echo", {"model": NAME, "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("penalty out of range", {"model": NAME, "prompt": "a", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("penalty of wrong type", {"model": NAME, "prompt": "a", "frequency_penalty": "x"}, 400, "frequency_penalty"),
    ("token id outside the vocabulary", {"model": NAME, "prompt": [5, 300]}, 400, "prompt"),
    ("negative token id", {"model": NAME, "prompt": [[5], [-1]]}, 400, "prompt"),
    ("empty token-id prompt", {"model": NAME, "prompt": [[5], []]}, 400, "prompt"),
    ("too many token ids", {"model": NAME, "prompt": [5] * 128}, 400, "prompt"),
    ("mixed ids and text", {"model": NAME, "prompt": [5, "a"]}, 400, "prompt"),
    ("unsupported logit_bias", {"model": NAME, "prompt": "a", "logit_bias": {"1": 2.0}}, 400, "logit_bias"),
    ("unsupported suffix", {"model": NAME, "prompt": "a", "suffix": "b"}, 400, "suffix"),
]


@pytest.mark.parametrize("body, limit", [
    ({"model": NAME, "prompt": "a", "n": 9}, "n: 9 exceeds this server's limit of 8"),
    ({"model": NAME, "prompt": "a", "logprobs": 6}, "logprobs: 6 exceeds this server's limit of 5"),
    ({"model": NAME, "prompt": [5, 300]}, "prompt: token id 300 is outside the vocabulary (0 to 299)"),
    ({"model": NAME, "prompt": [[5], [-1]]}, "prompt[1]: token id -1 is outside the vocabulary (0 to 299)"),
])
def test_limits_are_named_in_the_error(tok, body, limit):
    with pytest.raises(ApiError) as e:
        _parse(body, tok)
    assert e.value.message == limit


@pytest.mark.parametrize("name, body, status, field", BAD, ids=[b[0] for b in BAD])
def test_each_bad_field_is_a_4xx_that_names_it(tok, name, body, status, field):
    with pytest.raises(ApiError) as e:
        _parse(body, tok)
    assert (e.value.status, e.value.param) == (status, field), e.value.message
    assert e.value.message.startswith(field) and e.value.type == "invalid_request_error"
    assert e.value.body()["error"]["param"] == field and e.value.headers() is None


def test_the_prompt_limit_follows_the_context_and_a_lower_cap(tok):
    ids = tok.encode("the " * 20)
    assert _parse({"model": NAME, "prompt": "the " * 20, "max_tokens": 1}, tok).prompt_ids == [ids]
    capped = LimitsArgs(max_prompt_tokens=len(ids) - 1)
    with pytest.raises(ApiError) as e:
        _parse({"model": NAME, "prompt": "the " * 20, "max_tokens": 1}, tok, capped)
    assert e.value.param == "prompt" and f"exceeds the limit of {len(ids) - 1}" in e.value.message


def test_errors_never_echo_prompt_text(tok):
    secret = "zebra-quartz " * 200
    for body in ({"model": NAME, "prompt": secret}, {"model": NAME, "prompt": [secret, 5]},
                 {"model": "other", "prompt": secret}):
        with pytest.raises(ApiError) as e:
            _parse(body, tok)
        assert "zebra" not in e.value.message


@pytest.mark.parametrize("raw", [b'{"model": "tiny", "prompt": ', b"[1, 2]", b"\xff\xfe", b"null"])
def test_a_body_that_is_not_a_json_object_is_a_400_naming_body(raw):
    with pytest.raises(ApiError) as e:
        parse_json_body(raw)
    assert (e.value.status, e.value.param) == (400, "body") and e.value.message.startswith("body:")


@pytest.mark.parametrize("raw, problem", [
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested deeper than the limit of 32"),  # was a 500
    (b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}", "nested deeper than the limit of 32"),
    (b'{"a": ' + b'{"b": ' * 40 + b"1" + b"}" * 40 + b"}", "nested deeper than the limit of 32"),
    (b'{"prompt": "\\ud800"}', "valid Unicode"),  # a lone surrogate: no tokenizer or response encodes it
    (b'{"\\udfff": 1}', "valid Unicode"),
    (b'{"temperature": NaN}', "finite"),
    (b'{"temperature": 1e999}', "finite"),
    (b'{"seed": ' + b"1" * 5000 + b"}", "invalid JSON"),  # past Python's int-conversion limit
])
def test_hostile_json_is_a_400_naming_body(raw, problem):
    with pytest.raises(ApiError) as e:
        parse_json_body(raw)
    assert (e.value.status, e.value.param) == (400, "body") and problem in e.value.message


def test_the_depth_limit_counts_containers():
    ok = b'{"a": ' + b"[" * 31 + b"]" * 31 + b"}"  # the object plus 31 lists: 32 levels
    assert list(parse_json_body(ok)) == ["a"]
    with pytest.raises(ApiError):
        parse_json_body(b'{"a": ' + b"[" * 32 + b"]" * 32 + b"}")
    assert parse_json_body(b'{"a": [[[1]]]}', max_depth=4) == {"a": [[[1]]]}
    assert parse_json_body(b'{"p": "\\ud83d\\ude00"}') == {"p": "\U0001F600"}  # a surrogate pair is one character


def test_a_json_object_body_parses():
    assert parse_json_body(b'{"model": "tiny", "prompt": "a"}') == {"model": "tiny", "prompt": "a"}


# ---------------------------------------------------------------------------------------------- chat

CHAT = [{"role": "system", "content": "Write short ads."}, {"role": "user", "content": "Running shoes"},
        {"role": "assistant", "content": "Run further."}, {"role": "user", "content": "Now for socks"}]


@pytest.fixture(scope="module")
def chat_tok(tiny_model_dir):
    """The tiny model's tokenizer as the replica holds it: no template saved, so aigc's default applies."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert ensure_chat_template(tok) and tok.chat_template == DEFAULT_CHAT_TEMPLATE
    return tok


def _chat(body, tok, limits=LIMITS):
    return parse_chat({"model": NAME, **body}, limits, tok, model=NAME, context=CTX)


def test_a_chat_request_becomes_the_prompt_training_renders(chat_tok):
    p = _chat({"messages": CHAT, "max_tokens": 5, "temperature": 0.5, "top_k": 4, "seed": 3, "stop": ["!"],
               "stream": True, "stream_options": {"include_usage": True}}, chat_tok)
    # the same text and the same token ids as the prompt part of a training example
    assert p.prompts == [render_prompt(chat_tok, CHAT)] and p.prompts[0].endswith("User: Now for socks\nAssistant:\n")
    assert p.prompt_ids == [prompt_ids(chat_tok, CHAT)]
    assert (p.params.max_tokens, p.params.temperature, p.params.top_k, p.params.seed, p.params.stop) == (5, 0.5, 4, 3, ["!"])
    assert p.request.stream and p.request.stream_options.include_usage
    one = _chat({"messages": [{"role": "user", "content": "Hi", "name": "ann"}]}, chat_tok)
    assert one.prompts == ["User: Hi\nAssistant:\n"] and one.params.max_tokens == LIMITS.default_max_tokens
    # harmless defaults OpenAI clients send are accepted
    assert _chat({"messages": CHAT[:2], "response_format": {"type": "text"}, "logprobs": False, "n": 1}, chat_tok)


USER = {"role": "user", "content": "a"}
BAD_CHAT = [
    # (name, body, status, the field the error names)
    ("missing messages", {}, 400, "messages"),
    ("messages not a list", {"messages": "hi"}, 400, "messages"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("a message not an object", {"messages": [USER, "hi"]}, 400, "messages[1]"),
    ("missing role", {"messages": [{"content": "a"}]}, 400, "messages[0].role"),
    ("unknown role", {"messages": [{"role": "system", "content": "a"}, USER, {"role": "tool", "content": "a"}]},
     400, "messages[2].role"),
    ("role of wrong type", {"messages": [{"role": 1, "content": "a"}]}, 400, "messages[0].role"),
    ("missing content", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("non-string content", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("content parts", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}, 400,
     "messages[0].content"),
    ("null content", {"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content"),
    ("unknown message field", {"messages": [{**USER, "tool_calls": []}]}, 400, "messages[0].tool_calls"),
    ("last turn assistant", {"messages": [USER, {"role": "assistant", "content": "b"}]}, 400, "messages[1].role"),
    ("last turn system", {"messages": [{"role": "system", "content": "b"}]}, 400, "messages[0].role"),
    ("blank last turn", {"messages": [{"role": "user", "content": " "}]}, 400, "messages[0].content"),
    ("too many prompt tokens", {"messages": [{"role": "user", "content": "the " * 300}]}, 400, "messages"),
    ("too many prompt chars", {"messages": [{"role": "user", "content": "x" * 2001}]}, 400, "messages"),
    ("prompt + max_tokens over the context", {"messages": [{"role": "user", "content": "the " * 100}],
                                              "max_tokens": 64}, 400, "max_tokens"),
    ("unknown model", {"model": "gpt-9", "messages": [USER]}, 404, "model"),
    ("negative temperature", {"messages": [USER], "temperature": -1}, 400, "temperature"),
    ("max_tokens over the cap", {"messages": [USER], "max_tokens": 121}, 400, "max_tokens"),
    ("unknown field", {"messages": [USER], "temprature": 1}, 400, "temprature"),
    ("n over the limit", {"messages": [USER], "n": 9}, 400, "n"),
    ("top_logprobs without logprobs", {"messages": [USER], "top_logprobs": 2}, 400, "top_logprobs"),
    ("top_logprobs over the limit", {"messages": [USER], "logprobs": True, "top_logprobs": 6}, 400, "top_logprobs"),
    ("max_tokens 0", {"messages": [USER], "max_tokens": 0}, 400, "max_tokens"),
    ("unsupported best_of", {"messages": [USER], "best_of": 2}, 400, "best_of"),
    ("unsupported tools", {"messages": [USER], "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "tools"),
    ("unsupported functions", {"messages": [USER], "functions": [{"name": "f"}]}, 400, "functions"),
    ("unsupported response_format", {"messages": [USER], "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ("penalty out of range", {"messages": [USER], "presence_penalty": -2.5}, 400, "presence_penalty"),
]


@pytest.mark.parametrize("name, body, status, field", BAD_CHAT, ids=[b[0] for b in BAD_CHAT])
def test_each_bad_chat_field_is_a_4xx_that_names_its_path(chat_tok, name, body, status, field):
    with pytest.raises(ApiError) as e:
        _chat(body, chat_tok)
    assert (e.value.status, e.value.param) == (status, field), e.value.message
    assert e.value.message.startswith(field) and e.value.type == "invalid_request_error"


def test_an_unknown_role_says_which_roles_there_are(chat_tok):
    with pytest.raises(ApiError) as e:
        _chat({"messages": [{"role": "developer", "content": "a"}, USER]}, chat_tok)
    assert e.value.message == "messages[0].role: must be one of system, user, assistant (got 'developer')"


def test_a_template_that_fails_to_render_is_a_400_naming_messages(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = "{{ raise_exception('turns must alternate') }}"
    with pytest.raises(ApiError) as e:
        _chat({"messages": [USER]}, tok)
    assert (e.value.status, e.value.param) == (400, "messages") and "turns must alternate" in e.value.message


def test_chat_errors_never_echo_message_text(chat_tok):
    secret = "zebra-quartz " * 200
    for messages in ([{"role": "user", "content": [secret]}], [{"role": "user", "content": secret}],
                     [{"role": "user", "content": "a", "name": 5, "extra": secret}]):
        with pytest.raises(ApiError) as e:
            _chat({"messages": messages}, chat_tok)
        assert "zebra" not in e.value.message


# ------------------------------------------------------------------------------------------ answers


def test_chat_answers_are_what_the_openai_client_parses(chat_tok):
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    p = _chat({"messages": CHAT, "return_token_ids": True}, chat_tok)
    head = p.head(NAME, "fp_x")
    done = Result(text="Warm feet.", finish_reason="stop", token_ids=[5, 6])
    whole = ChatCompletion.model_validate(p.response(head, [done], api.usage(9, 2)))
    assert head.id.startswith("chatcmpl-") and whole.object == "chat.completion" and whole.id == head.id
    assert (whole.choices[0].message.role, whole.choices[0].message.content) == ("assistant", "Warm feet.")
    assert whole.choices[0].finish_reason == "stop" and whole.usage.total_tokens == 11
    assert whole.model_extra["prompt_token_ids"] == p.prompt_ids[0]  # vLLM's place for them in chat
    assert whole.choices[0].model_extra["token_ids"] == [5, 6]
    # a stream: the role, the text in pieces (empty pieces skipped), the finish_reason, the usage
    raw = [*p.opening(head), *p.chunks(head, 0, "Warm", None, Result(), []), *p.chunks(head, 0, "", None, Result(), []),
           *p.chunks(head, 0, " feet.", "stop", done, []), p.usage_chunk(head, api.usage(9, 2))]
    chunks = [ChatCompletionChunk.model_validate(c) for c in raw]
    assert {c.id for c in chunks} == {head.id} and {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].model_extra["prompt_token_ids"]
    assert [c.choices[0].delta.content for c in chunks[1:3]] == ["Warm", " feet."]
    assert [c.choices[0].finish_reason for c in chunks[:4]] == [None, None, None, "stop"]
    assert chunks[3].choices[0].delta.content is None and chunks[4].choices == [] and chunks[4].usage.completion_tokens == 2


def test_completion_answers_keep_their_shape(tok):
    from openai.types import Completion

    p = _parse({"model": NAME, "prompt": ["Save", "Our"], "return_token_ids": True}, tok)
    head = p.head(NAME, "fp_x")
    results = [Result(text="a", finish_reason="stop", token_ids=[1]), Result(text="b", finish_reason="length", token_ids=[2])]
    whole = Completion.model_validate(p.response(head, results, api.usage(3, 2)))
    assert head.id.startswith("cmpl-") and whole.object == "text_completion"
    assert [c.text for c in whole.choices] == ["a", "b"] and whole.choices[1].finish_reason == "length"
    assert whole.choices[0].model_extra == {"prompt_token_ids": p.prompt_ids[0], "token_ids": [1]}
    assert p.opening(head) == []
    [chunk] = p.chunks(head, 1, "x", "stop", Result(token_ids=[2]), [])
    assert chunk["choices"] == [{"text": "x", "index": 1, "logprobs": None, "finish_reason": "stop", "token_ids": [2]}]


# ------------------------------------------------------------------ token ids, n, best_of, echo, logprobs


def test_token_id_prompts_pass_through_and_decode_for_moderation(tok):
    ids = tok.encode("Save big")
    one = _parse({"model": NAME, "prompt": ids}, tok)
    assert one.prompt_ids == [ids] and one.prompts == [tok.decode(ids)]
    many = _parse({"model": NAME, "prompt": [ids, [7]]}, tok)
    assert many.prompt_ids == [ids, [7]] and [s.prompt for s in many.sequences] == [0, 1]


def test_n_and_best_of_make_that_many_samples_per_prompt_with_distinct_seeds(tok):
    p = _parse({"model": NAME, "prompt": ["a", "b"], "n": 2, "best_of": 3, "seed": 2**63 - 2}, tok)
    assert [s.prompt for s in p.sequences] == [0, 0, 0, 1, 1, 1]
    # choice 0 keeps the request's seed (what n=1 gives); the others follow it, wrapping at 2**63
    assert [s.params.seed for s in p.sequences[:3]] == [2**63 - 2, 2**63 - 1, 0]
    assert p.params.logprobs == 0  # best_of ranks by logprobs even when the client asked none
    unseeded = _parse({"model": NAME, "prompt": "a", "n": 3}, tok)
    assert [s.params.seed for s in unseeded.sequences] == [None] * 3 and unseeded.params.logprobs is None


@pytest.mark.parametrize("body, logprobs, prompt_logprobs, max_tokens", [
    ({"logprobs": 1, "echo": True, "max_tokens": 1}, 1, 1, 1),  # lm-eval-harness's loglikelihood request
    ({"echo": True, "max_tokens": 0}, None, 0, 0),  # OpenAI's legacy "score the prompt"
    ({"logprobs": 3, "echo": True, "max_tokens": 0}, 3, 3, 0),
    ({"logprobs": 2}, 2, None, 16),
    ({"echo": True}, None, None, 16),  # echo alone only repeats the prompt text
])
def test_echo_and_logprobs_become_sampling_params(tok, body, logprobs, prompt_logprobs, max_tokens):
    p = _parse({"model": NAME, "prompt": [5, 6, 7], **body}, tok).params
    assert (p.logprobs, p.prompt_logprobs, p.max_tokens) == (logprobs, prompt_logprobs, max_tokens)


def test_chat_logprobs_and_n_become_sampling_params(chat_tok):
    p = _chat({"messages": [USER], "logprobs": True, "top_logprobs": 3, "n": 2}, chat_tok)
    assert p.params.logprobs == 3 and len(p.sequences) == 2
    assert _chat({"messages": [USER], "logprobs": True}, chat_tok).params.logprobs == 0
    assert _chat({"messages": [USER], "logprobs": False}, chat_tok).params.logprobs is None


def _lp(token, logprob, *top):
    return TokenLogprob(token, logprob, tuple(top))


def _texts(ids):
    return [f"<{i}>" for i in ids]  # each token's text: 3 characters for one-digit ids


def test_legacy_logprobs_name_tokens_and_offsets():
    entries = [None, _lp(5, -1.0, (5, -1.0), (6, -2.0)), _lp(7, -3.0, (6, -0.5))]
    out = completion_logprobs(_texts, entries, [4, 5, 7])
    assert out["tokens"] == ["<4>", "<5>", "<7>"] and out["token_logprobs"] == [None, -1.0, -3.0]
    # the alternatives and the chosen token (lm-eval-harness: greedy iff the chosen logprob is the max)
    assert out["top_logprobs"] == [None, {"<5>": -1.0, "<6>": -2.0}, {"<6>": -0.5, "<7>": -3.0}]
    assert out["text_offset"] == [0, 3, 6]
    assert completion_logprobs(_texts, entries[1:], [5, 7], start=10)["text_offset"] == [10, 13]


def test_best_of_answers_the_n_with_the_best_mean_logprob_and_echo_prepends_the_prompt(tok):
    from openai.types import Completion

    p = _parse({"model": NAME, "prompt": [[4, 5]], "best_of": 3, "n": 2, "echo": True, "logprobs": 1,
                "max_tokens": 2}, tok)
    p.token_text = _texts
    prompt = [None, _lp(5, -0.1, (5, -0.1))]
    results = [Result(text=t, finish_reason="length", n_tokens=2, token_ids=[8, 9], prompt_logprobs=prompt,
                      logprobs=[_lp(8, a, (8, a)), _lp(9, b, (9, b))])
               for t, a, b in (("x", -3.0, -3.0), ("y", -0.5, -1.0), ("z", -1.0, -1.0))]
    # the prompt's first token has no logprob: null, as OpenAI and vLLM answer (the openai client's type says
    # float, but the client builds responses without validating them)
    whole = p.response(p.head(NAME, "fp"), results, api.usage(2, 6))
    assert [c["text"] for c in whole["choices"]] == [p.prompts[0] + "y", p.prompts[0] + "z"]  # means -0.75, -1, -3
    assert [c["index"] for c in whole["choices"]] == [0, 1]
    lp = whole["choices"][0]["logprobs"]
    assert lp["tokens"] == ["<4>", "<5>", "<8>", "<9>"] and lp["token_logprobs"] == [None, -0.1, -0.5, -1.0]
    assert lp["top_logprobs"][0] is None and lp["text_offset"] == [0, 3, 6, 9]
    plain = _parse({"model": NAME, "prompt": "a", "logprobs": 1}, tok)
    plain.token_text = _texts
    whole = Completion.model_validate(plain.response(plain.head(NAME, "fp"), results[1:2], api.usage(1, 2)))
    assert whole.choices[0].text == "y" and whole.choices[0].logprobs.text_offset == [0, 3]


def test_chat_logprobs_have_openais_shape(chat_tok):
    from openai.types.chat import ChatCompletion

    p = _chat({"messages": [USER], "logprobs": True, "top_logprobs": 1}, chat_tok)
    p.token_text = _texts
    r = Result(text="ab", finish_reason="stop", token_ids=[1, 2], logprobs=[_lp(1, -0.2, (1, -0.2)), _lp(2, -1.5, (3, -0.3))])
    whole = ChatCompletion.model_validate(p.response(p.head(NAME, "fp"), [r], api.usage(1, 2)))
    content = whole.choices[0].logprobs.content
    assert [(c.token, c.logprob, c.bytes) for c in content] == [("<1>", -0.2, list(b"<1>")), ("<2>", -1.5, list(b"<2>"))]
    assert [[(t.token, t.logprob) for t in c.top_logprobs] for c in content] == [[("<1>", -0.2)], [("<3>", -0.3)]]


# ------------------------------------------------------------------------------------------ adapters


def test_adapter_model_ids_and_names():
    from aigc.serving.args import adapter_model_id, split_model_id

    assert adapter_model_id("tiny", "shoes") == "tiny:shoes"
    assert split_model_id("tiny:shoes", "tiny") == "shoes" and split_model_id("tiny", "tiny") is None
    with pytest.raises(KeyError):
        split_model_id("other:shoes", "tiny")
    e = api.model_not_found("tiny:nope", ["tiny", "tiny:shoes"], "nope")
    assert e.status == 404 and e.param == "model" and e.code == "model_not_found"
    assert e.message == "model: adapter 'nope' of 'tiny' does not exist; this server has 'tiny', 'tiny:shoes'"
    assert api.model_not_found("gpt", ["tiny"]).message == "model: 'gpt' does not exist; this server has 'tiny'"
    many = api.model_not_found("x", ["tiny", *(f"tiny:a{i}" for i in range(30))]).message
    assert "'tiny:a18' and 11 more (GET /v1/models lists them)" in many
    args = ServeArgs(model_dir="/m/base", model_name="a:b", adapters=["/x/shoes", "/y/shoes", "/z/bad name"])
    assert args.serves_adapters and not ServeArgs(model_dir="/m").serves_adapters
    assert args.problems() == [
        "model_name: 'a:b' holds ':', which separates base and adapter in a model id",
        "adapters[1]: name 'shoes' is also adapters[0]'s; adapters are named by their directory names, which must differ",
        "adapters[2]: directory name 'bad name' is not a usable adapter name (letters, digits, '.', '_', '-'; at most 128)",
    ]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    """Two adapters on the tiny base (one in a folder), and one on another base (the tiny one, embeddings doubled)."""
    import torch

    from aigc.modeldir import fingerprint, load_model, save_model_dir

    root = tmp_path_factory.mktemp("adapters")
    other = load_model(tiny_model_dir)
    with torch.no_grad():
        other.model.transformer.wte.weight.mul_(2)
    other_base = save_model_dir(other.model, other.tokenizer, root / "other-base", config={})
    return {"one": save_random_adapter_dir(tiny_model_dir, root / "one", 1),
            "two": save_random_adapter_dir(tiny_model_dir, root / "folder/two", 2),
            "folder": str(root / "folder"), "alien": save_random_adapter_dir(other_base, root / "alien", 3),
            "fps": (fingerprint(tiny_model_dir), fingerprint(other_base))}


def test_an_adapter_of_another_base_is_refused_before_serving_naming_both_fingerprints(tiny_model_dir, adapter_dirs):
    from aigc.config import ConfigError
    from aigc.serving.adapters import available, find
    from aigc.serving.app import build_app

    good = ServeArgs(model_dir=str(tiny_model_dir), adapters=[adapter_dirs["one"]], adapter_folder=adapter_dirs["folder"])
    assert available(good) == {"one": adapter_dirs["one"], "two": adapter_dirs["two"]}
    assert find(good, "two") == adapter_dirs["two"] and find(good, "nope") is None and find(good, "../one") is None
    build_app(good)  # no Ray needed to build it
    with pytest.raises(ConfigError) as e:
        build_app({"model_dir": str(tiny_model_dir), "adapters": [adapter_dirs["one"], adapter_dirs["alien"]]})
    [problem] = e.value.problems
    ours, theirs = adapter_dirs["fps"]
    assert problem.startswith(f"adapters[1]: {adapter_dirs['alien']}: adapter trained on base ")
    assert f"fingerprint {theirs[:16]}" in problem and f"has fingerprint {ours[:16]}" in problem


def engine_metrics() -> SimpleNamespace:
    """What an engine records into, without Ray: the gauges and the batch-size histogram, doing nothing."""
    gauge = SimpleNamespace(set=lambda *a, **k: None, observe=lambda *a, **k: None)
    return SimpleNamespace(queued=gauge, running=gauge, batch_size=gauge)


def test_a_json_answer_takes_its_deltas_at_the_end_and_a_stream_as_they_come(tiny_model_dir):
    """Two requests decode together: the streamed one receives each delta in the step that made it, the JSON one
    (eager=False) all of them after its last step, in one wake-up; both get what `generate` gives alone."""
    import asyncio

    from aigc.generation import SamplingParams, generate
    from aigc.modeldir import load_model
    from aigc.serving.args import BatchingArgs
    from aigc.serving.engine import BatchingEngine

    metrics = engine_metrics()
    lm = load_model(tiny_model_dir)
    greedy = SamplingParams(temperature=0, max_tokens=10)
    prompt = [5, 9, 30]
    [alone] = generate(lm.model, lm.tokenizer, [prompt], greedy)
    assert len(alone.token_ids) == 10

    async def run() -> dict[bool, list[tuple[int, str]]]:
        engine = BatchingEngine(lm.model, lm.tokenizer, BatchingArgs(), metrics)

        async def take(eager: bool) -> list[tuple[int, str]]:
            return [(engine._steps, d.text) async for d in engine.stream(prompt, greedy, eager)]

        streamed, answered = await asyncio.gather(take(True), take(False))
        return {True: streamed, False: answered}

    got = asyncio.run(run())
    for eager in (True, False):
        assert "".join(text for _, text in got[eager]) == alone.text
    steps = [step for step, _ in got[True]]
    assert steps == sorted(set(steps)) and len(steps) >= 2  # one wake-up per step with text
    assert {step for step, _ in got[False]} == {steps[-1]}  # all after the last step, at once


def test_adapter_host_switches_adapters_per_step_and_unloads(tiny_model_dir, adapter_dirs):
    """Requests for the base and two adapters decode at once on one model (steps interleaved), each exactly as
    its model alone answers; an unloaded adapter leaves the model and the rest keep answering."""
    import asyncio

    from aigc.generation import SamplingParams, generate
    from aigc.modeldir import load_model
    from aigc.serving.adapters import adapter_meta
    from aigc.serving.args import BatchingArgs
    from aigc.serving.engine import AdapterHost

    metrics = engine_metrics()
    greedy = SamplingParams(temperature=0, max_tokens=12)
    prompts = [[5, 9, 30], [7, 2]]

    def alone(path) -> list[list[int]]:
        lm = load_model(path)  # an adapter-only directory loads merged onto its base
        return [c.token_ids for c in generate(lm.model, lm.tokenizer, prompts, greedy)]

    want = {"base": alone(tiny_model_dir), "one": alone(adapter_dirs["one"]), "two": alone(adapter_dirs["two"])}
    assert want["one"] != want["base"] and want["two"] != want["one"]  # the adapters change the answers

    async def run() -> None:
        lm = load_model(tiny_model_dir)
        host = AdapterHost(lm.model, lm.tokenizer, BatchingArgs(max_batch_size=4), metrics, adapter_dirs["fps"][0])
        one, two = [await host.load(n, adapter_dirs[n], adapter_meta(adapter_dirs[n], host.base_fingerprint, "tiny"))
                    for n in ("one", "two")]

        async def tokens(engine, prompt):
            return [d async for d in engine.stream(prompt, greedy)][-1].token_ids

        engines = {"base": host.base, "one": one.engine, "two": two.engine}
        got = await asyncio.gather(*(tokens(e, p) for e in engines.values() for p in prompts))
        assert dict(zip(engines, [got[0:2], got[2:4], got[4:6]], strict=True)) == want
        one.__del__()  # what Serve's LRU calls; the adapter leaves once idle
        await asyncio.sleep(0.2)
        assert set(host.peft.peft_config) == {two.key} and list(host.loaded) == [two.key]
        assert [await tokens(host.base, p) for p in prompts] == want["base"]
        assert [await tokens(two.engine, p) for p in prompts] == want["two"]

    asyncio.run(run())


def test_the_ingress_dispatches_its_routes_below_any_prefix_and_answers_the_rest_as_openai_errors():
    import asyncio

    from starlette.requests import Request

    from aigc.serving.app import ROUTES, HttpIngress, openapi, route_path

    assert route_path({"path": "/aigc/v1/models", "root_path": "/aigc"}) == "/v1/models"
    assert route_path({"path": "/v1/models", "root_path": ""}) == "/v1/models"
    assert route_path({"path": "/aigc", "root_path": "/aigc"}) == "/"

    class Edge(HttpIngress):
        async def models(self, request):
            return "listed"

    def call(method: str, path: str):
        scope = {"type": "http", "method": method, "path": "/p" + path, "root_path": "/p", "headers": [],
                 "query_string": b""}
        return asyncio.run(Edge()(Request(scope)))

    assert call("GET", "/v1/models") == "listed" and call("HEAD", "/v1/models") == "listed"
    wrong = call("POST", "/v1/models")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET"
    assert json.loads(wrong.body)["error"]["message"] == "POST /v1/models: Method Not Allowed; use GET"
    missing = call("GET", "/v1/embeddings")
    assert missing.status_code == 404 and json.loads(missing.body)["error"]["code"] == "not_found"
    # the document the fuzz test draws from lists every route with its method, and the POST bodies' schemas
    doc = openapi()["paths"]
    assert {p: next(iter(ops)).upper() for p, ops in doc.items()} == {p: m for p, (m, _) in ROUTES.items()}
    assert "prompt" in doc["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]


def test_the_engine_choice_and_the_vllm_environment(tmp_path, monkeypatch):
    """`engine` and `vllm_python`: the replicas' Python set through Ray's runtime_env; combinations that cannot
    work refused before any Ray call, each naming its key; auto is aigc's engine on a CPU; vllm asked for where
    vLLM is not installed names the fix."""
    from aigc.config import ConfigError
    from aigc.serving.app import engine_kind
    from aigc.serving.args import deployment_options, parse_args

    base = {"model_dir": str(tmp_path / "m")}
    vllm = parse_args({**base, "engine": "vllm", "vllm_python": "/envs/vllm/bin/python",
                       "vllm_args": {"gpu_memory_utilization": 0.5}})
    opts = deployment_options(vllm)["ray_actor_options"]
    assert opts["runtime_env"] == {"py_executable": "/envs/vllm/bin/python"} and vllm.vllm_args["gpu_memory_utilization"] == 0.5
    assert "runtime_env" not in deployment_options(parse_args(base))["ray_actor_options"]
    assert parse_args({**base, "vllm_python": "/envs/vllm/bin/python"}).vllm_python == "/envs/vllm/bin/python"  # a path, not YAML
    for bad, key in [({"engine": "vllm", "adapters": [str(tmp_path / "a")]}, "engine: vllm serves one model per app"),
                     ({"engine": "aigc", "vllm_python": "/envs/vllm/bin/python"}, "vllm_python: set, but engine is 'aigc'"),
                     ({"engine": "tgi"}, "engine")]:
        with pytest.raises(ConfigError) as e:
            problems = parse_args({**base, **bad}).problems()
            if problems:
                raise ConfigError(problems, "serve args")
        assert any(p.startswith(key) for p in e.value.problems), e.value.problems
    assert engine_kind("auto", "cpu") == "aigc" and engine_kind("aigc", "cuda") == "aigc"
    with pytest.raises(RuntimeError, match="make vllm-env"):  # the training environment has no vLLM
        engine_kind("vllm", "cpu")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    # where vLLM is installed: auto takes it on a GPU, but not for adapters on one base (aigc's engine switches them)
    assert [engine_kind("auto", "cuda"), engine_kind("auto", "cuda", adapters=True), engine_kind("auto", "cpu"),
            engine_kind("vllm", "cpu")] == ["vllm", "aigc", "aigc", "vllm"]


def test_an_adapter_only_directory_is_served_merged_by_an_engine_that_loads_weights_itself(
        tiny_model_dir, adapter_dirs, tmp_path, monkeypatch):
    """`load_model(weights=False)` (vLLM's path) on an adapter-only directory gives a full model directory on this
    node that computes what the adapter on its base computes, built once, reused, rebuilt when damaged, and the
    adapter directory's metadata, so the replica answers with the adapter's fingerprint."""
    import torch

    from aigc import modeldir
    from aigc.modeldir import files_fingerprint, load_model

    monkeypatch.setattr(modeldir, "MODEL_CACHE", str(tmp_path / "cache"))
    adapter = load_model(adapter_dirs["one"])  # the adapter merged in memory, as aigc's engine serves it
    got = load_model(adapter_dirs["one"], weights=False)
    assert got.model is None and got.meta == adapter.meta and Path(got.path).parent == tmp_path / "cache"
    merged = load_model(got.path)  # a verified full model directory, naming where it came from
    assert "adapter" not in merged.meta and merged.meta["merged_from"]["base_fingerprint"] == adapter_dirs["fps"][0]
    assert merged.meta["merged_from"]["adapter"] == files_fingerprint(adapter.meta) != files_fingerprint(merged.meta)
    ids = torch.tensor([[5, 9, 30, 7, 2]])
    base = load_model(tiny_model_dir).model
    with torch.no_grad():
        want, out = adapter.model(ids).logits, merged.model(ids).logits
        assert torch.allclose(out, want, atol=1e-5) and not torch.allclose(base(ids).logits, want, atol=1e-2)
    weights = Path(got.path) / "model.safetensors"
    built = weights.stat().st_mtime_ns
    assert load_model(adapter_dirs["one"], weights=False).path == got.path and weights.stat().st_mtime_ns == built
    weights.write_bytes(b"damaged")  # fails verification: built again
    again = load_model(adapter_dirs["one"], weights=False)
    assert again.path == got.path and torch.allclose(load_model(again.path).model(ids).logits, want, atol=1e-5)


def test_the_model_cache_keeps_the_most_recently_used_copies(tiny_model_dir, adapter_dirs, tmp_path, monkeypatch):
    """Merged copies (one full model per adapter version served under vLLM) count against AIGC_MODEL_CACHE_KEEP like
    downloaded ones: with room for one, serving a second adapter removes the first's copy, and asking for the first
    again builds it again, whole."""
    import torch

    from aigc import modeldir
    from aigc.modeldir import load_model

    monkeypatch.setattr(modeldir, "MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("AIGC_MODEL_CACHE_KEEP", "1")
    one = load_model(adapter_dirs["one"], weights=False).path
    two = load_model(adapter_dirs["two"], weights=False).path
    assert one != two and not Path(one).exists() and sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        Path(two).name]
    again = load_model(adapter_dirs["one"], weights=False).path
    assert again == one and not Path(two).exists()
    ids = torch.tensor([[5, 9, 30, 7, 2]])
    with torch.no_grad():
        assert torch.allclose(load_model(again).model(ids).logits, load_model(adapter_dirs["one"]).model(ids).logits,
                              atol=1e-5)


def test_serve_refuses_a_port_something_already_listens_on_before_starting_ray(tiny_model_dir, monkeypatch, capsys):
    """Serve's proxy binds with SO_REUSEPORT: a second local `aigc serve` on a taken port would bind too and the kernel
    would split the connections between two apps. It answers 2, naming the port, and starts no Ray."""
    import socket

    import ray

    from aigc.serving import app

    monkeypatch.setattr(app, "cluster_address", lambda address: None)  # a Ray of its own, as with no cluster running

    def no_ray(*a, **k):
        raise AssertionError("ray.init was called")

    monkeypatch.setattr(ray, "init", no_ray)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert app.main(["--model", str(tiny_model_dir), "--port", str(port)]) == 2
        assert f"--port {port}: something already listens on 127.0.0.1:{port}" in capsys.readouterr().out
    assert app.port_taken("127.0.0.1", port) is None  # closed: free again
