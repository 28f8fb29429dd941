"""Peak-memory probe of the memory planner's check (run as a subprocess, so the peak is its own:
``peak_rss_mb`` reads the image's VmHWM, which, unlike ru_maxrss, does not start at the parent's peak).

    python tests/train/plan_probe.py MODEL_DIR METHOD BATCH SEQ [GRAD_CKPT: 1 | 0; default: the method's]
    python tests/train/plan_probe.py MODEL_DIR dpo-full|dpo-lora PAIRS SEQ

Loads the model as the finetune stage does (refinery.tasks.finetune.methods: dtypes, 4-bit
quantisation, PEFT wrapping; the engine's optimizer), runs two optimizer steps on random tokens, and prints
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
    from refinery.tasks.engine.optim import build_optimizer
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
    opt = build_optimizer(model, cfg, device, lr=cfg.resolved_lr(), kind=M.optimizer_kind(cfg, device))
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


def main_dpo(model_dir: str, lora: bool, pairs: int, seq: int) -> dict:
    """The align side: a DPO policy loaded as the trainer does (refinery.tasks.align.common.load_policy),
    two optimizer steps on ``pairs`` random pairs (2 x pairs sequences of ``seq`` tokens, the reply
    the second half), against :func:`refinery.tasks.train.plan.plan_align`."""
    import os
    import tempfile

    import torch

    torch.set_num_threads(1)
    import transformers  # noqa: F401  (imports before the baseline)
    import peft  # noqa: F401
    from refinery.tasks.align.common import load_policy
    from refinery.tasks.align.dpo import DPOConfig, dpo_loss, reply_logps
    from refinery.tasks.engine.optim import build_optimizer
    from refinery.tasks.align.stage import DPOStageConfig
    from refinery.tasks.train.common import peak_rss_mb, rss_mb
    from refinery.tasks.train.plan import plan_align

    data = os.path.join(tempfile.mkdtemp(), "pairs.jsonl")
    with open(data, "w") as f:
        f.write(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    train = DPOConfig(batch_size=pairs, max_len=seq, max_prompt_len=seq // 2, device="cpu", dtype="float32",
                      lora={"enabled": lora, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    plan = plan_align("dpo", DPOStageConfig(model=model_dir, data=data, train=train))
    gc.collect()
    rss0 = rss_mb()
    tok, model, _, _ = load_policy(model_dir, train, 0)
    optim = build_optimizer(model, train, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        seqs = torch.randint(2, model.config.vocab_size, (2 * pairs, seq), generator=g).tolist()
        lp, _ = reply_logps(model, seqs, [seq // 2] * (2 * pairs), tok.pad_token_id)
        loss, _, _ = dpo_loss(lp[:pairs], lp[pairs:], lp[:pairs].detach(), lp[pairs:].detach(), 0.1)
        loss.mean().backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
    measured = peak_rss_mb() - rss0
    return {"method": f"dpo-{'lora' if lora else 'full'}", "measured_mb": round(measured, 1),
            "estimate_mb": round(plan.total / 2**20, 1), "rows_mb": plan.to_dict()["mib"]}


if __name__ == "__main__":
    a = sys.argv[1:]
    if a[1].startswith("dpo-"):
        print("PROBE " + json.dumps(main_dpo(a[0], a[1] == "dpo-lora", int(a[2]), int(a[3]))))
        sys.exit(0)
    print("PROBE " + json.dumps(main(a[0], a[1], int(a[2]), int(a[3]), {"1": True, "0": False}.get(a[4]) if len(a) > 4 else None)))
