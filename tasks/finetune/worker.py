"""One fine-tuning process of a multi-process run (``finetune --set devices=N``), started by torchrun
through :func:`refinery.tasks.train.distributed.launch`:

    python -m torch.distributed.run --standalone --nproc_per_node=N -m refinery.tasks.finetune.worker launch.json

Every rank rebuilds what the stage built (tokenizer, the same encoded examples from the same seed,
the base model and its adapter from the same seed), wraps the model (DDP, or FSDP2 ``fully_shard``
per block with ``strategy=fsdp``), and runs the stage's own loop (refinery.tasks.finetune.train),
each rank taking its share of the global window of micro-batches. Rank 0 writes the metrics, the
trained weights (``trained.pt``: the trainable tensors, gathered) and ``result.json``; the stage
loads the weights into its own copy of the model and goes on (validation, samples, saving).
"""
from __future__ import annotations

import json
import os
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


def _wrap(cfg, model, device, compute):
    if cfg.strategy == "fsdp":
        from refinery.tasks.train.fsdp import shard_model

        return shard_model(model, compute, cfg.fsdp_cpu_offload)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _trained_state(cfg, model, trainable: set[str]) -> dict:
    """The trainable tensors, whole, on rank 0 (collective under FSDP)."""
    if cfg.strategy == "fsdp":
        from refinery.tasks.train.fsdp import full_state_dict

        sd = full_state_dict(model)
    else:
        sd = model.module.state_dict()
    return {k: v.detach().cpu() for k, v in sd.items() if k in trainable}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())

    import torch

    from refinery.tasks.finetune.config import FinetuneConfig
    from refinery.tasks.finetune.train import train_loop
    from refinery.tasks.train import distributed as dist
    from refinery.tasks.train.metrics import MetricsLog

    cfg = FinetuneConfig.model_validate(spec["config"])
    dist.init()
    rank, world, local = dist.env()
    try:
        model, train_items, val_batches, pad_id, device, compute, seq_len = _prepare(cfg, local)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        model = _wrap(cfg, model, device, compute)
        metrics = MetricsLog(Path(spec["metrics_dir"]) if rank == 0 else None, total_steps=cfg.max_steps,
                             desc=f"finetune[{cfg.method}]", bar=False, fresh=True)
        log = (lambda m: print(m, flush=True)) if rank == 0 else (lambda m: None)
        try:
            run = train_loop(cfg, model, train_items, val_batches, pad_id, device, compute, log, seq_len,
                             metrics=metrics)
        finally:
            metrics.close()
        state = _trained_state(cfg, model, trainable)
        if rank == 0:
            metrics.plot(f"finetune {cfg.method} ({cfg.strategy} x {world})")
            torch.save(state, spec_path.parent / "trained.pt")
            run["world_size"], run["strategy"] = world, cfg.strategy
            tmp = spec_path.parent / f".result.{os.getpid()}.json"
            tmp.write_text(json.dumps(run, default=str))
            os.replace(tmp, spec_path.parent / "result.json")
        dist.barrier()
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
