"""The pretraining loop, readable top to bottom (after nanoGPT's train.py).

    model from config -> AdamW (decay on matrices only) -> warmup + cosine LR
    resume from the latest checkpoint if there is one (weights, optimizer, scheduler, RNG, data position)
    evaluate at step 0
    for each step: grad_accum micro-batches (bf16 autocast on GPU) -> clip -> step
                   log loss / lr / tokens/s / MFU; evaluate every eval_every; early stopping on
                   validation loss; checkpoint every save_every, on a new best, on SIGTERM, at the end

The same function runs single-process and under DDP (launched by :func:`run_training` through
torchrun): every process reads the *global* micro-batch from an unsharded reader and keeps its own
slice, so a DDP run consumes exactly the data of a single-process run with the same global batch,
and the reader position saved by rank 0 is everyone's position.
"""
from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from pathlib import Path
from typing import Callable

from refinery.tasks.train.config import TrainConfig


class WarmupCosine:
    """LR multiplier: linear warmup to 1, cosine decay to ``min_ratio`` at ``max_steps`` (then flat).

    A class, not a lambda, so the scheduler's state_dict carries it."""

    def __init__(self, warmup: int, max_steps: int, min_ratio: float):
        self.warmup, self.max_steps, self.min_ratio = warmup, max_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if step >= self.max_steps:
            return self.min_ratio
        progress = (step - self.warmup) / max(1, self.max_steps - self.warmup)
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


def pick_device(cfg: TrainConfig, local_rank: int = 0):
    import torch

    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    return torch.device(name)


def make_optimizer(model, cfg: TrainConfig, device):
    """AdamW with weight decay on matrices (embeddings included) and none on norms and biases."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    seen, decay, no_decay = set(), [], []
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             fused=device.type in ("cuda", "cpu"))


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


def train(cfg: TrainConfig, reader, val_reader, ckpt_dir: str | Path, *, unigram_reader=None,
          stop_after: int | None = None, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Train (or resume) to ``cfg.max_steps`` and return a summary dict (rank 0's view).

    ``ckpt_dir`` is where checkpoints, metrics.jsonl, TensorBoard logs and loss.png go; a previous
    run's checkpoints there are resumed. ``stop_after`` stops (with a checkpoint) after that many
    steps in total, as a SIGTERM would.
    """
    import numpy as np
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from refinery.tasks.train import checkpoint as ckpt
    from refinery.tasks.train import distributed as dist
    from refinery.tasks.train.data import unigram_entropy
    from refinery.tasks.train.metrics import MetricsLog, loss_curve_png, mfu, peak_flops
    from refinery.tasks.train.models import build_model, count_params, flops_per_token, padded_vocab
    from refinery.tasks.train.objectives import example_lengths, make_objective, special_ids, step_generator

    t_start = time.perf_counter()
    rank, world, local_rank = dist.env()
    master = rank == 0
    ckpt_dir = Path(ckpt_dir)
    device = pick_device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")

    def autocast():
        if use_bf16:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- model, objective, optimizer (same seed on every rank: identical initial weights)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(reader.tokenizer_path))
    n_vocab = max(int(reader.vocab_size), len(tokenizer))
    model = build_model(cfg.objective, cfg.preset, padded_vocab(n_vocab), cfg.seq_len, special_ids(tokenizer),
                        cfg.model).to(device)
    objective = make_objective(cfg.objective, tokenizer, n_vocab, cfg.seq_len, mlm_probability=cfg.mlm_probability,
                               noise_density=cfg.noise_density, mean_span_length=cfg.mean_span_length)
    if cfg.grad_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):   # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(cfg.warmup_steps, cfg.max_steps,
                                                                          cfg.min_lr_ratio))

    # -- resume
    state: dict = {}
    last = ckpt.latest_checkpoint(ckpt_dir)
    if last is not None:
        ckpt.load_weights(model, last)
        state = ckpt.load_state(last)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        reader.load_state_dict(ckpt.from_safe(state["reader"]))
        ckpt.set_rng_state(state["rng"])
        if master:
            log(f"resumed from {last} (step {state['step']})")
    step = int(state.get("step", 0))
    tokens_seen = int(state.get("tokens", 0))
    best = {"step": state.get("best_step"), "val_loss": state.get("best_val_loss")}
    bad_evals = int(state.get("bad_evals", 0))
    unigram = state.get("unigram")
    history = list(state.get("history", []))
    n_params = count_params(model)
    fpt = flops_per_token(model, *example_lengths(objective, cfg.seq_len))
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

    def summary(status: str) -> dict:
        vals = [r for r in history if r.get("val_loss") is not None]
        losses = [r for r in history if r.get("loss") is not None]
        speeds = [r["tokens_per_sec"] for r in losses[1:]] or [r["tokens_per_sec"] for r in losses]
        mfus = [r["mfu"] for r in losses[1:] if r.get("mfu") is not None]
        return {
            "status": status, "steps": step, "tokens": tokens_seen, "params": n_params,
            "objective": cfg.objective, "preset": cfg.preset,
            "val_loss_start": vals[0]["val_loss"] if vals else None,
            "val_loss_end": vals[-1]["val_loss"] if vals else None,
            "best_step": best["step"], "best_val_loss": best["val_loss"],
            "loss_start": losses[0]["loss"] if losses else None, "loss_end": losses[-1]["loss"] if losses else None,
            "unigram_entropy": (unigram or {}).get("entropy"), "unigram_tokens": (unigram or {}).get("tokens"),
            "tokens_per_sec": float(np.median(speeds)) if speeds else None,
            "mfu": float(np.median(mfus)) if mfus else None,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "world_size": world, "checkpoint_dir": str(ckpt_dir),
            "final_checkpoint": str(ckpt.step_dir(ckpt_dir, step)),
            "best_checkpoint": str(ckpt.step_dir(ckpt_dir, best["step"])) if best["step"] is not None else None,
            "history": history,
        }

    if state.get("status") in ("done", "early_stopped"):
        return summary(state["status"])   # finished earlier; nothing to do

    if unigram is None:
        if master and unigram_reader is not None:
            unigram = unigram_entropy(unigram_reader, cfg.unigram_max_tokens)
        unigram = dist.broadcast_object(unigram)
        if master and unigram:
            log(f"unigram baseline: {unigram['entropy']:.4f} nats/token over {unigram['tokens']:,} training tokens")

    metrics = MetricsLog(ckpt_dir if master else None, history)
    if master:
        metrics.rewrite()   # drop rows a crashed run logged after its last checkpoint

    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    eval_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def run_eval() -> float:
        val = evaluate(eval_model, objective, val_reader, cfg, device, autocast, cfg.batch_size * world) if master else None
        return dist.broadcast_object(val)

    def save(status: str) -> None:
        if master:
            st = {"step": step, "tokens": tokens_seen, "status": status, "optimizer": optimizer.state_dict(),
                  "scheduler": scheduler.state_dict(), "reader": ckpt.to_safe(reader.state_dict()),
                  "rng": ckpt.rng_state(), "best_step": best["step"], "best_val_loss": best["val_loss"],
                  "bad_evals": bad_evals, "unigram": unigram, "history": history,
                  "config": cfg.model_dump(mode="json")}
            info = {k: v for k, v in summary(status).items() if k != "history"}
            ckpt.save_checkpoint(ckpt_dir, step, raw_model, reader.tokenizer_path, st, info)
            keep = {best["step"]} if best["step"] is not None else set()
            ckpt.prune(ckpt_dir, cfg.keep_last, keep)
            ckpt.write_index(ckpt_dir, step, best["step"])
            if status != "running":   # the PNG costs ~0.4 s: drawn when the run ends or stops
                loss_curve_png(history, ckpt_dir / "loss.png", (unigram or {}).get("entropy"),
                               f"{cfg.objective} {cfg.preset}: {n_params / 1e6:.2f}M params")
        dist.barrier()

    def note_eval(val: float) -> bool:
        """Record a validation loss; True when it is a new best."""
        nonlocal bad_evals
        metrics.log({"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))})
        if best["val_loss"] is None or val < best["val_loss"] - cfg.min_delta:
            best.update(step=step, val_loss=val)
            bad_evals = 0
            return True
        bad_evals += 1
        return False

    if master:
        log(f"pretraining {cfg.objective} {cfg.preset}: {n_params / 1e6:.2f}M params on {world} x {device}, "
            f"{cfg.batch_size * world * cfg.grad_accum} windows x {cfg.seq_len} tokens per step, "
            f"{cfg.max_steps} steps")
    if step == 0:
        val = run_eval()
        note_eval(val)
        if master:
            log(f"step 0 | val loss {val:.4f}")
        save("running")   # the initial model: the "best" until something beats it, and a resume point

    status = "done"
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (master and progress), desc="pretrain", unit="step")
    with _Preemption() as preempt:
        model.train()
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            loss_sum = torch.zeros((), device=device)
            step_tokens = 0
            for micro in range(cfg.grad_accum):
                windows = torch.from_numpy(reader.next_batch(cfg.batch_size * world))
                batch = objective.prepare(windows, step_generator(cfg.seed, step, micro))
                lo, hi = rank * cfg.batch_size, (rank + 1) * cfg.batch_size
                batch = {k: v[lo:hi].to(device, non_blocking=True) for k, v in batch.items()}
                step_tokens += objective.tokens(batch) * world
                sync = micro == cfg.grad_accum - 1 or world == 1
                with (contextlib.nullcontext() if sync else model.no_sync()):
                    with autocast():
                        loss = objective.loss(model, batch) / cfg.grad_accum
                    loss.backward()
                loss_sum += loss.detach()
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += step_tokens
            loss_val = float(dist.mean(loss_sum))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            tps = step_tokens / dt
            row = {"step": step, "loss": loss_val, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen,
                   "tokens_per_sec": tps, "mfu": mfu(fpt, tps, peak, world),
                   "time": round(time.perf_counter() - t_start, 6)}
            metrics.log(row)
            bar.update(1)
            if master and (step % cfg.log_every == 0 or step == 1):
                extra = f" | mfu {row['mfu'] * 100:.1f}%" if row["mfu"] is not None else ""
                log(f"step {step} | loss {loss_val:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s{extra}")
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"loss is {loss_val} at step {step}: lower lr or check the data")

            improved = stop_early = False
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                val = run_eval()
                improved = note_eval(val)
                if master:
                    note = "new best" if improved else f"best {best['val_loss']:.4f} at step {best['step']}"
                    log(f"step {step} | val loss {val:.4f} | ppl {math.exp(min(val, 50)):.2f} | {note}")
                stop_early = cfg.patience > 0 and bad_evals >= cfg.patience
            preempted = dist.any_true(preempt.flag, device)
            stopped = stop_after is not None and step >= stop_after
            if stop_early:
                status = "early_stopped"
            elif preempted:
                status = "preempted"
            elif stopped:
                status = "stopped"
            finished = step == cfg.max_steps or stop_early
            if finished or preempted or stopped or improved or step % cfg.checkpoint_every == 0:
                save(status if (finished or preempted or stopped) else "running")
            if stop_early or preempted or stopped:
                if master:
                    log(f"{status} at step {step}")
                break
    bar.close()
    metrics.close()
    out = summary(status)
    out["seconds"] = time.perf_counter() - t_start
    return out


# ----------------------------------------------------------------------------- entry points
def run_local(cfg: TrainConfig, reader_spec: dict, ckpt_dir: str | Path, *, stop_after: int | None = None,
              log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Open the readers of ``reader_spec`` and train in this process (one rank of a DDP run, or the only one)."""
    from refinery.tasks.train.data import open_reader

    kw = dict(val_fraction=cfg.val_fraction, seed=cfg.seed, weights=cfg.weights)
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
    if nproc <= 1 or dist.env()[1] > 1:
        return run_local(cfg, reader_spec, ckpt_dir, stop_after=stop_after, log=log, progress=progress)
    spec = {"config": cfg.model_dump(mode="json"), "reader": reader_spec, "ckpt_dir": str(ckpt_dir),
            "stop_after": stop_after}
    log(f"launching DDP: torchrun with {nproc} processes")
    return dist.launch(spec, nproc, Path(ckpt_dir))


__all__ = ["train", "evaluate", "run_local", "run_training", "WarmupCosine", "make_optimizer", "pick_device"]
