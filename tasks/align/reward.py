"""Reward model: a scalar head on the SFT model's backbone, trained on preference pairs.

``AutoModelForSequenceClassification.from_pretrained(sft_dir, num_labels=1)`` puts a linear
``score`` head on the backbone; the score of a sequence is read at its last real token. Training
minimises the pairwise (Bradley-Terry) loss ``-log sigmoid(r_chosen - r_rejected)``, optionally
with a small penalty ``center_coef * (r_c + r_r)^2`` that keeps rewards centred on zero (so PPO
sees rewards of a sane scale). Held-out pairwise accuracy (``r_c > r_r``) is measured before
training, every ``eval_every`` steps (the early-stopping metric) and after.

The practice of :mod:`refinery.tasks.align.practice`: the backbone at ``lr`` (pretrained weights:
1e-5 to 5e-5) and the new ``score`` head at ``head_lr`` (about 1e-4), gradient accumulation,
warm-up + cosine schedule, clipping, early stopping with the best weights restored.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Sequence

from pydantic import Field

from refinery.tasks.align.common import (OfflineParams, LoraSettings, TrainResult, apply_lora, count_params, encode_reply, load_tokenizer,
                                model_device, pad, pick_device, seed_everything, step_metrics, torch_dtype)
from refinery.tasks.align.data import PreferencePair, render_prompt, render_reply
from refinery.tasks.engine.parallel import Parallel
from refinery.tasks.align.practice import EarlyStopping, make_optimisation, micro_batches, run_loop, total_steps


class RewardConfig(OfflineParams):
    """Reward-model training settings (the shared training knobs plus the reward model's own).
    Defaults follow practice for a pretrained backbone: ``lr`` 2e-5 for its weights, ``head_lr``
    1e-4 for the freshly initialised score head; early stopping watches held-out pair accuracy."""

    field_defaults = dict(max_steps=0, lr=2e-5, head_lr=1e-4, batch_size=16, dtype="float32", eval_batch_size=32)

    center_coef: float = Field(0.01, ge=0, description="Weight of the (r_c + r_r)^2 centring penalty.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapters for the reward model (lora.enabled).")


def load_reward_model(model_dir: str, lora: LoraSettings | None = None, dtype: str = "float32"):
    """The sequence-classification model (1 label, pad token set) and its tokenizer."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    tok = load_tokenizer(model_dir)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch_dtype(dtype))
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tok.pad_token_id
    if lora is not None and lora.enabled:
        model = apply_lora(model, lora, "SEQ_CLS")  # PEFT keeps the score head trainable for SEQ_CLS
    return model, tok


def encode_texts(tokenizer, prompts: Sequence[str], replies: Sequence[str], max_prompt_len: int, max_len: int):
    seqs = []
    for p, r in zip(prompts, replies):
        pi, ri = encode_reply(tokenizer, p, r, max_prompt_len, max_len)
        seqs.append(pi + ri)
    return pad(seqs, tokenizer.pad_token_id, "right")


def score_texts(model, tokenizer, prompts: Sequence[str], replies: Sequence[str], max_prompt_len: int,
                max_len: int, batch_size: int = 32):
    """Rewards (a float tensor) of rendered prompt texts and reply texts, no gradients."""
    import torch

    out = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            ids, mask = encode_texts(tokenizer, prompts[i:i + batch_size], replies[i:i + batch_size],
                                     max_prompt_len, max_len)
            dev = model_device(model)
            out.append(model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits[:, 0].float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def _pair_texts(tokenizer, pairs: Sequence[PreferencePair]):
    prompts = [render_prompt(p.prompt, tokenizer) for p in pairs]
    chosen = [render_reply(p.chosen, tokenizer) for p in pairs]
    rejected = [render_reply(p.rejected, tokenizer) for p in pairs]
    return prompts, chosen, rejected


def evaluate_pairs(model, tokenizer, pairs: Sequence[PreferencePair], cfg: RewardConfig) -> dict:
    """Pairwise accuracy (r_c > r_r, ties count half), mean margin and mean reward on pairs."""
    if not pairs:
        return {"pairs": 0}
    prompts, chosen, rejected = _pair_texts(tokenizer, pairs)
    rc = score_texts(model, tokenizer, prompts, chosen, cfg.max_prompt_len, cfg.max_len, cfg.eval_batch_size)
    rr = score_texts(model, tokenizer, prompts, rejected, cfg.max_prompt_len, cfg.max_len, cfg.eval_batch_size)
    margin = rc - rr
    acc = ((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item()
    return {"pairs": len(pairs), "accuracy": round(acc, 6), "margin": round(margin.mean().item(), 6),
            "reward_chosen": round(rc.mean().item(), 6), "reward_rejected": round(rr.mean().item(), 6)}


def train_reward_model(model_dir: str, train: Sequence[PreferencePair], held_out: Sequence[PreferencePair],
                       cfg: RewardConfig, seed: int = 0, on_step: Callable[[dict], None] | None = None,
                       progress: bool = False, log_dir: str | os.PathLike | None = None) -> TrainResult:
    """Train a reward model from ``model_dir`` on ``train`` pairs; evaluate on ``held_out``.
    Per-step metrics go to ``log_dir`` (refinery.tasks.train.metrics; in memory only when None)."""
    import torch
    import torch.nn.functional as F

    from refinery.tasks.train.common import PeakMemory

    if not train:
        raise ValueError("reward model: no training pairs")
    seed_everything(seed)
    model, tok = load_reward_model(model_dir, cfg.lora, cfg.dtype)
    dev = pick_device(cfg.device)
    mem = PeakMemory(dev).start()
    model.to(dev)
    par = Parallel.setup(model, cfg, dev)   # several processes: DDP or FSDP (par.train); else the model
    before = evaluate_pairs(par.train, tok, held_out, cfg)

    # Tokenize once.
    prompts, chosen, rejected = _pair_texts(tok, train)
    enc_c = [sum(encode_reply(tok, p, c, cfg.max_prompt_len, cfg.max_len), []) for p, c in zip(prompts, chosen)]
    enc_r = [sum(encode_reply(tok, p, r, cfg.max_prompt_len, cfg.max_len), []) for p, r in zip(prompts, rejected)]

    total = total_steps(len(train), cfg, cfg.epochs)
    optim = make_optimisation(model, cfg, total, parallel=par)
    batches = micro_batches(len(train), cfg.batch_size, torch.Generator().manual_seed(seed))
    steps = step_metrics(log_dir, cfg, total, "reward", progress, on_step)
    history = steps.history
    stopper = EarlyStopping("accuracy", "max", cfg.early_stopping_patience, cfg.early_stopping_min_delta)
    if held_out:   # held-out pairwise accuracy and margin as validation rows, before, during and after
        steps.val(0, tokens=0, accuracy=before["accuracy"], margin=before["margin"])
        stopper.update(before["accuracy"], 0, model)

    def micro_step() -> dict:
        share = par.share(next(batches))   # this process's pairs of the micro-batch (all of them in one)
        idx = share.idx
        ids, mask = pad([enc_c[j] for j in idx] + [enc_r[j] for j in idx], tok.pad_token_id, "right")
        r = par.train(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits[:, 0].float()
        rc, rr = r[: len(idx)], r[len(idx):]
        per_pair = -F.logsigmoid(rc - rr)
        if cfg.center_coef:
            per_pair = per_pair + cfg.center_coef * (rc + rr) ** 2
        loss = share.mean(per_pair)
        optim.backward(loss)
        lengths = mask.sum(1).tolist()
        return {"tokens": share.count(lengths[: len(idx)]) + share.count(lengths[len(idx):]), "loss": loss.item(),
                "accuracy": share.mean((rc > rr).float()).item()}

    def validate() -> dict:
        m = evaluate_pairs(par.train, tok, held_out, cfg)
        return {"accuracy": m["accuracy"], "margin": m["margin"]}

    t0 = time.perf_counter()
    model.train()
    done = run_loop(model, cfg, total, optim, micro_step, steps, validate if held_out else None, stopper)
    train_seconds = time.perf_counter() - t0
    step, tokens = done.steps, done.tokens
    after = evaluate_pairs(par.train, tok, held_out, cfg)
    steps.close()
    steps.plot("reward model", panels=("loss", "accuracy"))
    stats = {"steps": step, "train_pairs": len(train), "held_out_pairs": len(held_out),
             "held_out_before": before, "held_out_after": after,
             "final_loss": next((r["loss"] for r in reversed(history) if r["split"] == "train"), None),
             "train_seconds": round(train_seconds, 3), "train_tokens": tokens, "total_steps": total,
             "restored_step": done.restored_step, **stopper.summary(), **mem.stats(), **count_params(model)}
    return TrainResult(model=model, tokenizer=tok, stats=stats, history=history)


class RewardScorer:
    """A trained reward model as a function ``(prompt texts, reply texts) -> rewards``."""

    def __init__(self, model_dir: str, max_prompt_len: int = 64, max_len: int = 160, batch_size: int = 32,
                 device: str = "auto", dtype: str = "float32"):
        from transformers import AutoModelForSequenceClassification

        self.tokenizer = load_tokenizer(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch_dtype(dtype))
        self.model.to(pick_device(device))
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.max_prompt_len, self.max_len, self.batch_size = max_prompt_len, max_len, batch_size

    def __call__(self, prompts: Sequence[str], replies: Sequence[str]):
        return score_texts(self.model, self.tokenizer, prompts, replies, self.max_prompt_len, self.max_len,
                           self.batch_size)
