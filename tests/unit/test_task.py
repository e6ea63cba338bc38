"""The embedded brief -> ad task: briefs, rows with exact conditional nats, and the task files."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from aigc.corpus import (
    BRIEF_FIELDS,
    DEFAULT_GRAMMAR,
    PROMPT_SUFFIX,
    brief_choices,
    brief_entropy,
    brief_logprob,
    conditional_grammar,
    format_brief,
    parse_brief,
    sample_task_rows,
    to_prompt_completion,
    write_task_corpus,
)

BRIEF = {"product": "Northpeak hiking boot", "category": "footwear", "offer": "$10 off orders over $50",
         "tone": "playful"}


def test_brief_text_format_round_trips():
    text = format_brief(BRIEF)
    assert text == "Product: Northpeak hiking boot\nCategory: footwear\nOffer: $10 off orders over $50\nTone: playful"
    assert parse_brief(text) == BRIEF
    assert parse_brief(text + PROMPT_SUFFIX) == BRIEF
    for bad in ("", "Product: x", text.replace("Tone:", "Mood:"), text.replace("\n", "\n\n", 1),
                text.replace("Offer: ", "Offer:"), text + "\nAudience: hikers", text.replace("playful", "")):
        assert parse_brief(bad) is None, bad


def test_brief_choices_accept_only_briefs_of_the_grammar():
    assert brief_logprob(BRIEF) == pytest.approx(
        # category 1/8, tone 1/4, brand 1/40, product 1/8, kind "amount" 2/6, amount 1/5, threshold 1/4
        math.log(1 / 8 * 1 / 4 * 1 / 40 * 1 / 8 * 2 / 6 * 1 / 5 * 1 / 4), rel=1e-12
    )
    for field, value in (("product", "Northpeak yoga mat"), ("product", "Acme hiking boot"),
                         ("category", "toys"), ("offer", "12% off"), ("tone", "sarcastic")):
        with pytest.raises(ValueError, match="not a"):
            brief_choices({**BRIEF, field: value})


def test_sample_task_rows_are_deterministic_chat_rows_with_their_brief():
    rows = sample_task_rows(40, seed=7)
    assert rows == sample_task_rows(40, seed=7)
    assert rows != sample_task_rows(40, seed=8)
    for row in rows:
        assert set(row) == {"messages", "brief", "nats"}
        assert set(row["brief"]) == set(BRIEF_FIELDS)
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": format_brief(row["brief"])}
        assert assistant["role"] == "assistant" and assistant["content"]
        assert row["nats"] > 0
        pc = to_prompt_completion(row)
        assert pc == {"prompt": user["content"] + PROMPT_SUFFIX, "completion": assistant["content"],
                      "nats": row["nats"]}


def test_task_nats_are_the_exact_conditional_nats_of_the_parse():
    for row in sample_task_rows(400, seed=1):
        ad, brief = row["messages"][1]["content"], row["brief"]
        given = conditional_grammar(brief)
        # The conditioned grammar parses the ad exhaustively: one derivation, whose probability is the row's.
        assert given.count_derivations(ad) == 1
        assert -given.logprob(ad) == pytest.approx(row["nats"], rel=1e-12)
        # p(ad) = p(brief) p(ad | brief): the plain corpus is the marginal of the task over briefs.
        assert DEFAULT_GRAMMAR.logprob(ad) == pytest.approx(brief_logprob(brief) - row["nats"], rel=1e-12)
    # An ad for another brief has no probability given this one.
    other = next(r for r in sample_task_rows(50, seed=2) if r["brief"]["offer"] != BRIEF["offer"])
    assert conditional_grammar(BRIEF).logprob(other["messages"][1]["content"]) == -math.inf


def test_mean_task_nats_match_the_conditional_entropy():
    rows = sample_task_rows(6000, seed=4)
    h_brief = brief_entropy()
    h_given = DEFAULT_GRAMMAR.entropy() - h_brief
    assert 5 < h_given < 15
    for values, h in (([r["nats"] for r in rows], h_given), ([-brief_logprob(r["brief"]) for r in rows], h_brief)):
        mean, se = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
        assert abs(mean - h) < 3 * se, (mean, h, se)


def test_sample_task_rows_redraws_excluded_briefs():
    first = sample_task_rows(30, seed=5)
    keys = {tuple(r["brief"][f] for f in BRIEF_FIELDS) for r in first}
    again = sample_task_rows(30, seed=5, exclude_briefs=keys)
    assert not keys & {tuple(r["brief"][f] for f in BRIEF_FIELDS) for r in again}


def test_write_task_corpus_files_disjoint_briefs_and_floor(tmp_path):
    out = tmp_path / "task"
    paths = write_task_corpus(out, n_train=300, n_validation=40, n_test=60, seed=3)
    assert paths == {s: str(out / f"{s}.jsonl") for s in ("train", "validation", "test")}
    assert sorted(p.name for p in out.iterdir()) == ["task.json", "test.jsonl", "train.jsonl", "validation.jsonl"]
    rows = {s: [json.loads(line) for line in (out / f"{s}.jsonl").read_text().splitlines()] for s in paths}
    assert {s: len(r) for s, r in rows.items()} == {"train": 300, "validation": 40, "test": 60}
    briefs = {s: {format_brief(r["brief"]) for r in split_rows} for s, split_rows in rows.items()}
    assert not briefs["test"] & (briefs["train"] | briefs["validation"])
    assert not briefs["validation"] & briefs["train"]
    for row in rows["test"]:
        assert -conditional_grammar(row["brief"]).logprob(row["messages"][1]["content"]) == pytest.approx(row["nats"])
    meta = json.loads((out / "task.json").read_text())
    assert meta == {
        "seed": 3,
        "counts": {"train": 300, "validation": 40, "test": 60},
        "grammar": DEFAULT_GRAMMAR.fingerprint(),
        "shared_briefs": {"validation/train": 0, "test/train": 0, "test/validation": 0},
        "entropy_nats_per_ad": DEFAULT_GRAMMAR.entropy(),
        "entropy_nats_per_brief": brief_entropy(),
        "conditional_entropy_nats_per_ad": DEFAULT_GRAMMAR.entropy() - brief_entropy(),
    }
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_task_corpus(out, n_train=300, n_validation=40, n_test=60, seed=3)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
