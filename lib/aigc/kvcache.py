"""The decode batch's key/value cache and attention mask, and the surgery continuous batching needs on them.

Written against transformers 5.24 (pyproject pins ``transformers>=5.24,<6``), whose internals it leans on:
``DynamicCache(config=...)`` holds one ``DynamicLayer`` per transformer block in ``.layers``, each with
``.keys`` and ``.values`` tensors shaped [batch, heads, seq, head_dim]; ``batch_select_indices`` keeps
rows; and 5.24 renamed the forward's ``past_key_values`` argument to ``cache``. Joining two batches and
cutting shared left padding rewrite those tensors directly, which transformers offers no API for; a
layer of any other type (a sliding window, a quantised cache) is left alone (:meth:`KVCache.mergeable`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def cache_kwarg(model: Any) -> str:
    """The name of the model forward's cache argument."""
    # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns until 5.40)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class KVCache:
    """A batch's transformers cache plus its 2-d attention mask: row r of both is one sequence, and
    column c of the mask says whether cached position c of that row is a real token (1) or left padding.
    Written against transformers 5.24's DynamicCache (see the module docstring)."""

    def __init__(self, model: Any, mask: torch.Tensor):
        self.cache = DynamicCache(config=model.config)
        self.mask = mask
        self.kwarg = cache_kwarg(model)

    def __len__(self) -> int:
        return self.mask.shape[0]

    def inputs(self) -> dict[str, Any]:
        """The forward's keyword arguments for the mask and the cache."""
        return {"attention_mask": self.mask, self.kwarg: self.cache}

    def grow(self) -> None:
        """One more real column in every row: the token about to be decoded."""
        ones = torch.ones((len(self), 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)

    def mergeable(self) -> bool:
        """Whether every layer is a plain DynamicLayer, the only kind :meth:`extend` and the padding cut
        know how to rewrite."""
        layers = getattr(self.cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def extend(self, other: KVCache) -> None:
        """Append `other`'s rows below these: left-pad the shorter one (masked out), stack the batches."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        pad_self, pad_other = width - self.mask.shape[1], width - other.mask.shape[1]
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            # [batch, heads, seq, head_dim]: pad seq on the left
            mine.keys = torch.cat([F.pad(mine.keys, (0, 0, pad_self, 0)), F.pad(theirs.keys, (0, 0, pad_other, 0))])
            mine.values = torch.cat(
                [F.pad(mine.values, (0, 0, pad_self, 0)), F.pad(theirs.values, (0, 0, pad_other, 0))]
            )
        self.mask = torch.cat([F.pad(self.mask, (pad_self, 0)), F.pad(other.mask, (pad_other, 0))])

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (batch indices, in that order), then cut the leading columns that are padding
        in every remaining row, so long-gone rows stop costing attention."""
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]
        first = int(self.mask.any(dim=0).int().argmax())
        if first > 0 and self.mergeable():
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.mask = self.mask[:, first:]
