"""Text normalisation, script counting and per-document quality filters.

Everything runs once per document over tens of GB, so the per-character work is
done by C code (``str`` methods, ``re``, ``unicodedata`` and one numpy table
lookup) and Python only loops over lines and words, never over characters.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

import numpy as np

# --- normalisation -----------------------------------------------------------------

# Cc is exactly U+0000-001F and U+007F-009F. \t and \n carry layout and survive (\r
# is folded into \n before this runs). U+FEFF (a BOM left in the middle of text by
# concatenated files) and U+200B (zero-width space) are invisible and only split
# words; U+200C/U+200D are kept because ZWJ joins emoji sequences (and ZWNJ is
# meaningful in Persian and Indic scripts).
_INVISIBLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff\u200b]")


def normalize(text: str) -> str:
    """Newlines to ``\\n``, invisible/control characters dropped, then Unicode NFC.

    NFC runs last so that a control character sitting between a conjoining jamo
    and its vowel cannot keep the pair from composing into one syllable
    ('ᄒ' + 'ᅡ' + 'ᆫ' -> '한'). ASCII text is already NFC, so it skips that step.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _INVISIBLE.sub("", text)
    if text.isascii():
        return text
    # normalize() returns its argument untouched after a quick check when the text
    # is already NFC, which is the common case, so this costs little.
    return unicodedata.normalize("NFC", text)


# --- scripts ------------------------------------------------------------------------

SCRIPTS = ("hangul", "latin", "han", "other")
_NOT_LETTER, _HANGUL, _LATIN, _HAN, _OTHER = range(5)
_N_CODEPOINTS = 0x110000

# Inclusive code point ranges; only letters (str.isalpha) inside them are counted.
_SCRIPT_RANGES = (
    # Hangul syllables, conjoining jamo, compatibility jamo, jamo extended A and B.
    (_HANGUL, ((0xAC00, 0xD7A3), (0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F),
               (0xD7B0, 0xD7FF))),
    # ASCII, Latin-1 and Latin Extended-A/B letters, Latin Extended Additional/C/D/E,
    # and fullwidth A-Z/a-z (common in Korean and Japanese typesetting).
    (_LATIN, ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F), (0x1E00, 0x1EFF), (0x2C60, 0x2C7F),
              (0xA720, 0xA7FF), (0xAB30, 0xAB6F), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A))),
    # CJK unified ideographs (BMP, extension A, compatibility, extensions B-H).
    (_HAN, ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF), (0x20000, 0x323AF))),
)


def _every_codepoint(predicate: str) -> np.ndarray:
    """``str.<predicate>()`` of every code point as a bool array, by numpy's vectorised
    string functions (0.015 s; calling the method on each of the 1.1 M code points takes
    0.13 s, which every ``hcx data prepare`` worker would pay before its first document)."""
    codepoints = np.arange(_N_CODEPOINTS, dtype="<u4")
    if hasattr(np, "strings"):  # numpy >= 2.0; U+0000 reads as the empty string: False
        return getattr(np.strings, predicate)(codepoints.view("<U1"))
    method = getattr(str, predicate)
    return np.fromiter(map(method, map(chr, codepoints.tolist())), dtype=bool,
                       count=_N_CODEPOINTS)


@functools.cache
def _script_table() -> np.ndarray:
    """Script id (uint8) of every code point: a 1.1 MB read-only table built once per
    process, so counting a document is one gather and one bincount."""
    is_letter = _every_codepoint("isalpha")
    table = np.where(is_letter, _OTHER, _NOT_LETTER).astype(np.uint8)
    for script, ranges in _SCRIPT_RANGES:
        for lo, hi in ranges:
            table[lo:hi + 1] = np.where(is_letter[lo:hi + 1], script, _NOT_LETTER)
    table.flags.writeable = False
    return table


def script_counts(text: str) -> dict[str, int]:
    """Letters (``str.isalpha``) per script: ``hangul``, ``latin``, ``han``, ``other``.

    Digits, punctuation, spaces and symbols are not counted at all, so a number-heavy
    table does not dilute a language's share.
    """
    # UTF-32 gives one uint32 per code point; surrogatepass keeps lone surrogates
    # (left by lossy decoding upstream) from raising; they are not letters.
    codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    counts = np.bincount(_script_table()[codepoints], minlength=5)
    return {"hangul": int(counts[_HANGUL]), "latin": int(counts[_LATIN]),
            "han": int(counts[_HAN]), "other": int(counts[_OTHER])}


KO_MIN_HANGUL = 0.3
EN_MIN_LATIN = 0.5


def detect_language(text: str) -> str:
    """``"ko"``, ``"en"`` or ``"other"`` from the shares of counted letters.

    - ``"ko"`` when Hangul is at least 30% of the letters. The bar is low on purpose:
      Korean prose routinely embeds English terms and hanja, and one Hangul
      syllable holds about as much text as 2-3 Latin letters, so a document that is
      a third Hangul is Korean quoting English, not the other way round.
    - else ``"en"`` when Latin letters are at least half. Any Latin-script language
      (French, Vietnamese, ...) is labelled ``"en"`` here: the corpus is Korean and
      English, and this label only routes documents.
    - else ``"other"``: other scripts dominate, or the text has no letters at all.
    """
    counts = script_counts(text)
    letters = sum(counts.values())
    if letters == 0:
        return "other"
    if counts["hangul"] >= KO_MIN_HANGUL * letters:
        return "ko"
    if counts["latin"] >= EN_MIN_LATIN * letters:
        return "en"
    return "other"


# --- quality filters ----------------------------------------------------------------

LANGUAGES = ("ko", "en", "code", "any")


@dataclass
class FilterConfig:
    """Thresholds of :func:`filter_reason` (defaults follow Gopher/RefinedWeb)."""

    min_chars: int = 20
    max_chars: int = 1_000_000
    # Characters in non-empty lines that repeat an earlier line of the same document,
    # over the characters of all non-empty lines (lines compared stripped).
    max_duplicate_line_fraction: float = 0.3
    # Gopher's "top 2-gram character fraction": see top_bigram_fraction.
    max_top_char_ngram_fraction: float = 0.2
    # Share of counted letters in the declared language's script (ko: Hangul, en: Latin).
    min_language_fraction: float = 0.5


def duplicate_line_fraction(text: str) -> float:
    """Characters of non-empty lines that repeat an earlier line, over all non-empty
    line characters (Gopher's duplicate-line character fraction). Lines are compared
    after stripping, so trailing spaces or indentation do not hide a repeat."""
    lines = [s for s in map(str.strip, text.split("\n")) if s]
    total = sum(map(len, lines))
    if total == 0:
        return 0.0
    repeated = sum(len(line) * (n - 1) for line, n in Counter(lines).items() if n > 1)
    return repeated / total


def top_bigram_fraction(text: str) -> float:
    """Characters covered by the most frequent word 2-gram, over ``len(text)``.

    As Gopher (and datatrove's GopherRepetitionFilter): words split on whitespace,
    the top 2-gram's characters (``len(w1) + 1 + len(w2)``) times its count, where
    overlapping occurrences all count, so 'spam spam spam ...' scores about 1.8.
    A 2-gram seen once is not repetition, so the score is 0 then; without that rule
    every short document would fail (one 2-gram of a five-word text is 40% of it).
    Among 2-grams of equal count the first one in the text wins (``Counter.most_common``).

    Long texts are counted by hashing (:func:`top_bigram_fraction_hashed`: 2x faster at
    3,000 characters, 4x at 10,000; ``str.split`` and ``Counter`` had been a tenth of
    ``hcx data prepare``'s time), short ones by ``Counter`` (numpy's per-call overhead
    dominates below ~1,500); both give exactly the same answer.
    """
    if len(text) >= HASHED_MIN_CHARS:
        fraction = top_bigram_fraction_hashed(text)
        if fraction is not None:
            return fraction
    return top_bigram_fraction_counted(text)


def top_bigram_fraction_counted(text: str) -> float:
    """:func:`top_bigram_fraction` by ``Counter`` over ``str.split()``: the definition."""
    words = text.split()
    if len(words) < 2 or not text:
        return 0.0
    (first, second), count = Counter(zip(words, words[1:])).most_common(1)[0]
    if count < 2:
        return 0.0
    return count * (len(first) + 1 + len(second)) / len(text)


HASHED_MIN_CHARS = 2000      # where hashing overtakes Counter (~1,500 on the data benchmark)
WORD_HASH_BASE = 0x9E3779B97F4A7C15   # odd, so invertible mod 2**64
_PAIR_MIX = np.uint64(0xC2B2AE3D27D4EB4F)


@functools.cache
def _space_table() -> np.ndarray:
    """``str.isspace`` of every code point: what ``str.split()`` splits on."""
    table = _every_codepoint("isspace")
    table.flags.writeable = False
    return table


@functools.lru_cache(maxsize=2)
def _powers(size: int, base: int) -> tuple[np.ndarray, np.ndarray]:
    """``base**i`` and ``base**-i`` mod 2**64 for ``i < size`` (uint64 products wrap).
    Asked for in powers of two from 2**16 (1 MB), so one table serves most texts."""
    up = np.full(size, base, dtype=np.uint64)
    up[0] = 1
    down = np.full(size, pow(base, -1, 2**64), dtype=np.uint64)
    down[0] = 1
    return np.cumprod(up), np.cumprod(down)


def top_bigram_fraction_hashed(text: str) -> float | None:
    """:func:`top_bigram_fraction` without a Python object per word: the words are the
    runs of non-space code points, each hashed as ``sum(cp[i] * B**i) + length`` from
    one prefix sum, each 2-gram as a mix of its two word hashes; one sort counts them.

    Hashes can collide, but a collision only merges 2-grams (adding their counts), so
    if the winner's occurrences all hold the same two words, no merged hash hid a
    2-gram that beats it, and the answer is exact. Otherwise returns None (the caller
    counts with ``Counter``); that takes a collision of 64-bit hashes on the winner.
    """
    codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    n = codepoints.size
    in_word = np.zeros(n + 2, dtype=bool)   # padded with a space at either end
    in_word[1:-1] = ~_space_table()[codepoints]
    # Word starts and ends alternate among the places where in_word changes.
    edges = np.flatnonzero(in_word[1:] != in_word[:-1])
    starts, ends = edges[0::2], edges[1::2]
    if starts.size < 2:
        return 0.0
    up, down = _powers(max(1 << 16, 1 << (n - 1).bit_length()), WORD_HASH_BASE)
    prefix = np.zeros(n + 1, dtype=np.uint64)   # uint64 arithmetic wraps mod 2**64
    np.cumsum(codepoints * up[:n], out=prefix[1:])
    words = (prefix[ends] - prefix[starts]) * down[starts] + (ends - starts).astype(np.uint64)
    pairs = words[:-1] * _PAIR_MIX ^ words[1:]
    ordered = np.sort(pairs)
    run_starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    counts = np.diff(np.append(run_starts, ordered.size))
    count = int(counts.max())
    if count < 2:
        return 0.0
    tied = ordered[run_starts[counts == count]]
    # Counter.most_common's winner: the first seen among equal counts.
    first = int(np.argmax(pairs == tied[0] if tied.size == 1 else np.isin(pairs, tied)))
    w1, w2 = text[starts[first]:ends[first]], text[starts[first + 1]:ends[first + 1]]
    for i in np.flatnonzero(pairs == pairs[first]).tolist():
        if text[starts[i]:ends[i]] != w1 or text[starts[i + 1]:ends[i + 1]] != w2:
            return None
    return count * (len(w1) + 1 + len(w2)) / len(text)


def filter_reason(text: str, language: str, config: FilterConfig) -> str | None:
    """None to keep ``text``, else why it is dropped: ``"too_short"``, ``"too_long"``,
    ``"language"``, ``"duplicate_lines"`` or ``"repetition"`` (cheapest checks first).

    ``language`` is what the source declares: ``"ko"``/``"en"`` get the language
    check (a document with no letters fails it), ``"code"`` and ``"any"`` do not.
    Code gets only the length checks. Both repetition checks are prose heuristics
    that real source fails by nature: on 3,000 random ``.py`` files from
    site-packages, 4.5% (httpx's client, torch's batchnorm, ...) repeat more than 30%
    of their line characters in lines such as ``)``, ``else:``, ``self,`` or
    ``tm.assert_series_equal(result, expected)``. Repeated code is left to the
    near-duplicate pass (minhash). Lengths are counted after stripping surrounding
    whitespace.
    """
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    n = len(text.strip())
    if n < config.min_chars:
        return "too_short"
    if n > config.max_chars:
        return "too_long"
    if language in ("ko", "en"):
        counts = script_counts(text)
        letters = sum(counts.values())
        own = counts["hangul" if language == "ko" else "latin"]
        if letters == 0 or own < config.min_language_fraction * letters:
            return "language"
    if language == "code":
        return None
    if duplicate_line_fraction(text) > config.max_duplicate_line_fraction:
        return "duplicate_lines"
    if top_bigram_fraction(text) > config.max_top_char_ngram_fraction:
        return "repetition"
    return None
