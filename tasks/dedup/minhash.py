"""MinHash signatures of word n-gram shingles, vectorized over batches of documents.

Shingles: the word n-grams of the normalized text (:mod:`refinery.tasks.dedup.normalize`), each hashed
to 32 bits as ``fmix64(sum_j word_hash[i+j] * C_j) >> 32`` (order-sensitive). A document with
fewer than ``n`` (but at least one) words has one shingle made of all its words; an empty one
has none (its signature is all-max and it never enters an LSH bucket).

Permutations: exactly datasketch's ``MinHash`` schemes with the same seed-derived parameters, so
``LeanMinHash(seed=seed, hashvalues=sig, scheme=scheme)`` is the sketch datasketch itself would
build from the same 32-bit shingle hashes (``MinHash(hashfunc=int)``, ``update_batch``):

- ``affine32`` (datasketch >= 2.0 default): ``a * fmix32(h) + b mod 2^32`` with odd ``a``;
  values are uint32.
- ``legacy`` (datasketch < 2.0): ``((a * h + b) mod (2^61 - 1)) & (2^32 - 1)``, uint64 arithmetic
  wrapping like datasketch's; values are stored as uint32 (they fit).

The permutation loop runs permutation-major over a block of ~100 documents, so each pass is a
contiguous SIMD multiply/add over a cache-resident array and a ``minimum.reduceat`` per document.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refinery.tasks.dedup._kernels import kernels
from refinery.tasks.dedup.normalize import _SEP, _WORD_MULT, _string_buffers, fmix64, hash_words

_NGRAM_MULT = (np.random.RandomState(0xC0FFEE).randint(0, 1 << 62, 64, dtype=np.uint64) * np.uint64(2)
               + np.uint64(1)).astype(np.uint64)
_ROW_MULT = (np.random.RandomState(0xBA11D).randint(0, 1 << 62, 256, dtype=np.uint64) * np.uint64(2)
             + np.uint64(1)).astype(np.uint64)
_MERSENNE = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64((1 << 32) - 1)
_F32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16))
SCHEMES = ("affine32", "legacy")
_BLOCK_SHINGLES = 1 << 15  # shingles per permutation block (128 KiB of uint32: stays in L2)


def fmix32(h: np.ndarray) -> np.ndarray:
    s1, m1, s2, m2, s3 = _F32
    h = h ^ (h >> s1)
    h *= m1
    h ^= h >> s2
    h *= m2
    h ^= h >> s3
    return h


def permutations(num_perm: int, seed: int, scheme: str = "affine32") -> tuple[np.ndarray, np.ndarray]:
    """The ``(a, b)`` datasketch's ``MinHash(num_perm, seed, scheme=scheme)`` draws."""
    gen = np.random.RandomState(seed)
    if scheme == "legacy":
        ab = np.array([(gen.randint(1, _MERSENNE, dtype=np.uint64), gen.randint(0, _MERSENNE, dtype=np.uint64))
                       for _ in range(num_perm)], dtype=np.uint64).T
        return ab[0].copy(), ab[1].copy()
    if scheme == "affine32":
        a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
        b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
        return a, b
    raise ValueError(f"unknown MinHash scheme {scheme!r}: use one of {SCHEMES}")


def shingle_hashes(word_hashes: np.ndarray, counts: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of the word n-grams of each document: ``(hashes uint32, shingles_per_doc)``."""
    n_docs = len(counts)
    nw = len(word_hashes)
    if nw == 0:
        return np.zeros(0, np.uint32), np.zeros(n_docs, np.int64)
    ends = np.cumsum(counts)
    starts = ends - counts
    nsh = np.where(counts >= ngram, counts - ngram + 1, np.minimum(counts, 1))
    doc = np.repeat(np.arange(n_docs), nsh)
    first = np.repeat(starts, nsh)
    idx = np.arange(len(doc), dtype=np.int64) - np.repeat(np.cumsum(nsh) - nsh, nsh) + first  # start word
    wp = np.concatenate([word_hashes, np.zeros(ngram, np.uint64)])
    g = wp[idx] * _NGRAM_MULT[0]
    short = bool((counts[counts > 0] < ngram).any())
    end_of = ends[doc] if short else None
    for j in range(1, ngram):
        term = wp[idx + j] * _NGRAM_MULT[j % 64]
        if short:
            term[idx + j >= end_of] = 0
        g += term
    g += np.uint64(ngram)
    return (fmix64(g) >> np.uint64(32)).astype(np.uint32), nsh


def _permute_min(h: np.ndarray, nsh: np.ndarray, a: np.ndarray, b: np.ndarray, scheme: str) -> np.ndarray:
    """Row-wise minima of the permuted shingle hashes: ``(len(nsh), num_perm)`` uint32."""
    n_docs, num_perm = len(nsh), len(a)
    out = np.full((n_docs, num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    nz = np.flatnonzero(nsh)
    if len(nz) == 0:
        return out
    seg_end = np.cumsum(nsh)
    seg_start = seg_end - nsh
    if scheme == "affine32":
        x = fmix32(h)
    else:
        x = h.astype(np.uint64)
    # blocks of whole documents of about _BLOCK_SHINGLES shingles
    i = 0
    while i < len(nz):
        j = int(np.searchsorted(seg_start[nz], seg_start[nz[i]] + _BLOCK_SHINGLES, side="left"))
        j = max(j, i + 1)
        docs = nz[i:j]
        s0, s1 = int(seg_start[docs[0]]), int(seg_end[docs[-1]])
        xb = x[s0:s1]
        rel = seg_start[docs] - s0
        buf = np.empty(len(xb), dtype=xb.dtype)
        res = np.empty((num_perm, len(docs)), dtype=np.uint32)
        for k in range(num_perm):
            np.multiply(xb, a[k], out=buf)
            np.add(buf, b[k], out=buf)
            if scheme == "legacy":
                np.remainder(buf, _MERSENNE, out=buf)
                np.bitwise_and(buf, _MAX32, out=buf)
            res[k] = np.minimum.reduceat(buf, rel)
        out[docs] = res.T
        i = j
    return out


@dataclass
class MinHasher:
    """Signatures and LSH band keys with fixed parameters (FineWeb defaults)."""

    ngram: int = 5
    num_perm: int = 112
    seed: int = 1
    scheme: str = "affine32"
    use_numba: bool = True
    _ab: tuple = field(init=False, repr=False)

    def __post_init__(self):
        if self.ngram < 1 or self.ngram > 64:
            raise ValueError("ngram must be in 1..64")
        self._ab = permutations(self.num_perm, self.seed, self.scheme)

    def shingles(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """``(shingle hashes uint32, shingles_per_doc)`` for a batch of texts (str list or pyarrow array)."""
        k = kernels() if self.use_numba else None
        if k is None:
            wh, counts = hash_words(texts)
            return shingle_hashes(wh, counts, self.ngram)
        import pyarrow as pa
        import pyarrow.compute as pc

        if not isinstance(texts, (pa.Array, pa.ChunkedArray)):
            texts = pa.array(texts, type=pa.string())
        if len(texts) == 0:
            return np.zeros(0, np.uint32), np.zeros(0, np.int64)
        data, off = _string_buffers(pc.utf8_lower(texts))
        return k[0](data, off, self.ngram, _SEP, _WORD_MULT, _NGRAM_MULT)

    def shingle_sets(self, texts) -> list[np.ndarray]:
        """Per document: the sorted unique shingle hashes (what exact Jaccard is computed on)."""
        h, nsh = self.shingles(texts)
        bounds = np.cumsum(nsh)
        return [np.unique(part) for part in np.split(h, bounds[:-1])] if len(nsh) else []

    def signatures(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """``(signatures (n_docs, num_perm) uint32, shingles_per_doc)`` for a batch of texts."""
        h, nsh = self.shingles(texts)
        return self.signatures_from_shingles(h, nsh), nsh

    def signatures_from_shingles(self, h: np.ndarray, nsh: np.ndarray) -> np.ndarray:
        a, b = self._ab
        k = kernels() if self.use_numba else None
        if k is None:
            return _permute_min(h, nsh, a, b, self.scheme)
        fn = k[1] if self.scheme == "affine32" else k[2]
        return fn(np.ascontiguousarray(h, dtype=np.uint32), np.ascontiguousarray(nsh, dtype=np.int64), a, b)

    def lean(self, signature: np.ndarray):
        """A datasketch ``LeanMinHash`` of one signature row."""
        from datasketch import LeanMinHash

        dtype = np.uint32 if self.scheme == "affine32" else np.uint64
        return LeanMinHash(seed=self.seed, hashvalues=signature.astype(dtype), scheme=self.scheme)


def band_keys(sig: np.ndarray, bands: int, rows: int, empty: np.ndarray | None = None) -> np.ndarray:
    """64-bit key of each band of each signature: ``(n_docs, bands)`` uint64.

    Two documents share a bucket in band ``j`` iff their rows ``j*rows .. (j+1)*rows-1`` are equal
    (up to 64-bit hash collisions). Key 0 is reserved for "no key" (documents without shingles,
    given by ``empty``) and never used by a real band.
    """
    n, num_perm = sig.shape
    if bands * rows > num_perm:
        raise ValueError(f"bands x rows = {bands * rows} exceeds num_perm = {num_perm}")
    if rows > len(_ROW_MULT):
        raise ValueError("rows must be <= 256")
    out = np.zeros((n, bands), dtype=np.uint64)
    s64 = sig.astype(np.uint64) + np.uint64(1)
    for j in range(bands):
        block = s64[:, j * rows:(j + 1) * rows]
        acc = (block * _ROW_MULT[:rows]).sum(axis=1, dtype=np.uint64)
        out[:, j] = fmix64(acc + np.uint64(j + 1))
    out[out == 0] = 1
    if empty is not None:
        out[empty] = 0
    return out
