"""Pretraining (CLM, MLM, span) on the engine (refinery.tasks.engine): this module gives the loss of
one micro-batch and the validation loss; the engine owns the loop, schedule, accumulation, clipping,
early stopping, metrics, checkpoints, resume, SIGTERM and the DDP/FSDP wrap.

    _build          device, tokenizer, model (fresh or ``init_from``), objective: a :class:`Pretrain`
    Pretrain        micro_step: the global micro-batch from the unsharded reader, this rank's slice,
                    the objective's loss; validate: the mean validation loss per target token
    train           the engine with pretraining's checkpoints (whole Hugging Face folders, exportable
                    as they are; one on every new best and at the end), then the run's summary

Every process reads the *global* micro-batch from an unsharded reader and keeps its own slice, so a
DDP run consumes exactly the data of a single-process run with the same global batch, and the
reader position saved by rank 0 is everyone's position.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

from refinery.tasks.engine.trainer import Method, Micro
from refinery.tasks.train.config import TrainConfig


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


class Unigram:
    """The entropy of the training tokens' unigram distribution: the loss a model that ignores
    context would reach, the line a pretrained model must get below. Computed once, kept in checkpoints."""

    def __init__(self):
        self.value: dict | None = None

    def state_dict(self) -> dict:
        return {"unigram": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["unigram"]


class Pretrain(Method):
    """Pretraining's micro-batch loss and validation, for the engine."""

    desc = "pretrain"

    def __init__(self, cfg: TrainConfig, model, objective, tokenizer, reader, val_reader, device, dtype,
                 unigram_reader=None):
        from refinery.tasks.train import distributed as dist
        from refinery.tasks.train.models import count_params, flops_per_token
        from refinery.tasks.train.objectives import example_lengths

        self.cfg, self.model, self.objective, self.tokenizer = cfg, model, objective, tokenizer
        self.reader, self.val_reader, self.device, self.dtype = reader, val_reader, device, dtype
        self.unigram_reader, self.unigram = unigram_reader, Unigram()
        self.rank, self.world, _ = dist.env()
        self.n_params = count_params(model)
        self.flops_per_token = flops_per_token(model, *example_lengths(objective, cfg.seq_len))

    def setup(self) -> None:
        if self.cfg.compile:   # what trains is compiled; what is saved and evaluated is the model itself
            import torch

            self.engine.train_model = torch.compile(self.engine.train_model)

    def stateful(self) -> dict:
        return {"reader": self.reader, "unigram": self.unigram}

    def micro_step(self, micro: int) -> Micro:
        import torch

        from refinery.tasks.train.objectives import step_generator

        cfg = self.cfg
        windows = torch.from_numpy(self.reader.next_batch(cfg.batch_size * self.world))
        batch = self.objective.prepare(windows, step_generator(cfg.seed, self.engine.state.step, micro))
        lo, hi = self.rank * cfg.batch_size, (self.rank + 1) * cfg.batch_size
        batch = {k: v[lo:hi].to(self.device, non_blocking=True) for k, v in batch.items()}
        loss = self.objective.loss(self.engine.train_model, batch)
        return Micro(loss, {"tokens": self.objective.tokens(batch)})

    def validate(self) -> dict | None:
        """Rank 0 evaluates (the engine hands its figures to every rank); a sharded model's forward
        needs every rank (all see the same batches)."""
        if self.rank != 0 and not self.engine.par.sharded:
            return None
        val = evaluate(self.model, self.objective, self.val_reader, self.cfg, self.device, self.engine.autocast,
                       self.cfg.batch_size * self.world)
        return {"loss": val, "ppl": math.exp(min(val, 50.0))}

    def started(self) -> None:
        """The unigram baseline, unless the checkpoint resumed from has it."""
        from refinery.tasks.train import distributed as dist
        from refinery.tasks.train.data import unigram_entropy

        if self.unigram.value is not None:
            return
        if self.rank == 0 and self.unigram_reader is not None:
            self.unigram.value = unigram_entropy(self.unigram_reader, self.cfg.unigram_max_tokens)
        self.unigram.value = dist.broadcast_object(self.unigram.value)
        if self.rank == 0 and self.unigram.value:
            u = self.unigram.value
            print(f"unigram baseline: {u['entropy']:.4f} nats/token over {u['tokens']:,} training tokens")

    def baseline(self) -> float | None:
        return (self.unigram.value or {}).get("entropy")


def _build(cfg: TrainConfig, reader, val_reader, unigram_reader, log: Callable[[str], None]) -> Pretrain:
    """Device, then model and objective, in this order: the seed is set first and the same on every
    rank, so every rank starts from identical weights."""
    import torch
    from transformers import AutoTokenizer

    from refinery.tasks.train import distributed as dist
    from refinery.tasks.train.common import compute_dtype, pick_device, seed_everything
    from refinery.tasks.train.objectives import make_objective

    rank, _, local_rank = dist.env()
    device = pick_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
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
    return Pretrain(cfg, model, objective, tokenizer, reader, val_reader, device, compute_dtype(cfg.dtype, device),
                    unigram_reader)


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


def _shard_stats(engine) -> list[dict]:
    """fsdp: every rank's held elements (parameters, optimizer state), gathered on every rank."""
    import torch.distributed as tdist

    from refinery.tasks.train.fsdp import shard_stats

    mine = shard_stats(engine.train_model, engine.optimizer)
    everyone: list = [None] * engine.par.world
    tdist.all_gather_object(everyone, mine)
    return everyone


def _summary(engine, method: Pretrain, memory, status: str, shards=None) -> dict:
    """The run's figures (rank 0's view): what the stage's manifest and the checkpoints' info hold.
    Speeds are medians over the steps after the first (which pays for warm-up and compilation)."""
    import numpy as np
    import torch

    from refinery.tasks.train import checkpoint as ckpt

    st, stopper, cfg, device = engine.state, engine.stopper, method.cfg, method.device
    vals = [r for r in st.history if r.get("val_loss") is not None]
    losses = [r for r in st.history if r.get("loss") is not None]
    speeds = [r["tokens_per_sec"] for r in losses[1:] if r.get("tokens_per_sec")] or \
        [r["tokens_per_sec"] for r in losses if r.get("tokens_per_sec")]
    mfus = [r["mfu"] for r in losses[1:] if r.get("mfu") is not None]
    unigram = method.unigram.value or {}
    world = engine.par.world
    return {
        "status": status, "steps": st.step, "tokens": st.tokens, "params": method.n_params,
        "objective": cfg.objective, "preset": cfg.preset, "init_from": cfg.init_from,
        "val_loss_start": vals[0]["val_loss"] if vals else None,
        "val_loss_end": vals[-1]["val_loss"] if vals else None,
        "best_step": stopper.best_step, "best_val_loss": stopper.best,
        "loss_start": losses[0]["loss"] if losses else None, "loss_end": losses[-1]["loss"] if losses else None,
        "unigram_entropy": unigram.get("entropy"), "unigram_tokens": unigram.get("tokens"),
        "tokens_per_sec": float(np.median(speeds)) if speeds else None,
        "mfu": float(np.median(mfus)) if mfus else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "world_size": world, "strategy": "fsdp" if engine.par.sharded else ("ddp" if world > 1 else "single"),
        "shards": shards, "checkpoint_dir": str(engine.ckpt_dir),
        **memory.stats(),
        "final_checkpoint": str(ckpt.step_dir(engine.ckpt_dir, st.step)),
        "best_checkpoint": str(ckpt.step_dir(engine.ckpt_dir, stopper.best_step)) if stopper.best_step is not None else None,
        "history": st.history,
    }


def train(cfg: TrainConfig, reader, val_reader, ckpt_dir: str | Path, *, unigram_reader=None,
          stop_after: int | None = None, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Train (or resume) to ``cfg.max_steps`` and return a summary dict (rank 0's view).

    ``ckpt_dir`` holds the checkpoints and, in ``metrics/``, metrics.jsonl, TensorBoard files and
    loss.png; a previous run's checkpoints there are resumed. ``stop_after`` stops (with a
    checkpoint) after that many steps in total, as a SIGTERM would.
    """
    import torch

    from refinery.tasks.engine.optim import build_optimizer
    from refinery.tasks.engine.trainer import Engine
    from refinery.tasks.train.common import PeakMemory

    t_start = time.perf_counter()
    method = _build(cfg, reader, val_reader, unigram_reader, log)
    memory = PeakMemory(method.device).start()
    opt_device = torch.device("cpu") if cfg.fsdp_cpu_offload else method.device
    engine = Engine(method, cfg, total=cfg.max_steps, device=method.device, dtype=method.dtype, ckpt_dir=ckpt_dir,
                    log=log, progress=progress, stop_after=stop_after, hf_weights=True,
                    tokenizer_path=str(reader.tokenizer_path), keep_best=False, save_on_best=True, save_final=True,
                    optimizer=lambda m: build_optimizer(m, cfg, opt_device, betas=(cfg.beta1, cfg.beta2)),
                    compute_dtype_fsdp=method.dtype, log_every=cfg.log_every,
                    title=f"{cfg.objective} {cfg.preset}: {method.n_params / 1e6:.2f}M params",
                    baseline=method.baseline,
                    info=lambda eng: {k: v for k, v in _summary(eng, method, memory, "running").items()
                                      if k not in ("history", "status")})
    engine.t_start = t_start
    if engine.master:
        log(f"pretraining {cfg.objective} {cfg.preset}: {method.n_params / 1e6:.2f}M params on {engine.par.world} x "
            f"{method.device}, {cfg.batch_size * engine.par.world * cfg.grad_accum} windows x {cfg.seq_len} tokens "
            f"per step, {cfg.max_steps} steps")
    result = engine.fit()
    shards = _shard_stats(engine) if engine.par.sharded else None
    out = _summary(engine, method, memory, result.status, shards)
    out["seconds"] = time.perf_counter() - t_start
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


__all__ = ["train", "evaluate", "run_local", "run_training", "Pretrain"]
