"""The ``pretrain`` stage: token datasets in, a Hugging Face model folder out.

Output dataset (``<workdir>/pretrain/<fingerprint>/``)::

    config.json, generation_config.json, model.safetensors, tokenizer files   (from_pretrained loads it)
    metrics/metrics.jsonl, metrics/loss.png, metrics/tensorboard/              (the run's curves; see
                                                                               refinery.tasks.train.metrics)

Manifest: ``model: "."`` (the model folder, as every training dataset names it: see
refinery.tasks.modelref); counts ``steps``, ``tokens``, ``params``; extra keys ``val_loss_start``, ``val_loss_end``,
``best_step``, ``best_val_loss``, ``unigram_entropy`` (the baseline), ``training`` (status, device,
tokens/sec, MFU, checkpoint folder).

Checkpoints for resume live outside the dataset, in ``<workdir>/checkpoints/<fingerprint>/`` (a
stable place derived from the fingerprint), so a run that crashed or was preempted resumes when the
same stage is run again. Heavy libraries are imported lazily (the CLI imports this module).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from refinery.tasks.engine.trainer import TrainingInterrupted
from refinery.tasks.export import finalize_model_dir
from refinery.tasks.export.card import with_model_cards
from refinery.tasks.runtime import StageOutput, stage
from refinery.tasks.train.multinode import MultiNodeStage
from refinery.tasks.store import Builder, Dataset
from refinery.tasks.train.config import TrainConfig

_HF_SKIP = {"trainer_state.pt", "trainer_state.json"}


def checkpoint_dir(b: Builder) -> Path:
    """``<workdir>/checkpoints/<fingerprint>`` for local stores; a local cache folder for remote ones."""
    if b.store.local:
        return Path(b.store.root) / "checkpoints" / b.fingerprint
    cache = Path(os.environ.get("REFINERY_CACHE", Path.home() / ".cache" / "refinery"))
    return cache / "checkpoints" / b.fingerprint


def export_folder(ckpt: str | Path, dest: str | Path, log_dir: str | Path | None = None) -> Path:
    """Copy a checkpoint's Hugging Face files (not its training state) to ``dest``, and the run's
    metrics folder ``log_dir`` (metrics.jsonl, loss.png, tensorboard/) to ``dest/metrics``."""
    from refinery.tasks.train.metrics import METRICS_DIR

    ckpt, dest = Path(ckpt), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(ckpt.iterdir()):
        if f.is_file() and f.name not in _HF_SKIP:
            shutil.copyfile(f, dest / f.name)
    if log_dir is not None and Path(log_dir).is_dir():
        shutil.copytree(log_dir, dest / METRICS_DIR, dirs_exist_ok=True)
    return dest


@stage("pretrain", version="1", kind=MultiNodeStage)
@with_model_cards   # README.md: the model card (refinery.tasks.export.card), listed in the manifest
def pretrain(b: Builder, inputs: list[Dataset], cfg: TrainConfig) -> StageOutput:
    """Pretrain a model from config on the input token datasets (mixed by ``cfg.weights``)."""
    from refinery.tasks.train.loop import run_training

    if not inputs:
        raise ValueError("pretrain needs at least one token dataset as input")
    datasets = [ds.local_path() for ds in inputs]
    ckpt_dir = checkpoint_dir(b)
    from refinery.tasks.train.plan import plan_or_note, plan_pretrain

    # the memory estimate per device, printed and kept; a run that cannot fit stops here
    memory_plan = plan_or_note(lambda: plan_pretrain(cfg, datasets), log=lambda m: print(m, file=sys.stderr))
    result = run_training(cfg, {"kind": "tokens", "datasets": datasets}, ckpt_dir)
    if result["status"] in ("preempted", "stopped"):
        raise TrainingInterrupted(f"pretraining stopped at step {result['steps']} ({result['status']}); "
                                  f"checkpoint kept in {ckpt_dir}: run again to resume")
    chosen = result["best_checkpoint"] if cfg.export == "best" and result["best_checkpoint"] else result["final_checkpoint"]
    from refinery.tasks.train.checkpoint import checkpoint_problems

    damaged = checkpoint_problems(chosen, checksums=True)   # resume verified only the newest one
    if damaged:
        raise ValueError(f"checkpoint {chosen} to export is damaged: {'; '.join(damaged)}; "
                         "set export=final, or move it aside and train again")
    folder = export_folder(chosen, Path(b.tmpdir()) / "model", ckpt_dir / "metrics")
    finalize_model_dir(folder)   # use_cache: true + generation_config.json (training saved use_cache: false)
    b.put_dir(folder)
    training = {k: result.get(k) for k in ("status", "objective", "preset", "init_from", "strategy", "shards", "device", "world_size", "tokens_per_sec",
                                       "mfu", "loss_start", "loss_end", "unigram_tokens", "checkpoint_dir",
                                       "peak_memory_mb", "peak_memory_kind")}
    training["exported_step"] = int(Path(chosen).name.split("-")[-1])
    return StageOutput(
        counts={"steps": result["steps"], "tokens": result["tokens"], "params": result["params"]},
        stats={"train_seconds": round(result.get("seconds", 0.0), 3)},
        extra={"model": ".", "val_loss_start": result["val_loss_start"], "val_loss_end": result["val_loss_end"],
               "best_step": result["best_step"], "best_val_loss": result["best_val_loss"],
               "unigram_entropy": result["unigram_entropy"], "training": training, "memory_plan": memory_plan},
    )


__all__ = ["pretrain", "checkpoint_dir", "export_folder", "TrainingInterrupted"]
