"""Evaluation: test-split perplexity over packed blocks, and nats per document against the grammar's entropy."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from aigc.data import model_inputs


@torch.no_grad()
def block_loss(model: Any, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """Token-weighted mean next-token loss over blocks or padded examples (labels -100 are ignored)."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for batch in batches:
        batch = model_inputs(batch, device)
        n = int((batch["labels"][:, 1:] != -100).sum())
        if n:
            total += float(model(**batch).loss.float()) * n
            count += n
    return total / max(count, 1), count


@torch.no_grad()
def document_nats(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 16) -> list[float]:
    """-log p(document) in nats under the model: EOS as context, then every token of the text and the
    closing EOS (the grammar's probability includes where a document ends)."""
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    max_len = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)
    out: list[float] = []
    for i in range(0, len(texts), batch_size):
        seqs = [[eos] + ids + [eos] for ids in tokenizer(texts[i:i + batch_size], add_special_tokens=False)["input_ids"]]
        too_long = [len(s) for s in seqs if len(s) > max_len]
        if too_long:
            raise ValueError(f"a document of {max(too_long)} tokens exceeds the model's {max_len} positions")
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), eos, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        tok_logp = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
        out.extend((-tok_logp.sum(dim=1)).tolist())
    return out


def evaluate_model(
    path: str,
    test_blocks: Any,
    docs: list[dict[str, Any]] | None = None,
    require_metadata: bool = True,
    batch_size: int = 8,
) -> dict[str, float]:
    """Test loss/perplexity of a model (loaded through the shared loader) and, when the documents carry
    their exact `nats` (the embedded corpus), the ratio model nats / true nats (1.0 is the floor)."""
    from aigc.modeldir import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    loaded = load_model(path, require_metadata=require_metadata)
    loss, tokens = block_loss(loaded.model, test_blocks.iter_torch_batches(batch_size=batch_size, dtypes=torch.long))
    result = {"test_loss": loss, "test_ppl": math.exp(min(loss, 50.0)), "test_tokens": tokens}
    if docs:
        nats = document_nats(loaded.model, loaded.tokenizer, [d["text"] for d in docs])
        true = sum(d["nats"] for d in docs)
        result.update(nats_per_doc=sum(nats) / len(docs), true_nats_per_doc=true / len(docs), entropy_ratio=sum(nats) / true)
    return result
