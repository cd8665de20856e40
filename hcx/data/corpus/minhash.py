"""MinHash signatures and LSH banding for near-duplicate detection on token ids.

Shingles are token-id n-grams, hashed by :func:`ngram_hashes` (shared with
``decontam``). Everything is numpy and seeded explicitly: a signature depends only
on the tokens and the MinHasher's arguments, never on the process (Python's
``hash()`` is salted per process, so it is never used), which lets worker processes
sign documents that a single process later deduplicates.
"""

from __future__ import annotations

import functools

import numpy as np

_U64_MAX = np.iinfo(np.uint64).max
# Densification offset per bin of distance (odd, so distinct distances differ).
_ROTATE = np.uint64(0x9E3779B1)
# splitmix64 (Steele et al. 2014): a bijective 64-bit mix with full avalanche.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
# Base of the polynomial over a window; any odd constant with well-spread bits.
_POLY = np.uint64(0xD6E8FEB86659FD93)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 of every element (uint64 in, new uint64 array out)."""
    z = x + _GAMMA
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return z


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """64-bit hash of every window of ``n`` consecutive tokens (uint64, length
    ``len(tokens) - n + 1``; empty when the array is shorter than ``n``).

    Each token id is mixed with splitmix64, the window combined as a polynomial
    ``sum(mix(t_i) * P**(n-1-i)) mod 2**64`` (``n`` vectorised passes, numpy's uint64
    arithmetic wraps mod 2**64 exactly) and the result mixed again, so the linear
    structure of the polynomial does not reach the MinHash permutations. Token ids
    are taken as integers, whatever their dtype: int32 and int64 arrays of the same
    ids hash the same.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in "iu"):
        raise TypeError(f"tokens must be a 1-D integer array, got {tokens.dtype} {tokens.shape}")
    if n < 1:
        raise ValueError(f"n-gram size must be at least 1, got {n}")
    windows = tokens.size - n + 1
    if windows <= 0:
        return np.empty(0, dtype=np.uint64)
    mixed = mix64(tokens.astype(np.uint64))  # negative ids wrap, identically for any dtype
    h = mixed[:windows].copy()
    for i in range(1, n):
        h *= _POLY
        h += mixed[i:i + windows]
    return mix64(h)


class MinHasher:
    """MinHash signatures of token-id n-gram sets by one-permutation hashing.

    Classic MinHash applies ``num_perm`` hash functions to every shingle: cost
    ``num_perm`` x shingles, which made it a fifth of ``hcx data prepare``'s time.
    One-permutation hashing (Li, Owen & Zhang, NeurIPS 2012) hashes each shingle once,
    splits the hash range into ``num_perm`` bins and keeps the minimum of each bin;
    two documents agree on a bin with probability equal to their Jaccard similarity,
    as with ``num_perm`` permutations. Bins that no shingle falls into (short
    documents) take the value of the next non-empty bin, shifted by the distance
    (rotation densification, Shrivastava & Li, ICML 2014), so every entry stays
    comparable. One sort in C per document; no Python loop over shingles.
    """

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1) -> None:
        if num_perm < 1 or ngram < 1:
            raise ValueError("num_perm and ngram must be positive")
        self.num_perm = num_perm
        self.ngram = ngram
        rng = np.random.default_rng(seed)
        self._salt = rng.integers(0, _U64_MAX, dtype=np.uint64, endpoint=True)

    def signature(self, tokens: np.ndarray) -> np.ndarray:
        """uint32 signature of shape ``(num_perm,)``.

        A document shorter than ``ngram`` is one shingle (all its tokens); an empty
        one gets all 0xFFFFFFFF, so empty documents are duplicates of each other.
        """
        tokens = np.asarray(tokens)
        k = self.num_perm
        if tokens.size == 0:
            return np.full(k, 0xFFFFFFFF, dtype=np.uint32)
        h = mix64(ngram_hashes(tokens, min(self.ngram, tokens.size)) ^ self._salt)
        h.sort()
        # Bin = the top 32 bits scaled to [0, k): monotone in h, so the sorted hashes
        # are grouped by bin and the first of each group is the bin's minimum.
        bins = ((h >> np.uint64(32)) * np.uint64(k)) >> np.uint64(32)
        wanted = np.arange(k, dtype=np.uint64)
        first = np.minimum(np.searchsorted(bins, wanted), h.size - 1)
        present = bins[first] == wanted
        # The minimum's low 32 bits (independent of the bin) are the bin's value.
        sig = (h[first] & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        if not present.all():
            full = np.flatnonzero(present)  # never empty: there is at least one shingle
            nxt = full[np.searchsorted(full, np.arange(k)) % full.size]
            distance = (nxt - np.arange(k)) % k
            empty = ~present
            sig[empty] = ((sig[nxt[empty]].astype(np.uint64)
                           + distance[empty].astype(np.uint64) * _ROTATE) & np.uint64(0xFFFFFFFF))
        return sig


def jaccard_estimate(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of equal entries of two signatures: an unbiased estimate of the
    Jaccard similarity of the two shingle sets."""
    if a.shape != b.shape:
        raise ValueError(f"signatures differ in shape: {a.shape} vs {b.shape}")
    return float(np.count_nonzero(a == b)) / a.size


def _integral(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoid rule (np.trapz was renamed across numpy 1.x/2.x)."""
    return float(((y[1:] + y[:-1]) * np.diff(x)).sum() / 2)


@functools.lru_cache(maxsize=16)  # ~0.1 s a call; every pipeline task asks
def optimal_bands_rows(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with ``bands * rows <= num_perm`` minimising the false-positive
    plus false-negative area under the LSH S-curve ``P(s) = 1 - (1 - s**rows)**bands``
    (the probability that two documents of Jaccard s share a band): the area under
    P on [0, threshold] plus the area over it on [threshold, 1]. Same objective and
    equal weights as datasketch; ties go to the fewest bands.
    """
    below = np.linspace(0.0, threshold, 1001)
    above = np.linspace(threshold, 1.0, 1001)
    best = (np.inf, 1, num_perm)
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            false_pos = _integral(1 - (1 - below ** rows) ** bands, below)
            false_neg = _integral((1 - above ** rows) ** bands, above)
            if false_pos + false_neg < best[0]:
                best = (false_pos + false_neg, bands, rows)
    return best[1], best[2]


class LSHIndex:
    """Banded LSH over MinHash signatures, with each candidate confirmed by its
    estimated Jaccard, so a band collision alone never marks a duplicate.

    Memory per inserted document: its signature (4 * num_perm bytes) and one bucket
    entry per band.
    """

    def __init__(self, num_perm: int = 128, threshold: float = 0.8) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.num_perm = num_perm
        self.threshold = threshold
        self.bands, self.rows = optimal_bands_rows(threshold, num_perm)
        # One dict per band: the band's bytes -> insertion indices, oldest first.
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self._keys: list[int] = []
        self._signatures = np.empty((1024, num_perm), dtype=np.uint32)

    def __len__(self) -> int:
        return len(self._keys)

    def query_insert(self, key: int, signature: np.ndarray) -> int | None:
        """The key of the earliest inserted document that shares a band with
        ``signature`` and has an estimated Jaccard >= threshold with it; ``None``
        (after inserting it under ``key``) when there is none. Duplicates are not
        inserted, so every kept document is compared against kept documents only.
        """
        signature = np.asarray(signature)
        if signature.shape != (self.num_perm,):
            raise ValueError(f"signature must have shape ({self.num_perm},), "
                             f"got {signature.shape}")
        signature = signature.astype(np.uint32, copy=False)
        r = self.rows
        bands = [signature[i * r:(i + 1) * r].tobytes() for i in range(self.bands)]
        candidates: set[int] = set()
        for buckets, band in zip(self._buckets, bands):
            candidates.update(buckets.get(band, ()))
        if candidates:
            order = np.array(sorted(candidates))
            equal = np.count_nonzero(self._signatures[order] == signature, axis=1)
            similar = equal / self.num_perm >= self.threshold  # as jaccard_estimate
            if similar.any():
                return self._keys[int(order[similar.argmax()])]
        index = len(self._keys)
        if index == len(self._signatures):
            self._signatures = np.concatenate([self._signatures, np.empty_like(self._signatures)])
        self._signatures[index] = signature
        self._keys.append(key)
        for buckets, band in zip(self._buckets, bands):
            buckets.setdefault(band, []).append(index)
        return None
