"""Evaluation of task data: completion nats scored on exactly the tokens training puts loss on, the task
metrics present on the embedded task and absent elsewhere, and the before/after table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aigc.comparison import comparison_rows
from aigc.config import DataSection, FinetuneConfig
from aigc.corpus import sample_task_rows, to_prompt_completion
from aigc.evaluate import (
    TaskEval,
    completion_nats,
    document_nats,
    evaluate_model,
    task_eval_inputs,
    task_prompt,
)
from aigc.finetune import print_comparison
from aigc.modeldir import load_model
from aigc.taskdata import NO_LOSS, TOO_LONG, encode_example, load_task_splits, make_encoder
from aigc.template import ensure_chat_template

TASK_KEYS = {"greedy_valid_pct", "greedy_faithful_pct", "greedy_tone_pct", "sampled_valid_pct",
             "sampled_faithful_pct", "sampled_tone_pct"}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    ensure_chat_template(loaded.tokenizer)
    return loaded


def embedded_rows(n: int, fmt: str) -> list[dict]:
    """Canonical task rows as the loader hands them over (chat messages as JSON text), with their nats."""
    rows = sample_task_rows(n, seed=5)
    if fmt == "chat":
        return [{"messages": json.dumps(r["messages"]), "nats": r["nats"]} for r in rows]
    return [{**to_prompt_completion(r), "nats": r["nats"]} for r in rows]


def other_rows(n: int) -> list[dict]:
    """Chat rows that are not the embedded task (no brief, no nats)."""
    return [{"messages": json.dumps([{"role": "user", "content": f"Say something about item {i}"},
                                     {"role": "assistant", "content": f"Item {i} is on sale today."}])}
            for i in range(n)]


def hand_nats(model, ids: list[int], scored: np.ndarray) -> float:
    """-sum log p(ids[t] | ids[:t]) over the scored positions, from one unbatched forward."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return -sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if scored[t])


@pytest.mark.parametrize("fmt", ["chat", "prompt_completion"])
def test_completion_nats_are_the_training_loss_tokens(tiny, fmt):
    # The tiny model's 128 positions hold an embedded ad but rarely its whole brief: prompts are cut from the
    # left as training cuts them, and an ad too long for any context is dropped as training drops it.
    cfg = DataSection(format=fmt, block_size=128, truncation="truncate_prompt_left")
    rows = embedded_rows(12, fmt) + (other_rows(2) if fmt == "chat" else [])  # lengths differ: padding is exercised
    got = completion_nats(tiny.model, tiny.tokenizer, rows, cfg, batch_size=4)
    assert sum(v is not None for v in got) >= 8
    # the training encoder (Ray Data map 1, called on a numpy batch): its labels are the tokens to score
    keys = ["messages"] if fmt == "chat" else ["prompt", "completion"]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in keys}
    batch["source"] = np.array([f"row {i}" for i in range(len(rows))], dtype=object)
    enc = make_encoder(tiny.tokenizer, cfg)(batch)
    assert [v is None for v in got] == [s in (TOO_LONG, NO_LOSS) for s in enc["status"]]  # dropped as training drops
    for i, row in enumerate(rows):
        if got[i] is None:
            continue
        n = int(enc["length"][i])
        ids, scored = enc["input_ids"][i, :n].tolist(), enc["labels"][i, :n] != -100
        assert got[i] == pytest.approx(hand_nats(tiny.model, ids, scored), rel=1e-4, abs=1e-3)
        # the scored tokens are exactly the completion and its EOS
        completion = json.loads(row["messages"])[-1]["content"] if fmt == "chat" else row["completion"]
        assert tiny.tokenizer.decode([t for t, s in zip(ids, scored, strict=True) if s]) == \
            completion + tiny.tokenizer.eos_token


def test_completion_nats_ignore_train_on_prompt(tiny):
    rows = embedded_rows(3, "prompt_completion")
    plain = DataSection(format="prompt_completion", block_size=128, truncation="truncate_prompt_left")
    with_prompt = DataSection(format="prompt_completion", block_size=128, truncation="truncate_prompt_left",
                             train_on_prompt=True)
    got = completion_nats(tiny.model, tiny.tokenizer, rows, with_prompt)
    assert any(v is not None for v in got)
    assert got == pytest.approx(completion_nats(tiny.model, tiny.tokenizer, rows, plain))


@pytest.mark.parametrize("fmt", ["chat", "prompt_completion"])
def test_prompt_ids_are_the_training_prompt(tiny, fmt):
    for row in embedded_rows(3, fmt):
        text, ids = task_prompt(row, tiny.tokenizer, fmt)
        full, train = encode_example(row, tiny.tokenizer, fmt)
        assert ids == full[:train.index(True)]
        assert text.startswith("Product: ")


class Blocks:
    """Stands in for the packed Ray dataset: `iter_torch_batches` over fixed blocks."""

    def __init__(self, ids: torch.Tensor):
        self.batch = {"input_ids": ids, "labels": ids.clone()}

    def iter_torch_batches(self, batch_size, dtypes):
        yield self.batch


def test_evaluation_of_embedded_task_has_task_scores(tiny_model_dir, tiny):
    cfg = DataSection(format="chat", block_size=128, truncation="truncate_prompt_left")
    rows = embedded_rows(8, "chat")
    task = TaskEval(rows, [json.loads(r["messages"])[-1]["content"] for r in rows[:4]], cfg, n=5, max_tokens=6)
    blocks = Blocks(torch.tensor([tiny.tokenizer("Save 20% today.")["input_ids"]]))
    ev = evaluate_model(tiny_model_dir, blocks, task=task)
    assert ev["test_loss"] > 0 and ev["task_examples"] == 5
    assert TASK_KEYS <= set(ev) and 0 <= ev["sampled_distinct_2"] <= 1 and ev["sampled_memorised_pct"] == 0
    assert ev["floor_ratio"] == pytest.approx(ev["completion_nats_per_example"] / ev["floor_nats_per_example"])
    assert ev["floor_ratio"] > 1  # a random model is far above the floor
    assert len(ev["examples"]) == 3 and {"prompt", "completion", "valid", "faithful"} == set(ev["examples"][0])


def test_evaluation_of_other_task_data_has_no_validity(tiny_model_dir):
    cfg = DataSection(format="chat", block_size=128)
    rows = other_rows(4)
    task = TaskEval(rows, [json.loads(r["messages"])[-1]["content"] for r in rows], cfg, n=4, max_tokens=5)
    blocks = Blocks(torch.tensor([[5, 6, 7, 8]]))
    ev = evaluate_model(tiny_model_dir, blocks, task=task)
    assert not TASK_KEYS & set(ev)  # absent, not zero
    assert "floor_ratio" not in ev  # these rows carry no nats
    assert ev["completion_examples"] == 4 and ev["completion_nats_per_example"] > 0
    assert {"sampled_distinct_2", "sampled_memorised_pct", "test_loss"} <= set(ev)
    assert ev["examples"][0]["prompt"] == "Say something about item 0" and "valid" not in ev["examples"][0]


def test_task_eval_inputs_carry_each_rows_floor(tmp_path):
    cfg = FinetuneConfig.model_validate({"data": {"format": "prompt_completion", "embedded": {
        "n_train": 20, "n_validation": 5, "n_test": 7, "seed": 11}}, "eval": {"task_examples": 3}})
    task = task_eval_inputs(cfg, load_task_splits(cfg.data))
    from aigc.corpus import ensure_embedded_corpus

    file_rows = [json.loads(line) for line in open(ensure_embedded_corpus(cfg.data)["test"])]
    assert [(r["prompt"], r["completion"], r["nats"]) for r in task.examples] == \
        [(r["prompt"], r["completion"], r["nats"]) for r in file_rows]
    assert len(task.train_completions) == 20 and task.n == 3 and task.data.format == "prompt_completion"
    assert task_eval_inputs(FinetuneConfig(), None) is None


def test_comparison_prints_only_rows_both_sides_have(capsys):
    base = {"test_loss": 2.31411, "floor_ratio": 3.412, "greedy_valid_pct": 61.0, "sampled_distinct_2": 0.41}
    tuned = {"test_loss": 0.90121, "floor_ratio": 1.187, "greedy_valid_pct": 99.5, "greedy_faithful_pct": 98.0,
             "sampled_distinct_2": 0.377, "task_examples": 200, "floor_nats_per_example": 7.5,
             "examples": [{"prompt": "Product: X", "completion": "Buy X.", "valid": True, "faithful": False}]}
    print_comparison({"base": base, "finetuned": tuned})
    out = capsys.readouterr().out
    assert "faithful to brief" not in out and "test perplexity" not in out  # one side lacks them
    assert "valid ads (greedy, n=200)" in out and "61.0%" in out and "99.5%" in out
    assert "1.187" in out and "distinct-2 (sampled)" in out
    assert "conditional floor: 7.50 nats" in out
    assert "'Product: X' -> 'Buy X.' [valid, not faithful]" in out
    assert [r[0] for r in comparison_rows(tuned, tuned)][:2] == ["test loss (nats/token)", "completion nats / floor"]


def test_document_nats_score_every_token_after_the_leading_eos(tiny):
    texts = ["Save 20% today.", "Introducing the Ember tent: light, warm. Shop now."]
    got = document_nats(tiny.model, tiny.tokenizer, texts, batch_size=2)
    eos = tiny.tokenizer.eos_token_id
    for text, nats in zip(texts, got, strict=True):
        ids = [eos, *tiny.tokenizer(text, add_special_tokens=False)["input_ids"], eos]
        assert nats == pytest.approx(hand_nats(tiny.model, ids, np.array([False] + [True] * (len(ids) - 1))), rel=1e-4)
