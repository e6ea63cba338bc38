"""The search report shows the winner's before/after evaluation and the trials' task metrics when they exist,
and nothing in their place when they do not."""

from __future__ import annotations

import csv

from aigc.report import render
from aigc.report_data import SearchData, TrialRecord

BASE = {"test_loss": 5.99, "test_ppl": 401.6, "floor_ratio": 51.0, "greedy_valid_pct": 0.0,
        "greedy_faithful_pct": 0.0, "sampled_distinct_2": 0.93, "sampled_memorised_pct": 0.0, "task_examples": 100}
TUNED = {"test_loss": 0.41, "test_ppl": 1.51, "floor_ratio": 1.731, "greedy_valid_pct": 97.0,
         "greedy_faithful_pct": 91.0, "sampled_distinct_2": 0.21, "sampled_memorised_pct": 2.0, "task_examples": 100,
         "examples": [{"prompt": "Product: Ember tent\nCategory: outdoor\nOffer: 10% off\nTone: calm",
                       "completion": "The Ember tent. Save 10% today only. Shop now.", "valid": True, "faithful": True}]}


def trial(tid: str, loss: float, evaluation: dict | None = None) -> TrialRecord:
    history = [{"step": s, "val_loss": loss + 1.0 / s, "val_ppl": 2.0, "timestamp": 100.0 + s} for s in (10, 20)]
    return TrialRecord(trial_id=tid, status="completed", params={"lr": 0.001 * len(tid)}, history=history,
                       wall_s=12.0, evaluation=evaluation)


def search(evaluated: bool) -> SearchData:
    ev = {"base": BASE, "finetuned": TUNED} if evaluated else None
    config = {"search": {"name": "s", "algorithm": "random"}, "space": {"lr": {"kind": "loguniform", "low": 1e-4,
                                                                              "high": 1e-2}}}
    trials = [trial("a1", 0.4, ev), trial("b22", 0.9)]
    winner = {"path": "/x/winner", "trial": "a1", "metrics": {}, "step": 20, "evaluation": ev}
    return SearchData("/x", config, trials, winner, started=100.0)


def test_report_shows_the_winner_against_its_base(tmp_path):
    files = render(search(evaluated=True), tmp_path)
    page, md = (tmp_path / "report.html").read_text(), (tmp_path / "report.md").read_text()
    for text in (page, md):
        assert "Winner against its base" in text
        assert "completion nats / floor" in text and "51.000" in text and "1.731" in text
        assert "valid ads (greedy, n=100)" in text and "97.0%" in text
        assert "The Ember tent. Save 10% today only. Shop now." in text
        assert "faithful to brief (sampled)" not in text  # neither side has it
    assert "<th class=''>floor_ratio</th>" in page and "<td>1.731</td>" in page
    rows = {r["trial_id"]: r for r in csv.DictReader(open(files["trials.csv"]))}
    assert float(rows["a1"]["greedy_faithful_pct"]) == 91.0 and rows["b22"]["floor_ratio"] == ""


def test_report_without_evaluations_has_no_task_section_or_columns(tmp_path):
    render(search(evaluated=False), tmp_path)
    page, md = (tmp_path / "report.html").read_text(), (tmp_path / "report.md").read_text()
    for text in (page, md):
        assert "Winner against its base" not in text and "floor_ratio" not in text
