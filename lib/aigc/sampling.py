"""Per-request sampling: the parameters (validated here and nowhere else) and :func:`sample`, the free
function that turns a batch's last-position logits into next tokens, one row by its own parameters.

Greedy rows (temperature 0) take the argmax. Every other row draws by inverse-CDF sampling with one
uniform from its own `torch.Generator`, so a seeded row gets the same token whatever else shares its
batch: which CDF a row samples from depends on its own parameters only (vocabulary order for plain
temperature sampling, sorted order when top-k / top-p filter), and only rows that filter pay the sort.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field, field_validator

from aigc.config import Strict

MAX_STOP = 4  # as in the OpenAI API


class SamplingParams(Strict):
    """Per-request sampling; every field is checked here and nowhere else (the HTTP edge reuses it)."""

    temperature: float = Field(1.0, ge=0.0, description="softmax temperature; 0 = greedy (argmax)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus: keep the smallest top set with this mass")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0 = off")
    max_tokens: int = Field(16, ge=1, description="new tokens at most (also capped by the model's positions)")
    stop: list[str] = Field(
        default_factory=list, max_length=MAX_STOP, description="stop strings; the text ends before the first one"
    )
    seed: int | None = Field(None, ge=0, lt=2**63, description="seed of this row's generator; None = random")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v: Any) -> Any:
        # OpenAI accepts a single string or a list; null means none
        return [] if v is None else [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filters(self) -> bool:
        """Whether top-k or top-p cut the distribution (then the row samples in sorted order)."""
        return bool(self.top_k) or self.top_p < 1.0


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> list[int]:
    """The next token of each row of `logits` ([rows, vocab]) under that row's `params`, drawing from that
    row's generator (a greedy row draws nothing, so its generator is left as it was)."""
    if not len(params) == len(generators) == logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits, {len(params)} params, {len(generators)} generators")
    tokens = logits.argmax(dim=-1)
    plain = [j for j, p in enumerate(params) if not p.greedy and not p.filters]
    filtered = [j for j, p in enumerate(params) if not p.greedy and p.filters]
    for group, sort in ((plain, False), (filtered, True)):
        if group:
            idx = torch.tensor(group, device=logits.device)
            tokens[idx] = _draw(logits[idx], [params[j] for j in group], [generators[j] for j in group], sort)
    return tokens.tolist()


def _draw(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator], sort: bool
) -> torch.Tensor:
    vocab = logits.shape[-1]
    temp = torch.tensor([p.temperature for p in params], device=logits.device)
    scaled = logits / temp[:, None]
    if sort:
        top_k = torch.tensor([p.top_k or vocab for p in params], device=logits.device)
        top_p = torch.tensor([p.top_p for p in params], device=logits.device)
        scaled, order = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)
        probs = scaled.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf")).softmax(dim=-1)
        # nucleus: drop a token when the mass before it already reaches top_p (the top token stays)
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p[:, None], 0.0)
    else:
        probs = scaled.softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    # inverse-CDF sampling with one uniform from the row's own generator: batch-independent
    u = torch.cat([torch.rand(1, generator=g) for g in generators])
    pick = torch.searchsorted(cdf, (u.to(logits.device) * cdf[:, -1])[:, None], right=True).clamp(max=vocab - 1)
    return (order.gather(1, pick) if sort else pick).squeeze(1)
