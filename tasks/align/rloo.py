"""REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics"), as TRL 1.16's ``RLOOTrainer``
defines it, on GRPO's machinery.

One RLOO step differs from a GRPO step (:mod:`refinery.tasks.align.grpo`) in two places only:

1. **Advantages**: each prompt's ``num_generations`` = k completions are scored by the reward
   functions (and/or a reward model) as in GRPO; with ``beta`` > 0 the reward is penalised by the
   sequence's KL to the reference, ``r_i - beta * sum_t (logp_old - logp_ref)`` (the first-order
   estimate, summed over the completion's tokens: the paper's reward shaping, not GRPO's per-token
   loss term); the baseline of completion i is the mean of the *other* k - 1 (penalised) rewards of
   its group, ``A_i = r_i - (sum_j r_j - r_i) / (k - 1)``. With ``normalize_advantages`` they are
   then standardised over the step's whole batch (every process's groups): ``(A - mean) / (std +
   1e-4)``, the std unbiased, TRL's generation batch with ``steps_per_generation = grad_accum``.
2. **Loss**: sequence-level PPO clipping: ``ratio = exp(sum_t logp - sum_t logp_old)`` over the
   completion's tokens, ``-min(ratio * A, clip(ratio, 1 - clip_range, 1 + clip_range_high) * A)``,
   the mean over completions; no KL term in the loss (it is in the reward).

Everything else is GRPO's, inherited rather than copied: prompts' seeded order, sampling through
the rollout engine (Hugging Face ``generate`` with ``synced_gpus`` under FSDP), reward functions,
the reference (a frozen copy, LoRA's adapters switched off, or none with ``beta=0``), passes over
minibatches weighted by their share of the step's completions, ``num_iterations``, evaluation by the
greedy held-out reward, checkpoints and exact resume, several processes (DDP/FSDP). :func:`rloo_loss`
and :func:`rloo_advantages` equal TRL's on the same batch (tested).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from pydantic import Field

from refinery.tasks.align.grpo import GroupRLConfig, GRPOResult, GRPOTrainer, _Batch, fit_group_trainer


class RLOOConfig(GroupRLConfig):
    """RLOO settings: GRPO's group sampling and passes (:class:`GroupRLConfig`; ``beta`` 0.05 as
    TRL: the weight of the sequence KL subtracted from each reward) and whether the leave-one-out
    advantages are standardised over the step's batch."""

    field_defaults = dict(beta=0.05)

    normalize_advantages: bool = Field(False, description=(
        "Standardise the leave-one-out advantages over the step's batch (all processes): (A - mean) / (std + 1e-4), "
        "TRL's normalize_advantages."))


# --------------------------------------------------------------------------- the pieces
def rloo_advantages(rewards, group: int, seq_kl=None, beta: float = 0.0):
    """Leave-one-out advantages of rewards laid out group after group (k = ``group`` each): the
    reward less ``beta`` times the completion's summed KL (``seq_kl``, when given), minus the mean
    of the other k - 1 penalised rewards of its group. A group's advantages sum to 0."""
    r = rewards if seq_kl is None or beta == 0 else rewards - beta * seq_kl
    g = r.view(-1, group)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group - 1)
    return (g - baseline).reshape(-1)


def normalize(advantages, mean: float | None = None, std: float | None = None):
    """``(A - mean) / (std + 1e-4)``; the mean and (unbiased) std of ``advantages`` unless given
    (a batch spread over several tensors or processes)."""
    m = advantages.mean() if mean is None else mean
    s = advantages.std() if std is None else std
    return (advantages - m) / (s + 1e-4)


def rloo_loss(logp, old_logp, advantages, mask, clip_range: float, clip_range_high: float | None = None):
    """RLOO's loss of a batch of completions (token log-probs (B, T) now and at sampling,
    advantages (B,), mask (B, T)): the clipped objective on the sequence ratio ``exp(sum_t logp -
    sum_t old)``, the mean over the completions; and the per-sequence clipped flags (TRL's region
    clip: below the lower clip with a negative advantage or above the upper with a positive one)."""
    import torch

    hi = clip_range if clip_range_high is None else clip_range_high
    ratio = torch.exp((logp * mask).sum(-1) - (old_logp * mask).sum(-1))
    loss = -torch.min(ratio * advantages, ratio.clamp(1 - clip_range, 1 + hi) * advantages).mean()
    clipped = ((ratio < 1 - clip_range) & (advantages < 0)) | ((ratio > 1 + hi) & (advantages > 0))
    return loss, clipped.detach()


# --------------------------------------------------------------------------- the trainer
class RLOOTrainer(GRPOTrainer):
    """RLOO on the engine: :class:`GRPOTrainer` with leave-one-out advantages of KL-penalised
    rewards (:meth:`advantages`), their optional standardisation over the step (:meth:`step_batches`)
    and the sequence-level clipped loss (:meth:`objective`)."""

    desc = "rloo"

    def __init__(self, model_dir: str, prompts: Sequence[str], columns: Sequence[dict],
                 reward_funcs: dict[str, Callable], cfg: RLOOConfig, seed: int = 0,
                 held_out: tuple[Sequence[str], Sequence[dict]] = ((), ())):
        super().__init__(model_dir, prompts, columns, reward_funcs, cfg, seed, held_out=held_out)
        self.cfg: RLOOConfig = cfg

    def needs_old_logps(self) -> bool:
        # the KL penalty is the policy's at sampling against the reference's
        return self.cfg.beta > 0 or self.cfg.num_iterations > 1

    def advantages(self, rewards, old_logp, ref_logp, c_mask) -> tuple[Any, dict]:
        cfg = self.cfg
        figs: dict = {}
        seq_kl = None
        if cfg.beta and ref_logp is not None:
            seq_kl = ((old_logp - ref_logp) * c_mask).sum(-1).float().cpu()
            figs = {"kl_seq": seq_kl.mean().item(), "reward_penalised": (rewards - cfg.beta * seq_kl).mean().item()}
        return rloo_advantages(rewards, cfg.num_generations, seq_kl, cfg.beta).to(self.device), figs

    def step_batches(self, batches: list[_Batch]) -> None:
        """With ``normalize_advantages``: standardise every batch's advantages by the mean and
        unbiased std of all the step's (every process's: one all-reduce)."""
        if not self.cfg.normalize_advantages:
            return
        n, s1, s2 = self.par.sum([float(sum(len(b.advantages) for b in batches)),
                                  float(sum(b.advantages.double().sum() for b in batches)),
                                  float(sum((b.advantages.double() ** 2).sum() for b in batches))])
        mean = s1 / n
        std = max((s2 - s1 * mean) / max(n - 1, 1.0), 0.0) ** 0.5
        for b in batches:
            b.advantages = normalize(b.advantages, mean, std)

    def objective(self, logp, old, ref, advantages, mask) -> tuple[Any, dict]:
        """:func:`rloo_loss`, the share of completions clipped, and the mean per-token KL to the
        reference (first-order, as TRL logs it; 0 without a reference)."""
        cfg = self.cfg
        loss, clipped = rloo_loss(logp, old, advantages, mask, cfg.clip_range, cfg.clip_range_high)
        kl = 0.0
        if ref is not None:
            kl = float(((logp.detach() - ref) * mask).sum() / mask.sum().clamp(min=1))
        return loss, {"kl": kl, "clipfrac": float(clipped.float().mean())}


def train_rloo(model_dir: str, prompts: Sequence[str], columns: Sequence[dict], reward_funcs: dict[str, Callable],
               cfg: RLOOConfig, seed: int = 0, held_out: tuple[Sequence[str], Sequence[dict]] = ((), ()),
               on_step: Callable[[dict], None] | None = None, progress: bool = False,
               log_dir: str | os.PathLike | None = None, ckpt_dir: str | os.PathLike | None = None,
               stop_after: int | None = None) -> GRPOResult:
    """Run ``cfg.max_steps`` RLOO steps on the engine; arguments and result as
    :func:`refinery.tasks.align.grpo.train_grpo` (prompts, their columns for the reward functions,
    held-out prompts for the greedy reward, checkpoints and resume in ``ckpt_dir``)."""
    trainer = RLOOTrainer(model_dir, prompts, columns, reward_funcs, cfg, seed, held_out=held_out)
    return fit_group_trainer(trainer, cfg, "RLOO", on_step=on_step, progress=progress, log_dir=log_dir,
                             ckpt_dir=ckpt_dir, stop_after=stop_after)


__all__ = ["RLOOConfig", "RLOOTrainer", "normalize", "rloo_advantages", "rloo_loss", "train_rloo"]
