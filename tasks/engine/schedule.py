"""The learning-rate schedule of every trainer: linear warm-up, then cosine or linear decay to
``min_lr_ratio`` (or constant). One formula: during warm-up step ``s`` (0-based: the optimizer steps
taken so far) runs at ``(s + 1) / (warmup + 1)`` of the peak, so the first step already moves and the
peak is reached on the first step after warm-up."""
from __future__ import annotations

import math


class WarmupCosine:
    """LR multiplier: linear warm-up to 1, then ``kind`` decay (cosine or linear) to ``min_ratio`` at
    ``max_steps`` (then flat), or ``constant`` 1.

    A class, not a lambda, so the scheduler's state_dict carries it."""

    def __init__(self, warmup: int, max_steps: int, min_ratio: float, kind: str = "cosine"):
        self.warmup, self.max_steps, self.min_ratio, self.kind = warmup, max_steps, min_ratio, kind

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        if step >= self.max_steps:
            return self.min_ratio
        progress = (step - self.warmup) / max(1, self.max_steps - self.warmup)
        if self.kind == "linear":
            return self.min_ratio + (1 - self.min_ratio) * (1 - progress)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer, cfg, total: int):
    """The schedule of ``cfg`` (ScheduleParams: warm-up, kind, floor) over ``total`` optimizer steps;
    every parameter group decays from its own peak, so ``head_lr``'s ratio to ``lr`` is kept."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(cfg.resolved_warmup(total), total, cfg.min_lr_ratio, cfg.scheduler))


__all__ = ["WarmupCosine", "make_scheduler"]
