"""Replace personal data in training text with placeholders before it is tokenised.

A language model can memorise and later emit strings it saw in training, so e-mail addresses, phone numbers,
payment card numbers and national ID numbers are replaced by ``[EMAIL]``, ``[PHONE]``, ``[CARD]`` and
``[NATIONAL_ID]``. Patterns are deliberately narrow (cards must pass the Luhn check, IDs must follow the
issuing rules) so that prices, percentages, years and product codes in ad copy are left alone.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

KINDS = ("email", "phone", "card", "national_id")

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")

# 13-19 digits, either unbroken or in groups of 3-6 joined by one repeated separator
# (4-4-4-4 for most cards, 4-6-5 for Amex). The Luhn check then rejects ~90% of digit runs that fit.
_CARD = re.compile(
    r"(?<![\w-])(?:\d{13,19}|\d{4}(?P<sep>[ -])\d{3,6}(?:(?P=sep)\d{3,6}){1,3})(?![\w-]|[.,]\d)"
)

# US SSN: area 001-899 except 666, group 01-99, serial 0001-9999.
_SSN = re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])")
# UK National Insurance number: first letter not D F I Q U V, second not D F I O Q U V, prefixes BG GB KN NK
# NT TN ZZ never issued, suffix A-D; written with or without spaces between the digit pairs.
_NINO = re.compile(
    r"\b(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"
)

# International: +country code, then 2-6 groups of digits (any of them may be in parentheses), separated by
# at most one space, dot or dash; 8-15 digits in all (E.164 allows at most 15).
_PHONE_INTL = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,4})){2,6}(?!\w)")
# North American: (555) 123-4567, 555-123-4567, 555.123.4567, 555 123 4567 (the separator repeats), with an
# optional trunk prefix as in 1-800-555-0199.
_PHONE_US = re.compile(
    r"(?<![\w.-])(?:1[-. ])?(?:\(\d{3}\) ?\d{3}-\d{4}|\d{3}(?P<sep>[-. ])\d{3}(?P=sep)\d{4})(?![\w-]|\.\d)"
)


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _digits(s: str) -> str:
    return "".join(ch for ch in s if ch.isdigit())


def _is_card(match: str) -> bool:
    digits = _digits(match)
    return 13 <= len(digits) <= 19 and _luhn_ok(digits)


def _is_intl_phone(match: str) -> bool:
    digits = _digits(match)
    if digits.startswith("1"):
        # Country code 1 is the North American plan, whose national numbers have exactly 10 digits.
        return len(digits) == 11
    return 8 <= len(digits) <= 15


# Order matters: e-mails first (their local part may hold digits), cards before phones so that a card's
# digit groups are not taken for phone numbers, IDs before phones for the same reason.
_RULES: tuple[tuple[str, str, re.Pattern[str], Callable[[str], bool] | None], ...] = (
    ("email", "[EMAIL]", _EMAIL, None),
    ("card", "[CARD]", _CARD, _is_card),
    ("national_id", "[NATIONAL_ID]", _SSN, None),
    ("national_id", "[NATIONAL_ID]", _NINO, None),
    ("phone", "[PHONE]", _PHONE_INTL, _is_intl_phone),
    ("phone", "[PHONE]", _PHONE_US, None),
)


def _longest_valid_prefix(candidate: str, valid: Callable[[str], bool]) -> str | None:
    """Drop trailing digit groups until ``valid`` holds, so a number written right after a card or phone
    number ("4111 1111 1111 1111 2025") does not make the whole run fail and leak the card."""
    while not valid(candidate):
        cut = max(candidate.rfind(sep) for sep in " .-")
        if cut <= 0:
            return None
        candidate = candidate[:cut]
    return candidate


def scrub(text: str) -> tuple[str, Counter]:
    """Return ``text`` with personal data replaced, and how many of each kind were replaced.

    The counter always holds all four kinds, zeros included, so callers can log it as it is.
    """
    counts: Counter = Counter(dict.fromkeys(KINDS, 0))
    for kind, placeholder, pattern, valid in _RULES:

        def replace(
            m: re.Match[str],
            kind: str = kind,
            placeholder: str = placeholder,
            valid: Callable[[str], bool] | None = valid,
        ) -> str:
            found = m.group(0)
            hit = found if valid is None else _longest_valid_prefix(found, valid)
            if hit is None:
                return found
            counts[kind] += 1
            return placeholder + found[len(hit) :]

        text = pattern.sub(replace, text)
    return text, counts


def scrub_batch(texts: list[str]) -> tuple[list[str], Counter]:
    """Scrub each text; return the scrubbed texts and the counts summed over the batch."""
    counts: Counter = Counter(dict.fromkeys(KINDS, 0))
    out = []
    for text in texts:
        clean, c = scrub(text)
        out.append(clean)
        counts.update(c)  # update, not +=, which would drop the zero counts
    return out, counts
