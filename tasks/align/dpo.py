"""Direct Preference Optimization (Rafailov et al. 2023), our own short loop.

For a pair (prompt x, chosen y_c, rejected y_r) and log-ratios against a frozen reference
``h(y) = log pi(y|x) - log pi_ref(y|x)`` (summed over reply tokens), the loss is
``-log sigmoid(beta * (h(y_c) - h(y_r)))`` (with ``label_smoothing`` e, the conservative variant
``(1-e) * that + e * -log sigmoid(-beta * ...)``). The implicit rewards ``beta * h(y)`` give the
reported preference accuracy and margins on held-out pairs, before and after training.

The reference is the starting policy; its log-probabilities of every pair are computed once,
before training, so no second model is held in memory (with LoRA or without).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from pydantic import Field

from refinery.tasks.align.common import (OfflineParams, LoraSettings, TrainResult, count_params, encode_reply, load_policy,
                                         model_device, pad, position_ids, step_metrics, token_logprobs)
from refinery.tasks.align.data import PreferencePair, render_prompt, render_reply
from refinery.tasks.engine.parallel import Parallel
from refinery.tasks.align.practice import EarlyStopping, make_optimisation, micro_batches, run_loop, total_steps

TRAIN_EVAL_PAIRS = 128


class DPOConfig(OfflineParams):
    """DPO settings (the shared training knobs, spelled as in every trainer, plus DPO's own).
    ``lr`` 5e-6: preference optimisation of a whole pretrained policy takes a step below
    fine-tuning's (DPO's authors used 1e-6 to 5e-6); there is no new layer, so ``head_lr`` is
    unused. Early stopping watches the held-out DPO loss."""

    field_defaults = dict(max_steps=0, lr=5e-6, batch_size=8, dtype="float32")

    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL constraint (higher: stay closer to the reference).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed label noise (conservative DPO); 0: plain DPO.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapters for the policy (lora.enabled).")


@dataclass
class _Encoded:
    chosen: list      # list of (prompt ids + reply ids)
    rejected: list
    p_len_c: list     # prompt length of each chosen sequence (the reply starts there)
    p_len_r: list


def encode_pairs(tokenizer, pairs: Sequence[PreferencePair], max_prompt_len: int, max_len: int) -> _Encoded:
    enc = _Encoded([], [], [], [])
    for pair in pairs:
        prompt = render_prompt(pair.prompt, tokenizer)
        pc, rc = encode_reply(tokenizer, prompt, render_reply(pair.chosen, tokenizer), max_prompt_len, max_len)
        pr, rr = encode_reply(tokenizer, prompt, render_reply(pair.rejected, tokenizer), max_prompt_len, max_len)
        enc.chosen.append(pc + rc)
        enc.rejected.append(pr + rr)
        enc.p_len_c.append(len(pc))
        enc.p_len_r.append(len(pr))
    return enc


def reply_logps(model, seqs: Sequence[Sequence[int]], prompt_lens: Sequence[int], pad_id: int):
    """Summed log-prob of each sequence's reply tokens (after its prompt) and the reply lengths."""
    import torch

    ids, mask = pad(seqs, pad_id, "right")
    dev = model_device(model)
    ids, mask = ids.to(dev), mask.to(dev)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    lp = token_logprobs(logits, ids)  # (B, T-1): token t+1 given ..t
    pos = torch.arange(ids.shape[1] - 1, device=dev)[None, :] + 1  # position of the predicted token
    plen = torch.tensor(list(prompt_lens), device=dev)[:, None]
    lmask = (pos >= plen) & mask[:, 1:].bool()
    return (lp * lmask).sum(-1), lmask.sum(-1)


def _all_logps(model, enc: _Encoded, pad_id: int, batch_size: int):
    """(chosen logps, rejected logps, chosen lengths, rejected lengths) for every pair, no grad."""
    import torch

    outs: list[list] = [[], [], [], []]
    with torch.no_grad():
        for i in range(0, len(enc.chosen), batch_size):
            sl = slice(i, i + batch_size)
            c, nc = reply_logps(model, enc.chosen[sl], enc.p_len_c[sl], pad_id)
            r, nr = reply_logps(model, enc.rejected[sl], enc.p_len_r[sl], pad_id)
            for o, v in zip(outs, (c, r, nc, nr)):
                o.append(v.cpu())
    return [torch.cat(o) for o in outs]


def dpo_loss(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0):
    """Per-pair DPO loss and the implicit rewards of chosen and rejected replies."""
    import torch.nn.functional as F

    logits = beta * ((pc - rc) - (pr - rr))
    loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return loss, beta * (pc - rc), beta * (pr - rr)


def preference_metrics(pc, pr, rc, rr, nc, nr, beta: float) -> dict:
    """Held-out figures: implicit-reward accuracy and margin, and the policy's own preference
    (mean per-token log-prob of chosen > rejected)."""
    if len(pc) == 0:
        return {"pairs": 0}
    rew_c, rew_r = beta * (pc - rc), beta * (pr - rr)
    margin = rew_c - rew_r
    acc = ((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item()
    per_tok = pc / nc.clamp(min=1) - pr / nr.clamp(min=1)
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta)
    return {"pairs": len(pc), "accuracy": round(acc, 6), "margin": round(margin.mean().item(), 6),
            "reward_chosen": round(rew_c.mean().item(), 6), "reward_rejected": round(rew_r.mean().item(), 6),
            "loss": round(loss.mean().item(), 6),
            "logp_accuracy": round((per_tok > 0).float().mean().item(), 6)}


def _val_figures(m: dict) -> dict:
    """The held-out figures that become validation metrics (``val_loss``, ``val_accuracy``, ...)."""
    return {k: m[k] for k in ("loss", "accuracy", "margin") if k in m}


def train_dpo(model_dir: str, train: Sequence[PreferencePair], held_out: Sequence[PreferencePair], cfg: DPOConfig,
              seed: int = 0, on_step: Callable[[dict], None] | None = None, progress: bool = False,
              log_dir: str | os.PathLike | None = None) -> TrainResult:
    """DPO of the model in ``model_dir`` on ``train`` pairs; held-out figures before and after.
    Per-step metrics go to ``log_dir`` (refinery.tasks.train.metrics; in memory only when None),
    with the held-out figures as validation rows at step 0 and at the last step."""
    import torch

    if not train:
        raise ValueError("DPO: no training pairs")
    tok, model, device, mem = load_policy(model_dir, cfg, seed)
    par = Parallel.setup(model, cfg, device)   # several processes: DDP or FSDP (par.train); else the model
    pad_id = tok.pad_token_id
    enc_tr = encode_pairs(tok, train, cfg.max_prompt_len, cfg.max_len)
    enc_ev = encode_pairs(tok, held_out, cfg.max_prompt_len, cfg.max_len)
    # The reference: the starting model, scored once.
    ref_tr = _all_logps(par.train, enc_tr, pad_id, cfg.eval_batch_size)
    ref_ev = _all_logps(par.train, enc_ev, pad_id, cfg.eval_batch_size) if held_out else None
    before: dict = {"pairs": 0}
    if ref_ev is not None:   # before training the policy is the reference
        before = preference_metrics(ref_ev[0], ref_ev[1], ref_ev[0], ref_ev[1], ref_ev[2], ref_ev[3], cfg.beta)
    total = total_steps(len(train), cfg, cfg.epochs)
    optim = make_optimisation(model, cfg, total, parallel=par)
    batches = micro_batches(len(train), cfg.batch_size, torch.Generator().manual_seed(seed))
    steps = step_metrics(log_dir, cfg, total, "dpo", progress, on_step)
    history = steps.history
    stopper = EarlyStopping("loss", "min", cfg.early_stopping_patience, cfg.early_stopping_min_delta)
    if held_out:
        steps.val(0, tokens=0, **_val_figures(before))
        stopper.update(before["loss"], 0, model)

    def micro_step() -> dict:
        share = par.share(next(batches))   # this process's pairs of the micro-batch (all of them in one)
        idx = share.idx
        n = len(idx)
        seqs = [enc_tr.chosen[j] for j in idx] + [enc_tr.rejected[j] for j in idx]
        plens = [enc_tr.p_len_c[j] for j in idx] + [enc_tr.p_len_r[j] for j in idx]
        lp, _ = reply_logps(par.train, seqs, plens, pad_id)
        t = torch.tensor(idx)
        ref_c, ref_r = ref_tr[0][t].to(lp.device), ref_tr[1][t].to(lp.device)
        per_pair, rew_c, rew_r = dpo_loss(lp[:n], lp[n:], ref_c, ref_r, cfg.beta, cfg.label_smoothing)
        loss = share.mean(per_pair)
        optim.backward(loss)
        with torch.no_grad():
            return {"tokens": share.count([len(a) + len(b) for a, b in zip(seqs[:n], seqs[n:])]),
                    "loss": loss.item(), "accuracy": share.mean((rew_c > rew_r).float()).item(),
                    "margin": share.mean(rew_c - rew_r).item(), "reward_chosen": share.mean(rew_c).item(),
                    "reward_rejected": share.mean(rew_r).item()}

    def validate() -> dict:
        assert ref_ev is not None   # only called with held-out pairs
        cur = _all_logps(par.train, enc_ev, pad_id, cfg.eval_batch_size)
        return _val_figures(preference_metrics(cur[0], cur[1], ref_ev[0], ref_ev[1], cur[2], cur[3], cfg.beta))

    t0 = time.perf_counter()
    done = run_loop(model, cfg, total, optim, micro_step, steps, validate if ref_ev is not None else None, stopper)
    train_seconds = time.perf_counter() - t0
    step, tokens = done.steps, done.tokens
    after: dict = {"pairs": 0}
    if ref_ev is not None:
        cur = _all_logps(par.train, enc_ev, pad_id, cfg.eval_batch_size)
        after = preference_metrics(cur[0], cur[1], ref_ev[0], ref_ev[1], cur[2], cur[3], cfg.beta)
    steps.close()
    steps.plot("DPO", panels=("loss", "accuracy", "margin"))
    k = min(len(train), TRAIN_EVAL_PAIRS)  # the same figures on (the first) training pairs
    sub = _Encoded(enc_tr.chosen[:k], enc_tr.rejected[:k], enc_tr.p_len_c[:k], enc_tr.p_len_r[:k])
    cur_tr = _all_logps(par.train, sub, pad_id, cfg.eval_batch_size)
    train_after = preference_metrics(cur_tr[0], cur_tr[1], ref_tr[0][:k], ref_tr[1][:k], cur_tr[2], cur_tr[3], cfg.beta)
    losses = [r["loss"] for r in history if r["split"] == "train"]
    stats = {"steps": step, "train_pairs": len(train), "held_out_pairs": len(held_out),
             "held_out_before": before, "held_out_after": after, "train_after": train_after,
             "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
             "train_seconds": round(train_seconds, 3), "train_tokens": tokens, "total_steps": total,
             "restored_step": done.restored_step, **stopper.summary(), **mem.stats(), **count_params(model)}
    return TrainResult(model=model, tokenizer=tok, stats=stats, history=history)
