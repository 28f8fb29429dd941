"""The optimisation practice every alignment trainer follows, in one place: parameter groups
(backbone at ``lr``, new heads at ``head_lr``), gradient accumulation, warm-up + cosine/linear
schedule, gradient clipping, and early stopping on a held-out metric with the best weights
restored. The knobs are the shared :class:`refinery.tasks.train.config.ScheduleParams`, spelled as in
pretrain and finetune; the schedule is pretraining's own :class:`refinery.tasks.train.loop.WarmupCosine`.

Heavy imports (torch) happen inside functions.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from refinery.tasks.train.config import ScheduleParams

# Names of the layers the align trainers add to a pretrained model (sequence-classification
# heads of decoder and encoder models, the PPO value head): they get ``head_lr``.
HEAD_PREFIXES = ("score", "classifier", "v_head")


def total_steps(n_examples: int, cfg: ScheduleParams, epochs: int = 1) -> int:
    """Optimizer steps of a run over ``n_examples`` for ``epochs`` passes, each step taking
    ``batch_size * grad_accum`` examples; ``max_steps`` (when > 0) caps it."""
    per_epoch = math.ceil(n_examples / (cfg.batch_size * cfg.grad_accum))
    total = per_epoch * epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


def micro_batches(n: int, batch_size: int, generator) -> Iterator[list[int]]:
    """Index lists of ``batch_size`` (the last of a pass may be shorter), reshuffled every pass, forever."""
    import torch

    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for i in range(0, n, batch_size):
            yield order[i:i + batch_size]


@dataclass
class Optimisation:
    """AdamW over the parameter groups, the LR schedule, accumulation and clipping.

    ``backward(loss)`` once per micro-batch (the loss is divided by ``grad_accum`` so the
    accumulated gradient is the mean over the step); ``step()`` once per optimizer step."""

    optimizer: Any
    scheduler: Any
    params: list
    grad_accum: int
    grad_clip: float
    steps: int = 0
    parallel: Any = None   # refinery.tasks.engine.parallel.Parallel of a multi-process run

    def backward(self, loss) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> dict:
        """Clip, step, advance the schedule; the figures of the step (grad norm before clipping,
        the learning rates it used)."""
        import torch

        rates = self.rates()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip if self.grad_clip else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return {"grad_norm": round(self.parallel.scalar(norm) if self.parallel else float(norm), 6), **rates}

    def rates(self) -> dict:
        """The current learning rate of the backbone (``lr``) and of the new layers (``head_lr``)."""
        out: dict = {}
        for g in self.optimizer.param_groups:
            key = "head_lr" if g.get("name", "").startswith("head") else "lr"
            out.setdefault(key, float(f"{g['lr']:.4g}"))
        return out


def make_optimisation(model, cfg: ScheduleParams, total: int, head_prefixes: Sequence[str] = HEAD_PREFIXES,
                      parallel=None) -> Optimisation:
    """The optimizer of ``model``'s trainable parameters with ``cfg``'s groups and schedule over ``total``
    steps (``model`` unwrapped, so head names match; with ``parallel``, after it sharded the model)."""
    import torch

    from refinery.tasks.train.common import param_groups
    from refinery.tasks.train.loop import WarmupCosine

    groups = param_groups(model, cfg.lr, cfg.resolved_head_lr(), head_prefixes, cfg.weight_decay)
    if not groups:
        raise ValueError("no trainable parameters")
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, WarmupCosine(cfg.resolved_warmup(total), total, cfg.min_lr_ratio, cfg.scheduler))
    params = [p for g in groups for p in g["params"]]
    return Optimisation(opt, sched, params, cfg.grad_accum, cfg.grad_clip, parallel=parallel)


@dataclass
class EarlyStopping:
    """Tracks a held-out metric (``mode`` max: accuracy, reward; min: loss, KL), keeps a copy of
    the trainable weights at the best validation, and says when ``patience`` validations in a row
    have not improved by ``min_delta`` (patience 0: never stop, but the best is still tracked).

    The copy is of trainable parameters only (with LoRA: the adapters, a few MB), on the CPU."""

    metric: str
    mode: str = "max"
    patience: int = 0
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    bad: int = 0
    _state: dict = field(default_factory=dict, repr=False)

    def update(self, value: float, step: int, model) -> bool:
        """Record a validation; True when it is the best so far."""
        better = self.best is None or (value > self.best + self.min_delta if self.mode == "max"
                                       else value < self.best - self.min_delta)
        if better:
            self.best, self.best_step, self.bad = value, step, 0
            self._state = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
        else:
            self.bad += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def restore(self, model) -> int | None:
        """Put the best weights back (the step they are from), when there was an improvement to keep."""
        import torch

        if not self._state:
            return None
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in self._state:
                    p.copy_(self._state[n].to(p.device))
        return self.best_step

    def summary(self) -> dict:
        return {"early_stopping_metric": self.metric, "best_value": self.best, "best_step": self.best_step,
                "stopped_early": self.should_stop}


def restore_best(stopper: EarlyStopping, model, cfg: ScheduleParams, step: int) -> int | None:
    """At the end of a run with early stopping on, the best validated weights go back in (when
    they are not the last ones already): the step restored, else None."""
    if cfg.early_stopping_patience <= 0 or stopper.best_step is None or stopper.best_step == step:
        return None
    return stopper.restore(model)


@dataclass
class LoopResult:
    steps: int
    tokens: int
    last_val: dict | None
    restored_step: int | None


def run_loop(model, cfg: ScheduleParams, total: int, optim: Optimisation, micro_step, log,
             validate=None, stopper: EarlyStopping | None = None) -> LoopResult:
    """The step loop the offline trainers (reward, DPO, KTO, ORPO) share.

    ``micro_step()`` runs one micro-batch (forward, ``optim.backward``) and returns its figures
    (``tokens`` and any others, e.g. ``loss``, ``accuracy``), averaged over the ``grad_accum``
    micro-batches of the step into one training row of ``log`` (a MetricsLog). Every
    ``eval_every`` steps and at the end, ``validate()`` (when given) returns the held-out figures:
    a validation row, and ``stopper`` sees ``figures[stopper.metric]``. With early stopping on,
    the run stops after ``patience`` validations without improvement and the best weights are restored.
    On several processes (``optim.parallel``) gradients synchronise on a step's last micro-batch and
    the figures are averaged over ranks (the validation figures are every rank's own: the same)."""
    par = optim.parallel
    eval_every = cfg.resolved_eval_every(total)
    step = tokens = 0
    last_val = None
    while step < total:
        rows = []
        for i in range(cfg.grad_accum):
            with par.accumulating(last=i == cfg.grad_accum - 1) if par else contextlib.nullcontext():
                rows.append(micro_step())
        figs = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "tokens"}
        figs["tokens"] = sum(int(r.get("tokens", 0)) for r in rows)
        if par:
            figs = par.mean(figs)
        tokens += int(figs.pop("tokens"))
        figs = {k: round(v, 6) for k, v in figs.items()}
        figs.update(optim.step())
        step += 1
        log.train(step, tokens=tokens, **figs)
        if validate is not None and (step % eval_every == 0 or step == total):
            last_val = validate()
            log.val(step, tokens=tokens, **last_val)
            if stopper is not None:
                stopper.update(last_val[stopper.metric], step, model)
                if stopper.should_stop:
                    break
    restored = restore_best(stopper, model, cfg, step) if stopper is not None else None
    return LoopResult(step, tokens, last_val, restored)


__all__ = ["HEAD_PREFIXES", "total_steps", "micro_batches", "Optimisation", "make_optimisation", "EarlyStopping",
           "restore_best", "LoopResult", "run_loop"]
