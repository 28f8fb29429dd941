"""numba kernels: the byte loop of normalize+shingle and the permutation minima, compiled once.

They compute exactly what the numpy code in :mod:`refinery.tasks.dedup.normalize` and
:mod:`refinery.tasks.dedup.minhash` computes (tests compare both); numba only removes the temporaries,
which makes signatures about 5x faster. Without numba installed the numpy path is used.
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def kernels():
    """``(shingle_kernel, minhash_affine32, minhash_legacy)`` or None when numba is missing."""
    try:
        from refinery.tasks.dedup import _jit
    except ImportError:  # pragma: no cover - numba is a declared dependency
        return None
    return _jit.shingle_kernel, _jit.minhash_affine32, _jit.minhash_legacy
