"""A probabilistic grammar whose entropy and string probabilities are known exactly (no torch, no numpy).

A language model trained on text from a known distribution has a known floor: its expected loss per
document can never go below the entropy of that distribution. Because the grammars built on this engine
are unambiguous (every string has exactly one derivation), the probability of a document equals the
probability of its derivation, so each document's exact negative log-likelihood (``nats``) and the
entropy are known. Conditioning fixes the choice of some rules (the brief of a brief -> ad task); the
conditioned grammar gives the exact ``-ln p(ad | brief)``.

Notation: each rule maps a name to weighted alternatives; an alternative is a template whose ``{name}``
parts expand other rules and whose other characters are literal text, concatenated as they stand.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import random
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

_REF = re.compile(r"\{(\w+)\}")

Rules = Mapping[str, Sequence[tuple[float, str]]]
# One step of a derivation: the rule and the template of the alternative it took.
Choice = tuple[str, str]


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

    def __init__(self, rules: Rules, start: str) -> None:
        if start not in rules:
            raise ValueError(f"start rule {start!r} is not defined")
        self.start = start
        self._rules = {name: [(float(w), t) for w, t in alts] for name, alts in rules.items()}
        self._alts: dict[str, list[tuple[float, tuple[_Part, ...]]]] = {}
        self._logp: dict[str, dict[str, float]] = {}  # rule -> template -> log-probability of taking it
        self._cum_weights: dict[str, list[float]] = {}
        for name, alts in self._rules.items():
            if not alts:
                raise ValueError(f"rule {name!r} has no alternatives")
            templates = [t for _, t in alts]
            dupes = sorted({t for t in templates if templates.count(t) > 1})
            if dupes:
                # Two identical alternatives would give every string through them two derivations.
                raise ValueError(f"rule {name!r} repeats alternatives {dupes}")
            weights = [w for w, _ in alts]
            if not all(math.isfinite(w) and w > 0 for w in weights):
                raise ValueError(f"rule {name!r} has a weight that is not a positive number: {weights}")
            total = sum(weights)
            self._logp[name] = {t: math.log(w / total) for w, t in alts}
            self._alts[name] = [(self._logp[name][t], _parse_template(t)) for t in templates]
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

    # ------------------------------------------------------------------------------------- sampling

    def sample(self, rng: random.Random, trace: list[Choice] | None = None) -> tuple[str, float]:
        """Draw one document; return it with the exact log-probability (nats) of its derivation.

        ``trace``, when given, receives the derivation's choices in order (as `derivation` returns them).
        """
        out: list[str] = []
        logp = self._expand(self.start, rng, out, trace)
        return "".join(out), logp

    def _expand(self, name: str, rng: random.Random, out: list[str], trace: list[Choice] | None) -> float:
        cum = self._cum_weights[name]
        i = bisect.bisect_right(cum, rng.random() * cum[-1])
        logp, parts = self._alts[name][i]
        if trace is not None:
            trace.append((name, self._rules[name][i][1]))
        for part in parts:
            if isinstance(part, str):
                out.append(part)
            else:
                logp += self._expand(part.name, rng, out, trace)
        return logp

    # -------------------------------------------------------------------------- entropy, choices

    def entropy(self, name: str | None = None) -> float:
        """Exact entropy (nats) of the derivations of ``name`` (default: a whole document).

        H(rule) = H(choice among its alternatives) + sum_i p_i * sum of H(rule) for each rule alternative i
        expands: the parts of a sequence are drawn independently, so their entropies add. For an
        unambiguous grammar this is also the entropy of the generated strings.
        """
        name = self.start if name is None else name
        if name not in self._entropy:
            self._entropy[name] = self.choice_entropy(None, name)
        return self._entropy[name]

    def choice_entropy(self, rules: Collection[str] | None, name: str | None = None) -> float:
        """Entropy (nats) of the choices made at ``rules`` only (all rules when None) in a derivation.

        When those choices are a function of the document (a brief that its ad spells out), this is the
        entropy of that function, and the document entropy minus it is the conditional entropy given it.
        """
        memo: dict[str, float] = {}

        def h(rule: str) -> float:
            if rule not in memo:
                total = 0.0
                for logp, parts in self._alts[rule]:
                    p = math.exp(logp)
                    if rules is None or rule in rules:
                        total -= p * logp
                    total += p * sum(h(x.name) for x in parts if isinstance(x, _Ref))
                memo[rule] = total
            return memo[rule]

        return h(self.start if name is None else name)

    def fingerprint(self) -> str:
        """A short hash of the rules and weights: files or caches made from another grammar have another one."""
        canonical = json.dumps({"start": self.start, "rules": self._rules}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def alternatives(self, name: str) -> list[str]:
        """The templates of rule ``name``, in the order they were given."""
        return [t for _, t in self._rules[name]]

    def choice_logprob(self, name: str, template: str) -> float:
        """Log-probability that rule ``name`` takes the alternative ``template``."""
        try:
            return self._logp[name][template]
        except KeyError:
            raise ValueError(f"rule {name!r} has no alternative {template!r}") from None

    def condition(self, choices: Mapping[str, str]) -> Grammar:
        """The grammar given that each rule in ``choices`` takes the named alternative.

        Each fixed rule keeps its one alternative with probability 1 and the rules that become unreachable
        are dropped, so for a document that makes those choices ``logprob`` of the result equals this
        grammar's ``logprob`` minus the sum of the choices' ``choice_logprob``.
        """
        for name, template in choices.items():
            self.choice_logprob(name, template)  # raises on an unknown rule or alternative
        rules = {name: [(1.0, choices[name])] if name in choices else alts for name, alts in self._rules.items()}
        return Grammar(_reachable(rules, self.start), start=self.start)

    def reweight(self, weights: Mapping[str, Mapping[str, float]]) -> Grammar:
        """The grammar with the alternatives named in ``weights`` (rule -> template -> weight) given new weights;
        a weight of 0 removes the alternative, and the rules no longer reachable are dropped.

        Every string of the result is a string of this grammar (no alternative is added), so a text that parses
        here parses the same way under the result, and the result's ``logprob`` is exact for its own weights.
        """
        rules = {name: list(alts) for name, alts in self._rules.items()}
        for name, changes in weights.items():
            for template, weight in changes.items():
                self.choice_logprob(name, template)  # raises on an unknown rule or alternative
                if not (math.isfinite(weight) and weight >= 0):
                    raise ValueError(f"rule {name!r}: weight {weight!r} of {template!r} is not >= 0")
            rules[name] = [(changes.get(t, w), t) for w, t in rules[name] if changes.get(t, w) > 0]
            if not rules[name]:
                raise ValueError(f"rule {name!r}: every alternative has weight 0")
        return Grammar(_reachable(rules, self.start), start=self.start)

    # --------------------------------------------------------------------------------------- parsing

    def logprob(self, text: str) -> float:
        """Log-probability (nats) of ``text`` summed over every derivation; -inf outside the language.

        This parses exhaustively instead of trusting the sampler, so comparing it with the sampler's
        log-probability checks that a document has no second derivation.
        """
        return _Chart(self, text).root()[0]

    def count_derivations(self, text: str) -> int:
        """How many derivations produce ``text``: 1 in an unambiguous grammar, 0 outside the language."""
        return _Chart(self, text).root()[1]

    def derivation(self, text: str) -> list[Choice] | None:
        """The choices of the one derivation of ``text`` in sampling order; None outside the language.

        Raises ValueError when ``text`` has more than one derivation: its parse would not be unique.
        """
        chart = _Chart(self, text)
        count = chart.root()[1]
        if count == 0:
            return None
        if count > 1:
            raise ValueError(f"{text!r} has {count} derivations")
        out: list[Choice] = []
        chart.trace(self.start, 0, len(text), out)
        return out


def _reachable(rules: Mapping[str, Sequence[tuple[float, str]]], start: str) -> dict[str, list[tuple[float, str]]]:
    """The rules reachable from ``start``, in their given order (a grammar rejects unreachable rules)."""
    reachable: set[str] = set()
    stack = [start]
    while stack:
        name = stack.pop()
        if name not in reachable:
            reachable.add(name)
            stack.extend(_REF.findall("".join(t for _, t in rules[name])))
    return {name: list(alts) for name, alts in rules.items() if name in reachable}


class _Chart:
    """Chart parse by memoised top-down search over one text.

    ``spans(rule, pos)`` gives, for every end position the rule can reach from pos, the summed probability
    and number of its derivations of text[pos:end]. The grammar is non-recursive, so the recursion depth
    is bounded by the grammar's depth.
    """

    def __init__(self, grammar: Grammar, text: str) -> None:
        self.g = grammar
        self.text = text
        self.memo: dict[tuple[str, int], dict[int, _Cell]] = {}

    def root(self) -> _Cell:
        return self.spans(self.g.start, 0).get(len(self.text), (-math.inf, 0))

    def spans(self, name: str, pos: int) -> dict[int, _Cell]:
        key = (name, pos)
        if key in self.memo:
            return self.memo[key]
        result: dict[int, _Cell] = {}
        for alt_logp, parts in self.g._alts[name]:
            frontier: dict[int, _Cell] = {pos: (alt_logp, 1)}
            for part in parts:
                advanced: dict[int, _Cell] = {}
                for p, (lp, n) in frontier.items():
                    if isinstance(part, str):
                        if self.text.startswith(part, p):
                            _accumulate(advanced, p + len(part), lp, n)
                    else:
                        for end, (lq, m) in self.spans(part.name, p).items():
                            _accumulate(advanced, end, lp + lq, n * m)
                frontier = advanced
                if not frontier:
                    break
            for end, (lp, n) in frontier.items():
                _accumulate(result, end, lp, n)
        self.memo[key] = result
        return result

    def trace(self, name: str, pos: int, end: int, out: list[Choice]) -> None:
        """Append the choices of the derivation of text[pos:end] from ``name`` (known to be unique)."""
        for (_, parts), (_, template) in zip(self.g._alts[name], self.g._rules[name], strict=True):
            bounds = self._split(parts, 0, pos, end)
            if bounds is not None:
                out.append((name, template))
                for part, (a, b) in zip(parts, bounds, strict=True):
                    if isinstance(part, _Ref):
                        self.trace(part.name, a, b, out)
                return
        raise AssertionError(f"no derivation of {name!r} over [{pos}, {end})")

    def _split(self, parts: tuple[_Part, ...], i: int, pos: int, end: int) -> list[tuple[int, int]] | None:
        # The first way parts[i:] cover text[pos:end]; the derivation is unique, so it is the only one.
        if i == len(parts):
            return [] if pos == end else None
        part = parts[i]
        if isinstance(part, str):
            ends = [pos + len(part)] if self.text.startswith(part, pos) else []
        else:
            ends = [e for e in self.spans(part.name, pos) if e <= end]
        for e in ends:
            rest = self._split(parts, i + 1, e, end)
            if rest is not None:
                return [(pos, e), *rest]
        return None
