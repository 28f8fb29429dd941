"""Kahneman-Tversky Optimization (Ethayarajh et al. 2024) on unpaired, labelled replies; our own loop.

Each example is (prompt x, reply y, desirable or not). With ``h(y) = log pi(y|x) - log pi_ref(y|x)``
(summed over reply tokens) and a reference point ``z0``, the KL of policy to reference estimated
on mismatched (prompt, reply) pairs of the batch (``mean(h(y'|x))``, clamped at 0, no gradient),
the loss is ``desirable_weight * (1 - sigmoid(beta * (h - z0)))`` for desirable replies and
``undesirable_weight * (1 - sigmoid(beta * (z0 - h)))`` for undesirable ones, averaged over the
batch. :func:`kto_loss` equals TRL 1.16's ``KTOTrainer`` loss on the same batch (tested).

The reference is the starting model; its log-probabilities of every example and of each
example's fixed mismatched partner (its prompt with the next example's reply in the data order,
TRL's pairing made once rather than per batch) are computed once before training, so no second
model is held in memory, with LoRA or without. Held-out figures: the KTO loss (the
early-stopping metric), and the implicit rewards ``beta * h`` of desirable and undesirable
replies and their gap. Practice as in every align trainer (:mod:`refinery.tasks.align.practice`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from pydantic import Field

from refinery.tasks.align.common import (OfflineParams, LoraSettings, TrainResult, count_params, encode_reply, load_policy,
                                         step_metrics)
from refinery.tasks.align.data import UnpairedExample, render_prompt, render_reply
from refinery.tasks.align.dpo import reply_logps
from refinery.tasks.align.practice import EarlyStopping, make_optimisation, micro_batches, run_loop, total_steps


class KTOConfig(OfflineParams):
    """KTO settings. ``lr`` 5e-6 as for DPO (a whole pretrained policy, no new layer, so ``head_lr``
    is unused); ``batch_size`` examples per micro-batch (at least 2: the KL reference point is
    estimated from mismatched pairs)."""

    field_defaults = dict(max_steps=0, lr=5e-6, batch_size=8, dtype="float32")

    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL constraint (higher: stay closer to the reference).")
    desirable_weight: float = Field(1.0, gt=0, description="Weight of desirable examples' losses (raise it when they are the fewer).")
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of undesirable examples' losses.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapters for the policy (lora.enabled).")


def kto_loss(logps, ref_logps, kl_logps, ref_kl_logps, labels, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0):
    """Mean KTO loss of a batch, the reference point z0 and the implicit rewards ``beta * h``.
    ``logps``/``ref_logps``: summed reply log-probs (B,); ``kl_logps``/``ref_kl_logps``: the same
    for the mismatched pairs; ``labels``: True for desirable."""
    import torch

    z0 = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    h = logps - ref_logps
    lab = labels.bool()
    losses = torch.where(lab, desirable_weight * (1 - torch.sigmoid(beta * (h - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - h))))
    return losses.mean(), z0, beta * h.detach()


@dataclass
class _Encoded:
    seqs: list          # prompt + own reply
    plens: list
    kl_seqs: list       # prompt + the next example's reply (the mismatched pair)
    kl_plens: list
    labels: list


def encode_examples(tokenizer, examples: Sequence[UnpairedExample], max_prompt_len: int, max_len: int) -> _Encoded:
    enc = _Encoded([], [], [], [], [])
    prompts = [render_prompt(e.prompt, tokenizer) for e in examples]
    replies = [render_reply(e.completion, tokenizer) for e in examples]
    n = len(examples)
    for i, e in enumerate(examples):
        p, r = encode_reply(tokenizer, prompts[i], replies[i], max_prompt_len, max_len)
        kp, kr = encode_reply(tokenizer, prompts[i], replies[(i + 1) % n], max_prompt_len, max_len)
        enc.seqs.append(p + r)
        enc.plens.append(len(p))
        enc.kl_seqs.append(kp + kr)
        enc.kl_plens.append(len(kp))
        enc.labels.append(e.label)
    return enc


def _all_logps(model, enc: _Encoded, pad_id: int, batch_size: int):
    """(logps, kl logps) of every example, no gradients."""
    import torch

    a, b = [], []
    with torch.no_grad():
        for i in range(0, len(enc.seqs), batch_size):
            sl = slice(i, i + batch_size)
            a.append(reply_logps(model, enc.seqs[sl], enc.plens[sl], pad_id)[0].cpu())
            b.append(reply_logps(model, enc.kl_seqs[sl], enc.kl_plens[sl], pad_id)[0].cpu())
    return torch.cat(a), torch.cat(b)


def kto_metrics(logps, ref_logps, kl_logps, ref_kl_logps, labels, cfg: KTOConfig) -> dict:
    """Held-out figures: loss, z0, implicit rewards of desirable and undesirable replies, their gap,
    and the share of replies whose implicit reward has the label's sign."""
    import torch

    if len(logps) == 0:
        return {"examples": 0}
    lab = torch.as_tensor(labels, dtype=torch.bool)
    loss, z0, rew = kto_loss(logps, ref_logps, kl_logps, ref_kl_logps, lab, cfg.beta, cfg.desirable_weight,
                             cfg.undesirable_weight)
    good = rew[lab].mean().item() if lab.any() else float("nan")
    bad = rew[~lab].mean().item() if (~lab).any() else float("nan")
    sign_ok = torch.where(lab, rew > 0, rew < 0).float().mean().item()
    return {"examples": len(logps), "loss": round(loss.item(), 6), "z0": round(z0.item(), 6),
            "reward_desirable": round(good, 6), "reward_undesirable": round(bad, 6),
            "margin": round(good - bad, 6), "accuracy": round(sign_ok, 6)}


def _val_figures(m: dict) -> dict:
    return {k: m[k] for k in ("loss", "margin", "accuracy") if k in m}


def train_kto(model_dir: str, train: Sequence[UnpairedExample], held_out: Sequence[UnpairedExample], cfg: KTOConfig,
              seed: int = 0, on_step: Callable[[dict], None] | None = None, progress: bool = False,
              log_dir: str | os.PathLike | None = None) -> TrainResult:
    """KTO of the model in ``model_dir`` on labelled ``train`` examples; held-out figures before,
    every ``eval_every`` steps, and after."""
    import torch


    if len(train) < 2:
        raise ValueError("KTO: at least 2 training examples (the KL reference point needs mismatched pairs)")
    tok, model, device, mem = load_policy(model_dir, cfg, seed)
    pad_id = tok.pad_token_id
    enc_tr = encode_examples(tok, train, cfg.max_prompt_len, cfg.max_len)
    enc_ev = encode_examples(tok, held_out, cfg.max_prompt_len, cfg.max_len) if len(held_out) >= 2 else None
    ref_tr = _all_logps(model, enc_tr, pad_id, cfg.eval_batch_size)   # the reference: the starting model, once
    ref_ev = _all_logps(model, enc_ev, pad_id, cfg.eval_batch_size) if enc_ev else None
    before: dict = {"examples": 0}
    if ref_ev is not None and enc_ev is not None:
        before = kto_metrics(ref_ev[0], ref_ev[0], ref_ev[1], ref_ev[1], enc_ev.labels, cfg)
    total = total_steps(len(train), cfg, cfg.epochs)
    optim = make_optimisation(model, cfg, total)
    batches = micro_batches(len(train), cfg.batch_size, torch.Generator().manual_seed(seed))
    steps = step_metrics(log_dir, cfg, total, "kto", progress, on_step)
    stopper = EarlyStopping("loss", "min", cfg.early_stopping_patience, cfg.early_stopping_min_delta)
    if ref_ev is not None:
        steps.val(0, tokens=0, **_val_figures(before))
        stopper.update(before["loss"], 0, model)

    def micro_step() -> dict:
        # The KL pairs are fixed (each prompt with the next example's reply in the data order), so
        # their reference log-probs were computed before training too: no reference model in memory.
        idx = next(batches)
        seqs = [enc_tr.seqs[j] for j in idx]
        lp, _ = reply_logps(model, seqs, [enc_tr.plens[j] for j in idx], pad_id)
        with torch.no_grad():
            kl_lp, _ = reply_logps(model, [enc_tr.kl_seqs[j] for j in idx], [enc_tr.kl_plens[j] for j in idx], pad_id)
        t = torch.tensor(idx)
        labels = torch.tensor([enc_tr.labels[j] for j in idx], device=lp.device)
        loss, z0, rew = kto_loss(lp, ref_tr[0][t].to(lp.device), kl_lp, ref_tr[1][t].to(lp.device), labels,
                                 cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
        optim.backward(loss)
        good = rew[labels].mean().item() if labels.any() else 0.0
        bad = rew[~labels].mean().item() if (~labels).any() else 0.0
        return {"tokens": sum(len(s) for s in seqs), "loss": loss.item(), "z0": z0.item(),
                "reward_desirable": good, "reward_undesirable": bad}

    def validate() -> dict:
        assert enc_ev is not None and ref_ev is not None   # only called with held-out examples
        cur = _all_logps(model, enc_ev, pad_id, cfg.eval_batch_size)
        return _val_figures(kto_metrics(cur[0], ref_ev[0], cur[1], ref_ev[1], enc_ev.labels, cfg))

    t0 = time.perf_counter()
    done = run_loop(model, cfg, total, optim, micro_step, steps, validate if ref_ev is not None else None, stopper)
    train_seconds = time.perf_counter() - t0
    after: dict = {"examples": 0}
    if ref_ev is not None and enc_ev is not None:
        cur = _all_logps(model, enc_ev, pad_id, cfg.eval_batch_size)
        after = kto_metrics(cur[0], ref_ev[0], cur[1], ref_ev[1], enc_ev.labels, cfg)
    steps.close()
    steps.plot("KTO", panels=("loss", "reward_desirable", "reward_undesirable"))
    losses = [r["loss"] for r in steps.history if r["split"] == "train"]
    stats = {"steps": done.steps, "train_examples": len(train), "held_out_examples": len(held_out),
             "held_out_before": before, "held_out_after": after,
             "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
             "train_seconds": round(train_seconds, 3), "train_tokens": done.tokens, "total_steps": total,
             "restored_step": done.restored_step, **stopper.summary(), **mem.stats(), **count_params(model)}
    return TrainResult(model=model, tokenizer=tok, stats=stats, history=steps.history)


__all__ = ["KTOConfig", "kto_loss", "kto_metrics", "encode_examples", "train_kto"]
