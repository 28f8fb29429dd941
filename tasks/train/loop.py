"""The pretraining loop, readable top to bottom (after nanoGPT's train.py).

    _build              model from config -> AdamW (decay on matrices only) -> warmup + cosine LR
    _resume             the latest checkpoint if there is one (weights, optimizer, scheduler, RNG,
                        data position) -> TrainState (step, tokens, best, history ...)
    _unigram_baseline   the loss a context-free model would reach
    _open_metrics       metrics.jsonl, TensorBoard, trackers, progress (refinery.tasks.train.metrics)
    _evaluate, _save    at step 0
    _loop               _train_step (grad_accum micro-batches, bf16 autocast on GPU, clip, step, log
                        loss / lr / tokens/s / MFU); _evaluate every eval_every; early stopping on
                        validation loss; _save every save_every, on a new best, on SIGTERM, at the end

What is built once lives in :class:`Run`; what changes every step (and is checkpointed) in
:class:`TrainState`; each phase is a function of the two.

The same function runs single-process and under DDP (launched by :func:`run_training` through
torchrun): every process reads the *global* micro-batch from an unsharded reader and keeps its own
slice, so a DDP run consumes exactly the data of a single-process run with the same global batch,
and the reader position saved by rank 0 is everyone's position.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from refinery.tasks.train.config import TrainConfig


class WarmupCosine:
    """LR multiplier: linear warmup to 1, then ``kind`` decay (cosine or linear) to ``min_ratio`` at
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


class _Preemption:
    """SIGTERM sets a flag; the loop checkpoints at the end of the step and stops.

    Signal handlers can only be installed from the main thread; elsewhere (a Prefect task in a
    worker thread) the periodic checkpoints are what a re-run resumes from."""

    def __init__(self):
        self.flag = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.flag = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def make_optimizer(model, cfg: TrainConfig, device, fused: bool | None = None):
    """AdamW with weight decay on matrices (embeddings included) and none on norms and biases.
    ``fused`` (default: on CUDA and CPU) is off for sharded (DTensor) parameters on CPU."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    seen: set[int] = set()
    decay: list = []
    no_decay: list = []
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             fused=device.type in ("cuda", "cpu") if fused is None else fused)


def evaluate(model, objective, val_reader, cfg: TrainConfig, device, autocast, batch_size: int | None = None) -> float:
    """Mean validation loss per target token over ``cfg.eval_batches`` fixed batches (fixed masks).

    ``batch_size`` defaults to the global micro-batch, so a DDP run (evaluating on rank 0) sees the
    same validation windows as a single process with the same global batch."""
    import torch

    from refinery.tasks.train.objectives import IGNORE, step_generator

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i, w in enumerate(val_reader.eval_batches(batch_size or cfg.batch_size, cfg.eval_batches)):
            batch = objective.prepare(torch.from_numpy(w), step_generator(cfg.seed, i, 0, stream=1))
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                loss = objective.loss(model, batch)
            n = int((batch["labels"] != IGNORE).sum())
            total += float(loss) * n
            count += n
    model.train(was_training)
    if count == 0:
        raise ValueError("the validation split is empty: lower val_fraction's denominator (more data) or seq_len")
    return total / count


# ----------------------------------------------------------------------------- the run's pieces and state
@dataclass
class TrainState:
    """What changes from step to step. All of it goes into every checkpoint, so a resumed run
    continues exactly where the checkpoint left off (same losses, same early-stopping count)."""

    step: int = 0
    tokens: int = 0
    best_step: int | None = None
    best_val_loss: float | None = None
    bad_evals: int = 0
    unigram: dict | None = None
    history: list[dict] = field(default_factory=list)
    status: str = "running"          # of the checkpoint resumed from ("done": nothing left to do)


@dataclass
class Run:
    """What is built once and used by every phase: the rank, device, model, objective, optimizer,
    readers and the metrics log. ``model`` is what trains (maybe compiled and DDP-wrapped),
    ``raw_model`` what is saved, ``eval_model`` what evaluates (never the DDP wrapper)."""

    cfg: TrainConfig
    ckpt_dir: Path
    rank: int
    world: int
    device: Any
    dtype: Any
    tokenizer: Any
    objective: Any
    model: Any
    optimizer: Any
    scheduler: Any
    reader: Any
    val_reader: Any
    log: Callable[[str], None]
    memory: Any
    raw_model: Any = None
    eval_model: Any = None
    metrics: Any = None
    n_params: int = 0
    flops_per_token: float = 0.0
    peak_flops: float | None = None
    t_start: float = field(default_factory=time.perf_counter)
    shards: list[dict] | None = None      # fsdp: what each rank holds (elements), from its local tensors
    resumed_from: Path | None = None      # the checkpoint resumed from, until the first step's loss proves it finite

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        """Sharded data parallelism: strategy=fsdp on more than one process, or in a process group
        of one (a single GPU launched through torchrun: FSDP's mixed precision and freeing)."""
        from refinery.tasks.train import distributed as dist

        return self.cfg.strategy == "fsdp" and (self.world > 1 or dist.is_initialized())

    def autocast(self):
        from refinery.tasks.train.common import autocast

        return autocast(self.device, self.dtype)


def _build(cfg: TrainConfig, reader, val_reader, ckpt_dir: Path, log: Callable[[str], None]) -> Run:
    """Device, then model, objective, optimizer and schedule, in this order: the seed is set first
    and the same on every rank, so every rank starts from identical weights."""
    import torch
    from transformers import AutoTokenizer

    from refinery.tasks.train import distributed as dist
    from refinery.tasks.train.common import PeakMemory, compute_dtype, pick_device, seed_everything
    from refinery.tasks.train.metrics import peak_flops
    from refinery.tasks.train.models import count_params, flops_per_token
    from refinery.tasks.train.objectives import example_lengths, make_objective

    t_start = time.perf_counter()
    rank, world, local_rank = dist.env()
    device = pick_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    memory = PeakMemory(device).start()

    seed_everything(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(reader.tokenizer_path))
    n_vocab = max(int(reader.vocab_size), len(tokenizer))
    model = _initial_model(cfg, reader, tokenizer, n_vocab, log if rank == 0 else (lambda m: None)).to(device)
    objective = make_objective(cfg.objective, tokenizer, n_vocab, cfg.seq_len, mlm_probability=cfg.mlm_probability,
                               noise_density=cfg.noise_density, mean_span_length=cfg.mean_span_length,
                               loss_chunk_tokens=cfg.loss_chunk_tokens)
    if cfg.grad_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):   # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(cfg.resolved_warmup(), cfg.max_steps,
                                                                          cfg.min_lr_ratio, cfg.scheduler))
    run = Run(cfg=cfg, ckpt_dir=ckpt_dir, rank=rank, world=world, device=device,
              dtype=compute_dtype(cfg.dtype, device), tokenizer=tokenizer, objective=objective, model=model,
              optimizer=optimizer, scheduler=scheduler, reader=reader, val_reader=val_reader, log=log,
              memory=memory, raw_model=model, eval_model=model, t_start=t_start)
    run.n_params = count_params(model)
    run.flops_per_token = flops_per_token(model, *example_lengths(objective, cfg.seq_len))
    run.peak_flops = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return run


def _initial_model(cfg: TrainConfig, reader, tokenizer, n_vocab: int, log: Callable[[str], None]):
    """A fresh model of ``cfg.preset``, or (``init_from``) the pretrained one, after checking that the
    data was tokenized with its tokenizer: a mismatch stops here, before any step."""
    from refinery.tasks.train.models import build_model, padded_vocab
    from refinery.tasks.train.objectives import special_ids

    if not cfg.init_from:
        return build_model(cfg.objective, cfg.preset, padded_vocab(n_vocab), cfg.seq_len, special_ids(tokenizer),
                           cfg.model)
    from refinery.tasks.train.init_from import check_init_from, load_init_model

    path, _ = check_init_from(cfg.init_from, cfg.objective, str(reader.tokenizer_path), n_vocab)
    log(f"continuing from {cfg.init_from} ({path})")
    return load_init_model(path, cfg.objective)


def _shard(run: Run) -> None:
    """fsdp: shard the model per block (fully_shard), then build the optimizer and schedule anew
    over the sharded parameters (the ones _build made point at the unsharded tensors)."""
    import torch

    from refinery.tasks.train.fsdp import shard_model

    cfg = run.cfg
    shard_model(run.model, run.dtype, cfg.fsdp_cpu_offload)
    run.optimizer = make_optimizer(run.model, cfg, torch.device("cpu") if cfg.fsdp_cpu_offload else run.device,
                                   fused=run.device.type == "cuda")
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, WarmupCosine(
        cfg.resolved_warmup(), cfg.max_steps, cfg.min_lr_ratio, cfg.scheduler))


def _shard_stats(run: Run) -> None:
    """fsdp: every rank's held elements (parameters, optimizer state), gathered on every rank."""
    import torch.distributed as tdist

    from refinery.tasks.train.fsdp import shard_stats

    mine = shard_stats(run.model, run.optimizer)
    everyone: list = [None] * run.world
    tdist.all_gather_object(everyone, mine)
    run.shards = everyone


def _resume(run: Run) -> TrainState:
    """The latest checkpoint's weights, optimizer, schedule, reader position and RNG, or a fresh state.
    Rank 0 picks (and verifies) the checkpoint, so ranks neither race to move a damaged one aside
    nor each read every file to hash it; non-finite weights or optimizer state are an error that
    names the checkpoint."""
    from refinery.tasks.train import checkpoint as ckpt
    from refinery.tasks.train import distributed as dist

    last = dist.broadcast_object(ckpt.latest_checkpoint(run.ckpt_dir) if run.master else None)
    if last is None:
        return TrainState()
    saved = ckpt.load_state(last)
    if run.fsdp:   # every rank reads its own shards of the weights and the optimizer
        from refinery.tasks.train.fsdp import DCP_DIR, load_sharded

        load_sharded(run.model, run.optimizer, last / DCP_DIR, with_optimizer=bool(saved.get("sharded_optimizer")))
    else:
        ckpt.load_weights(run.model, last)
        run.optimizer.load_state_dict(saved["optimizer"])
    bad = ckpt.nonfinite_tensors(run.model, run.optimizer)
    if dist.any_true(bool(bad), run.device):   # every rank raises, none waits in a collective
        raise ckpt.NonFiniteCheckpointError.of(last, bad or ["another rank's shards"])
    run.resumed_from = last
    run.scheduler.load_state_dict(saved["scheduler"])
    run.reader.load_state_dict(ckpt.from_safe(saved["reader"]))
    ckpt.set_rng_state(saved["rng"])
    if run.master:
        run.log(f"resumed from {last} (step {saved['step']})")
    return TrainState(step=int(saved.get("step", 0)), tokens=int(saved.get("tokens", 0)),
                      best_step=saved.get("best_step"), best_val_loss=saved.get("best_val_loss"),
                      bad_evals=int(saved.get("bad_evals", 0)), unigram=saved.get("unigram"),
                      history=list(saved.get("history", [])), status=saved.get("status", "running"))


def _summary(run: Run, st: TrainState, status: str) -> dict:
    """The run's figures (rank 0's view): what the stage's manifest and the checkpoints' info hold.
    Speeds are medians over the steps after the first (which pays for warm-up and compilation)."""
    import numpy as np
    import torch

    from refinery.tasks.train import checkpoint as ckpt

    vals = [r for r in st.history if r.get("val_loss") is not None]
    losses = [r for r in st.history if r.get("loss") is not None]
    speeds = [r["tokens_per_sec"] for r in losses[1:]] or [r["tokens_per_sec"] for r in losses]
    mfus = [r["mfu"] for r in losses[1:] if r.get("mfu") is not None]
    device = run.device
    return {
        "status": status, "steps": st.step, "tokens": st.tokens, "params": run.n_params,
        "objective": run.cfg.objective, "preset": run.cfg.preset, "init_from": run.cfg.init_from,
        "val_loss_start": vals[0]["val_loss"] if vals else None,
        "val_loss_end": vals[-1]["val_loss"] if vals else None,
        "best_step": st.best_step, "best_val_loss": st.best_val_loss,
        "loss_start": losses[0]["loss"] if losses else None, "loss_end": losses[-1]["loss"] if losses else None,
        "unigram_entropy": (st.unigram or {}).get("entropy"), "unigram_tokens": (st.unigram or {}).get("tokens"),
        "tokens_per_sec": float(np.median(speeds)) if speeds else None,
        "mfu": float(np.median(mfus)) if mfus else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "world_size": run.world, "strategy": "fsdp" if run.fsdp else ("ddp" if run.world > 1 else "single"),
        "shards": run.shards, "checkpoint_dir": str(run.ckpt_dir),
        **run.memory.stats(),
        "final_checkpoint": str(ckpt.step_dir(run.ckpt_dir, st.step)),
        "best_checkpoint": str(ckpt.step_dir(run.ckpt_dir, st.best_step)) if st.best_step is not None else None,
        "history": st.history,
    }


def _unigram_baseline(run: Run, st: TrainState, unigram_reader) -> None:
    """The entropy of the training tokens' unigram distribution: the loss a model that ignores
    context would reach, the line a pretrained model must get below. Computed once (kept in checkpoints)."""
    from refinery.tasks.train import distributed as dist
    from refinery.tasks.train.data import unigram_entropy

    if st.unigram is not None:
        return
    if run.master and unigram_reader is not None:
        st.unigram = unigram_entropy(unigram_reader, run.cfg.unigram_max_tokens)
    st.unigram = dist.broadcast_object(st.unigram)
    if run.master and st.unigram:
        run.log(f"unigram baseline: {st.unigram['entropy']:.4f} nats/token over {st.unigram['tokens']:,} training tokens")


def _open_metrics(run: Run, st: TrainState, progress: bool):
    """Rank 0 writes ``<ckpt_dir>/metrics/``; the other ranks keep rows in memory only. A resumed
    run rewrites metrics.jsonl from the checkpoint's history, dropping rows a crashed run logged
    after its last checkpoint."""
    from refinery.tasks.train.metrics import METRICS_DIR, MetricsLog

    cfg = run.cfg
    metrics = MetricsLog(run.ckpt_dir / METRICS_DIR if run.master else None, st.history,
                         total_steps=cfg.max_steps, desc="pretrain", bar=run.master and progress,
                         report_to=cfg.report_to if run.master else (), run_config=cfg.model_dump(mode="json"),
                         started=run.t_start)
    metrics.rewrite()
    return metrics


def _wrap_for_training(run: Run) -> None:
    """torch.compile and DDP wrap the model that trains; checkpoints save the unwrapped one."""
    import torch

    if run.cfg.compile:
        run.model = torch.compile(run.model)
    run.eval_model = run.model
    if run.world > 1 and not run.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        run.model = DDP(run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)


def _evaluate(run: Run, st: TrainState) -> bool:
    """Validation loss on rank 0 (broadcast to all ranks, which must agree on early stopping),
    logged; True when it is a new best."""
    from refinery.tasks.train import distributed as dist

    cfg = run.cfg
    val = None
    if run.master or run.fsdp:   # a sharded model's forward needs every rank (all see the same batches)
        val = evaluate(run.eval_model, run.objective, run.val_reader, cfg, run.device, run.autocast,
                       cfg.batch_size * run.world)
    val = dist.broadcast_object(val)
    run.metrics.val(st.step, tokens=st.tokens, loss=val, ppl=math.exp(min(val, 50.0)))
    if st.best_val_loss is None or val < st.best_val_loss - cfg.early_stopping_min_delta:
        st.best_step, st.best_val_loss, st.bad_evals = st.step, val, 0
        improved = True
    else:
        st.bad_evals += 1
        improved = False
    if run.master:
        note = "new best" if improved else f"best {st.best_val_loss:.4f} at step {st.best_step}"
        run.log(f"step {st.step} | val loss {val:.4f} | ppl {math.exp(min(val, 50)):.2f} | {note}")
    return improved


def _save(run: Run, st: TrainState, status: str) -> None:
    """A checkpoint (rank 0) of weights and the whole state; old ones pruned (the best is kept).
    The loss PNG (~0.4 s) is drawn only when the run ends or stops."""
    from refinery.tasks.train import checkpoint as ckpt
    from refinery.tasks.train import distributed as dist

    full_sd, staged, with_optim = None, None, False
    if run.fsdp:   # collective: the gathered weights for rank 0's HF folder, every rank's shards
        from refinery.tasks.train.fsdp import full_state_dict, save_sharded

        full_sd = full_state_dict(run.model)
        staged = run.ckpt_dir / f".dcp-step-{st.step:08d}"
        if run.master:
            import shutil

            shutil.rmtree(staged, ignore_errors=True)
        dist.barrier()
        with ckpt.naming_a_full_disk(ckpt.step_dir(run.ckpt_dir, st.step), cleanup=staged):
            with_optim = save_sharded(run.model, run.optimizer, staged)
        dist.barrier()
    if run.master:
        cfg = run.cfg
        saved = {"step": st.step, "tokens": st.tokens, "status": status,
                 "optimizer": {} if run.fsdp else run.optimizer.state_dict(),
                 "sharded_optimizer": bool(run.fsdp and with_optim),
                 "scheduler": run.scheduler.state_dict(), "reader": ckpt.to_safe(run.reader.state_dict()),
                 "rng": ckpt.rng_state(), "best_step": st.best_step, "best_val_loss": st.best_val_loss,
                 "bad_evals": st.bad_evals, "unigram": st.unigram, "history": st.history,
                 "config": cfg.model_dump(mode="json")}
        info = {k: v for k, v in _summary(run, st, status).items() if k != "history"}
        from refinery.tasks.train.fsdp import DCP_DIR

        ckpt.save_checkpoint(run.ckpt_dir, st.step, run.raw_model, run.reader.tokenizer_path, saved, info,
                             state_dict=full_sd, extra_dirs={DCP_DIR: staged} if staged else None)
        ckpt.prune(run.ckpt_dir, cfg.keep_last, {st.best_step} if st.best_step is not None else set())
        ckpt.write_index(run.ckpt_dir, st.step, st.best_step)
        if status != "running":
            run.metrics.plot(f"{cfg.objective} {cfg.preset}: {run.n_params / 1e6:.2f}M params",
                             baseline=(st.unigram or {}).get("entropy"))
    dist.barrier()


def _train_step(run: Run, st: TrainState) -> dict:
    """One optimizer step: ``grad_accum`` micro-batches of the global batch (this rank keeps its
    slice; gradients sync on the last one), clip, step, then log the row."""
    import torch

    from refinery.tasks.train import distributed as dist
    from refinery.tasks.train.metrics import mfu
    from refinery.tasks.train.objectives import step_generator

    cfg, model, device, world = run.cfg, run.model, run.device, run.world
    t0 = time.perf_counter()
    lr = run.optimizer.param_groups[0]["lr"]
    loss_sum = torch.zeros((), device=device)
    step_tokens = 0
    for micro in range(cfg.grad_accum):
        windows = torch.from_numpy(run.reader.next_batch(cfg.batch_size * world))
        batch = run.objective.prepare(windows, step_generator(cfg.seed, st.step, micro))
        lo, hi = run.rank * cfg.batch_size, (run.rank + 1) * cfg.batch_size
        batch = {k: v[lo:hi].to(device, non_blocking=True) for k, v in batch.items()}
        step_tokens += run.objective.tokens(batch) * world
        sync = micro == cfg.grad_accum - 1 or world == 1
        if run.fsdp:
            model.set_requires_gradient_sync(sync)
        with (contextlib.nullcontext() if sync or run.fsdp else model.no_sync()):
            with run.autocast():
                loss = run.objective.loss(model, batch) / cfg.grad_accum
            loss.backward()
        loss_sum += loss.detach()
    grad_norm = None
    if cfg.grad_clip > 0:
        from refinery.tasks.train.fsdp import to_float

        grad_norm = to_float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    st.step += 1
    st.tokens += step_tokens
    loss_val = float(dist.mean(loss_sum))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tps = step_tokens / (time.perf_counter() - t0)
    row = run.metrics.train(st.step, tokens=st.tokens, loss=loss_val, lr=lr, grad_norm=grad_norm,
                            tokens_per_sec=tps, mfu=mfu(run.flops_per_token, tps, run.peak_flops, world))
    if run.master and (st.step % cfg.log_every == 0 or st.step == 1):
        extra = f" | mfu {row['mfu'] * 100:.1f}%" if row["mfu"] is not None else ""
        run.log(f"step {st.step} | loss {loss_val:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s{extra}")
    if not math.isfinite(loss_val):
        if run.resumed_from is not None:   # the first step after resume: the checkpoint is the suspect
            from refinery.tasks.train.checkpoint import NonFiniteCheckpointError

            raise NonFiniteCheckpointError.of(run.resumed_from,
                                              [f"the first loss after resume is {loss_val} (step {st.step})"])
        raise FloatingPointError(f"loss is {loss_val} at step {st.step}: lower lr or check the data")
    run.resumed_from = None
    return row


def _loop(run: Run, st: TrainState, stop_after: int | None) -> str:
    """Steps until ``max_steps``, early stopping, SIGTERM (all ranks agree) or ``stop_after``.
    Checkpoints every ``checkpoint_every``, on a new best, and whenever the loop ends; returns the status."""
    from refinery.tasks.train import distributed as dist

    cfg = run.cfg
    status = "done"
    with _Preemption() as preempt:
        run.model.train()
        while st.step < cfg.max_steps:
            _train_step(run, st)
            improved = stop_early = False
            if st.step % cfg.resolved_eval_every() == 0 or st.step == cfg.max_steps:
                improved = _evaluate(run, st)
                stop_early = cfg.early_stopping_patience > 0 and st.bad_evals >= cfg.early_stopping_patience
            preempted = dist.any_true(preempt.flag, run.device)
            stopped = stop_after is not None and st.step >= stop_after
            if stop_early:
                status = "early_stopped"
            elif preempted:
                status = "preempted"
            elif stopped:
                status = "stopped"
            finished = st.step == cfg.max_steps or stop_early
            if finished or preempted or stopped or improved or st.step % cfg.checkpoint_every == 0:
                _save(run, st, status if (finished or preempted or stopped) else "running")
            if stop_early or preempted or stopped:
                if run.master:
                    run.log(f"{status} at step {st.step}")
                break
    return status


def train(cfg: TrainConfig, reader, val_reader, ckpt_dir: str | Path, *, unigram_reader=None,
          stop_after: int | None = None, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Train (or resume) to ``cfg.max_steps`` and return a summary dict (rank 0's view).

    ``ckpt_dir`` holds the checkpoints and, in ``metrics/``, metrics.jsonl, TensorBoard files and
    loss.png; a previous run's checkpoints there are resumed. ``stop_after`` stops (with a
    checkpoint) after that many steps in total, as a SIGTERM would.
    """
    run = _build(cfg, reader, val_reader, Path(ckpt_dir), log)
    if run.fsdp:
        _shard(run)
    st = _resume(run)
    if st.status in ("done", "early_stopped"):
        return _summary(run, st, st.status)   # finished earlier; nothing to do
    _unigram_baseline(run, st, unigram_reader)
    run.metrics = _open_metrics(run, st, progress)
    _wrap_for_training(run)
    if run.master:
        log(f"pretraining {cfg.objective} {cfg.preset}: {run.n_params / 1e6:.2f}M params on {run.world} x "
            f"{run.device}, {cfg.batch_size * run.world * cfg.grad_accum} windows x {cfg.seq_len} tokens per step, "
            f"{cfg.max_steps} steps")
    if st.step == 0:
        # the initial model: the "best" until something beats it, and a resume point
        _evaluate(run, st)
        _save(run, st, "running")
    try:
        status = _loop(run, st, stop_after)
    finally:
        run.metrics.close()
    if run.fsdp:
        _shard_stats(run)
    out = _summary(run, st, status)
    out["seconds"] = time.perf_counter() - run.t_start
    return out


# ----------------------------------------------------------------------------- entry points
def run_local(cfg: TrainConfig, reader_spec: dict, ckpt_dir: str | Path, *, stop_after: int | None = None,
              log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Open the readers of ``reader_spec`` and train in this process (one rank of a DDP run, or the only one)."""
    from refinery.tasks.train.data import open_reader

    kw: dict[str, Any] = dict(val_fraction=cfg.val_fraction, seed=cfg.seed, weights=cfg.weights)
    reader = open_reader(reader_spec, cfg.seq_len, split="train", **kw)
    val_reader = open_reader(reader_spec, cfg.seq_len, split="val", **kw)
    unigram_reader = open_reader(reader_spec, cfg.seq_len, split="train", **kw)
    return train(cfg, reader, val_reader, ckpt_dir, unigram_reader=unigram_reader, stop_after=stop_after,
                 log=log, progress=progress)


def run_training(cfg: TrainConfig, reader_spec: dict, ckpt_dir: str | Path, *, stop_after: int | None = None,
                 log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Train in this process, or with torchrun on ``cfg.devices`` processes when that is more than one."""
    from refinery.tasks.train import distributed as dist

    nproc = dist.world_size_for(cfg.devices, cfg.device)
    # FSDP on a single GPU still goes through torchrun (a process group of one); on CPU it is a no-op
    one_gpu_fsdp = cfg.strategy == "fsdp" and dist.cuda_device(cfg.device)
    if (nproc <= 1 and dist.num_nodes() <= 1 and not one_gpu_fsdp) or dist.env()[1] > 1:
        return run_local(cfg, reader_spec, ckpt_dir, stop_after=stop_after, log=log, progress=progress)
    if cfg.init_from:   # a tokenizer mismatch is one clear error here, not one per worker
        from refinery.tasks.train.data import open_reader
        from refinery.tasks.train.init_from import check_init_from

        probe = open_reader(reader_spec, cfg.seq_len, split="train", val_fraction=cfg.val_fraction, seed=cfg.seed,
                            weights=cfg.weights)
        check_init_from(cfg.init_from, cfg.objective, str(probe.tokenizer_path), int(probe.vocab_size))
    spec = {"config": cfg.model_dump(mode="json"), "reader": reader_spec, "ckpt_dir": str(ckpt_dir),
            "stop_after": stop_after}
    log(f"launching {'FSDP' if cfg.strategy == 'fsdp' else 'DDP'}: torchrun with {nproc} processes")
    return dist.launch(spec, nproc, Path(ckpt_dir))


__all__ = ["train", "evaluate", "run_local", "run_training", "WarmupCosine", "make_optimizer", "TrainState", "Run"]
