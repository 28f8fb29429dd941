"""RLOO: the leave-one-out advantages (KL-penalised rewards, optional standardisation) and the
sequence-level clipped loss equal TRL 1.16's ``RLOOTrainer`` on the same batch; a short run on the
engine samples through the rollout engine, logs its figures and resumes to the uninterrupted curve."""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from refinery.tasks.align.rloo import RLOOConfig, normalize, rloo_advantages, rloo_loss, train_rloo


def trl_rloo_loss(logp, old, adv, mask, eps_low, eps_high):
    """TRL 1.16's RLOOTrainer._compute_loss run as is: the forward replaced by the given per-token
    log-probs, the accelerator by single-process identities."""
    from trl.trainer.rloo_trainer import RLOOTrainer as TRLRLOO

    ident = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x)
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False, epsilon_low=eps_low, epsilon_high=eps_high, model=SimpleNamespace(training=True),
        accelerator=ident, _metrics=defaultdict(lambda: defaultdict(list)))
    B, T = logp.shape
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "old_logps": (old * mask).sum(1), "advantages": adv}
    return TRLRLOO._compute_loss(fake, None, inputs)


def trl_rloo_advantages(rewards, old, ref, mask, beta, k, normalize_advantages):
    """TRL 1.16's RLOOTrainer._generate_and_score_completions from the summed rewards on (its lines
    on a batch where every completion is scorable): the sequence KL penalty, the leave-one-out
    baseline, the optional standardisation with nanstd."""
    from trl.trainer.utils import nanstd

    rewards = rewards.clone()
    if beta != 0.0:
        per_token_kl = old - ref
        kl = (per_token_kl * mask).sum(-1)
        rewards = rewards - beta * kl
    grouped = rewards.view(-1, k)
    counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    baselines = ((torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)).view(-1)
    advantages = rewards - baselines
    if normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize("clip_high", [None, 0.28])
def test_rloo_loss_equals_trl(clip_high):
    """Loss and gradient on completions of uneven lengths, sequence ratios beyond both clips."""
    g = torch.Generator().manual_seed(3)
    B, T = 6, 5
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + 0.15 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    adv[0], adv[2] = 1.0, -1.0
    logp[0], logp[2] = old[0], old[2]
    logp[0, 0], logp[2, 1] = old[0, 0] + 0.22, old[2, 1] - 0.6   # sequence ratios 1.25 and 0.55
    logp.requires_grad_()
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    ours, clipped = rloo_loss(logp, old, adv, mask.float(), 0.2, clip_high)
    theirs = trl_rloo_loss(logp, old, adv, mask, 0.2, clip_high or 0.2)
    assert torch.allclose(ours, theirs, atol=1e-6), (ours.item(), theirs.item())
    (g1,) = torch.autograd.grad(ours, logp)
    (g2,) = torch.autograd.grad(theirs, logp)
    assert torch.allclose(g1, g2, atol=1e-6)
    assert bool(clipped[0]) == (clip_high is None) and clipped[2]   # 1.25: beyond 1.2, within 1.28


@pytest.mark.parametrize("normalise", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_rloo_advantages_equal_trl(beta, normalise):
    g = torch.Generator().manual_seed(1)
    k, B, T = 4, 12, 5
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.5, 3.0, 1.0, 0.0])
    old = -torch.rand(B, T, generator=g)
    ref = old + 0.3 * torch.randn(B, T, generator=g)
    mask = (torch.arange(T)[None, :] < torch.randint(1, T + 1, (B, 1), generator=g)).float()
    kl = ((old - ref) * mask).sum(-1)
    ours = rloo_advantages(r, k, kl, beta)
    if normalise:
        ours = normalize(ours)
    want = trl_rloo_advantages(r, old, ref, mask, beta, k, normalise)
    assert torch.allclose(ours, want, atol=1e-6)
    assert torch.allclose(ours.view(-1, k).sum(1), torch.zeros(3), atol=1e-5)   # the baseline is unbiased
    if beta == 0 and not normalise:   # by hand: 1 - mean(0, 0, 1); a group all alike teaches nothing
        assert ours[0] == pytest.approx(1 - 1 / 3) and torch.equal(ours[4:8], torch.zeros(4))
    # a batch spread over tensors (or processes): standardised with the whole batch's mean and std
    whole = normalize(rloo_advantages(r, k))
    a = rloo_advantages(r, k)
    assert torch.allclose(torch.cat([normalize(a[:8], a.mean(), a.std()), normalize(a[8:], a.mean(), a.std())]), whole)


def _sums(n: int, seed: int = 0):
    import random

    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rnd.randint(0, 4), rnd.randint(0, 4)
        out.append((f"{a}+{b}=", {"answer": f"#### {a + b}"}))
    return out


def test_rloo_run_logs_rollout_figures_and_resumes_exactly(tiny_causal_lm_dir, tmp_path):
    """A full-weight run with the KL penalty, standardised advantages, two sampled batches and two
    passes per step: every figure finite (the rollout engine's tokens/s and share of the step
    among them), the weights move, and a run stopped after step 2 and run again ends with the
    uninterrupted run's metrics and weights."""
    from refinery_testlib import assert_same_metrics

    from refinery.tasks.align.rewards import resolve_reward_func
    from refinery.tasks.train.metrics import read_metrics, without_timing

    data, held = _sums(12), _sums(2, seed=1)
    cfg = RLOOConfig(max_steps=4, batch_size=2, num_generations=3, mini_batch_size=4, grad_accum=2, num_iterations=2,
                     max_new_tokens=5, max_prompt_len=16, lr=3e-3, beta=0.05, normalize_advantages=True,
                     reward_funcs=["number", "length"], checkpoint_every=2, eval_every=2, warmup_steps=0,
                     scheduler="constant", device="cpu")
    funcs = {n: resolve_reward_func(n) for n in cfg.reward_funcs}

    def run(name, **kw):
        return train_rloo(str(tiny_causal_lm_dir), [p for p, _ in data], [c for _, c in data], funcs, cfg, seed=0,
                          held_out=([p for p, _ in held], [c for _, c in held]), ckpt_dir=tmp_path / name, **kw)

    whole = run("a")
    train = [r for r in whole.history if r["split"] == "train"]
    assert len(train) == 4 and whole.stats["status"] == "done"
    for r in train:
        for k in ("reward", "kl", "kl_seq", "reward_penalised", "loss", "clipfrac", "rollout_tokens_per_s"):
            assert r[k] == r[k], (k, r)   # present, not NaN
        assert r["rollout_tokens_per_s"] > 0 and 0 < r["gen_share"] < 1
    # the first batch comes from the reference itself: no penalty; later ones drift from it
    assert train[0]["kl_seq"] == pytest.approx(0.0, abs=1e-5) and max(abs(r["kl_seq"]) for r in train) > 0
    part = run("b", stop_after=2)
    assert part.stats["status"] == "stopped"
    rest = run("b")
    assert rest.stats["resumed_from"].endswith("step-00000002")
    a = without_timing(read_metrics(tmp_path / "a" / "metrics" / "metrics.jsonl"))
    b = without_timing(read_metrics(tmp_path / "b" / "metrics" / "metrics.jsonl"))
    assert len(a) == 4 + 3   # validation at 0, 2, 4
    assert_same_metrics(a, b)
    wa, wb = whole.model.state_dict(), rest.model.state_dict()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(str(tiny_causal_lm_dir)).state_dict()
    assert any(float((start[k] - wa[k]).abs().max()) > 0 for k in start)
