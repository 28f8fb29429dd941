"""Peak-memory probe of the memory planner's check (run as a subprocess, so the peak is its own:
``peak_rss_mb`` reads the image's VmHWM, which, unlike ru_maxrss, does not start at the parent's peak).

    python tests/train/plan_probe.py MODEL_DIR METHOD BATCH SEQ [GRAD_CKPT: 1 | 0; default: the method's]

Loads the model as the finetune stage does (refinery.tasks.finetune.methods: dtypes, 4-bit
quantisation, PEFT wrapping, optimizer), runs two optimizer steps on random tokens, and prints
``{"measured_mb": peak RSS - RSS before loading, "estimate_mb": the planner's total}`` as JSON."""
from __future__ import annotations

import gc
import json
import sys


def main(model_dir: str, method: str, batch: int, seq: int, ckpt: bool | None) -> dict:
    import torch

    torch.set_num_threads(1)
    import transformers  # noqa: F401  (imports before the baseline)
    import peft  # noqa: F401

    if method == "qlora":
        import bitsandbytes  # noqa: F401
    from refinery.tasks.finetune import methods as M
    from refinery.tasks.finetune.config import FinetuneConfig
    from refinery.tasks.train.common import peak_rss_mb, rss_mb
    from refinery.tasks.train.plan import plan_finetune

    cfg = FinetuneConfig(model=model_dir, data="unused.jsonl", method=method, batch_size=batch, seq_len=seq,
                         device="cpu", grad_checkpointing=ckpt)   # None: the method's default (on for qlora)
    plan = plan_finetune(cfg)                      # also warms the meta-device path before the baseline
    gc.collect()
    rss0 = rss_mb()
    device = torch.device("cpu")
    compute, weights = M.resolve_dtypes(cfg, device)
    model = M.load_base_model(cfg, model_dir, device, compute, weights)
    model = M.wrap_model(cfg, model, model_dir)
    model.train()   # as the finetune loop: dropout and activation checkpointing are training-mode only
    params = [p for p in model.parameters() if p.requires_grad]
    opt, _ = M.make_optimizer(cfg, params, device, cfg.resolved_lr())
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size if hasattr(model, "config") else 512
    for _ in range(2):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    measured = peak_rss_mb() - rss0
    return {"method": method, "measured_mb": round(measured, 1), "estimate_mb": round(plan.total / 2**20, 1),
            "rows_mb": plan.to_dict()["mib"], "params": plan.params_total, "trainable": plan.params_trainable}


if __name__ == "__main__":
    a = sys.argv[1:]
    print("PROBE " + json.dumps(main(a[0], a[1], int(a[2]), int(a[3]), {"1": True, "0": False}.get(a[4]) if len(a) > 4 else None)))
