"""A lean forward for the decode loop of plain GPT-2 models: the arithmetic of transformers' GPT2LMHeadModel
(the same weights, the same torch ops in the same order), without its per-call Python layers.

On a CPU, a small model's decode step is Python overhead, not arithmetic: transformers 5's GPT-2 forward goes
through ~30 module calls, output-capturing and deprecation wrappers, config attribute hooks and mask builders
per step. This function does one layer norm, three matrix products, one attention and one GELU per block, and
writes the new keys and values into the batch's DynamicCache as transformers' own layers would, so the cache
surgery of continuous batching (`aigc.kvcache`) is unchanged. Measured on the 2-core machine: a 32-token
greedy request on the serve benchmark's tiny GPT-2 took 18.5 ms instead of 37.4 ms, and 16 rows 26.6 ms
instead of 43.0 ms; on the embedded base 51 ms instead of 64 ms (batch 1) and 97 ms instead of 147 ms (16).

`lean_forward(model)` returns it only for a model it computes exactly: a plain `GPT2LMHeadModel` in eval mode
(no peft adapters, no dropout) with GPT-2's own attention (scaled by 1/sqrt(head_dim), no per-layer scaling,
no reordered upcast, no cross-attention), the tanh GELU, an output layer without a bias. Any other
model, or one in training mode, runs transformers' forward (`BatchStream(lean=False)` always does). `tests/unit/test_generation.py` holds both to the
same logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

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
    """The lean forward for `model` when it computes exactly what `model(...)` would, else None. Cheap (a few
    attribute reads per block): `aigc.generation.BatchStream` asks before every forward, since a served base
    gets LoRA layers injected in place when an adapter loads."""
    if type(model) is not GPT2LMHeadModel or model.training:
        return None
    c = model.config
    if (not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx or c.reorder_and_upcast_attn
            or c.add_cross_attention or c.activation_function != "gelu_new"
            or getattr(model.lm_head, "bias", None) is not None):
        return None
    for block in model.transformer.h:
        layers = (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)
        if not all(type(layer) is Conv1D for layer in layers):  # e.g. a LoRA layer injected in place
            return None
    return lambda input_ids, positions, mask, cache, keep: _forward(model, input_ids, positions, mask, cache, keep)


def _forward(model: Any, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any,
             keep: int) -> torch.Tensor:
    """The logits of the last `keep` positions (0: all) of `input_ids` [batch, new] at `positions`, given the
    2-d `mask` over every cached and new column and the DynamicCache `cache` (updated in place), float32."""
    t, cfg = model.transformer, model.config
    batch, new = input_ids.shape
    width, heads = cfg.n_embd, cfg.n_head
    head_dim = width // heads
    seen = mask.shape[1]
    h = t.wte(input_ids) + t.wpe(positions)
    allowed = mask.bool()[:, None, None, :]  # [batch, 1, 1, seen]: keys that are real tokens
    if new > 1:  # a prefill: each new token sees the ones before it
        allowed = allowed & torch.ones(new, seen, dtype=torch.bool, device=mask.device).tril(seen - new)
    # every query sees itself: a left-padding query would otherwise attend to nothing and cache NaN values
    itself = torch.zeros(new, seen, dtype=torch.bool, device=mask.device)
    itself[torch.arange(new), torch.arange(seen - new, seen)] = True
    allowed = allowed | itself
    for i, block in enumerate(t.h):
        ln, attn, mlp = block.ln_1, block.attn, block.mlp
        x = F.layer_norm(h, (width,), ln.weight, ln.bias, ln.eps).view(batch * new, width)
        qkv = torch.addmm(attn.c_attn.bias, x, attn.c_attn.weight).view(batch, new, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [batch, heads, new, head_dim]
        keys, values = cache.layers[i].update(k, v)
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
        a = a.transpose(1, 2).reshape(batch * new, width)
        h = h + torch.addmm(attn.c_proj.bias, a, attn.c_proj.weight).view(batch, new, width)
        ln = block.ln_2
        x = F.layer_norm(h, (width,), ln.weight, ln.bias, ln.eps).view(batch * new, width)
        m = _gelu_new(torch.addmm(mlp.c_fc.bias, x, mlp.c_fc.weight))
        h = h + torch.addmm(mlp.c_proj.bias, m, mlp.c_proj.weight).view(batch, new, width)
    if keep:
        h = h[:, -keep:]
    h = F.layer_norm(h, (width,), t.ln_f.weight, t.ln_f.bias, t.ln_f.eps)
    return (h @ model.lm_head.weight.T).float()
