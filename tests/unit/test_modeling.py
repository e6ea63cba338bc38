"""Freezing, dropout and AdamW parameter groups."""

import torch

from aigc.config import TinyArch
from aigc.modeling import build_tiny_gpt2, freeze_all_but_top, param_groups, set_dropout


def tiny(n_layer=3):
    return build_tiny_gpt2(TinyArch(n_layer=n_layer, n_embd=16, n_head=2, vocab_size=300), 300, 32, 0)


def test_freeze_top_blocks_only():
    m = tiny(3)
    trainable, total = freeze_all_but_top(m, 1)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("transformer.h.2.", "transformer.ln_f.")) for n in names)
    assert trainable == sum(p.numel() for p in m.parameters() if p.requires_grad) < total
    assert not m.transformer.wte.weight.requires_grad  # tied head stays with the embeddings


def test_no_freeze_trains_everything():
    m = tiny()
    assert freeze_all_but_top(m, None)[0] == sum(p.numel() for p in m.parameters())


def test_decay_only_on_matrices():
    m = tiny()
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])


def test_dropout_set_in_config_and_modules():
    m = tiny()
    keys = set_dropout(m, 0.25)
    assert {"resid_pdrop", "embd_pdrop", "attn_pdrop"} <= set(keys)
    assert all(mod.p == 0.25 for mod in m.modules() if isinstance(mod, torch.nn.Dropout))
    assert m.config.attn_pdrop == 0.25
