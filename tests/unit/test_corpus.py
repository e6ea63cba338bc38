"""The embedded corpus: exact entropy, unambiguity (checked by an exhaustive parse), determinism, files."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from aigc.adwords import BRANDS, CATEGORIES, TONES
from aigc.corpus import DEFAULT_GRAMMAR, sample_ads, write_corpus
from aigc.grammar import Grammar


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


def test_derivation_lists_the_choices_in_sampling_order():
    g = Grammar({"S": [(1, "{A}-{B}")], "A": _alts("a", "aa"), "B": [(1, "b"), (2, "{A}b")]}, start="S")
    rng = random.Random(3)
    for _ in range(50):
        trace = []
        text, logp = g.sample(rng, trace)
        assert g.derivation(text) == trace
        assert logp == pytest.approx(sum(g.choice_logprob(rule, alt) for rule, alt in trace), rel=1e-12)
    assert g.derivation("aa-ab") == [("S", "{A}-{B}"), ("A", "aa"), ("B", "{A}b"), ("A", "a")]
    assert g.derivation("a-") is None
    ambiguous = Grammar({"S": [(1, "{A}{B}")], "A": _alts("x", "xy"), "B": _alts("yz", "z")}, start="S")
    with pytest.raises(ValueError, match="2 derivations"):
        ambiguous.derivation("xyz")


def _small_conditioned_grammar() -> tuple[Grammar, Grammar]:
    # X is the "brief" (it is spelled out by its first letter), Y and Z the free part of the "ad".
    g = Grammar(
        {
            "S": [(1, "{X}:{Y}")],
            "X": [(1, "a{Z}"), (3, "b")],
            "Y": [(1, "c"), (2, "cd"), (1, "{Z}e")],
            "Z": [(1, "z"), (4, "zz")],
        },
        start="S",
    )
    return g, g.condition({"X": "b"})


def test_condition_fixes_a_choice_and_gives_the_exact_conditional_probability():
    g, given_b = _small_conditioned_grammar()
    assert given_b.alternatives("X") == ["b"]
    log_prior = g.choice_logprob("X", "b")
    assert log_prior == pytest.approx(math.log(3 / 4))
    # p(b:zze) = p(X=b) * p(Y="{Z}e") * p(Z="zz"): conditioning divides by p(X=b) exactly.
    assert given_b.logprob("b:zze") == pytest.approx(math.log(1 / 4 * 4 / 5), rel=1e-12)
    assert g.logprob("b:zze") == pytest.approx(log_prior + given_b.logprob("b:zze"), rel=1e-12)
    assert given_b.logprob("az:c") == -math.inf
    # The conditional entropy is the entropy of what is left to choose: Y, and Z under Y's third option.
    h_y = -sum(p * math.log(p) for p in (1 / 4, 2 / 4, 1 / 4))
    h_z = -sum(p * math.log(p) for p in (1 / 5, 4 / 5))
    assert given_b.entropy() == pytest.approx(h_y + h_z / 4, rel=1e-12)
    # Rules that only the other brief used are gone; an unknown choice is refused.
    assert g.condition({"X": "b", "Y": "c"}).alternatives("S") == ["{X}:{Y}"]
    with pytest.raises(ValueError, match="no alternative 'q'"):
        g.condition({"X": "q"})


def test_sampling_frequencies_of_a_conditioned_grammar_match_its_probabilities():
    _, given_b = _small_conditioned_grammar()
    rng = random.Random(5)
    n = 40_000
    counts: dict[str, int] = {}
    for _ in range(n):
        text, logp = given_b.sample(rng)
        assert logp == pytest.approx(given_b.logprob(text), rel=1e-12)
        counts[text] = counts.get(text, 0) + 1
    assert set(counts) == {"b:c", "b:cd", "b:ze", "b:zze"}
    for text, k in counts.items():
        p = math.exp(given_b.logprob(text))
        assert abs(k / n - p) < 4 * math.sqrt(p * (1 - p) / n), (text, k / n, p)


def test_choice_entropy_counts_only_the_named_rules():
    g, given_b = _small_conditioned_grammar()
    h_x = -(1 / 4 * math.log(1 / 4) + 3 / 4 * math.log(3 / 4))
    assert g.choice_entropy({"X"}) == pytest.approx(h_x, rel=1e-12)
    assert g.choice_entropy(None) == pytest.approx(g.entropy(), rel=1e-12)
    # X is a function of the text, so H(text) - H(X) is the mean entropy of the text given X.
    given_a = g.condition({"X": "a{Z}"})
    mean_conditional = 1 / 4 * given_a.entropy() + 3 / 4 * given_b.entropy()
    assert g.entropy() - g.choice_entropy({"X"}) == pytest.approx(mean_conditional, rel=1e-12)


def test_fingerprint_changes_with_any_rule_or_weight():
    rules = {"S": [(1, "{A}{A}")], "A": [(1, "a"), (3, "b")]}
    fp = Grammar(rules, start="S").fingerprint()
    assert fp == Grammar({"S": [(1.0, "{A}{A}")], "A": [(1, "a"), (3, "b")]}, start="S").fingerprint()
    assert fp != Grammar({**rules, "A": [(1, "a"), (2, "b")]}, start="S").fingerprint()
    assert fp != Grammar({**rules, "A": [(1, "a"), (3, "c")]}, start="S").fingerprint()


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
    vocab = [*BRANDS] + [
        item
        for cat in CATEGORIES.values()
        for items in (cat.products, cat.materials, cat.benefits, cat.details, cat.slogans, cat.audiences)
        for item in items
    ] + [item for tone in TONES.values() for items in (tone.intros, tone.offer_intros, tone.ctas) for item in items]
    missing = [item for item in vocab if item not in corpus]
    assert not missing


def test_probability_of_a_known_document_by_hand():
    text = (
        "Introducing the Northpeak hiking boot: cushioned foam midsole, a springy stride. "
        "Save 20% today only. Shop it today."
    )
    # category 1/8, tone "friendly" 1/4, type "description" 3/9, intro 1/3, brand 1/40, product, material,
    # benefit 1/8 each, offer kind "percent" 3/6, its phrasing "Save" 1/3, 20 of 7 percentages 1/7,
    # "today only" 1/6, call to action 1/3.
    p = 1 / 8 * 1 / 4 * 3 / 9 * 1 / 3 * 1 / 40 * (1 / 8) ** 3 * 3 / 6 * 1 / 3 * 1 / 7 * 1 / 6 * 1 / 3
    assert DEFAULT_GRAMMAR.logprob(text) == pytest.approx(math.log(p), rel=1e-12)
    for bad in (
        "",
        text + " ",
        text[:-1],
        text.replace("Northpeak", "Acme"),
        # A fitness product with footwear features: each half is grammatical, the mix is not.
        text.replace("hiking boot", "yoga mat"),
        # A playful call to action in a friendly ad: the tone must hold through the ad.
        text.replace("Shop it today.", "Your cart is calling."),
        text.replace(". ", ".  ", 1),
    ):
        assert DEFAULT_GRAMMAR.logprob(bad) == -math.inf, bad
        assert DEFAULT_GRAMMAR.count_derivations(bad) == 0


def test_generate_is_deterministic_and_nats_are_exact():
    docs = sample_ads(50, seed=7)
    assert docs == sample_ads(50, seed=7)
    assert docs != sample_ads(50, seed=8)
    for d in docs:
        assert set(d) == {"text", "nats"}
        assert d["nats"] > 0
        assert d["nats"] == pytest.approx(-DEFAULT_GRAMMAR.logprob(d["text"]), rel=1e-12)


def test_documents_are_within_the_intended_length():
    # Short enough that a brief (~40 tokens of a 512-token BPE) and its ad fit in about 128 tokens.
    words = [len(d["text"].split()) for d in sample_ads(3000, seed=3)]
    assert min(words) >= 12
    assert max(words) <= 40
    assert 18 < statistics.fmean(words) < 30


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
        "grammar": DEFAULT_GRAMMAR.fingerprint(),
    }
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_corpus(out, n_train=30, n_validation=5, n_test=7, seed=11)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
