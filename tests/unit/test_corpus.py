"""The embedded corpus: exact entropy, unambiguity (checked by an exhaustive parse), determinism, files."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from aigc.corpus import _BRANDS, _CATEGORIES, DEFAULT_GRAMMAR, Grammar, generate, write_corpus


def _binary_entropy(p: float) -> float:
    return -p * math.log(p) - (1 - p) * math.log(1 - p)


def test_small_grammar_entropy_and_logprob_by_hand():
    # S -> A A; A -> "a" (1/4) | "b" (3/4): two independent draws.
    g = Grammar({"S": [(1, "{A}{A}")], "A": [(1, "a"), (3, "b")]}, start="S")
    assert g.entropy() == pytest.approx(2 * _binary_entropy(0.25), rel=1e-12)
    assert g.logprob("ab") == pytest.approx(math.log(0.25) + math.log(0.75), rel=1e-12)
    assert g.logprob("abb") == -math.inf
    assert g.logprob("") == -math.inf


def test_logprob_sums_over_every_derivation():
    # "xyz" = "x" + "yz" = "xy" + "z": two derivations of 1/4 each. A parser that stopped at the first
    # derivation, or the sampler's record, would say log(1/4); the language probability is 1/2.
    g = Grammar({"S": [(1, "{A}{B}")], "A": _alts("x", "xy"), "B": _alts("yz", "z")}, start="S")
    assert g.count_derivations("xyz") == 2
    assert g.logprob("xyz") == pytest.approx(math.log(0.5), rel=1e-12)
    rng = random.Random(0)
    recorded = {}
    for _ in range(200):
        text, logp = g.sample(rng)
        recorded[text] = logp
    assert recorded["xyz"] == pytest.approx(math.log(0.25))


def _alts(*items: str) -> list[tuple[float, str]]:
    return [(1.0, item) for item in items]


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"S": _alts("{T}"), "T": _alts("t{S}")}, "recursive: S -> T -> S"),
        ({"S": _alts("{T}")}, "undefined rule 'T'"),
        ({"S": _alts("a", "a")}, "repeats alternatives"),
        ({"S": [(0.0, "a")]}, "positive"),
        ({"S": _alts("a"), "T": _alts("t")}, "not reachable"),
    ],
)
def test_grammar_rejects_bad_rules(rules, message):
    with pytest.raises(ValueError, match=message):
        Grammar(rules, start="S")


def test_entropy_matches_monte_carlo_estimate():
    h = DEFAULT_GRAMMAR.entropy()
    assert 20 < h < 80
    rng = random.Random(1234)
    nats = [-DEFAULT_GRAMMAR.sample(rng)[1] for _ in range(20_000)]
    mean, se = statistics.fmean(nats), statistics.stdev(nats) / math.sqrt(len(nats))
    # Standard error is ~0.03 nats here, so this pins the analytic value to about 0.1 nats.
    assert abs(mean - h) < 3 * se, (mean, h, se)


def test_every_sampled_document_has_exactly_one_derivation():
    rng = random.Random(99)
    docs = [DEFAULT_GRAMMAR.sample(rng) for _ in range(2000)]
    for text, logp in docs:
        assert DEFAULT_GRAMMAR.count_derivations(text) == 1, text
        assert DEFAULT_GRAMMAR.logprob(text) == pytest.approx(logp, rel=1e-12, abs=1e-12), text
    # The check means most where every word list has been exercised in context.
    corpus = "\n".join(text for text, _ in docs)
    vocab = [*_BRANDS] + [
        item
        for cat in _CATEGORIES.values()
        for items in (cat.products, cat.materials, cat.benefits, cat.details, cat.slogans, cat.audiences)
        for item in items
    ]
    missing = [item for item in vocab if item not in corpus]
    assert not missing


def test_probability_of_a_known_document_by_hand():
    text = (
        "Introducing the Northpeak hiking boot: cushioned foam midsole, a springy stride. "
        "The heel counter keeps every step steady. Shop it today."
    )
    # category 1/8, type "description" 3/11, intro 1/5, brand 1/40, product, material, benefit 1/8 each,
    # detail without a spec 1/2, detail 1/6, call to action 1/7.
    p = 1 / 8 * 3 / 11 * 1 / 5 * 1 / 40 * (1 / 8) ** 3 * 1 / 2 * 1 / 6 * 1 / 7
    assert DEFAULT_GRAMMAR.logprob(text) == pytest.approx(math.log(p), rel=1e-12)
    for bad in (
        "",
        text + " ",
        text[:-1],
        text.replace("Northpeak", "Acme"),
        # A fitness product with footwear features: each half is grammatical, the mix is not.
        text.replace("hiking boot", "yoga mat"),
        text.replace(". ", ".  ", 1),
    ):
        assert DEFAULT_GRAMMAR.logprob(bad) == -math.inf, bad
        assert DEFAULT_GRAMMAR.count_derivations(bad) == 0


def test_generate_is_deterministic_and_nats_are_exact():
    docs = generate(50, seed=7)
    assert docs == generate(50, seed=7)
    assert docs != generate(50, seed=8)
    for d in docs:
        assert set(d) == {"text", "nats"}
        assert d["nats"] > 0
        assert d["nats"] == pytest.approx(-DEFAULT_GRAMMAR.logprob(d["text"]), rel=1e-12)


def test_documents_are_within_the_intended_length():
    words = [len(d["text"].split()) for d in generate(3000, seed=3)]
    assert min(words) >= 15
    assert max(words) <= 60
    assert 20 < statistics.fmean(words) < 40


def test_write_corpus_files_and_counts(tmp_path):
    out = tmp_path / "nested" / "corpus"
    paths = write_corpus(out, n_train=30, n_validation=5, n_test=7, seed=11)
    assert paths == {s: str(out / f"{s}.jsonl") for s in ("train", "validation", "test")}
    assert sorted(p.name for p in out.iterdir()) == ["grammar.json", "test.jsonl", "train.jsonl", "validation.jsonl"]
    rows = {s: [json.loads(line) for line in (out / f"{s}.jsonl").read_text().splitlines()] for s in paths}
    assert {s: len(r) for s, r in rows.items()} == {"train": 30, "validation": 5, "test": 7}
    for split_rows in rows.values():
        for row in split_rows:
            assert set(row) == {"text", "nats"}
            assert row["nats"] == pytest.approx(-DEFAULT_GRAMMAR.logprob(row["text"]), rel=1e-12)
    # Independent draws: the splits do not share a random stream.
    assert rows["validation"][0] != rows["train"][0]
    assert rows["test"][0] != rows["validation"][0]
    meta = json.loads((out / "grammar.json").read_text())
    assert meta == {
        "entropy_nats_per_doc": DEFAULT_GRAMMAR.entropy(),
        "seed": 11,
        "counts": {"train": 30, "validation": 5, "test": 7},
    }
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_corpus(out, n_train=30, n_validation=5, n_test=7, seed=11)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
