"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath), our own loop.

One GRPO step, readable top to bottom:

1. **Sample a group**: for each of ``batch_size`` prompts, ``num_generations`` completions from
   the policy (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``) through the rollout engine
   (:mod:`refinery.tasks.rollout`; FSDP: ``generate``); a completion ends at its first EOS. Each
   step logs the rollout's tokens/s (``rollout_tokens_per_s``) and the share of the step's wall
   time spent generating (``gen_share``).
2. **Score**: each reward function (plain Python callables named in ``reward_funcs``, see
   :mod:`refinery.tasks.align.rewards`, or a reward model) gives one number per completion; the
   reward is their weighted sum.
3. **Group-relative advantages**: ``A_i = (r_i - mean(group)) / (std + 1e-4)``, the std the
   group's (``scale_rewards=group``), the whole batch's (``batch``) or none (``none``: only the
   mean is subtracted); no value model, the group is the baseline. With ``dynamic_sampling`` the
   groups whose rewards are all equal (advantages 0: nothing to learn but the KL) leave the batch.
4. **Optimise** (``num_iterations`` passes): per token, the clipped objective
   ``-min(ratio * A, clip(ratio, 1-eps_low, 1+eps_high) * A)`` with ``ratio = pi / pi_old``
   (``clip_range``, ``clip_range_high``), plus ``beta * KL`` to the reference with the unbiased
   estimator ``exp(ref - logp) - (ref - logp) - 1``, normalised as ``loss_type`` says
   (:data:`LOSS_TYPES`: per completion then over completions, over tokens, over a constant, or over
   every token of the step); :func:`grpo_loss` equals TRL 1.16's loss of each type on the same
   batch (tested).

The reference is a frozen copy of the starting policy (with LoRA: the same model with its
adapters disabled, no second copy; with ``beta=0`` none is kept). Dropout is off (eval mode).

The run is a :class:`refinery.tasks.engine.trainer.Method` on the one training loop
(:class:`refinery.tasks.engine.trainer.Engine`): one step samples ``grad_accum`` batches inside its
first micro-batch, then makes ``num_iterations`` optimizer updates (``updates_per_step``), each a
pass over the batches' minibatches of ``mini_batch_size`` completions, each weighted by its share
of the step's completions (``dapo``: its token sum over the step's token count). The engine owns warm-up + schedule, clipping, early stopping on the mean reward of
greedy completions to held-out prompts (the best weights restored), checkpoints and resume (the
prompt order's position and the rollouts done are in the checkpoint; the sampling of step ``k``
on process ``r`` is seeded by ``(seed, r, k)``). On several processes (``devices``, DDP or FSDP)
each samples and scores whole groups for its part of every batch's prompts, computes their
advantages itself, and the gradient average over the processes is the one-process update of the
whole batch; the figures are averaged over the processes. Under FSDP every forward is a
collective, so every process makes the same number of them: equal parts of each batch, ``generate``
with ``synced_gpus`` (:func:`refinery.tasks.align.ppo.generating`), held-out parts padded to one
length; the reference is the sharded policy with its adapters off (LoRA) or a whole frozen copy on
every process.

RLOO (:mod:`refinery.tasks.align.rloo`) is this trainer with other advantages and loss: the hooks
:meth:`GRPOTrainer.advantages`, :meth:`GRPOTrainer.step_batches` and :meth:`GRPOTrainer.objective`.

Our own rather than TRL's ``GRPOTrainer``: it runs inside our stages (cached by fingerprint,
metrics through :mod:`refinery.tasks.train.metrics`), takes our parameter names, and needs neither
``datasets`` nor ``accelerate`` at run time.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence, cast

from pydantic import Field, field_validator, model_validator

from refinery.tasks.align.common import (SamplingParams, LoraSettings, apply_lora, load_tokenizer, pick_device,
                                         position_ids, seed_everything, torch_dtype)
from refinery.tasks.align.ppo import (Rollouts, padded_part, path_or_none, raise_if_interrupted, rl_stats, rollout_params,
                                      sample_replies, seed_rollout, warm_root)
from refinery.tasks.engine.data import ExampleOrder
from refinery.tasks.engine.parallel import Parallel
from refinery.tasks.engine.trainer import Engine, Method, Micro
from refinery.tasks.train.config import ParallelParams, ScheduleParams


# loss type -> one line for the help (``refinery run align --help``); the formulas: :func:`grpo_loss`
LOSS_TYPES: dict[str, Any] = {
    "grpo": "each completion's token mean, averaged over completions (the DeepSeekMath paper; favours short correct replies).",
    "bnpo": "the token mean over each minibatch's completions together (TRL's local-batch normalisation).",
    "dr_grpo": "token sum over (completions x max_new_tokens), no length bias; with scale_rewards none (Dr. GRPO).",
    "dapo": "token sum over every completion token of the step (all batches and processes), DAPO's token-level loss.",
}
SCALES: dict[str, Any] = {
    "group": "divide by the group's reward std (GRPO).",
    "batch": "divide by the whole batch's reward std (PPO Lite).",
    "none": "subtract the group mean only (Dr. GRPO: no difficulty bias).",
}


class GroupRLConfig(ScheduleParams, ParallelParams, SamplingParams):
    """What every trainer that samples a group of completions per prompt and scores them with
    reward functions shares (GRPO, RLOO: :mod:`refinery.tasks.align.rloo`). ``max_steps`` counts
    steps, each over ``grad_accum`` sampled batches of ``batch_size`` prompts times
    ``num_generations`` completions and ``num_iterations`` optimizer updates (the schedule counts
    updates); ``lr`` 1e-5 (a pretrained policy; no new layer, so ``head_lr`` is unused). On
    ``devices`` processes (DDP or FSDP) each samples the groups of ``batch_size / devices`` prompts
    of every batch, in passes of ``mini_batch_size`` completions."""

    field_defaults = dict(max_steps=20, lr=1e-5, batch_size=4, dtype="float32", max_prompt_len=128, max_new_tokens=64)

    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (the group).")
    mini_batch_size: int = Field(16, ge=1, description="Completions per forward/backward pass.")
    num_iterations: int = Field(1, ge=1, description="Optimisation passes over each sampled batch (>1: the ratio clip acts).")
    beta: float = Field(0.04, ge=0, description="Weight of the KL to the reference (0: no reference kept).")
    clip_range: float = Field(0.2, gt=0, description="Policy ratio clip (epsilon; the lower side, 1 - epsilon, when clip_range_high is set).")
    clip_range_high: float | None = Field(None, gt=0, description=(
        "Upper ratio clip (TRL's epsilon_high; DAPO's clip-higher uses 0.28 with clip_range 0.2); empty = clip_range."))
    reward_funcs: list[str] = Field(default_factory=lambda: ["exact_match"], description=(
        "Reward functions: built-ins exact_match (numeric answer vs the record's 'answer', GSM8K '#### N'), "
        "format ('#### N' present), number (any number), length (shorter is better), or module:function "
        "(called as f(prompts, completions, **columns) -> list of floats). With reward_model set, the "
        "model's score is added as 'reward_model'."))
    reward_weights: list[float] | None = Field(None, description="Weight of each reward function, in order (empty: 1 each).")
    eval_max_new_tokens: int | None = Field(None, ge=1, description="Longest greedy completion at validation; empty = max_new_tokens.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapters for the policy (lora.enabled).")

    @field_validator("reward_funcs", mode="before")
    @classmethod
    def _split_funcs(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [x.strip() for x in v.split(",") if x.strip()]
        return v

    @field_validator("reward_weights", mode="before")
    @classmethod
    def _split_weights(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [float(x) for x in v.split(",") if x.strip()] if v.strip() else None
        return v

    @property
    def token_level(self) -> bool:
        """Whether each minibatch's loss is a token sum over the whole step's tokens (dapo) rather
        than a mean over its completions (how :meth:`GRPOTrainer._passes` weighs minibatches)."""
        return False

    @property
    def drops_equal_groups(self) -> bool:
        """Whether the groups whose rewards are all equal leave the loss (dynamic sampling)."""
        return False

    @model_validator(mode="after")
    def _weights(self):
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights: {len(self.reward_weights)} weights for {len(self.reward_funcs)} reward_funcs")
        if not self.reward_funcs:
            raise ValueError("reward_funcs: at least one")
        # every process samples the groups of batch_size/devices prompts (a group is never split), so
        # the processes make the same number of forward and backward passes (collectives under FSDP)
        if self.devices > 1 and self.batch_size % self.devices:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of devices={self.devices} "
                             "(each process samples the groups of an equal part of the prompts)")
        return self


class GRPOConfig(GroupRLConfig):
    """GRPO settings: the group sampling of :class:`GroupRLConfig`, the per-token loss's
    normalisation (``loss_type``), the advantages' scaling and dynamic sampling."""

    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        "grpo", description="How the per-token losses are averaged (TRL's names):", json_schema_extra={"choices": LOSS_TYPES})
    scale_rewards: Literal["group", "batch", "none"] | None = Field(None, description=(
        "Advantage scaling (TRL's names; true/false read as group/none); empty = group, or none with loss_type=dr_grpo:"),
        json_schema_extra={"choices": SCALES})
    dynamic_sampling: bool = Field(False, description=(
        "Drop the groups whose rewards are all equal from the loss (DAPO's dynamic sampling, without resampling); "
        "the step's loss is over the groups kept."))

    @field_validator("scale_rewards", mode="before")
    @classmethod
    def _scale_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            return "group" if v else "none"
        if isinstance(v, str) and v.strip().lower() in ("true", "false"):
            return "group" if v.strip().lower() == "true" else "none"
        return v

    @property
    def reward_scaling(self) -> str:
        """``scale_rewards``, or the loss type's default when empty."""
        return self.scale_rewards or ("none" if self.loss_type == "dr_grpo" else "group")

    @property
    def token_level(self) -> bool:
        return self.loss_type == "dapo"

    @property
    def drops_equal_groups(self) -> bool:
        return self.dynamic_sampling

    @model_validator(mode="after")
    def _scaling(self):
        if self.loss_type == "dr_grpo" and self.scale_rewards not in (None, "none"):
            raise ValueError(f"loss_type=dr_grpo removes the std normalisation: scale_rewards={self.scale_rewards} "
                             "contradicts it (leave scale_rewards empty or set it to none)")
        return self


# --------------------------------------------------------------------------- the pieces
def group_advantages(rewards, group: int, scale: bool | str = True, batch_std: float | None = None):
    """``(r - group mean) / (std + 1e-4)`` for rewards laid out group after group, the std (unbiased,
    as TRL's) the group's (``scale="group"`` or True), the batch's (``"batch"``; ``batch_std`` when
    the batch is wider than ``rewards``, several processes), or none (``"none"`` or False: only
    ``r - group mean``)."""
    if isinstance(scale, bool):
        scale = "group" if scale else "none"
    r = rewards.view(-1, group)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(dim=1, keepdim=True) + 1e-4)
    elif scale == "batch":
        adv = adv / ((rewards.std() if batch_std is None else batch_std) + 1e-4)
    elif scale != "none":
        raise ValueError(f"scale_rewards {scale!r}: one of {', '.join(SCALES)}")
    return adv.reshape(-1)


def equal_groups(rewards, group: int):
    """Per completion: whether its group's rewards are all equal (laid out group after group)."""
    r = rewards.view(-1, group)
    return (r.max(dim=1).values == r.min(dim=1).values).repeat_interleave(group)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, beta: float, clip_range: float, loss_type: str = "grpo",
              clip_range_high: float | None = None, max_completion_length: int | None = None, num_tokens=None):
    """The GRPO loss of a batch of completions (token log-probs (B, T), advantages (B,), mask (B, T))
    and the per-token KL: the clipped objective (ratio clipped to ``[1 - clip_range, 1 +
    clip_range_high]``) plus ``beta`` times the k3 KL estimate, normalised by ``loss_type``:
    ``grpo`` each completion's token mean, then the mean over completions; ``bnpo`` the token mean
    of the batch; ``dr_grpo`` the token sum over ``B * max_completion_length``; ``dapo`` the token
    sum over ``num_tokens`` (the step's token count; default this batch's)."""
    import torch

    hi = clip_range if clip_range_high is None else clip_range_high
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
    per_token = -torch.min(ratio * a, ratio.clamp(1 - clip_range, 1 + hi) * a)
    kl = None
    if beta != 0.0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    tok = per_token * mask
    if loss_type == "grpo":
        loss = (tok.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = tok.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("grpo_loss: loss_type=dr_grpo needs max_completion_length")
        loss = tok.sum() / (len(tok) * max_completion_length)
    elif loss_type == "dapo":
        loss = tok.sum() / (mask.sum().clamp(min=1.0) if num_tokens is None else max(float(num_tokens), 1.0))
    else:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; one of {', '.join(LOSS_TYPES)}")
    return loss, kl


def _token_logps(model, ids, mask, P: int, completions, temperature: float):
    """Per-token log-prob of the completion tokens (the columns after the ``P`` prompt columns)."""
    import torch

    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    logits = logits[:, P - 1:-1].float() / temperature
    return torch.gather(torch.log_softmax(logits, dim=-1), 2, completions[..., None]).squeeze(-1)


@dataclass
class GRPOResult:
    model: Any              # the trained causal LM (a PeftModel with LoRA)
    tokenizer: object
    history: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)   # stats["status"]: the engine's (done, early_stopped, preempted, stopped)

    def raise_if_interrupted(self, where: str | os.PathLike | None) -> None:
        """A stage must not publish a run that stopped early (SIGTERM, ``stop_after``)."""
        raise_if_interrupted(self.stats, where)


@dataclass
class _Batch:
    """One sampled batch: prompt+completion ids, masks, old/ref log-probs, advantages."""

    ids: Any
    mask: Any
    P: int
    completions: Any
    c_mask: Any
    old_logp: Any
    ref_logp: Any
    advantages: Any
    rewards: Any = None     # (B,) the total reward of each completion (dynamic sampling reads its groups)

    def rows(self, keep) -> "_Batch":
        """The batch of the completions ``keep`` (a bool tensor) marks."""
        at = keep.nonzero().squeeze(-1)
        sel = lambda t: None if t is None else t[at.to(t.device)]  # noqa: E731
        return _Batch(sel(self.ids), sel(self.mask), self.P, sel(self.completions), sel(self.c_mask),
                      sel(self.old_logp), sel(self.ref_logp), sel(self.advantages), sel(self.rewards))


def micro_weight(n_micro: int, n_batch: int, grad_accum: int) -> float:
    """The weight of a minibatch of ``n_micro`` completions out of this process's ``n_batch`` of
    one sampled batch, one of ``grad_accum`` per update: the update's loss is the mean over each
    batch's completions, averaged over the batches. With every process holding ``n_batch`` of the
    batch's ``world * n_batch`` completions, gradient averaging over the processes makes it the
    one-process loss of the whole batch. (:meth:`GRPOTrainer._passes` gives the same weight as
    ``n_micro * world / completions of the step``, which also holds when dynamic sampling drops groups.)"""
    return n_micro / n_batch / grad_accum


class GRPOTrainer(Method):
    """GRPO as the engine runs it: the policy, the reference (when ``beta`` > 0), the reward
    functions, the prompts' seeded order, and the buffer of the step's minibatches.

    One engine step: the first micro-batch samples ``grad_accum`` batches (each process the groups
    of its part of the ``batch_size`` prompts), scores them and computes each group's advantages;
    then ``num_iterations`` updates, each a pass over every minibatch of ``mini_batch_size``
    completions, weighted as :meth:`_passes` says."""

    desc = "grpo"
    metric, mode = "reward", "max"          # early stopping on the held-out greedy reward
    show = ("reward", "kl")
    panels = ("reward", "kl", "completion_len")
    train_mode = False                      # no dropout: the same tokens get the same log-probs

    def __init__(self, model_dir: str, prompts: Sequence[str], columns: Sequence[dict],
                 reward_funcs: dict[str, Callable], cfg: GroupRLConfig, seed: int = 0,
                 held_out: tuple[Sequence[str], Sequence[dict]] = ((), ())):
        from transformers import AutoModelForCausalLM, GenerationConfig

        from refinery.tasks.train.common import PeakMemory

        if not prompts:
            raise ValueError("GRPO: no prompts")
        if len(columns) != len(prompts):
            raise ValueError("GRPO: one columns dict per prompt")
        seed_everything(seed)
        self.cfg, self.seed = cfg, seed
        self.prompts, self.columns = list(prompts), list(columns)
        self.held_out = (list(held_out[0]), list(held_out[1]))
        self.reward_funcs = reward_funcs
        self.weights = list(cfg.reward_weights or [1.0] * len(reward_funcs))
        if len(self.weights) != len(reward_funcs):
            raise ValueError(f"{len(self.weights)} reward weights for {len(reward_funcs)} reward functions")
        self.tokenizer = load_tokenizer(model_dir)
        self.device = pick_device(cfg.device)
        self.mem = PeakMemory(self.device).start()
        lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(cfg.dtype))
        self.ref = None
        if cfg.lora.enabled:
            lm = apply_lora(lm, cfg.lora, "CAUSAL_LM")   # reference: adapters disabled
        elif cfg.beta:
            self.ref = copy.deepcopy(lm).eval().requires_grad_(False).to(self.device)
        self.model = lm.to(self.device).eval()   # no dropout: the same tokens get the same log-probs
        self.order = ExampleOrder(len(self.prompts), seed)   # prompts, reshuffled every pass
        self.rollouts = Rollouts()
        self.buffer: list = []     # (batch, slice, weight) of the minibatches the step has left
        self.step_tokens: float | None = None   # dapo: the step's completion tokens over all processes / world
        self.step_start: float | None = None    # when this step's sampling began (gen_share)
        self.gen_seconds, self.gen_tokens = 0.0, 0   # this step's generation time and completion tokens
        self.n_local = cfg.batch_size * cfg.num_generations
        tok = self.tokenizer
        self.eos_id = tok.eos_token_id
        common = dict(pad_token_id=tok.pad_token_id, eos_token_id=self.eos_id, bos_token_id=tok.bos_token_id)
        self.sample_config = GenerationConfig(do_sample=True, max_new_tokens=cfg.max_new_tokens,
                                              temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, **common)
        self.greedy_config = GenerationConfig(do_sample=False, max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
                                              **common)

    @property
    def par(self) -> Parallel:
        return self.engine.par

    # -- what the engine asks
    def setup(self) -> None:
        import torch

        world = self.par.world
        if self.cfg.batch_size % world:   # several nodes too
            raise ValueError(f"grpo: batch_size={self.cfg.batch_size} must be a multiple of the {world} processes "
                             "(each samples the groups of an equal part of the prompts)")
        self.n_local = self.cfg.batch_size // world * self.cfg.num_generations   # completions per batch here
        one = torch.ones((1, 1), dtype=torch.long, device=self.device)
        warm_root(self.par, lambda: self.model(input_ids=one * (self.tokenizer.pad_token_id or 0), attention_mask=one))

    def updates_per_step(self) -> int:
        return self.cfg.num_iterations

    def accum(self) -> int:
        return self.cfg.grad_accum * -(-self.n_local // self.cfg.mini_batch_size)

    def stateful(self) -> dict[str, Any]:
        return {"order": self.order, "rollouts": self.rollouts}

    def micro_step(self, micro: int) -> Micro:
        cfg = self.cfg
        info = self._sample_step() if not self.buffer else {}
        b, sl, weight = self.buffer.pop(0)
        logp = _token_logps(self.engine.train_model, b.ids[sl], b.mask[sl], b.P, b.completions[sl], cfg.temperature)
        old = b.old_logp[sl] if b.old_logp is not None else logp.detach()
        ref = b.ref_logp[sl] if b.ref_logp is not None else None
        loss, figs = self.objective(logp, old, ref, b.advantages[sl], b.c_mask[sl])
        if weight == 0.0:   # a stand-in pass (dynamic sampling left fewer minibatches): no gradient, no figures
            figs = {k: 0.0 for k in figs} if info else {}
            return Micro(loss * 0.0, {**info, **figs}, weight=0.0)
        return Micro(loss, {**info, **figs}, weight=weight)

    def objective(self, logp, old, ref, advantages, mask) -> tuple[Any, dict]:
        """The loss of a minibatch (token log-probs (B, T) under the policy, at sampling, under the
        reference; advantages (B,); completion mask) and its figures: GRPO's :func:`grpo_loss` of
        ``loss_type``, the mean per-token KL and the share of tokens whose ratio was clipped."""
        import torch

        cfg = cast(GRPOConfig, self.cfg)   # GRPO's own hook (RLOO overrides it)
        loss, kl = grpo_loss(logp, old, ref, advantages, mask, cfg.beta, cfg.clip_range, cfg.loss_type,
                             cfg.clip_range_high, cfg.max_new_tokens, self.step_tokens)
        with torch.no_grad():
            den = mask.sum().clamp(min=1)
            ratio = torch.exp(logp - old)
            hi = cfg.clip_range if cfg.clip_range_high is None else cfg.clip_range_high
            clipped = (ratio < 1 - cfg.clip_range) | (ratio > 1 + hi)
            figs = {"kl": ((kl * mask).sum() / den).item() if kl is not None else 0.0,
                    "clipfrac": (clipped.float() * mask).sum().item() / den.item()}
        return loss, figs

    def validate(self) -> dict | None:
        return self.evaluate(*self.held_out) if self.held_out[0] else None

    # -- sampling and scoring
    def generate(self, prompts: Sequence[str], greedy: bool = False):
        """Completions of ``prompts``: (ids, mask, P, completion ids, completion mask, texts), the
        prompts left-padded, the completions right-padded with the pad id after their EOS, the
        completion mask 1 up to and including the EOS (:func:`refinery.tasks.align.ppo.reply_mask`).
        Sampled by :func:`refinery.tasks.align.ppo.sample_replies` (the rollout engine; FSDP:
        ``generate``), from the global generator that :func:`seed_rollout` seeded, with the
        policy's current weights (LoRA included). The seconds and tokens add to
        ``gen_seconds``/``gen_tokens`` (the step's rollout figures)."""
        import torch

        cfg = self.cfg
        lists = [self.tokenizer(t)["input_ids"][-cfg.max_prompt_len:] for t in prompts]
        params = rollout_params(cfg, self.eos_id, len(lists), greedy, cfg.eval_max_new_tokens if greedy else None)
        got = sample_replies(self.model, self.tokenizer, lists, self.par,
                             self.greedy_config if greedy else self.sample_config, params, self.device)
        self.gen_seconds += got.seconds
        self.gen_tokens += int(got.r_mask.sum())
        return (torch.cat([got.p_ids, got.replies], 1), torch.cat([got.p_mask, got.r_mask], 1), got.P, got.replies,
                got.r_mask.float(), got.texts)

    def rewards(self, prompts: list[str], texts: list[str], columns: list[dict]) -> tuple[list[float], dict]:
        from refinery.tasks.align.rewards import score

        names = sorted({k for c in columns for k in c})
        cols = {k: [c.get(k) for c in columns] for k in names}
        return score(self.reward_funcs, self.weights, prompts, texts, cols)

    def _logps(self, model_fn, b_ids, b_mask, P, comp):
        import torch

        outs = []
        with torch.no_grad():
            for i in range(0, len(b_ids), self.cfg.mini_batch_size):
                sl = slice(i, i + self.cfg.mini_batch_size)
                outs.append(_token_logps(model_fn(), b_ids[sl], b_mask[sl], P, comp[sl], self.cfg.temperature))
        return torch.cat(outs)

    def needs_old_logps(self) -> bool:
        """Whether the policy's log-probs at sampling are kept (more than one pass: the ratio's
        denominator; with one pass the loss takes the first forward's, detached)."""
        return self.cfg.num_iterations > 1

    def advantages(self, rewards, old_logp, ref_logp, c_mask) -> tuple[Any, dict]:
        """Each completion's advantage (on the device) from this process's rewards (whole groups,
        group after group) and figures to log: GRPO's group-relative :func:`group_advantages`,
        the std the group's, the whole batch's over every process, or none (``scale_rewards``)."""
        cfg, G = cast(GRPOConfig, self.cfg), self.cfg.num_generations   # GRPO's own hook (RLOO overrides it)
        batch_std = None
        if cfg.reward_scaling == "batch":   # the std of the whole batch, every process's groups
            n, s1, s2 = self.par.sum([float(len(rewards)), float(rewards.double().sum()),
                                      float((rewards.double() ** 2).sum())])
            batch_std = max((s2 - s1 * s1 / n) / max(n - 1, 1.0), 0.0) ** 0.5
        return group_advantages(rewards, G, cfg.reward_scaling, batch_std).to(self.device), {}

    def step_batches(self, batches: list[_Batch]) -> None:
        """After a step's batches are sampled, before its passes are planned: what needs all of
        them (RLOO normalises the advantages over the step). GRPO: nothing."""

    def sample(self, prompts: Sequence[str], columns: Sequence[dict]) -> tuple[_Batch, dict]:
        """Sample the groups of a batch of prompts, score them, compute advantages (per group:
        a group is never split between processes) and the log-probs the loss compares against."""
        import contextlib

        import torch

        cfg, G = self.cfg, self.cfg.num_generations
        rep_prompts = [p for p in prompts for _ in range(G)]
        rep_cols = [c for c in columns for _ in range(G)]
        ids, mask, P, comp, c_mask, texts = self.generate(rep_prompts)
        total, parts = self.rewards(rep_prompts, texts, rep_cols)
        r = torch.tensor(total, dtype=torch.float32)
        old = self._logps(lambda: self.model, ids, mask, P, comp) if self.needs_old_logps() else None
        ref = None
        if cfg.beta:
            if self.ref is not None:
                ref = self._logps(lambda: self.ref, ids, mask, P, comp)
            else:   # LoRA: the same model with its adapters off
                ctx = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else contextlib.nullcontext()
                with ctx:
                    ref = self._logps(lambda: self.model, ids, mask, P, comp)
        adv, adv_figs = self.advantages(r, old, ref, c_mask)
        grouped = r.view(-1, G)
        figs = {"reward": r.mean().item(), "reward_std": grouped.std(dim=1).mean().item(),
                "zero_std_groups": (grouped.std(dim=1) == 0).float().mean().item(),
                "completion_len": c_mask.sum(-1).mean().item(), **adv_figs,
                **{f"reward_{n}": sum(v) / len(v) for n, v in parts.items()}}
        return (_Batch(ids, mask, P, comp, c_mask, old, ref, adv, r),
                {"figs": figs, "sample": texts[0][:200], "tokens": int(mask.sum())})

    def _sample_step(self) -> dict:
        """Sample this process's groups of the step's ``grad_accum`` batches and fill the buffer
        with ``num_iterations`` passes over their minibatches; the batches' figures (with their
        ``tokens`` and a ``sample`` completion)."""
        import time

        cfg = self.cfg
        self.step_start, self.gen_seconds, self.gen_tokens = time.perf_counter(), 0.0, 0
        seed_rollout(self.seed, self.par.rank, self.rollouts.done)
        sampled = []
        for _ in range(cfg.grad_accum):
            idx = self.par.part(self.order.take(cfg.batch_size))   # whole groups: this process's prompts
            sampled.append(self.sample([self.prompts[i] for i in idx], [self.columns[i] for i in idx]))
        self.rollouts.done += 1
        rollout_s = self.gen_seconds   # sampling only: the log-prob passes below are not rollout time
        self.step_batches([b for b, _ in sampled])
        self.buffer = self._passes([b for b, _ in sampled]) * cfg.num_iterations
        figs = {k: sum(info["figs"][k] for _, info in sampled) / len(sampled) for k in sampled[0][1]["figs"]}
        if cfg.drops_equal_groups:
            figs["kept_groups"] = sum(float((~equal_groups(b.rewards, cfg.num_generations)).float().mean())
                                      for b, _ in sampled) / len(sampled)
        figs["rollout_tokens_per_s"] = self.gen_tokens / rollout_s if rollout_s > 0 else 0.0
        return {**figs, "tokens": sum(info["tokens"] for _, info in sampled), "sample": sampled[0][1]["sample"]}

    def after_step(self, figures: dict) -> None:
        """The share of the step's wall time spent generating (``gen_share``; this process's: the
        step began with its sampling, in the first micro-batch)."""
        import time

        if self.step_start is not None:
            figures["gen_share"] = round(self.gen_seconds / max(time.perf_counter() - self.step_start, 1e-9), 6)

    def _passes(self, batches: list[_Batch]) -> list[tuple[_Batch, slice, float]]:
        """One pass over the step's minibatches, each with its weight in the update: its share of
        the step's completions (all processes' together, so the gradient average over processes is
        the one-process update; ``dapo``: 1, its loss divided by the step's token count). With
        ``dynamic_sampling`` the groups whose rewards are all equal are left out and the pass is
        filled up with weight-0 stand-ins, so every process makes ``accum()`` forwards alike."""
        cfg, mbs, world = self.cfg, self.cfg.mini_batch_size, self.par.world
        per_batch = -(-self.n_local // mbs)
        kept = [b.rows(~equal_groups(b.rewards, cfg.num_generations)) if cfg.drops_equal_groups else b for b in batches]
        n_all, tokens_all = self.par.sum([float(sum(len(k.ids) for k in kept)), float(sum(k.c_mask.sum() for k in kept))])
        self.step_tokens = tokens_all / world if cfg.token_level else None
        out: list[tuple[_Batch, slice, float]] = []
        for full, k in zip(batches, kept):
            real = [(k, slice(i, i + mbs), (1.0 if cfg.token_level else min(mbs, len(k.ids) - i) * world / n_all))
                    for i in range(0, len(k.ids), mbs)]
            out += real + [(full, slice(0, 1), 0.0)] * (per_batch - len(real))
        return out

    def evaluate(self, prompts: Sequence[str], columns: Sequence[dict]) -> dict:
        """Mean reward of greedy completions to held-out prompts (and each function's); on several
        processes each completes its part and the means are over all of them (under FSDP the parts
        are padded to one length, the padding's rewards left out: every process generates alike)."""
        prompts, n_real = padded_part(self.par, prompts)
        columns, _ = padded_part(self.par, columns)
        total = 0.0
        parts: dict[str, float] = {n: 0.0 for n in self.reward_funcs}
        for i in range(0, len(prompts), self.cfg.mini_batch_size):
            ps, cs = list(prompts[i:i + self.cfg.mini_batch_size]), list(columns[i:i + self.cfg.mini_batch_size])
            *_, texts = self.generate(ps, greedy=True)
            real = max(0, min(len(ps), n_real - i))   # the padding's completions count for nothing
            t, p = self.rewards(ps[:real], texts[:real], cs[:real]) if real else ([], {n: [] for n in parts})
            total += sum(t)
            for n in parts:
                parts[n] += sum(p[n])
        sums = self.par.sum([float(n_real), total, *parts.values()])
        count = max(sums[0], 1.0)
        out = {"reward": round(sums[1] / count, 6)}
        out.update({f"reward_{name}": round(v / count, 6) for name, v in zip(parts, sums[2:])})
        return out


def train_grpo(model_dir: str, prompts: Sequence[str], columns: Sequence[dict], reward_funcs: dict[str, Callable],
               cfg: GRPOConfig, seed: int = 0, held_out: tuple[Sequence[str], Sequence[dict]] = ((), ()),
               on_step: Callable[[dict], None] | None = None, progress: bool = False,
               log_dir: str | os.PathLike | None = None, ckpt_dir: str | os.PathLike | None = None,
               stop_after: int | None = None) -> GRPOResult:
    """Run ``cfg.max_steps`` GRPO steps on the engine over a seeded shuffle of ``prompts`` (rendered
    prompt texts; ``columns``: each prompt's other columns, passed to the reward functions). With
    ``held_out`` (prompts, columns), greedy completions are scored every ``eval_every`` steps:
    validation rows and the early-stopping metric (``reward``). Metrics go to ``log_dir`` (default
    ``ckpt_dir/metrics``); with ``ckpt_dir``, checkpoints go there and a rerun resumes from the
    newest (``stats["status"]``: whether the run finished; ``stop_after``: stop after that step)."""
    trainer = GRPOTrainer(model_dir, prompts, columns, reward_funcs, cfg, seed, held_out=held_out)
    return fit_group_trainer(trainer, cfg, "GRPO", on_step=on_step, progress=progress, log_dir=log_dir,
                             ckpt_dir=ckpt_dir, stop_after=stop_after)


def fit_group_trainer(trainer: GRPOTrainer, cfg: GroupRLConfig, title: str, *,
                      on_step: Callable[[dict], None] | None = None, progress: bool = False,
                      log_dir: str | os.PathLike | None = None, ckpt_dir: str | os.PathLike | None = None,
                      stop_after: int | None = None) -> GRPOResult:
    """Run a group trainer (GRPO, RLOO) on the engine for ``cfg.max_steps`` steps and gather its
    result (the model, the history, :func:`refinery.tasks.align.ppo.rl_stats`)."""
    res = Engine(trainer, cfg, total=cfg.max_steps, device=trainer.device, ckpt_dir=path_or_none(ckpt_dir),
                 metrics_dir=path_or_none(log_dir), progress=progress, on_row=on_step, stop_after=stop_after,
                 title=title).fit()
    stats = rl_stats(res, cfg.max_steps, trainer.mem, trainer.model)
    return GRPOResult(model=trainer.model, tokenizer=trainer.tokenizer, history=res.history, stats=stats)


__all__ = ["GRPOConfig", "GRPOResult", "GRPOTrainer", "GroupRLConfig", "LOSS_TYPES", "fit_group_trainer", "equal_groups", "group_advantages", "grpo_loss",
           "micro_weight", "train_grpo"]
