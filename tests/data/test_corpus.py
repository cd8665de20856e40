"""hcx.data.corpus: text cleaning, filters, PII masking, FIM, MinHash-LSH and decontamination,
against hand-computed values.

Measured on one core (Python 3.11, numpy 2.4), ko_legalize_kr_precedents (12 MB of
Korean court decisions): normalize 420-550 MB/s, filter_reason("ko") 37-47 MB/s (58-61 on
2026-12-05's machine; 105-123 there with the hashed 2-gram count), mask_pii ~160 MB/s,
the three chained ~34 MB/s (before the hashed count);
MinHasher.signature (128 bins, 5-grams) ~40 M tokens/s (one-permutation hashing; 4.5-6 M with
128 permutations); NgramIndex.labels_hit
against a 20M n-gram index ~8 M tokens/s.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from fractions import Fraction
from math import comb
from pathlib import Path

import numpy as np
import pytest

from hcx.data.corpus import clean
from hcx.data.corpus.clean import (FilterConfig, detect_language, duplicate_line_fraction, filter_reason,
                              normalize, script_counts, top_bigram_fraction,
                              top_bigram_fraction_counted, top_bigram_fraction_hashed)
from hcx.data.corpus.decontam import NgramIndex
from hcx.data.corpus.fim import FimIds, fim_layout, fim_split
from hcx.data.corpus.minhash import LSHIndex, MinHasher, jaccard_estimate, ngram_hashes
from hcx.data.corpus.pii import mask_pii

ROOT = Path(__file__).resolve().parents[2]

KO_PROSE = (
    "대한민국은 동아시아의 한반도 남부에 위치한 민주공화국이다. 수도는 서울특별시이며, "
    "인구는 약 5천만 명이다. 한국어를 공용어로 사용하고 한글을 고유 문자로 쓴다. "
    "1948년 정부 수립 이후 급속한 경제 성장을 이루었고, 오늘날 반도체와 자동차, 조선 산업에서 "
    "세계적인 경쟁력을 갖추고 있다. 최근에는 영화와 음악 같은 대중문화도 널리 알려졌다.")
EN_PROSE = (
    "The quick development of large language models has changed how software is written. "
    "Researchers train these models on large collections of text gathered from the web, "
    "books and code, and then adapt them to follow instructions. Careful cleaning of the "
    "training data matters as much as the size of the model, because repeated or broken "
    "text wastes compute and teaches the model bad habits.")
PY_SOURCE = '''\
def merge(left: list[int], right: list[int]) -> list[int]:
    """Merge two sorted lists."""
    out = []
    i = j = 0
    while i < len(left) and j < len(right):
        if left[i] <= right[j]:
            out.append(left[i])
            i += 1
        else:
            out.append(right[j])
            j += 1
    out.extend(left[i:])
    out.extend(right[j:])
    return out


def merge_sort(items: list[int]) -> list[int]:
    if len(items) <= 1:
        return items
    mid = len(items) // 2
    return merge(merge_sort(items[:mid]), merge_sort(items[mid:]))
'''


# --- clean: normalize -----------------------------------------------------------------


@pytest.mark.parametrize("raw, clean", [
    ("a\r\nb\rc\n", "a\nb\nc\n"),                                  # CRLF and lone CR
    ("\u1112\u1161\u11ab\u1100\u116e\u11a8", "한국"),                # conjoining jamo -> NFC
    ("\u1112\x00\u1161", "하"),                                    # control char between jamo
    ("e\u0301te\u0301", "été"),                                    # combining accent -> NFC
    ("a\x00b\x07c\td\n\x0b\x0c\x1b\x7f\x85\x9fe", "abc\td\ne"),     # Cc except \t \n
    ("\ufeff안녕\u200b하세요", "안녕하세요"),                         # BOM, zero-width space
    ("👨\u200d👩\u200d👧 a\u200cb", "👨\u200d👩\u200d👧 a\u200cb"),  # ZWJ/ZWNJ kept
    ("hello\x01 world\r\n", "hello world\n"),                      # ASCII fast path
])
def test_normalize(raw, clean):
    assert normalize(raw) == clean


def test_normalize_keeps_already_clean_text():
    assert normalize(KO_PROSE) == KO_PROSE
    assert normalize(PY_SOURCE) == PY_SOURCE


# --- clean: scripts and language ------------------------------------------------------


def test_script_counts_hand_counted():
    # 3 Hangul, 3 + 4 (é) Latin, 2 Han, 6 Cyrillic; digits, spaces, punctuation not counted
    assert script_counts("한국어 abc 漢字 Привет 123 !? café") == {
        "hangul": 3, "latin": 7, "han": 2, "other": 6}
    # compatibility jamo (ㅋ U+314B), fullwidth Latin, Latin Extended Additional (ệ)
    assert script_counts("ㅋㅋ ＡＢｃ Việt") == {"hangul": 2, "latin": 7, "han": 0, "other": 0}
    assert script_counts("") == {"hangul": 0, "latin": 0, "han": 0, "other": 0}
    assert script_counts("12 + 3 = 15 ✓ 😀") == {"hangul": 0, "latin": 0, "han": 0, "other": 0}


def test_script_counts_letters_are_str_isalpha():
    """The per-code-point table behind script_counts (built vectorised) counts exactly what
    ``str.isalpha`` calls a letter, over all 1,114,112 code points, surrogates included."""
    every = "".join(map(chr, range(0x110000)))
    counts = script_counts(every)
    assert sum(counts.values()) == sum(map(str.isalpha, every))
    hangul = "".join(map(chr, range(0xAC00, 0xD7A4)))  # every precomposed syllable
    assert script_counts(hangul) == {"hangul": 11172, "latin": 0, "han": 0, "other": 0}


@pytest.mark.parametrize("text, language", [
    ("안녕하세요 hello", "ko"),        # 5 / 10 Hangul
    ("가나다 abcdefg", "ko"),          # exactly 30% Hangul
    ("가나 abcdefgh", "en"),           # 20% Hangul, 80% Latin
    ("This is 한국", "en"),            # 2 / 8 Hangul
    ("Привет, мир", "other"),
    ("漢字漢字 ab", "other"),           # 4 Han, 2 Latin: Latin is a third
    ("12345 !!!", "other"),            # no letters
    ("", "other"),
])
def test_detect_language(text, language):
    assert detect_language(text) == language


# --- clean: filters -------------------------------------------------------------------


def test_filter_config_defaults():
    assert FilterConfig() == FilterConfig(min_chars=20, max_chars=1_000_000,
                                          max_duplicate_line_fraction=0.3,
                                          max_top_char_ngram_fraction=0.2,
                                          min_language_fraction=0.5)


def test_length_limits_count_stripped_characters():
    cfg = FilterConfig()
    assert filter_reason("  " + "a" * 19 + "\n\n", "any", cfg) == "too_short"
    assert filter_reason("  abcdefghij klmnopqrs\n\n", "any", cfg) is None  # 20 chars
    assert filter_reason("x" * 51, "any", FilterConfig(max_chars=50)) == "too_long"
    assert filter_reason("x" * 50, "any", FilterConfig(max_chars=50)) is None


def test_duplicate_line_fraction_hand_computed():
    # non-empty stripped lines: 10 + 10 + 10 (repeat) + 10 (repeat, indented) = 40 chars
    text = "abcdefghij\nklmnopqrst\n\nabcdefghij\n   abcdefghij  \n"
    assert duplicate_line_fraction(text) == 20 / 40
    assert duplicate_line_fraction("one\ntwo\nthree") == 0.0
    assert duplicate_line_fraction("\n \n") == 0.0
    # exactly at the limit is kept: 7 distinct 10-char lines + 3 repeats of one = 30/100
    lines = [f"line{i:02d}....." for i in range(7)] + ["line00....."] * 3
    lines = [line[:10] for line in lines]
    text = "\n".join(lines)
    assert duplicate_line_fraction(text) == pytest.approx(0.3)
    no_rep = FilterConfig(max_top_char_ngram_fraction=10.0)
    assert filter_reason(text, "any", no_rep) is None
    assert filter_reason(text + "\nline00....", "any", no_rep) == "duplicate_lines"


def test_top_bigram_fraction_hand_computed():
    # bigrams (a,b) x2, (b,a), (b,c): the top covers 2 x len("a b") = 6 of 9 characters
    assert top_bigram_fraction("a b a b c") == 6 / 9
    assert top_bigram_fraction("one two three four") == 0.0    # no 2-gram seen twice
    assert top_bigram_fraction("word") == 0.0
    spam = "spam " * 200
    assert top_bigram_fraction(spam) == 199 * len("spam spam") / 1000


# Every kind of character str.split() splits on, and words in three scripts.
SPACES = [" ", "  ", "\t", "\n", "\u3000", "\xa0", "\x1c", "\u2028", "\x85", " \n "]
WORDS = ["a", "b", "ab", "ba", "spam", "한국", "국한", "법률", "제1조", "漢字", "é", "x" * 40]


def random_text(rng: np.random.Generator, words: int) -> str:
    picked = rng.choice(len(WORDS), size=words)
    gaps = rng.choice(len(SPACES), size=words + 1)
    parts = [SPACES[gaps[0]] if rng.random() < 0.3 else ""]
    for w, g in zip(picked.tolist(), gaps[1:].tolist()):
        parts += [WORDS[w], SPACES[g]]
    return "".join(parts) if rng.random() < 0.5 else "".join(parts).rstrip(" ")


def test_top_bigram_fraction_hashed_equals_counted():
    """The hashed count gives exactly Counter's answer: Unicode whitespace of every kind
    as str.split() reads it, leading/trailing spaces, ties (the first 2-gram seen wins),
    overlapping repeats, and texts on either side of the switch-over length."""
    rng = np.random.default_rng(0)
    texts = [random_text(rng, n) for n in rng.integers(2, 3000, size=150)]
    texts += ["spam " * 1000, "a b " * 600 + "c d " * 600, "c d " * 600 + "a b " * 600,
              "x" * 5000, " " * 5000, "ab ab ba ba " * 300]
    assert any(len(t) >= clean.HASHED_MIN_CHARS for t in texts)
    for text in texts:
        expected = top_bigram_fraction_counted(text)
        assert top_bigram_fraction_hashed(text) == expected, text[:80]
        assert top_bigram_fraction(text) == expected
    # a tie: (a, bb) and (c, d) both occur 600 times; the first seen wins, not the shorter
    assert top_bigram_fraction_hashed("a bb " * 600 + "c d " * 600) == 600 * len("a bb") / 5400


def test_top_bigram_fraction_hashed_counts_exactly_when_hashes_collide(monkeypatch):
    """With base 1 a word's hash is its code point sum plus its length, so anagrams
    collide: (ab, cd) and (ba, dc) share a 2-gram hash, 2 + 3 = 5 occurrences that
    outnumber the true winner (ba, dc) x 3. The check of the winner's words sees it and
    the text is counted with Counter."""
    monkeypatch.setattr(clean, "WORD_HASH_BASE", 1)
    text = "ab cd ab cd " + "ba dc " * 3 + " ".join(f"w{i:04d}x" for i in range(400))
    assert len(text) >= clean.HASHED_MIN_CHARS
    assert top_bigram_fraction_hashed(text) is None
    assert top_bigram_fraction(text) == top_bigram_fraction_counted(text) == 3 * 5 / len(text)


def test_space_table_is_str_isspace():
    every = "".join(map(chr, range(0x110000)))
    table = clean._space_table()
    assert np.flatnonzero(table).tolist() == [i for i, c in enumerate(every) if c.isspace()]


def test_spam_fails_and_prose_and_code_pass():
    cfg = FilterConfig()
    spam = "spam " * 200
    assert filter_reason(spam, "en", cfg) == "repetition"
    assert filter_reason(spam, "any", cfg) == "repetition"
    assert filter_reason("스팸 " * 200, "ko", cfg) == "repetition"
    assert filter_reason(KO_PROSE, "ko", cfg) is None
    assert filter_reason(KO_PROSE, "any", cfg) is None
    assert filter_reason(EN_PROSE, "en", cfg) is None
    assert filter_reason(EN_PROSE, "any", cfg) is None
    assert filter_reason(PY_SOURCE, "code", cfg) is None
    # repeated lines are normal in code: only prose is held to the duplicate-line limit
    calls = "".join(f"result = compute(\n    value_{i},\n    strict=True,\n)\n" for i in range(6))
    assert duplicate_line_fraction(calls) > 0.3
    assert filter_reason(calls, "any", cfg) == "duplicate_lines"
    assert filter_reason(calls, "code", cfg) is None
    assert filter_reason(spam, "code", cfg) is None


def test_language_check():
    cfg = FilterConfig()
    assert filter_reason(EN_PROSE, "ko", cfg) == "language"
    assert filter_reason(KO_PROSE, "en", cfg) == "language"
    assert filter_reason("1234567890 1234567890 12345", "ko", cfg) == "language"  # no letters
    assert filter_reason(KO_PROSE, "code", cfg) is None
    assert filter_reason(EN_PROSE, "any", cfg) is None
    # 12 Hangul, 12 Latin: exactly half passes at 0.5 and fails at 0.6
    half = "한국어 텍스트입니다 그리고 여기 abcdef ghijkl"
    assert filter_reason(half, "ko", cfg) is None
    assert filter_reason(half, "ko", FilterConfig(min_language_fraction=0.6)) == "language"
    with pytest.raises(ValueError):
        filter_reason(KO_PROSE, "korean", cfg)


def test_real_korean_and_english_documents_pass(shared_data):
    cfg = FilterConfig()
    for name, language in (("ko_legalize_kr_laws", "ko"), ("en_sotu_addresses", "en")):
        path = shared_data / "train/pretrain" / name / "train.jsonl"
        texts = [normalize(json.loads(line)["text"]) for line in path.open()][:300]
        reasons = Counter(filter_reason(t, language, cfg) for t in texts)
        assert reasons[None] >= 0.98 * len(texts), (name, reasons)
        assert all(detect_language(t) == language for t in texts if len(t) > 200)


# --- pii --------------------------------------------------------------------------------


@pytest.mark.parametrize("text, masked, counts", [
    ("hong.gildong+tag@naver.com", "[EMAIL]@naver.com", (1, 0, 0)),
    ("문의: kim_01@mail.example.co.kr 로 보내주세요", "문의: [EMAIL]@mail.example.co.kr 로 보내주세요",
     (1, 0, 0)),
    ("메일hong@naver.com으로", "메일[EMAIL]@naver.com으로", (1, 0, 0)),
    ("01012345678@naver.com", "[EMAIL]@naver.com", (1, 0, 0)),
    ("연락처: 010-1234-5678입니다", "연락처: [PHONE]입니다", (0, 1, 0)),
    ("010.1234.5678 / 010 1234 5678 / 01012345678", "[PHONE] / [PHONE] / [PHONE]", (0, 3, 0)),
    ("011-123-4567, 019-1234-5678", "[PHONE], [PHONE]", (0, 2, 0)),
    ("서울 02-123-4567, 경기 031-1234-5678, (02) 123-4567", "서울 [PHONE], 경기 [PHONE], [PHONE]",
     (0, 3, 0)),
    ("+82 10-1234-5678 또는 +82-10-1234-5678", "[PHONE] 또는 [PHONE]", (0, 2, 0)),
    ("+82 010-1234-5678", "[PHONE]", (0, 1, 0)),
    ("call +1 415 555 0100 or +44 (0)20 7946 0958.", "call [PHONE] or [PHONE].", (0, 2, 0)),
    ("+82 10 1234 5678 2024년", "[PHONE] 2024년", (0, 1, 0)),         # 16 digits: year given back
    ("주민등록번호 900101-1234567 입니다", "주민등록번호 [RRN] 입니다", (0, 0, 1)),
    ("번호:9912315234567.", "번호:[RRN].", (0, 0, 1)),                 # no hyphen, foreigner (5)
    ("a@b.io, 010-1111-2222, 020202-4123456", "[EMAIL]@b.io, [PHONE], [RRN]", (1, 1, 1)),
])
def test_mask_pii_positive(text, masked, counts):
    out, n = mask_pii(text)
    assert out == masked
    assert (n["email"], n["phone"], n["rrn"]) == counts


@pytest.mark.parametrize("text", [
    "2024년 3월, 1999년",
    "2024-01-15 와 2024.01.15 와 15/01/2024",
    "총 12345678명, 계좌 123456789012",
    "Python 3.11.4 / numpy 1.26.0",
    "서버 192.168.0.1 과 10.0.0.255",
    "ISBN 978-89-7914-063-5, ISBN 978-0-306-40615-7",
    "금액 1,234,567원, 10,000,000원",
    "19001011234567",                 # a 13-digit RRN shape inside a 14-digit run
    "900132-1234567 901301-1234567",  # day 32, month 13
    "900101-9234567",                 # G = 9
    "x = a+12345678",                 # arithmetic, not a '+' number
    "+1234567",                       # 7 digits: too short for E.164
    "user@localhost",                 # no TLD
    "123-010-1234-5678",              # inside a longer digit-group run
])
def test_mask_pii_negative(text):
    assert mask_pii(text) == (text, {"email": 0, "phone": 0, "rrn": 0})


def test_rrn_is_masked_before_phone():
    # the tail of an RRN must not be read as a phone, nor an RRN half-masked
    assert mask_pii("800215-1012345") == ("[RRN]", {"email": 0, "phone": 0, "rrn": 1})
    assert mask_pii("8002151012345") == ("[RRN]", {"email": 0, "phone": 0, "rrn": 1})


# --- fim ------------------------------------------------------------------------------


def test_fim_thirds():
    rng = np.random.default_rng(0)
    assert fim_split("0123456789", "thirds", rng) == ("012", "345", "6789")  # cuts at 3, 6
    assert fim_split("ab", "thirds", rng) == ("", "a", "b")                  # cuts at 0, 1
    assert fim_split("", "thirds", rng) == ("", "", "")
    with pytest.raises(ValueError):
        fim_split("abc", "halves", rng)


def test_fim_random_reproducible_and_reassembles():
    text = "def f(x):\n    return x * 2\n"
    first = [fim_split(text, "random", np.random.default_rng(7)) for _ in range(2)]
    assert first[0] == first[1]
    rng = np.random.default_rng(123)
    splits = [fim_split(text, "random", rng) for _ in range(500)]
    assert all("".join(parts) == text for parts in splits)
    assert len(set(splits)) > 100                       # really random
    assert any(m == "" for _, m, _ in splits)           # cut points may coincide
    assert any(p == "" for p, _, _ in splits) and any(s == "" for _, _, s in splits)
    assert fim_split("", "random", rng) == ("", "", "")


def test_fim_layouts():
    ids = FimIds(prefix=100, middle=101, suffix=102)
    prefix, middle, suffix = [1, 2], [3], [4, 5]
    assert fim_layout(prefix, middle, suffix, ids, spm=False) == [100, 1, 2, 102, 4, 5, 101, 3]
    assert fim_layout(prefix, middle, suffix, ids, spm=True) == [100, 102, 4, 5, 101, 1, 2, 3]
    assert fim_layout([], [], [], ids, spm=False) == [100, 102, 101]


# --- minhash ----------------------------------------------------------------------------

M64 = 2**64 - 1


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _ngram_hash_reference(window: list[int]) -> int:
    """The documented hash in plain Python integers."""
    h = 0
    for t in window:
        h = (h * 0xD6E8FEB86659FD93 + _splitmix64(t % 2**64)) & M64
    return _splitmix64(h)


def test_ngram_hashes_match_plain_python():
    assert _splitmix64(0) == 0xE220A8397B1DCDAF  # splitmix64's published first output, seed 0
    tokens = [5, 17, 5, 17, 5, 0, 2**31 - 1, -1]
    got = ngram_hashes(np.array(tokens, dtype=np.int64), 3)
    assert got.dtype == np.uint64 and got.shape == (6,)
    assert got.tolist() == [_ngram_hash_reference(tokens[i:i + 3]) for i in range(6)]
    assert got[0] == got[2] and got[0] != got[1]           # equal windows, equal hashes
    assert np.array_equal(ngram_hashes(np.array(tokens, dtype=np.int32), 3), got)
    assert ngram_hashes(np.array([1, 2]), 3).shape == (0,)
    with pytest.raises(TypeError):
        ngram_hashes(np.array([1.0, 2.0]), 1)


def _oph_reference(hasher: MinHasher, tokens: list[int]) -> list[int]:
    """One-permutation hashing with rotation densification, in plain Python."""
    k, n = hasher.num_perm, min(hasher.ngram, len(tokens))
    hashes = [_splitmix64(_ngram_hash_reference(tokens[i:i + n]) ^ int(hasher._salt))
              for i in range(len(tokens) - n + 1)]
    mins: dict[int, int] = {}
    for h in hashes:
        b = ((h >> 32) * k) >> 32
        mins[b] = min(mins.get(b, h), h)
    out = []
    for b in range(k):
        d = next(d for d in range(k) if (b + d) % k in mins)  # next non-empty bin
        out.append(((mins[(b + d) % k] & 0xFFFFFFFF) + d * 0x9E3779B1) & 0xFFFFFFFF)
    return out


@pytest.mark.parametrize("size", [9_000, 40, 5, 3])  # long, sparse bins, one shingle, short
def test_signature_matches_plain_python(size):
    hasher = MinHasher(num_perm=16, ngram=5, seed=3)
    tokens = np.random.default_rng(size).integers(0, 50_000, size)
    got = hasher.signature(tokens)
    assert got.dtype == np.uint32 and got.tolist() == _oph_reference(hasher, tokens.tolist())


def test_signature_basics():
    hasher = MinHasher()
    doc = np.random.default_rng(1).integers(0, 50_000, 1000)
    sig = hasher.signature(doc)
    assert sig.dtype == np.uint32 and sig.shape == (128,)
    assert np.array_equal(sig, hasher.signature(doc.astype(np.int32).copy()))
    assert np.array_equal(sig, MinHasher(seed=1).signature(doc))
    assert not np.array_equal(sig, MinHasher(seed=2).signature(doc))
    assert hasher.signature(np.array([], dtype=np.int64)).tolist() == [0xFFFFFFFF] * 128
    short = hasher.signature(np.array([1, 2, 3]))  # one shingle: the whole document
    assert np.array_equal(short, hasher.signature(np.array([1, 2, 3])))
    assert jaccard_estimate(short, hasher.signature(np.array([1, 2, 4]))) < 0.1
    assert jaccard_estimate(sig, sig) == 1.0
    with pytest.raises(ValueError):
        jaccard_estimate(sig, sig[:64])


def _shingles(tokens: np.ndarray, n: int = 5) -> set[tuple[int, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = _shingles(a.tolist()), _shingles(b.tolist())
    return len(sa & sb) / len(sa | sb)


def test_jaccard_estimate_of_known_overlap():
    hasher = MinHasher()
    # Windows 0..995 vs 332..1327 of a distinct-token sequence: 664 shared 5-grams of 1328.
    a, b = np.arange(1000), np.arange(332, 1332)
    sa, sb = _shingles(a.tolist()), _shingles(b.tolist())
    assert Fraction(len(sa & sb), len(sa | sb)) == Fraction(1, 2)
    assert jaccard_estimate(hasher.signature(a), hasher.signature(b)) == pytest.approx(0.5, abs=0.1)
    # averaged over unrelated seeds the estimator is unbiased (std of one: 0.044)
    estimates = [jaccard_estimate(MinHasher(seed=s).signature(a + 7 * s),
                                  MinHasher(seed=s).signature(b + 7 * s)) for s in range(20)]
    assert np.mean(estimates) == pytest.approx(0.5, abs=0.03)
    assert jaccard_estimate(hasher.signature(a), hasher.signature(a + 5000)) < 0.05


def test_signature_is_the_same_in_another_process():
    code = ("import numpy as np; from hcx.data.corpus.minhash import MinHasher; "
            "print(MinHasher().signature(np.arange(0, 3000, 3)).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""}, check=True, timeout=60)
    assert json.loads(out.stdout) == MinHasher().signature(np.arange(0, 3000, 3)).tolist()


def _lsh_error_exact(threshold: Fraction, bands: int, rows: int) -> Fraction:
    """False-positive + false-negative area of the S-curve, integrated exactly:
    int_0^x (1 - s^r)^b ds = sum_k C(b, k) (-1)^k x^(rk+1) / (rk+1)."""
    def area(x: Fraction) -> Fraction:
        return sum(Fraction(comb(bands, k) * (-1) ** k) * x ** (rows * k + 1) / (rows * k + 1)
                   for k in range(bands + 1))
    below = area(threshold)
    return (threshold - below) + (area(Fraction(1)) - below)


def test_lsh_bands_rows_minimise_exact_error():
    index = LSHIndex(num_perm=128, threshold=0.8)
    assert (index.bands, index.rows) == (9, 13)  # datasketch's choice for the same inputs
    t = Fraction(4, 5)
    errors = {(b, r): _lsh_error_exact(t, b, r)
              for b in range(1, 129) for r in range(1, 128 // b + 1)}
    assert min(errors, key=errors.get) == (9, 13)
    small = LSHIndex(num_perm=32, threshold=0.5)
    assert small.bands * small.rows <= 32
    errors = {(b, r): _lsh_error_exact(Fraction(1, 2), b, r)
              for b in range(1, 33) for r in range(1, 32 // b + 1)}
    assert min(errors, key=errors.get) == (small.bands, small.rows)


def test_lsh_finds_edited_copy_and_not_unrelated():
    rng = np.random.default_rng(5)
    hasher, index = MinHasher(), LSHIndex()
    original = rng.integers(0, 50_000, 2000)
    # 2% of the tokens changed as four edited spans of 10 tokens; each span breaks
    # 10 + 4 five-grams, so the true Jaccard is (1996 - 56) / (1996 + 56).
    edited = original.copy()
    for start in (100, 700, 1200, 1800):
        edited[start:start + 10] = rng.integers(50_000, 60_000, 10)
    assert _jaccard(original, edited) == pytest.approx(1940 / 2052)
    unrelated = rng.integers(0, 50_000, 2000)
    assert index.query_insert(10, hasher.signature(original)) is None
    assert index.query_insert(11, hasher.signature(unrelated)) is None
    assert index.query_insert(12, hasher.signature(edited)) == 10
    assert index.query_insert(13, hasher.signature(original)) == 10
    assert len(index) == 2                                      # duplicates are not inserted
    assert index.query_insert(14, hasher.signature(rng.integers(0, 50_000, 2000))) is None


def test_lsh_scattered_edits_need_a_lower_threshold():
    # 40 single-token edits at random places break up to 5 five-grams each: J ~ 0.82,
    # too close to 0.8 to be reliable there, found at 0.7.
    rng = np.random.default_rng(6)
    hasher, index = MinHasher(), LSHIndex(threshold=0.7)
    original = rng.integers(0, 50_000, 2000)
    edited = original.copy()
    edited[rng.choice(2000, 40, replace=False)] = rng.integers(50_000, 60_000, 40)
    assert 0.78 < _jaccard(original, edited) < 0.86
    assert index.query_insert(1, hasher.signature(original)) is None
    assert index.query_insert(2, hasher.signature(edited)) == 1


def test_lsh_returns_the_earliest_match():
    # windows 0..995 and 400..1395 share 596 of 1396 5-grams (J 0.43: both kept); the
    # query 200..1195 shares 796 of 1196 (J 0.67) with each: the first inserted wins.
    hasher = MinHasher()
    first, second, query = (hasher.signature(np.arange(s, s + 1000)) for s in (0, 400, 200))
    assert jaccard_estimate(first, second) < 0.5
    assert min(jaccard_estimate(query, first), jaccard_estimate(query, second)) >= 0.5
    for keys in ((1, 2), (2, 1)):
        index = LSHIndex(threshold=0.5)
        assert index.query_insert(keys[0], first) is None
        assert index.query_insert(keys[1], second) is None
        assert index.query_insert(3, query) == keys[0]
    with pytest.raises(ValueError):
        index.query_insert(4, query[:64])


# --- decontam -------------------------------------------------------------------------


def _eval_texts() -> dict[int, np.ndarray]:
    rng = np.random.default_rng(11)
    return {label: rng.integers(0, 1000, 60) for label in (1, 2, 3)}


def _filler(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(5000, 6000, size)  # token ids no eval text uses


def test_ngram_index_hits_embedded_passage():
    evals, rng = _eval_texts(), np.random.default_rng(12)
    index = NgramIndex(n=13)
    for label, tokens in evals.items():
        index.add(tokens, label)
    index.freeze()
    assert len(index) == 3 * (60 - 13 + 1)
    passage = evals[3][20:40]  # 20 tokens
    doc = np.concatenate([_filler(rng, 100), passage, _filler(rng, 100)])
    assert index.labels_hit(doc) == {3}
    exactly_13 = np.concatenate([_filler(rng, 50), evals[2][:13], _filler(rng, 50)])
    assert index.labels_hit(exactly_13) == {2}
    only_12 = np.concatenate([_filler(rng, 50), evals[2][5:17], _filler(rng, 50)])
    assert index.labels_hit(only_12) == set()
    assert index.labels_hit(_filler(rng, 1000)) == set()
    assert index.labels_hit(passage[:5]) == set()   # shorter than n


def test_ngram_index_shared_ngram_reports_every_label():
    rng = np.random.default_rng(13)
    shared = rng.integers(0, 1000, 13)
    a = np.concatenate([rng.integers(0, 1000, 20), shared])
    b = np.concatenate([shared, rng.integers(0, 1000, 20)])
    index = NgramIndex(n=13)
    index.add(a, 7)
    index.add(b, 8)
    index.add(b, 8)                    # the same text twice changes nothing
    index.add(shared[:12], 9)          # shorter than n: adds nothing
    assert len(index) == 21 + 21 - 1   # the shared 13-gram counted once
    assert index.labels_hit(np.concatenate([_filler(rng, 30), shared])) == {7, 8}
    assert index.labels_hit(a[:15]) == {7}
    assert index.labels_hit(np.concatenate([a, b])) == {7, 8}


def test_ngram_index_bit_filter_rejects_most_misses():
    rng = np.random.default_rng(15)
    index = NgramIndex(n=13)
    index.add(rng.integers(0, 1000, 5000), 1)
    index.freeze()
    # at least 16 bits per n-gram, so a miss passes the filter with probability <= 1/16
    bits_set = int(np.unpackbits(index._filter).sum())
    assert bits_set <= len(index) and index._filter.size * 8 >= 16 * len(index)


def test_ngram_index_round_trip_and_add_after_freeze(tmp_path):
    evals, rng = _eval_texts(), np.random.default_rng(14)
    index = NgramIndex(n=13)
    for label, tokens in evals.items():
        index.add(tokens, label)
    index.freeze()
    path = tmp_path / "decontam.npz"
    np.savez(path, **index.to_arrays())
    loaded = NgramIndex.from_arrays(**np.load(path))
    assert loaded.n == 13 and len(loaded) == len(index)
    docs = [np.concatenate([_filler(rng, 40), evals[label][i:i + 15], _filler(rng, 40)])
            for label in (1, 2, 3) for i in (0, 45)]
    assert [loaded.labels_hit(d) for d in docs] == [index.labels_hit(d) for d in docs]
    assert [loaded.labels_hit(d) for d in docs] == [{1}, {1}, {2}, {2}, {3}, {3}]
    extra = rng.integers(2000, 3000, 30)
    loaded.add(extra, 4)
    assert loaded.labels_hit(extra) == {4} and len(loaded) == len(index) + 18
