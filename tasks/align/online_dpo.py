"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"), our own
loop on the one training engine, laid out as TRL 1.16's ``OnlineDPOTrainer``.

One online-DPO micro-batch, readable top to bottom:

1. **Sample a pair**: for each of this process's prompts, two completions from the *current*
   policy (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``) by GRPO's
   :meth:`~refinery.tasks.align.grpo.GRPOTrainer.generate`: the rollout engine
   (:func:`refinery.tasks.rollout.sample`: batched, KV cache) on one process or DDP; under FSDP,
   where every process must make the same forwards, ``generate`` on the sharded policy
   (:func:`refinery.tasks.align.ppo.generating`). A completion ends at its first EOS.
2. **Rank**: the reward functions (and/or a reward model) score both completions
   (:func:`refinery.tasks.align.rewards.score`, as GRPO); ``missing_eos_penalty`` is taken off the
   score of a completion that ran out of tokens before its EOS. The better one is ``chosen``, the
   other ``rejected`` (:func:`rank_pairs`). **Ties** are kept with the first sample chosen, as TRL
   does (``first >= second``); ``skip_ties`` leaves tied pairs out of the loss instead (with 0/1
   rewards such as ``exact_match`` most pairs tie, and a tie's "preference" is a coin flip).
3. **DPO loss** against the reference: :func:`refinery.tasks.align.dpo.dpo_loss` (``loss_type``:
   every DPO loss type, ``beta``, ``label_smoothing``) of the summed completion log-probs
   ``log pi(y|x)`` of the policy and of the reference, which is a frozen copy of the starting
   policy (with LoRA: the same model with its adapters off, no second copy), as GRPO keeps it.
   Log-probs are the model's own (no temperature scaling), as TRL's. ``ipo`` averages the
   log-ratios over each completion's tokens, as our DPO and TRL's ``DPOTrainer`` do (TRL's
   ``OnlineDPOTrainer`` sums them; the two agree on one-token replies).

Each step makes ``grad_accum`` such micro-batches (each samples its own pairs, as TRL's
gradient-accumulation steps do) and one optimizer update. The engine owns the schedule, clipping,
early stopping on the held-out greedy reward (GRPO's :meth:`evaluate`, best weights restored),
checkpoints and resume: the prompt order's position and the batches sampled are in the
checkpoint and batch ``k`` of process ``r`` is sampled from generators seeded by ``(seed, r, k)``
(:func:`refinery.tasks.align.ppo.seed_rollout`), so a resumed run samples what the uninterrupted
one would have. On ``devices`` processes each samples the pairs of ``batch_size / devices`` prompts;
the loss is the mean over the whole batch's pairs (kept pairs: over every process's), so the
averaged gradient is the one-process one.

Logged every step: the mean reward of all completions (``reward``, and each function's), the
scores of the chosen and rejected completions and their margin (``reward_chosen``,
``reward_rejected``, ``reward_margin``: the scores that ranked them, penalty included), the DPO
implicit rewards' ``margin`` and ``accuracy``, ``kl`` (summed log-ratio of a completion, averaged:
TRL's ``objective/kl``), the share of tied pairs and of completions with an EOS, the rollout
throughput ``rollout_tokens_per_s`` and ``gen_share``, the share of the step's time spent generating.

The prompt data, reward plumbing, model loading, held-out evaluation and checkpointed state are
GRPO's (:class:`OnlineDPOTrainer` is a :class:`refinery.tasks.align.grpo.GRPOTrainer` with its own
step); the loss is DPO's. Our own rather than TRL's trainer for the reasons GRPO gives.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from pydantic import Field, field_validator, model_validator

from refinery.tasks.align.common import LoraSettings, SamplingParams
from refinery.tasks.align.dpo import LOSS_TYPES, SMOOTHED, LossType, dpo_loss
from refinery.tasks.align.grpo import GRPOResult, GRPOTrainer, _token_logps
from refinery.tasks.align.ppo import path_or_none, rl_stats, seed_rollout, warm_root
from refinery.tasks.engine.trainer import Engine, Micro
from refinery.tasks.train.config import ParallelParams, ScheduleParams


class OnlineDPOConfig(ScheduleParams, ParallelParams, SamplingParams):
    """Online DPO settings. ``max_steps`` counts optimizer updates, each over ``grad_accum``
    sampled batches of ``batch_size`` prompts times 2 completions; ``lr`` 5e-6 (DPO's: a pretrained
    policy; no new layer, so ``head_lr`` is unused). On ``devices`` processes each samples the pairs
    of ``batch_size / devices`` prompts of every batch."""

    field_defaults = dict(max_steps=20, lr=5e-6, batch_size=4, dtype="float32", max_prompt_len=128, max_new_tokens=64)

    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL constraint (higher: stay closer to the reference).")
    loss_type: LossType = Field("sigmoid", description="The preference loss of the log-ratios (TRL's names, as dpo.loss_type):",
                                json_schema_extra={"choices": LOSS_TYPES})
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description=(
        "Assumed share of flipped labels: sigmoid, robust, exo_pair (its epsilon, > 0); other loss types do not read it."))
    discopop_tau: float = Field(0.05, gt=0, description="DiscoPOP's temperature of the margin modulation (loss_type=discopop).")
    skip_ties: bool = Field(False, description=(
        "Leave pairs whose two completions scored the same out of the loss; false (TRL's way): a tie keeps the pair, "
        "the first sample chosen."))
    missing_eos_penalty: float | None = Field(None, ge=0, description=(
        "Taken off the score of a completion that reached max_new_tokens without EOS, before ranking (TRL's); empty: none."))
    reward_funcs: list[str] = Field(default_factory=lambda: ["exact_match"], description=(
        "Reward functions ranking the two completions: built-ins exact_match (numeric answer vs the record's 'answer'), "
        "format ('#### N' present), number (any number), length (shorter is better), or module:function "
        "(called as f(prompts, completions, **columns) -> list of floats). With reward_model set, the "
        "model's score is added as 'reward_model'."))
    reward_weights: list[float] | None = Field(None, description="Weight of each reward function, in order (empty: 1 each).")
    mini_batch_size: int = Field(16, ge=1, description="Held-out prompts per greedy generation batch at validation.")
    eval_max_new_tokens: int | None = Field(None, ge=1, description="Longest greedy completion at validation; empty = max_new_tokens.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapters for the policy (lora.enabled).")

    @property
    def num_generations(self) -> int:
        """Completions per prompt: a pair (what GRPO's machinery reads as its group size)."""
        return 2

    @property
    def max_len(self) -> int:
        """The longest sequence a forward sees: prompt plus completion (the memory plan reads it)."""
        return self.max_prompt_len + self.max_new_tokens

    # the command line gives lists as "a,b" (as GRPO's settings)
    @field_validator("reward_funcs", mode="before")
    @classmethod
    def _split_funcs(cls, v: Any) -> Any:
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    @field_validator("reward_weights", mode="before")
    @classmethod
    def _split_weights(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [float(x) for x in v.split(",") if x.strip()] if v.strip() else None
        return v

    @model_validator(mode="after")
    def _check(self):
        if not self.reward_funcs:
            raise ValueError("reward_funcs: at least one")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights: {len(self.reward_weights)} weights for {len(self.reward_funcs)} reward_funcs")
        if self.label_smoothing and self.loss_type not in SMOOTHED:
            raise ValueError(f"label_smoothing={self.label_smoothing}: loss_type={self.loss_type} does not use it "
                             f"(only {', '.join(SMOOTHED)}); set it to 0")
        if self.loss_type == "exo_pair" and not self.label_smoothing:
            raise ValueError("loss_type=exo_pair needs label_smoothing > 0 (its epsilon; the EXO paper uses 1e-3)")
        if self.devices > 1 and self.batch_size % self.devices:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of devices={self.devices} "
                             "(each process samples the pairs of an equal part of the prompts)")
        return self


# --------------------------------------------------------------------------- the pieces
def rank_pairs(scores, n: int):
    """Chosen and rejected indices of ``n`` pairs whose ``2n`` scores are laid out as TRL samples
    them (the first completion of every prompt, then the second): pair ``i`` is ``(i, i + n)``, the
    higher score chosen, a tie choosing the first (TRL's ``first >= second``). Also whether each
    pair tied."""
    import torch

    first, second = scores[:n], scores[n:]
    first_wins = first >= second
    at = torch.arange(n)
    chosen = torch.where(first_wins, at, at + n)
    rejected = torch.where(first_wins, at + n, at)
    return chosen, rejected, first == second


def has_eos(comp, c_mask, eos_id: int | None):
    """Whether each completion (ids (B, T), mask (B, T)) ended with its EOS rather than running out of tokens."""
    import torch

    if eos_id is None:
        return torch.zeros(len(comp), dtype=torch.bool)
    return ((comp == eos_id) & c_mask.bool()).any(-1).cpu()


@dataclass
class Pairs:
    """One batch's pairs: their DPO losses (per pair), chosen and rejected indices into the ``2n``
    completions, ties, the ranking scores (penalty included), and each completion's summed policy
    and reference log-probs and token count."""

    losses: Any
    chosen: Any
    rejected: Any
    tie: Any
    scores: Any
    sums: Any
    ref_sums: Any
    lens: Any
    rewards_chosen: Any     # beta * (log-ratio of the chosen completion): the implicit rewards
    rewards_rejected: Any

    def figures(self) -> dict:
        """The pairs' figures for the step's row (TRL's ``rewards/*``, ``logps/*``, ``objective/kl`` ...)."""
        import torch

        with torch.no_grad():
            s, c, r = self.scores, self.chosen, self.rejected
            at_c, at_r = c.to(self.sums.device), r.to(self.sums.device)
            return {"reward_chosen": s[c].mean().item(), "reward_rejected": s[r].mean().item(),
                    "reward_margin": (s[c] - s[r]).mean().item(),
                    "margin": (self.rewards_chosen - self.rewards_rejected).mean().item(),
                    "accuracy": (self.rewards_chosen > self.rewards_rejected).float().mean().item(),
                    "logps_chosen": self.sums[at_c].mean().item(), "logps_rejected": self.sums[at_r].mean().item(),
                    "kl": (self.sums - self.ref_sums).mean().item(), "ties": self.tie.float().mean().item(),
                    "completion_len": self.lens.mean().item()}


def pair_loss(scores, eos, logp, ref_logp, c_mask, cfg: OnlineDPOConfig) -> Pairs:
    """The DPO losses of ``n`` sampled pairs from the ``2n`` completions' scores (laid out as
    :func:`rank_pairs` reads them), whether each ended with EOS, and the policy's and reference's
    token log-probs (``(2n, T)``, ``c_mask`` the completion tokens): ``missing_eos_penalty`` off the
    scores of completions without EOS, the pairs ranked, :func:`dpo_loss` of the summed log-probs
    (the token counts for the loss types that average over them)."""
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * (~eos).float()
    chosen, rejected, tie = rank_pairs(scores, len(scores) // 2)
    sums, ref_sums, lens = (logp * c_mask).sum(-1), (ref_logp * c_mask).sum(-1), c_mask.sum(-1)
    c, r = chosen.to(logp.device), rejected.to(logp.device)
    losses, rew_c, rew_r = dpo_loss(sums[c], sums[r], ref_sums[c], ref_sums[r], cfg.beta, cfg.label_smoothing,
                                    cfg.loss_type, lens[c], lens[r], cfg.discopop_tau)
    return Pairs(losses, chosen, rejected, tie, scores, sums.detach(), ref_sums, lens, rew_c.detach(), rew_r.detach())


def process_mean(losses, keep, kept_all: float, world: int):
    """This process's part of the mean loss of the kept pairs of every process (``kept_all`` of
    them): its kept losses summed over the average kept per process, so that gradient averaging
    over the ``world`` processes gives the one-process mean. No pair kept anywhere: zero (with the
    graph, so every process still runs its backward)."""
    if not kept_all:
        return losses.sum() * 0.0
    return (losses * keep).sum() / (kept_all / world)


class OnlineDPOTrainer(GRPOTrainer):
    """Online DPO as the engine runs it: GRPO's policy, reference, reward functions, prompt order
    and held-out evaluation, with a step of its own: every micro-batch samples a pair per prompt
    from the current policy, ranks it and takes the DPO loss of the pairs (:meth:`micro_step`)."""

    desc = "online_dpo"
    metric, mode = "reward", "max"           # early stopping on the held-out greedy reward
    show = ("reward", "margin")
    panels: tuple[str, ...] = ("reward", "reward_margin", "margin", "kl")  # type: ignore[assignment]
    train_mode = False                       # no dropout: policy and reference log-probs compare

    cfg: OnlineDPOConfig  # type: ignore[assignment]  # online DPO's settings in place of GRPO's

    def __init__(self, model_dir: str, prompts: Sequence[str], columns: Sequence[dict],
                 reward_funcs: dict[str, Callable], cfg: OnlineDPOConfig, seed: int = 0,
                 held_out: tuple[Sequence[str], Sequence[dict]] = ((), ())):
        # GRPO's set-up reads the config's sampling, reward, LoRA and beta settings, which ours has
        super().__init__(model_dir, prompts, columns, reward_funcs, cfg, seed, held_out=held_out)  # type: ignore[arg-type]

    # -- what the engine asks
    def setup(self) -> None:
        import torch

        if self.cfg.batch_size % self.par.world:   # several nodes too
            raise ValueError(f"online_dpo: batch_size={self.cfg.batch_size} must be a multiple of the {self.par.world} "
                             "processes (each samples the pairs of an equal part of the prompts)")
        one = torch.ones((1, 1), dtype=torch.long, device=self.device)
        warm_root(self.par, lambda: self.model(input_ids=one * (self.tokenizer.pad_token_id or 0), attention_mask=one))

    def updates_per_step(self) -> int:
        return 1

    def accum(self) -> int:
        return self.cfg.grad_accum

    def micro_step(self, micro: int) -> Micro:
        import torch

        cfg, par = self.cfg, self.par
        if micro == 0:   # the step begins: its generation time and tokens (GRPO's generate adds to them)
            self.step_start, self.gen_seconds, self.gen_tokens = time.perf_counter(), 0.0, 0
        seed_rollout(self.seed, par.rank, self.rollouts.done)
        idx = par.part(self.order.take(cfg.batch_size))
        self.rollouts.done += 1
        prompts, cols = [self.prompts[i] for i in idx], [self.columns[i] for i in idx]
        n = len(prompts)
        ids, mask, P, comp, c_mask, texts = self.generate(prompts + prompts)   # TRL's layout: sample 1s, then 2s
        raw, parts = self.rewards(prompts + prompts, texts, cols + cols)
        eos = has_eos(comp, c_mask, self.eos_id)
        logp = _token_logps(self.engine.train_model, ids, mask, P, comp, 1.0)
        with torch.no_grad():
            ref_logp = self._reference_logps(ids, mask, P, comp)
        pr = pair_loss(torch.tensor(raw, dtype=torch.float32), eos, logp, ref_logp, c_mask, cfg)
        keep = (~pr.tie if cfg.skip_ties else torch.ones(n, dtype=torch.bool)).to(pr.losses.device)
        (kept,) = par.sum([float(keep.sum())])   # every process's pairs: the loss is their mean
        loss = process_mean(pr.losses, keep, kept, par.world)
        figs = {"reward": sum(raw) / len(raw), **{f"reward_{k}": sum(v) / len(v) for k, v in parts.items()},
                **pr.figures(), "eos": eos.float().mean().item(), "tokens": int(mask.sum())}
        return Micro(loss, figs)

    def after_step(self, figures: dict) -> None:
        """The step's rollout throughput over all its micro-batches' sampling, and (GRPO's) the share
        of its wall time spent generating."""
        figures["rollout_tokens_per_s"] = self.gen_tokens / self.gen_seconds if self.gen_seconds > 0 else 0.0
        super().after_step(figures)

    def _reference_logps(self, ids, mask, P, comp):
        """The reference's token log-probs: the frozen copy, or the policy with its adapters off (LoRA)."""
        import contextlib

        if self.ref is not None:
            return _token_logps(self.ref, ids, mask, P, comp, 1.0)
        ctx = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else contextlib.nullcontext()
        with ctx:
            return _token_logps(self.model, ids, mask, P, comp, 1.0)


def train_online_dpo(model_dir: str, prompts: Sequence[str], columns: Sequence[dict],
                     reward_funcs: dict[str, Callable], cfg: OnlineDPOConfig, seed: int = 0,
                     held_out: tuple[Sequence[str], Sequence[dict]] = ((), ()),
                     on_step: Callable[[dict], None] | None = None, progress: bool = False,
                     log_dir: str | os.PathLike | None = None, ckpt_dir: str | os.PathLike | None = None,
                     stop_after: int | None = None) -> GRPOResult:
    """Run ``cfg.max_steps`` online-DPO steps on the engine over a seeded shuffle of ``prompts``
    (rendered prompt texts; ``columns``: each prompt's other columns, passed to the reward
    functions), as :func:`refinery.tasks.align.grpo.train_grpo` runs GRPO: held-out greedy reward
    every ``eval_every`` steps, metrics in ``log_dir`` (default ``ckpt_dir/metrics``), checkpoints in
    ``ckpt_dir`` and resume from the newest, ``stop_after`` to stop after a step."""
    trainer = OnlineDPOTrainer(model_dir, prompts, columns, reward_funcs, cfg, seed, held_out=held_out)
    res = Engine(trainer, cfg, total=cfg.max_steps, device=trainer.device, ckpt_dir=path_or_none(ckpt_dir),
                 metrics_dir=path_or_none(log_dir), progress=progress, on_row=on_step, stop_after=stop_after,
                 title="Online DPO").fit()
    stats = rl_stats(res, cfg.max_steps, trainer.mem, trainer.model, keys=("reward_margin", "margin", "accuracy"))
    return GRPOResult(model=trainer.model, tokenizer=trainer.tokenizer, history=res.history, stats=stats)


__all__ = ["OnlineDPOConfig", "OnlineDPOTrainer", "Pairs", "has_eos", "pair_loss", "process_mean", "rank_pairs",
           "train_online_dpo"]
