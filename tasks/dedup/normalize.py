"""Text normalization and word hashing for dedup, vectorized over a batch of documents.

Normalization (the same for exact dedup, MinHash shingles and verification):

1. Unicode lowercase (``pyarrow.compute.utf8_lower``);
2. every run of ASCII digits becomes one ``0`` ("1,234.5" -> "0,0.0" -> words "0 0 0");
3. punctuation and symbols become word separators: all ASCII non-alphanumerics, Latin-1
   punctuation/symbols (U+0080-U+00BF: nbsp, guillemets, ...), General Punctuation and
   currency symbols (U+2000-U+20FF: curly quotes, dashes, ellipsis, thin spaces, euro),
   CJK punctuation (U+3000-U+303F) and the BOM;
4. words are the maximal runs of the remaining bytes (so non-Latin scripts keep their words).

This follows FineWeb's ``simplify_text`` (lowercase, numbers normalized, punctuation removed,
whitespace collapsed) without its accent stripping, and works on UTF-8 bytes with numpy so a
batch of documents is normalized, split and hashed in about 20 array passes, not a Python loop.

A word's hash is ``fmix64(sum_k (byte_k + 1) * M[k mod 64])`` over its normalized bytes (``M``:
fixed random odd 64-bit multipliers), computed for all words of a batch with one ``reduceat``.
:func:`words` and :func:`word_hash` are the plain-Python reference of the same thing (tests
check both agree).
"""
from __future__ import annotations

import re

import numpy as np

_SEP = np.ones(256, dtype=bool)
for _c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789":
    _SEP[_c] = False
_SEP[0x80:] = False  # UTF-8 continuation and lead bytes: part of words unless marked below
_DIGIT_MAP = np.arange(256, dtype=np.uint8)
_DIGIT_MAP[ord("1"):ord("9") + 1] = ord("0")
_LEAD = np.zeros(256, dtype=bool)  # first bytes of the multi-byte separators we recognise
for _c in (0xC2, 0xE2, 0xE3, 0xEF):
    _LEAD[_c] = True

_WORD_MULT = (np.random.RandomState(0x5EED).randint(0, 1 << 62, 64, dtype=np.uint64) * np.uint64(2)
              + np.uint64(1)).astype(np.uint64)
_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer (a bijection with full avalanche), on a uint64 array."""
    h = h ^ (h >> _S33)
    h *= _M1
    h ^= h >> _S33
    h *= _M2
    h ^= h >> _S33
    return h


def _sep_class() -> str:
    ascii_seps = "".join(re.escape(chr(c)) for c in range(128) if _SEP[c])
    return f"[{ascii_seps}\u0080-\u00bf\u2000-\u20ff\u3000-\u303f\ufeff]+"


_SEP_RE = None
_DIGITS_RE = re.compile(r"[0-9]+")


def words(text: str) -> list[str]:
    """Plain-Python reference: the normalized words of one text (see the module docstring)."""
    global _SEP_RE
    if _SEP_RE is None:
        _SEP_RE = re.compile(_sep_class())
    return [w for w in _SEP_RE.split(_DIGITS_RE.sub("0", text.lower())) if w]


def word_hash(word: str) -> int:
    """Plain-Python reference of the vectorized word hash."""
    acc = 0
    for k, byte in enumerate(word.encode("utf-8")):
        acc = (acc + (byte + 1) * int(_WORD_MULT[k % 64])) & 0xFFFFFFFFFFFFFFFF
    return int(fmix64(np.array([acc], dtype=np.uint64))[0])


def _string_buffers(arr):
    """(bytes as uint8, offsets as int64) of a pyarrow string/large_string array (nulls -> empty)."""
    import pyarrow as pa

    if arr.null_count:
        arr = arr.fill_null("")
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    bufs = arr.buffers()
    large = pa.types.is_large_string(arr.type)
    off = np.frombuffer(bufs[1], dtype=np.int64 if large else np.int32)[arr.offset: arr.offset + len(arr) + 1]
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    off = off.astype(np.int64)
    return data[off[0]: off[-1]], off - off[0]


def hash_words(texts) -> tuple[np.ndarray, np.ndarray]:
    """Normalize and split a batch of texts; return ``(word_hashes, words_per_doc)``.

    ``texts``: a pyarrow string array (or a list of str). ``word_hashes`` is uint64, the words
    of all documents in order; ``words_per_doc`` is int64 of length ``len(texts)``.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if not isinstance(texts, (pa.Array, pa.ChunkedArray)):
        texts = pa.array(texts, type=pa.string())
    n = len(texts)
    if n == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    by, off = _string_buffers(pc.utf8_lower(texts))
    total = len(by)
    if total == 0:
        return np.zeros(0, np.uint64), np.zeros(n, np.int64)
    doc_starts = off[:-1][off[:-1] < total]  # starts of non-empty docs (and empties before them)

    sep = _SEP[by]
    # multi-byte punctuation: few lead bytes, handled on their positions only
    lead = np.flatnonzero(_LEAD[by])
    if len(lead):
        lead = lead[lead + 1 < total]
        b0, b1 = by[lead], by[lead + 1]
        two = lead[(b0 == 0xC2) & (b1 >= 0x80) & (b1 <= 0xBF)]
        ok3 = lead + 2 < total
        l3 = lead[ok3]
        b0, b1 = b0[ok3], b1[ok3]
        b2 = by[l3 + 2]
        three = l3[((b0 == 0xE2) & (b1 >= 0x80) & (b1 <= 0x83)) | ((b0 == 0xE3) & (b1 == 0x80))
                   | ((b0 == 0xEF) & (b1 == 0xBB) & (b2 == 0xBF))]
        for k in (0, 1):
            sep[two + k] = True
        for k in (0, 1, 2):
            sep[three + k] = True
    by = _DIGIT_MAP[by]
    is0 = by == 48
    drop = np.zeros(total, dtype=bool)
    np.logical_and(is0[1:], is0[:-1], out=drop[1:])  # second and later digits of a run
    drop[doc_starts] = False
    prev_sep = np.empty(total, dtype=bool)
    prev_sep[0] = True
    prev_sep[1:] = sep[:-1]
    prev_sep[doc_starts] = True
    start = ~sep & prev_sep  # word starts (never dropped: a dropped digit follows a digit)
    keep = ~sep & ~drop
    wstart_pos = np.flatnonzero(start)
    nwords = len(wstart_pos)
    if nwords == 0:
        return np.zeros(0, np.uint64), np.zeros(n, np.int64)
    cb = by[keep]
    cstart = start[keep]
    ws = np.flatnonzero(cstart)
    lengths = np.diff(np.append(ws, len(cb)))
    pos = np.arange(len(cb), dtype=np.int64) - np.repeat(ws, lengths)
    contrib = cb.astype(np.uint64) + np.uint64(1)
    contrib *= _WORD_MULT[pos & 63]
    wh = fmix64(np.add.reduceat(contrib, ws))
    doc_of_word = np.searchsorted(off, wstart_pos, side="right") - 1
    counts = np.bincount(doc_of_word, minlength=n).astype(np.int64)
    return wh, counts
