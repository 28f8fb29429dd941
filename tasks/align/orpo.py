"""Odds Ratio Preference Optimization (Hong et al. 2024), reference-free, on the one training loop
(:class:`refinery.tasks.engine.trainer.Engine`, as :class:`refinery.tasks.align.common.OfflineMethod`).

ORPO fine-tunes and aligns in one loss, with no reference model: the supervised NLL of the chosen
sequence (over its prompt and reply tokens, as TRL computes it) minus ``beta`` times
``log sigmoid(log odds(chosen) - log odds(rejected))``, where ``odds(y) = p / (1 - p)`` and
``log p`` is the reply's mean per-token log-probability. :func:`odds_ratio_loss` equals TRL 1.16's
``ORPOTrainer.odds_ratio_loss`` on the same batch and :func:`chosen_nll` its NLL term (tested).

Memory: one model and no reference pass at all (DPO needs the reference's log-probs, KTO too).
Held-out figures: the ORPO loss (the early-stopping metric), the share of pairs whose chosen reply
has the higher mean log-prob (accuracy) and the mean log odds ratio (margin).

Several processes (``devices``, ``strategy`` ddp or fsdp): each takes its share of a micro-batch's
pairs; the NLL term's token count is the whole micro-batch's (summed over the processes), so the
run follows the one-process run.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

from pydantic import Field

from refinery.tasks.align.common import (OfflineMethod, OfflineParams, LoraSettings, TrainResult, load_policy, model_device,
                                         pad, position_ids, run_stats, token_logprobs, total_steps, weights_of)
from refinery.tasks.align.data import PreferencePair
from refinery.tasks.align.dpo import encode_pairs
from refinery.tasks.engine.trainer import INTERRUPTED, Micro


class ORPOConfig(OfflineParams):
    """ORPO settings. ``lr`` 8e-6 (the ORPO paper's rate for full fine-tuning of a pretrained
    model; no new layer, so ``head_lr`` is unused)."""

    field_defaults = dict(max_steps=0, lr=8e-6, batch_size=8, dtype="float32")

    beta: float = Field(0.1, gt=0, description="Weight of the odds-ratio term against the chosen reply's NLL (the paper's lambda).")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapters for the policy (lora.enabled).")


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    import torch

    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_loss(chosen_avg_logps, rejected_avg_logps, beta: float):
    """Per-pair ``beta * log sigmoid(log odds ratio)`` (to be subtracted) and the log odds ratio."""
    import torch.nn.functional as F

    c, r = chosen_avg_logps.float(), rejected_avg_logps.float()
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    return beta * F.logsigmoid(log_odds), log_odds


def _forward(model, seqs, prompt_lens, pad_id):
    """Per sequence: mean reply log-prob, and the summed log-prob and count of all its tokens."""
    import torch

    ids, mask = pad(seqs, pad_id, "right")
    dev = model_device(model)
    ids, mask = ids.to(dev), mask.to(dev)
    lp = token_logprobs(model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits, ids)
    real = mask[:, 1:].bool()
    pos = torch.arange(ids.shape[1] - 1, device=dev)[None, :] + 1
    reply = (pos >= torch.tensor(list(prompt_lens), device=dev)[:, None]) & real
    avg = (lp * reply).sum(-1) / reply.sum(-1).clamp(min=1)
    return avg, (lp * real).sum(-1), real.sum(-1)


def chosen_nll(sum_logps, counts):
    """TRL's NLL term: cross-entropy per token over all chosen tokens of the batch (prompt and reply)."""
    return -sum_logps.sum() / counts.sum().clamp(min=1)


def orpo_batch(model, enc, idx: Sequence[int], pad_id: int, beta: float):
    """Loss and figures of pairs ``idx`` of the encoded pairs ``enc`` (one forward over chosen + rejected)."""
    n = len(idx)
    seqs, plens = enc.pick(idx)
    avg, sums, counts = _forward(model, seqs, plens, pad_id)
    nll = chosen_nll(sums[:n], counts[:n])
    ratio, log_odds = odds_ratio_loss(avg[:n], avg[n:], beta)
    return nll - ratio.mean(), nll, log_odds, sum(len(s) for s in seqs)


def evaluate_orpo(model, enc, pad_id: int, beta: float, batch_size: int) -> dict:
    import torch

    if not enc.chosen:
        return {"pairs": 0}
    losses, odds = [], []
    with torch.no_grad():
        for i in range(0, len(enc.chosen), batch_size):
            idx = list(range(i, min(i + batch_size, len(enc.chosen))))
            loss, _, lo, _ = orpo_batch(model, enc, idx, pad_id, beta)
            losses.append(loss.item() * len(idx))
            odds.append(lo.cpu())
    lo = torch.cat(odds)
    return {"pairs": len(lo), "loss": round(sum(losses) / len(lo), 6),
            "accuracy": round(((lo > 0).float() + 0.5 * (lo == 0).float()).mean().item(), 6),
            "margin": round(lo.mean().item(), 6)}


FIGURES = ("loss", "accuracy", "margin")   # the held-out figures logged as validation rows


class ORPOMethod(OfflineMethod):
    """ORPO on the engine: the loss of a micro-batch of pairs (chosen and rejected in one forward);
    held-out ORPO loss (the early-stopping metric), accuracy and margin."""

    cfg: ORPOConfig

    desc, title = "orpo", "ORPO"
    show, panels = ("loss", "accuracy"), FIGURES

    def __init__(self, model, tokenizer, train: Sequence[PreferencePair], held_out: Sequence[PreferencePair],
                 cfg: ORPOConfig, seed: int):
        super().__init__(cfg, model, len(train), seed)
        self.pad_id = tokenizer.pad_token_id
        self.enc_tr = encode_pairs(tokenizer, train, cfg.max_prompt_len, cfg.max_len)
        self.enc_ev = encode_pairs(tokenizer, held_out, cfg.max_prompt_len, cfg.max_len)
        self.before: dict = {"pairs": 0}

    def held_out(self) -> dict:
        """The held-out figures of the current weights."""
        return evaluate_orpo(self.net, self.enc_ev, self.pad_id, self.cfg.beta, self.cfg.eval_batch_size)

    def setup(self) -> None:
        self.before = self.held_out()

    def micro_step(self, micro: int) -> Micro:
        share = self.share()   # this process's pairs of the micro-batch (all of them in one)
        idx, enc = share.idx, self.enc_tr
        n = len(idx)
        seqs, plens = enc.pick(idx)
        avg, sums, counts = _forward(self.net, seqs, plens, self.pad_id)
        w = weights_of(share, sums)
        # the NLL term is a mean over every chosen token of the micro-batch, all processes' together
        nll_sum, tokens = self.engine.par.sum([float(-(sums[:n].detach() * w).sum()), float((counts[:n] * w).sum())])
        tokens = max(tokens, 1.0)
        nll = -(sums[:n] * w).sum() / tokens * share.world
        ratio, log_odds = odds_ratio_loss(avg[:n], avg[n:], self.cfg.beta)
        return Micro(nll - share.mean(ratio), {"tokens": share.count([len(a) + len(b) for a, b in zip(seqs[:n], seqs[n:])]),
                                               "nll": nll_sum / tokens,
                                               "accuracy": share.mean((log_odds > 0).float()).item(),
                                               "margin": share.mean(log_odds.detach()).item()})

    def validate(self) -> dict | None:
        if not self.enc_ev.chosen:
            return None
        m = self.before if self.untouched() else self.held_out()
        return {k: m[k] for k in FIGURES}


def train_orpo(model_dir: str, train: Sequence[PreferencePair], held_out: Sequence[PreferencePair], cfg: ORPOConfig,
               seed: int = 0, on_step: Callable[[dict], None] | None = None, progress: bool = False,
               log_dir: str | os.PathLike | None = None, ckpt_dir: str | os.PathLike | None = None,
               stop_after: int | None = None) -> TrainResult:
    """ORPO of the model in ``model_dir`` on ``train`` pairs; held-out figures before, every
    ``eval_every`` steps, and after. Metrics, checkpoints and resume as in
    :func:`refinery.tasks.align.dpo.train_dpo`."""
    if not train:
        raise ValueError("ORPO: no training pairs")
    tok, model, device, mem = load_policy(model_dir, cfg, seed)
    total = total_steps(len(train), cfg, cfg.epochs)
    method = ORPOMethod(model, tok, train, held_out, cfg, seed)
    done = method.fit(total, device, ckpt_dir=ckpt_dir, log_dir=log_dir, progress=progress, on_step=on_step,
                      stop_after=stop_after)
    stats = {"train_pairs": len(train), "held_out_pairs": len(held_out), "held_out_before": method.before,
             **run_stats(done, total, mem, model)}
    if done.status not in INTERRUPTED:
        stats["held_out_after"] = method.held_out()
    return TrainResult(model=model, tokenizer=tok, stats=stats, history=done.history, status=done.status)


__all__ = ["ORPOConfig", "ORPOMethod", "odds_ratio_loss", "chosen_nll", "orpo_batch", "evaluate_orpo", "train_orpo"]
