"""Decontamination: which evaluation sets share a long token n-gram with a document.

Long exact n-grams (13 words, as in GPT-3; see :func:`word_hashes`) rarely occur by
chance, so a training document containing one of a benchmark's n-grams likely
quotes that benchmark. The index is two sorted numpy arrays, queried per document
with a bit filter and ``np.searchsorted`` (no Python loop over n-grams), and
converts to and from plain arrays so the caller can cache it (``np.savez``) and
ship it to worker processes.
"""

from __future__ import annotations

import numpy as np

from hcx.data.corpus.minhash import mix64, ngram_hashes

_POSITION = np.uint64(0x9E3779B97F4A7C15)


def word_hashes(tokens: np.ndarray, starts_word: np.ndarray) -> np.ndarray:
    """One 64-bit hash per word of a token sequence (uint64), for n-grams of *words*.

    A word begins at a token whose text begins with whitespace (``starts_word[id]``,
    from the tokenizer) and at the first token. Counting n-grams in words rather than
    tokens keeps their length independent of the tokenizer: digits are single tokens,
    so "2017년 12월 31일" is 13 tokens but 3 words, and a 13-token n-gram of dates
    would flag half of any legal corpus. Each token is mixed with its position in the
    word and the word's tokens summed (``np.add.reduceat``; no Python loop).
    """
    t = np.asarray(tokens, dtype=np.int64)
    if t.size == 0:
        return np.empty(0, dtype=np.uint64)
    is_start = starts_word[t].astype(bool)
    is_start[0] = True
    starts = np.flatnonzero(is_start)
    position = np.arange(t.size) - starts[np.cumsum(is_start) - 1]
    mixed = mix64(t.astype(np.uint64) ^ (position.astype(np.uint64) * _POSITION))
    return np.add.reduceat(mixed, starts)


class NgramIndex:
    """Hashes of the n-grams of evaluation texts, each with the labels (benchmark
    ids) of the texts it came from.

    ``add`` the texts, ``freeze`` once, then query with ``labels_hit``. Adding after
    ``freeze`` is allowed; queries and ``len`` freeze again when anything is pending.
    """

    def __init__(self, n: int = 13) -> None:
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        self.n = n
        # Frozen state: one entry per distinct (hash, label) pair, sorted by hash
        # then label, so one hash with several labels is a run of equal hashes.
        self._hashes = np.empty(0, dtype=np.uint64)
        self._labels = np.empty(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, int]] = []
        self._filter, self._shift = _bit_filter(self._hashes)

    def add(self, tokens: np.ndarray, label: int) -> None:
        """Add every n-gram of one evaluation text under ``label``; a text shorter than
        ``n`` tokens adds nothing."""
        hashes = ngram_hashes(tokens, self.n)
        if hashes.size:
            self._pending.append((hashes, int(label)))

    def freeze(self) -> None:
        """Sort what was added into the lookup arrays (idempotent)."""
        if not self._pending:
            return
        hashes = np.concatenate([self._hashes, *(h for h, _ in self._pending)])
        labels = np.concatenate([self._labels,
                                 *(np.full(h.size, label, np.int64) for h, label in self._pending)])
        order = np.lexsort((labels, hashes))
        hashes, labels = hashes[order], labels[order]
        keep = np.ones(hashes.size, dtype=bool)  # drop repeated (hash, label) pairs
        keep[1:] = (hashes[1:] != hashes[:-1]) | (labels[1:] != labels[:-1])
        self._hashes, self._labels = hashes[keep], labels[keep]
        self._filter, self._shift = _bit_filter(self._hashes)
        self._pending = []

    def __len__(self) -> int:
        """Number of distinct n-grams."""
        self.freeze()
        if self._hashes.size == 0:
            return 0
        return int(np.count_nonzero(self._hashes[1:] != self._hashes[:-1])) + 1

    def labels_hit(self, tokens: np.ndarray) -> set[int]:
        """Labels whose n-grams occur in ``tokens`` (empty when none do)."""
        self.freeze()
        queries = ngram_hashes(tokens, self.n)
        if queries.size == 0 or self._hashes.size == 0:
            return set()
        # Almost every query misses; one bit lookup rejects most of them before the
        # binary search, whose ~log2(len) cache misses per query would dominate.
        top = queries >> self._shift
        maybe = (self._filter[top >> np.uint64(3)] >> (top & np.uint64(7)).astype(np.uint8)) & 1
        queries = np.unique(queries[maybe.astype(bool)])
        lo = np.searchsorted(self._hashes, queries, side="left")
        hi = np.searchsorted(self._hashes, queries, side="right")
        found = hi > lo
        if not found.any():
            return set()
        lo, runs = lo[found], (hi - lo)[found]
        # Every index of every run lo[i] .. lo[i] + runs[i] - 1, without a Python loop:
        # arange over the total, shifted per run by (run start - run offset).
        offsets = np.cumsum(runs) - runs
        positions = np.arange(runs.sum()) + np.repeat(lo - offsets, runs)
        return set(np.unique(self._labels[positions]).tolist())

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The frozen index as plain arrays: ``np.savez(path, **index.to_arrays())``."""
        self.freeze()
        return {"n": np.array(self.n), "hashes": self._hashes, "labels": self._labels}

    @classmethod
    def from_arrays(cls, n: np.ndarray | int, hashes: np.ndarray, labels: np.ndarray) -> NgramIndex:
        """Inverse of :meth:`to_arrays`: ``NgramIndex.from_arrays(**np.load(path))``."""
        index = cls(int(n))
        hashes = np.asarray(hashes, dtype=np.uint64)
        labels = np.asarray(labels, dtype=np.int64)
        if hashes.shape != labels.shape or hashes.ndim != 1:
            raise ValueError("hashes and labels must be 1-D arrays of equal length")
        if hashes.size > 1 and not (hashes[1:] >= hashes[:-1]).all():  # not from to_arrays
            order = np.lexsort((labels, hashes))
            hashes, labels = hashes[order], labels[order]
        index._hashes, index._labels = hashes, labels
        index._filter, index._shift = _bit_filter(hashes)
        return index


def _bit_filter(hashes: np.ndarray) -> tuple[np.ndarray, np.uint64]:
    """A bitmap with one bit per value of the top ``bits`` bits of the hashes, set for
    those present: about 16 bits per n-gram (2 bytes; 64 MB for 20M n-grams), so a
    query that is not in the index passes the filter with probability <= 1/16.
    Returns the packed bits and the shift that takes a hash to its bit index."""
    bits = max(10, int(np.ceil(np.log2(max(hashes.size, 1) * 16))))
    shift = np.uint64(64 - bits)
    top = hashes >> shift
    packed = np.zeros(1 << (bits - 3), dtype=np.uint8)
    np.bitwise_or.at(packed, top >> np.uint64(3),
                     np.left_shift(1, top & np.uint64(7)).astype(np.uint8))
    return packed, shift
