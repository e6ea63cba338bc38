"""Embedded training corpus: commerce ad copy from a probabilistic grammar whose entropy is known exactly.

A language model trained on text from a known distribution has a known floor: its expected loss per
document can never go below the entropy of that distribution. Because the grammar below is unambiguous
(every string has exactly one derivation), the probability of a document equals the probability of its
derivation, so each document's exact negative log-likelihood (``nats``) and the corpus entropy are known.
Evaluation can then report how many nats per document a model is above the floor, not just a raw loss.

Grammar notation: each rule maps a name to weighted alternatives; an alternative is a template whose
``{name}`` parts expand other rules and whose other characters are literal text, concatenated as they stand.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import random
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_REF = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class _Ref:
    """A template part that expands another rule (literal parts are plain ``str``)."""

    name: str


_Part = str | _Ref
# A chart cell: log of the summed probability of all derivations of a span, and how many there are.
_Cell = tuple[float, int]


def _parse_template(template: str) -> tuple[_Part, ...]:
    parts: list[_Part] = []
    pos = 0
    for m in _REF.finditer(template):
        if m.start() > pos:
            parts.append(template[pos : m.start()])
        parts.append(_Ref(m.group(1)))
        pos = m.end()
    if pos < len(template):
        parts.append(template[pos:])
    return tuple(parts)


def _logaddexp(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi))


def _accumulate(cells: dict[int, _Cell], end: int, logp: float, count: int) -> None:
    """Merge derivations that reach the same end position: probabilities add, counts add."""
    if end in cells:
        old_logp, old_count = cells[end]
        cells[end] = (_logaddexp(old_logp, logp), old_count + count)
    else:
        cells[end] = (logp, count)


class Grammar:
    """A non-recursive probabilistic context-free grammar over literal text.

    ``rules`` maps a rule name to ``(weight, template)`` alternatives; weights are normalised per rule.
    Recursion is rejected because it is not needed for ad copy and it keeps `entropy` a finite recursion.
    """

    def __init__(self, rules: Mapping[str, Sequence[tuple[float, str]]], start: str) -> None:
        if start not in rules:
            raise ValueError(f"start rule {start!r} is not defined")
        self.start = start
        self._alts: dict[str, list[tuple[float, tuple[_Part, ...]]]] = {}
        self._cum_weights: dict[str, list[float]] = {}
        for name, alts in rules.items():
            if not alts:
                raise ValueError(f"rule {name!r} has no alternatives")
            templates = [t for _, t in alts]
            dupes = sorted({t for t in templates if templates.count(t) > 1})
            if dupes:
                # Two identical alternatives would give every string through them two derivations.
                raise ValueError(f"rule {name!r} repeats alternatives {dupes}")
            weights = [float(w) for w, _ in alts]
            if not all(math.isfinite(w) and w > 0 for w in weights):
                raise ValueError(f"rule {name!r} has a weight that is not a positive number: {weights}")
            total = sum(weights)
            self._alts[name] = [
                (math.log(w / total), _parse_template(t)) for w, t in zip(weights, templates, strict=True)
            ]
            self._cum_weights[name] = [sum(weights[: i + 1]) for i in range(len(weights))]
        for name, alts in self._alts.items():
            for _, parts in alts:
                for part in parts:
                    if isinstance(part, _Ref) and part.name not in self._alts:
                        raise ValueError(f"rule {name!r} refers to undefined rule {part.name!r}")
        self._check_acyclic_and_reachable()
        self._entropy: dict[str, float] = {}

    def _children(self, name: str) -> set[str]:
        return {p.name for _, parts in self._alts[name] for p in parts if isinstance(p, _Ref)}

    def _check_acyclic_and_reachable(self) -> None:
        done: set[str] = set()
        on_path: list[str] = []

        def visit(name: str) -> None:
            if name in on_path:
                cycle = " -> ".join(on_path[on_path.index(name) :] + [name])
                raise ValueError(f"grammar is recursive: {cycle}")
            if name in done:
                return
            on_path.append(name)
            for child in sorted(self._children(name)):
                visit(child)
            on_path.pop()
            done.add(name)

        visit(self.start)
        unused = sorted(set(self._alts) - done)
        if unused:
            raise ValueError(f"rules not reachable from {self.start!r}: {unused}")

    def sample(self, rng: random.Random) -> tuple[str, float]:
        """Draw one document; return it with the exact log-probability (nats) of its derivation."""
        out: list[str] = []
        logp = self._expand(self.start, rng, out)
        return "".join(out), logp

    def _expand(self, name: str, rng: random.Random, out: list[str]) -> float:
        cum = self._cum_weights[name]
        i = bisect.bisect_right(cum, rng.random() * cum[-1])
        logp, parts = self._alts[name][i]
        for part in parts:
            if isinstance(part, str):
                out.append(part)
            else:
                logp += self._expand(part.name, rng, out)
        return logp

    def entropy(self, name: str | None = None) -> float:
        """Exact entropy (nats) of the derivations of ``name`` (default: a whole document).

        H(rule) = H(choice among its alternatives) + sum_i p_i * sum of H(rule) for each rule alternative i
        expands: the parts of a sequence are drawn independently, so their entropies add. For an
        unambiguous grammar this is also the entropy of the generated strings.
        """
        name = self.start if name is None else name
        if name not in self._entropy:
            h = 0.0
            for logp, parts in self._alts[name]:
                p = math.exp(logp)
                h += -p * logp + p * sum(self.entropy(x.name) for x in parts if isinstance(x, _Ref))
            self._entropy[name] = h
        return self._entropy[name]

    def logprob(self, text: str) -> float:
        """Log-probability (nats) of ``text`` summed over every derivation; -inf outside the language.

        This parses exhaustively instead of trusting the sampler, so comparing it with the sampler's
        log-probability checks that a document has no second derivation.
        """
        return self._parse(text)[0]

    def count_derivations(self, text: str) -> int:
        """How many derivations produce ``text``: 1 in an unambiguous grammar, 0 outside the language."""
        return self._parse(text)[1]

    def _parse(self, text: str) -> _Cell:
        # Chart parse by memoised top-down search: spans(rule, pos) gives, for every end position the rule
        # can reach from pos, the summed probability and number of its derivations of text[pos:end].
        # The grammar is non-recursive, so the recursion depth is bounded by the grammar's depth.
        memo: dict[tuple[str, int], dict[int, _Cell]] = {}

        def spans(name: str, pos: int) -> dict[int, _Cell]:
            key = (name, pos)
            if key in memo:
                return memo[key]
            result: dict[int, _Cell] = {}
            for alt_logp, parts in self._alts[name]:
                frontier: dict[int, _Cell] = {pos: (alt_logp, 1)}
                for part in parts:
                    advanced: dict[int, _Cell] = {}
                    for p, (lp, n) in frontier.items():
                        if isinstance(part, str):
                            if text.startswith(part, p):
                                _accumulate(advanced, p + len(part), lp, n)
                        else:
                            for end, (lq, m) in spans(part.name, p).items():
                                _accumulate(advanced, end, lp + lq, n * m)
                    frontier = advanced
                    if not frontier:
                        break
                for end, (lp, n) in frontier.items():
                    _accumulate(result, end, lp, n)
            memo[key] = result
            return result

        return spans(self.start, 0).get(len(text), (-math.inf, 0))


def _uniform(items: Sequence[str]) -> list[tuple[float, str]]:
    return [(1.0, item) for item in items]


@dataclass(frozen=True)
class _Category:
    """The vocabulary one product category contributes; every document names exactly one product."""

    products: tuple[str, ...]
    materials: tuple[str, ...]
    benefits: tuple[str, ...]
    details: tuple[str, ...]
    slogans: tuple[str, ...]
    audiences: tuple[str, ...]


_CATEGORIES: dict[str, _Category] = {
    "footwear": _Category(
        products=("running shoe", "trail runner", "walking sneaker", "hiking boot", "slip-on loafer",
                  "court sneaker", "recovery sandal", "rain boot"),
        materials=("breathable mesh upper", "recycled knit upper", "waterproof leather", "cushioned foam midsole",
                   "grippy rubber outsole", "lightweight carbon plate", "memory foam insole", "reinforced toe cap"),
        benefits=("all-day comfort", "a springy stride", "sure footing on wet trails", "a snug locked-in fit",
                  "blister-free miles", "quick-dry performance", "support where you need it", "a barely-there feel"),
        details=("Built for long runs and everyday errands.", "Tested on city streets and mountain trails.",
                 "Designed with podiatrists for natural alignment.", "Light enough to pack, tough enough to last.",
                 "Each pair is stitched by hand.", "The heel counter keeps every step steady."),
        slogans=("Comfort that moves with you.", "Every step, lighter.", "Run further. Recover faster.",
                 "Made for the miles ahead.", "Your feet will thank you.", "Go anywhere in comfort."),
        audiences=("runners", "hikers", "commuters", "weekend walkers", "nurses and teachers"),
    ),
    "audio": _Category(
        products=("wireless earbuds", "over-ear headphones", "portable speaker", "soundbar", "smart speaker",
                  "noise-cancelling headphones", "studio monitor", "bluetooth turntable"),
        materials=("custom 40mm drivers", "adaptive noise cancelling", "a 30-hour battery", "spatial audio",
                   "dual beamforming microphones", "memory foam ear cushions", "a water-resistant shell",
                   "multipoint bluetooth"),
        benefits=("studio-quality sound", "deep punchy bass", "crystal-clear calls", "pure focus on the go",
                  "room-filling sound", "all-day listening", "effortless pairing", "distortion-free volume"),
        details=("Tuned by award-winning sound engineers.", "Pairs with your phone in seconds.",
                 "A quick ten-minute charge gives you three hours of play.", "Folds flat to slip into any bag.",
                 "Touch controls put your music at your fingertips.", "Every unit is tested in an anechoic chamber."),
        slogans=("Hear every detail.", "Sound that moves you.", "Turn up the quiet.", "Your music, everywhere.",
                 "Feel the beat.", "Silence the noise, not the music."),
        audiences=("music lovers", "podcast fans", "gamers", "frequent flyers", "home studio producers"),
    ),
    "kitchen": _Category(
        products=("chef's knife", "cast iron skillet", "espresso machine", "stand mixer", "nonstick pan set",
                  "high-speed blender", "air fryer", "pour-over kettle"),
        materials=("forged German steel", "enameled cast iron", "a 15-bar pump", "a ceramic nonstick coating",
                   "a 1200-watt motor", "a stainless steel body", "precision temperature control",
                   "an ergonomic walnut handle"),
        benefits=("restaurant-quality results", "even heat from edge to edge", "effortless cleanup",
                  "cafe-style coffee at home", "silky smooth blends", "crispy results with less oil",
                  "perfect control at every pour", "years of reliable cooking"),
        details=("Dishwasher safe and built to last.", "Heats up in under a minute.",
                 "Chosen by professional chefs worldwide.", "Comes with a recipe book of 50 favorites.",
                 "Its compact footprint fits any counter.", "Balanced for hours of comfortable prep."),
        slogans=("Cook like a pro.", "Good food starts here.", "Made for the way you cook.", "Dinner, done better.",
                 "Your kitchen, upgraded.", "Taste the difference."),
        audiences=("home cooks", "busy families", "coffee lovers", "weekend bakers", "aspiring chefs"),
    ),
    "skincare": _Category(
        products=("vitamin C serum", "daily moisturizer", "gentle cleanser", "mineral sunscreen",
                  "retinol night cream", "hydrating face mask", "eye cream", "lip balm"),
        materials=("hyaluronic acid", "plant-based squalane", "niacinamide", "SPF 50 broad-spectrum protection",
                   "soothing aloe vera", "cold-pressed rosehip oil", "ceramides", "a fragrance-free formula"),
        benefits=("a radiant glow", "deep lasting hydration", "visibly smoother skin", "a calm even complexion",
                  "protection without a white cast", "softer skin overnight", "brighter-looking eyes",
                  "nourished lips all day"),
        details=("Dermatologist tested and safe for sensitive skin.", "Free from parabens and sulfates.",
                 "Absorbs in seconds with no greasy feel.", "Never tested on animals.",
                 "Packaged in fully recyclable glass.", "Results you can see in two weeks."),
        slogans=("Glow from within.", "Your skin, only better.", "Beauty that cares.", "Simply radiant.",
                 "Healthy skin starts today.", "Less routine, more glow."),
        audiences=("sensitive skin", "busy mornings", "every skin type", "minimalist routines", "city living"),
    ),
    "outdoor": _Category(
        products=("ultralight tent", "down sleeping bag", "insulated water bottle", "trekking pole set",
                  "rain jacket", "camping hammock", "headlamp", "daypack"),
        materials=("ripstop nylon", "800-fill responsibly sourced down", "double-wall vacuum insulation",
                   "aircraft-grade aluminum", "a seam-sealed waterproof shell", "a 300-lumen LED",
                   "a padded hip belt", "a packable stuff sack"),
        benefits=("shelter in any weather", "warmth on the coldest nights", "ice-cold water for 24 hours",
                  "steady footing on steep climbs", "dry comfort in a downpour", "easy setup in minutes",
                  "bright light when you need it", "all-day carrying comfort"),
        details=("Field tested from the Alps to the desert.", "Packs down smaller than a loaf of bread.",
                 "Weighs less than two pounds.", "Backed by our lifetime repair promise.",
                 "Sets up in under five minutes.", "Made with bluesign-approved fabrics."),
        slogans=("Adventure awaits.", "Go further, pack lighter.", "Built for the wild.", "Find your trail.",
                 "Nature is calling.", "Every summit starts here."),
        audiences=("backpackers", "campers", "climbers", "trail runners", "weekend explorers"),
    ),
    "home": _Category(
        products=("linen duvet cover", "memory foam pillow", "weighted blanket", "robot vacuum",
                  "smart thermostat", "scented candle", "air purifier", "bath towel set"),
        materials=("stonewashed European linen", "cooling gel memory foam", "glass bead fill", "laser navigation",
                   "learning temperature sensors", "a natural soy wax blend", "a true HEPA filter",
                   "long-staple Turkish cotton"),
        benefits=("deeper more restful sleep", "a calm cozy evening", "spotless floors every day",
                  "lower energy bills", "a warm inviting glow", "fresher cleaner air", "hotel-level softness",
                  "breathable comfort all night"),
        details=("Gets softer with every wash.", "Runs quietly while you sleep.", "Controls easily from your phone.",
                 "Certified free of harmful chemicals.", "Designed to blend into any room.",
                 "Each piece is finished by hand."),
        slogans=("Home, but better.", "Rest easy.", "Comfort you can feel.", "Live beautifully.",
                 "Make yourself at home.", "The little things make a house a home."),
        audiences=("light sleepers", "pet owners", "small apartments", "growing families", "new homeowners"),
    ),
    "fitness": _Category(
        products=("adjustable dumbbell set", "yoga mat", "resistance band kit", "smart jump rope", "foam roller",
                  "fitness tracker", "kettlebell", "indoor cycling bike"),
        materials=("a quick-change dial system", "natural tree rubber", "layered latex bands",
                   "a built-in rep counter", "high-density EVA foam", "a heart rate sensor",
                   "a powder-coated cast iron shell", "magnetic resistance"),
        benefits=("a full-body workout at home", "a stable grip in every pose", "progressive strength training",
                  "smarter cardio sessions", "faster muscle recovery", "real-time progress tracking",
                  "a comfortable confident grip", "a whisper-quiet ride"),
        details=("Replaces a full rack of weights.", "Syncs with your favorite fitness apps.",
                 "Rolls up small for easy storage.", "Includes a guided twelve-week program.",
                 "Engineered to survive daily training.", "Trusted by personal trainers everywhere."),
        slogans=("Stronger every day.", "Your gym, anywhere.", "Train smarter.", "Sweat now, shine later.",
                 "Progress starts at home.", "No excuses, just results."),
        audiences=("home athletes", "yoga lovers", "busy professionals", "beginners", "serious lifters"),
    ),
    "travel": _Category(
        products=("carry-on suitcase", "packing cube set", "travel backpack", "neck pillow", "passport wallet",
                  "garment bag", "duffel bag", "luggage tracker"),
        materials=("a polycarbonate hard shell", "360-degree spinner wheels", "water-repellent nylon",
                   "an RFID-blocking lining", "a compression zipper", "a lay-flat laptop sleeve",
                   "an adjustable memory foam core", "a replaceable battery"),
        benefits=("stress-free boarding", "more room in less space", "hands-free airport runs",
                  "restful sleep on long flights", "organized essentials", "wrinkle-free arrivals",
                  "weekend trips made easy", "peace of mind at every gate"),
        details=("Fits the overhead bin on most airlines.", "Glides smoothly over cobblestones.",
                 "Opens flat like a suitcase.", "Weighs just over five pounds.", "Tracks your bag from any phone.",
                 "Every zipper is tested ten thousand times."),
        slogans=("Travel lighter.", "Ready when you are.", "The world is waiting.", "Pack less, see more.",
                 "Journey in style.", "Go places."),
        audiences=("frequent flyers", "digital nomads", "business travelers", "families on the go",
                   "weekend travelers"),
    ),
}

_BRANDS = (
    "AeroLite", "Nimbus", "Kestrel", "Solace", "Brightwater", "Northpeak", "Verra", "Lumen", "Hollis", "Tidewell",
    "Marlow", "Corvid", "Alder", "Quill", "Ember", "Fathom", "Juniper", "Sable", "Wren", "Halcyon",
    "Orbit", "Cascade", "Meridian", "Pinecrest", "Vela", "Thistle", "Bramble", "Solstice", "Arbor", "Glint",
    "Otter", "Larkspur", "Mosaic", "Cobalt", "Evergreen", "Harbor", "Fable", "Sprig", "Tempo", "Zephyr",
)

# Document types as (weight, template); "@" marks rules local to the product category. Every type names
# the product once, in its head sentence, because a context-free grammar cannot repeat a drawn name.
_DOC_TYPES = (
    (3.0, "{desc_head@} {desc_body@} {cta}"),  # description
    (2.0, "{slogan_head@} {slogan@} {detail@} {tagline@} {cta}"),  # slogan
    (2.0, "{offer_head@} {offer} {cta}"),  # offer
    (2.0, "{desc_head@} {desc_body@} {offer} {cta}"),  # description + offer
    (1.0, "{slogan@} {desc_head@} {desc_body@} {cta}"),  # slogan + description
    (1.0, "{slogan_head@} {slogan@} {offer} {cta}"),  # slogan + offer
)

_CATEGORY_TEMPLATES: dict[str, list[tuple[float, str]]] = {
    "doc@": list(_DOC_TYPES),
    "desc_head@": [(1.0, "{intro} the {brand} {product@}: {material@}, {benefit@}.")],
    # The detail sentence alone, or followed by one spec sentence.
    "desc_body@": [(1.0, "{detail@}"), (1.0, "{detail@} {spec}")],
    "slogan_head@": _uniform(["The {brand} {product@}.", "New from {brand}: the {product@}.",
                              "{brand} presents the {product@}."]),
    "offer_head@": [(1.0, "{offer_intro} the {brand} {product@}.")],
    "tagline@": _uniform(["Designed in {city} for {audience@}.", "Made for {audience@}."]),
}

_SHARED_RULES: dict[str, list[tuple[float, str]]] = {
    "intro": _uniform(["Introducing", "Meet", "Discover", "Say hello to", "Upgrade to"]),
    "brand": _uniform(_BRANDS),
    "spec": _uniform(["Available in {color_count} colors.", "Backed by a {warranty_years}-year warranty.",
                      "Rated {rating} stars by over {reviews} customers.", "Just ${price}.99.",
                      "Ships free in {ship_days} business days."]),
    "color_count": _uniform(["three", "four", "five", "six", "eight"]),
    "warranty_years": _uniform(["one", "two", "three", "five"]),
    "rating": _uniform(["4.5", "4.6", "4.7", "4.8", "4.9"]),
    "reviews": _uniform(["1,000", "2,500", "5,000", "10,000", "25,000"]),
    "price": _uniform(["19", "29", "39", "49", "59", "79", "99", "129", "149", "199", "249"]),
    "ship_days": _uniform(["two", "three", "two to three", "three to five"]),
    "city": _uniform(["Portland", "Copenhagen", "Melbourne", "Kyoto", "Austin", "Lisbon", "Toronto", "Oslo"]),
    "offer_intro": _uniform(["Now on sale:", "Limited-time deal on", "Big savings on", "Don't miss out on",
                             "Just dropped:"]),
    # An offer always carries a perk so that a bare offer document still reaches ~15 words.
    "offer": [(1.0, "{deal} {when}. {perk}")],
    "deal": [(3.0, "Save {pct}%"), (2.0, "Take {pct}% off"), (2.0, "Get {pct}% off your first order"),
             (1.0, "Buy one, get one {bogo}"), (2.0, "Save ${amount} on orders over ${threshold}")],
    "pct": _uniform(["10", "15", "20", "25", "30", "40", "50"]),
    "bogo": _uniform(["free", "half off"]),
    "amount": _uniform(["5", "10", "15", "20", "25"]),
    "threshold": _uniform(["50", "75", "100", "150"]),
    "when": _uniform(["this weekend only", "through Sunday", "for a limited time", "while supplies last",
                      "today only", "until midnight", "through the end of the month", "with code {code}"]),
    "code": [(1.0, "{season}{code_pct}")],
    "season": _uniform(["SPRING", "SUMMER", "FALL", "WINTER", "HOLIDAY"]),
    "code_pct": _uniform(["10", "15", "20", "25"]),
    "perk": _uniform(["Free shipping on orders over ${threshold}.", "Free returns within {return_days} days.",
                      "Members get early access.", "Gift wrapping is on us."]),
    "return_days": _uniform(["30", "60", "90", "100"]),
    "cta": _uniform(["Shop it today.", "Order yours today.", "Add it to your cart.", "Find yours online or in stores.",
                     "Get yours before they're gone.", "Tap to shop the collection.", "Visit your nearest store."]),
}


def _build_rules() -> dict[str, list[tuple[float, str]]]:
    """Instantiate the category-local rules once per category and add the category vocabularies."""
    rules: dict[str, list[tuple[float, str]]] = dict(_SHARED_RULES)
    rules["doc"] = [(1.0, f"{{doc_{cat}}}") for cat in _CATEGORIES]
    for cat, vocab in _CATEGORIES.items():
        for name, alts in _CATEGORY_TEMPLATES.items():
            rules[name.replace("@", f"_{cat}")] = [(w, t.replace("@}", f"_{cat}}}")) for w, t in alts]
        rules[f"product_{cat}"] = _uniform(vocab.products)
        rules[f"material_{cat}"] = _uniform(vocab.materials)
        rules[f"benefit_{cat}"] = _uniform(vocab.benefits)
        rules[f"detail_{cat}"] = _uniform(vocab.details)
        rules[f"slogan_{cat}"] = _uniform(vocab.slogans)
        rules[f"audience_{cat}"] = _uniform(vocab.audiences)
    return rules


DEFAULT_GRAMMAR = Grammar(_build_rules(), start="doc")


def generate(n: int, seed: int) -> list[dict]:
    """``n`` documents as ``{"text", "nats"}`` (nats = -log P(text), exact); the same seed gives the same list."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        text, logp = DEFAULT_GRAMMAR.sample(rng)
        docs.append({"text": text, "nats": -logp})
    return docs


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
    paths: dict[str, str] = {}
    for split, n in counts.items():
        docs = generate(n, _split_seed(seed, split))
        path = out / f"{split}.jsonl"
        _write_atomic(path, "".join(json.dumps(d) + "\n" for d in docs))
        paths[split] = str(path)
    meta = {"entropy_nats_per_doc": DEFAULT_GRAMMAR.entropy(), "seed": seed, "counts": counts}
    _write_atomic(out / "grammar.json", json.dumps(meta, indent=2) + "\n")
    return paths
