"""Embedded data: commerce ad copy from a probabilistic grammar, as a plain corpus and as a brief -> ad task.

The grammar (see `aigc.grammar`) first draws a product brief, then an ad for it:

- the brief: a category, a product of that category (brand + product type), a tone and an offer;
- the ad: one of five ad types whose sentences use the category's words (`aigc.adwords`) and the tone's
  words, and which names the product once and states the offer once, in one of its kind's phrasings.

Every brief choice is spelled out by the ad and the grammar is unambiguous, so the ad alone determines
its brief: p(ad) = p(brief) * p(ad | brief). The plain corpus (`sample_ads`, `write_corpus`) is the marginal
over ads, the pre-training text; the task (`sample_task_rows`, `write_task_corpus`) pairs each ad with its
brief, and its rows carry the exact ``-ln p(ad | brief)``, the floor of a model's completion loss.

The brief text (a prompt's user turn), fields in this order, one per line, no trailing newline::

    Product: Northpeak hiking boot
    Category: footwear
    Offer: $10 off orders over $50
    Tone: playful

Offers are ``{pct}% off``, ``${amount} off orders over ${threshold}`` or ``buy one, get one {free|half off}``.

The data also drifts (`DRIFT_WEEKS`, for `aigc.refresh`): week 0 is the original task data and each later week a
batch whose distribution has moved (seasonal offers, a new category, a product line retired). A week's grammar is
DEFAULT_GRAMMAR reweighted (`week_grammar`), never extended, so every week's ad parses under DEFAULT_GRAMMAR
(validity and fidelity keep their meaning) while its rows carry the exact nats under their own week's grammar.
The functions that sample take `week` (None: DEFAULT_GRAMMAR, the files byte for byte as before drift existed).

`ensure_embedded_corpus` writes the files once into the user's cache for ``data.source: embedded``; like the
rest of this module it needs no Ray and no torch.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import random
import string
import tempfile
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aigc.adwords import BRANDS, CATEGORIES, TONES
from aigc.config import DataSection
from aigc.grammar import Choice, Grammar

SPLITS = ("train", "validation", "test")  # the splits written here, and the ones every loader reads


def _uniform(items: Iterable[str]) -> list[tuple[float, str]]:
    return [(1.0, item) for item in items]


# Ad types as (weight, template): "@" marks rules local to the category, "~" rules local to the tone.
# Every type names the product once and states the offer once: a context-free grammar cannot repeat a
# drawn name, and the parse must find the brief's product and offer in the ad.
_AD_TYPES = (
    (3.0, "{intro~} the {brand} {product@}: {material@}, {benefit@}. {offer} {cta~}"),  # description
    (2.0, "{offer_intro~} the {brand} {product@}. {offer} {cta~}"),  # offer first
    (1.0, "The {brand} {product@}. {slogan@} {offer} {cta~}"),  # slogan
    (1.0, "The {brand} {product@}. {detail@} {offer} {cta~}"),  # detail
    (2.0, "{intro~} the {brand} {product@}, made for {audience@}. {offer} {cta~}"),  # audience
)

# Offer kinds: the rule whose phrasings state the offer in an ad, and the brief's text of the offer,
# a format over the rules that hold its numbers. The kind and the numbers are brief choices; the
# phrasing is the ad's.
_OFFER_KINDS: dict[str, str] = {
    "deal_pct": "{pct}% off",
    "deal_amount": "${amount} off orders over ${threshold}",
    "deal_bogo": "buy one, get one {bogo}",
}

_SHARED_RULES: dict[str, list[tuple[float, str]]] = {
    "brand": _uniform(BRANDS),
    "offer": [(1.0, "{deal} {when}.")],
    "deal": [(3.0, "{deal_pct}"), (2.0, "{deal_amount}"), (1.0, "{deal_bogo}")],
    "deal_pct": _uniform(["Save {pct}%", "Take {pct}% off", "Get {pct}% off your first order"]),
    "deal_amount": _uniform(["Save ${amount} on orders over ${threshold}",
                             "Take ${amount} off orders over ${threshold}"]),
    "deal_bogo": [(1.0, "Buy one, get one {bogo}")],
    "pct": _uniform(["10", "15", "20", "25", "30", "40", "50"]),
    "amount": _uniform(["5", "10", "15", "20", "25"]),
    "threshold": _uniform(["50", "75", "100", "150"]),
    "bogo": _uniform(["free", "half off"]),
    "when": _uniform(["this weekend only", "through Sunday", "for a limited time", "while supplies last",
                      "today only", "until midnight"]),
}


def _build_rules() -> dict[str, list[tuple[float, str]]]:
    """Instantiate the ad types once per (category, tone) and add the category and tone vocabularies."""
    rules: dict[str, list[tuple[float, str]]] = dict(_SHARED_RULES)
    # The brief's category and tone are the first two choices of a derivation.
    rules["doc"] = [(1.0, f"{{ad_{cat}}}") for cat in CATEGORIES]
    for cat, vocab in CATEGORIES.items():
        rules[f"ad_{cat}"] = [(1.0, f"{{ad_{cat}_{tone}}}") for tone in TONES]
        for tone in TONES:
            rules[f"ad_{cat}_{tone}"] = [
                (w, t.replace("@}", f"_{cat}}}").replace("~}", f"_{tone}}}")) for w, t in _AD_TYPES
            ]
        for field in ("product", "material", "benefit", "detail", "slogan", "audience"):
            rules[f"{field}_{cat}"] = _uniform(getattr(vocab, f"{field}s"))
    for tone, words in TONES.items():
        for field in ("intro", "offer_intro", "cta"):
            rules[f"{field}_{tone}"] = _uniform(getattr(words, f"{field}s"))
    return rules


DEFAULT_GRAMMAR = Grammar(_build_rules(), start="doc")

# ------------------------------------------------------------------------------------------- drift


@dataclass(frozen=True)
class DriftWeek:
    """One week of the drifting data: what changed, and the weights that change it (rule -> template -> weight;
    0 removes an alternative) on top of DEFAULT_GRAMMAR."""

    name: str
    weights: dict[str, dict[str, float]]


def _ad_type_weights(kind: int, weight: float) -> dict[str, dict[str, float]]:
    """Ad type `kind` (an index of `_AD_TYPES`) given `weight` in every (category, tone), as `_build_rules` spells it."""
    template = _AD_TYPES[kind][1]
    return {f"ad_{cat}_{tone}": {template.replace("@}", f"_{cat}}}").replace("~}", f"_{tone}}}"): weight}
            for cat in CATEGORIES for tone in TONES}


_NO_TRAVEL = {"{ad_travel}": 0.0}  # the travel line launches in week 2
# Weights are relative to the rule's others (default 1 for the categories and `when`; deal kinds 3:2:1; ad types
# 3:2:1:1:2), so "bogo 6" makes buy-one-get-one offers 6/11 of all offers instead of 1/6.
DRIFT_WEEKS: tuple[DriftWeek, ...] = (
    DriftWeek("original data: seven categories (travel not launched yet)", {"doc": _NO_TRAVEL}),
    DriftWeek("holiday season: buy-one-get-one and 'until midnight' offers, slogan ads, audio and kitchen gifts",
              {"doc": {**_NO_TRAVEL, "{ad_audio}": 3.0, "{ad_kitchen}": 3.0},
               "deal": {"{deal_bogo}": 6.0}, "when": {"until midnight": 8.0, "today only": 4.0},
               **_ad_type_weights(2, 6.0)}),
    DriftWeek("a new category: travel launches and leads, offer-first ads",
              {"doc": {"{ad_travel}": 4.0}, **_ad_type_weights(1, 8.0)}),
    DriftWeek("a product line retired: no more footwear; travel stays; detail ads",
              {"doc": {"{ad_footwear}": 0.0, "{ad_travel}": 4.0}, **_ad_type_weights(3, 8.0)}),
)


@functools.cache
def week_grammar(week: int) -> Grammar:
    """The grammar of week `week` of `DRIFT_WEEKS` (DEFAULT_GRAMMAR reweighted); ValueError past the last week."""
    if not 0 <= week < len(DRIFT_WEEKS):
        raise ValueError(f"week {week}: the embedded drift has weeks 0..{len(DRIFT_WEEKS) - 1}")
    return DEFAULT_GRAMMAR.reweight(DRIFT_WEEKS[week].weights)


def grammar_of(week: int | None) -> Grammar:
    """DEFAULT_GRAMMAR for None, else the week's grammar."""
    return DEFAULT_GRAMMAR if week is None else week_grammar(week)

# ------------------------------------------------------------------------------------------- briefs

BRIEF_FIELDS = ("product", "category", "offer", "tone")
_LABELS = {field: field.capitalize() for field in BRIEF_FIELDS}
# The prompt of a prompt -> completion row: the brief text and a newline, so the ad starts a line as a
# document of the plain corpus starts after the end-of-text token.
PROMPT_SUFFIX = "\n"


def _offer_table() -> dict[str, dict[str, str]]:
    """Every offer a brief can carry, as its text -> the grammar choices that make it."""
    table: dict[str, dict[str, str]] = {}
    for kind, fmt in _OFFER_KINDS.items():
        names = [name for _, name, _, _ in string.Formatter().parse(fmt) if name]
        for values in itertools.product(*(DEFAULT_GRAMMAR.alternatives(n) for n in names)):
            chosen = dict(zip(names, values, strict=True))
            table[fmt.format(**chosen)] = {"deal": f"{{{kind}}}", **chosen}
    return table


_OFFERS = _offer_table()


def format_brief(brief: Mapping[str, str]) -> str:
    """The brief's text: ``Field: value`` lines in `BRIEF_FIELDS` order (the format in the module docstring)."""
    return "\n".join(f"{_LABELS[field]}: {brief[field]}" for field in BRIEF_FIELDS)


def parse_brief(text: str) -> dict[str, str] | None:
    """The brief fields of a brief text (surrounding whitespace ignored); None if it is not in the format."""
    lines = text.strip().split("\n")
    if len(lines) != len(BRIEF_FIELDS):
        return None
    brief = {}
    for field, line in zip(BRIEF_FIELDS, lines, strict=True):
        label, sep, value = line.partition(": ")
        if not sep or label != _LABELS[field] or not value.strip() or value != value.strip():
            return None
        brief[field] = value
    return brief


def brief_choices(brief: Mapping[str, str]) -> dict[str, str]:
    """The grammar choices (rule -> alternative) that make ``brief``; ValueError if the grammar has no such brief."""
    cat, tone, offer = brief["category"], brief["tone"], brief["offer"]
    brand, _, product = brief["product"].partition(" ")
    if cat not in CATEGORIES or tone not in TONES or offer not in _OFFERS:
        raise ValueError(f"not a brief of the embedded grammar: {dict(brief)}")
    if brand not in BRANDS or product not in CATEGORIES[cat].products:
        raise ValueError(f"not a product of category {cat!r}: {brief['product']!r}")
    return {"doc": f"{{ad_{cat}}}", f"ad_{cat}": f"{{ad_{cat}_{tone}}}", "brand": brand,
            f"product_{cat}": product, **_OFFERS[offer]}


def brief_of(derivation: Iterable[Choice]) -> dict[str, str]:
    """The brief that a derivation of an ad (`Grammar.derivation` or a sampling trace) spells out."""
    chosen = dict(derivation)  # each brief rule is taken once per ad
    cat = chosen["doc"][len("{ad_") : -1]
    tone = chosen[f"ad_{cat}"][len(f"{{ad_{cat}_") : -1]
    kind = chosen["deal"][1:-1]
    return {
        "product": f"{chosen['brand']} {chosen[f'product_{cat}']}",
        "category": cat,
        "offer": _OFFER_KINDS[kind].format(**chosen),
        "tone": tone,
    }


def brief_logprob(brief: Mapping[str, str], week: int | None = None) -> float:
    """Log-probability (nats) of ``brief`` under the grammar's prior over briefs (of week `week`, if given)."""
    g = grammar_of(week)
    return sum(g.choice_logprob(rule, alt) for rule, alt in brief_choices(brief).items())


def _brief_key(brief: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(brief[field] for field in BRIEF_FIELDS)


def conditional_grammar(brief: Mapping[str, str], week: int | None = None) -> Grammar:
    """The grammar of ads for ``brief`` (in week `week`, if given): its ``logprob(ad)`` is the exact ``ln p(ad | brief)``."""
    return _conditional(_brief_key(brief), week)


@functools.lru_cache(maxsize=256)
def _conditional(key: tuple[str, ...], week: int | None) -> Grammar:
    return grammar_of(week).condition(brief_choices(dict(zip(BRIEF_FIELDS, key, strict=True))))


def brief_entropy(week: int | None = None) -> float:
    """Entropy (nats) of the brief prior (of week `week`, if given); the plain corpus entropy minus it is the mean
    conditional floor."""
    slots = {"doc", "brand", "deal", *(f"ad_{c}" for c in CATEGORIES), *(f"product_{c}" for c in CATEGORIES)}
    slots |= {name for choices in _OFFERS.values() for name in choices}
    return grammar_of(week).choice_entropy(slots)


# ------------------------------------------------------------------------------------------ sampling


def sample_ads(n: int, seed: int) -> list[dict]:
    """``n`` documents as ``{"text", "nats"}`` (nats = -log P(text), exact); the same seed gives the same list."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        text, logp = DEFAULT_GRAMMAR.sample(rng)
        docs.append({"text": text, "nats": -logp})
    return docs


def sample_task_rows(n: int, seed: int, exclude_briefs: Collection[tuple[str, ...]] = (),
                     week: int | None = None) -> list[dict]:
    """``n`` task rows: a brief drawn from the prior and an ad for it, with ``nats`` = -ln p(ad | brief), exact.
    With `week`, drawn from that week's grammar (`week_grammar`), the nats exact under it, and the row says its
    ``week``.

    A row is OpenAI chat fine-tuning JSONL plus the brief's fields and the floor::

        {"messages": [{"role": "user", "content": <brief text>}, {"role": "assistant", "content": <ad>}],
         "brief": {"product", "category", "offer", "tone"}, "nats": <float>}

    Briefs whose `BRIEF_FIELDS` values tuple is in ``exclude_briefs`` are drawn again (test briefs unseen in
    training); that reshapes only the prior over briefs, so every row's nats stay exact.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    grammar = grammar_of(week)
    rows: list[dict] = []
    while len(rows) < n:
        # Drawing the whole ad and reading its brief off the derivation draws the brief from the prior and
        # then the ad given the brief: the brief's choices are the derivation's choices at the brief rules.
        trace: list[Choice] = []
        ad, logp = grammar.sample(rng, trace)
        brief = brief_of(trace)
        if _brief_key(brief) in exclude_briefs:
            continue
        rows.append({
            "messages": [{"role": "user", "content": format_brief(brief)}, {"role": "assistant", "content": ad}],
            "brief": brief,
            "nats": brief_logprob(brief, week) - logp,
            **({} if week is None else {"week": week}),
        })
    return rows


def to_prompt_completion(row: Mapping) -> dict:
    """A task row as ``{"prompt", "completion", "nats"}``: prompt = brief text + `PROMPT_SUFFIX`, completion = ad."""
    user, assistant = row["messages"]
    return {"prompt": user["content"] + PROMPT_SUFFIX, "completion": assistant["content"], "nats": row["nats"]}


# -------------------------------------------------------------------------------------------- files


def _split_seed(seed: int, split: str) -> int:
    # A hash, not seed + k, so that split seeds of neighbouring corpus seeds never coincide.
    digest = hashlib.sha256(f"aigc-corpus/{seed}/{split}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    _write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_corpus(
    out_dir: str | os.PathLike[str],
    n_train: int = 4000,
    n_validation: int = 400,
    n_test: int = 400,
    seed: int = 0,
) -> dict[str, str]:
    """Write ``{train,validation,test}.jsonl`` and ``grammar.json`` into ``out_dir``; return the split paths.

    Splits are independent draws (each from its own seed derived from ``seed``), so a short, likely
    document can occur in more than one split, as it would in any sample from the same distribution.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": n_train, "validation": n_validation, "test": n_test}
    paths = {split: _write_jsonl(out / f"{split}.jsonl", sample_ads(n, _split_seed(seed, split)))
             for split, n in counts.items()}
    meta = {"entropy_nats_per_doc": DEFAULT_GRAMMAR.entropy(), "seed": seed, "counts": counts,
            "grammar": DEFAULT_GRAMMAR.fingerprint()}
    _write_atomic(out / "grammar.json", json.dumps(meta, indent=2) + "\n")
    return paths


def _task_file_row(row: dict) -> dict:
    # each row also carries its prompt/completion form, so one file serves data.format chat and prompt_completion
    return {**row, **to_prompt_completion(row)}


def write_drift_batch(path: str | os.PathLike[str], week: int, n: int, seed: int = 0) -> str:
    """Write week `week`'s batch of `n` task rows (`sample_task_rows` with `week`) as one JSONL file, atomically:
    the data that arrives in that week. Its seed is derived from `seed` and the week."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _write_jsonl(out, [_task_file_row(r) for r in sample_task_rows(n, _split_seed(seed, f"drift/{week}"),
                                                                           week=week)])


def write_task_corpus(
    out_dir: str | os.PathLike[str],
    n_train: int = 4000,
    n_validation: int = 400,
    n_test: int = 400,
    seed: int = 0,
    week: int | None = None,
) -> dict[str, str]:
    """Write the brief -> ad task as ``{train,validation,test}.jsonl`` (rows of `sample_task_rows`) and ``task.json``;
    with `week`, that week's data of the drift (the grammar, nats and entropies are the week's).

    No validation brief occurs in train and no test brief in train or validation, so the test measures
    ads for unseen briefs; ``task.json`` records the counts of shared briefs (zero), the seed and the
    entropies: of an ad, of a brief, and of an ad given its brief (the mean floor over the prior).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": n_train, "validation": n_validation, "test": n_test}
    seen: set[tuple[str, ...]] = set()
    briefs: dict[str, set[tuple[str, ...]]] = {}
    paths: dict[str, str] = {}
    for split, n in counts.items():
        rows = sample_task_rows(n, _split_seed(seed, f"task/{split}"), exclude_briefs=seen, week=week)
        briefs[split] = {_brief_key(r["brief"]) for r in rows}
        seen |= briefs[split]
        paths[split] = _write_jsonl(out / f"{split}.jsonl", [_task_file_row(r) for r in rows])
    grammar = grammar_of(week)
    h_ad, h_brief = grammar.entropy(), brief_entropy(week)
    meta = {
        "seed": seed,
        "counts": counts,
        "grammar": grammar.fingerprint(),
        **({} if week is None else {"week": week, "drift": DRIFT_WEEKS[week].name}),
        "shared_briefs": {f"{a}/{b}": len(briefs[a] & briefs[b])
                          for a, b in (("validation", "train"), ("test", "train"), ("test", "validation"))},
        "entropy_nats_per_ad": h_ad,
        "entropy_nats_per_brief": h_brief,
        "conditional_entropy_nats_per_ad": h_ad - h_brief,
    }
    _write_atomic(out / "task.json", json.dumps(meta, indent=2) + "\n")
    return paths


# ------------------------------------------------------------------------------------------- the cache


def embedded_corpus_dir(cfg: DataSection) -> Path:
    """The embedded corpus is generated once per (grammar, kind, seed, sizes) into the user's cache and then read
    as files. `data.format` picks the kind: plain ads for `text` (pre-training), brief -> ad rows otherwise."""
    e = cfg.embedded
    kind = "ads" if cfg.format == "text" else "task"
    root = Path(os.path.expanduser("~/.cache/aigc/corpus"))
    return root / f"{kind}-{DEFAULT_GRAMMAR.fingerprint()}-seed{e.seed}-{e.n_train}-{e.n_validation}-{e.n_test}"


def ensure_embedded_corpus(cfg: DataSection) -> dict[str, str]:
    """split -> path of the embedded corpus's jsonl file, written first if this cache does not hold it yet."""
    out = embedded_corpus_dir(cfg)
    paths = {s: str(out / f"{s}.jsonl") for s in SPLITS}
    if not all(os.path.isfile(p) for p in paths.values()):
        e = cfg.embedded
        write = write_corpus if cfg.format == "text" else write_task_corpus
        paths = write(out, n_train=e.n_train, n_validation=e.n_validation, n_test=e.n_test, seed=e.seed)
    return paths
