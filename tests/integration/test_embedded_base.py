"""The embedded pre-trained base for real: built once (the session's `embedded_base`), reused, and fine-tuned
through `model.name_or_path: embedded` on a real local Ray cluster with DeepSpeed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from aigc.config import FinetuneConfig, load_config
from aigc.modeldir import load_model, verify_model_dir
from aigc.pretrain import ROLE, base_fingerprint, ensure_base, finetune
from aigc.template import DEFAULT_CHAT_TEMPLATE, render_prompt

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_the_base_is_a_trained_cached_model_directory(embedded_base, capsys):
    cfg = load_config(FinetuneConfig, None, embedded_base.overrides)
    meta = verify_model_dir(embedded_base.path)
    assert meta["role"] == ROLE and meta["fingerprint"] == base_fingerprint(cfg.model.pretrain)
    assert Path(embedded_base.path).name == meta["fingerprint"]
    p = cfg.model.pretrain
    assert meta["step"] in range(p.eval_every, p.max_steps + 1, p.eval_every)  # the best validated step
    assert meta["config"]["model"]["name_or_path"] is None  # pre-trained from random init
    vocab = len(load_model(embedded_base.path).tokenizer)
    assert meta["metrics"]["val_loss"] < math.log(vocab) - 1.5  # far below a random model's ~ln(vocab)

    assert ensure_base(cfg) == embedded_base.path  # cached: no second pre-training
    out = capsys.readouterr().out
    assert f"embedded base: reusing {embedded_base.path}" in out and "pre-training" not in out


def test_task_finetune_from_the_base_reuses_it_and_moves_towards_the_floor(embedded_base, ray_local, tmp_path, capfd):
    """The shipped task config (the embedded brief -> ad task, chat) from the session's base: the base is reused
    with its tokenizer, the completion loss falls well towards its exact floor, and the before/after evaluation
    (floor and task metrics, for both models) is printed and recorded in summary.json and aigc.json, and the chat
    template travels with the model (this is the suite's chat training run). (The session's base is too small to
    write faithful ads; the fidelity relation, >= 50 points over the base, is measured on the real base by
    bench/task_quality.py.)"""
    cfg = load_config(FinetuneConfig, ROOT / "jobs/configs/tiny-cpu.yaml", [
        *embedded_base.overrides, f"run.storage_path={tmp_path}", "run.name=task", "run.samples=2",
        "data.embedded={n_train: 1000, n_validation: 100, n_test: 100, seed: 0}", "data.block_size=192",
        "optim.max_steps=200", "optim.lr=4e-3", "optim.warmup_steps=10", "eval.every_steps=100",
        "eval.patience=null", "eval.task_examples=16", "eval.task_max_tokens=48",
    ])
    result = finetune(cfg)
    out = capfd.readouterr().out
    assert "pre-training" not in out  # the session's base was reused

    tuned = verify_model_dir(result.best_dir)
    assert tuned["config"]["model"]["name_or_path"] == embedded_base.path
    # the base's tokenizer, not one retrained on the task data
    assert (Path(result.best_dir) / "tokenizer.json").read_bytes() == (Path(embedded_base.path) / "tokenizer.json").read_bytes()
    assert not (Path(result.run_dir) / "base").exists()
    # chat: the prompts carry no loss, and the template training used is in the model directory, so Serve renders
    # the same prompt
    assert 0.3 < result.data["loss_token_fraction"]["train"] < 1.0 and "loss_token_fraction" in out
    assert result.data["examples"]["train"]["kept"] == 1000 and result.data["examples"]["train"]["dropped_too_long"] == 0
    assert "chat_template.jinja" in tuned["files"]
    tok = AutoTokenizer.from_pretrained(result.best_dir)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert render_prompt(tok, [{"role": "user", "content": "Product: Nimbus soundbar"}]).endswith("\nAssistant:\n")

    before, after = result.evaluation["base"], result.evaluation["finetuned"]
    # step 0 of the fine-tune is the pre-trained base: already far below a random model (~ln(vocab) nats)
    assert before["test_loss"] < math.log(len(load_model(embedded_base.path).tokenizer)) - 1.5
    assert after["floor_ratio"] < 0.85 * before["floor_ratio"], (before["floor_ratio"], after["floor_ratio"])
    assert after["test_loss"] < before["test_loss"]
    assert before["floor_nats_per_example"] == after["floor_nats_per_example"] > 0
    for side in (before, after):  # validity and fidelity are scored for both (embedded briefs)
        assert side["task_examples"] == 16 and {"greedy_valid_pct", "greedy_faithful_pct", "sampled_distinct_2",
                                                "sampled_memorised_pct"} <= set(side)
        assert len(side["examples"]) == 3 and side["examples"][0]["prompt"].startswith("Product: ")
    assert "completion nats / floor" in out and "valid ads (greedy, n=16)" in out and "fine-tuned example:" in out
    assert "[aigc] sample: 'Product: " in out  # samples come from test briefs, not the text demo prompts
    summary = json.loads((Path(result.run_dir) / "summary.json").read_text())
    assert summary["evaluation"]["finetuned"]["floor_ratio"] == after["floor_ratio"]
    assert tuned["evaluation"]["finetuned"]["floor_ratio"] == after["floor_ratio"]
