"""Early stopping on a held-out metric, with the best validated weights kept to be restored."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EarlyStopping:
    """Tracks a held-out metric (``mode`` max: accuracy, reward; min: loss), keeps a copy of the
    trainable weights at the best validation (``keep_best``), and says when ``patience`` validations
    in a row have not improved by ``min_delta`` (patience 0: never stop, the best is still tracked).

    The copy is of trainable parameters only (with LoRA: the adapters, a few MB), whole and on the
    CPU (a sharded parameter is gathered: every rank calls :meth:`update`). All of it, the copy
    included, is part of a checkpoint (:meth:`state_dict`)."""

    metric: str
    mode: str = "min"
    patience: int = 0
    min_delta: float = 0.0
    keep_best: bool = True
    best: float | None = None
    best_step: int | None = None
    bad: int = 0
    weights: dict = field(default_factory=dict, repr=False)

    def update(self, value: float, step: int, model) -> bool:
        """Record a validation; True when it is the best so far."""
        better = self.best is None or (value > self.best + self.min_delta if self.mode == "max"
                                       else value < self.best - self.min_delta)
        if better:
            self.best, self.best_step, self.bad = value, step, 0
            if self.keep_best:
                self.weights = {n: _whole(p).to("cpu", copy=True) for n, p in model.named_parameters()
                                if p.requires_grad}
        else:
            self.bad += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def restore(self, model, step: int, always: bool = False) -> int | None:
        """Put the best weights back when they are not the last ones already (with early stopping
        on, ``patience`` > 0, or ``always``); the step restored, else None."""
        import torch

        if (self.patience <= 0 and not always) or not self.weights or self.best_step is None or self.best_step == step:
            return None
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in self.weights:
                    _assign(p, self.weights[n])
        return self.best_step

    def summary(self) -> dict:
        return {"early_stopping_metric": self.metric, "best_value": self.best, "best_step": self.best_step,
                "stopped_early": self.should_stop}

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.bad = state["best"], state["best_step"], int(state["bad"])
        self.weights = dict(state.get("weights") or {})


def _whole(p):
    """A parameter's full value: a sharded (DTensor) one gathered (collective), else itself."""
    full = getattr(p, "full_tensor", None)
    return (full() if full is not None else p).detach()


def _assign(p, value) -> None:
    """Copy a whole tensor into a parameter, sharding it first when the parameter is a DTensor."""
    mesh = getattr(p, "device_mesh", None)
    if mesh is not None:
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(p.to_local().device, p.dtype), mesh, p.placements)
        p.copy_(value)
        return
    p.copy_(value.to(p.device, p.dtype))


__all__ = ["EarlyStopping"]
