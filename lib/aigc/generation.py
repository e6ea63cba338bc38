"""The one generation path: sampling parameters validated once, batched decoding with a KV cache.

The HTTP endpoint (`aigc.serving`), the demo and the evaluation all call :func:`generate` or
:func:`stream_generate`. One decode loop over the model's forward, not HF `generate`, because every
row of a batch carries its own temperature / top_p / top_k / max_tokens / stop strings and its own
`torch.Generator`: a request's tokens for a fixed seed are the same whatever else shares its batch.

Batch layout: prompts are left-padded so every row's next token sits in the last column; position
ids count only real tokens (so padding costs no positions), and the 2-d attention mask hides the pads.
A row that finishes leaves the batch (its KV-cache rows are dropped), so long rows don't pay for
short ones. :class:`BatchStream` also takes new rows while it runs (continuous batching, what the
server uses): a new group is prefilled on its own and joins the batch at the next step.

Context limit: a prompt must fit in the model's positions with room for one new token
(``prompt_tokens <= max_positions - 1``); a row stops with ``finish_reason="length"`` when it reaches
``max_tokens`` or the model's last position, whichever comes first.
"""

from __future__ import annotations

import inspect
import itertools
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from aigc.config import Strict

MAX_STOP = 4  # as in the OpenAI API


class GenerationError(ValueError):
    """A request that cannot be generated (empty or too-long prompt); `param` names the offending field."""

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(f"{param}: {message}")


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


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # sampled tokens, including a final EOS if the model produced one
    prompt_tokens: int
    finish_reason: str  # "stop" | "length" (or the reason given to BatchStream.finish)


@dataclass
class Delta:
    """What one row produced in one step: text safe to show (no partial stop string, no broken UTF-8)."""

    row: int
    text: str
    finish_reason: str | None = None  # set on the row's last delta
    n_tokens: int = 0  # tokens the row has generated so far
    token_ids: list[int] | None = None  # all of them, on the row's last delta


@dataclass
class _Row:
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    max_new: int  # max_tokens, or fewer when the model's positions run out first
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already handed out
    finish_reason: str | None = None


def max_positions(model: Any) -> int:
    """The model's context length (GPT-2: n_positions; most others: max_position_embeddings)."""
    cfg = model.config
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"{type(model).__name__}: cannot find the model's maximum positions in its config")


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


def encode(tokenizer: Any, prompt: str | Sequence[int]) -> list[int]:
    """Prompt text -> token ids, with the tokenizer's own special tokens (a BOS where the model wants
    one); token ids pass through, so a caller can tokenize once."""
    return list(prompt) if not isinstance(prompt, str) else tokenizer.encode(prompt)


def _decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """ids -> text; the Rust backend directly when that is what `tokenizer.decode` would do anyway
    (its Python wrapper costs ~30 us a call, more than the decode itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def _cache_kwarg(model: Any) -> str:
    # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns until 5.40)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _stop_holdback(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that could be the start of a stop string (not shown yet)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class BatchStream:
    """A running decode batch: :meth:`step` decodes one token for every running row and starts the rows
    added since the last step; each step returns the :class:`Delta` of every row that changed.

    Rows can be added at any time (:meth:`add`, thread-safe): a new group is prefilled on its own, then
    joins the running batch by left-padding the shorter KV cache, so a server keeps one batch busy
    instead of waiting for a whole generation to end before admitting anyone (continuous batching).
    Finished rows leave the batch at once. Iterating (``for deltas in stream``) steps until every row
    is done. :meth:`finish` ends a row from outside (a client gone, a moderation hit).
    `last_logits` maps each row that got a token in the last step to its float32 logits (for tests).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prompts: Sequence[str | Sequence[int]] = (),
        params: Sequence[SamplingParams] | SamplingParams = (),
        *,
        max_batch_size: int | None = None,
        keep_finished: bool = True,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.ctx = max_positions(model)
        self.eos = eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos or {0})
        self.max_batch_size = max_batch_size
        self.keep_finished = keep_finished  # False in a long-running server: a finished row is forgotten
        self._cache_kw = _cache_kwarg(model)
        self._decode_text = _decoder(tokenizer)
        self._lock = threading.Lock()  # add/finish may come from another thread than step
        self.rows: dict[int, _Row] = {}
        self._ids = itertools.count()
        self._pending: list[int] = []  # added, not yet prefilled
        self._external: dict[int, str] = {}
        self.active: list[int] = []  # row id of each batch position
        self.last_logits: dict[int, torch.Tensor] = {}
        self._cache: Any = None
        self._mask = self._pos = self._next = None
        if len(prompts) or (not isinstance(params, SamplingParams) and len(params)):
            self.add(prompts, params)

    # ----------------------------------------------------------------------------------------- public

    def add(self, prompts: Sequence[str | Sequence[int]], params: Sequence[SamplingParams] | SamplingParams) -> list[int]:
        """Queue prompts for the next step; returns their row ids. Raises GenerationError (and adds
        nothing) for an empty prompt or one that leaves no room for a new token."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        if not prompts:
            raise GenerationError("prompt", "at least one prompt is required")
        rows = []
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            ids = encode(self.tokenizer, prompt)
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if not ids:
                raise GenerationError(where, "must not be empty")
            if len(ids) > self.ctx - 1:
                raise GenerationError(
                    where, f"{len(ids)} tokens, but the model has {self.ctx} positions (at most {self.ctx - 1})"
                )
            room = self.ctx - len(ids)
            gen = torch.Generator(device="cpu")
            gen.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
            rows.append(_Row(ids, p, gen, min(p.max_tokens, room)))
        with self._lock:
            ids = [next(self._ids) for _ in rows]
            self.rows.update(zip(ids, rows, strict=True))
            self._pending.extend(ids)
        return ids

    def finish(self, row: int, reason: str) -> None:
        """End `row` before its next step with `reason` (e.g. "content_filter", "cancelled")."""
        with self._lock:
            r = self.rows.get(row)
            if r is not None and r.finish_reason is None:
                self._external[row] = reason

    def idle(self) -> bool:
        """Nothing running, nothing waiting, nothing to report."""
        with self._lock:
            return not (self.active or self._pending or self._external)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def completions(self) -> list[Completion]:
        """The rows in the order they were added (needs keep_finished=True)."""
        return [
            Completion(r.text, list(r.out_ids), len(r.prompt_ids), r.finish_reason or "length")
            for _, r in sorted(self.rows.items())
        ]

    def __iter__(self) -> Iterator[list[Delta]]:
        return self

    def __next__(self) -> list[Delta]:
        if self.idle():
            raise StopIteration
        return self.step()

    def step(self) -> list[Delta]:
        """Decode one token for the running rows and prefill (up to max_batch_size) waiting rows."""
        with self._lock:
            external, self._external = self._external, {}
            room = len(self._pending) if self.max_batch_size is None else self.max_batch_size - len(self.active)
            if self.active and not self._mergeable():
                room = 0  # a cache that cannot be padded and joined: new rows wait for the batch to drain
            start, self._pending = self._pending[: max(room, 0)], self._pending[max(room, 0) :]
        deltas = [self._end(i, reason) for i, reason in external.items() if self.rows[i].finish_reason is None]
        start = [i for i in start if self.rows[i].finish_reason is None]
        self.last_logits = {}
        with torch.inference_mode():
            running = [i for i in self.active if self.rows[i].finish_reason is None]
            if running:
                self._keep(running)
                logits = self._decode()
                deltas += self._advance(running, logits)
            if start:
                group, logits = self._prefill(start)
                deltas += self._advance(start, logits)
                self._join(group, start)
            self._keep([i for i in self.active if self.rows[i].finish_reason is None])
        if not self.keep_finished:
            for d in deltas:
                if d.finish_reason is not None:
                    self.rows.pop(d.row, None)
        return deltas

    # ---------------------------------------------------------------------------------------- private

    def _end(self, i: int, reason: str) -> Delta:
        r = self.rows[i]
        r.finish_reason = reason
        with self._lock:
            if i in self._pending:
                self._pending.remove(i)
        return Delta(i, "", reason, len(r.out_ids), list(r.out_ids))

    def _forward(self, input_ids, mask, positions, cache) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        return out.logits[:, -1, :].float()

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older signature without config
            return DynamicCache()

    def _prefill(self, rows: list[int]) -> tuple[tuple[Any, torch.Tensor, torch.Tensor], torch.Tensor]:
        ids = [self.rows[i].prompt_ids for i in rows]
        width = max(len(x) for x in ids)
        # left padding: [pad pad t0 t1 t2] so every row's last token is in the last column
        input_ids = torch.tensor([[self.pad_id] * (width - len(x)) + x for x in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # pads sit at 0; real tokens count from 0
        cache = self._new_cache()
        logits = self._forward(input_ids, mask, positions, cache)
        return (cache, mask, positions[:, -1]), logits

    def _decode(self) -> torch.Tensor:
        ones = torch.ones((len(self.active), 1), dtype=self._mask.dtype, device=self.device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        self._pos = self._pos + 1
        return self._forward(self._next[:, None], self._mask, self._pos[:, None], self._cache)

    def _mergeable(self) -> bool:
        from transformers.cache_utils import DynamicLayer

        layers = getattr(self._cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def _join(self, group: tuple[Any, torch.Tensor, torch.Tensor], rows: list[int]) -> None:
        """Append a prefilled group to the running batch: left-pad the shorter cache, concatenate rows."""
        cache, mask, pos = group
        nxt = torch.tensor([self.rows[i].out_ids[-1] for i in rows], device=self.device)
        if not self.active:
            self._cache, self._mask, self._pos, self._next, self.active = cache, mask, pos, nxt, list(rows)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        pad_old, pad_new = width - self._mask.shape[1], width - mask.shape[1]
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            # [batch, heads, seq, head_dim]: pad seq on the left (masked out), stack the batches
            old.keys = torch.cat([F.pad(old.keys, (0, 0, pad_old, 0)), F.pad(new.keys, (0, 0, pad_new, 0))])
            old.values = torch.cat([F.pad(old.values, (0, 0, pad_old, 0)), F.pad(new.values, (0, 0, pad_new, 0))])
        self._mask = torch.cat([F.pad(self._mask, (pad_old, 0)), F.pad(mask, (pad_new, 0))])
        self._pos = torch.cat([self._pos, pos])
        self._next = torch.cat([self._next, nxt])
        self.active = self.active + list(rows)

    def _keep(self, rows: list[int]) -> None:
        """Shrink the batch to `rows` (dropping finished ones from the tensors and the KV cache) and cut
        the leading columns that are padding in every remaining row."""
        if rows == self.active:
            return
        if not rows:
            self.active, self._cache, self._mask, self._pos, self._next = [], None, None, None, None
            return
        where = {i: k for k, i in enumerate(self.active)}
        sel = torch.tensor([where[i] for i in rows], device=self.device)
        self._cache.batch_select_indices(sel)
        self._mask, self._pos, self._next = self._mask[sel], self._pos[sel], self._next[sel]
        self.active = rows
        first = int(self._mask.any(dim=0).int().argmax())
        if first > 0 and self._mergeable():
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self._mask = self._mask[:, first:]

    def _sample(self, rows: list[int], logits: torch.Tensor) -> list[int]:
        """Per-row greedy / temperature (+ top-k, top-p) sampling, one uniform draw per sampled row."""
        params = [self.rows[i].params for i in rows]
        tokens = logits.argmax(dim=-1)
        # Which CDF a row samples from depends on its own parameters only (vocabulary order for plain
        # temperature sampling, sorted order when it filters), so a seed gives the same token whatever
        # else is in the batch; and the sort is paid only by rows that need it.
        plain = [j for j, p in enumerate(params) if p.temperature > 0 and not p.top_k and p.top_p >= 1.0]
        filtered = [j for j, p in enumerate(params) if p.temperature > 0 and (p.top_k or p.top_p < 1.0)]
        for group, sort in ((plain, False), (filtered, True)):
            if group:
                idx = torch.tensor(group, device=logits.device)
                tokens[idx] = self._draw([rows[j] for j in group], logits[idx], sort)
        return tokens.tolist()

    def _draw(self, rows: list[int], logits: torch.Tensor, sort: bool) -> torch.Tensor:
        params = [self.rows[i].params for i in rows]
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
        u = torch.cat([torch.rand(1, generator=self.rows[i].generator) for i in rows])
        pick = torch.searchsorted(cdf, (u.to(logits.device) * cdf[:, -1])[:, None], right=True).clamp(max=vocab - 1)
        return (order.gather(1, pick) if sort else pick).squeeze(1)

    def _advance(self, rows: list[int], logits: torch.Tensor) -> list[Delta]:
        for i, row_logits in zip(rows, logits, strict=True):
            self.last_logits[i] = row_logits
        tokens = self._sample(rows, logits)
        if rows is self.active or rows == self.active:
            self._next = torch.tensor(tokens, device=self.device)
        return [d for d in (self._push(i, t) for i, t in zip(rows, tokens, strict=True)) if d is not None]

    def _push(self, i: int, tok: int) -> Delta | None:
        r = self.rows[i]
        r.out_ids.append(tok)
        if tok in self.eos:
            return self._close(r, i, len(r.text), "stop")
        # Decoding the whole output each step keeps multi-byte characters and tokenizer-specific
        # spacing right; for outputs of a few hundred tokens it costs microseconds.
        r.text = self._decode_text(r.out_ids)
        stops = r.params.stop
        if stops:
            start = max(0, r.emitted - max(len(s) for s in stops) + 1)
            hits = [h for h in (r.text.find(s, start) for s in stops) if h >= 0]
            if hits:
                return self._close(r, i, min(hits), "stop")
        if len(r.out_ids) >= r.max_new:
            return self._close(r, i, len(r.text), "length")
        safe = len(r.text) - _stop_holdback(r.text, stops)
        while safe > r.emitted and r.text[safe - 1] == "\ufffd":  # an incomplete UTF-8 sequence
            safe -= 1
        if safe <= r.emitted:
            return None
        delta = Delta(i, r.text[r.emitted : safe], None, len(r.out_ids))
        r.emitted = safe
        return delta

    def _close(self, r: _Row, i: int, end: int, reason: str) -> Delta:
        r.text = r.text[:end]
        delta = Delta(i, r.text[r.emitted :], reason, len(r.out_ids), list(r.out_ids))
        r.emitted = len(r.text)
        r.finish_reason = reason
        return delta


def stream_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int]],
    params: Sequence[SamplingParams] | SamplingParams,
) -> BatchStream:
    """Decode `prompts` as one batch, step by step: ``for deltas in stream_generate(...): ...``.

    Each step yields a list of :class:`Delta` (row index, new text, finish_reason on the row's last
    delta). Raises :class:`GenerationError` up front for an empty prompt or one longer than the model's
    positions allow.
    """
    return BatchStream(model, tokenizer, prompts, params)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int]],
    params: Sequence[SamplingParams] | SamplingParams,
    on_step: Callable[[list[Delta]], None] | None = None,
) -> list[Completion]:
    """Complete every prompt (one batch); `params` is one SamplingParams for all or one per prompt."""
    stream = BatchStream(model, tokenizer, prompts, params)
    for deltas in stream:
        if on_step is not None:
            on_step(deltas)
    return stream.completions()
