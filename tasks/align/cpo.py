"""Reference-free preference optimisation on pairs: CPO (Xu et al. 2024, Contrastive Preference
Optimization) and SimPO (Meng et al. 2024, Simple Preference Optimization), on the one training loop
(:class:`refinery.tasks.engine.trainer.Engine`, as :class:`refinery.tasks.align.common.OfflineMethod`).

Neither keeps or scores a reference model: the implicit reward of a reply is ``beta`` times the
policy's own log-probability of it, summed over the reply tokens (CPO's ``sigmoid`` and ``hinge``)
or averaged over them (``ipo``, and ``simpo``: length-normalised, so long replies gain nothing).
With ``m = logp(chosen) - logp(rejected)``:

- ``sigmoid``: ``-log sigmoid(beta * m)`` (with ``label_smoothing`` e: ``(1-e) * that + e * -log sigmoid(-beta * m)``);
- ``hinge``: ``relu(1 - beta * m)``; ``ipo``: ``(m - 1/(2 beta))^2``;
- ``simpo``: ``-log sigmoid(beta * m - gamma)``, a target margin ``gamma`` (TRL's ``simpo_gamma``);

plus ``cpo_alpha`` times the NLL of the chosen reply (a mean over the micro-batch's chosen reply
tokens, all processes' together), CPO's behaviour-cloning term. ``method=cpo`` is TRL's
``CPOTrainer`` (``loss_type``, ``cpo_alpha`` 1); ``method=simpo`` is SimPO as its authors run it
(TRL: ``CPOTrainer`` with ``loss_type="simpo"``, ``cpo_alpha=0``; beta 2, gamma 1). :func:`pair_loss`
equals TRL 1.16's ``CPOTrainer.cpo_loss``, :func:`reply_logps`'s sums and means its
``get_batch_logps`` and :func:`chosen_nll` its NLL term on the same batch (tested).

Memory: one model, no reference pass (as ORPO). Held-out figures before, every ``eval_every`` steps
and after: the loss (the early-stopping metric), the share of pairs whose chosen reply has the
higher reward (accuracy) and the mean reward margin.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

from pydantic import Field, model_validator

from refinery.tasks.align.common import (OfflineMethod, OfflineParams, LoraSettings, TrainResult, load_policy, run_stats,
                                         total_steps, weights_of)
from refinery.tasks.align.data import PreferencePair
from refinery.tasks.align.dpo import encode_pairs, reply_logps
from refinery.tasks.engine.trainer import INTERRUPTED, Micro

# loss type -> one line for the help (``refinery run align --help``)
LOSS_TYPES: dict[str, Any] = {
    "sigmoid": "-log sigmoid(beta * margin) of summed reply log-probs, the CPO paper's (label_smoothing: conservative).",
    "hinge": "relu(1 - beta * margin) of summed reply log-probs (SLiC).",
    "ipo": "(margin - 1/(2 beta))^2 of per-token mean log-probs (IPO without a reference).",
    "simpo": "-log sigmoid(beta * margin - simpo_gamma) of per-token mean log-probs (SimPO; with cpo_alpha: CPO-SimPO).",
}
AVERAGED = ("ipo", "simpo")            # rewards from mean per-token log-probs
SMOOTHED = ("sigmoid", "simpo")        # the loss types that read label_smoothing


@dataclass(frozen=True)
class PairLoss:
    """One reference-free pair loss: its type and knobs (see the module docstring)."""

    loss_type: str
    beta: float
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.0
    cpo_alpha: float = 0.0


class _RefFreeConfig(OfflineParams):
    field_defaults = dict(max_steps=0, lr=5e-6, batch_size=8, dtype="float32")

    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description=(
        "Assumed share of flipped labels (conservative loss; loss types sigmoid and simpo); 0: off."))
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapters for the policy (lora.enabled).")

    def pair_loss(self) -> PairLoss:
        raise NotImplementedError


class CPOConfig(_RefFreeConfig):
    """CPO settings (TRL's ``CPOConfig`` names). ``lr`` 5e-6, as DPO: a whole pretrained policy, no
    new layer (``head_lr`` unused). Early stopping watches the held-out loss."""

    loss_type: Literal["sigmoid", "hinge", "ipo", "simpo"] = Field(
        "sigmoid", description="The preference loss of the policy's own log-probs (TRL's names):",
        json_schema_extra={"choices": LOSS_TYPES})
    beta: float = Field(0.1, gt=0, description="Scale of the implicit reward beta * log-prob (ipo: its tau).")
    cpo_alpha: float = Field(1.0, ge=0, description="Weight of the chosen reply's NLL (CPO's behaviour cloning term); 0: none.")
    simpo_gamma: float = Field(0.5, ge=0, description="Target reward margin of loss_type=simpo.")

    @model_validator(mode="after")
    def _loss_knobs(self):
        if self.label_smoothing and self.loss_type not in SMOOTHED:
            raise ValueError(f"label_smoothing={self.label_smoothing}: loss_type={self.loss_type} does not use it "
                             f"(only {', '.join(SMOOTHED)}); set it to 0")
        return self

    def pair_loss(self) -> PairLoss:
        return PairLoss(self.loss_type, self.beta, self.label_smoothing, self.simpo_gamma, self.cpo_alpha)


class SimPOConfig(_RefFreeConfig):
    """SimPO settings: the paper's beta 2 and target margin 1 (gamma / beta = 0.5), no NLL term
    (for CPO-SimPO: ``method=cpo`` with ``cpo.loss_type=simpo``). ``lr`` 5e-6."""

    beta: float = Field(2.0, gt=0, description="Scale of the length-normalised reward beta * mean log-prob (the paper: 2 to 2.5).")
    gamma: float = Field(1.0, ge=0, description="Target reward margin (TRL's simpo_gamma; the paper: gamma / beta about 0.5).")

    def pair_loss(self) -> PairLoss:
        return PairLoss("simpo", self.beta, self.label_smoothing, self.gamma, 0.0)


def pair_logps(sums, counts, loss_type: str):
    """The log-probs a loss type compares: summed over the reply tokens, or their mean."""
    return sums / counts.clamp(min=1) if loss_type in AVERAGED else sums


def pair_loss(chosen, rejected, spec: PairLoss):
    """Per-pair loss and the rewards ``beta * logp`` of chosen and rejected replies (``chosen``,
    ``rejected``: the log-probs :func:`pair_logps` gives for the loss type)."""
    import torch
    import torch.nn.functional as F

    b, e = spec.beta, spec.label_smoothing
    m = chosen - rejected
    if spec.loss_type in ("sigmoid", "simpo"):
        z = b * m - (spec.simpo_gamma if spec.loss_type == "simpo" else 0.0)
        loss = -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)
    elif spec.loss_type == "hinge":
        loss = torch.relu(1 - b * m)
    elif spec.loss_type == "ipo":
        loss = (m - 1 / (2 * b)) ** 2
    else:
        raise ValueError(f"unknown CPO loss_type {spec.loss_type!r}; one of {', '.join(LOSS_TYPES)}")
    return loss, b * chosen, b * rejected


def chosen_nll(sums, counts):
    """The NLL term: cross-entropy per token over all chosen reply tokens of the batch."""
    return -sums.sum() / counts.sum().clamp(min=1)


def evaluate_pairs(model, enc, pad_id: int, spec: PairLoss, batch_size: int) -> dict:
    """Held-out figures of encoded pairs: loss, accuracy, reward margin, mean reply log-probs."""
    import torch

    if not enc.chosen:
        return {"pairs": 0}
    cols: list[list] = [[], [], [], []]
    with torch.no_grad():
        for i in range(0, len(enc.chosen), batch_size):
            sl = slice(i, i + batch_size)
            c, nc = reply_logps(model, enc.chosen[sl], enc.p_len_c[sl], pad_id)
            r, nr = reply_logps(model, enc.rejected[sl], enc.p_len_r[sl], pad_id)
            for col, v in zip(cols, (c, nc, r, nr)):
                col.append(v.float().cpu())
    c, nc, r, nr = (torch.cat(col) for col in cols)
    per_pair, rew_c, rew_r = pair_loss(pair_logps(c, nc, spec.loss_type), pair_logps(r, nr, spec.loss_type), spec)
    loss = per_pair.mean() + (spec.cpo_alpha * chosen_nll(c, nc) if spec.cpo_alpha else 0.0)
    margin = rew_c - rew_r
    return {"pairs": len(c), "loss": round(float(loss), 6),
            "accuracy": round(((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item(), 6),
            "margin": round(margin.mean().item(), 6), "nll": round(float(chosen_nll(c, nc)), 6)}


FIGURES = ("loss", "accuracy", "margin")   # the held-out figures logged as validation rows


class RefFreeMethod(OfflineMethod):
    """CPO or SimPO on the engine: the loss of a micro-batch of pairs (chosen and rejected in one
    forward), no reference; held-out loss (the early-stopping metric), accuracy and margin."""

    cfg: _RefFreeConfig

    show, panels = ("loss", "accuracy"), FIGURES

    def __init__(self, model, tokenizer, train: Sequence[PreferencePair], held_out: Sequence[PreferencePair],
                 cfg: _RefFreeConfig, seed: int, name: str = "cpo"):
        super().__init__(cfg, model, len(train), seed)
        self.desc, self.title = name, {"cpo": "CPO", "simpo": "SimPO"}.get(name, name)
        self.spec = cfg.pair_loss()
        self.pad_id = tokenizer.pad_token_id
        self.enc_tr = encode_pairs(tokenizer, train, cfg.max_prompt_len, cfg.max_len)
        self.enc_ev = encode_pairs(tokenizer, held_out, cfg.max_prompt_len, cfg.max_len)
        self.before: dict = {"pairs": 0}

    def held_out(self) -> dict:
        """The held-out figures of the current weights."""
        return evaluate_pairs(self.net, self.enc_ev, self.pad_id, self.spec, self.cfg.eval_batch_size)

    def setup(self) -> None:
        self.before = self.held_out()

    def micro_step(self, micro: int) -> Micro:
        import torch

        share = self.share()   # this process's pairs of the micro-batch (all of them in one)
        idx, enc, spec = share.idx, self.enc_tr, self.spec
        n = len(idx)
        seqs, plens = enc.pick(idx)
        sums, lens = reply_logps(self.net, seqs, plens, self.pad_id)
        lp = pair_logps(sums, lens, spec.loss_type)
        per_pair, rew_c, rew_r = pair_loss(lp[:n], lp[n:], spec)
        loss = share.mean(per_pair)
        # the NLL is a mean over every chosen reply token of the micro-batch, all processes' together
        w = weights_of(share, sums)
        nll_sum, tokens = self.engine.par.sum([float(-(sums[:n].detach() * w).sum()), float((lens[:n] * w).sum())])
        tokens = max(tokens, 1.0)
        if spec.cpo_alpha:
            loss = loss + spec.cpo_alpha * (-(sums[:n] * w).sum() / tokens * share.world)
        with torch.no_grad():
            figures = {"tokens": share.count([len(a) + len(b) for a, b in zip(seqs[:n], seqs[n:])]),
                       "accuracy": share.mean((rew_c > rew_r).float()).item(),
                       "margin": share.mean(rew_c - rew_r).item(), "nll": nll_sum / tokens}
        return Micro(loss, figures)

    def validate(self) -> dict | None:
        if not self.enc_ev.chosen:
            return None
        m = self.before if self.untouched() else self.held_out()
        return {k: m[k] for k in FIGURES}


def _train(name: str, model_dir: str, train: Sequence[PreferencePair], held_out: Sequence[PreferencePair],
           cfg: _RefFreeConfig, seed: int, on_step, progress: bool, log_dir, ckpt_dir, stop_after) -> TrainResult:
    if not train:
        raise ValueError(f"{name}: no training pairs")
    tok, model, device, mem = load_policy(model_dir, cfg, seed)
    total = total_steps(len(train), cfg, cfg.epochs)
    method = RefFreeMethod(model, tok, train, held_out, cfg, seed, name)
    done = method.fit(total, device, ckpt_dir=ckpt_dir, log_dir=log_dir, progress=progress, on_step=on_step,
                      stop_after=stop_after)
    stats = {"train_pairs": len(train), "held_out_pairs": len(held_out), "held_out_before": method.before,
             "loss_type": method.spec.loss_type, **run_stats(done, total, mem, model)}
    if done.status not in INTERRUPTED:
        stats["held_out_after"] = method.held_out()
    return TrainResult(model=model, tokenizer=tok, stats=stats, history=done.history, status=done.status)


def train_cpo(model_dir: str, train: Sequence[PreferencePair], held_out: Sequence[PreferencePair], cfg: CPOConfig,
              seed: int = 0, on_step: Callable[[dict], None] | None = None, progress: bool = False,
              log_dir: str | os.PathLike | None = None, ckpt_dir: str | os.PathLike | None = None,
              stop_after: int | None = None) -> TrainResult:
    """CPO of the model in ``model_dir`` on ``train`` pairs; held-out figures before, every
    ``eval_every`` steps, and after. Metrics, checkpoints and resume as in
    :func:`refinery.tasks.align.dpo.train_dpo`."""
    return _train("cpo", model_dir, train, held_out, cfg, seed, on_step, progress, log_dir, ckpt_dir, stop_after)


def train_simpo(model_dir: str, train: Sequence[PreferencePair], held_out: Sequence[PreferencePair], cfg: SimPOConfig,
                seed: int = 0, on_step: Callable[[dict], None] | None = None, progress: bool = False,
                log_dir: str | os.PathLike | None = None, ckpt_dir: str | os.PathLike | None = None,
                stop_after: int | None = None) -> TrainResult:
    """SimPO of the model in ``model_dir`` on ``train`` pairs (as :func:`train_cpo`)."""
    return _train("simpo", model_dir, train, held_out, cfg, seed, on_step, progress, log_dir, ckpt_dir, stop_after)


__all__ = ["CPOConfig", "SimPOConfig", "PairLoss", "RefFreeMethod", "LOSS_TYPES", "pair_logps", "pair_loss",
           "chosen_nll", "evaluate_pairs", "train_cpo", "train_simpo"]
