"""PPO against a reward function (a trained reward model, or any scorer), written out in full.

One PPO step, as in Ouyang et al. 2022 / Ziegler et al. 2019, readable top to bottom:

1. **Rollout**: sample a reply for a batch of prompts from the policy (``max_new_tokens``,
   ``temperature``, ``top_k``, ``top_p``); the reply ends at its first EOS.
2. **Score**: the reward function gives one scalar per reply.
3. **Shape**: per-token reward ``-kl_coef * (log pi(a_t) - log pi_ref(a_t))`` (a penalty for leaving
   the frozen reference policy), plus the score on the reply's last token.
4. **GAE**: advantages ``A_t = sum_l (gamma*lam)^l delta_{t+l}`` with
   ``delta_t = r_t + gamma V(s_{t+1}) - V(s_t)``, from the value head's estimates; returns
   ``A_t + V(s_t)``; advantages whitened over the batch.
5. **Optimise** for ``ppo_epochs`` passes over shuffled minibatches: clipped policy loss
   ``max(-A r, -A clip(r, 1-eps, 1+eps))`` with ``r = pi/pi_old``, clipped value loss
   ``0.5 max((V-R)^2, (V_clip-R)^2)``, minus an optional entropy bonus.

The value head is a linear layer on the policy's last hidden state (shared backbone), trained at
``head_lr`` (a new layer) while the backbone takes ``lr``. The reference is a frozen copy of the
starting policy (with LoRA: the same model with its adapters disabled, so no second copy).
``kl_coef`` is fixed, or with ``kl_target`` set it follows the adaptive controller of Ziegler et
al. 2019: ``kl_coef *= 1 + clip(KL / kl_target - 1, -0.2, 0.2) * batch_size / kl_horizon`` after
every step, so the measured KL is steered towards the target.

The run is a :class:`refinery.tasks.engine.trainer.Method` on the one training loop
(:class:`refinery.tasks.engine.trainer.Engine`), as TRL lays PPO out: one engine step is one
rollout and its ``ppo_epochs`` passes, i.e. ``updates_per_step`` optimizer updates of ``accum``
minibatches each (``grad_accum`` minibatches per update, the last of a pass takes what is left).
The rollout happens inside the step's first micro-batch, when the buffer of minibatches is empty;
every micro-batch then returns the loss of the buffer's next minibatch. The engine owns the rest:
warm-up + schedule over the optimizer updates, clipping, early stopping on the mean reward of
held-out prompts with the best weights restored, checkpoints (``checkpoint_every``, SIGTERM) and
resume. A checkpoint holds the trainable weights (value head and LoRA adapters included), the
optimizer, the schedule, the prompt order's position, the rollouts done and the adaptive KL
coefficient; the frozen reference and the reward function come from the run's inputs. Rollout
``k`` on process ``r`` samples from a generator seeded by ``(seed, r, k)``, so a resumed run
samples what the uninterrupted one would have. On several processes (``devices``, DDP or FSDP)
each rolls out ``batch_size / devices`` prompts and takes ``mini_batch_size / devices`` of them per
minibatch. Replies are sampled by the rollout engine (:func:`sample_replies`; the step logs
``rollout_tokens_per_s`` and ``gen_share``, the share of its wall time spent generating); under
FSDP sampling runs ``generate`` on the sharded policy with ``synced_gpus``
(:func:`generating`) and the held-out parts are padded to one length, so every process makes the
same number of forward passes (each one a collective).
Dropout is off throughout (eval mode), so log-probabilities of the same tokens are reproducible.
Every step reports mean reward, KL to the reference (per reply, summed over tokens), entropy
(per token), losses, clip fractions and reply length.
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from pydantic import Field, model_validator

from refinery.tasks.align.common import (SamplingParams, LoraSettings, count_params, pad,
                                         pick_device, position_ids, seed_everything)
from refinery.tasks.engine.data import ExampleOrder
from refinery.tasks.engine.parallel import Parallel
from refinery.tasks.engine.trainer import INTERRUPTED, Engine, EngineResult, Method, Micro, TrainingInterrupted
from refinery.tasks.train.config import ParallelParams, ScheduleParams

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[Sequence[int]]], "object"]


class PPOConfig(ScheduleParams, ParallelParams, SamplingParams):
    """PPO settings: generation, the KL penalty, clipping and batch sizes. ``max_steps`` counts PPO
    steps (one rollout of ``batch_size`` prompts, then ``ppo_epochs`` passes over it); ``lr`` is
    the policy's (1e-5), ``head_lr`` the new value head's (1e-4); ``grad_accum`` minibatches make
    one optimizer step, and the warm-up and schedule count optimizer steps."""

    # weight_decay 0.01: torch AdamW's default, which PPO used before it was a setting
    field_defaults = dict(max_steps=20, lr=1e-5, head_lr=1e-4, batch_size=16, weight_decay=0.01, dtype="float32")

    mini_batch_size: int = Field(8, ge=1, description="Replies per gradient step.")
    ppo_epochs: int = Field(2, ge=1, description="Passes over each rollout batch.")
    kl_coef: float = Field(0.05, ge=0, description="Per-token KL penalty coefficient (beta); with kl_target, its starting value.")
    kl_target: float | None = Field(None, gt=0, description="Adaptive KL controller: the KL per reply (nats) to steer "
                                    "towards by adjusting kl_coef after every step; empty = fixed kl_coef.")
    kl_horizon: int = Field(10000, ge=1, description="Adaptive KL controller horizon (rollouts over which the "
                            "coefficient may change by about e-fold).")
    clip_range: float = Field(0.2, gt=0, description="Policy ratio clip (epsilon).")
    clip_range_value: float = Field(0.2, gt=0, description="Value clip around the rollout's values.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    entropy_coef: float = Field(0.0, ge=0, description="Weight of the entropy bonus.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    whiten_advantages: bool = Field(True, description="Normalise advantages to mean 0, std 1 per batch.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapters for the policy (lora.enabled).")

    @model_validator(mode="after")
    def _processes(self):
        # every rank samples batch_size/devices prompts and takes mini_batch_size/devices of them per
        # update, so the ranks run the same number of forward and backward passes (each one a
        # collective under FSDP, synchronised gradients under DDP)
        for name in ("batch_size", "mini_batch_size"):
            if self.devices > 1 and getattr(self, name) % self.devices:
                raise ValueError(f"{name}={getattr(self, name)} must be a multiple of devices={self.devices} "
                                 "(each process takes an equal part of it)")
        return self


# --------------------------------------------------------------------------- the model
def _policy_with_value(model):
    import torch

    class PolicyWithValue(torch.nn.Module):
        """A causal LM plus a scalar value head on its last hidden state."""

        def __init__(self, lm):
            super().__init__()
            self.lm = lm
            hidden = lm.config.get_text_config().hidden_size if hasattr(lm.config, "get_text_config") \
                else lm.config.hidden_size
            self.v_head = torch.nn.Linear(hidden, 1)
            torch.nn.init.zeros_(self.v_head.weight)
            torch.nn.init.zeros_(self.v_head.bias)

        def forward(self, input_ids, attention_mask):
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids(attention_mask), output_hidden_states=True)
            values = self.v_head(out.hidden_states[-1].float()).squeeze(-1)
            return out.logits, values

    return PolicyWithValue(model)


def load_ppo_policy(policy_dir: str, cfg: PPOConfig):
    """The tokenizer, the policy with its (zero) value head, and the frozen reference (None with
    LoRA: the reference is then the policy with its adapters disabled), on the CPU."""
    from refinery.tasks.align.common import policy_model

    tok, lm = policy_model(policy_dir, cfg)
    ref = None
    if not cfg.lora.enabled:
        ref = copy.deepcopy(lm)
        ref.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
    return tok, _policy_with_value(lm), ref


@dataclass
class PPOResult:
    policy: Any             # PolicyWithValue: .lm is the causal LM (a PeftModel with LoRA)
    tokenizer: object
    history: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)   # stats["status"]: the engine's (done, early_stopped, preempted, stopped)

    def raise_if_interrupted(self, where: str | os.PathLike | None) -> None:
        """A stage must not publish a run that stopped early (SIGTERM, ``stop_after``)."""
        raise_if_interrupted(self.stats, where)


def raise_if_interrupted(stats: dict, where: str | os.PathLike | None) -> None:
    """:class:`TrainingInterrupted` when a run's ``stats["status"]`` says it stopped before the end
    (its checkpoint is kept in ``where``; the same command resumes it)."""
    status = stats.get("status")
    if status in INTERRUPTED:
        raise TrainingInterrupted(f"training stopped at step {stats.get('steps')} ({status}); checkpoint kept in "
                                  f"{where}: run the same command again to resume")


# --------------------------------------------------------------------------- pieces of a step
def masked_mean(x, mask, dim=None):
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x, mask, eps: float = 1e-8, parallel: Parallel | None = None):
    """``x`` normalised to mean 0, std 1 over the tokens in ``mask`` (of every rank's rollouts)."""
    if parallel is None or parallel.world <= 1:
        mean = masked_mean(x, mask)
        var = masked_mean((x - mean) ** 2, mask)
        return (x - mean) * (var + eps).rsqrt() * mask
    s, n = parallel.sum([float((x * mask).sum()), float(mask.sum())])
    mean = s / max(n, 1.0)
    (sq,) = parallel.sum([float((((x - mean) ** 2) * mask).sum())])
    var = sq / max(n, 1.0)
    return (x - mean) * (var + eps) ** -0.5 * mask


def reply_mask(replies, eos_id: int | None):
    """1 for reply tokens up to and including the first EOS, 0 after (generate pads there)."""
    import torch

    if eos_id is None:
        return torch.ones_like(replies)
    is_eos = (replies == eos_id).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0  # strictly after the first EOS
    return (~after_eos).long()


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimates and returns over reply tokens (B, R); entries outside
    ``mask`` (a prefix of each row) are zero."""
    import torch

    rewards, values = rewards * mask, values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    R = rewards.shape[1]
    for t in reversed(range(R)):
        next_v = values[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def _reply_stats(logits, tokens, temperature: float):
    """Per-token log-prob of ``tokens`` and entropy, from logits aligned with them."""
    import torch

    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = torch.gather(logp_all, 2, tokens[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def shaped_rewards(scores, logp, ref_logp, mask, kl_coef: float):
    """Per-token rewards: ``-kl_coef * (logp - ref_logp)``, plus the score on the last reply token."""
    import torch

    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(-1) - 1).clamp(min=0).long()
    rewards[torch.arange(len(scores), device=rewards.device), last] += scores
    return rewards * mask, kl


@dataclass
class AdaptiveKL:
    """The adaptive KL coefficient of Ziegler et al. 2019 (TRL's AdaptiveKLController): after each
    step the coefficient grows when the measured KL is above the target and shrinks below it,
    by at most 20% of ``n / horizon`` per step."""

    value: float
    target: float | None
    horizon: int

    def update(self, kl: float, n: int) -> float:
        """The coefficient after a step that measured ``kl`` on ``n`` rollouts (unchanged without a target)."""
        if self.target:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class Rollouts:
    """How many rollouts (sampled batches) a run has done: what seeds the next one (checkpointed)."""

    def __init__(self) -> None:
        self.done = 0

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.done = int(state["done"])


def seed_rollout(seed: int, rank: int, k: int) -> None:
    """Seed the global generators for rollout ``k`` of process ``rank``: every process samples its
    own replies, and a resumed run samples what the uninterrupted one would have."""
    import torch

    torch.manual_seed((seed * 1_000_003 + k) * 8191 + rank)


def warm_root(par: Parallel, forward: Callable[[], Any]) -> None:
    """Under FSDP: one no-grad ``forward`` through the sharded root module before anything else.
    FSDP2 takes the first module that runs forward for its root; sampling enters the model below
    the root (the causal LM inside the value-head wrapper, a PEFT model's base), so a block would
    otherwise claim it. Nothing happens unsharded."""
    if par.sharded:
        import torch

        with torch.no_grad():
            forward()


@contextlib.contextmanager
def generating(par: Parallel):
    """Around Hugging Face ``generate`` on a model that may be sharded (FSDP2); yields the extra
    keyword arguments for ``generate``. Sharded: the root unit's parameters (embeddings, output
    head, final norm) are gathered for the whole call and freed after (the blocks gather their
    own in every forward), and ``synced_gpus=True`` keeps every rank running forwards until all are
    done, so each rank joins every block's all-gather. The ranks must also make the same number of
    ``generate`` calls. Unsharded: nothing."""
    if not par.sharded:
        yield {}
        return
    par.train.unshard()
    try:
        yield {"synced_gpus": True}
    finally:
        par.train.reshard()


def rollout_params(cfg, eos_id: int | None, n: int, greedy: bool = False, max_new_tokens: int | None = None):
    """The rollout engine's settings for ``n`` prompts of an online trainer (``cfg``: its
    :class:`refinery.tasks.align.common.SamplingParams`): the config's sampling, or greedy; EOS the
    tokenizer's (what :func:`reply_mask` cuts at); one batch of all the prompts (the engine
    prefills very different lengths in chunks); no private seed: the global generator, which
    :func:`seed_rollout` seeded, draws."""
    from refinery.tasks.rollout import SamplingParams as Rollout

    eos = (eos_id,) if eos_id is not None else ()
    longest = max_new_tokens or cfg.max_new_tokens
    if greedy:
        return Rollout(max_new_tokens=longest, greedy=True, eos_ids=eos, batch_size=max(1, n))
    return Rollout(max_new_tokens=longest, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                   eos_ids=eos, batch_size=max(1, n))


@dataclass
class Sampled:
    """A policy's replies to a batch of prompts, as the trainers' log-prob passes take them."""

    p_ids: Any        # (B, P) the prompts, left-padded
    p_mask: Any
    replies: Any      # (B, T) the replies, right-padded with the pad id after their EOS
    r_mask: Any       # (B, T) 1 up to and including the EOS (:func:`reply_mask`)
    texts: list[str]
    seconds: float    # spent generating

    @property
    def P(self) -> int:
        return self.p_ids.shape[1]


def sample_replies(model, tokenizer, prompt_ids: Sequence[Sequence[int]], par: Parallel, gen_config, params,
                   device) -> Sampled:
    """Replies of ``model`` (the policy, LoRA included) to prompts given as token ids. One process
    or DDP: through the rollout engine (:func:`refinery.tasks.rollout.sample`: KV cache, each
    sequence stops at its EOS, ``params`` from :func:`rollout_params`). Under FSDP every process
    must make the same forwards, so Hugging Face ``generate`` with ``synced_gpus``
    (:func:`generating`, ``gen_config``) there."""
    import time

    import torch

    lists = [list(p) for p in prompt_ids]
    p_ids, p_mask = pad(lists, tokenizer.pad_token_id, "left")
    p_ids, p_mask = p_ids.to(device), p_mask.to(device)
    t0 = time.perf_counter()
    if par.sharded:
        with torch.no_grad(), generating(par) as extra:
            out = model.generate(input_ids=p_ids, attention_mask=p_mask, generation_config=gen_config, **extra)
        replies = out[:, p_ids.shape[1]:]
        r_mask = reply_mask(replies, tokenizer.eos_token_id)
        texts = [tokenizer.decode(c[m.bool()].tolist(), skip_special_tokens=True) for c, m in zip(replies, r_mask)]
    else:
        from refinery.tasks.rollout import sample

        res = sample(model, tokenizer, lists, params)
        replies, r_mask = res.padded(tokenizer.pad_token_id, device)
        texts = res.texts
    if replies.shape[1] == 0:
        raise RuntimeError("generation produced no tokens")
    return Sampled(p_ids, p_mask, replies, r_mask, texts, time.perf_counter() - t0)


def padded_part(par: Parallel, items: Sequence) -> tuple[list, int]:
    """This rank's part of ``items`` (held-out prompts) and how many of it are real. Under FSDP every
    rank must make the same number of forward passes, so a shorter part is padded with a repeat
    of an item whose result is discarded; otherwise the part as it is."""
    mine = par.part(items)
    n = len(mine)
    if par.sharded and items:
        width = -(-len(items) // par.world)
        mine = mine + [mine[-1] if mine else items[0]] * (width - n)
    return mine, n


def update_plan(cfg: PPOConfig) -> list[int]:
    """Minibatches of each optimizer update of one PPO step: every ``grad_accum`` minibatches of
    each epoch (the last of an epoch takes what is left)."""
    minibatches = -(-cfg.batch_size // cfg.mini_batch_size)
    per_epoch = [min(cfg.grad_accum, minibatches - i) for i in range(0, minibatches, cfg.grad_accum)]
    return per_epoch * cfg.ppo_epochs


def updates_per_step(cfg: PPOConfig) -> int:
    """Optimizer updates per PPO step (what the schedule counts)."""
    return len(update_plan(cfg))


class PPOTrainer(Method):
    """PPO as the engine runs it: the policy (+ value head) that trains, the frozen reference, the
    prompts' seeded order, the adaptive KL coefficient, and the buffer of one rollout's minibatches.

    One engine step: the first micro-batch rolls out the next ``batch_size`` prompts (each process
    its part), scores them, computes advantages and fills the buffer with ``ppo_epochs`` shuffled
    passes of minibatches; every micro-batch returns the clipped loss of the buffer's next one."""

    desc = "ppo"
    metric, mode = "reward", "max"          # early stopping on the held-out mean reward
    head_prefixes = ("v_head",)             # the new value head trains at head_lr
    show = ("reward", "kl")
    panels = ("reward", "kl", "entropy")
    train_mode = False                      # no dropout: the same tokens get the same log-probs

    def __init__(self, policy_dir: str, prompts: Sequence[str], reward_fn: RewardFn, cfg: PPOConfig, seed: int = 0,
                 held_out: Sequence[str] = ()):
        from transformers import GenerationConfig

        from refinery.tasks.train.common import PeakMemory

        if not prompts:
            raise ValueError("PPO: no prompts")
        seed_everything(seed)
        self.cfg, self.seed, self.reward_fn = cfg, seed, reward_fn
        self.prompts, self.held_out = list(prompts), list(held_out)
        self.device = pick_device(cfg.device)
        self.mem = PeakMemory(self.device).start()
        self.tokenizer, self.policy, self.ref = load_ppo_policy(policy_dir, cfg)
        self.policy.to(self.device)
        if self.ref is not None:
            self.ref.to(self.device)
        self.policy.eval()  # no dropout: log-probs of the same tokens must not change between passes
        self.model = self.policy
        self.order = ExampleOrder(len(self.prompts), seed)   # prompts, reshuffled every pass
        self.rollouts = Rollouts()
        self.kl = AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.plan = update_plan(cfg)
        self.updates = 0          # accum() calls: which update of the step comes next
        self.buffer: list = []    # the minibatch indices the step has left
        self.ro: dict = {}        # the step's rollout
        self.mb = cfg.mini_batch_size
        self.step_start: float | None = None    # when this step's rollout began (gen_share)
        self.gen_seconds, self.gen_tokens = 0.0, 0   # this step's generation time and reply tokens
        tok = self.tokenizer
        self.eos_id = tok.eos_token_id
        self.gen_config = GenerationConfig(
            do_sample=True, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            top_k=cfg.top_k, top_p=cfg.top_p, pad_token_id=tok.pad_token_id, eos_token_id=self.eos_id,
            bos_token_id=tok.bos_token_id)

    @property
    def par(self) -> Parallel:
        return self.engine.par

    @property
    def kl_coef(self) -> float:
        """The coefficient the next rollout's rewards are shaped with."""
        return self.kl.value

    # -- what the engine asks
    def setup(self) -> None:
        import torch

        world = self.par.world
        if self.cfg.batch_size % world or self.cfg.mini_batch_size % world:   # several nodes too
            raise ValueError(f"ppo: batch_size={self.cfg.batch_size} and mini_batch_size={self.cfg.mini_batch_size} "
                             f"must be multiples of the {world} processes")
        self.mb = self.cfg.mini_batch_size // world   # this process's replies per minibatch
        one = torch.ones((1, 1), dtype=torch.long, device=self.device)
        warm_root(self.par, lambda: self.policy(one * (self.tokenizer.pad_token_id or 0), one))

    def updates_per_step(self) -> int:
        return len(self.plan)

    def accum(self) -> int:
        n = self.plan[self.updates % len(self.plan)]
        self.updates += 1
        return n

    def stateful(self) -> dict[str, Any]:
        return {"order": self.order, "rollouts": self.rollouts, "kl": self.kl}

    def micro_step(self, micro: int) -> Micro:
        import torch

        cfg = self.cfg
        info = self._rollout_step() if not self.buffer else {}
        ro, idx = self.ro, self.buffer.pop(0)
        P, mb_mask = ro["P"], ro["r_mask"][idx]
        logits, values = self.engine.train_model(ro["ids"][idx], ro["mask"][idx])
        logp, entropy = _reply_stats(logits[:, P - 1:-1], ro["replies"][idx], cfg.temperature)
        values = values[:, P - 1:-1]
        old_logp, old_v, a, ret = ro["logp"][idx], ro["values"][idx], ro["adv"][idx], ro["returns"][idx]
        ratio = torch.exp(logp - old_logp)
        pg = torch.max(-a * ratio, -a * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range))
        pg_loss = masked_mean(pg, mb_mask)
        v_clip = old_v + (values - old_v).clamp(-cfg.clip_range_value, cfg.clip_range_value)
        vf = 0.5 * torch.max((values - ret) ** 2, (v_clip - ret) ** 2)
        vf_loss = masked_mean(vf, mb_mask)
        ent = masked_mean(entropy, mb_mask)
        loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * ent
        with torch.no_grad():
            figs = {"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(),
                    "clipfrac": masked_mean(((ratio - 1).abs() > cfg.clip_range).float(), mb_mask).item(),
                    "vf_clipfrac": masked_mean(((values - old_v).abs() > cfg.clip_range_value).float(), mb_mask).item(),
                    "approx_kl": masked_mean(0.5 * (logp - old_logp) ** 2, mb_mask).item()}
        return Micro(loss, {**info, **figs})

    def after_step(self, figures: dict) -> None:
        # from the KL averaged over the processes, so every one shapes its next rewards alike
        self.kl.update(figures["kl"], self.cfg.batch_size)
        if self.step_start is not None:   # this process's share of the step's wall time spent generating
            import time

            figures["gen_share"] = round(self.gen_seconds / max(time.perf_counter() - self.step_start, 1e-9), 6)

    def validate(self) -> dict | None:
        return self.evaluate(self.held_out) if self.held_out else None

    # -- reference log-probs
    def _ref_logits(self, ids, mask):
        """The reference's logits: the frozen copy (whole on every process), or with LoRA the policy
        with its adapters disabled, called through its root module (sharded under FSDP)."""
        import torch

        with torch.no_grad():
            if self.ref is not None:
                return self.ref(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
            with self.policy.lm.disable_adapter():
                return self.policy(ids, mask)[0]

    # -- rollout
    def rollout(self, prompt_texts: Sequence[str]) -> dict:
        import torch

        tok, cfg = self.tokenizer, self.cfg
        prompt_ids = [tok(t)["input_ids"][-cfg.max_prompt_len:] for t in prompt_texts]
        got = sample_replies(self.policy.lm, tok, prompt_ids, self.par, self.gen_config,
                             rollout_params(cfg, self.eos_id, len(prompt_ids)), self.device)
        self.gen_seconds += got.seconds
        P, replies, r_mask = got.P, got.replies, got.r_mask
        self.gen_tokens += int(r_mask.sum())
        ids = torch.cat([got.p_ids, replies], 1)
        mask = torch.cat([got.p_mask, r_mask], 1)
        chunks: list[tuple] = []   # (logp, entropy, ref_logp, values) per chunk
        with torch.no_grad():  # in chunks of mini_batch_size: full-vocabulary logits are large
            for i in range(0, len(ids), self.mb):
                sl = slice(i, i + self.mb)
                lg, v = self.policy(ids[sl], mask[sl])
                lp, ent = _reply_stats(lg[:, P - 1:-1], replies[sl], cfg.temperature)
                rlp, _ = _reply_stats(self._ref_logits(ids[sl], mask[sl])[:, P - 1:-1], replies[sl], cfg.temperature)
                chunks.append((lp, ent, rlp, v[:, P - 1:-1]))
        logp, entropy, ref_logp, values = (torch.cat(x) for x in zip(*chunks))
        reply_lists = [replies[i][r_mask[i].bool()].tolist() for i in range(len(replies))]
        reply_texts = got.texts
        scores = torch.as_tensor(self.reward_fn(list(prompt_texts), reply_texts, reply_lists), dtype=torch.float32)
        scores = scores.to(self.device)
        if scores.shape != (len(prompt_texts),):
            raise ValueError(f"reward function returned shape {tuple(scores.shape)}, expected ({len(prompt_texts)},)")
        rewards, kl = shaped_rewards(scores, logp, ref_logp, r_mask.float(), self.kl_coef)
        return {"ids": ids, "mask": mask, "P": P, "replies": replies, "r_mask": r_mask.float(), "logp": logp,
                "ref_logp": ref_logp, "values": values, "scores": scores, "rewards": rewards, "kl": kl,
                "entropy": entropy, "reply_texts": reply_texts}

    def _rollout_step(self) -> dict:
        """Roll out this process's part of the next ``batch_size`` prompts, compute advantages and
        returns, and fill the buffer with ``ppo_epochs`` shuffled passes of minibatches. Returns the
        rollout's figures (with its ``tokens`` and a ``sample`` reply)."""
        import torch

        import time

        cfg, k = self.cfg, self.rollouts.done
        batch = [self.prompts[i] for i in self.order.take(cfg.batch_size)]
        self.step_start, self.gen_seconds, self.gen_tokens = time.perf_counter(), 0.0, 0
        seed_rollout(self.seed, self.par.rank, k)
        ro = self.rollout(self.par.part(batch))   # several processes: each rolls out its part
        tokens_per_s = self.gen_tokens / self.gen_seconds if self.gen_seconds > 0 else 0.0
        m = ro["r_mask"]
        adv, returns = gae(ro["rewards"], ro["values"], m, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = whiten(adv, m, parallel=self.par)
        ro["adv"], ro["returns"] = adv, returns
        B = len(m)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        self.buffer = []
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=gen).to(self.device)
            self.buffer += [order[i:i + self.mb] for i in range(0, B, self.mb)]
        self.ro = ro
        self.rollouts.done += 1
        kl_seq = ro["kl"].sum(-1)
        return {"kl_coef": self.kl_coef,   # the coefficient this step's rewards were shaped with
                "reward": ro["scores"].mean().item(),
                "reward_std": ro["scores"].std().item() if B > 1 else 0.0,
                "kl": kl_seq.mean().item(),
                "entropy": masked_mean(ro["entropy"], m).item(),
                "non_score_reward": (-self.kl_coef * kl_seq).mean().item(),
                "reply_len": m.sum(-1).mean().item(),
                "advantage_mean": masked_mean(adv, m).item(),
                "value_mean": masked_mean(ro["values"], m).item(),
                "rollout_tokens_per_s": tokens_per_s,
                "tokens": int(ro["mask"].sum()),
                "sample": ro["reply_texts"][0][:200]}

    def evaluate(self, prompt_texts: Sequence[str]) -> dict:
        """Mean reward and KL (per reply) of sampled replies to ``prompt_texts`` (held out), no update;
        on several processes each samples its part and the means are over all of them."""
        mine, n_real = padded_part(self.par, prompt_texts)   # under FSDP: the same number of prompts everywhere
        ro = self.rollout(mine) if mine else None
        sums = ([float(ro["scores"][:n_real].sum()), float(ro["kl"][:n_real].sum()), n_real] if ro is not None
                else [0.0, 0.0, 0])
        reward, kl, n = self.par.sum(sums)
        return {"reward": round(reward / max(n, 1), 6), "kl": round(kl / max(n, 1), 6)}


def path_or_none(p: str | os.PathLike | None) -> str | None:
    return os.fspath(p) if p is not None else None


def ranks_agree(model, row: dict, device) -> bool | None:
    """Several processes: whether every one ends with rank 0's trainable weights (a float64
    checksum; under FSDP over the whole parameters, summed over their shards) and rank 0's last
    training row (figures averaged over the processes, timing aside); None in one process. Collective."""
    import torch

    from refinery.tasks.train import distributed as dist
    from refinery.tasks.train.fsdp import to_float
    from refinery.tasks.train.metrics import TIMING_KEYS

    if not dist.is_initialized() or dist.env()[1] <= 1:
        return None
    with torch.no_grad():   # to_float of a sharded sum: a collective, in the same order on every process
        weights = sum(to_float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad)
    mine = {"weights": weights, **{k: float(v) for k, v in row.items() if k not in TIMING_KEYS
                                   and isinstance(v, (int, float)) and not isinstance(v, bool)}}
    ref = dist.broadcast_object(mine)
    differs = mine.keys() != ref.keys() or any(abs(mine[k] - ref[k]) > 1e-6 * max(1.0, abs(ref[k])) for k in ref)
    return not dist.any_true(differs, device)


def rl_stats(res: EngineResult, total: int, mem, model, keys: Sequence[str] = ()) -> dict:
    """The figures of a PPO or GRPO run: the run's status and length, the first/last/averaged
    reward and KL of its training rows (and the ``keys`` first and last), held-out rewards before
    and after, early stopping, time, tokens, memory and parameters."""
    train = res.train_rows()
    vals = res.val_rows()
    if not train:
        raise RuntimeError(f"the run has no training steps (status {res.status})")
    first, last = train[0], train[-1]
    k = max(1, min(3, len(train) // 2))  # averages over the first / last few steps
    avg = lambda rows, key: round(sum(r[key] for r in rows) / len(rows), 6)  # noqa: E731
    restored = res.restored_step
    stats = {"steps": len(train), "status": res.status, "total_steps": total,
             "reward_first": first["reward"], "reward_last": last["reward"],
             "reward_start_avg": avg(train[:k], "reward"), "reward_end_avg": avg(train[-k:], "reward"),
             "kl_last": last["kl"], "kl_max": max(r["kl"] for r in train), "kl_end_avg": avg(train[-k:], "kl"),
             **{f"{key}_first": first[key] for key in keys}, **{f"{key}_last": last[key] for key in keys},
             "held_out_reward_before": vals[0]["val_reward"] if vals else None,
             # after: the weights kept (the best validation's, when they were restored)
             "held_out_reward_after": (res.stopper.best if restored is not None else vals[-1]["val_reward"])
             if vals else None,
             "restored_step": restored, **(res.stopper.summary() if vals else {}),
             "resumed_from": res.resumed_from, "train_seconds": round(res.seconds, 3), "train_tokens": res.tokens,
             **mem.stats(), **count_params(model)}
    agree = ranks_agree(model, last, mem.device)
    if agree is not None:   # several processes: they must have stayed in step
        stats["ranks_agree"] = agree
    return stats


def train_ppo(policy_dir: str, prompts: Sequence[str], reward_fn: RewardFn, cfg: PPOConfig, seed: int = 0,
              on_step: Callable[[dict], None] | None = None, progress: bool = False,
              log_dir: str | os.PathLike | None = None, held_out: Sequence[str] = (),
              ckpt_dir: str | os.PathLike | None = None, stop_after: int | None = None) -> PPOResult:
    """Run ``cfg.max_steps`` PPO steps on the engine; each step takes the next ``batch_size``
    prompts of a seeded shuffle of ``prompts`` (reshuffled each pass). Per-step metrics go to
    ``log_dir`` (default ``ckpt_dir/metrics``; in memory only when both are None). With ``held_out``
    prompts, every ``eval_every`` steps the mean reward of sampled replies to them is a validation
    row and the early-stopping metric. With ``ckpt_dir``, checkpoints go there (every
    ``checkpoint_every`` steps, on SIGTERM, on ``stop_after``) and a rerun resumes from the newest;
    ``stats["status"]`` says whether the run finished (see :meth:`PPOResult.raise_if_interrupted`)."""
    trainer = PPOTrainer(policy_dir, prompts, reward_fn, cfg, seed, held_out=held_out)
    # A value loss of weight 0 leaves the value head without gradients, which DDP must be told.
    res = Engine(trainer, cfg, total=cfg.max_steps, device=trainer.device, ckpt_dir=path_or_none(ckpt_dir),
                 metrics_dir=path_or_none(log_dir), progress=progress, on_row=on_step, stop_after=stop_after,
                 find_unused=cfg.vf_coef == 0, title="PPO").fit()
    stats = rl_stats(res, cfg.max_steps, trainer.mem, trainer.policy, keys=("entropy", "kl_coef"))
    if not held_out:   # PPO reports held-out figures only with held-out prompts
        stats = {k: v for k, v in stats.items() if not k.startswith("held_out_reward")}
    return PPOResult(policy=trainer.policy, tokenizer=trainer.tokenizer, history=res.history, stats=stats)


def save_value_head(policy, out_dir: str) -> str:
    """The value head as ``value_head.safetensors`` (so PPO can be resumed or inspected)."""
    from safetensors.torch import save_file

    path = os.path.join(out_dir, "value_head.safetensors")
    save_file({k: v.detach().contiguous() for k, v in policy.v_head.state_dict().items()}, path)
    return path
