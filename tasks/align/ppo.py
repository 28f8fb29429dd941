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
every step, so the measured KL is steered towards the target. The optimisation practice
(accumulation over minibatches, warm-up + schedule over the optimizer steps, clipping, early
stopping on the mean reward of held-out prompts with the best weights restored) is that of
:mod:`refinery.tasks.align.practice`.
Dropout is off throughout (eval mode), so log-probabilities of the same tokens are reproducible.
Every step reports mean reward, KL to the reference (per reply, summed over tokens), entropy
(per token), losses, clip fractions and reply length.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from pydantic import Field, model_validator

from refinery.tasks.align.common import (SamplingParams, LoraSettings, count_params, pad,
                                pick_device, position_ids, seed_everything, step_metrics)
from refinery.tasks.engine.parallel import Parallel
from refinery.tasks.align.practice import EarlyStopping, make_optimisation, restore_best
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
        # update, so the ranks run the same number of synchronised backward passes
        if self.devices > 1 and self.strategy == "fsdp":
            raise ValueError("strategy=fsdp is not available for this trainer; use strategy=ddp (or auto)")
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
    stats: dict = field(default_factory=dict)


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
    target: float
    horizon: int

    def update(self, kl: float, n: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n / self.horizon
        return self.value


def updates_per_step(cfg: PPOConfig) -> int:
    """Optimizer steps per PPO step: every ``grad_accum`` minibatches of each epoch (the last of an
    epoch flushes what is left)."""
    minibatches = -(-cfg.batch_size // cfg.mini_batch_size)
    return cfg.ppo_epochs * -(-minibatches // cfg.grad_accum)


class PPOTrainer:
    """Holds the policy (+value head), the frozen reference, the optimizer, and does PPO steps."""

    def __init__(self, policy_dir: str, reward_fn: RewardFn, cfg: PPOConfig, seed: int = 0):
        from transformers import GenerationConfig

        seed_everything(seed)
        self.cfg, self.seed, self.reward_fn = cfg, seed, reward_fn
        self.device = pick_device(cfg.device)
        self.tokenizer, self.policy, self.ref = load_ppo_policy(policy_dir, cfg)
        self.policy.to(self.device)
        if self.ref is not None:
            self.ref.to(self.device)
        self.policy.eval()  # no dropout: log-probs of the same tokens must not change between passes
        # several processes (DDP): training passes go through par.train; sampling uses the policy itself.
        # A value loss of weight 0 leaves the value head without gradients, which DDP must be told.
        self.par = Parallel.setup(self.policy, cfg, self.device, find_unused=cfg.vf_coef == 0)
        if self.par.world > 1:   # each rank samples its own replies
            seed_everything(seed + 7919 * self.par.rank)
        if cfg.batch_size % self.par.world or cfg.mini_batch_size % self.par.world:   # several nodes too
            raise ValueError(f"ppo: batch_size={cfg.batch_size} and mini_batch_size={cfg.mini_batch_size} must be "
                             f"multiples of the {self.par.world} processes")
        self.mb = cfg.mini_batch_size // self.par.world   # this rank's replies per update
        self.optim = make_optimisation(self.policy, cfg, cfg.max_steps * updates_per_step(cfg), parallel=self.par)
        self.kl = AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target else None
        self.kl_coef = cfg.kl_coef
        tok = self.tokenizer
        self.eos_id = tok.eos_token_id
        self.gen_config = GenerationConfig(
            do_sample=True, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            top_k=cfg.top_k, top_p=cfg.top_p, pad_token_id=tok.pad_token_id, eos_token_id=self.eos_id,
            bos_token_id=tok.bos_token_id)
        self.step_no = 0
        self.tokens = 0   # prompt + reply tokens of every rollout so far

    # -- reference log-probs
    def _ref_logits(self, ids, mask):
        import torch

        with torch.no_grad():
            if self.ref is not None:
                return self.ref(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
            with self.policy.lm.disable_adapter():
                return self.policy.lm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits

    # -- rollout
    def rollout(self, prompt_texts: Sequence[str]) -> dict:
        import torch

        tok, cfg = self.tokenizer, self.cfg
        prompt_ids = [tok(t)["input_ids"][-cfg.max_prompt_len:] for t in prompt_texts]
        p_ids, p_mask = pad(prompt_ids, tok.pad_token_id, "left")
        p_ids, p_mask = p_ids.to(self.device), p_mask.to(self.device)
        P = p_ids.shape[1]
        with torch.no_grad():
            out = self.policy.lm.generate(input_ids=p_ids, attention_mask=p_mask, generation_config=self.gen_config)
        replies = out[:, P:]
        if replies.shape[1] == 0:
            raise RuntimeError("generation produced no tokens")
        r_mask = reply_mask(replies, self.eos_id)
        ids = torch.cat([p_ids, replies], 1)
        mask = torch.cat([p_mask, r_mask], 1)
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
        reply_texts = [tok.decode(r, skip_special_tokens=True) for r in reply_lists]
        scores = torch.as_tensor(self.reward_fn(list(prompt_texts), reply_texts, reply_lists), dtype=torch.float32)
        scores = scores.to(self.device)
        if scores.shape != (len(prompt_texts),):
            raise ValueError(f"reward function returned shape {tuple(scores.shape)}, expected ({len(prompt_texts)},)")
        rewards, kl = shaped_rewards(scores, logp, ref_logp, r_mask.float(), self.kl_coef)
        return {"ids": ids, "mask": mask, "P": P, "replies": replies, "r_mask": r_mask.float(), "logp": logp,
                "ref_logp": ref_logp, "values": values, "scores": scores, "rewards": rewards, "kl": kl,
                "entropy": entropy, "reply_texts": reply_texts}

    # -- optimisation
    def step(self, prompt_texts: Sequence[str]) -> dict:
        import torch

        cfg = self.cfg
        ro = self.rollout(prompt_texts)
        m = ro["r_mask"]
        adv, returns = gae(ro["rewards"], ro["values"], m, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = whiten(adv, m, parallel=self.par)
        B, P = len(prompt_texts), ro["P"]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step_no)
        self.tokens += int(self.par.sum([float(ro["mask"].sum())])[0])
        agg = {"loss": 0.0, "pg_loss": 0.0, "vf_loss": 0.0, "clipfrac": 0.0, "vf_clipfrac": 0.0, "approx_kl": 0.0,
               "updates": 0}
        grad_norms, rates = [], {}
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=gen).to(self.device)
            starts = list(range(0, B, self.mb))
            for k, i in enumerate(starts):
                idx = order[i:i + self.mb]
                mb_mask = m[idx]
                update = (k + 1) % cfg.grad_accum == 0 or k + 1 == len(starts)
                with self.par.accumulating(last=update):
                    logits, values = self.par.train(ro["ids"][idx], ro["mask"][idx])
                    logp, entropy = _reply_stats(logits[:, P - 1:-1], ro["replies"][idx], cfg.temperature)
                    values = values[:, P - 1:-1]
                    old_logp, old_v, a, ret = ro["logp"][idx], ro["values"][idx], adv[idx], returns[idx]
                    ratio = torch.exp(logp - old_logp)
                    pg = torch.max(-a * ratio, -a * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range))
                    pg_loss = masked_mean(pg, mb_mask)
                    v_clip = old_v + (values - old_v).clamp(-cfg.clip_range_value, cfg.clip_range_value)
                    vf = 0.5 * torch.max((values - ret) ** 2, (v_clip - ret) ** 2)
                    vf_loss = masked_mean(vf, mb_mask)
                    ent = masked_mean(entropy, mb_mask)
                    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * ent
                    self.optim.backward(loss)
                if update:
                    figs = self.optim.step()
                    grad_norms.append(figs.pop("grad_norm"))
                    rates = figs
                with torch.no_grad():
                    agg["loss"] += loss.item()
                    agg["pg_loss"] += pg_loss.item()
                    agg["vf_loss"] += vf_loss.item()
                    agg["clipfrac"] += masked_mean(((ratio - 1).abs() > cfg.clip_range).float(), mb_mask).item()
                    agg["vf_clipfrac"] += masked_mean(((values - old_v).abs() > cfg.clip_range_value).float(), mb_mask).item()
                    agg["approx_kl"] += masked_mean(0.5 * (logp - old_logp) ** 2, mb_mask).item()
                    agg["updates"] += 1
        self.step_no += 1
        n = max(agg.pop("updates"), 1)
        kl_seq = ro["kl"].sum(-1)
        kl_coef = self.kl_coef   # the coefficient this step's rewards were shaped with
        rec = {
            "step": self.step_no,
            "kl_coef": kl_coef,
            "grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
            **rates,
            "reward": ro["scores"].mean().item(),
            "reward_std": ro["scores"].std().item() if B > 1 else 0.0,
            "kl": kl_seq.mean().item(),
            "entropy": masked_mean(ro["entropy"], m).item(),
            "non_score_reward": (-kl_coef * kl_seq).mean().item(),
            "reply_len": m.sum(-1).mean().item(),
            "advantage_mean": masked_mean(adv, m).item(),
            "value_mean": masked_mean(ro["values"], m).item(),
            **{k: v / n for k, v in agg.items()},
        }
        # several processes: every rank's figures averaged (the step number is every rank's own)
        rec = {"step": rec.pop("step"), **self.par.mean(rec, summed=())}
        if self.kl is not None:   # from the averaged KL, so every rank shapes its rewards alike
            self.kl_coef = self.kl.update(rec["kl"], B * self.par.world)
        rec = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in rec.items()}
        rec["sample"] = ro["reply_texts"][0][:200]
        return rec

    def evaluate(self, prompt_texts: Sequence[str]) -> dict:
        """Mean reward and KL (per reply) of sampled replies to ``prompt_texts`` (held out), no update;
        on several processes each samples its part and the means are over all of them."""
        mine = self.par.part(prompt_texts)
        ro = self.rollout(mine) if mine else None
        sums = [float(ro["scores"].sum()), float(ro["kl"].sum()), len(mine)] if ro is not None else [0.0, 0.0, 0]
        reward, kl, n = self.par.sum(sums)
        return {"reward": round(reward / max(n, 1), 6), "kl": round(kl / max(n, 1), 6)}


def train_ppo(policy_dir: str, prompts: Sequence[str], reward_fn: RewardFn, cfg: PPOConfig, seed: int = 0,
              on_step: Callable[[dict], None] | None = None, progress: bool = False,
              log_dir: str | os.PathLike | None = None, held_out: Sequence[str] = ()) -> PPOResult:
    """Run ``cfg.max_steps`` PPO steps; each step takes the next ``batch_size`` prompts of a
    seeded shuffle of ``prompts`` (reshuffled each pass). Per-step metrics go to ``log_dir``
    (refinery.tasks.train.metrics; in memory only when None). With ``held_out`` prompts, every
    ``eval_every`` steps the mean reward of sampled replies to them is a validation row and the
    early-stopping metric."""
    import torch

    from refinery.tasks.train.common import PeakMemory

    if not prompts:
        raise ValueError("PPO: no prompts")
    trainer = PPOTrainer(policy_dir, reward_fn, cfg, seed)
    mem = PeakMemory(trainer.device).start()
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    steps = step_metrics(log_dir, cfg, cfg.max_steps, "ppo", progress, on_step, show=("reward", "kl"))
    t0 = time.perf_counter()
    stopper = EarlyStopping("reward", "max", cfg.early_stopping_patience, cfg.early_stopping_min_delta)
    eval_every = cfg.resolved_eval_every(cfg.max_steps)
    if held_out:   # the starting policy's held-out reward: what training has to beat
        val = trainer.evaluate(held_out)
        steps.val(0, tokens=0, **val)
        stopper.update(val["reward"], 0, trainer.policy)
    for _ in range(cfg.max_steps):
        batch: list[str] = []
        while len(batch) < cfg.batch_size:
            if not order:
                order = torch.randperm(len(prompts), generator=gen).tolist()
            batch.append(prompts[order.pop(0)])
        rec = trainer.step(trainer.par.part(batch))   # several processes: each rolls out its part
        step = rec.pop("step")
        steps.train(step, tokens=trainer.tokens, **rec)
        if held_out and (step % eval_every == 0 or step == cfg.max_steps):
            val = trainer.evaluate(held_out)
            steps.val(step, tokens=trainer.tokens, **val)
            stopper.update(val["reward"], step, trainer.policy)
            if stopper.should_stop:
                break
    restored = restore_best(stopper, trainer.policy, cfg, trainer.step_no)
    steps.close()
    steps.plot("PPO", panels=("reward", "kl", "entropy"))
    history = [r for r in steps.history if r["split"] == "train"]
    first, last = history[0], history[-1]
    k = max(1, min(3, len(history) // 2))  # averages over the first / last few steps
    avg = lambda rows, key: round(sum(r[key] for r in rows) / len(rows), 6)  # noqa: E731
    stats = {
        "steps": len(history),
        "reward_first": first["reward"], "reward_last": last["reward"],
        "reward_start_avg": avg(history[:k], "reward"), "reward_end_avg": avg(history[-k:], "reward"),
        "kl_last": last["kl"], "kl_max": max(r["kl"] for r in history), "kl_end_avg": avg(history[-k:], "kl"),
        "entropy_first": first["entropy"], "entropy_last": last["entropy"],
        "kl_coef_first": first["kl_coef"], "kl_coef_last": last["kl_coef"],
        "restored_step": restored, **(stopper.summary() if held_out else {}),
        "train_seconds": round(time.perf_counter() - t0, 3), "train_tokens": trainer.tokens, **mem.stats(),
        **count_params(trainer.policy),
    }
    return PPOResult(policy=trainer.policy, tokenizer=trainer.tokenizer, history=steps.history, stats=stats)


def save_value_head(policy, out_dir: str) -> str:
    """The value head as ``value_head.safetensors`` (so PPO can be resumed or inspected)."""
    from safetensors.torch import save_file

    path = os.path.join(out_dir, "value_head.safetensors")
    save_file({k: v.detach().contiguous() for k, v in policy.v_head.state_dict().items()}, path)
    return path
