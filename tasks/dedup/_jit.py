"""numba-compiled kernels (module level, so ``cache=True`` stores them on disk). Imported lazily by
:func:`refinery.tasks.dedup._kernels.kernels`; see there."""
import numpy as np
from numba import njit

M1 = np.uint64(0xFF51AFD7ED558CCD)
M2 = np.uint64(0xC4CEB9FE1A85EC53)


@njit(cache=True, nogil=True, inline="always")
def fmix64(h):
    h ^= h >> np.uint64(33)
    h *= M1
    h ^= h >> np.uint64(33)
    h *= M2
    h ^= h >> np.uint64(33)
    return h


@njit(cache=True, nogil=True)
def shingle_kernel(data, offsets, ngram, sep_lut, word_mult, ngram_mult):
    n_docs = len(offsets) - 1
    total = offsets[-1] - offsets[0]
    out = np.empty(total // 2 + n_docs + 1, dtype=np.uint32)
    nsh = np.zeros(n_docs, dtype=np.int64)
    ring = np.zeros(64, dtype=np.uint64)
    m = 0
    for d in range(n_docs):
        i = offsets[d]
        end = offsets[d + 1]
        nwords = 0
        acc = np.uint64(0)
        pos = 0
        prev_digit = False
        while i <= end:
            # is byte i a separator (or the end of the document)? how many bytes does it span?
            is_sep = True
            span = 1
            c = np.uint8(0)
            if i < end:
                c = data[i]
                if c < 0x80:
                    is_sep = sep_lut[c]
                else:
                    is_sep = False
                    if c == 0xC2 and i + 1 < end:
                        c1 = data[i + 1]
                        if 0x80 <= c1 <= 0xBF:
                            is_sep = True
                            span = 2
                    elif (c == 0xE2 or c == 0xE3 or c == 0xEF) and i + 2 < end:
                        c1 = data[i + 1]
                        c2 = data[i + 2]
                        if (c == 0xE2 and 0x80 <= c1 <= 0x83) or (c == 0xE3 and c1 == 0x80) or \
                                (c == 0xEF and c1 == 0xBB and c2 == 0xBF):
                            is_sep = True
                            span = 3
            if is_sep:
                prev_digit = False
                if pos > 0:  # a word ended
                    for j in range(ngram - 1):  # shift: ring[ngram-1] is the newest word
                        ring[j] = ring[j + 1]
                    ring[ngram - 1] = fmix64(acc)
                    nwords += 1
                    acc = np.uint64(0)
                    pos = 0
                    if nwords >= ngram:
                        g = np.uint64(ngram)
                        for j in range(ngram):
                            g += ring[j] * ngram_mult[j]
                        out[m] = np.uint32(fmix64(g) >> np.uint64(32))
                        m += 1
                        nsh[d] += 1
                i += span
                continue
            if 0x30 <= c <= 0x39:
                if prev_digit:
                    i += 1
                    continue
                prev_digit = True
                c = np.uint8(0x30)
            else:
                prev_digit = False
            acc += (np.uint64(c) + np.uint64(1)) * word_mult[pos & 63]
            pos += 1
            i += 1
        if 0 < nwords < ngram:
            g = np.uint64(ngram)
            for j in range(nwords):
                g += ring[ngram - nwords + j] * ngram_mult[j]
            out[m] = np.uint32(fmix64(g) >> np.uint64(32))
            m += 1
            nsh[d] = 1
    return out[:m], nsh


@njit(cache=True, nogil=True)
def minhash_affine32(h, nsh, a, b):
    n_docs = len(nsh)
    p = len(a)
    out = np.empty((n_docs, p), dtype=np.uint32)
    mins = np.empty(p, dtype=np.uint32)
    s = 0
    for d in range(n_docs):
        mins[:] = np.uint32(0xFFFFFFFF)
        for t in range(s, s + nsh[d]):
            x = h[t]
            x ^= x >> np.uint32(16)
            x = np.uint32(x * np.uint32(0x85EBCA6B))
            x ^= x >> np.uint32(13)
            x = np.uint32(x * np.uint32(0xC2B2AE35))
            x ^= x >> np.uint32(16)
            x = np.uint32(x)
            for k in range(p):  # vectorizes: uint32 multiply-add, min
                mins[k] = min(mins[k], np.uint32(a[k] * x + b[k]))
        s += nsh[d]
        out[d] = mins
    return out


@njit(cache=True, nogil=True)
def minhash_legacy(h, nsh, a, b):
    n_docs = len(nsh)
    p = len(a)
    out = np.empty((n_docs, p), dtype=np.uint32)
    prime = np.uint64((1 << 61) - 1)
    mins = np.empty(p, dtype=np.uint64)
    s = 0
    for d in range(n_docs):
        for k in range(p):
            mins[k] = 0xFFFFFFFF
        for t in range(s, s + nsh[d]):
            x = np.uint64(h[t])
            for k in range(p):
                v = ((a[k] * x + b[k]) % prime) & np.uint64(0xFFFFFFFF)
                mins[k] = min(mins[k], v)
        s += nsh[d]
        for k in range(p):
            out[d, k] = np.uint32(mins[k])
    return out

