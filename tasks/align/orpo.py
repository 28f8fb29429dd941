"""Odds Ratio Preference Optimization (Hong et al. 2024), reference-free; our own loop.

ORPO fine-tunes and aligns in one loss, with no reference model: the supervised NLL of the chosen
sequence (over its prompt and reply tokens, as TRL computes it) minus ``beta`` times
``log sigmoid(log odds(chosen) - log odds(rejected))``, where ``odds(y) = p / (1 - p)`` and
``log p`` is the reply's mean per-token log-probability. :func:`odds_ratio_loss` equals TRL 1.16's
``ORPOTrainer.odds_ratio_loss`` on the same batch and :func:`chosen_nll` its NLL term (tested).

Memory: one model and no reference pass at all (DPO needs the reference's log-probs, KTO too).
Held-out figures: the ORPO loss (the early-stopping metric), the share of pairs whose chosen reply
has the higher mean log-prob (accuracy) and the mean log odds ratio (margin). Practice as in
every align trainer (:mod:`refinery.tasks.align.practice`).
"""
from __future__ import annotations

import os
import time
from typing import Callable, Sequence

from pydantic import Field

from refinery.tasks.align.common import (OfflineParams, LoraSettings, TrainResult, count_params, load_policy, model_device,
                                         pad, position_ids, step_metrics, token_logprobs)
from refinery.tasks.align.data import PreferencePair
from refinery.tasks.align.dpo import encode_pairs
from refinery.tasks.align.practice import EarlyStopping, make_optimisation, micro_batches, run_loop, total_steps


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
    seqs = [enc.chosen[j] for j in idx] + [enc.rejected[j] for j in idx]
    plens = [enc.p_len_c[j] for j in idx] + [enc.p_len_r[j] for j in idx]
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


def train_orpo(model_dir: str, train: Sequence[PreferencePair], held_out: Sequence[PreferencePair], cfg: ORPOConfig,
               seed: int = 0, on_step: Callable[[dict], None] | None = None, progress: bool = False,
               log_dir: str | os.PathLike | None = None) -> TrainResult:
    """ORPO of the model in ``model_dir`` on ``train`` pairs; held-out figures before, every
    ``eval_every`` steps, and after."""
    import torch

    if not train:
        raise ValueError("ORPO: no training pairs")
    tok, model, device, mem = load_policy(model_dir, cfg, seed)
    pad_id = tok.pad_token_id
    enc_tr = encode_pairs(tok, train, cfg.max_prompt_len, cfg.max_len)
    enc_ev = encode_pairs(tok, held_out, cfg.max_prompt_len, cfg.max_len)
    before = evaluate_orpo(model, enc_ev, pad_id, cfg.beta, cfg.eval_batch_size)
    total = total_steps(len(train), cfg, cfg.epochs)
    optim = make_optimisation(model, cfg, total)
    batches = micro_batches(len(train), cfg.batch_size, torch.Generator().manual_seed(seed))
    steps = step_metrics(log_dir, cfg, total, "orpo", progress, on_step)
    stopper = EarlyStopping("loss", "min", cfg.early_stopping_patience, cfg.early_stopping_min_delta)
    fig_keys = ("loss", "accuracy", "margin")
    if held_out:
        steps.val(0, tokens=0, **{k: before[k] for k in fig_keys})
        stopper.update(before["loss"], 0, model)

    def micro_step() -> dict:
        loss, nll, log_odds, tokens = orpo_batch(model, enc_tr, next(batches), pad_id, cfg.beta)
        optim.backward(loss)
        return {"tokens": tokens, "loss": loss.item(), "nll": nll.item(),
                "accuracy": (log_odds > 0).float().mean().item(), "margin": log_odds.mean().item()}

    def validate() -> dict:
        m = evaluate_orpo(model, enc_ev, pad_id, cfg.beta, cfg.eval_batch_size)
        return {k: m[k] for k in fig_keys}

    t0 = time.perf_counter()
    done = run_loop(model, cfg, total, optim, micro_step, steps, validate if held_out else None, stopper)
    train_seconds = time.perf_counter() - t0
    after = evaluate_orpo(model, enc_ev, pad_id, cfg.beta, cfg.eval_batch_size)
    steps.close()
    steps.plot("ORPO", panels=("loss", "accuracy", "margin"))
    losses = [r["loss"] for r in steps.history if r["split"] == "train"]
    stats = {"steps": done.steps, "train_pairs": len(train), "held_out_pairs": len(held_out),
             "held_out_before": before, "held_out_after": after,
             "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
             "train_seconds": round(train_seconds, 3), "train_tokens": done.tokens, "total_steps": total,
             "restored_step": done.restored_step, **stopper.summary(), **mem.stats(), **count_params(model)}
    return TrainResult(model=model, tokenizer=tok, stats=stats, history=steps.history)


__all__ = ["ORPOConfig", "odds_ratio_loss", "chosen_nll", "orpo_batch", "evaluate_orpo", "train_orpo"]
