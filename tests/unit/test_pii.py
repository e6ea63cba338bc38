"""PII scrubbing: every kind is caught and counted, ordinary commerce text passes through untouched."""

from __future__ import annotations

import random

import pytest

from aigc.corpus import sample_ads
from aigc.pii import KINDS, scrub, scrub_batch


def _luhn_valid(digits: str) -> bool:
    # Written differently from the module on purpose: double every second digit from the right, sum the
    # decimal digits of the results.
    doubled = [int(c) * (2 if i % 2 else 1) for i, c in enumerate(reversed(digits))]
    return sum(d // 10 + d % 10 for d in doubled) % 10 == 0


def _only(kind: str, n: int) -> dict[str, int]:
    return {k: (n if k == kind else 0) for k in KINDS}


@pytest.mark.parametrize(
    "email", ["jane.doe@example.com", "j.doe+ads@mail.example.co.uk", "SALES_team-1@shop-42.io", "a%b@x.org"]
)
def test_email(email):
    text, counts = scrub(f"Questions? Write to {email} today.")
    assert text == "Questions? Write to [EMAIL] today."
    assert dict(counts) == _only("email", 1)


@pytest.mark.parametrize(
    "phone",
    ["+44 20 7946 0958", "+1 (555) 123-4567", "+33 1 23 45 67 89", "+49-30-901820", "(555) 123-4567",
     "(555)123-4567", "555-123-4567", "555.123.4567", "555 123 4567", "1-800-555-0199"],
)
def test_phone(phone):
    text, counts = scrub(f"Call {phone}, 9am to 5pm.")
    assert text == "Call [PHONE], 9am to 5pm."
    assert dict(counts) == _only("phone", 1)


@pytest.mark.parametrize(
    "card",
    ["4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111", "5555 5555 5555 4444",
     "3782 822463 10005", "378282246310005", "4222222222222", "6011 0009 9013 9424"],
)
def test_card_is_caught_as_a_card_not_as_phones(card):
    assert _luhn_valid("".join(c for c in card if c.isdigit()))
    text, counts = scrub(f"Paid with {card}.")
    assert text == "Paid with [CARD]."
    assert dict(counts) == _only("card", 1)


def test_luhn_decides_which_digit_runs_are_cards():
    rng = random.Random(0)
    runs = ["".join(rng.choice("0123456789") for _ in range(16)) for _ in range(400)]
    valid = [r for r in runs if _luhn_valid(r)]
    assert 20 < len(valid) < 80  # about one in ten
    for run in runs:
        grouped = " ".join(run[i : i + 4] for i in range(0, 16, 4))
        for form in (run, grouped):
            text, counts = scrub(f"ref {form} end")
            if _luhn_valid(run):
                assert (text, counts["card"]) == ("ref [CARD] end", 1)
            else:
                assert (text, sum(counts.values())) == (f"ref {form} end", 0)


def test_card_followed_by_another_number_is_still_caught():
    text, counts = scrub("card 4111 1111 1111 1111 2025 expiry")
    assert text == "card [CARD] 2025 expiry"
    assert counts["card"] == 1


@pytest.mark.parametrize("nid", ["123-45-6789", "078-05-1120", "AB123456C", "AB 12 34 56 C", "JG103759A"])
def test_national_id(nid):
    text, counts = scrub(f"ID {nid} on file.")
    assert text == "ID [NATIONAL_ID] on file."
    assert dict(counts) == _only("national_id", 1)


@pytest.mark.parametrize(
    "not_an_id",
    # SSN area 000, 666 and 9xx, group 00 and serial 0000 are never issued; NINO suffix is A-D, the prefix
    # letters D F I Q U V (and O second) and the prefixes BG GB NK KN TN NT ZZ are never issued.
    ["000-12-3456", "666-12-3456", "912-34-5678", "123-00-4567", "123-45-0000", "AB123456E", "DA123456A",
     "AO123456B", "BG123456A", "ZZ123456D", "ab123456c"],
)
def test_numbers_that_cannot_be_national_ids_are_kept(not_an_id):
    text, counts = scrub(f"ID {not_an_id} on file.")
    assert text == f"ID {not_an_id} on file."
    assert sum(counts.values()) == 0


def test_ordinary_commerce_text_is_untouched():
    texts = [d["text"] for d in sample_ads(1000, seed=21)]
    texts.append(
        "Only $19.99, save 20% in 2024 with code SPRING20. SKU 4821-330, model X200, ISBN 978-3-16-148410-0. "
        "Sale ends 2024-05-06 at 12:30. Rated 4.8 stars by over 10,000 customers. Sizes 7 8 9 10 11 12. "
        "Order #123456789012 ships in 3-5 days; 1,299 units left at $1,049.00."
    )
    out, counts = scrub_batch(texts)
    assert out == texts
    assert dict(counts) == dict.fromkeys(KINDS, 0)


def test_mixed_text_with_every_kind():
    text = (
        "Hi, I'm Sam (sam.lee@example.com, +44 20 7946 0958 or 555.123.4567). "
        "Card 5555-5555-5555-4444, NINO QQ123456C? No: AB123456C. SSN 123-45-6789. Order total $59.99."
    )
    out, counts = scrub(text)
    assert out == (
        "Hi, I'm Sam ([EMAIL], [PHONE] or [PHONE]). "
        "Card [CARD], NINO QQ123456C? No: [NATIONAL_ID]. SSN [NATIONAL_ID]. Order total $59.99."
    )
    assert dict(counts) == {"email": 1, "phone": 2, "card": 1, "national_id": 2}


def test_scrub_batch_sums_counts_and_keeps_order():
    texts = ["mail a@b.com", "nothing here", "call 555-123-4567 or mail c@d.org"]
    out, counts = scrub_batch(texts)
    assert out == ["mail [EMAIL]", "nothing here", "call [PHONE] or mail [EMAIL]"]
    assert dict(counts) == {"email": 2, "phone": 1, "card": 0, "national_id": 0}
    assert scrub_batch([]) == ([], dict.fromkeys(KINDS, 0))
