"""Example orders whose position is part of a checkpoint, so a resumed run takes the examples an
uninterrupted one would have taken next."""
from __future__ import annotations


class ExampleOrder:
    """The indices ``0..n-1`` in a seeded shuffle, a new shuffle every pass (pass ``e`` is seeded by
    ``seed`` and ``e`` alone, so any position can be rebuilt from ``(epoch, pos)``)."""

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError("no examples to draw from")
        self.n, self.seed = n, seed
        self.epoch, self.pos = 0, 0
        self._order: list[int] | None = None

    def order(self) -> list[int]:
        if self._order is None:
            import torch

            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(self.n, generator=g).tolist()
        return self._order

    def _advance(self) -> None:
        self.epoch, self.pos, self._order = self.epoch + 1, 0, None

    def batch(self, size: int) -> list[int]:
        """The next ``size`` indices of this pass (the last batch of a pass may be shorter)."""
        if self.pos >= self.n:
            self._advance()
        out = self.order()[self.pos:self.pos + size]
        self.pos += len(out)
        return out

    def take(self, size: int) -> list[int]:
        """The next ``size`` indices, running on into the next pass."""
        out: list[int] = []
        while len(out) < size:
            if self.pos >= self.n:
                self._advance()
            k = min(size - len(out), self.n - self.pos)
            out += self.order()[self.pos:self.pos + k]
            self.pos += k
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self._order = int(state["epoch"]), int(state["pos"]), None


__all__ = ["ExampleOrder"]
