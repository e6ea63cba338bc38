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

The pieces: :mod:`aigc.sampling` (SamplingParams and the free :func:`~aigc.sampling.sample`),
:class:`Row` here (a row's text, stop strings and UTF-8), :mod:`aigc.kvcache` (the cache surgery, tied to
transformers' internals), :mod:`aigc.decode` (a plain GPT-2's forward without transformers' per-call Python:
the same logits), and :class:`BatchStream`, which only schedules.

Context limit: a prompt must fit in the model's positions with room for one new token
(``prompt_tokens <= max_positions - 1``); a row stops with ``finish_reason="length"`` when it reaches
``max_tokens`` or the model's last position, whichever comes first.
"""

from __future__ import annotations

import itertools
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from aigc.decode import lean_forward
from aigc.kvcache import KVCache
from aigc.sampling import SamplingParams, TokenLogprob, logprobs_of, sample


class GenerationError(ValueError):
    """A request that cannot be generated (empty or too-long prompt); `param` names the offending field."""

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(f"{param}: {message}")


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # sampled tokens, including a final EOS if the model produced one
    prompt_tokens: int
    finish_reason: str  # "stop" | "length" (or the reason given to BatchStream.finish)
    logprobs: list[TokenLogprob] | None = None  # one per token id, when params.logprobs is set
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (None for the first)


@dataclass
class Delta:
    """What one row produced in one step: text safe to show (no partial stop string, no broken UTF-8)."""

    row: int
    text: str
    finish_reason: str | None = None  # set on the row's last delta
    n_tokens: int = 0  # tokens the row has generated so far
    token_ids: list[int] | None = None  # all of them, on the row's last delta
    logprobs: list[TokenLogprob] | None = None  # with params.logprobs: the tokens' since the row's last delta
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with params.prompt_logprobs: on the first delta


def max_positions(model: Any) -> int:
    """The context length of a model or its config (GPT-2: n_positions; most others: max_position_embeddings)."""
    cfg = getattr(model, "config", model)
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


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token's own text (special tokens shown), as logprobs name tokens; one call to the Rust
    backend for all of them where there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.decode_batch([[i] for i in ids], skip_special_tokens=False)
    return [tokenizer.decode([i], skip_special_tokens=False) for i in ids]


def _decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """ids -> text; the Rust backend directly when that is what `tokenizer.decode` would do anyway
    (its Python wrapper costs ~30 us a call, more than the decode itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def _stop_holdback(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that could be the start of a stop string (not shown yet)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


@dataclass
class Row:
    """One request's decoding: its tokens, its text, and how much of that text is safe to show yet.

    :meth:`push` takes each sampled token and hands back the text that became safe: never part of a stop
    string (the text ends before the first one, even one that spans tokens) and never half a UTF-8
    character (a byte-level token can end mid-character; the decoder shows that as U+FFFD until the rest
    arrives)."""

    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    max_new: int  # max_tokens, or fewer when the model's positions run out first
    decode: Callable[[list[int]], str]  # token ids -> text
    eos: set[int] = field(default_factory=set)
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already handed out
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with params.logprobs, one per out_ids
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with params.prompt_logprobs, after the prefill
    shown_logprobs: int = 0  # entries of `logprobs` already handed out
    shown_prompt: bool = False  # prompt_logprobs handed out

    def delta(self, row: int, text: str, reason: str | None) -> Delta:
        """The row's delta: `text`, and what it has not handed out yet of its logprobs."""
        d = Delta(row, text, reason, len(self.out_ids), list(self.out_ids) if reason is not None else None)
        if self.params.logprobs is not None:
            d.logprobs, self.shown_logprobs = self.logprobs[self.shown_logprobs :], len(self.logprobs)
        if self.prompt_logprobs is not None and not self.shown_prompt:
            d.prompt_logprobs, self.shown_prompt = self.prompt_logprobs, True
        return d

    def push(self, tok: int) -> tuple[str, str | None] | None:
        """Add a sampled token: (new text to show, finish_reason once the row ends), or None when
        nothing new can be shown yet."""
        self.out_ids.append(tok)
        if tok in self.eos:
            return self.close(len(self.text), "stop")
        # Decoding the whole output each step keeps multi-byte characters and tokenizer-specific
        # spacing right; for outputs of a few hundred tokens it costs microseconds.
        self.text = self.decode(self.out_ids)
        stops = self.params.stop
        if stops:
            start = max(0, self.emitted - max(len(s) for s in stops) + 1)
            hits = [h for h in (self.text.find(s, start) for s in stops) if h >= 0]
            if hits:
                return self.close(min(hits), "stop")
        if len(self.out_ids) >= self.max_new:
            return self.close(len(self.text), "length")
        safe = len(self.text) - _stop_holdback(self.text, stops)
        while safe > self.emitted and self.text[safe - 1] == "\ufffd":  # an incomplete UTF-8 sequence
            safe -= 1
        if safe <= self.emitted:
            return None
        piece, self.emitted = self.text[self.emitted : safe], safe
        return piece, None

    def close(self, end: int, reason: str) -> tuple[str, str]:
        """End the row with its text cut at `end`: (the text not handed out yet, `reason`)."""
        self.text = self.text[:end]
        piece, self.emitted = self.text[self.emitted :], len(self.text)
        self.finish_reason = reason
        return piece, reason


class BatchStream:
    """A running decode batch: :meth:`step` decodes one token for every running row and starts the rows
    added since the last step; each step returns the :class:`Delta` of every row that changed.

    Rows can be added at any time (:meth:`add`, thread-safe): a new group is prefilled on its own, then
    joins the running batch by left-padding the shorter KV cache, so a server keeps one batch busy
    instead of waiting for a whole generation to end before admitting anyone (continuous batching).
    Finished rows leave the batch at once. Iterating (``for deltas in stream``) steps until every row
    is done. :meth:`finish` ends a row from outside (a client gone, a moderation hit).
    `last_logits` maps each row that got a token in the last step to its float32 logits (for tests).

    This class only schedules: sampling is :func:`aigc.sampling.sample`, a row's text is :class:`Row`,
    the cache surgery is :class:`aigc.kvcache.KVCache`, and a plain GPT-2's forward :mod:`aigc.decode`
    (`lean=False`: transformers' forward for every model).
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
        lean: bool = True,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.lean = lean  # a plain GPT-2 decodes through aigc.decode's forward (same logits, half the Python a step)
        self.device = next(model.parameters()).device
        self.ctx = max_positions(model)
        self.eos = eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos or {0})
        self.max_batch_size = max_batch_size
        self.keep_finished = keep_finished  # False in a long-running server: a finished row is forgotten
        self._decode_text = _decoder(tokenizer)
        self._lock = threading.Lock()  # add/finish may come from another thread than step
        self.rows: dict[int, Row] = {}
        self._ids = itertools.count()
        self._pending: list[int] = []  # added, not yet prefilled
        self._external: dict[int, str] = {}
        self.active: list[int] = []  # row id of each batch position
        self.last_logits: dict[int, torch.Tensor] = {}
        self._cache: KVCache | None = None
        self._pos = self._next = None  # per batch position: its last position id, its next input token
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
            rows.append(Row(ids, p, gen, min(p.max_tokens, room), self._decode_text, self.eos))
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
            Completion(r.text, list(r.out_ids), len(r.prompt_ids), r.finish_reason or "length",
                       r.logprobs if r.params.logprobs is not None else None, r.prompt_logprobs)
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
            if self.active and not self._cache.mergeable():
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
        return r.delta(i, "", reason)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, keep: int = 1) -> torch.Tensor:
        """The logits of the last `keep` positions (0: all of them), float32."""
        # asked at every forward: a served base gets LoRA layers injected when an adapter loads (aigc.serving.engine)
        forward = lean_forward(self.model) if self.lean else None
        if forward is not None:
            return forward(input_ids, positions, cache.mask, cache.cache, keep)
        out = self.model(
            input_ids=input_ids, position_ids=positions, use_cache=True, logits_to_keep=keep, **cache.inputs()
        )
        return out.logits.float()

    def _prefill(self, rows: list[int]) -> tuple[tuple[KVCache, torch.Tensor], torch.Tensor]:
        ids = [self.rows[i].prompt_ids for i in rows]
        width = max(len(x) for x in ids)
        # left padding: [pad pad t0 t1 t2] so every row's last token is in the last column
        input_ids = torch.tensor([[self.pad_id] * (width - len(x)) + x for x in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # pads sit at 0; real tokens count from 0
        cache = KVCache(self.model, mask)
        scoring = [k for k, i in enumerate(rows) if self.rows[i].params.prompt_logprobs is not None]
        # every position's logits only when a row scores its prompt ([rows, width, vocab] instead of [rows, 1, vocab])
        logits = self._forward(input_ids, positions, cache, keep=0 if scoring else 1)
        for k in scoring:
            r = self.rows[rows[k]]
            n = len(r.prompt_ids)
            # column c predicts the token in column c + 1; the row's tokens fill the last n columns
            prompt = logits[k, width - n : width - 1]
            r.prompt_logprobs = [None, *logprobs_of(prompt, r.prompt_ids[1:], [r.params.prompt_logprobs] * (n - 1))]
        return (cache, positions[:, -1]), logits[:, -1]

    def _decode(self) -> torch.Tensor:
        self._cache.grow()
        self._pos = self._pos + 1
        return self._forward(self._next[:, None], self._pos[:, None], self._cache)[:, -1]

    def _join(self, group: tuple[KVCache, torch.Tensor], rows: list[int]) -> None:
        """Append a prefilled group to the running batch."""
        cache, pos = group
        # a row that ended at the prefill (max_tokens 0) has no token; it leaves at the next _keep
        nxt = torch.tensor([(self.rows[i].out_ids or [self.pad_id])[-1] for i in rows], device=self.device)
        if not self.active:
            self._cache, self._pos, self._next, self.active = cache, pos, nxt, list(rows)
            return
        self._cache.extend(cache)
        self._pos = torch.cat([self._pos, pos])
        self._next = torch.cat([self._next, nxt])
        self.active = self.active + list(rows)

    def _keep(self, rows: list[int]) -> None:
        """Shrink the batch to `rows`, dropping finished ones from the tensors and the KV cache."""
        if rows == self.active:
            return
        if not rows:
            self.active, self._cache, self._pos, self._next = [], None, None, None
            return
        where = {i: k for k, i in enumerate(self.active)}
        sel = torch.tensor([where[i] for i in rows], device=self.device)
        self._cache.select(sel)
        self._pos, self._next = self._pos[sel], self._next[sel]
        self.active = rows

    def _advance(self, rows: list[int], logits: torch.Tensor) -> list[Delta]:
        for i, row_logits in zip(rows, logits, strict=True):
            self.last_logits[i] = row_logits
        picked = [self.rows[i] for i in rows]
        tokens = sample(logits, [r.params for r in picked], [r.generator for r in picked], [r.out_ids for r in picked])
        if rows is self.active or rows == self.active:
            self._next = torch.tensor(tokens, device=self.device)
        scored = [k for k, r in enumerate(picked) if r.params.logprobs is not None and r.max_new > 0]
        if scored:
            lps = logprobs_of(logits[scored], [tokens[k] for k in scored], [picked[k].params.logprobs for k in scored])
            for k, lp in zip(scored, lps, strict=True):
                picked[k].logprobs.append(lp)
        return [d for d in (self._push(i, t) for i, t in zip(rows, tokens, strict=True)) if d is not None]

    def _push(self, i: int, tok: int) -> Delta | None:
        r = self.rows[i]
        if r.max_new == 0:  # max_tokens 0: the prompt was only scored; the sampled token is not kept
            return r.delta(i, *r.close(0, "length"))
        out = r.push(tok)
        if out is None:
            return None
        return r.delta(i, *out)


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
