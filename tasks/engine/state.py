"""A run's checkpoints: everything that makes a resumed run continue exactly where it stopped.

A checkpoint is a ``step-XXXXXXXX`` folder written by :mod:`refinery.tasks.train.checkpoint`
(atomic, fsynced, sha256 per file, pruned to ``keep_last`` plus the best):

    model.safetensors   the trainable tensors (adapters, heads, value head; all weights in full
                        training), or a whole Hugging Face folder (``hf_weights``: pretrain)
    dcp/                with FSDP: every rank's shards of the weights and the optimizer
    trainer_state.pt    optimizer, schedule, loss scaler, every process's RNG (torch, CUDA, numpy,
                        python), step, tokens, metric history, early stopping (with the best
                        weights), and each of the method's stateful objects (the data position),
                        loaded weights_only
    trainer_state.json  the same small facts, readable

What a run is rebuilt from instead of copied: the frozen parts (a reference model, a reward model,
the base weights under an adapter) come from the run's inputs, which the stage's fingerprint pins.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Engine = Any   # refinery.tasks.engine.trainer.Engine (which imports this module)


@dataclass
class EngineState:
    """What changes from step to step; all of it is in every checkpoint."""

    step: int = 0
    tokens: int = 0
    history: list[dict] = field(default_factory=list)
    status: str = "running"
    seconds: float = 0.0        # in training steps (validation and checkpoints excluded)


def _trainable_state(engine: Engine, full: dict | None) -> dict:
    """The trainable tensors by name, whole (from the gathered ``full`` state under FSDP)."""
    if full is not None:
        return {k: v for k, v in full.items() if k in engine.trainable}
    return {n: p.detach() for n, p in engine.model.named_parameters() if n in engine.trainable}


def save(engine: Engine, st: EngineState, status: str) -> None:
    """Checkpoint step ``st.step`` (collective: every process calls it; rank 0 writes)."""
    import shutil

    from refinery.tasks.train import checkpoint as ckpt
    from refinery.tasks.train import distributed as dist
    from refinery.tasks.train.fsdp import DCP_DIR

    assert engine.ckpt_dir is not None
    root = engine.ckpt_dir
    rngs = dist.gather_objects(ckpt.rng_state())   # each process's own streams (its dropout, its samples)
    full, staged, with_optim = None, None, False
    if engine.par.sharded:   # the gathered weights for rank 0's file, every rank's shards
        from refinery.tasks.train.fsdp import full_state_dict, save_sharded

        full = full_state_dict(engine.train_model)
        staged = root / f".dcp-step-{st.step:08d}"
        if engine.master:
            shutil.rmtree(staged, ignore_errors=True)
        dist.barrier()
        with ckpt.naming_a_full_disk(ckpt.step_dir(root, st.step), cleanup=staged):
            with_optim = save_sharded(engine.train_model, engine.optimizer, staged)
        dist.barrier()
    if engine.master:
        state = {"step": st.step, "tokens": st.tokens, "status": status, "seconds": st.seconds,
                 "optimizer": {} if engine.par.sharded else engine.optimizer.state_dict(),
                 "sharded_optimizer": bool(engine.par.sharded and with_optim),
                 "scheduler": engine.scheduler.state_dict(),
                 "scaler": engine.scaler.state_dict() if engine.scaler is not None else None,
                 "rng": rngs[0], "rng_ranks": rngs, "stopper": engine.stopper.state_dict(), "history": st.history,
                 "method": {k: ckpt.to_safe(v.state_dict()) for k, v in engine.method.stateful().items()},
                 "config": engine.cfg.model_dump(mode="json")}
        info = {"step": st.step, "status": status, "tokens": st.tokens, "best_step": engine.stopper.best_step,
                "best_value": engine.stopper.best, "early_stopping_metric": engine.stopper.metric,
                **(engine.info(engine) if engine.info is not None else {})}
        extra = {DCP_DIR: staged} if staged else None
        if engine.hf_weights:
            ckpt.save_checkpoint(root, st.step, engine.model, engine.tokenizer_path, state, info, state_dict=full,
                                 extra_dirs=extra)
        else:
            ckpt.save_checkpoint(root, st.step, None, None, state, info,
                                 state_dict=_trainable_state(engine, full), extra_dirs=extra)
        best = engine.stopper.best_step
        ckpt.prune(root, engine.cfg.keep_last, {best} if best is not None else set())
        ckpt.write_index(root, st.step, best)
    dist.barrier()


def _load_trainable(engine: Engine, path) -> None:
    """The trainable tensors of ``model.safetensors`` into the model; every one must be there."""
    from safetensors.torch import load_file

    from refinery.tasks.train.distributed import assign_trainable

    assign_trainable(engine.model, load_file(str(path)), f"{path}: the checkpoint's tensors")


def resume(engine: Engine) -> EngineState:
    """The newest intact checkpoint into the engine and the method, or a fresh state. Rank 0 picks
    (and verifies) it, so ranks neither race to move a damaged one aside nor each hash every file;
    non-finite weights or optimizer state are an error that names the checkpoint."""
    from refinery.tasks.train import checkpoint as ckpt
    from refinery.tasks.train import distributed as dist

    assert engine.ckpt_dir is not None
    last = dist.broadcast_object(ckpt.latest_checkpoint(engine.ckpt_dir) if engine.master else None)
    if last is None:
        return EngineState()
    saved = ckpt.load_state(last)
    if engine.par.sharded:   # every rank reads its own shards of the weights and the optimizer
        from refinery.tasks.train.fsdp import DCP_DIR, load_sharded

        load_sharded(engine.train_model, engine.optimizer, last / DCP_DIR,
                     with_optimizer=bool(saved.get("sharded_optimizer")))
    else:
        if engine.hf_weights:
            ckpt.load_weights(engine.model, last)
        else:
            _load_trainable(engine, last / ckpt.WEIGHTS)
        engine.optimizer.load_state_dict(saved["optimizer"])
    bad = ckpt.nonfinite_tensors(engine.model, engine.optimizer)
    if dist.any_true(bool(bad), engine.device):   # every rank raises, none waits in a collective
        raise ckpt.NonFiniteCheckpointError.of(last, bad or ["another rank's shards"])
    engine.resumed_from = engine.resumed_checkpoint = last
    engine.scheduler.load_state_dict(saved["scheduler"])
    if engine.scaler is not None and saved.get("scaler"):
        engine.scaler.load_state_dict(saved["scaler"])
    for key, obj in engine.method.stateful().items():
        obj.load_state_dict(ckpt.from_safe(saved["method"][key]))
    engine.stopper.load_state_dict(saved["stopper"])
    ranks = saved.get("rng_ranks") or []
    ckpt.set_rng_state(ranks[engine.par.rank] if len(ranks) == engine.par.world else saved["rng"])
    engine.log(f"{engine.method.desc}: resumed from {last} (step {saved['step']})")
    return EngineState(step=int(saved["step"]), tokens=int(saved["tokens"]), history=list(saved["history"]),
                       status=saved.get("status", "running"), seconds=float(saved.get("seconds", 0.0)))


__all__ = ["EngineState", "save", "resume"]
