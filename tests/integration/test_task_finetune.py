"""Fine-tuning on task data from JSONL files on a real local Ray cluster: prompt -> completion rows through the
padded, length-bucketed path learn their completions, and bad chat rows stop the run before training or are
counted. (Chat training, with its template travelling in the model directory, is the embedded task's run in
test_embedded_base.py, on the session's base: one run for both.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from aigc.config import DataSection, FinetuneConfig, load_config
from aigc.corpus import sample_ads
from aigc.data import DataError, load_splits, to_ray_blocks
from aigc.finetune import read_metrics_log, run_finetune
from aigc.modeling import train_tokenizer
from aigc.template import ensure_chat_template

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

TINY = ["data.block_size=96", "model.arch.n_embd=32", "model.arch.vocab_size=400", "optim.warmup_steps=2",
        "optim.lr=5e-3", "optim.max_steps=30", "eval.every_steps=10", "eval.log_every=10", "eval.patience=null",
        "run.samples=0", "model.name_or_path=null", "eval.task_examples=8", "eval.task_max_tokens=32"]


def ads(n: int) -> list[str]:
    """First sentences of embedded-corpus ads: 30 tokens on average, at most ~60 (fits 96 with the prompt)."""
    return [d["text"].split(". ")[0].rstrip(".") + "." for d in sample_ads(n, seed=3)]


def chat_rows(n: int) -> list[dict]:
    """Brief (the ad's first words) -> the ad, with the extra fields the embedded task rows carry."""
    return [{"messages": [{"role": "user", "content": "Start: " + " ".join(t.split()[:3])},
                          {"role": "assistant", "content": t}], "brief": {"words": 3}, "nats": 1.0} for t in ads(n)]


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg_for(tmp_path: Path, name: str, *overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, ROOT / "jobs/configs/tiny-cpu.yaml",
                       [*TINY, "data.source=files", f"run.name={name}", f"run.storage_path={tmp_path}", *overrides])


def test_prompt_completion_files_learn_the_completions(ray_local, tmp_path, capfd):
    f = write(tmp_path / "pc.jsonl", [{"prompt": "Start: " + " ".join(t.split()[:2]) + "\n", "completion": t}
                                      for t in ads(600)])
    result = run_finetune(cfg_for(tmp_path, "pc", f"data.train_files=[{f}]", "data.format=prompt_completion",
                                  "data.packing=false"))  # the padded, length-bucketed path

    log = read_metrics_log(result.run_dir)
    assert [r["step"] for r in log] == [10, 20, 30]
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 0.3  # it learned the completions
    ev = result.evaluation
    assert ev["finetuned"]["test_loss"] < ev["base"]["test_loss"]
    info = result.data
    assert 0.3 < info["loss_token_fraction"]["train"] < 1.0  # the prompts carry no loss
    assert info["examples"]["train"]["kept"] == 540 and info["examples"]["train"]["dropped_too_long"] == 0
    assert "loss_token_fraction" in capfd.readouterr().out
    assert AutoTokenizer.from_pretrained(result.best_dir).chat_template is None  # no template for plain prompts


def test_too_long_rows_stop_the_run_or_are_counted(ray_local, tmp_path):
    rows = chat_rows(60)
    rows[7]["messages"][0]["content"] = "Start: " + "very long brief " * 60
    f = write(tmp_path / "long.jsonl", rows)
    tok = train_tokenizer(ads(200), vocab_size=300)
    ensure_chat_template(tok)

    def blocks(**kw):
        cfg = DataSection(source="files", train_files=[f], format="chat", block_size=128, split_ratios=(0.8, 0.1, 0.1),
                         split_seed=0, **kw)
        return to_ray_blocks(load_splits(cfg), tok, cfg, docs_per_batch=16)

    with pytest.raises(DataError, match=r"long.jsonl line 8: longer than data.block_size=128"):
        blocks()
    dropped = blocks(truncation="drop")
    counts = {s: dropped.examples[s]["dropped_too_long"] for s in ("train", "validation", "test")}
    assert sum(counts.values()) == 1
    assert sum(e["kept"] for e in dropped.examples.values()) == 59
    cut = blocks(truncation="truncate_prompt_left")
    assert sum(e["prompt_truncated"] for e in cut.examples.values()) == 1
    assert sum(e["kept"] for e in cut.examples.values()) == 60
    assert cut.loss_tokens["train"] > dropped.loss_tokens["train"] or counts["train"] == 0
