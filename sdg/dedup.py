"""Exact and near-duplicate removal (MinHash + LSH), keeping the first of each group.

Exact: texts equal after normalization (case, whitespace, punctuation). Near: MinHash
signatures of character shingles (short texts such as topics have too few words for word
shingles), candidates found by LSH banding and confirmed when the estimated Jaccard
similarity (the fraction of equal signature entries) reaches the threshold
(Broder 1997; Leskovec, Rajaraman & Ullman, *Mining of Massive Datasets*, ch. 3).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

_MERSENNE = np.uint64((1 << 61) - 1)


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def shingles(text: str, size: int) -> set[str]:
    text = normalize(text)
    if len(text) <= size:
        return {text}
    return {text[i : i + size] for i in range(len(text) - size + 1)}


def _hash32(values: set[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(v.encode(), digest_size=4).digest(), "little") for v in values],
                    dtype=np.uint64)


class MinHasher:
    """``num_perm`` hash functions h(x) = (a x + b) mod (2^61 - 1) over 32-bit shingle hashes
    (a, b < 2^32, so a x + b never overflows 64 bits)."""

    def __init__(self, num_perm: int = 128, shingle_size: int = 5, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 1 << 32, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64)
        self.shingle_size = shingle_size

    def signature(self, text: str) -> np.ndarray:
        hashes = _hash32(shingles(text, self.shingle_size))  # (S,)
        return ((hashes[:, None] * self.a[None, :] + self.b[None, :]) % _MERSENNE).min(axis=0)  # (num_perm,)


def lsh_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows) with bands x rows <= num_perm whose S-curve midpoint (1/b)^(1/r) sits a
    little below the threshold, so true near-duplicates become candidates (recall first;
    the Jaccard check removes the false candidates)."""
    target = max(0.05, threshold - 0.1)
    options = [(b, num_perm // b) for b in range(1, num_perm + 1) if num_perm // b >= 1]
    return min(options, key=lambda br: (abs((1 / br[0]) ** (1 / br[1]) - target), -br[0] * br[1]))


def dedup(texts: list[str], near_threshold: float | None = 0.8, num_perm: int = 128, shingle_size: int = 5,
          seed: int = 0) -> list[int]:
    """Indices of the texts to keep, in order: the first of every exact or near-duplicate group.
    ``near_threshold=None`` removes exact duplicates only."""
    seen_exact: set[str] = set()
    hasher = MinHasher(num_perm, shingle_size, seed) if near_threshold is not None else None
    bands, rows = lsh_bands(num_perm, near_threshold) if hasher else (0, 0)
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
    signatures: dict[int, np.ndarray] = {}
    keep = []
    for i, text in enumerate(texts):
        exact = normalize(text)
        if exact in seen_exact:
            continue
        seen_exact.add(exact)
        if hasher is not None:
            signature = hasher.signature(text)
            keys = [signature[band * rows : (band + 1) * rows].tobytes() for band in range(bands)]
            candidates = {j for band, key in enumerate(keys) for j in buckets[band].get(key, ())}
            if any(np.mean(signatures[j] == signature) >= near_threshold for j in candidates):
                continue
            signatures[i] = signature
            for band, key in enumerate(keys):
                buckets[band].setdefault(key, []).append(i)
        keep.append(i)
    return keep
