"""Reward model: a scalar head on the SFT model's backbone, trained on preference pairs.

``AutoModelForSequenceClassification.from_pretrained(sft_dir, num_labels=1)`` puts a linear
``score`` head on the backbone; the score of a sequence is read at its last real token. Training
minimises the pairwise (Bradley-Terry) loss ``-log sigmoid(r_chosen - r_rejected)``, optionally
with a small penalty ``center_coef * (r_c + r_r)^2`` that keeps rewards centred on zero (so PPO
sees rewards of a sane scale). Held-out pairwise accuracy (``r_c > r_r``) is measured before
training, every ``eval_every`` steps (the early-stopping metric) and after.

It runs on the one training loop (:class:`refinery.tasks.engine.trainer.Engine`, as
:class:`refinery.tasks.align.common.OfflineMethod`): the backbone at ``lr`` (pretrained weights:
1e-5 to 5e-5) and the new ``score`` head at ``head_lr`` (about 1e-4), gradient accumulation,
warm-up + cosine schedule, clipping, early stopping with the best weights restored, checkpoints
and resume, one process or several (DDP, FSDP2).
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

from pydantic import Field

from refinery.tasks.align.common import (OfflineMethod, OfflineParams, LoraSettings, TrainResult, apply_lora,
                                         encode_reply, load_tokenizer, model_device, pad, pick_device, run_stats,
                                         seed_everything, torch_dtype, total_steps)
from refinery.tasks.align.data import PreferencePair, render_prompt, render_reply
from refinery.tasks.engine.trainer import INTERRUPTED, Micro


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


class RewardMethod(OfflineMethod):
    """The reward model on the engine: the pairwise loss of a micro-batch of pairs (chosen and
    rejected in one forward), held-out pairwise accuracy (the early-stopping metric) and margin."""

    cfg: RewardConfig

    desc, title = "reward", "reward model"
    metric, mode = "accuracy", "max"
    head_prefixes = ("score", "classifier")
    show = panels = ("loss", "accuracy")
    train_mode = True     # as before the engine: the reward model trains in training mode

    def __init__(self, model, tokenizer, train: Sequence[PreferencePair], held_out: Sequence[PreferencePair],
                 cfg: RewardConfig, seed: int):
        super().__init__(cfg, model, len(train), seed)
        self.tok, self.held_out = tokenizer, held_out
        prompts, chosen, rejected = _pair_texts(tokenizer, train)   # tokenized once
        self.enc_c = [sum(encode_reply(tokenizer, p, c, cfg.max_prompt_len, cfg.max_len), []) for p, c in zip(prompts, chosen)]
        self.enc_r = [sum(encode_reply(tokenizer, p, r, cfg.max_prompt_len, cfg.max_len), []) for p, r in zip(prompts, rejected)]
        self.before: dict = {"pairs": 0}

    def setup(self) -> None:
        self.before = evaluate_pairs(self.net, self.tok, self.held_out, self.cfg)

    def micro_step(self, micro: int) -> Micro:
        import torch.nn.functional as F

        share = self.share()   # this process's pairs of the micro-batch (all of them in one)
        idx, cfg = share.idx, self.cfg
        ids, mask = pad([self.enc_c[j] for j in idx] + [self.enc_r[j] for j in idx], self.tok.pad_token_id, "right")
        dev = model_device(self.model)
        r = self.net(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits[:, 0].float()
        rc, rr = r[: len(idx)], r[len(idx):]
        per_pair = -F.logsigmoid(rc - rr)
        if cfg.center_coef:
            per_pair = per_pair + cfg.center_coef * (rc + rr) ** 2
        lengths = mask.sum(1).tolist()
        return Micro(share.mean(per_pair), {"tokens": share.count(lengths[: len(idx)]) + share.count(lengths[len(idx):]),
                                            "accuracy": share.mean((rc > rr).float()).item()})

    def validate(self) -> dict | None:
        if not self.held_out:
            return None
        m = self.before if self.untouched() else evaluate_pairs(self.net, self.tok, self.held_out, self.cfg)
        return {"accuracy": m["accuracy"], "margin": m["margin"]}


def train_reward_model(model_dir: str, train: Sequence[PreferencePair], held_out: Sequence[PreferencePair],
                       cfg: RewardConfig, seed: int = 0, on_step: Callable[[dict], None] | None = None,
                       progress: bool = False, log_dir: str | os.PathLike | None = None,
                       ckpt_dir: str | os.PathLike | None = None, stop_after: int | None = None) -> TrainResult:
    """Train a reward model from ``model_dir`` on ``train`` pairs; evaluate on ``held_out``.
    Per-step metrics go to ``log_dir`` (default ``ckpt_dir/metrics``; in memory only when both are
    None); checkpoints to ``ckpt_dir`` (every ``cfg.checkpoint_every`` steps, on SIGTERM and on
    ``stop_after``), from whose newest one the same call resumes. A run that stopped early comes
    back with its ``status`` (``preempted``, ``stopped``) and no held-out figures after."""
    from refinery.tasks.train.common import PeakMemory

    if not train:
        raise ValueError("reward model: no training pairs")
    seed_everything(seed)
    model, tok = load_reward_model(model_dir, cfg.lora, cfg.dtype)
    dev = pick_device(cfg.device)
    mem = PeakMemory(dev).start()
    model.to(dev)
    total = total_steps(len(train), cfg, cfg.epochs)
    method = RewardMethod(model, tok, train, held_out, cfg, seed)
    done = method.fit(total, dev, ckpt_dir=ckpt_dir, log_dir=log_dir, progress=progress, on_step=on_step,
                      stop_after=stop_after)
    stats = {"train_pairs": len(train), "held_out_pairs": len(held_out), "held_out_before": method.before,
             **run_stats(done, total, mem, model)}
    if done.status not in INTERRUPTED:
        stats["held_out_after"] = evaluate_pairs(method.net, tok, held_out, cfg)
    return TrainResult(model=model, tokenizer=tok, stats=stats, history=done.history, status=done.status)


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
