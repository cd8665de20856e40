"""Masking personal information: e-mail addresses, Korean resident registration
numbers (주민등록번호) and phone numbers.

Order matters and is fixed in :func:`mask_pii`: e-mail first (a local part may
be a phone number, ``01012345678@naver.com``), then RRNs, then phones, so an RRN is
never half-masked as a phone; international ``+`` numbers go before domestic ones.
Every number pattern refuses to start or end inside a longer run of digits or of
digit groups (``2024-01-15``, ``192.168.0.1``, ``3.11.4``, ``978-89-...``), which is
what keeps dates, versions, IPs, ISBNs and amounts out; they are also not shaped
like any of the patterns below.
"""

from __future__ import annotations

import re

KINDS = ("email", "phone", "rrn")

# The local part (what identifies the person) is masked; the domain is kept, as in
# the HyperCLOVA X report, since ``@naver.com`` is not personal and keeps the text
# looking like an address. Only ASCII is part of an address, so Korean text glued
# to either end ('메일hong@naver.com으로') is not swallowed.
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9_.%+-])[A-Za-z0-9_][A-Za-z0-9._%+-]*"
    r"@((?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,})")

# Not inside a longer number: no digit right before or after, and no digit group
# joined by '.' or '-' either side (the tail of a date, IP, version or ISBN).
# The "before" test is written as a lookbehind placed AFTER the first character
# (``_starts_number``): a pattern that opens with a plain character lets ``re`` skip
# straight to candidate positions: 5-10x faster on Korean text than opening with the
# lookbehind, which is then tried at every position.
_NOT_BEFORE_NUMBER = r"(?!\d)(?![.-]\d)"


def _starts_number(first: str) -> str:
    """``first`` (one digit character or class), not preceded by a digit or digit+[.-]."""
    return first + r"(?<!\d\d)(?<!\d[.-]\d)"


# YYMMDD-GNNNNNN, hyphen optional, with a real month and day and G in 1-8 (1-4 for
# citizens born 1900-2099, 5-8 for registered foreigners). The check digit is NOT
# verified: numbers issued since October 2020 use random digits after G and do not
# satisfy the old checksum.
_RRN = re.compile(
    _starts_number(r"\d")
    + r"\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])-?[1-8]\d{6}"
    + _NOT_BEFORE_NUMBER)

# Korean mobile (010/011/016-019), with one separator kind used throughout or none:
# 010-1234-5678, 010.1234.5678, 010 1234 5678, 01012345678; 3-digit middle groups
# are the pre-2004 numbers still seen in old text.
_MOBILE = r"1[016-9](?P<sep>[-. ]?)\d{3,4}(?P=sep)\d{4}"
# Landlines: Seoul 02, area codes 031-033/041-044/051-055/061-064, 070 (VoIP),
# 050x and 080, as 02-123-4567 or (02) 123-4567. A separator is required: a bare
# 9-11 digit number starting with 0 is as likely an account or case number.
_AREA = r"(?:2|[3-6][1-5]|70|80|50\d)"
_LANDLINE = _AREA + r"(?P<sep2>[-. ])\d{3,4}(?P=sep2)\d{4}"
_PHONE_KR = re.compile(
    r"(?:" + _starts_number("0") + "(?:" + _MOBILE + "|" + _LANDLINE + ")"
    + r"|\(0" + _AREA + r"\) ?\d{3,4}[-. ]\d{4})"
    + _NOT_BEFORE_NUMBER)

# International: '+' (not after a letter, digit or ')', so 'a+12345678' in code is
# arithmetic), then digit groups joined by single separators, optionally one
# '(0)' or '(area)' group. Groups of digits with a required separator between them
# can only be read one way, so the regex cannot backtrack exponentially on long digit
# runs; the 8-15 digit rule (E.164) is checked in _international.
_INTERNATIONAL = re.compile(
    r"\+(?<![A-Za-z0-9_)+]\+)\d+(?:[-. ]?\(\d{1,4}\)[-. ]?\d+)?(?:[-. ]\d+)*" + _NOT_BEFORE_NUMBER)


def _international(match: re.Match[str], counts: dict[str, int]) -> str:
    """Mask a '+' number with 8-15 digits. With more digits, trailing space-separated
    groups are given back first ('+82 10 1234 5678 2024년' masks up to 5678)."""
    number = match.group(0)
    while sum(c.isdigit() for c in number) > 15 and " " in number:
        number = number[:number.rindex(" ")]
    if not 8 <= sum(c.isdigit() for c in number) <= 15:
        return match.group(0)
    counts["phone"] += 1
    return "[PHONE]" + match.group(0)[len(number):]


def mask_pii(text: str) -> tuple[str, dict[str, int]]:
    """Masked text and the number of masks per kind: ``{"email", "phone", "rrn"}``.

    ``hong.gildong+tag@naver.com`` -> ``[EMAIL]@naver.com``, ``900101-1234567`` ->
    ``[RRN]``, ``010-1234-5678`` / ``+82 10-1234-5678`` / ``02-123-4567`` ->
    ``[PHONE]``.
    """
    counts = dict.fromkeys(KINDS, 0)
    if "@" in text:  # most documents have none; skip the scan
        text, counts["email"] = _EMAIL.subn(r"[EMAIL]@\1", text)
    text, counts["rrn"] = _RRN.subn("[RRN]", text)
    if "+" in text:  # before the domestic pass, which would take '010-...' of '+82 010-...'
        text = _INTERNATIONAL.sub(lambda m: _international(m, counts), text)
    text, domestic = _PHONE_KR.subn("[PHONE]", text)
    counts["phone"] += domestic
    return text, counts
