"""Several processes for a trainer (``devices=N``, ``strategy`` ddp or fsdp), as the engine runs them.

How a multi-process run goes:

- The stage starts the processes (:func:`refinery.tasks.train.distributed.launch`) with its worker
  module. Every rank runs the stage's own trainer on the same data, from the same seed.
- The engine wraps the model once with :meth:`Parallel.setup` (DDP, or FSDP2 ``fully_shard`` per
  block, from :mod:`refinery.tasks.train.distributed`) and builds the optimizer over it.
- Each micro-batch is drawn from the same seeded order on every rank and split between the ranks
  (:meth:`Parallel.share`), so the global batch stays ``batch_size`` examples. A rank's loss is
  its part of the whole micro-batch's mean, scaled by the world size: DDP and FSDP average
  gradients over ranks, so the update is the single-process one (up to float summation order).
- Figures are averaged over ranks before they are logged (:meth:`Parallel.mean`).
- Rank 0 writes the metrics and the trained tensors. The stage loads them into its own copy of
  the model and publishes it as a one-process run would.

One process: :meth:`Parallel.setup` returns the model unchanged and a share is the whole micro-batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Share:
    """This rank's examples of one micro-batch. A rank left without any (a short last batch) gets a
    stand-in example of weight 0, because every rank must run forward and backward (collectives)."""

    idx: list[int]
    weight: list[float]
    n: int          # examples in the whole micro-batch, over all ranks
    world: int

    def mean(self, per_example):
        """This rank's part of the micro-batch mean (see the module docstring): the sum over its own
        examples divided by the micro-batch size and times the world size."""
        import torch

        w = torch.tensor(self.weight, dtype=per_example.dtype, device=per_example.device)
        return (per_example * w).sum() / self.n * self.world

    def count(self, per_example: Sequence[int]) -> int:
        """Sum of a per-example count (tokens) over this rank's real examples."""
        return int(sum(c for c, w in zip(per_example, self.weight) if w))


@dataclass
class Parallel:
    """This process's place in a run: ``rank`` of ``world``, and the model that trains (``train``:
    the DDP wrapper or the FSDP-sharded module; the model itself in one process)."""

    rank: int = 0
    world: int = 1
    train: Any = None
    sharded: bool = False

    @classmethod
    def setup(cls, model, cfg, device, find_unused: bool = False, compute_dtype=None) -> "Parallel":
        """Join the run's process group (when the launcher started this process) and wrap ``model``
        for ``cfg.strategy`` (FSDP computes in ``compute_dtype``, default the weights' dtype). Build
        the optimizer after this: FSDP replaces the parameters by shards."""
        from refinery.tasks.train import distributed as dist

        rank, world, _ = dist.env()
        strategy = getattr(cfg, "strategy", "auto")
        if world <= 1 and not (strategy == "fsdp" and dist.is_initialized()):   # FSDP on one GPU: a group of one
            return cls(train=model)
        dist.init()
        sharded = strategy == "fsdp"
        compute = compute_dtype or next(model.parameters()).dtype
        wrapped = dist.wrap(model, "fsdp" if sharded else "ddp", device, compute,
                            getattr(cfg, "fsdp_cpu_offload", False), find_unused=find_unused)
        return cls(rank, world, wrapped, sharded)

    def share(self, idx: Sequence[int]) -> Share:
        idx = list(idx)
        mine = idx[self.rank::self.world]
        if not mine:
            return Share([idx[0]], [0.0], len(idx), self.world)
        return Share(mine, [1.0] * len(mine), len(idx), self.world)

    def part(self, items: Sequence) -> list:
        """This rank's items of a list every rank holds (prompts of a rollout, held-out prompts)."""
        return list(items)[self.rank::self.world]

    @contextlib.contextmanager
    def accumulating(self, last: bool):
        """Around a micro-batch's backward: gradients are synchronised on the last micro-batch of a
        step only (DDP's no_sync, FSDP2's requires_gradient_sync)."""
        if self.world <= 1 or last:
            if self.sharded:
                self.train.set_requires_gradient_sync(True)
            yield
            return
        if self.sharded:
            self.train.set_requires_gradient_sync(False)
            yield
            return
        with self.train.no_sync():
            yield

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over all ranks (one all-reduce); the values themselves in one process."""
        if self.world <= 1:
            return list(values)
        import torch
        import torch.distributed as tdist

        t = torch.tensor(list(values), dtype=torch.float64)
        if tdist.get_backend() == "nccl":
            t = t.cuda()
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t.cpu().tolist()

    def mean(self, figures: dict, summed: Sequence[str] = ("tokens",)) -> dict:
        """Numeric ``figures`` averaged over ranks (the keys in ``summed`` added up); others kept."""
        if self.world <= 1:
            return figures
        keys = [k for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        totals = self.sum([float(figures[k]) for k in keys])
        out = dict(figures)
        for k, t in zip(keys, totals):
            out[k] = int(round(t)) if k in summed else round(t / self.world, 6)
        return out

    def scalar(self, x) -> float:
        """A float from a tensor that may be a DTensor (gradient norms of sharded parameters)."""
        from refinery.tasks.train.fsdp import to_float

        return to_float(x)


__all__ = ["Share", "Parallel"]
