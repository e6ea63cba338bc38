"""Per-request sampling: the parameters (validated here and nowhere else) and :func:`sample`, the free
function that turns a batch's last-position logits into next tokens, one row by its own parameters;
:func:`apply_penalties` (presence and frequency, as OpenAI defines them) and :func:`logprobs_of`, the log
probabilities a request asked for.

Greedy rows (temperature 0) take the argmax. Every other row draws by inverse-CDF sampling with one
uniform from its own `torch.Generator`, so a seeded row gets the same token whatever else shares its
batch: which CDF a row samples from depends on its own parameters only (vocabulary order for plain
temperature sampling, sorted order when top-k / top-p filter), and only rows that filter pay the sort.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field, ValidationInfo, field_validator

from aigc.config import Strict

MAX_STOP = 4  # as in the OpenAI API
MAX_LOGPROBS = 20  # top alternatives per token: OpenAI's chat allows 20 (its legacy completions 5)


class SamplingParams(Strict):
    """Per-request sampling; every field is checked here and nowhere else (the HTTP edge reuses it)."""

    temperature: float = Field(1.0, ge=0.0, description="softmax temperature; 0 = greedy (argmax)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus: keep the smallest top set with this mass")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0 = off")
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="subtracted from a token's logit once it has been generated (OpenAI's range)"
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="subtracted from a token's logit once per time it has been generated"
    )
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS,
        description="log probability of each generated token plus this many top alternatives; None = none",
    )
    prompt_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS,
        description="log probability of each prompt token after the first, plus this many top alternatives",
    )
    max_tokens: int = Field(
        16, ge=0, description="new tokens at most (also capped by the model's positions); 0 only to score the prompt"
    )
    stop: list[str] = Field(
        default_factory=list, max_length=MAX_STOP, description="stop strings; the text ends before the first one"
    )
    seed: int | None = Field(None, ge=0, lt=2**63, description="seed of this row's generator; None = random")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v: Any) -> Any:
        # OpenAI accepts a single string or a list; null means none
        return [] if v is None else [v] if isinstance(v, str) else v

    @field_validator("max_tokens")
    @classmethod
    def _something_to_do(cls, v: int, info: ValidationInfo) -> int:
        if v == 0 and info.data.get("prompt_logprobs") is None:  # prompt_logprobs is declared (so checked) first
            raise ValueError("must be at least 1 unless prompt_logprobs is set (scoring the prompt only)")
        return v

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

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log probability under the model (raw logits: before penalties, temperature and top-k/p,
    as vLLM reports them and as scoring a text needs), and the `top` alternatives, most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def apply_penalties(
    logits: torch.Tensor, params: Sequence[SamplingParams], outputs: Sequence[Sequence[int]]
) -> torch.Tensor:
    """`logits` with each row's penalties applied for the tokens it has generated so far (`outputs`), as
    OpenAI defines them: ``logit[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0)``.
    The prompt's tokens do not count. Returns `logits` itself when no row is penalised."""
    rows = [j for j, p in enumerate(params) if p.penalised and len(outputs[j])]
    if not rows:
        return logits
    logits = logits.clone()
    for j in rows:
        counts = torch.bincount(torch.tensor(outputs[j], device=logits.device), minlength=logits.shape[-1])
        counts = counts[: logits.shape[-1]].to(logits.dtype)
        logits[j] -= params[j].frequency_penalty * counts + params[j].presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def logprobs_of(logits: torch.Tensor, tokens: Sequence[int], top: Sequence[int]) -> list[TokenLogprob]:
    """Row j's log probability of `tokens[j]` under `logits[j]` (raw: a log-softmax of the model's logits)
    and its `top[j]` most likely alternatives."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    k = max(top, default=0)
    best_lp, best_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    best_lp, best_ids = best_lp.tolist(), best_ids.tolist()
    return [TokenLogprob(int(t), chosen[j], tuple(zip(best_ids[j][: top[j]], best_lp[j][: top[j]], strict=True)))
            for j, t in enumerate(tokens)]


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    outputs: Sequence[Sequence[int]] | None = None,
) -> list[int]:
    """The next token of each row of `logits` ([rows, vocab]) under that row's `params`, drawing from that
    row's generator (a greedy row draws nothing, so its generator is left as it was). `outputs` (each row's
    generated tokens so far) feed the presence and frequency penalties, which apply to greedy rows too."""
    if not len(params) == len(generators) == logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits, {len(params)} params, {len(generators)} generators")
    if outputs is not None:
        logits = apply_penalties(logits, params, outputs)
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
