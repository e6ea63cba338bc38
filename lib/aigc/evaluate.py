"""Evaluation of a model directory: test loss/perplexity over the packed test blocks, and

- text data: nats per document against the grammar's entropy (embedded corpus);
- task data (prompt_completion, chat): the completion's nats given its prompt, scored on exactly the tokens
  training puts loss on (the same encoder, so the loss masks and this metric cannot disagree), as a multiple
  of the exact conditional floor where the rows carry it (`nats`, the embedded task); and, from greedy and
  sampled generations for the first `eval.task_examples` test prompts, the task metrics of `aigc.taskmetrics`
  (validity and fidelity only on the embedded brief -> ad task; distinct-2 and memorisation on any data).

Sampling for diversity uses temperature 1.0, no top-p/top-k: the model's own distribution. Lower temperatures
or nucleus sampling make any model look less diverse (and more valid), so distinct-2 and memorisation at 1.0
are what compare a base with its fine-tuned model honestly; greedy decoding measures validity and fidelity of
the model's single best guess.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from aigc.config import DataSection, FinetuneConfig
from aigc.corpus import ensure_embedded_corpus
from aigc.data import model_inputs
from aigc.generation import SamplingParams, generate, max_positions
from aigc.modeldir import load_model
from aigc.taskdata import NO_LOSS, TOO_LONG, encode_example, fit_example, pad_id, read_rows
from aigc.taskmetrics import (
    distinct_n,
    fidelity,
    floor_ratio,
    is_embedded_task,
    memorisation,
    parse_ad,
    task_scores,
)
from aigc.template import ensure_chat_template, prompt_ids

SAMPLE_TEMPERATURE = 1.0  # see the module docstring
EXAMPLES_SHOWN = 3  # (prompt, greedy completion) pairs kept in an evaluation
GENERATION_BATCH = 64  # prompts decoded together (bounds the KV cache of a hub-sized model on CPU)


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
def scored_nats(model: Any, seqs: Sequence[list[int]], scored: Sequence[list[bool]], pad: int,
                batch_size: int = 16) -> list[float]:
    """-log p in nats of the tokens of each sequence where `scored` is True, each given the tokens before it
    (the first token, which nothing predicts, cannot be scored). Sequences are right-padded per batch."""
    device = next(model.parameters()).device
    limit = max_positions(model)
    out: list[float] = []
    for i in range(0, len(seqs), batch_size):
        chunk, marks = seqs[i:i + batch_size], scored[i:i + batch_size]
        too_long = [len(s) for s in chunk if len(s) > limit]
        if too_long:
            raise ValueError(f"a sequence of {max(too_long)} tokens exceeds the model's {limit} positions")
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask, weight = torch.zeros_like(ids), torch.zeros(len(chunk), width)
        for r, (s, m) in enumerate(zip(chunk, marks, strict=True)):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
            weight[r, :len(s)] = torch.tensor(m, dtype=torch.float)
        ids, mask, weight = ids.to(device), mask.to(device), weight.to(device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), dim=-1)
        tok_logp = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * weight[:, 1:]
        out.extend((-tok_logp.sum(dim=1)).tolist())
    return out


def document_nats(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 16) -> list[float]:
    """-log p(document) in nats under the model: EOS as context, then every token of the text and the
    closing EOS (the grammar's probability includes where a document ends)."""
    eos = tokenizer.eos_token_id
    seqs = [[eos] + ids + [eos] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return scored_nats(model, seqs, [[False] + [True] * (len(s) - 1) for s in seqs], eos, batch_size)


# ------------------------------------------------------------------------------------------------ task data


def _messages(row: dict[str, Any]) -> list[dict[str, str]]:
    m = row["messages"]
    return json.loads(m) if isinstance(m, str) else m


def completion_of(row: dict[str, Any]) -> str:
    """The reference completion of a canonical task row: its last assistant turn, or its completion."""
    if "messages" in row:
        return next(m["content"] for m in reversed(_messages(row)) if m["role"] == "assistant")
    return row["completion"]


def task_prompt(row: dict[str, Any], tokenizer: Any, fmt: str) -> tuple[str, list[int]]:
    """(prompt text, prompt token ids) of a canonical task row, as training encoded the prompt and Serve does:
    chat: the turns before the last assistant turn through `aigc.template.prompt_ids` (the prompt text is the
    last user turn, e.g. the brief); prompt_completion: the ids before the completion in `encode_example`."""
    if fmt == "chat":
        msgs = _messages(row)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        user = next((m["content"] for m in reversed(msgs[:last]) if m["role"] == "user"), "")
        return user, prompt_ids(tokenizer, msgs[:last])
    ids, train = encode_example(row, tokenizer, fmt)
    return row["prompt"], ids[:train.index(True)]


def completion_nats(model: Any, tokenizer: Any, examples: Sequence[dict[str, Any]], data_cfg: DataSection,
                    batch_size: int = 16) -> list[float | None]:
    """-ln p(completion tokens | prompt) per example, in nats: the tokens training puts loss on (the
    completion / assistant turns and their EOS), encoded and truncated by the training encoder
    (`encode_example`, `fit_example`, with `train_on_prompt` off so only completions count). None for an
    example training drops (too long for data.block_size, or nothing left to learn)."""
    cfg = data_cfg.model_copy(update={"train_on_prompt": False})
    seqs, marks, where = [], [], []
    for i, row in enumerate(examples):
        ids, labels, status = fit_example(*encode_example(row, tokenizer, cfg.format), cfg)
        if status in (TOO_LONG, NO_LOSS):
            continue
        seqs.append(ids)
        marks.append([label != -100 for label in labels])
        where.append(i)
    out: list[float | None] = [None] * len(examples)
    for i, nats in zip(where, scored_nats(model, seqs, marks, pad_id(tokenizer), batch_size) if seqs else [],
                       strict=True):
        out[i] = nats
    return out


def task_generations(model: Any, tokenizer: Any, examples: Sequence[dict[str, Any]], data_cfg: DataSection,
                     n: int, max_tokens: int, seed: int = 0) -> list[dict[str, str]]:
    """Greedy and sampled (temperature 1.0, seed `seed + i` for prompt i) completions for the first `n`
    examples whose prompt leaves the model room to answer, through the one generation path; each
    {prompt, greedy, sampled, reference}."""
    room = max_positions(model) - 1
    picked = []
    for row in examples:
        text, ids = task_prompt(row, tokenizer, data_cfg.format)
        if len(ids) < room:
            picked.append((text, ids, completion_of(row)))
        if len(picked) == n:
            break
    out: list[dict[str, str]] = []
    for i in range(0, len(picked), GENERATION_BATCH):
        chunk = picked[i:i + GENERATION_BATCH]
        ids = [p[1] for p in chunk]
        greedy = generate(model, tokenizer, ids, SamplingParams(temperature=0.0, max_tokens=max_tokens))
        sampled = generate(model, tokenizer, ids, [SamplingParams(temperature=SAMPLE_TEMPERATURE, max_tokens=max_tokens,
                                                                  seed=seed + i + k) for k in range(len(chunk))])
        out += [{"prompt": p[0], "greedy": g.text, "sampled": s.text, "reference": p[2]}
                for p, g, s in zip(chunk, greedy, sampled, strict=True)]
    return out


def task_metrics(model: Any, tokenizer: Any, examples: Sequence[dict[str, Any]], train_completions: Sequence[str],
                 data_cfg: DataSection, n: int, max_tokens: int, seed: int = 0) -> dict[str, Any]:
    """The task half of an evaluation (see the module docstring).

    Always: `completion_examples` scored and `completion_nats_per_example`; with every scored row carrying its
    exact `nats`: `floor_nats_per_example` and `floor_ratio` (model / floor, 1.0 is the best possible). From
    the generations: `task_examples`, `sampled_distinct_2`, `sampled_memorised_pct` (exact copies of a train
    completion), `examples` (the first 3 prompts and greedy completions); on the embedded task also
    `{greedy,sampled}_{valid,faithful,tone}_pct`, and each example says whether it is valid and faithful.
    """
    nats = completion_nats(model, tokenizer, examples, data_cfg)
    scored = [(m, row.get("nats")) for m, row in zip(nats, examples, strict=True) if m is not None]
    out: dict[str, Any] = {"completion_examples": len(scored)}
    if scored:
        out["completion_nats_per_example"] = sum(m for m, _ in scored) / len(scored)
        floors = [f for _, f in scored]
        if all(f is not None for f in floors):
            out["floor_nats_per_example"] = sum(floors) / len(floors)
            out["floor_ratio"] = floor_ratio([m for m, _ in scored], floors)
    gens = task_generations(model, tokenizer, examples, data_cfg, n, max_tokens, seed)
    if not gens:
        return out
    prompts, greedy, sampled = ([g[k] for g in gens] for k in ("prompt", "greedy", "sampled"))
    shown = [{"prompt": g["prompt"], "completion": g["greedy"]} for g in gens[:EXAMPLES_SHOWN]]
    if is_embedded_task(prompts):
        scores = task_scores(prompts, greedy, sampled, train_completions)
        out.update(task_examples=int(scores.pop("n")), **scores)
        for s in shown:
            s.update(valid=parse_ad(s["completion"]) is not None, faithful=fidelity(s["prompt"], s["completion"]))
    else:  # validity and fidelity do not exist here: absent, not zero
        out.update(task_examples=len(gens), sampled_distinct_2=distinct_n(sampled, 2),
                   sampled_memorised_pct=100.0 * memorisation(sampled, train_completions))
    out["examples"] = shown
    return out


@dataclass
class TaskEval:
    """What the task evaluation needs, the same for the base and the fine-tuned model."""

    examples: list[dict[str, Any]]  # canonical test rows (prompt/completion or messages), `nats` where known
    train_completions: list[str]  # for memorisation
    data: DataSection
    n: int  # prompts generated from (eval.task_examples)
    max_tokens: int  # eval.task_max_tokens
    seed: int = 0


def _floor_nats(paths: Iterable[str], wanted: set[str]) -> dict[str, float]:
    """The exact `nats` of the rows named in `wanted`, keyed as the task loader names rows ('<file> line N')."""
    out = {}
    for path in paths:
        for where, row in read_rows(path):
            if where in wanted and isinstance(row, dict) and isinstance(row.get("nats"), int | float):
                out[where] = float(row["nats"])
    return out


def task_eval_inputs(cfg: FinetuneConfig, splits: Any) -> TaskEval | None:
    """The test examples (with their floor nats when the data files carry them) and the train completions of
    task data, read from the validated splits `aigc.finetune.prepare` loaded; None for text data or no splits."""
    if cfg.data.format == "text" or splits is None:
        return None
    test = splits.test.to_list()
    d = cfg.data
    if d.source == "embedded":
        files = [ensure_embedded_corpus(d)["test"]]
    else:  # a carved test split comes from the train files
        files = (d.test_files or d.train_files) if d.source == "files" else []
    floors = _floor_nats(files, {r["source"] for r in test})
    examples = [{**{k: v for k, v in r.items() if k != "source"},
                 **({"nats": floors[r["source"]]} if r["source"] in floors else {})} for r in test]
    train = [completion_of(r) for r in splits.train.to_list()]
    return TaskEval(examples, train, d, cfg.eval.task_examples, cfg.eval.task_max_tokens, cfg.optim.seed)


# ---------------------------------------------------------------------------------------------- one model


def evaluate_model(
    path: str,
    test_blocks: Any,
    docs: list[dict[str, Any]] | None = None,
    require_metadata: bool = True,
    batch_size: int = 8,
    task: TaskEval | None = None,
) -> dict[str, Any]:
    """Test loss/perplexity of a model (loaded through the shared loader) over the packed test blocks; with
    `docs` carrying their exact `nats` (the embedded text corpus), the ratio model nats / true nats (1.0 is
    the floor); with `task`, the task metrics of :func:`task_metrics`."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    loaded = load_model(path, require_metadata=require_metadata)
    loss, tokens = block_loss(loaded.model, test_blocks.iter_torch_batches(batch_size=batch_size, dtypes=torch.long))
    result: dict[str, Any] = {"test_loss": loss, "test_ppl": math.exp(min(loss, 50.0)), "test_tokens": tokens}
    if docs:
        nats = document_nats(loaded.model, loaded.tokenizer, [d["text"] for d in docs])
        true = sum(d["nats"] for d in docs)
        result.update(nats_per_doc=sum(nats) / len(docs), true_nats_per_doc=true / len(docs), entropy_ratio=sum(nats) / true)
    if task is not None:
        if task.data.format == "chat":
            ensure_chat_template(loaded.tokenizer)  # a base without a template trained with aigc's default
        result.update(task_metrics(loaded.model, loaded.tokenizer, task.examples, task.train_completions, task.data,
                                   task.n, task.max_tokens, task.seed))
    return result
