"""PPO: the pieces (masks, reward shaping, GAE) against hand computations, and a toy reward that
the policy learns while its KL to the reference stays bounded."""
from __future__ import annotations

import math

import pytest
from refinery_testlib import assert_same_metrics
import torch

from refinery.tasks.align.ppo import AdaptiveKL, PPOConfig, gae, reply_mask, shaped_rewards, train_ppo, whiten

TARGET = set(range(100, 164))  # 64 of the 512 token ids: about 1/8 of random samples hit one


def toy_reward(prompts, replies, reply_ids):
    """Fraction of generated tokens that are in TARGET."""
    return [sum(t in TARGET for t in ids) / max(len(ids), 1) for ids in reply_ids]


def test_reply_mask_stops_after_first_eos():
    r = torch.tensor([[5, 0, 1, 1], [5, 6, 7, 8], [0, 0, 1, 1]])
    assert reply_mask(r, 0).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert reply_mask(r, None).tolist() == [[1] * 4] * 3


def test_shaped_rewards_put_score_on_last_token():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -2.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = shaped_rewards(torch.tensor([2.0, 5.0]), logp, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -1.0], [0.0, 1.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 0.1 + 2.0], [0.0, -0.1 + 5.0, 0.0]]))


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 9.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    g, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, g, lam)
    # row 0, by hand
    d2 = 1.0 - 0.3
    d1 = 0.0 + g * 0.3 - 0.2
    d0 = 0.0 + g * 0.2 - 0.1
    a2, a1 = d2, d1 + g * lam * d2
    a0 = d0 + g * lam * a1
    assert torch.allclose(adv[0], torch.tensor([a0, a1, a2]))
    # row 1 ends after two tokens: the masked token's reward and value play no part
    b1 = 2.0 - 0.5
    b0 = 0.5 + g * 0.5 - 0.4 + g * lam * b1
    assert torch.allclose(adv[1], torch.tensor([b0, b1, 0.0]))
    assert torch.allclose(ret, (adv + values) * mask)
    w = whiten(adv, mask)
    assert abs(w[mask.bool()].mean().item()) < 1e-6 and w[1, 2] == 0


@pytest.fixture(scope="module")
def toy_prompts(dpo_en_path):
    from refinery.tasks.align.data import load_pairs, render_prompt

    pairs, _ = load_pairs(dpo_en_path, max_pairs=64)
    return [render_prompt(p.prompt) for p in pairs]


def _toy_cfg(**kw):
    # one rate and a constant schedule: a toy where the value head learns with the policy, and a
    # 2-step run is the first two steps of a 20-step one
    base = dict(max_steps=20, batch_size=32, mini_batch_size=16, ppo_epochs=2, lr=3e-3, head_lr=3e-3, max_new_tokens=8,
                max_prompt_len=16, kl_coef=0.05, scheduler="constant", warmup_steps=0)
    return PPOConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def toy_run(tiny_causal_lm_dir, toy_prompts):
    return train_ppo(str(tiny_causal_lm_dir), toy_prompts, toy_reward, _toy_cfg(), seed=0)


def test_ppo_raises_toy_reward_with_bounded_kl(toy_run, tiny_causal_lm_dir, toy_prompts):
    h = toy_run.history
    assert len(h) == 20
    for rec in h:  # every step reports these
        for k in ("reward", "kl", "entropy", "pg_loss", "vf_loss", "clipfrac", "approx_kl", "reply_len"):
            assert math.isfinite(rec[k]), (k, rec)
        assert rec["rollout_tokens_per_s"] > 0 and 0 < rec["gen_share"] < 1   # the rollout engine's figures
    assert h[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollout comes from the reference itself
    start = sum(r["reward"] for r in h[:4]) / 4
    end = sum(r["reward"] for r in h[-4:]) / 4
    assert start < 0.2 and end > start + 0.15, (start, end)
    # KL stays bounded: far below the bound of the KL-regularised optimum, gain / kl_coef
    kl_max = max(r["kl"] for r in h)
    assert 0 < kl_max < 0.5 * (1.0 - start) / 0.05, kl_max
    assert h[-1]["entropy"] < h[0]["entropy"]  # the policy sharpens towards the target tokens
    # same seed => identical run
    again = train_ppo(str(tiny_causal_lm_dir), toy_prompts, toy_reward, _toy_cfg(max_steps=2), seed=0)
    assert [r["reward"] for r in again.history] == [r["reward"] for r in h[:2]]
    assert [r["pg_loss"] for r in again.history] == [r["pg_loss"] for r in h[:2]]


def test_stronger_kl_penalty_keeps_policy_closer(toy_run, tiny_causal_lm_dir, toy_prompts):
    strong = train_ppo(str(tiny_causal_lm_dir), toy_prompts, toy_reward, _toy_cfg(max_steps=12, kl_coef=3.0), seed=0)
    kl_weak = sum(r["kl"] for r in toy_run.history[4:12]) / 8  # kl_coef 0.05, same steps
    kl_strong = sum(r["kl"] for r in strong.history[4:12]) / 8
    assert kl_strong < 0.6 * kl_weak, (kl_strong, kl_weak)
    gain = lambda h: sum(r["reward"] for r in h[8:12]) - sum(r["reward"] for r in h[:4])  # noqa: E731
    assert gain(strong.history) < gain(toy_run.history)


def test_ppo_with_lora_uses_disabled_adapters_as_reference(tiny_causal_lm_dir, toy_prompts, tmp_path):
    from refinery.tasks.align.common import LoraSettings, save_model

    cfg = _toy_cfg(max_steps=3, batch_size=8, mini_batch_size=4, lr=1e-2, lora=LoraSettings(enabled=True, r=4))
    res = train_ppo(str(tiny_causal_lm_dir), toy_prompts, toy_reward, cfg, seed=0)
    assert res.history[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert res.history[-1]["kl"] != 0.0  # adapters moved the policy away from the reference
    assert res.stats["trainable_params"] < res.stats["params"] / 2
    keys = save_model(res.policy.lm, res.tokenizer, str(tmp_path), lora=True)
    assert keys["merged"] == "merged" and (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "merged" / "model.safetensors").exists() and (tmp_path / "merged" / "tokenizer.json").exists()


def test_adaptive_kl_controller_moves_towards_target():
    c = AdaptiveKL(0.1, target=1.0, horizon=100)
    assert c.update(3.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))   # above target: error clipped to +0.2
    v = c.value
    assert c.update(0.9, 10) == pytest.approx(v * (1 - 0.1 * 10 / 100))     # below: shrinks in proportion
    assert c.update(1.0, 10) == pytest.approx(v * (1 - 0.1 * 10 / 100))     # on target: unchanged


def test_ppo_kl_target_adapts_the_coefficient_and_early_stops_on_held_out_reward(tiny_causal_lm_dir, toy_prompts):
    cfg = _toy_cfg(max_steps=6, batch_size=8, mini_batch_size=4, grad_accum=2, kl_target=0.01, kl_horizon=20,
                   eval_every=1, early_stopping_patience=2, scheduler="cosine", warmup_steps=2)
    res = train_ppo(str(tiny_causal_lm_dir), toy_prompts[:32], toy_reward, cfg, seed=0, held_out=toy_prompts[32:40])
    train = [r for r in res.history if r["split"] == "train"]
    coefs = [r["kl_coef"] for r in train]
    assert coefs[0] == 0.05 and len(coefs) >= 3 and len(set(coefs)) == len(coefs), coefs   # changes every step
    # each step's coefficient follows the controller from the previous step's measured KL
    for prev, nxt in zip(train, train[1:]):
        err = min(max(prev["kl"] / 0.01 - 1, -0.2), 0.2)
        assert nxt["kl_coef"] == pytest.approx(prev["kl_coef"] * (1 + err * 8 / 20), rel=1e-4)
    vals = [r for r in res.history if r["split"] == "val"]
    assert vals[0]["step"] == 0 and "val_reward" in vals[0]
    s = res.stats
    assert s["early_stopping_metric"] == "reward" and s["best_step"] is not None
    if s["stopped_early"]:   # two validations in a row without a better held-out reward
        assert len(train) < 6 and len(train) - s["best_step"] == 2
        assert s["restored_step"] == (s["best_step"] if s["best_step"] != len(train) else None)
    assert s["kl_coef_first"] == 0.05 and s["kl_coef_last"] != 0.05
    # warm-up: the learning rate rises over the first optimizer steps (2 per PPO step here)
    assert train[0]["lr"] < train[1]["lr"]


def test_ppo_stopped_run_resumes_to_the_uninterrupted_curve(tiny_causal_lm_dir, toy_prompts, tmp_path):
    """On the engine: a run stopped after step 8 (checkpoints every 4) and run again ends with the
    uninterrupted run's metrics: the weights and value head, optimizer, schedule, the prompt order,
    the rollouts' seeds and the adaptive KL coefficient all come back from the checkpoint."""
    from refinery.tasks.engine.trainer import TrainingInterrupted
    from refinery.tasks.train.metrics import read_metrics, without_timing

    cfg = _toy_cfg(max_steps=12, batch_size=4, mini_batch_size=2, grad_accum=2, checkpoint_every=4, eval_every=4,
                   max_new_tokens=4, kl_target=0.01, kl_horizon=20, scheduler="cosine", warmup_steps=2)

    def run(name, **kw):
        return train_ppo(str(tiny_causal_lm_dir), toy_prompts[:10], toy_reward, cfg, seed=0,
                         held_out=toy_prompts[24:26], ckpt_dir=tmp_path / name, **kw)

    whole = run("a")
    part = run("b", stop_after=8)
    assert part.stats["status"] == "stopped" and part.stats["steps"] == 8
    with pytest.raises(TrainingInterrupted, match="step 8"):
        part.raise_if_interrupted(tmp_path / "b")
    rest = run("b")
    assert rest.stats["status"] == "done" and rest.stats["resumed_from"].endswith("step-00000008")
    a = without_timing(read_metrics(tmp_path / "a" / "metrics" / "metrics.jsonl"))
    b = without_timing(read_metrics(tmp_path / "b" / "metrics" / "metrics.jsonl"))
    assert len(a) == len(b) == 12 + 4   # validation at 0, 4, 8, 12
    assert len({r["kl_coef"] for r in a if r["split"] == "train"}) == 12   # the coefficient moved every step
    assert_same_metrics(a, b)
    assert whole.stats["kl_coef_last"] == pytest.approx(rest.stats["kl_coef_last"], abs=1e-9)
    wa, wb = whole.policy.state_dict(), rest.policy.state_dict()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6


def test_ppo_and_grpo_take_fsdp_with_even_splits():
    """strategy=fsdp is accepted by the RL trainers; what each process takes must split evenly (every
    process runs the same number of forward passes, collectives under FSDP)."""
    from pydantic import ValidationError

    from refinery.tasks.align.grpo import GRPOConfig

    assert PPOConfig(devices=2, strategy="fsdp", batch_size=8, mini_batch_size=4).launches()
    assert GRPOConfig(devices=2, strategy="fsdp", batch_size=4).launches()
    with pytest.raises(ValidationError, match="mini_batch_size=3 must be a multiple of devices=2"):
        PPOConfig(devices=2, strategy="fsdp", batch_size=6, mini_batch_size=3)
    with pytest.raises(ValidationError, match="batch_size=3 must be a multiple of devices=2"):
        GRPOConfig(devices=2, strategy="fsdp", batch_size=3)


def test_held_out_parts_are_padded_to_one_length_when_sharded():
    """Under FSDP every process generates for as many held-out prompts as the longest part (a repeat
    whose result is discarded); unsharded, each takes its own part only."""
    from refinery.tasks.engine.parallel import Parallel
    from refinery.tasks.align.ppo import padded_part

    items = ["a", "b", "c", "d", "e"]
    assert padded_part(Parallel(rank=1, world=2, sharded=True), items) == (["b", "d", "d"], 2)
    assert padded_part(Parallel(rank=0, world=2, sharded=True), items) == (["a", "c", "e"], 3)
    assert padded_part(Parallel(rank=1, world=2), items) == (["b", "d"], 2)
    assert padded_part(Parallel(rank=3, world=4, sharded=True), ["a", "b"]) == (["a"], 0)   # a part left empty
