"""Task metrics of the embedded brief -> ad task (see `aigc.corpus`), on plain strings, without torch.

For generated ads: *validity* (the ad parses under the grammar), *fidelity* (the parsed ad names the
brief's product, category and offer), *diversity* (distinct-n over sampled ads, and *memorisation*: the
share of exact copies of training ads), and the ratio of a model's completion nats to the exact floor.
The functions take strings, so they do not depend on how the text was generated. On data that is not the
embedded task (`is_embedded_task` is False) validity and fidelity do not exist; distinct-n, memorisation
and the floor-free metrics still apply.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from aigc.corpus import DEFAULT_GRAMMAR, brief_choices, brief_of, parse_brief

__all__ = [
    "distinct_n", "fidelity", "floor_ratio", "is_embedded_task", "memorisation", "parse_ad", "parse_brief",
    "task_scores",
]

FIDELITY_FIELDS = ("product", "category", "offer")  # the tone is scored apart: it is style, not fact

Brief = Mapping[str, str] | str


def parse_ad(text: str) -> dict[str, str] | None:
    """The brief an ad spells out (product, category, offer, tone), or None if the ad is not valid.

    Surrounding whitespace is ignored (a completion may start with a space or end with a newline);
    everything else must be exactly a sentence sequence of the grammar.
    """
    derivation = DEFAULT_GRAMMAR.derivation(text.strip())
    return None if derivation is None else brief_of(derivation)


def _as_brief(brief: Brief) -> Mapping[str, str]:
    if isinstance(brief, str):
        parsed = parse_brief(brief)
        if parsed is None:
            raise ValueError(f"not a brief text: {brief!r}")
        return parsed
    return brief


def _faithful(parsed: Mapping[str, str] | None, want: Mapping[str, str]) -> bool:
    return parsed is not None and all(parsed[f] == want[f] for f in FIDELITY_FIELDS)


def fidelity(brief: Brief, ad_text: str) -> bool:
    """Whether the ad is valid and names the brief's product, category and offer (a dict or brief text)."""
    return _faithful(parse_ad(ad_text), _as_brief(brief))


def is_embedded_task(prompts: Iterable[str]) -> bool:
    """Whether every prompt (at least one) is a brief of the embedded grammar, so validity and fidelity apply.

    A prompt may end with the prompt/completion separator (surrounding whitespace is ignored).
    """
    seen = False
    for prompt in prompts:
        brief = parse_brief(prompt)
        if brief is None:
            return False
        try:
            brief_choices(brief)
        except ValueError:
            return False
        seen = True
    return seen


def distinct_n(texts: Iterable[str], n: int = 2) -> float:
    """Distinct n-grams / all n-grams of whitespace words, pooled over ``texts`` (Li et al., 2016); 0 if none."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total, distinct = 0, set()
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        distinct.update(grams)
    return len(distinct) / total if total else 0.0


def memorisation(texts: Sequence[str], train_texts: Iterable[str]) -> float:
    """Share (0..1) of ``texts`` that are exact copies of a training text (surrounding whitespace ignored)."""
    if not texts:
        return 0.0
    train = {t.strip() for t in train_texts}
    return sum(t.strip() in train for t in texts) / len(texts)


def floor_ratio(model_nats: float | Iterable[float], floor_nats: float | Iterable[float]) -> float:
    """Model nats over the exact floor nats (sums when given per-row values); 1.0 is the best any model can do."""
    model = model_nats if isinstance(model_nats, int | float) else sum(model_nats)
    floor = floor_nats if isinstance(floor_nats, int | float) else sum(floor_nats)
    if floor <= 0:
        raise ValueError(f"floor nats must be > 0, got {floor}")
    return model / floor


def task_scores(
    briefs: Sequence[Brief],
    greedy_texts: Sequence[str],
    sampled_texts: Sequence[str],
    train_ads: Iterable[str],
) -> dict[str, float]:
    """Validity and fidelity of greedy and sampled ads, and the diversity of the sampled ones, in percent.

    ``briefs`` (dicts or brief texts) pair one to one with ``greedy_texts`` and with ``sampled_texts``
    (repeat a brief to score several samples of it). Returns ``n`` and ``{greedy,sampled}_valid_pct``,
    ``{greedy,sampled}_faithful_pct`` (product, category and offer right), ``{greedy,sampled}_tone_pct``
    (the tone right too, counted among faithful ads), ``sampled_distinct_2`` (a fraction) and
    ``sampled_memorised_pct`` (exact copies of ``train_ads``).
    """
    for name, texts in (("greedy_texts", greedy_texts), ("sampled_texts", sampled_texts)):
        if len(texts) != len(briefs):
            raise ValueError(f"{name} has {len(texts)} texts for {len(briefs)} briefs")
    if not briefs:
        raise ValueError("no briefs to score")
    wants = [_as_brief(b) for b in briefs]
    scores: dict[str, float] = {"n": len(briefs)}
    for mode, texts in (("greedy", greedy_texts), ("sampled", sampled_texts)):
        parsed = [parse_ad(t) for t in texts]
        faithful = [_faithful(p, w) for p, w in zip(parsed, wants, strict=True)]
        toned = [f and p["tone"] == w["tone"] for f, p, w in zip(faithful, parsed, wants, strict=True)]
        scores[f"{mode}_valid_pct"] = 100.0 * sum(p is not None for p in parsed) / len(texts)
        scores[f"{mode}_faithful_pct"] = 100.0 * sum(faithful) / len(texts)
        scores[f"{mode}_tone_pct"] = 100.0 * sum(toned) / len(texts)
    scores["sampled_distinct_2"] = distinct_n(sampled_texts, 2)
    scores["sampled_memorised_pct"] = 100.0 * memorisation(sampled_texts, train_ads)
    return scores
