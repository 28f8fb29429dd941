"""The one training loop. A trainer subclasses :class:`Method` and gives the loss of one micro-batch
and its held-out figures; :class:`Engine` runs it:

    _prepare     wrap the model for the processes (DDP, FSDP2), the method's own setup (reference
                 log-probs...), the optimizer and schedule (after sharding: FSDP replaces parameters)
    _resume      the newest intact checkpoint: weights, optimizer, schedule, RNG, data position,
                 early stopping, metric history (state.py)
    validate     at step 0 of a fresh run: the starting point every curve is read against
    _loop        steps: ``updates_per_step`` optimizer updates of ``accum`` micro-batches each
                 (gradients synchronised on the last), clip, step, one metrics row; validation
                 every ``eval_every`` and at the end; early stopping; checkpoints every
                 ``checkpoint_every``, on SIGTERM and on ``stop_after``
    the end      the best validated weights back (early stopping on), metrics closed and plotted

What is built once is on the engine; what changes every step, and is checkpointed, is in
:class:`EngineState`.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from refinery.tasks.engine.early_stopping import EarlyStopping
from refinery.tasks.engine.state import EngineState

FINISHED = ("done", "early_stopped")      # a run that has nothing left to do
INTERRUPTED = ("preempted", "stopped")    # a run a rerun of the same command resumes


class TrainingInterrupted(RuntimeError):
    """Training stopped before the end (SIGTERM, ``stop_after``); its checkpoint is kept and the
    same command resumes from it."""


@dataclass
class Micro:
    """One micro-batch's result: ``loss`` (a tensor: this process's share, see
    :meth:`refinery.tasks.engine.parallel.Share.mean`), its ``weight`` in the step's objective
    (None: ``1 / accum``, the mean over the step's micro-batches) and figures to log (averaged over
    the micro-batches and processes; ``tokens`` is added up)."""

    loss: Any
    figures: dict = field(default_factory=dict)
    weight: float | None = None


class Method:
    """What a trainer gives the engine. Set ``model`` (the module that trains, unwrapped) and
    override :meth:`micro_step`, and :meth:`validate` when there is held-out data.

    The engine is ``self.engine`` once it runs: ``self.engine.train_model`` is the model to call
    for training forwards (the DDP wrapper, or the sharded module), ``self.engine.par`` this
    process's place in the run (``par.share`` splits a micro-batch between processes)."""

    desc = "train"                         # the run's name in progress bars and plots
    metric, mode = "loss", "min"           # early stopping: which validate() figure, and which way is better
    head_prefixes: tuple[str, ...] = ()    # newly added layers (lr: head_lr)
    show: tuple[str, ...] = ("loss",)      # figures on the progress bar
    panels: tuple[str, ...] = ()           # figures drawn in curves.png besides loss.png
    flops_per_token: float = 0.0           # for MFU (0: not reported)
    train_mode: bool = True                # False: dropout off while training (RL: the same tokens, the same log-probs)
    model: Any = None
    engine: "Engine"

    def setup(self) -> None:
        """After the model is wrapped and before a checkpoint is loaded: what the run computes from
        the starting weights (a reference model's log-probs)."""

    def started(self) -> None:
        """After a checkpoint was loaded (or none was found), before the first step of this process."""

    def micro_step(self, micro: int) -> Micro:
        """The loss of the step's ``micro``-th micro-batch (forward only: the engine runs backward)."""
        raise NotImplementedError

    def validate(self) -> dict | None:
        """Held-out figures (``{"loss": ..., "accuracy": ...}``), the same on every process; None
        when there is nothing to validate on."""
        return None

    def accum(self) -> int:
        """Micro-batches per optimizer update."""
        return self.engine.cfg.grad_accum

    def updates_per_step(self) -> int:
        """Optimizer updates per step (PPO: passes over a rollout); the schedule counts updates."""
        return 1

    def after_step(self, figures: dict) -> None:
        """After a step's updates, with its figures (averaged over processes); may add to them."""

    def stateful(self) -> dict[str, Any]:
        """Objects with ``state_dict``/``load_state_dict`` that are part of a checkpoint (the data
        position, a controller's coefficient)."""
        return {}


@dataclass
class EngineResult:
    status: str
    steps: int
    tokens: int
    history: list[dict]
    last_val: dict | None
    restored_step: int | None
    stopper: EarlyStopping
    seconds: float
    resumed_from: str | None

    def train_rows(self) -> list[dict]:
        return [r for r in self.history if r["split"] == "train"]

    def val_rows(self) -> list[dict]:
        return [r for r in self.history if r["split"] == "val"]

    def raise_if_interrupted(self, where: str | Path | None) -> None:
        """A stage must not publish a run that stopped early (SIGTERM, ``stop_after``)."""
        if self.status in INTERRUPTED:
            raise TrainingInterrupted(f"training stopped at step {self.steps} ({self.status}); checkpoint kept in "
                                      f"{where}: run the same command again to resume")


class Engine:
    """Runs a :class:`Method` for ``total`` steps under ``cfg`` (a ScheduleParams: accumulation,
    schedule, clipping, evaluation cadence, early stopping, ``checkpoint_every``, ``keep_last``).

    ``ckpt_dir``: where checkpoints go and resume comes from (None: neither); ``metrics_dir``
    (default ``ckpt_dir/metrics``): metrics.jsonl, TensorBoard, plots (None and no ``ckpt_dir``:
    rows in memory). ``device`` and ``dtype`` (autocast; float16 on CUDA adds loss scaling).
    ``hf_weights``: checkpoints hold the whole model as a Hugging Face folder (with the tokenizer at
    ``tokenizer_path``) that can be exported as it is; otherwise the trainable tensors. ``keep_best``
    keeps the best validated weights, restored at the end with early stopping on (or always, with
    ``restore_best``); ``save_on_best``/``save_final`` checkpoint on a new
    best and at the end (pretrain, which exports a checkpoint). ``optimizer`` builds the optimizer
    from the (wrapped) model when the default AdamW over parameter groups does not fit; ``info(engine)``
    adds the trainer's figures to each checkpoint's trainer_state.json."""

    def __init__(self, method: Method, cfg, *, total: int, device, dtype=None, ckpt_dir: str | Path | None = None,
                 metrics_dir: str | Path | None = None, log: Callable[[str], Any] = print, progress: bool = False,
                 on_row: Callable[[dict], None] | None = None, stop_after: int | None = None,
                 hf_weights: bool = False, tokenizer_path: str | None = None, keep_best: bool = True,
                 restore_best: bool = False, save_on_best: bool = False, save_final: bool = False, optimizer: Callable | None = None,
                 compute_dtype_fsdp=None, find_unused: bool = False, info: Callable[["Engine"], dict] | None = None,
                 log_every: int = 0, title: str = "", baseline: Callable[[], float | None] | None = None):
        from refinery.tasks.engine.parallel import Parallel

        self.method, self.cfg, self.total, self.device, self.dtype = method, cfg, total, device, dtype
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
        self.metrics_dir = Path(metrics_dir) if metrics_dir is not None else (
            self.ckpt_dir / "metrics" if self.ckpt_dir is not None else None)
        self.log_fn, self.progress, self.on_row, self.stop_after = log, progress, on_row, stop_after
        self.hf_weights, self.tokenizer_path, self.save_on_best, self.save_final = (hf_weights, tokenizer_path,
                                                                                   save_on_best, save_final)
        self.make_optimizer, self.info, self.log_every, self.title = optimizer, info, log_every, title
        self.baseline, self.restore_best = baseline, restore_best
        self.stopper = EarlyStopping(method.metric, method.mode, cfg.early_stopping_patience,
                                     cfg.early_stopping_min_delta, keep_best=keep_best)
        method.engine = self
        self.model = method.model                     # unwrapped: what is saved and restored
        self.trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        self.par = Parallel.setup(self.model, cfg, device, find_unused=find_unused, compute_dtype=compute_dtype_fsdp)
        self.train_model = self.par.train
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.scaler: Any = None
        self.peak_flops: float | None = None
        self.metrics: Any = None
        self.resumed_from: Path | None = None        # until the first step's loss proves the checkpoint finite
        self.resumed_checkpoint: Path | None = None
        self.state = EngineState()                    # the run's state (``state.step``: steps done so far)
        self.t_start = time.perf_counter()

    # ------------------------------------------------------------------ small helpers
    @property
    def master(self) -> bool:
        return self.par.rank == 0

    def log(self, message: str) -> None:
        if self.master:
            self.log_fn(message)

    def autocast(self):
        from refinery.tasks.train.common import autocast

        return autocast(self.device, self.dtype) if self.dtype is not None else contextlib.nullcontext()

    def params(self) -> list:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    # ------------------------------------------------------------------ phases
    def _prepare(self) -> None:
        import torch

        from refinery.tasks.engine.optim import build_optimizer
        from refinery.tasks.engine.schedule import make_scheduler

        self.method.setup()
        self.optimizer = (self.make_optimizer(self.model) if self.make_optimizer is not None
                          else build_optimizer(self.model, self.cfg, self.device, head_prefixes=self.method.head_prefixes))
        self.scheduler = make_scheduler(self.optimizer, self.cfg, self.total * self.method.updates_per_step())
        if self.device.type == "cuda" and self.dtype == torch.float16:   # float16 needs loss scaling
            self.scaler = torch.amp.GradScaler("cuda")
        if self.device.type == "cuda":   # for MFU: the device's peak, looked up once
            from refinery.tasks.train.metrics import peak_flops

            self.peak_flops = peak_flops(torch.cuda.get_device_name(self.device))

    def _open_metrics(self, st: EngineState) -> None:
        from refinery.tasks.train.metrics import MetricsLog

        cfg = self.cfg
        self.metrics = MetricsLog(self.metrics_dir if self.master else None, st.history, total_steps=self.total,
                                  desc=self.method.desc, bar=self.master and self.progress, show=self.method.show,
                                  on_row=self.on_row, report_to=cfg.report_to if self.master else (),
                                  run_config=cfg.model_dump(mode="json"), fresh=self.ckpt_dir is None,
                                  started=self.t_start)
        self.metrics.rewrite()   # a resumed run: the checkpoint's rows, not what a crash logged after it

    def validate(self, st: EngineState) -> tuple[dict | None, bool]:
        """The method's held-out figures (rank 0's, which every rank gets: all must agree on early
        stopping), a validation row, early stopping's count; (figures, whether a new best)."""
        from refinery.tasks.train import distributed as dist

        figs = dist.broadcast_object(self.method.validate())
        if figs is None:
            return None, False
        self.metrics.val(st.step, tokens=st.tokens, **figs)
        improved = self.stopper.update(float(figs[self.method.metric]), st.step, self.model)
        note = "new best" if improved else f"best {self.stopper.best:.4g} at step {self.stopper.best_step}"
        self.log(f"step {st.step} | " + " | ".join(f"val {k} {_fmt(v)}" for k, v in figs.items()) + f" | {note}")
        return figs, improved

    def _update(self, rows: list[dict], loss_acc) -> float:
        """One optimizer update: ``accum`` micro-batches (backward of each, gradients synchronised
        on the last), clip, step the optimizer and the schedule. Returns the gradient norm."""
        import torch

        from refinery.tasks.train.fsdp import to_float

        n = self.method.accum()
        for i in range(n):
            with self.par.accumulating(last=i == n - 1):
                with self.autocast():
                    m = self.method.micro_step(i)
                w = m.weight if m.weight is not None else 1.0 / n
                loss = m.loss * w
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_acc += loss.detach().float().to(loss_acc.device)
            rows.append(m.figures)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = to_float(torch.nn.utils.clip_grad_norm_(self.params(), clip))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _train_step(self, st: EngineState) -> dict:
        """One step: its updates, then one training row (figures averaged over micro-batches and processes)."""
        import torch

        from refinery.tasks.engine.optim import rates
        from refinery.tasks.train.metrics import mfu

        t0 = time.perf_counter()
        lr = rates(self.optimizer)
        rows: list[dict] = []
        loss_acc = torch.zeros((), device=self.device)
        norms = []
        updates = self.method.updates_per_step()
        for _ in range(updates):
            norms.append(self._update(rows, loss_acc))
        figs = _average(rows)
        figs["loss"] = float(loss_acc) / updates
        figs["grad_norm"] = sum(norms) / len(norms)
        figs = self.par.mean(figs)
        tokens = int(figs.pop("tokens", 0))
        self.method.after_step(figs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        st.seconds += seconds
        st.step += 1
        st.tokens += tokens
        timing: dict = {}
        if tokens:
            tps = tokens / seconds
            timing["tokens_per_sec"] = round(tps, 1)
            if self.method.flops_per_token:
                timing["mfu"] = mfu(self.method.flops_per_token, tps, self.peak_flops, self.par.world)
        row = self.metrics.train(st.step, tokens=st.tokens, **{k: _round(v) for k, v in figs.items()}, **lr, **timing)
        if self.log_every and (st.step % self.log_every == 0 or st.step == 1):
            self.log(f"step {st.step} | loss {figs['loss']:.4f} | lr {lr.get('lr', 0):.2e}"
                     + (f" | {timing['tokens_per_sec']:,.0f} tok/s" if "tokens_per_sec" in timing else "")
                     + (f" | mfu {timing['mfu'] * 100:.1f}%" if timing.get("mfu") is not None else ""))
        self._check_finite(figs["loss"], st.step)
        return row

    def _check_finite(self, loss: float, step: int) -> None:
        """A non-finite loss stops the run before it is checkpointed; right after a resume the
        checkpoint is the suspect and is named."""
        if not math.isfinite(loss):
            if self.resumed_from is not None:
                from refinery.tasks.train.checkpoint import NonFiniteCheckpointError

                raise NonFiniteCheckpointError.of(self.resumed_from, [f"the first loss after resume is {loss} (step {step})"])
            raise FloatingPointError(f"{self.method.desc}: loss is {loss} at step {step}: lower lr or check the data")
        self.resumed_from = None

    def _loop(self, st: EngineState) -> tuple[str, dict | None]:
        """Steps until ``total``, early stopping, SIGTERM (all processes agree) or ``stop_after``."""
        from refinery.tasks.engine.signals import Preemption
        from refinery.tasks.engine.state import save
        from refinery.tasks.train import distributed as dist

        cfg = self.cfg
        every = cfg.resolved_eval_every(self.total)
        ckpt_every = self.checkpoint_every()
        status, last_val = "done", None
        with Preemption() as preempt:
            while st.step < self.total:
                self._train_step(st)
                improved = False
                if st.step % every == 0 or st.step == self.total:
                    val, improved = self.validate(st)
                    last_val = val if val is not None else last_val
                stop_early = self.stopper.should_stop
                preempted = dist.any_true(preempt.flag, self.device)
                stopped = self.stop_after is not None and st.step >= self.stop_after
                status = ("early_stopped" if stop_early else "preempted" if preempted
                          else "stopped" if stopped else "done")
                ending = st.step == self.total or stop_early or preempted or stopped
                periodic = bool(ckpt_every) and st.step % ckpt_every == 0
                if self.ckpt_dir is not None and ((ending and (self.save_final or status in INTERRUPTED))
                                                  or periodic or (improved and self.save_on_best)):
                    save(self, st, status if ending else "running")
                if ending and status != "done":
                    self.log(f"{self.method.desc}: {status} at step {st.step}")
                if ending:
                    break
        return status, last_val

    def checkpoint_every(self) -> int:
        """Steps between checkpoints (0: only on SIGTERM and at the end)."""
        resolve = getattr(self.cfg, "resolved_checkpoint_every", None)
        return resolve(self.total) if resolve is not None else 0

    def fit(self) -> EngineResult:
        """Train (or resume) to the end; the result is every process's (figures averaged)."""
        from refinery.tasks.engine.state import resume

        self._prepare()
        st = self.state = resume(self) if self.ckpt_dir is not None else EngineState()
        if st.status in FINISHED:   # finished earlier: the weights it ended with, nothing to train
            restored = self.stopper.restore(self.model, st.step, self.restore_best)
            return self._result(st, st.status, _last_val(st.history), restored)
        self.method.started()
        self._open_metrics(st)
        last_val = None
        try:
            if st.step == 0 and not st.history:
                last_val, improved = self.validate(st)   # the starting point; the best until beaten
                if improved and self.save_on_best and self.ckpt_dir is not None:
                    from refinery.tasks.engine.state import save

                    save(self, st, "running")
            self.train_model.train(self.method.train_mode)
            status, val = self._loop(st)
            last_val = val or last_val or _last_val(st.history)
        finally:
            self.metrics.close()
        restored = None if status in INTERRUPTED else self.stopper.restore(self.model, st.step, self.restore_best)
        if self.master:   # loss.png (and curves.png) once, however the run ended
            self.metrics.plot(self.title or self.method.desc, baseline=self.baseline() if self.baseline else None,
                              panels=self.method.panels)
        return self._result(st, status, last_val, restored)

    def _result(self, st: EngineState, status: str, last_val, restored) -> EngineResult:
        return EngineResult(status=status, steps=st.step, tokens=st.tokens, history=st.history, last_val=last_val,
                            restored_step=restored, stopper=self.stopper, seconds=st.seconds,
                            resumed_from=str(self.resumed_checkpoint) if self.resumed_checkpoint else None)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _round(v):
    return round(v, 6) if isinstance(v, float) else v


def _average(rows: Sequence[dict]) -> dict:
    """The micro-batches' figures: numbers averaged over the micro-batches that have them (``tokens``
    added up); a string (a sample reply) is the first micro-batch's."""
    out: dict = {}
    keys = list(dict.fromkeys(k for r in rows for k in r))
    for k in keys:
        vals = [r[k] for r in rows if k in r and r[k] is not None]
        if not vals:
            continue
        if isinstance(vals[0], str):
            out[k] = vals[0]
        elif k == "tokens":
            out[k] = int(sum(vals))
        else:
            out[k] = sum(float(v) for v in vals) / len(vals)
    out.setdefault("tokens", 0)
    return out


def _last_val(history: list[dict]) -> dict | None:
    vals = [r for r in history if r["split"] == "val"]
    if not vals:
        return None
    return {k[4:]: v for k, v in vals[-1].items() if k.startswith("val_")}


__all__ = ["Engine", "EngineResult", "EngineState", "Method", "Micro", "TrainingInterrupted", "FINISHED", "INTERRUPTED"]
