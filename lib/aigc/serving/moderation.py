"""The moderation hook on prompts and outputs: the built-in block list, or any object a `module:factory`
hook returns (`moderation.hook`), checked at the HTTP edge whatever engine generates."""

import importlib
from typing import Literal, Protocol

from aigc.serving.args import ModerationArgs


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
    """The block list, or the hook's factory called with `options` (imported in the replica)."""
    if m.hook is None:
        return BlockList(m.blocked_terms, m.case_sensitive)
    module, _, attr = m.hook.partition(":")
    return getattr(importlib.import_module(module), attr)(**m.options)
