"""One fine-tuning process of a multi-process run (``finetune --set devices=N``), started by
:func:`refinery.tasks.train.distributed.launch` (through torchrun on several nodes):

    python -m refinery.tasks.finetune.worker launch.json

Every rank rebuilds what the stage built (tokenizer, the same encoded examples from the same seed,
the base model and its adapter or classification head from the same seed) and runs the stage's
own method on the engine (refinery.tasks.engine: ``SFTMethod`` of refinery.tasks.finetune.train, or
``ClassifyMethod`` of refinery.tasks.finetune.classify with ``task: classify``). The engine wraps
the model (DDP, or FSDP2 ``fully_shard`` per block with ``strategy=fsdp``); each rank takes its
share of the global window of micro-batches. Rank 0 writes the checkpoints and metrics (in the
stage's folders, so a rerun resumes), the trained weights (``trained.pt``: the trainable tensors,
gathered) and ``result.json``; the stage loads the weights into its own copy of the model and goes
on (validation, samples, saving).
"""
from __future__ import annotations

import sys


def _sft(cfg, local_rank: int):
    """Data and model exactly as the stage makes them (same seeds, same order)."""
    from refinery.tasks.finetune import methods as M
    from refinery.tasks.finetune import seq2seq as S
    from refinery.tasks.finetune.train import prepare_data
    from refinery.tasks.train.common import pick_device, seed_everything

    seed_everything(cfg.seed)
    source = M.resolve_model_source(cfg.model)
    tok = M.load_tokenizer(cfg, source)
    data = prepare_data(cfg, source, tok, S.model_kind(source))
    device = pick_device(cfg.device, local_rank)
    compute, weights = M.resolve_dtypes(cfg, device)
    model = M.load_base_model(cfg, source, device, compute, weights)
    seed_everything(cfg.seed)
    model = M.wrap_model(cfg, model, source)
    seed_everything(cfg.seed)
    return model, data, device, compute


def _train(spec: dict, rank: int):
    from refinery.tasks.engine.trainer import INTERRUPTED
    from refinery.tasks.finetune.config import FinetuneConfig
    from refinery.tasks.train import distributed as dist

    cfg = FinetuneConfig.model_validate(spec["config"])
    _, world, local = dist.env()
    log = (lambda m: print(m, flush=True)) if rank == 0 else (lambda m: None)
    title = f"finetune {cfg.method} ({cfg.strategy} x {world})"
    if spec.get("task") == "classify":
        from refinery.tasks.finetune import classify as C

        engine, result, run = C.train_worker(cfg, local, spec["ckpt_dir"], spec["metrics_dir"], log, title)
    else:
        from refinery.tasks.finetune.train import run_summary, train_sft

        model, data, device, compute = _sft(cfg, local)
        engine, result = train_sft(cfg, model, data.train_items, data.val_batches, data.pad_id, device, compute,
                                   seq_len=data.seq_len, ckpt_dir=spec.get("ckpt_dir"),
                                   metrics_dir=spec["metrics_dir"], log=log, title=title)
        run = run_summary(cfg, engine, result)
    # every rank agrees on the status; an interrupted run's weights stay in its checkpoint
    state = None if run["status"] in INTERRUPTED else dist.gather_trainable(engine.train_model, engine.trainable)
    return {**run, "world_size": world, "strategy": cfg.strategy}, state


def main(argv: list[str] | None = None) -> int:
    from refinery.tasks.train.distributed import worker_main

    return worker_main(argv, "refinery.tasks.finetune.worker", _train)


if __name__ == "__main__":
    sys.exit(main())
