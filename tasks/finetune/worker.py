"""One fine-tuning process of a multi-process run (``finetune --set devices=N``), started by
:func:`refinery.tasks.train.distributed.launch` (through torchrun on several nodes):

    python -m refinery.tasks.finetune.worker launch.json

Every rank rebuilds what the stage built (tokenizer, the same encoded examples from the same seed,
the base model and its adapter from the same seed), wraps the model (DDP, or FSDP2 ``fully_shard``
per block with ``strategy=fsdp``), and runs the stage's own loop (refinery.tasks.finetune.train),
each rank taking its share of the global window of micro-batches. Rank 0 writes the metrics, the
trained weights (``trained.pt``: the trainable tensors, gathered) and ``result.json``; the stage
loads the weights into its own copy of the model and goes on (validation, samples, saving).
"""
from __future__ import annotations

import sys
from pathlib import Path


def _prepare(cfg, local_rank: int):
    """Data and model exactly as the stage makes them (same seeds, same order)."""
    from refinery.tasks.finetune import data as D
    from refinery.tasks.finetune import methods as M
    from refinery.tasks.train.common import pick_device, seed_everything

    seed_everything(cfg.seed)
    source = M.resolve_model_source(cfg.model)
    tok = M.load_tokenizer(cfg, source)
    D.ensure_chat_template(tok)
    seq_len = M.effective_seq_len(cfg, source)
    examples, report = D.read_examples(cfg.data, cfg.data_format, cfg.max_records)
    train_ex, val_ex = D.split_examples(examples, cfg.val_fraction, cfg.seed, cfg.max_val_examples)
    train_items, _ = D.encode_all(tok, train_ex, seq_len, report)
    val_items, _ = D.encode_all(tok, val_ex, seq_len, report)
    pad_id = tok.pad_token_id
    val_batches = D.make_batches(val_items, cfg.batch_size, pad_id, packing=False, seq_len=seq_len)
    device = pick_device(cfg.device, local_rank)
    compute, weights = M.resolve_dtypes(cfg, device)
    model = M.load_base_model(cfg, source, device, compute, weights)
    seed_everything(cfg.seed)
    model = M.wrap_model(cfg, model, source)
    seed_everything(cfg.seed)
    return model, train_items, val_batches, pad_id, device, compute, seq_len


def _train(spec: dict, rank: int):
    from refinery.tasks.finetune.config import FinetuneConfig
    from refinery.tasks.finetune.train import train_loop
    from refinery.tasks.train import distributed as dist
    from refinery.tasks.train.metrics import MetricsLog

    cfg = FinetuneConfig.model_validate(spec["config"])
    _, world, local = dist.env()
    model, train_items, val_batches, pad_id, device, compute, seq_len = _prepare(cfg, local)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model = dist.wrap(model, cfg.strategy, device, compute, cfg.fsdp_cpu_offload)
    metrics = MetricsLog(Path(spec["metrics_dir"]) if rank == 0 else None, total_steps=cfg.max_steps,
                         desc=f"finetune[{cfg.method}]", bar=False, fresh=True)
    log = (lambda m: print(m, flush=True)) if rank == 0 else (lambda m: None)
    try:
        run = train_loop(cfg, model, train_items, val_batches, pad_id, device, compute, log, seq_len,
                         metrics=metrics)
    finally:
        metrics.close()
    state = dist.gather_trainable(model, trainable)   # collective under FSDP
    if rank == 0:
        metrics.plot(f"finetune {cfg.method} ({cfg.strategy} x {world})")
    return {**run, "world_size": world, "strategy": cfg.strategy}, state


def main(argv: list[str] | None = None) -> int:
    from refinery.tasks.train.distributed import worker_main

    return worker_main(argv, "refinery.tasks.finetune.worker", _train)


if __name__ == "__main__":
    sys.exit(main())
