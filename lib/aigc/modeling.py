"""Model-side pieces: the embedded tokenizer and tiny GPT-2, dropout, freezing, and AdamW parameter groups."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

EOS = "<|endoftext|>"

# Config attributes that hold dropout probabilities, by family: GPT-2 (resid/embd/attn_pdrop),
# Llama/Mistral/Qwen (attention_dropout), BERT-style (hidden_dropout_prob), OPT/BART (dropout).
DROPOUT_KEYS = (
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout",
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained locally (no hub), wrapped for transformers 5."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                            show_progress=False)  # its bars print blank lines into job logs
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )


def build_tiny_gpt2(arch: Any, vocab_size: int, n_positions: int, eos_token_id: int, seed: int = 0) -> Any:
    """A randomly initialised GPT-2 from a config: the embedded default base model."""
    cfg = GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_layer=arch.n_layer, n_embd=arch.n_embd,
        n_head=arch.n_head, bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def set_dropout(model: torch.nn.Module, p: float | None) -> list[str]:
    """Set the residual/attention/embedding dropout to `p`: in the config (so exports keep it) and in every
    `nn.Dropout` module (already built from the old config). Returns the config keys changed."""
    if p is None:
        return []
    keys = [k for k in DROPOUT_KEYS if isinstance(getattr(model.config, k, None), float | int)]
    for k in keys:
        setattr(model.config, k, p)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    return keys


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of decoder blocks: the ModuleList whose length is the config's layer count."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} transformer blocks of {type(model).__name__}")


def freeze_all_but_top(model: torch.nn.Module, top_n: int | None) -> tuple[int, int]:
    """Train only the top `top_n` blocks and the final norm; returns (trainable, total) parameter counts.

    The GPT-2 head is tied to the token embedding, so it stays frozen with the embeddings; an untied
    head (`lm_head` with its own weight) is trained with the top blocks.
    """
    total = sum(p.numel() for p in model.parameters())
    if top_n is None:
        return total, total
    blocks = transformer_blocks(model)
    if top_n > len(blocks):
        raise ValueError(f"model.train_top_n_blocks={top_n} but the model has only {len(blocks)} blocks")
    for p in model.parameters():
        p.requires_grad_(False)
    keep = list(blocks[len(blocks) - top_n:]) if top_n else []
    for name, module in model.named_modules():  # the final norm sits after the blocks
        if name.endswith(("ln_f", "norm", "final_layer_norm")) and not any(module is b for b in blocks):
            keep.append(module)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        keep.append(head)
    for module in keep:
        for p in module.parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decoupled decay on matrices only; biases, norms and 1-d params get none."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name or name.endswith(".bias") or ".ln_" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
