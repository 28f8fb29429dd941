"""Direct Preference Optimization (Rafailov et al. 2023) on the one training loop
(:class:`refinery.tasks.engine.trainer.Engine`, as :class:`refinery.tasks.align.common.OfflineMethod`).

For a pair (prompt x, chosen y_c, rejected y_r) and log-ratios against a frozen reference
``h(y) = log pi(y|x) - log pi_ref(y|x)`` (summed over reply tokens), the loss is
``-log sigmoid(beta * (h(y_c) - h(y_r)))`` (with ``label_smoothing`` e, the conservative variant
``(1-e) * that + e * -log sigmoid(-beta * ...)``). ``loss_type`` picks another loss of the same
log-ratios (IPO, hinge, robust, BCO, SPPO, NCA, APO, EXO, DiscoPOP: :data:`LOSS_TYPES`), each equal
to TRL 1.16's ``DPOTrainer`` loss of that name on the same batch; ``rpo_alpha`` adds the chosen
reply's NLL (RPO, TRL's ``loss_type=[..., "sft"]`` with ``loss_weights=[1, rpo_alpha]``). The implicit
rewards ``beta * h(y)`` give the reported preference accuracy and margins on held-out pairs, before
and after training.

The reference is the starting policy; its log-probabilities of every pair are computed once,
before training (and again, from the starting weights, when a run resumes), so no second model
is held in memory (with LoRA or without).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

from pydantic import Field, model_validator

from refinery.tasks.align.common import (OfflineMethod, OfflineParams, LoraSettings, TrainResult, encode_reply, load_policy,
                                         model_device, pad, position_ids, run_stats, token_logprobs, total_steps,
                                         weights_of)
from refinery.tasks.align.data import PreferencePair, render_prompt, render_reply
from refinery.tasks.engine.trainer import INTERRUPTED, Micro

TRAIN_EVAL_PAIRS = 128

# loss type -> one line for the help (``refinery run align --help``); the formulas: :func:`dpo_loss`
LOSS_TYPES: dict[str, Any] = {
    "sigmoid": "-log sigmoid(beta * margin), the DPO paper's (with label_smoothing: conservative DPO).",
    "hinge": "relu(1 - beta * margin), SLiC's hinge.",
    "ipo": "(per-token margin - 1/(2 beta))^2, IPO (beta is its tau; log-ratios averaged over reply tokens).",
    "exo_pair": "reverse KL to the smoothed label distribution, EXO (needs label_smoothing > 0, e.g. 1e-3).",
    "nca_pair": "NCA: raises the chosen reply's own reward, pushes both below zero (absolute, not only the margin).",
    "robust": "rDPO: the sigmoid loss de-biased for a label_smoothing share of flipped labels.",
    "bco_pair": "BCO on pairs: chosen and rejected rewards classified separately (-log s(r_c) - log s(-r_r)).",
    "sppo_hard": "SPPO (hard labels): log-ratios pulled to +1/(2 beta) (chosen) and -1/(2 beta) (rejected).",
    "apo_zero": "APO-zero: raise the chosen likelihood, lower the rejected (chosen better than the model's own).",
    "apo_down": "APO-down: lower both, the rejected more (chosen worse than the model's own replies).",
    "discopop": "DiscoPOP: logistic/exponential mix modulated by the margin (discopop_tau).",
    "sigmoid_norm": "the sigmoid loss on log-ratios averaged over reply tokens (length-normalised DPO).",
}
LossType = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                   "apo_zero", "apo_down", "discopop", "sigmoid_norm"]
SMOOTHED = ("sigmoid", "robust", "exo_pair")   # the loss types that read label_smoothing


class DPOConfig(OfflineParams):
    """DPO settings (the shared training knobs, spelled as in every trainer, plus DPO's own).
    ``lr`` 5e-6: preference optimisation of a whole pretrained policy takes a step below
    fine-tuning's (DPO's authors used 1e-6 to 5e-6); there is no new layer, so ``head_lr`` is
    unused. Early stopping watches the held-out DPO loss."""

    field_defaults = dict(max_steps=0, lr=5e-6, batch_size=8, dtype="float32")

    loss_type: LossType = Field("sigmoid", description="The preference loss of the log-ratios (TRL's names):",
                                json_schema_extra={"choices": LOSS_TYPES})
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL constraint (higher: stay closer to the reference).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description=(
        "Assumed share of flipped labels: sigmoid (conservative DPO), robust (rDPO), exo_pair (its epsilon, > 0); "
        "0: plain DPO. Other loss types do not read it (an error)."))
    rpo_alpha: float = Field(0.0, ge=0, description=(
        "Weight of the chosen reply's NLL (mean over the micro-batch's chosen reply tokens) added to the loss (RPO); 0: off."))
    discopop_tau: float = Field(0.05, gt=0, description="DiscoPOP's temperature of the margin modulation (loss_type=discopop).")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapters for the policy (lora.enabled).")

    @model_validator(mode="after")
    def _loss_knobs(self):
        if self.label_smoothing and self.loss_type not in SMOOTHED:
            raise ValueError(f"label_smoothing={self.label_smoothing}: loss_type={self.loss_type} does not use it "
                             f"(only {', '.join(SMOOTHED)}); set it to 0")
        if self.loss_type == "exo_pair" and not self.label_smoothing:
            raise ValueError("loss_type=exo_pair needs label_smoothing > 0 (its epsilon; the EXO paper uses 1e-3)")
        return self


@dataclass
class _Encoded:
    chosen: list      # list of (prompt ids + reply ids)
    rejected: list
    p_len_c: list     # prompt length of each chosen sequence (the reply starts there)
    p_len_r: list

    def pick(self, idx: Sequence[int]) -> tuple[list, list]:
        """Pairs ``idx`` as one batch: the chosen sequences, then the rejected ones, with their
        prompt lengths (one forward over both halves)."""
        seqs = [self.chosen[j] for j in idx] + [self.rejected[j] for j in idx]
        plens = [self.p_len_c[j] for j in idx] + [self.p_len_r[j] for j in idx]
        return seqs, plens


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


def dpo_loss(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0, loss_type: str = "sigmoid",
             nc=None, nr=None, discopop_tau: float = 0.05):
    """Per-pair loss of ``loss_type`` (:data:`LOSS_TYPES`) from the policy's summed reply log-probs
    ``pc``/``pr`` and the reference's ``rc``/``rr`` (``nc``/``nr``: reply token counts, which
    ``ipo`` and ``sigmoid_norm`` average over), and the implicit rewards of chosen and rejected
    replies. Each equals TRL 1.16's ``DPOTrainer`` loss of that name (``sigmoid`` with
    ``label_smoothing``: the conservative-DPO form TRL 1.16 no longer has)."""
    import torch
    import torch.nn.functional as F

    hc, hr = pc - rc, pr - rr            # log-ratios against the reference
    d = hc - hr
    e = label_smoothing
    if loss_type in ("ipo", "sigmoid_norm"):
        if nc is None or nr is None:
            raise ValueError(f"dpo_loss: loss_type={loss_type} needs the reply token counts nc, nr")
        d = hc / nc.clamp(min=1) - hr / nr.clamp(min=1)
    z = beta * d
    if loss_type in ("sigmoid", "sigmoid_norm"):
        loss = -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)
    elif loss_type == "hinge":
        loss = torch.relu(1 - z)
    elif loss_type == "ipo":
        loss = (d - 1 / (2 * beta)) ** 2
    elif loss_type == "exo_pair":   # KL(softmax over {chosen, rejected} || [1-e, e])
        loss = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-e))
                + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(e)))
    elif loss_type == "nca_pair":
        loss = -F.logsigmoid(beta * hc) - 0.5 * F.logsigmoid(-beta * hc) - 0.5 * F.logsigmoid(-beta * hr)
    elif loss_type == "robust":
        loss = (-(1 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1 - 2 * e)
    elif loss_type == "bco_pair":
        loss = -F.logsigmoid(beta * hc) - F.logsigmoid(-beta * hr)
    elif loss_type == "sppo_hard":
        loss = (hc - 0.5 / beta) ** 2 + (hr + 0.5 / beta) ** 2
    elif loss_type == "apo_zero":
        loss = (1 - torch.sigmoid(beta * hc)) + torch.sigmoid(beta * hr)
    elif loss_type == "apo_down":
        loss = torch.sigmoid(beta * hc) + (1 - torch.sigmoid(z))
    elif loss_type == "discopop":
        mix = torch.sigmoid(z / discopop_tau)
        loss = -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; one of {', '.join(LOSS_TYPES)}")
    return loss, beta * hc, beta * hr


def chosen_nll(pc, nc):
    """The RPO term: the chosen replies' negative log-likelihood per token, over all their tokens."""
    return -pc.sum() / nc.sum().clamp(min=1)


def cfg_loss(cfg: DPOConfig, pc, pr, rc, rr, nc, nr):
    """:func:`dpo_loss` with a config's loss type and knobs."""
    return dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.label_smoothing, cfg.loss_type, nc, nr, cfg.discopop_tau)


def preference_metrics(pc, pr, rc, rr, nc, nr, beta: float | DPOConfig) -> dict:
    """Held-out figures: the loss (a config's loss type and RPO term; a bare ``beta``: the sigmoid
    loss), implicit-reward accuracy and margin, and the policy's own preference (mean per-token
    log-prob of chosen > rejected)."""
    if len(pc) == 0:
        return {"pairs": 0}
    cfg = beta if isinstance(beta, DPOConfig) else DPOConfig(beta=beta)
    beta = cfg.beta
    rew_c, rew_r = beta * (pc - rc), beta * (pr - rr)
    margin = rew_c - rew_r
    acc = ((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item()
    per_tok = pc / nc.clamp(min=1) - pr / nr.clamp(min=1)
    loss = cfg_loss(cfg, pc, pr, rc, rr, nc, nr)[0].mean()
    if cfg.rpo_alpha:
        loss = loss + cfg.rpo_alpha * chosen_nll(pc, nc)
    return {"pairs": len(pc), "accuracy": round(acc, 6), "margin": round(margin.mean().item(), 6),
            "reward_chosen": round(rew_c.mean().item(), 6), "reward_rejected": round(rew_r.mean().item(), 6),
            "loss": round(loss.item(), 6),
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
            self.before = preference_metrics(ev[0], ev[1], ev[0], ev[1], ev[2], ev[3], self.cfg)

    def micro_step(self, micro: int) -> Micro:
        import torch

        share = self.share()   # this process's pairs of the micro-batch (all of them in one)
        idx, enc, cfg = share.idx, self.enc_tr, self.cfg
        n = len(idx)
        seqs, plens = enc.pick(idx)
        lp, lens = reply_logps(self.net, seqs, plens, self.pad_id)
        t = torch.tensor(idx)
        ref_c, ref_r = self.ref_tr[0][t].to(lp.device), self.ref_tr[1][t].to(lp.device)
        per_pair, rew_c, rew_r = cfg_loss(cfg, lp[:n], lp[n:], ref_c, ref_r, lens[:n], lens[n:])
        loss = share.mean(per_pair)
        extra = {}
        if cfg.rpo_alpha:   # the NLL is a mean over every chosen reply token of the micro-batch, all processes'
            w = weights_of(share, lp)
            nll_sum, tokens = self.engine.par.sum([float(-(lp[:n].detach() * w).sum()), float((lens[:n] * w).sum())])
            tokens = max(tokens, 1.0)
            loss = loss + cfg.rpo_alpha * (-(lp[:n] * w).sum() / tokens * share.world)
            extra["nll"] = nll_sum / tokens
        with torch.no_grad():
            figures = {"tokens": share.count([len(a) + len(b) for a, b in zip(seqs[:n], seqs[n:])]),
                       "accuracy": share.mean((rew_c > rew_r).float()).item(),
                       "margin": share.mean(rew_c - rew_r).item(), "reward_chosen": share.mean(rew_c).item(),
                       "reward_rejected": share.mean(rew_r).item(), **extra}
        return Micro(loss, figures)

    def held_out(self) -> dict:
        """The held-out figures of the current weights."""
        assert self.enc_ev is not None and self.ref_ev is not None
        cur, ref = self.scores(self.enc_ev), self.ref_ev
        return preference_metrics(cur[0], cur[1], ref[0], ref[1], cur[2], cur[3], self.cfg)

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
        stats["train_after"] = preference_metrics(cur[0], cur[1], ref[0][:k], ref[1][:k], cur[2], cur[3], cfg)
    return TrainResult(model=model, tokenizer=tok, stats=stats, history=done.history, status=done.status)
