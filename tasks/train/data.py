"""Data sources of the training loop.

The loop talks to any object with the token reader's interface (``tasks/tokens/reader.py``)::

    next_batch(batch_size) -> np.ndarray int64 (B, seq_len + 1)     # infinite
    eval_batches(batch_size, max_batches=None) -> Iterator[np.ndarray]
    state_dict() -> dict; load_state_dict(sd)
    num_windows, vocab_size, tokenizer_path, eos_id

:class:`ArrayTokenReader` is the same interface over a 1-D token array in memory (tests, benchmarks,
texts tokenized on the fly). :func:`open_reader` builds a reader from a JSON-able spec, which is how
DDP worker processes (started by torchrun) get their data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np


class ArrayTokenReader:
    """Fixed-length windows over a token array: a seeded shuffle per epoch, a held-out validation tail."""

    def __init__(self, tokens: np.ndarray, seq_len: int, *, tokenizer_path: str, vocab_size: int, eos_id: int,
                 split: str = "train", val_fraction: float = 0.05, seed: int = 0):
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        self.seq_len, self.split, self.seed = seq_len, split, seed
        self.tokenizer_path, self.vocab_size, self.eos_id = str(tokenizer_path), int(vocab_size), eos_id
        n = (len(tokens) - 1) // seq_len   # windows of seq_len + 1 tokens, overlapping by one
        if n < 2:
            raise ValueError(f"{len(tokens)} tokens make fewer than 2 windows of {seq_len + 1}")
        n_val = max(1, int(round(n * val_fraction)))
        ids = np.arange(n - n_val) if split == "train" else np.arange(n - n_val, n)
        self._tokens, self._ids = tokens, ids
        self.num_windows = len(ids)
        self._epoch, self._pos = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> np.ndarray:
        return self._ids[np.random.default_rng([self.seed, epoch]).permutation(len(self._ids))]

    def _window(self, i: int) -> np.ndarray:
        s = int(i) * self.seq_len
        return self._tokens[s: s + self.seq_len + 1]

    def next_batch(self, batch_size: int) -> np.ndarray:
        out = np.empty((batch_size, self.seq_len + 1), dtype=np.int64)
        for r in range(batch_size):
            if self._pos == len(self._order):
                self._epoch, self._pos = self._epoch + 1, 0
                self._order = self._perm(self._epoch)
            out[r] = self._window(self._order[self._pos])
            self._pos += 1
        return out

    def eval_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[np.ndarray]:
        ids = self._ids
        nb = (len(ids) + batch_size - 1) // batch_size
        for b in range(nb if max_batches is None else min(nb, max_batches)):
            yield np.stack([self._window(i) for i in ids[b * batch_size: (b + 1) * batch_size]])

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "pos": self._pos, "seed": self.seed}

    def load_state_dict(self, sd: dict) -> None:
        self._epoch, self._pos = int(sd["epoch"]), int(sd["pos"])
        self._order = self._perm(self._epoch)


def tokenize_texts(texts: Iterable[str], tokenizer_path: str) -> np.ndarray:
    """Token ids of ``texts``, each document followed by EOS (the token shard convention)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_path))
    out: list[int] = []
    for t in texts:
        out.extend(tok(t, add_special_tokens=False)["input_ids"])
        out.append(tok.eos_token_id)
    return np.asarray(out, dtype=np.int64)


def open_reader(spec: dict, seq_len: int, *, split: str = "train", val_fraction: float = 0.05, seed: int = 0,
                weights=None):
    """A reader from a JSON-able spec.

    ``{"kind": "tokens", "datasets": [path, ...]}``  token datasets (``refinery.tasks.tokens.reader.TokenReader``)
    ``{"kind": "array", "tokens": "file.npy", "tokenizer_path": dir, "vocab_size": n, "eos_id": i}``
    """
    kind = spec.get("kind", "tokens")
    if kind == "tokens":
        from refinery.tasks.tokens.reader import TokenReader

        # Every process reads the same global batch and keeps its slice (see loop.py), so the
        # reader is opened unsharded (rank 0 of 1): a DDP run sees exactly the single-process data.
        return TokenReader(spec["datasets"], seq_len, split=split, val_fraction=val_fraction, seed=seed,
                           weights=weights)
    if kind == "array":
        path = Path(spec["tokens"])
        try:
            tokens = np.load(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: unreadable token array: {e}") from e
        return ArrayTokenReader(tokens, seq_len, tokenizer_path=spec["tokenizer_path"], vocab_size=spec["vocab_size"],
                                eos_id=spec["eos_id"], split=split, val_fraction=val_fraction, seed=seed)
    raise ValueError(f"unknown reader kind {kind!r}")


def unigram_entropy(reader, max_tokens: int = 2_000_000, batch_size: int = 64) -> dict:
    """Entropy (nats/token) of the unigram distribution of training tokens: the loss of the best model
    that ignores context. ``reader`` must be a fresh reader (its position is consumed)."""
    seen = 0
    counts = np.zeros(max(int(reader.vocab_size), 1), dtype=np.int64)
    budget = min(max_tokens, int(reader.num_windows) * reader.seq_len if hasattr(reader, "seq_len") else max_tokens)
    while seen < budget:
        b = np.asarray(reader.next_batch(batch_size))[:, :-1].reshape(-1)
        if b.max(initial=0) >= len(counts):
            counts = np.concatenate([counts, np.zeros(int(b.max()) + 1 - len(counts), dtype=np.int64)])
        counts += np.bincount(b, minlength=len(counts))
        seen += b.size
    p = counts[counts > 0] / counts.sum()
    return {"entropy": float(-(p * np.log(p)).sum()), "tokens": int(counts.sum()), "distinct": int((counts > 0).sum())}


__all__ = ["ArrayTokenReader", "open_reader", "tokenize_texts", "unigram_entropy"]
