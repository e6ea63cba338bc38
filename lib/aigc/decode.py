"""A lean forward for the decode loop of plain GPT-2 models: the arithmetic of transformers' GPT2LMHeadModel
(the same weights, the same torch ops in the same order), without its per-call Python layers.

On a CPU, a small model's decode step is Python overhead, not arithmetic: transformers 5's GPT-2 forward goes
through ~30 module calls, output-capturing and deprecation wrappers, config attribute hooks and mask builders
per step. This function does one layer norm, three matrix products, one attention and one GELU per block, and
writes the new keys and values into the batch's DynamicCache as transformers' own layers would, so the cache
surgery of continuous batching (`aigc.kvcache`) is unchanged. Measured on the 2-core machine: a 32-token
greedy request on the serve benchmark's tiny GPT-2 took 18.5 ms instead of 37.4 ms, and 16 rows 26.6 ms
instead of 43.0 ms; on the embedded base 51 ms instead of 64 ms (batch 1) and 97 ms instead of 147 ms (16).
Reading the weights and the verdict once per model instead of at every step (~80 module attribute reads and ~8
config reads a step on that tiny model) then took its 32-token request from 17.4 to 13.1 ms (batch 16: 26.9 to
23.5 ms).

`lean_forward(model)` returns it only for a model it computes exactly: a plain `GPT2LMHeadModel` in eval mode
(no peft adapters, no dropout) with GPT-2's own attention (scaled by 1/sqrt(head_dim), no per-layer scaling,
no reordered upcast, no cross-attention), the tanh GELU, an output layer without a bias. Any other
model, or one in training mode, runs transformers' forward (`BatchStream(lean=False)` always does). `tests/unit/test_generation.py` holds both to the
same logits.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any, int], torch.Tensor]

_GELU_C = math.sqrt(2.0 / math.pi)


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    """transformers' NewGELUActivation, term for term (so the logits match to the bit)."""
    return 0.5 * x * (1.0 + torch.tanh(_GELU_C * (x + 0.044715 * torch.pow(x, 3.0))))


def lean_forward(model: Any) -> Forward | None:
    """The lean forward for `model` when it computes exactly what `model(...)` would, else None. Cheap enough
    for every step: `aigc.generation.BatchStream` asks before every forward, since a served base gets LoRA layers
    injected in place when an adapter loads. The verdict and the weights it reads are kept per model and reused
    while the model's layers are the same objects (a few dict reads a block); the config is read once per model."""
    if type(model) is not GPT2LMHeadModel or model.training:
        return None
    layers = _layers(model)
    cached = _PLANS.get(model)
    if cached is None or len(cached[0]) != len(layers) or any(a is not b for a, b in zip(cached[0], layers, strict=True)):
        cached = _PLANS[model] = (layers, _plan(model))
    return cached[1]


# per model: (its layers when planned, its lean forward or None); weak, so a dropped model takes its plan with it
_PLANS: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], Forward | None]] = weakref.WeakKeyDictionary()


def _layers(model: Any) -> tuple[Any, ...]:
    """The modules whose type decides the verdict, read through `_modules` (nn.Module's attribute fallback costs
    ~0.5 us a read, ~80 reads a step on a 2-layer model)."""
    out = [model._modules["lm_head"]]
    for block in model._modules["transformer"]._modules["h"]._modules.values():
        attn, mlp = block._modules["attn"]._modules, block._modules["mlp"]._modules
        out += (attn["c_attn"], attn["c_proj"], mlp["c_fc"], mlp["c_proj"])
    return tuple(out)


def _plan(model: Any) -> Forward | None:
    """The lean forward over `model`'s weights (Parameter objects: in-place updates and `.to()` show through),
    or None for a model it does not compute exactly."""
    c = model.config
    if (not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx or c.reorder_and_upcast_attn
            or c.add_cross_attention or c.activation_function != "gelu_new"
            or getattr(model.lm_head, "bias", None) is not None):
        return None
    t = model.transformer
    blocks = []
    for block in t.h:
        attn, mlp, ln1, ln2 = block.attn, block.mlp, block.ln_1, block.ln_2
        if not all(type(layer) is Conv1D for layer in (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)):
            return None  # e.g. a LoRA layer injected in place
        blocks.append((ln1.weight, ln1.bias, ln1.eps, attn.c_attn.weight, attn.c_attn.bias, attn.c_proj.weight,
                       attn.c_proj.bias, ln2.weight, ln2.bias, ln2.eps, mlp.c_fc.weight, mlp.c_fc.bias,
                       mlp.c_proj.weight, mlp.c_proj.bias))
    w = _Weights(t.wte.weight, t.wpe.weight, tuple(blocks), (t.ln_f.weight, t.ln_f.bias, t.ln_f.eps),
                 model.lm_head.weight, c.n_embd, c.n_head)
    return lambda input_ids, positions, mask, cache, keep: _forward(w, input_ids, positions, mask, cache, keep)


class _Weights(NamedTuple):
    wte: torch.Tensor
    wpe: torch.Tensor
    blocks: tuple[tuple[Any, ...], ...]  # per block: ln_1 (w, b, eps), c_attn (w, b), c_proj (w, b), ln_2, c_fc, c_proj
    ln_f: tuple[torch.Tensor, torch.Tensor, float]
    lm_head: torch.Tensor
    width: int
    heads: int


def _forward(w: _Weights, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any,
             keep: int) -> torch.Tensor:
    """The logits of the last `keep` positions (0: all) of `input_ids` [batch, new] at `positions`, given the
    2-d `mask` over every cached and new column and the DynamicCache `cache` (updated in place), float32."""
    batch, new = input_ids.shape
    width, heads = w.width, w.heads
    head_dim = width // heads
    seen = mask.shape[1]
    h = F.embedding(input_ids, w.wte) + F.embedding(positions, w.wpe)
    allowed = mask.bool()[:, None, None, :]  # [batch, 1, 1, seen]: keys that are real tokens
    if new > 1:  # a prefill: each new token sees the ones before it
        allowed = allowed & torch.ones(new, seen, dtype=torch.bool, device=mask.device).tril(seen - new)
    # every query sees itself: a left-padding query would otherwise attend to nothing and cache NaN values
    itself = torch.zeros(new, seen, dtype=torch.bool, device=mask.device)
    itself[torch.arange(new), torch.arange(seen - new, seen)] = True
    allowed = allowed | itself
    layers = cache.layers
    for i, (l1w, l1b, l1e, aw, ab, pw, pb, l2w, l2b, l2e, fw, fb, mw, mb) in enumerate(w.blocks):
        x = F.layer_norm(h, (width,), l1w, l1b, l1e).view(batch * new, width)
        qkv = torch.addmm(ab, x, aw).view(batch, new, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [batch, heads, new, head_dim]
        keys, values = layers[i].update(k, v)
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
        a = a.transpose(1, 2).reshape(batch * new, width)
        h = h + torch.addmm(pb, a, pw).view(batch, new, width)
        x = F.layer_norm(h, (width,), l2w, l2b, l2e).view(batch * new, width)
        m = _gelu_new(torch.addmm(fb, x, fw))
        h = h + torch.addmm(mb, m, mw).view(batch, new, width)
    if keep:
        h = h[:, -keep:]
    h = F.layer_norm(h, (width,), *w.ln_f)
    return (h @ w.lm_head.T).float()
