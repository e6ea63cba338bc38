"""Task metrics on plain strings: validity, fidelity, diversity, memorisation and the floor ratio."""

from __future__ import annotations

import pytest

from aigc.corpus import PROMPT_SUFFIX, format_brief, sample_ads, sample_task_rows
from aigc.taskmetrics import (
    distinct_n,
    fidelity,
    floor_ratio,
    is_embedded_task,
    memorisation,
    parse_ad,
    task_scores,
)

BOOT = {"product": "Northpeak hiking boot", "category": "footwear", "offer": "20% off", "tone": "friendly"}
BOOT_AD = ("Introducing the Northpeak hiking boot: cushioned foam midsole, a springy stride. "
           "Save 20% today only. Shop it today.")
SOUNDBAR = {"product": "Lumen soundbar", "category": "audio", "offer": "buy one, get one free", "tone": "premium"}
SOUNDBAR_AD = "The Lumen soundbar. Hear every detail. Buy one, get one free through Sunday. Explore the collection."


def test_every_grammar_ad_is_valid_and_faithful_to_its_brief():
    for row in sample_task_rows(500, seed=11):
        ad = row["messages"][1]["content"]
        assert parse_ad(ad) == row["brief"]
        assert fidelity(row["brief"], ad)
        assert fidelity(row["messages"][0]["content"], ad)  # the brief text works as well as the dict
    # The plain corpus is the same distribution: each document is an ad of some brief.
    assert all(parse_ad(d["text"]) is not None for d in sample_ads(300, seed=12))


def test_parse_ad_recovers_the_brief_and_ignores_surrounding_whitespace():
    assert parse_ad(BOOT_AD) == BOOT
    assert parse_ad(SOUNDBAR_AD) == SOUNDBAR
    assert parse_ad(" " + BOOT_AD + "\n") == BOOT


def test_a_changed_offer_is_valid_but_not_faithful():
    perturbed = BOOT_AD.replace("Save 20%", "Save 25%")
    assert parse_ad(perturbed) == {**BOOT, "offer": "25% off"}
    assert not fidelity(BOOT, perturbed)
    # Another brand is another product; another phrasing of the same offer is still faithful.
    assert not fidelity(BOOT, BOOT_AD.replace("Northpeak", "Lumen"))
    assert fidelity(BOOT, BOOT_AD.replace("Save 20%", "Take 20% off"))
    # The tone is style, not fact: a playful ad for the friendly brief's product and offer is faithful.
    playful = BOOT_AD.replace("Introducing", "Fall in love with").replace("Shop it today.", "Your cart is calling.")
    assert parse_ad(playful) == {**BOOT, "tone": "playful"}
    assert fidelity(BOOT, playful)
    assert not fidelity(BOOT, SOUNDBAR_AD)
    # And a brief whose offer differs from the ad's is not matched by it.
    for row in sample_task_rows(50, seed=13):
        other_offer = "50% off" if row["brief"]["offer"] != "50% off" else "10% off"
        assert not fidelity({**row["brief"], "offer": other_offer}, row["messages"][1]["content"])


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "Buy now!",
        BOOT_AD[:-1],
        BOOT_AD + " Extra.",
        BOOT_AD.replace("the Northpeak", "the  Northpeak"),
        BOOT_AD.replace("hiking boot", "yoga mat"),  # a fitness product with footwear materials
        BOOT_AD.replace("Shop it today.", "Your cart is calling."),  # tones do not mix within an ad
        format_brief(BOOT),
    ],
)
def test_garbage_is_invalid(garbage):
    assert parse_ad(garbage) is None
    assert not fidelity(BOOT, garbage)


def test_fidelity_refuses_a_brief_text_it_cannot_read():
    with pytest.raises(ValueError, match="not a brief text"):
        fidelity("Write an ad for boots", BOOT_AD)


def test_distinct_n_on_hand_made_lists():
    texts = ["a b c", "a b d"]
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # (a b) twice, (b c), (b d)
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert distinct_n(["same words here"] * 5, 2) == pytest.approx(2 / 10)
    assert distinct_n(["one", ""], 2) == 0.0
    with pytest.raises(ValueError):
        distinct_n(texts, 0)


def test_memorisation_counts_exact_copies_of_training_texts():
    assert memorisation(["x", " y ", "z", "y"], ["y", "w"]) == pytest.approx(2 / 4)
    assert memorisation(["x"], []) == 0.0
    assert memorisation([], ["x"]) == 0.0


def test_floor_ratio_sums_rows():
    assert floor_ratio([2.0, 4.0], [1.0, 2.0]) == pytest.approx(2.0)
    assert floor_ratio(3.0, 2.0) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        floor_ratio([1.0], [0.0])


def test_task_scores_on_hand_made_lists():
    briefs = [BOOT, format_brief(SOUNDBAR), BOOT, {**BOOT, "tone": "urgent"}]
    greedy = [
        BOOT_AD,  # valid, faithful, tone right
        SOUNDBAR_AD.replace("free", "half off"),  # valid, wrong offer
        "Save 20% on boots!",  # invalid
        BOOT_AD,  # valid, faithful, wrong tone
    ]
    sampled = [BOOT_AD, SOUNDBAR_AD, BOOT_AD.replace("today only", "until midnight"), "nonsense"]
    scores = task_scores(briefs, greedy, sampled, train_ads=[BOOT_AD, "another ad"])
    assert scores == {
        "n": 4,
        "greedy_valid_pct": 75.0,
        "greedy_faithful_pct": 50.0,
        "greedy_tone_pct": 25.0,
        "sampled_valid_pct": 75.0,
        "sampled_faithful_pct": 75.0,
        "sampled_tone_pct": 75.0,
        "sampled_distinct_2": pytest.approx(distinct_n(sampled, 2)),
        "sampled_memorised_pct": 25.0,
    }
    with pytest.raises(ValueError, match="sampled_texts has 3 texts for 4 briefs"):
        task_scores(briefs, greedy, sampled[:3], train_ads=[])
    with pytest.raises(ValueError, match="no briefs"):
        task_scores([], [], [], train_ads=[])


def test_is_embedded_task_only_for_briefs_of_the_grammar():
    prompts = [r["messages"][0]["content"] for r in sample_task_rows(20, seed=14)]
    assert is_embedded_task(prompts)
    assert is_embedded_task(p + PROMPT_SUFFIX for p in prompts)
    assert not is_embedded_task([])
    assert not is_embedded_task(["Summarise this article:"])
    assert not is_embedded_task([*prompts, format_brief({**BOOT, "product": "Acme rocket"})])
