"""How the finetune stage trains on several processes (``devices`` > 1): it launches
:mod:`refinery.tasks.finetune.worker` on every rank and takes the trained weights back. Its own
module so that the stage and classification share it without importing each other."""
from __future__ import annotations

from refinery.tasks.finetune.config import FinetuneConfig


def train_on_processes(cfg: FinetuneConfig, model, ckpt_dir, metrics_dir, log, task: str = "sft") -> dict:
    """Train on ``cfg.devices`` processes (refinery.tasks.finetune.worker: the same method on the
    engine, DDP or FSDP; ``task`` sft or classify), then load the trained weights they gathered
    into ``model``. A run they stopped early (SIGTERM) raises: its checkpoint is kept and the same
    command resumes it."""
    from refinery.tasks.engine.trainer import INTERRUPTED, TrainingInterrupted
    from refinery.tasks.train.distributed import launch, load_trainable

    nproc = cfg.processes()
    log(f"finetune[{cfg.method}]: launching {cfg.strategy if cfg.strategy != 'auto' else 'ddp'} on "
        f"{nproc} processes")
    spec = {"config": cfg.model_dump(mode="json"), "metrics_dir": str(metrics_dir), "task": task,
            "ckpt_dir": str(ckpt_dir)}
    run = launch(spec, nproc, ckpt_dir, module="refinery.tasks.finetune.worker")
    if run.get("status") in INTERRUPTED:
        raise TrainingInterrupted(f"training stopped at step {run['steps']} ({run['status']}); checkpoint kept in "
                                  f"{ckpt_dir}: run the same command again to resume")
    load_trainable(model, ckpt_dir / "trained.pt")
    return run


__all__ = ["train_on_processes"]
