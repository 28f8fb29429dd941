"""GRPO's loss types, reward scalings, asymmetric clipping and dynamic sampling: each loss equal to
TRL 1.16's ``GRPOTrainer._compute_loss`` of that ``loss_type`` on the same batch, the scalings to
TRL's formulas, and the step's minibatch weighting (dapo's token count over the whole step,
dynamic sampling's dropped groups) the same update on one process or two."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from refinery_testlib import trl_grpo_loss

from refinery.tasks.align.grpo import (LOSS_TYPES, GRPOConfig, GRPOTrainer, _Batch, equal_groups, group_advantages,
                                       grpo_loss)


@pytest.mark.parametrize("clip_high", [None, 0.28])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_every_grpo_loss_type_equals_trl(loss_type, beta, clip_high):
    """Loss and gradient per loss type, with and without the KL term, symmetric and asymmetric
    clipping (ratios on both sides of both clips), completions of uneven lengths."""
    g = torch.Generator().manual_seed(7)
    B, T = 6, 5
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + 0.4 * torch.randn(B, T, generator=g)
    ref = old + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    adv[0], adv[2] = 1.0, -1.0
    logp[0, 0], logp[2, 1] = old[0, 0] + 0.5, old[2, 1] - 0.5   # beyond both upper and both lower clips
    logp.requires_grad_()
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    ours, _ = grpo_loss(logp, old, ref, adv, mask.float(), beta, 0.2, loss_type, clip_high, max_completion_length=T)
    theirs = trl_grpo_loss(logp, old, ref, adv, mask, beta, loss_type, 0.2, clip_high or 0.2, T)
    assert torch.allclose(ours, theirs, atol=1e-6), (ours.item(), theirs.item())
    (g1,) = torch.autograd.grad(ours, logp)
    (g2,) = torch.autograd.grad(theirs, logp)
    assert torch.allclose(g1, g2, atol=1e-6)
    if clip_high:   # the upper clip matters on this batch: a symmetric clip gives another loss
        sym, _ = grpo_loss(logp, old, ref, adv, mask.float(), beta, 0.2, loss_type, None, max_completion_length=T)
        assert not torch.allclose(sym, ours)


def test_reward_scalings_match_trl():
    """TRL's three scalings: group std, batch std (unbiased, nanstd), none; a group whose rewards
    are all equal gets advantage 0 under each, and is what dynamic sampling drops."""
    from trl.trainer.utils import nanstd

    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.5, 3.0, 1.0, 0.0])
    g = r.view(3, 4)
    centred = (g - g.mean(1, keepdim=True)).reshape(-1)
    want = {"group": centred / (nanstd(g, dim=1).repeat_interleave(4) + 1e-4),
            "batch": centred / (nanstd(r) + 1e-4), "none": centred}
    for scale, w in want.items():
        assert torch.allclose(group_advantages(r, 4, scale), w), scale
        assert torch.equal(group_advantages(r, 4, scale)[4:8], torch.zeros(4))
    # a batch spread over processes: its std given, as each process computes from the all-reduced sums
    assert torch.allclose(group_advantages(r[:8], 4, "batch", float(nanstd(r))), want["batch"][:8])
    assert torch.allclose(group_advantages(r, 4, True), want["group"]) and torch.allclose(group_advantages(r, 4, False), centred)
    assert equal_groups(r, 4).tolist() == [False] * 4 + [True] * 4 + [False] * 4


def test_grpo_config_loss_knobs():
    assert GRPOConfig().reward_scaling == "group" and GRPOConfig(loss_type="dr_grpo").reward_scaling == "none"
    assert GRPOConfig(scale_rewards=False).scale_rewards == "none" and GRPOConfig(scale_rewards="true").scale_rewards == "group"
    assert GRPOConfig(loss_type="dapo", scale_rewards="batch").reward_scaling == "batch"
    with pytest.raises(ValueError, match="dr_grpo removes the std normalisation"):
        GRPOConfig(loss_type="dr_grpo", scale_rewards="group")
    with pytest.raises(ValueError, match="loss_type"):
        GRPOConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="clip_range_high"):
        GRPOConfig(clip_range_high=0)


def _step(loss_type: str, dynamic: bool, world: int, rank: int, totals=None):
    """The gradient of one step (2 sampled batches, groups of 2 completions, minibatches of 3) on
    process ``rank`` of ``world`` (each holds every ``world``-th group), built by the trainer's own
    minibatch planning (:meth:`GRPOTrainer._passes`); ``totals``: the all-reduced sums."""
    g = torch.Generator().manual_seed(0)
    G, groups, accum, mbs, T = 2, 4, 2, 3, 5
    cfg = GRPOConfig(loss_type=loss_type, dynamic_sampling=dynamic, num_generations=G, mini_batch_size=mbs,
                     grad_accum=accum, batch_size=groups, max_new_tokens=T)
    batches = []
    for b in range(accum):
        feats = torch.randn(groups * G, T, generator=g)
        rewards = torch.rand(groups * G, generator=g)
        rewards[2 * b * G:(2 * b + 1) * G] = 1.0   # one group per batch scored all alike
        old = -torch.rand(groups * G, T, generator=g)
        ref = old + 0.1 * torch.randn(groups * G, T, generator=g)
        mask = (torch.arange(T)[None, :] < torch.randint(1, T + 1, (groups * G, 1), generator=g)).float()
        rows = torch.tensor([i for k in range(rank, groups, world) for i in range(k * G, (k + 1) * G)])
        adv = group_advantages(rewards[rows], G)
        batches.append(_Batch(feats[rows], None, 0, None, mask[rows], old[rows], ref[rows], adv, rewards[rows]))
    seen = []
    par = SimpleNamespace(world=world, sum=lambda v: (seen.append(v), totals or v)[1])
    me = SimpleNamespace(cfg=cfg, n_local=len(batches[0].c_mask), par=par)
    plan = GRPOTrainer._passes(me, batches)
    assert len(plan) == accum * -(-me.n_local // mbs)   # every process makes accum() passes, stand-ins or not
    theta = torch.tensor(0.3, requires_grad=True)
    for b, sl, w in plan:
        logp = b.old_logp[sl] + theta * b.ids[sl]
        loss, _ = grpo_loss(logp, b.old_logp[sl], b.ref_logp[sl], b.advantages[sl], b.c_mask[sl], 0.04, 0.2,
                            loss_type, None, T, me.step_tokens)
        (loss * w).backward()
    return theta.grad, seen[0], batches


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_two_processes_make_the_one_process_step(loss_type, dynamic):
    """Each loss type's step (dapo: normalised by all the step's tokens; dynamic sampling: over
    the groups kept) is the same update on one process and on two (gradients averaged as DDP
    does), and the one-process update is the loss written out over the step's kept completions.
    bnpo (a token mean per minibatch, TRL's "local batch") is only planned: its value depends on
    how the completions fall into minibatches."""
    one, _, batches = _step(loss_type, dynamic, 1, 0)
    if loss_type == "bnpo":   # a token mean per minibatch: depends on how the minibatches fall (as TRL says)
        return
    locals_ = [_step(loss_type, dynamic, 2, r)[1] for r in (0, 1)]
    totals = [a + b for a, b in zip(*locals_)]
    two = (_step(loss_type, dynamic, 2, 0, totals)[0] + _step(loss_type, dynamic, 2, 1, totals)[0]) / 2
    assert one.abs() > 1e-4 and torch.allclose(one, two, atol=1e-6), (one, two)

    theta = torch.tensor(0.3, requires_grad=True)   # the written-out objective
    per_comp, tok_sum, tok_n, n = [], 0.0, 0.0, 0
    for b in batches:
        keep = ~equal_groups(b.rewards, 2) if dynamic else torch.ones(len(b.c_mask), dtype=torch.bool)
        logp = b.old_logp + theta * b.ids
        ratio = torch.exp(logp - b.old_logp)
        a = b.advantages[:, None]
        d = b.ref_logp - logp
        tok = (-torch.min(ratio * a, ratio.clamp(0.8, 1.2) * a) + 0.04 * (torch.exp(d) - d - 1)) * b.c_mask
        for i in keep.nonzero().squeeze(-1).tolist():
            per_comp.append(tok[i].sum() / b.c_mask[i].sum())
            tok_sum, tok_n, n = tok_sum + tok[i].sum(), tok_n + b.c_mask[i].sum(), n + 1
    want = {"grpo": sum(per_comp) / n, "dr_grpo": tok_sum / (n * 5), "dapo": tok_sum / tok_n}[loss_type]
    (gw,) = torch.autograd.grad(want, theta)
    assert torch.allclose(one, gw, atol=1e-6), (one, gw)


def test_dapo_run_without_reference_with_dynamic_sampling(tiny_causal_lm_dir):
    """A short run as the acceptance command sets it (dapo, beta 0, clip-higher, dynamic sampling):
    no reference model is built, the kept share of groups is logged, every figure is finite, and
    the weights move."""
    from refinery.tasks.align.rewards import resolve_reward_func
    from refinery.tasks.engine.trainer import Engine

    prompts = [f"{a}+{b}=" for a in range(4) for b in range(2)]
    cols = [{"answer": f"#### {a + b}"} for a in range(4) for b in range(2)]
    cfg = GRPOConfig(max_steps=3, batch_size=2, num_generations=4, mini_batch_size=3, max_new_tokens=6, max_prompt_len=8,
                     lr=3e-3, beta=0.0, loss_type="dapo", clip_range_high=0.28, dynamic_sampling=True, num_iterations=2,
                     reward_funcs=["number", "length"], warmup_steps=0, scheduler="constant", device="cpu")
    funcs = {n: resolve_reward_func(n) for n in cfg.reward_funcs}
    trainer = GRPOTrainer(str(tiny_causal_lm_dir), prompts, cols, funcs, cfg, seed=0)
    assert trainer.ref is None
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    res = Engine(trainer, cfg, total=3, device=trainer.device, title="GRPO").fit()
    rows = [r for r in res.history if r["split"] == "train"]
    assert len(rows) == 3
    for r in rows:
        assert 0.0 <= r["kept_groups"] <= 1.0 and r["kl"] == 0.0
        assert all(v == v for v in r.values() if isinstance(v, float)), r   # no NaN
    assert any(float((start[k] - v).abs().max()) > 0 for k, v in trainer.model.state_dict().items())
