"""Direct Preference Optimization (Rafailov et al. 2023) on the one training loop
(:class:`refinery.tasks.engine.trainer.Engine`, as :class:`refinery.tasks.align.common.OfflineMethod`).

For a pair (prompt x, chosen y_c, rejected y_r) and log-ratios against a frozen reference
``h(y) = log pi(y|x) - log pi_ref(y|x)`` (summed over reply tokens), the loss is
``-log sigmoid(beta * (h(y_c) - h(y_r)))`` (with ``label_smoothing`` e, the conservative variant
``(1-e) * that + e * -log sigmoid(-beta * ...)``). The implicit rewards ``beta * h(y)`` give the
reported preference accuracy and margins on held-out pairs, before and after training.

The reference is the starting policy; its log-probabilities of every pair are computed once,
before training (and again, from the starting weights, when a run resumes), so no second model
is held in memory (with LoRA or without).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

from pydantic import Field

from refinery.tasks.align.common import (OfflineMethod, OfflineParams, LoraSettings, TrainResult, encode_reply, load_policy,
                                         model_device, pad, position_ids, run_stats, token_logprobs, total_steps)
from refinery.tasks.align.data import PreferencePair, render_prompt, render_reply
from refinery.tasks.engine.trainer import INTERRUPTED, Micro

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


class DPOMethod(OfflineMethod):
    """DPO on the engine: the loss of a micro-batch of pairs (chosen and rejected in one forward)
    against the reference log-probs :meth:`setup` computed from the starting weights; held-out
    DPO loss (the early-stopping metric), accuracy and margin of the implicit rewards."""

    cfg: DPOConfig

    desc, title = "dpo", "DPO"
    show, panels = ("loss", "accuracy"), ("loss", "accuracy", "margin")

    def __init__(self, model, tokenizer, train: Sequence[PreferencePair], held_out: Sequence[PreferencePair],
                 cfg: DPOConfig, seed: int):
        super().__init__(cfg, model, len(train), seed)
        self.pad_id = tokenizer.pad_token_id
        self.enc_tr = encode_pairs(tokenizer, train, cfg.max_prompt_len, cfg.max_len)
        self.enc_ev = encode_pairs(tokenizer, held_out, cfg.max_prompt_len, cfg.max_len) if held_out else None
        self.ref_tr: list = []
        self.ref_ev: list | None = None
        self.before: dict = {"pairs": 0}

    def scores(self, enc: _Encoded):
        return _all_logps(self.net, enc, self.pad_id, self.cfg.eval_batch_size)

    def setup(self) -> None:
        """The reference: the starting model, scored once (every process scores every pair)."""
        self.ref_tr = self.scores(self.enc_tr)
        if self.enc_ev is not None:   # before training the policy is the reference
            ev = self.ref_ev = self.scores(self.enc_ev)
            self.before = preference_metrics(ev[0], ev[1], ev[0], ev[1], ev[2], ev[3], self.cfg.beta)

    def micro_step(self, micro: int) -> Micro:
        import torch

        share = self.share()   # this process's pairs of the micro-batch (all of them in one)
        idx, enc, cfg = share.idx, self.enc_tr, self.cfg
        n = len(idx)
        seqs = [enc.chosen[j] for j in idx] + [enc.rejected[j] for j in idx]
        plens = [enc.p_len_c[j] for j in idx] + [enc.p_len_r[j] for j in idx]
        lp, _ = reply_logps(self.net, seqs, plens, self.pad_id)
        t = torch.tensor(idx)
        ref_c, ref_r = self.ref_tr[0][t].to(lp.device), self.ref_tr[1][t].to(lp.device)
        per_pair, rew_c, rew_r = dpo_loss(lp[:n], lp[n:], ref_c, ref_r, cfg.beta, cfg.label_smoothing)
        with torch.no_grad():
            figures = {"tokens": share.count([len(a) + len(b) for a, b in zip(seqs[:n], seqs[n:])]),
                       "accuracy": share.mean((rew_c > rew_r).float()).item(),
                       "margin": share.mean(rew_c - rew_r).item(), "reward_chosen": share.mean(rew_c).item(),
                       "reward_rejected": share.mean(rew_r).item()}
        return Micro(share.mean(per_pair), figures)

    def held_out(self) -> dict:
        """The held-out figures of the current weights."""
        assert self.enc_ev is not None and self.ref_ev is not None
        cur, ref = self.scores(self.enc_ev), self.ref_ev
        return preference_metrics(cur[0], cur[1], ref[0], ref[1], cur[2], cur[3], self.cfg.beta)

    def validate(self) -> dict | None:
        if self.enc_ev is None:
            return None
        return _val_figures(self.before if self.untouched() else self.held_out())


def train_dpo(model_dir: str, train: Sequence[PreferencePair], held_out: Sequence[PreferencePair], cfg: DPOConfig,
              seed: int = 0, on_step: Callable[[dict], None] | None = None, progress: bool = False,
              log_dir: str | os.PathLike | None = None, ckpt_dir: str | os.PathLike | None = None,
              stop_after: int | None = None) -> TrainResult:
    """DPO of the model in ``model_dir`` on ``train`` pairs; held-out figures before and after.
    Per-step metrics go to ``log_dir`` (default ``ckpt_dir/metrics``; in memory only when both are
    None), with the held-out figures as validation rows at step 0, every ``eval_every`` steps and at
    the last step; checkpoints to ``ckpt_dir``, from whose newest one the same call resumes. A run
    that stopped early (SIGTERM, ``stop_after``) comes back with its ``status`` and no figures after."""
    if not train:
        raise ValueError("DPO: no training pairs")
    tok, model, device, mem = load_policy(model_dir, cfg, seed)
    total = total_steps(len(train), cfg, cfg.epochs)
    method = DPOMethod(model, tok, train, held_out, cfg, seed)
    done = method.fit(total, device, ckpt_dir=ckpt_dir, log_dir=log_dir, progress=progress, on_step=on_step,
                      stop_after=stop_after)
    stats = {"train_pairs": len(train), "held_out_pairs": len(held_out), "held_out_before": method.before,
             **run_stats(done, total, mem, model)}
    if done.status not in INTERRUPTED:
        stats["held_out_after"] = method.held_out() if method.enc_ev is not None else {"pairs": 0}
        k = min(len(train), TRAIN_EVAL_PAIRS)  # the same figures on (the first) training pairs
        enc = method.enc_tr
        cur = method.scores(_Encoded(enc.chosen[:k], enc.rejected[:k], enc.p_len_c[:k], enc.p_len_r[:k]))
        ref = method.ref_tr
        stats["train_after"] = preference_metrics(cur[0], cur[1], ref[0][:k], ref[1][:k], cur[2], cur[3], cfg.beta)
    return TrainResult(model=model, tokenizer=tok, stats=stats, history=done.history, status=done.status)
