"""A PyTorch ``IterableDataset`` over token windows, for ``DataLoader(num_workers=N)`` and DDP.

Every (rank, worker) pair opens its own :class:`~refinery.tasks.tokens.reader.TokenReader` as shard
``rank * num_workers + worker`` of ``world_size * num_workers``, so workers and ranks read disjoint
samples of the same global stream, and nothing memory-mapped crosses a process boundary.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from refinery.tasks.tokens.reader import TokenReader


class TokenIterableDataset(IterableDataset):
    """Yields int64 tensors of ``seq_len + 1`` tokens: the shuffled, infinite training stream for
    ``split="train"``, every validation window once for ``split="val"`` (or ``finite=True``)."""

    def __init__(self, datasets: str | Sequence[str], seq_len: int, *, split: str = "train",
                 val_fraction: float = 0.05, seed: int = 0, weights: Sequence[float] | None = None,
                 rank: int = 0, world_size: int = 1, chunk: int = 32, finite: bool | None = None,
                 state: dict | None = None):
        super().__init__()
        self.kwargs: dict[str, Any] = dict(datasets=datasets, seq_len=seq_len, split=split, val_fraction=val_fraction, seed=seed,
                           weights=weights)
        self.rank, self.world_size, self.chunk = int(rank), int(world_size), int(chunk)
        self.finite = (split == "val") if finite is None else bool(finite)
        self.state = state

    def reader(self) -> TokenReader:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        r = TokenReader(**self.kwargs, rank=self.rank * nw + wid, world_size=self.world_size * nw)
        if self.state is not None and not self.finite:
            r.load_state_dict(self.state)
        return r

    def __iter__(self) -> Iterator[torch.Tensor]:
        r = self.reader()
        if self.finite:
            for batch in r.eval_batches(self.chunk):
                yield from torch.from_numpy(np.ascontiguousarray(batch))
            return
        while True:
            yield from torch.from_numpy(r.next_batch(self.chunk))


__all__ = ["TokenIterableDataset"]
