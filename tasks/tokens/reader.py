"""The training reader: fixed-length windows over memory-mapped token datasets.

Each token dataset (output of the tokenize stage) is one flat token stream: its files in manifest
order, each file's record batches in order. Window ``i`` of a dataset is the ``seq_len + 1`` tokens
starting at ``i * seq_len`` (consecutive windows share one token, as input/target pairs need).
Windows are read straight from the memory-mapped Arrow files (``pa.memory_map`` + ``ipc.open_file``):
only the window being returned is copied, into the int64 batch.

* **Split**: a dataset's windows are cut into ``K`` equal blocks by index; the last windows of every
  block are validation, the rest training (``val_fraction`` of the windows in all). Train and
  validation never share a window, whatever the seed, and the split does not depend on the call.
* **Shuffle**: each dataset's training windows are permuted by ``default_rng([seed, dataset, epoch])``;
  an epoch of a dataset is one pass over its permutation, then the next epoch reshuffles.
* **Mixing**: sample ``g`` of the global stream comes from dataset ``d`` drawn with probabilities
  ``weights`` (default: proportional to the datasets' window counts) by a generator seeded with
  ``[seed, g // 4096]``, so any position can be recomputed without replaying the past.
* **Ranks**: batch ``k`` of the global stream holds ``batch_size * world_size`` samples; rank ``r``
  keeps samples ``[r * batch_size, (r + 1) * batch_size)``. Ranks therefore never share a sample,
  and a state dict is the same on every rank (it holds the global position).
* **Resume**: ``state_dict()`` is ``{g, per-dataset epoch and position}``; a reader given it yields
  exactly the batches the original would have yielded next.
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Sequence

import numpy as np

from refinery.tasks.tokens.shards import MappedTokenFile, token_files_of, tokenizer_dir_of

_MIX_CHUNK = 4096
_STATE_VERSION = 1


def split_windows(n: int, val_fraction: float, max_blocks: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, val ids) of ``n`` windows: the tail of each of up to ``max_blocks`` index blocks
    is validation. Deterministic; the two sets are disjoint and cover ``range(n)``."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 else max(1, int(round(n * val_fraction)))
    if n_val == 0:
        return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    k = max(1, min(max_blocks, n_val))
    is_val = np.zeros(n, dtype=bool)
    for j in range(k):
        lo, hi = j * n // k, (j + 1) * n // k
        v = n_val * (j + 1) // k - n_val * j // k
        is_val[max(lo, hi - v): hi] = True
    ids = np.arange(n, dtype=np.int64)
    return ids[~is_val], ids[is_val]


class _Source:
    """One token dataset: its memory-mapped chunks as a single token stream."""

    def __init__(self, path: str):
        from refinery.tasks.store import Dataset

        ds = Dataset.open(path)
        self.path = ds.path
        root = ds.local_path()
        self.manifest = m = ds.manifest
        if "vocab_size" not in m or "eos_id" not in m:
            raise ValueError(f"{path}: a {m.get('stage')!r} dataset, not a token dataset (no vocab_size/eos_id "
                             "in its manifest)")
        self.files = [MappedTokenFile(p) for p in token_files_of(m, root)]
        self.chunks = [c for f in self.files for c in f.chunks]
        lens = np.array([len(c) for c in self.chunks], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        self.num_tokens = int(self.starts[-1])
        expected = m.get("total_tokens")
        if expected is not None and int(expected) != self.num_tokens:
            raise ValueError(f"{path}: files hold {self.num_tokens} tokens, the manifest says {expected}")
        self.tokenizer_path = tokenizer_dir_of(m, root)
        self.tokenizer_sha256 = (m.get("tokenizer") or {}).get("sha256")
        self.vocab_size = int(m["vocab_size"])
        self.eos_id = int(m["eos_id"])

    def window(self, start: int, length: int, out: np.ndarray) -> None:
        """Copy tokens ``[start, start + length)`` of the stream into ``out`` (int64)."""
        c = int(np.searchsorted(self.starts, start, side="right")) - 1
        off = start - int(self.starts[c])
        chunk = self.chunks[c]
        if off + length <= len(chunk):
            out[:] = chunk[off: off + length]
            return
        filled = 0
        while filled < length:
            chunk = self.chunks[c]
            take = min(length - filled, len(chunk) - off)
            out[filled: filled + take] = chunk[off: off + take]
            filled += take
            c, off = c + 1, 0


class TokenReader:
    """Random access to windows of ``seq_len + 1`` tokens over one or several token datasets."""

    def __init__(self, datasets: str | Sequence[str], seq_len: int, *, split: str = "train",
                 val_fraction: float = 0.05, seed: int = 0, weights: Sequence[float] | None = None,
                 rank: int = 0, world_size: int = 1):
        if isinstance(datasets, (str, os.PathLike)):
            datasets = [s.strip() for s in str(datasets).split(",") if s.strip()]
        datasets = [str(getattr(d, "path", d)) for d in datasets]  # paths, URLs or Dataset objects
        if not datasets:
            raise ValueError("TokenReader needs at least one token dataset")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if not (0 <= rank < world_size):
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self._args = dict(datasets=datasets, seq_len=seq_len, split=split, val_fraction=val_fraction, seed=seed,
                          weights=None if weights is None else [float(w) for w in weights], rank=rank,
                          world_size=world_size)
        self.datasets, self.seq_len, self.split = datasets, int(seq_len), split
        self.val_fraction, self.seed, self.rank, self.world_size = float(val_fraction), int(seed), int(rank), int(world_size)

        self._sources = [_Source(p) for p in datasets]
        first = self._sources[0]
        for s in self._sources[1:]:
            if (s.tokenizer_sha256, s.vocab_size, s.eos_id) != (first.tokenizer_sha256, first.vocab_size, first.eos_id):
                raise ValueError(f"{s.path} was tokenized with a different tokenizer than {first.path} "
                                 f"(sha256 {s.tokenizer_sha256} vs {first.tokenizer_sha256}); cannot mix them")
        self.tokenizer_path = first.tokenizer_path
        self.vocab_size = first.vocab_size
        self.eos_id = first.eos_id

        self._ids: list[np.ndarray] = []
        for s in self._sources:
            n = max(0, (s.num_tokens - 1) // self.seq_len)
            train, val = split_windows(n, self.val_fraction)
            ids = train if split == "train" else val
            if len(ids) == 0:
                raise ValueError(f"{s.path}: {s.num_tokens} tokens give {n} windows of {self.seq_len + 1} tokens, "
                                 f"none left for the {split} split (val_fraction={self.val_fraction}); "
                                 "use a shorter seq_len or more data")
            self._ids.append(ids)
        self.windows_per_dataset = [len(i) for i in self._ids]
        self.num_windows = int(sum(self.windows_per_dataset))

        if weights is None:
            w = np.array(self.windows_per_dataset, dtype=np.float64)
        else:
            w = np.asarray(weights, dtype=np.float64)
            if len(w) != len(self._sources):
                raise ValueError(f"{len(w)} weights for {len(self._sources)} datasets")
            if (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"weights must be >= 0 with a positive sum, got {list(w)}")
        self.weights = (w / w.sum()).tolist()
        self._cum_w = np.cumsum(self.weights)
        self._cum_w[-1] = 1.0
        self._reset()

    # ------------------------------------------------------------------ position
    def _reset(self) -> None:
        self._g = 0
        self._epoch = [0] * len(self._sources)
        self._pos = [0] * len(self._sources)
        self._perm: list[np.ndarray | None] = [None] * len(self._sources)
        self._mix_block, self._mix = -1, np.zeros(0, dtype=np.int64)

    def _order(self, d: int) -> np.ndarray:
        perm = self._perm[d]
        if perm is None:
            rng = np.random.default_rng([self.seed, d, self._epoch[d]])
            perm = self._perm[d] = self._ids[d][rng.permutation(len(self._ids[d]))]
        return perm

    def _choice(self, g: int) -> int:
        if len(self._sources) == 1:
            return 0
        block = g // _MIX_CHUNK
        if block != self._mix_block:
            u = np.random.default_rng([self.seed, 1_000_003, block]).random(_MIX_CHUNK)
            self._mix = np.searchsorted(self._cum_w, u, side="right").clip(0, len(self._sources) - 1)
            self._mix_block = block
        return int(self._mix[g - block * _MIX_CHUNK])

    def _next_window(self, d: int) -> int:
        order = self._order(d)
        if self._pos[d] >= len(order):
            self._epoch[d] += 1
            self._pos[d] = 0
            self._perm[d] = None
            order = self._order(d)
        w = int(order[self._pos[d]])
        self._pos[d] += 1
        return w

    # ------------------------------------------------------------------ batches
    def next_batch(self, batch_size: int) -> np.ndarray:
        """The next ``batch_size`` windows of this rank: int64 ``(batch_size, seq_len + 1)``. Infinite."""
        L = self.seq_len + 1
        out = np.empty((batch_size, L), dtype=np.int64)
        lo = self.rank * batch_size
        for k in range(batch_size * self.world_size):
            d = self._choice(self._g)
            w = self._next_window(d)
            self._g += 1
            if lo <= k < lo + batch_size:
                self._sources[d].window(w * self.seq_len, L, out[k - lo])
        return out

    def window(self, dataset: int, index: int) -> np.ndarray:
        """Window ``index`` (a window id of ``dataset``, any split) as int64."""
        out = np.empty(self.seq_len + 1, dtype=np.int64)
        self._sources[dataset].window(int(index) * self.seq_len, self.seq_len + 1, out)
        return out

    def split_ids(self, dataset: int = 0) -> np.ndarray:
        """The window ids of ``dataset`` in this reader's split (sorted)."""
        return self._ids[dataset].copy()

    def eval_windows(self) -> list[tuple[int, int]]:
        """(dataset, window id) of every window of this split and rank, in a fixed order."""
        pairs = [(d, int(i)) for d, ids in enumerate(self._ids) for i in ids]
        return pairs[self.rank::self.world_size]

    def eval_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[np.ndarray]:
        """Every window of the split (this rank's share) once, in order: deterministic and finite."""
        pairs = self.eval_windows()
        nb = (len(pairs) + batch_size - 1) // batch_size
        if max_batches is not None:
            nb = min(nb, max_batches)
        L = self.seq_len + 1
        for b in range(nb):
            chunk = pairs[b * batch_size: (b + 1) * batch_size]
            out = np.empty((len(chunk), L), dtype=np.int64)
            for r, (d, i) in enumerate(chunk):
                self._sources[d].window(i * self.seq_len, L, out[r])
            yield out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"version": _STATE_VERSION, "g": self._g, "epoch": list(self._epoch), "pos": list(self._pos),
                "seed": self.seed, "seq_len": self.seq_len, "split": self.split,
                "val_fraction": self.val_fraction, "weights": list(self.weights),
                "windows": list(self.windows_per_dataset)}

    def load_state_dict(self, sd: dict) -> None:
        for key, mine in (("seq_len", self.seq_len), ("seed", self.seed), ("split", self.split),
                          ("windows", list(self.windows_per_dataset))):
            theirs = sd.get(key)
            if theirs is not None and (list(theirs) if isinstance(mine, list) else theirs) != mine:
                raise ValueError(f"reader state has {key}={theirs!r}, this reader has {mine!r}: "
                                 "not the same data, cannot resume exactly")
        if len(sd["epoch"]) != len(self._sources) or len(sd["pos"]) != len(self._sources):
            raise ValueError(f"reader state is for {len(sd['epoch'])} datasets, this reader has {len(self._sources)}")
        self._reset()
        self._g = int(sd["g"])
        self._epoch = [int(e) for e in sd["epoch"]]
        self._pos = [int(p) for p in sd["pos"]]

    # ------------------------------------------------------------------ pickling (DataLoader workers)
    def __getstate__(self) -> dict:
        return {"args": self._args, "state": self.state_dict()}

    def __setstate__(self, st: dict) -> None:
        TokenReader.__init__(self, **st["args"])
        self.load_state_dict(st["state"])

    def __repr__(self) -> str:
        return (f"TokenReader({len(self._sources)} datasets, seq_len={self.seq_len}, split={self.split}, "
                f"windows={self.num_windows}, rank={self.rank}/{self.world_size})")

    def describe(self) -> str:
        return json.dumps({"datasets": self.datasets, "windows": self.windows_per_dataset,
                           "weights": self.weights, "vocab_size": self.vocab_size})


__all__ = ["TokenReader", "split_windows"]
