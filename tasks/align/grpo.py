"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath), our own loop.

One GRPO step, readable top to bottom:

1. **Sample a group**: for each of ``batch_size`` prompts, ``num_generations`` completions from
   the policy (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``); a completion ends at its
   first EOS.
2. **Score**: each reward function (plain Python callables named in ``reward_funcs``, see
   :mod:`refinery.tasks.align.rewards`, or a reward model) gives one number per completion; the
   reward is their weighted sum.
3. **Group-relative advantages**: ``A_i = (r_i - mean(group)) / (std(group) + 1e-4)`` (without
   ``scale_rewards``: only the mean is subtracted); no value model, the group is the baseline.
4. **Optimise** (``num_iterations`` passes): per token, the clipped objective
   ``-min(ratio * A, clip(ratio, 1-eps, 1+eps) * A)`` with ``ratio = pi / pi_old``, plus
   ``beta * KL`` to the reference with the unbiased estimator ``exp(ref - logp) - (ref - logp) - 1``;
   averaged over each completion's tokens, then over completions (TRL's ``loss_type="grpo"``;
   :func:`grpo_loss` equals TRL 1.16's loss on the same batch, tested).

The reference is a frozen copy of the starting policy (with LoRA: the same model with its
adapters disabled, no second copy; with ``beta=0`` none is kept). Dropout is off (eval mode).
Practice as in every align trainer (:mod:`refinery.tasks.align.practice`): ``grad_accum`` sampled
batches per optimizer step, warm-up + schedule, clipping, and early stopping on the mean reward
of greedy completions to held-out prompts, the best weights restored.

Our own rather than TRL's ``GRPOTrainer``: it runs inside our stages (cached by fingerprint,
metrics through :mod:`refinery.tasks.train.metrics`), takes our parameter names, and needs neither
``datasets`` nor ``accelerate`` at run time.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from pydantic import Field, field_validator, model_validator

from refinery.tasks.align.common import (SamplingParams, LoraSettings, apply_lora, count_params, load_tokenizer, pad, pick_device,
                                         position_ids, seed_everything, step_metrics, torch_dtype)
from refinery.tasks.align.practice import EarlyStopping, make_optimisation, restore_best
from refinery.tasks.train.config import ParallelParams, ScheduleParams


class GRPOConfig(ScheduleParams, ParallelParams, SamplingParams):
    """GRPO settings. ``max_steps`` counts optimizer steps, each over ``grad_accum`` sampled batches
    of ``batch_size`` prompts times ``num_generations`` completions; ``lr`` 1e-5 (a pretrained
    policy; no new layer, so ``head_lr`` is unused)."""

    field_defaults = dict(max_steps=20, lr=1e-5, batch_size=4, dtype="float32", max_prompt_len=128, max_new_tokens=64)

    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (the group).")
    mini_batch_size: int = Field(16, ge=1, description="Completions per forward/backward pass.")
    num_iterations: int = Field(1, ge=1, description="Optimisation passes over each sampled batch (>1: the ratio clip acts).")
    beta: float = Field(0.04, ge=0, description="Weight of the per-token KL to the reference (0: no reference kept).")
    clip_range: float = Field(0.2, gt=0, description="Policy ratio clip (epsilon).")
    scale_rewards: bool = Field(True, description="Divide advantages by the group's reward std (Dr. GRPO: false).")
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

    @model_validator(mode="after")
    def _weights(self):
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights: {len(self.reward_weights)} weights for {len(self.reward_funcs)} reward_funcs")
        if not self.reward_funcs:
            raise ValueError("reward_funcs: at least one")
        return self


# --------------------------------------------------------------------------- the pieces
def group_advantages(rewards, group: int, scale: bool = True):
    """``(r - group mean) / (group std + 1e-4)`` for rewards laid out group after group (TRL's
    ``scale_rewards="group"``: the unbiased std), or only ``r - group mean``."""
    r = rewards.view(-1, group)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + 1e-4)
    return adv.reshape(-1)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, beta: float, clip_range: float):
    """The GRPO loss of a batch of completions (token log-probs (B, T), advantages (B,), mask (B, T))
    and its figures: the per-token clipped objective plus ``beta`` times the k3 KL estimate,
    averaged over each completion's tokens, then over completions."""
    import torch

    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
    per_token = -torch.min(ratio * a, ratio.clamp(1 - clip_range, 1 + clip_range) * a)
    kl = None
    if beta != 0.0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
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
    stats: dict = field(default_factory=dict)


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


class GRPOTrainer:
    """The policy, the reference (when ``beta`` > 0), the reward functions, and GRPO steps."""

    def __init__(self, model_dir: str, reward_funcs: dict[str, Callable], cfg: GRPOConfig, seed: int = 0):
        from transformers import AutoModelForCausalLM, GenerationConfig

        seed_everything(seed)
        self.cfg, self.seed = cfg, seed
        self.reward_funcs = reward_funcs
        self.weights = list(cfg.reward_weights or [1.0] * len(reward_funcs))
        if len(self.weights) != len(reward_funcs):
            raise ValueError(f"{len(self.weights)} reward weights for {len(reward_funcs)} reward functions")
        self.tokenizer = load_tokenizer(model_dir)
        self.device = pick_device(cfg.device)
        lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(cfg.dtype))
        self.ref = None
        if cfg.lora.enabled:
            lm = apply_lora(lm, cfg.lora, "CAUSAL_LM")   # reference: adapters disabled
        elif cfg.beta:
            self.ref = copy.deepcopy(lm).eval().requires_grad_(False).to(self.device)
        self.model = lm.to(self.device).eval()   # no dropout: the same tokens get the same log-probs
        self.optim = make_optimisation(self.model, cfg, cfg.max_steps)
        tok = self.tokenizer
        self.eos_id = tok.eos_token_id
        common = dict(pad_token_id=tok.pad_token_id, eos_token_id=self.eos_id, bos_token_id=tok.bos_token_id)
        self.sample_config = GenerationConfig(do_sample=True, max_new_tokens=cfg.max_new_tokens,
                                              temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, **common)
        self.greedy_config = GenerationConfig(do_sample=False, max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
                                              **common)
        self.step_no = 0
        self.tokens = 0

    # -- sampling and scoring
    def generate(self, prompts: Sequence[str], greedy: bool = False):
        """Completions of ``prompts``: (ids, mask, P, completion ids, completion mask, texts)."""
        import torch

        from refinery.tasks.align.ppo import reply_mask

        tok = self.tokenizer
        p_ids, p_mask = pad([tok(t)["input_ids"][-self.cfg.max_prompt_len:] for t in prompts], tok.pad_token_id, "left")
        p_ids, p_mask = p_ids.to(self.device), p_mask.to(self.device)
        P = p_ids.shape[1]
        with torch.no_grad():
            out = self.model.generate(input_ids=p_ids, attention_mask=p_mask,
                                      generation_config=self.greedy_config if greedy else self.sample_config)
        comp = out[:, P:]
        if comp.shape[1] == 0:
            raise RuntimeError("generation produced no tokens")
        c_mask = reply_mask(comp, self.eos_id)
        texts = [tok.decode(c[m.bool()].tolist(), skip_special_tokens=True) for c, m in zip(comp, c_mask)]
        return torch.cat([p_ids, comp], 1), torch.cat([p_mask, c_mask], 1), P, comp, c_mask.float(), texts

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

    def sample(self, prompts: Sequence[str], columns: Sequence[dict]) -> tuple[_Batch, dict]:
        """Sample the groups of a batch of prompts, score them, compute advantages and the
        log-probs the loss compares against."""
        import contextlib

        import torch

        cfg, G = self.cfg, self.cfg.num_generations
        rep_prompts = [p for p in prompts for _ in range(G)]
        rep_cols = [c for c in columns for _ in range(G)]
        ids, mask, P, comp, c_mask, texts = self.generate(rep_prompts)
        total, parts = self.rewards(rep_prompts, texts, rep_cols)
        r = torch.tensor(total, dtype=torch.float32)
        adv = group_advantages(r, G, cfg.scale_rewards).to(self.device)
        old = self._logps(lambda: self.model, ids, mask, P, comp) if cfg.num_iterations > 1 else None
        ref = None
        if cfg.beta:
            if self.ref is not None:
                ref = self._logps(lambda: self.ref, ids, mask, P, comp)
            else:   # LoRA: the same model with its adapters off
                ctx = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else contextlib.nullcontext()
                with ctx:
                    ref = self._logps(lambda: self.model, ids, mask, P, comp)
        self.tokens += int(mask.sum())
        grouped = r.view(-1, G)
        figs = {"reward": r.mean().item(), "reward_std": grouped.std(dim=1).mean().item(),
                "zero_std_groups": (grouped.std(dim=1) == 0).float().mean().item(),
                "completion_len": c_mask.sum(-1).mean().item(),
                **{f"reward_{n}": sum(v) / len(v) for n, v in parts.items()}}
        return _Batch(ids, mask, P, comp, c_mask, old, ref, adv), {"figs": figs, "sample": texts[0][:200]}

    # -- one optimizer step
    def step(self, batches: Sequence[tuple[Sequence[str], Sequence[dict]]]) -> dict:
        """``grad_accum`` (prompts, columns) batches -> one optimizer step (``num_iterations``
        passes: each pass but the last steps too, as TRL does). Returns the step's figures."""
        import torch

        cfg = self.cfg
        sampled = [self.sample(p, c) for p, c in batches]
        agg = {"loss": 0.0, "kl": 0.0, "clipfrac": 0.0}
        n_mb = 0
        opt_figs: dict = {}
        for _ in range(cfg.num_iterations):
            for b, _info in sampled:
                N = len(b.ids)
                for i in range(0, N, cfg.mini_batch_size):
                    sl = slice(i, i + cfg.mini_batch_size)
                    logp = _token_logps(self.model, b.ids[sl], b.mask[sl], b.P, b.completions[sl], cfg.temperature)
                    old = b.old_logp[sl] if b.old_logp is not None else logp.detach()
                    ref = b.ref_logp[sl] if b.ref_logp is not None else None
                    m = b.c_mask[sl]
                    loss, kl = grpo_loss(logp, old, ref, b.advantages[sl], m, cfg.beta, cfg.clip_range)
                    self.optim.backward(loss * (len(logp) / N))
                    with torch.no_grad():
                        den = m.sum().clamp(min=1)
                        agg["loss"] += loss.item()
                        agg["kl"] += ((kl * m).sum() / den).item() if kl is not None else 0.0
                        ratio = torch.exp(logp - old)
                        agg["clipfrac"] += (((ratio - 1).abs() > cfg.clip_range).float() * m).sum().item() / den.item()
                        n_mb += 1
            opt_figs = self.optim.step()
        self.step_no += 1
        figs = {k: sum(info["figs"][k] for _, info in sampled) / len(sampled) for k in sampled[0][1]["figs"]}
        rec = {"step": self.step_no, **figs, **{k: v / max(n_mb, 1) for k, v in agg.items()}, **opt_figs}
        rec = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in rec.items()}
        rec["sample"] = sampled[0][1]["sample"]
        return rec

    def evaluate(self, prompts: Sequence[str], columns: Sequence[dict]) -> dict:
        """Mean reward of greedy completions to held-out prompts (and each function's)."""
        total: list[float] = []
        parts: dict[str, list[float]] = {n: [] for n in self.reward_funcs}
        for i in range(0, len(prompts), self.cfg.mini_batch_size):
            ps, cs = list(prompts[i:i + self.cfg.mini_batch_size]), list(columns[i:i + self.cfg.mini_batch_size])
            *_, texts = self.generate(ps, greedy=True)
            t, p = self.rewards(ps, texts, cs)
            total += t
            for n in parts:
                parts[n] += p[n]
        out = {"reward": round(sum(total) / max(len(total), 1), 6)}
        out.update({f"reward_{n}": round(sum(v) / max(len(v), 1), 6) for n, v in parts.items()})
        return out


def train_grpo(model_dir: str, prompts: Sequence[str], columns: Sequence[dict], reward_funcs: dict[str, Callable],
               cfg: GRPOConfig, seed: int = 0, held_out: tuple[Sequence[str], Sequence[dict]] = ((), ()),
               on_step: Callable[[dict], None] | None = None, progress: bool = False,
               log_dir: str | os.PathLike | None = None) -> GRPOResult:
    """Run ``cfg.max_steps`` GRPO steps over a seeded shuffle of ``prompts`` (rendered prompt texts;
    ``columns``: each prompt's other columns, passed to the reward functions). With ``held_out``
    (prompts, columns), greedy completions are scored every ``eval_every`` steps: validation rows
    and the early-stopping metric (``reward``)."""
    import torch

    from refinery.tasks.train.common import PeakMemory

    if not prompts:
        raise ValueError("GRPO: no prompts")
    if len(columns) != len(prompts):
        raise ValueError("GRPO: one columns dict per prompt")
    trainer = GRPOTrainer(model_dir, reward_funcs, cfg, seed)
    mem = PeakMemory(trainer.device).start()
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []

    def next_batch():
        idx = []
        nonlocal order
        while len(idx) < cfg.batch_size:
            if not order:
                order = torch.randperm(len(prompts), generator=gen).tolist()
            idx.append(order.pop(0))
        return [prompts[i] for i in idx], [columns[i] for i in idx]

    steps = step_metrics(log_dir, cfg, cfg.max_steps, "grpo", progress, on_step, show=("reward", "kl"))
    stopper = EarlyStopping("reward", "max", cfg.early_stopping_patience, cfg.early_stopping_min_delta)
    eval_every = cfg.resolved_eval_every(cfg.max_steps)
    h_prompts, h_cols = held_out
    t0 = time.perf_counter()
    if h_prompts:   # the starting policy's held-out reward: what training has to beat
        val = trainer.evaluate(h_prompts, h_cols)
        steps.val(0, tokens=0, **val)
        stopper.update(val["reward"], 0, trainer.model)
    for _ in range(cfg.max_steps):
        rec = trainer.step([next_batch() for _ in range(cfg.grad_accum)])
        step = rec.pop("step")
        steps.train(step, tokens=trainer.tokens, **rec)
        if h_prompts and (step % eval_every == 0 or step == cfg.max_steps):
            val = trainer.evaluate(h_prompts, h_cols)
            steps.val(step, tokens=trainer.tokens, **val)
            stopper.update(val["reward"], step, trainer.model)
            if stopper.should_stop:
                break
    restored = restore_best(stopper, trainer.model, cfg, trainer.step_no)
    steps.close()
    steps.plot("GRPO", panels=("reward", "kl", "completion_len"))
    train = [r for r in steps.history if r["split"] == "train"]
    vals = [r for r in steps.history if r["split"] == "val"]
    k = max(1, min(3, len(train) // 2))
    avg = lambda rows, key: round(sum(r[key] for r in rows) / len(rows), 6)  # noqa: E731
    stats = {"steps": len(train), "reward_first": train[0]["reward"], "reward_last": train[-1]["reward"],
             "reward_start_avg": avg(train[:k], "reward"), "reward_end_avg": avg(train[-k:], "reward"),
             "kl_last": train[-1]["kl"], "kl_max": max(r["kl"] for r in train),
             "held_out_reward_before": vals[0]["val_reward"] if vals else None,
             # after: the weights kept (the best validation's, when they were restored)
             "held_out_reward_after": (stopper.best if restored is not None else vals[-1]["val_reward"]) if vals else None,
             "restored_step": restored, **(stopper.summary() if h_prompts else {}),
             "train_seconds": round(time.perf_counter() - t0, 3), "train_tokens": trainer.tokens, **mem.stats(),
             **count_params(trainer.model)}
    return GRPOResult(model=trainer.model, tokenizer=trainer.tokenizer, history=steps.history, stats=stats)


__all__ = ["GRPOConfig", "GRPOResult", "GRPOTrainer", "group_advantages", "grpo_loss", "train_grpo"]
