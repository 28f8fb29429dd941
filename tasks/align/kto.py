"""Kahneman-Tversky Optimization (Ethayarajh et al. 2024) on unpaired, labelled replies, on the one
training loop (:class:`refinery.tasks.engine.trainer.Engine`, as :class:`refinery.tasks.align.common.OfflineMethod`).

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
replies and their gap.

Several processes (``devices``, ``strategy`` ddp or fsdp): each takes its share of a micro-batch,
and the batch's statistics are summed over the processes before they are used (the reference point
``z0`` of the whole micro-batch, the mean rewards of its desirable and undesirable replies), so the
run follows the one-process run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

from pydantic import Field

from refinery.tasks.align.common import (OfflineMethod, OfflineParams, LoraSettings, TrainResult, encode_reply, load_policy,
                                         run_stats, total_steps, weights_of)
from refinery.tasks.align.data import UnpairedExample, render_prompt, render_reply
from refinery.tasks.align.dpo import reply_logps
from refinery.tasks.engine.trainer import INTERRUPTED, Micro


class KTOConfig(OfflineParams):
    """KTO settings. ``lr`` 5e-6 as for DPO (a whole pretrained policy, no new layer, so ``head_lr``
    is unused); ``batch_size`` examples per micro-batch (at least 2: the KL reference point is
    estimated from mismatched pairs)."""

    field_defaults = dict(max_steps=0, lr=5e-6, batch_size=8, dtype="float32")

    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL constraint (higher: stay closer to the reference).")
    desirable_weight: float = Field(1.0, gt=0, description="Weight of desirable examples' losses (raise it when they are the fewer).")
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of undesirable examples' losses.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapters for the policy (lora.enabled).")


def kto_losses(logps, ref_logps, z0, labels, beta: float, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0):
    """Per-example KTO losses against the reference point ``z0`` and the implicit rewards ``beta * h``."""
    import torch

    h = logps - ref_logps
    lab = labels.bool()
    losses = torch.where(lab, desirable_weight * (1 - torch.sigmoid(beta * (h - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - h))))
    return losses, beta * h.detach()


def kto_loss(logps, ref_logps, kl_logps, ref_kl_logps, labels, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0):
    """Mean KTO loss of a batch, the reference point z0 and the implicit rewards ``beta * h``.
    ``logps``/``ref_logps``: summed reply log-probs (B,); ``kl_logps``/``ref_kl_logps``: the same
    for the mismatched pairs; ``labels``: True for desirable."""
    z0 = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    losses, rewards = kto_losses(logps, ref_logps, z0, labels, beta, desirable_weight, undesirable_weight)
    return losses.mean(), z0, rewards


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


class KTOMethod(OfflineMethod):
    """KTO on the engine. A micro-batch: the policy's log-probs of its examples (with gradients) and
    of their mismatched pairs (without), against the reference log-probs :meth:`setup` computed
    from the starting weights. The reference point ``z0`` and the mean rewards are the whole
    micro-batch's, summed over the processes."""

    cfg: KTOConfig

    desc, title = "kto", "KTO"
    panels = ("loss", "reward_desirable", "reward_undesirable")

    def __init__(self, model, tokenizer, train: Sequence[UnpairedExample], held_out: Sequence[UnpairedExample],
                 cfg: KTOConfig, seed: int):
        super().__init__(cfg, model, len(train), seed)
        self.pad_id = tokenizer.pad_token_id
        self.enc_tr = encode_examples(tokenizer, train, cfg.max_prompt_len, cfg.max_len)
        self.enc_ev = encode_examples(tokenizer, held_out, cfg.max_prompt_len, cfg.max_len) if len(held_out) >= 2 else None
        self.ref_tr: tuple = ()
        self.ref_ev: tuple | None = None
        self.before: dict = {"examples": 0}

    def scores(self, enc: _Encoded):
        return _all_logps(self.net, enc, self.pad_id, self.cfg.eval_batch_size)

    def setup(self) -> None:
        """The reference: the starting model, scored once (every process scores every example)."""
        self.ref_tr = self.scores(self.enc_tr)
        if self.enc_ev is not None:
            ev = self.ref_ev = self.scores(self.enc_ev)
            self.before = kto_metrics(ev[0], ev[0], ev[1], ev[1], self.enc_ev.labels, self.cfg)

    def micro_step(self, micro: int) -> Micro:
        # The KL pairs are fixed (each prompt with the next example's reply in the data order), so
        # their reference log-probs were computed before training too: no reference model in memory.
        import torch

        share = self.share()   # this process's examples of the micro-batch (all of them in one)
        idx, enc, cfg = share.idx, self.enc_tr, self.cfg
        seqs = [enc.seqs[j] for j in idx]
        lp, _ = reply_logps(self.net, seqs, [enc.plens[j] for j in idx], self.pad_id)
        with torch.no_grad():
            kl_lp, _ = reply_logps(self.net, [enc.kl_seqs[j] for j in idx], [enc.kl_plens[j] for j in idx], self.pad_id)
        t = torch.tensor(idx)
        ref, ref_kl = self.ref_tr[0][t].to(lp.device), self.ref_tr[1][t].to(lp.device)
        labels = torch.tensor([enc.labels[j] for j in idx], device=lp.device)
        w = weights_of(share, lp)
        # z0 = mean over the whole micro-batch of the mismatched pairs' log-ratios (clamped at 0);
        # the reward figures are its desirable and undesirable replies' means: one sum over the processes
        rew_all = cfg.beta * (lp.detach() - ref)
        good, bad = w * labels.float(), w * (~labels).float()
        kl_sum, n, good_sum, n_good, bad_sum, n_bad = self.engine.par.sum(
            [float(((kl_lp - ref_kl) * w).sum()), float(w.sum()), float((rew_all * good).sum()), float(good.sum()),
             float((rew_all * bad).sum()), float(bad.sum())])
        z0 = max(kl_sum / n, 0.0)
        losses, _ = kto_losses(lp, ref, torch.tensor(z0, dtype=lp.dtype, device=lp.device), labels, cfg.beta,
                               cfg.desirable_weight, cfg.undesirable_weight)
        return Micro(share.mean(losses), {"tokens": share.count([len(x) for x in seqs]), "z0": z0,
                                          "reward_desirable": good_sum / n_good if n_good else 0.0,
                                          "reward_undesirable": bad_sum / n_bad if n_bad else 0.0})

    def held_out(self) -> dict:
        """The held-out figures of the current weights."""
        assert self.enc_ev is not None and self.ref_ev is not None
        cur = self.scores(self.enc_ev)
        return kto_metrics(cur[0], self.ref_ev[0], cur[1], self.ref_ev[1], self.enc_ev.labels, self.cfg)

    def validate(self) -> dict | None:
        if self.enc_ev is None:
            return None
        return _val_figures(self.before if self.untouched() else self.held_out())


def train_kto(model_dir: str, train: Sequence[UnpairedExample], held_out: Sequence[UnpairedExample], cfg: KTOConfig,
              seed: int = 0, on_step: Callable[[dict], None] | None = None, progress: bool = False,
              log_dir: str | os.PathLike | None = None, ckpt_dir: str | os.PathLike | None = None,
              stop_after: int | None = None) -> TrainResult:
    """KTO of the model in ``model_dir`` on labelled ``train`` examples; held-out figures before,
    every ``eval_every`` steps, and after. Metrics, checkpoints and resume as in
    :func:`refinery.tasks.align.dpo.train_dpo`."""
    if len(train) < 2:
        raise ValueError("KTO: at least 2 training examples (the KL reference point needs mismatched pairs)")
    tok, model, device, mem = load_policy(model_dir, cfg, seed)
    total = total_steps(len(train), cfg, cfg.epochs)
    method = KTOMethod(model, tok, train, held_out, cfg, seed)
    done = method.fit(total, device, ckpt_dir=ckpt_dir, log_dir=log_dir, progress=progress, on_step=on_step,
                      stop_after=stop_after)
    stats = {"train_examples": len(train), "held_out_examples": len(held_out), "held_out_before": method.before,
             **run_stats(done, total, mem, model)}
    if done.status not in INTERRUPTED:
        stats["held_out_after"] = method.held_out() if method.enc_ev is not None else {"examples": 0}
    return TrainResult(model=model, tokenizer=tok, stats=stats, history=done.history, status=done.status)


__all__ = ["KTOConfig", "KTOMethod", "kto_loss", "kto_losses", "kto_metrics", "encode_examples", "train_kto"]
