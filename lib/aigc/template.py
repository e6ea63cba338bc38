"""Chat templates: one rendering of a conversation for training and for serving.

A conversation is rendered with the tokenizer's own chat template (`tokenizer.apply_chat_template`); a base
without one (GPT-2, the embedded tiny model) gets :data:`DEFAULT_CHAT_TEMPLATE`, which the model directory then
carries (transformers 5 saves it as `chat_template.jinja` beside the tokenizer), so Serve renders prompts
exactly as training did. Training and serving both go through :func:`chat_segments`: training takes its
prompt and completion segments, serving the prompt segments that end in the generation prompt, and both
tokenise segment by segment with :func:`encode_segments`, so a served prompt is the same token ids as the
prompt part of a training example.

The default template, for `[{system: S}, {user: U}, {assistant: A}]`::

    System: S
    User: U
    Assistant:
    A<|endoftext|>

Plain-text role markers (not new special tokens: a byte-level BPE trained on ad copy has no embeddings for
those, and a hub GPT-2 has none either); each marker line ends in a newline, so the prompt/completion boundary
is also a pre-tokenizer boundary; each assistant turn ends with the EOS token, which is what stops generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")

DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- 'System: ' + message['content'] + '\\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'User: ' + message['content'] + '\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'Assistant:\\n' + message['content'] + eos_token -}}"
    "{%- else -%}{{- raise_exception('role must be system, user or assistant, got ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:\\n' -}}{%- endif -%}"
)


class TemplateError(ValueError):
    """The chat template cannot render a conversation, or renders it in a way training cannot split."""


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation; `train` marks an assistant turn (the part that carries loss)."""

    text: str
    train: bool


def ensure_chat_template(tokenizer: Any) -> bool:
    """Give a tokenizer without a chat template aigc's default; True when it was set."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the tokenizer has no chat template (aigc.template.ensure_chat_template sets the default)")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises many types, and templates raise their own
        raise TemplateError(f"the chat template fails to render: {type(e).__name__}: {e}") from None


def chat_segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[Segment]:
    """A conversation as alternating prompt and completion segments whose texts join to the full rendering.

    Each assistant turn i is the rendering of `messages[:i + 1]` minus the rendering of `messages[:i]` with the
    generation prompt; everything before it is prompt. When the conversation does not end with an assistant
    turn, the last segment is the prompt up to and including the generation prompt (what Serve sends).
    A template whose renderings are not prefixes of each other cannot be split and raises TemplateError.
    """
    segments: list[Segment] = []
    done = ""  # rendered so far

    def take(text: str, train: bool, what: str) -> None:
        nonlocal done
        if not text.startswith(done):
            raise TemplateError(f"the chat template is not prefix-stable: the rendering {what} does not start with "
                                "the rendering of the turns before it, so turns cannot be masked")
        if len(text) > len(done):
            segments.append(Segment(text[len(done):], train))
        done = text

    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            take(_render(tokenizer, messages[:i], add_generation_prompt=True), False, f"up to turn {i}")
            take(_render(tokenizer, messages[:i + 1], add_generation_prompt=False), True, f"of turn {i}")
    if not messages or messages[-1]["role"] != "assistant":
        take(_render(tokenizer, messages, add_generation_prompt=True), False, "with the generation prompt")
    return segments


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The text Serve sends to the model for a chat request: the conversation and the generation prompt.

    Equal to `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`, and, by construction, to
    the prompt part that training rendered before the same assistant turn.
    """
    return "".join(s.text for s in chat_segments(tokenizer, messages))


def encode_segments(tokenizer: Any, segments: list[Segment]) -> tuple[list[int], list[bool]]:
    """Token ids of the segments, each tokenised on its own (no special tokens added: the template writes
    them), and for every token whether it belongs to an assistant turn."""
    texts = [s.text for s in segments]
    ids_per = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    ids: list[int] = []
    train: list[bool] = []
    for seg, seg_ids in zip(segments, ids_per, strict=True):
        ids.extend(seg_ids)
        train.extend([seg.train] * len(seg_ids))
    return ids, train


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The token ids Serve generates from for a chat request (the same tokenisation training used)."""
    return encode_segments(tokenizer, chat_segments(tokenizer, messages))[0]
