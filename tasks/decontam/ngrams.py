"""Word n-grams of normalised text, hashed to 64 bits, and the benchmark n-gram index.

Normalisation (the GPT-3 / datatrove convention): Unicode NFKC, lower case, every character that
is not a letter or a digit is a separator, so punctuation and whitespace differences never hide a
match. An n-gram is n consecutive words; its hash is a polynomial over the words' 64-bit xxh3
hashes (computed for all positions of a text with n vector operations). Two different n-grams
share a hash with probability ~2^-64 per pair: an index of 10^7 n-grams against 10^12 document
n-grams expects under one false match.

The index is a sorted array of unique n-gram hashes with the benchmark each first came from
(uint16): 10 bytes per n-gram, looked up with a binary search.
"""
from __future__ import annotations

import dataclasses
import unicodedata

import numpy as np
import regex

_WORD = regex.compile(r"[\p{L}\p{N}]+")
_P = np.uint64(0x100000001B3)   # FNV-64 prime: odd, so the polynomial mixes every word


def words(text: str) -> list[str]:
    """The normalised words of ``text``."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def word_hashes(ws: list[str]) -> np.ndarray:
    import xxhash

    h = xxhash.xxh3_64_intdigest
    return np.fromiter((h(w.encode("utf-8")) for w in ws), dtype=np.uint64, count=len(ws))


def ngram_hashes(wh: np.ndarray, n: int) -> np.ndarray:
    """Hash of every n-gram (position i: words i..i+n-1); empty when there are fewer than n words."""
    m = len(wh) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = wh[:m].copy()
        for j in range(1, n):
            h = h * _P + wh[j:j + m]
    return h


@dataclasses.dataclass
class NgramIndex:
    """Unique sorted n-gram hashes and, for each, the index of its benchmark in ``names``."""
    n: int
    hashes: np.ndarray      # uint64, sorted, unique
    bench: np.ndarray       # uint16, aligned with hashes
    names: list[str]

    @classmethod
    def build(cls, n: int, per_benchmark: list[tuple[str, list[np.ndarray]]]) -> "NgramIndex":
        """``per_benchmark``: (name, n-gram hash arrays of its texts). A hash in two benchmarks
        keeps the first one."""
        if len(per_benchmark) >= 1 << 16:
            raise ValueError("at most 65535 benchmarks per index")
        hs, bs = [], []
        for i, (_, arrays) in enumerate(per_benchmark):
            u = np.unique(np.concatenate(arrays)) if arrays else np.empty(0, dtype=np.uint64)
            hs.append(u)
            bs.append(np.full(len(u), i, dtype=np.uint16))
        h = np.concatenate(hs) if hs else np.empty(0, dtype=np.uint64)
        b = np.concatenate(bs) if bs else np.empty(0, dtype=np.uint16)
        h, first = np.unique(h, return_index=True)   # sorted; first occurrence = earliest benchmark
        return cls(n, h, b[first], [name for name, _ in per_benchmark])

    @property
    def nbytes(self) -> int:
        return int(self.hashes.nbytes + self.bench.nbytes)

    def lookup(self, h: np.ndarray) -> np.ndarray:
        """For each hash: its benchmark index, or -1 when it is no benchmark n-gram."""
        out = np.full(len(h), -1, dtype=np.int32)
        if not len(h) or not len(self.hashes):
            return out
        pos = np.searchsorted(self.hashes, h)
        pos[pos == len(self.hashes)] = 0
        hit = self.hashes[pos] == h
        out[hit] = self.bench[pos[hit]]
        return out


__all__ = ["words", "word_hashes", "ngram_hashes", "NgramIndex"]
