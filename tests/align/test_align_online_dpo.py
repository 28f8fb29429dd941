"""Online DPO: the pairs' ranking and loss against TRL 1.16's ``OnlineDPOTrainer.training_step`` run
as is on the same batch, the ranking by a reward function, and short runs on a tiny model (the
loss and the figures, determinism, an interrupted run resumed to the uninterrupted curve, the
stage on the real GSM8K file)."""
from __future__ import annotations

import random
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from refinery_testlib import assert_same_metrics

from refinery.tasks.align.dpo import dpo_loss
from refinery.tasks.align.online_dpo import (OnlineDPOConfig, has_eos, pair_loss, process_mean, rank_pairs,
                                             train_online_dpo)
from refinery.tasks.align.rewards import resolve_reward_func

EOS = 2
# wall-clock figures: differ between identical runs (besides the engine's own timing keys)
CLOCK = ("rollout_tokens_per_s", "gen_share")


def _trl_training_step(logp, ref_logp, completion_ids, completion_mask, rewards, beta, loss_type, missing_eos_penalty):
    """TRL's ``OnlineDPOTrainer.training_step`` on one batch: generation replaced by the given
    completions (TRL's layout: every prompt's first sample, then every prompt's second), the
    policy's and reference's forwards by the given per-token log-probs, the reward functions by the
    given rewards, the accelerator by single-process identities. Returns the loss it backpropagates."""
    from trl.experimental.online_dpo.online_dpo_trainer import OnlineDPOTrainer as TRLOnlineDPO

    policy, ref = torch.nn.Identity(), object()
    B2 = len(completion_ids)
    backward: list = []
    fake = SimpleNamespace(
        args=SimpleNamespace(use_vllm=False, missing_eos_penalty=missing_eos_penalty, loss_type=loss_type,
                             torch_empty_cache_steps=None, optim="adamw_torch", n_gpu=1, gradient_accumulation_steps=1),
        eos_token_ids=[EOS], ref_model=ref, beta=beta, reward_funcs=[lambda **_: None], stats=defaultdict(list),
        state=SimpleNamespace(global_step=0),
        accelerator=SimpleNamespace(gather_for_metrics=lambda x: x, backward=lambda loss, **_: backward.append(loss)),
        processing_class=SimpleNamespace(batch_decode=lambda ids, **_: ["c"] * len(ids)),
        _generate=lambda model, prompts, images=None: (torch.ones(B2, 1, dtype=torch.long),
                                                       torch.ones(B2, 1, dtype=torch.long),
                                                       completion_ids, completion_mask, None),
        _forward=lambda model, *a: logp if model is policy else ref_logp,
        _calculate_rewards_from_functions=lambda **_: rewards.clone())
    TRLOnlineDPO.training_step(fake, policy, {"prompt": ["p"] * (B2 // 2)})
    return backward[0], fake.stats


def _batch(n: int, T: int, seed: int = 0):
    """``2n`` sampled completions of up to ``T`` tokens (EOS where some end, padding after), their
    per-token log-probs under the policy and the reference, and rewards with ties."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, T + 1, (2 * n,), generator=g)
    ids = torch.randint(3, 50, (2 * n, T), generator=g)
    mask = (torch.arange(T)[None, :] < lens[:, None]).long()
    ended = torch.rand(2 * n, generator=g) < 0.5
    for i in range(2 * n):
        if ended[i]:
            ids[i, lens[i] - 1] = EOS
        ids[i, lens[i]:] = 0
    ref = -torch.rand(2 * n, T, generator=g) * 3
    logp = (ref + 0.5 * torch.randn(2 * n, T, generator=g)).requires_grad_()
    rewards = torch.randint(0, 3, (2 * n,), generator=g).float()   # few values: ties happen
    return logp, ref, ids, mask, rewards


@pytest.mark.parametrize("loss_type,penalty,T", [("sigmoid", None, 6), ("sigmoid", 1.0, 6), ("ipo", 0.5, 1)])
def test_pairs_and_loss_equal_trl_online_dpo(loss_type, penalty, T):
    """TRL's training step and ours pick the same chosen/rejected completions (ties: the first,
    the missing-EOS penalty before ranking) and give the same loss and gradient. ``ipo`` on
    one-token replies: TRL's online trainer sums the log-ratios where ours (like our DPO and TRL's
    DPOTrainer) averages them over the reply's tokens; with one token the two are the same loss."""
    n, beta = 8, 0.1
    logp, ref, ids, mask, rewards = _batch(n, T)
    theirs, stats = _trl_training_step(logp, ref, ids, mask, rewards, beta, loss_type, penalty)
    cfg = OnlineDPOConfig(beta=beta, loss_type=loss_type, missing_eos_penalty=penalty)
    eos = has_eos(ids, mask, EOS)
    pr = pair_loss(rewards, eos, logp, ref, mask.float(), cfg)
    ours = pr.losses.mean()
    assert 0 < pr.tie.sum() < n and (penalty is None or not eos.all())   # the batch has ties and missing EOS
    assert torch.allclose(ours, theirs, atol=1e-6), (ours.item(), theirs.item())
    (g1,) = torch.autograd.grad(ours, logp, retain_graph=True)
    (g2,) = torch.autograd.grad(theirs, logp)
    assert torch.allclose(g1, g2, atol=1e-7)
    f = pr.figures()
    assert f["reward_margin"] == pytest.approx(stats["objective/scores_margin"][0], abs=1e-6)
    assert f["margin"] == pytest.approx(stats["rewards/margins"][0], abs=1e-6)
    assert f["logps_chosen"] == pytest.approx(stats["logps/chosen"][0], abs=1e-5)
    # TRL's online loss is dpo_loss on the summed log-probs (ipo: with token counts of 1)
    s, rs = (logp * mask).sum(-1), (ref * mask).sum(-1)
    ones = torch.ones(n)
    direct = dpo_loss(s[pr.chosen], s[pr.rejected], rs[pr.chosen], rs[pr.rejected], beta, loss_type=loss_type,
                      nc=ones, nr=ones)[0].mean()
    assert torch.allclose(direct, theirs, atol=1e-6)


def test_a_reward_function_picks_the_chosen_completion():
    """The completion the reward prefers is chosen whichever sample it was; a tie keeps the pair
    with the first sample chosen (TRL's rule); the missing-EOS penalty can turn a ranking."""
    prefers_digits = resolve_reward_func("number")
    texts = ["no digits", "answer 4", "7", "none", "same", "same"]    # pairs (0,3), (1,4), (2,5)
    scores = torch.tensor(prefers_digits(None, texts))
    chosen, rejected, tie = rank_pairs(scores, 3)
    assert chosen.tolist() == [0, 1, 2] and rejected.tolist() == [3, 4, 5] and tie.tolist() == [True, False, False]
    texts = ["none", "x", "y", "12", "3", "z"]
    chosen, rejected, tie = rank_pairs(torch.tensor(prefers_digits(None, texts)), 3)
    assert [texts[i] for i in chosen] == ["12", "3", "y"] and tie.tolist() == [False, False, True]
    # the penalty: a better score without EOS loses to a worse one that ended
    logp = torch.zeros(2, 3)
    mask = torch.ones(2, 3)
    eos = has_eos(torch.tensor([[5, 6, 7], [5, EOS, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]), EOS)
    assert eos.tolist() == [False, True]
    kw = dict(scores=torch.tensor([1.0, 0.5]), eos=eos, logp=logp, ref_logp=logp, c_mask=mask)
    assert pair_loss(**kw, cfg=OnlineDPOConfig()).chosen.tolist() == [0]
    assert pair_loss(**kw, cfg=OnlineDPOConfig(missing_eos_penalty=1.0)).chosen.tolist() == [1]


def test_two_processes_make_the_one_process_mean_of_kept_pairs():
    """Each process's loss (its kept pairs over the average kept per process), gradients averaged as
    DDP does, is the one-process mean over every kept pair, however unevenly the processes keep
    theirs; nothing kept anywhere: a zero loss that still backpropagates."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, generator=g)
    keep = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0], dtype=torch.bool)   # process 0 keeps 1 of its 4, process 1 keeps 3

    def grad(parts):
        theta = torch.tensor(0.7, requires_grad=True)
        kept_all = float(keep.sum())
        total = sum(process_mean((theta * x[p]) ** 2, keep[p], kept_all, len(parts)) for p in parts) / len(parts)
        (g,) = torch.autograd.grad(total, theta)
        return g

    one = grad([slice(0, 8)])
    two = grad([slice(0, 4), slice(4, 8)])
    assert torch.allclose(one, two) and torch.allclose(one, (2 * 0.7 * x[keep] ** 2).mean())
    theta = torch.tensor(0.7, requires_grad=True)
    none = process_mean(theta * x, torch.zeros(8, dtype=torch.bool), 0.0, 2)
    none.backward()
    assert none.item() == 0.0 and theta.grad == 0.0


def test_config_checks():
    cfg = OnlineDPOConfig(reward_funcs="number, length", reward_weights="1, 0.5", loss_type="ipo")
    assert cfg.reward_funcs == ["number", "length"] and cfg.reward_weights == [1.0, 0.5] and cfg.num_generations == 2
    for bad, match in (({"reward_funcs": ["number"], "reward_weights": [1, 2]}, "weights"),
                       ({"loss_type": "ipo", "label_smoothing": 0.1}, "does not use it"),
                       ({"loss_type": "exo_pair"}, "label_smoothing"), ({"batch_size": 3, "devices": 2}, "multiple"),
                       ({"loss_type": "dpo"}, "loss_type")):
        with pytest.raises(ValueError, match=match):
            OnlineDPOConfig(**bad)


def _sums(n: int, seed: int = 0):
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rnd.randint(0, 4), rnd.randint(0, 4)
        out.append((f"{a}+{b}=", {"answer": f"#### {a + b}"}))
    return out


def _run(model_dir, cfg, **kw):
    data, held = _sums(12), _sums(2, seed=1)
    funcs = {n: resolve_reward_func(n) for n in cfg.reward_funcs}
    return train_online_dpo(str(model_dir), [p for p, _ in data], [c for _, c in data], funcs, cfg, seed=0,
                            held_out=([p for p, _ in held], [c for _, c in held]), **kw)


def _rows(history):
    return [{k: v for k, v in r.items() if k not in CLOCK} for r in history]


def test_online_dpo_learns_the_preferred_replies(tiny_causal_lm_dir):
    """A random tiny model rarely writes a digit; rewarded for one (``number``), tied pairs skipped:
    the chosen completion never scores below the rejected one, the greedy reply to held-out
    prompts comes to hold a number (held-out reward 0 -> 1), and the figures TRL logs are there."""
    cfg = OnlineDPOConfig(max_steps=12, batch_size=4, max_new_tokens=6, max_prompt_len=16, lr=3e-3, beta=0.1,
                          reward_funcs=["number"], skip_ties=True, warmup_steps=0, scheduler="constant", eval_every=6)
    res = _run(tiny_causal_lm_dir, cfg)
    train = [r for r in res.history if r["split"] == "train"]
    assert len(train) == 12
    for r in train:
        for k in ("loss", "reward", "reward_number", "reward_chosen", "reward_rejected", "reward_margin", "margin",
                  "accuracy", "kl", "ties", "eos", "completion_len", "rollout_tokens_per_s", "gen_share"):
            assert r[k] == r[k], (k, r)   # present, not NaN
        assert r["reward_chosen"] >= r["reward_rejected"] and r["reward_margin"] >= 0
        assert 0 < r["gen_share"] < 1 and r["rollout_tokens_per_s"] > 0
        assert r["loss"] == 0 or r["ties"] < 1   # all pairs tied and skipped: nothing to learn
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-5) and train[0]["margin"] == pytest.approx(0.0, abs=1e-5)
    assert any(r["ties"] < 1 for r in train) and sum(r["margin"] for r in train[-4:]) > 0
    vals = [r for r in res.history if r["split"] == "val"]
    assert [v["step"] for v in vals] == [0, 6, 12] and "val_reward_number" in vals[0]
    assert vals[0]["val_reward"] == 0.0 and res.stats["held_out_reward_after"] > 0.5, vals
    assert res.stats["status"] == "done" and res.stats["reward_margin_last"] >= 0
    print(f"online DPO (number reward): held-out greedy reward {vals[0]['val_reward']:.2f} -> "
          f"{res.stats['held_out_reward_after']:.2f}; implicit-reward margin of the last 4 steps "
          f"{sum(r['margin'] for r in train[-4:]) / 4:.3f}")


def test_online_dpo_resumes_to_the_uninterrupted_curve_and_is_deterministic(tiny_causal_lm_dir, tmp_path):
    """LoRA (the reference: adapters off), two sampled batches per step, ties skipped: a second run
    with the same seed samples and trains alike (its first two steps, written before it stops, are
    the first run's), and stopped after step 2 and run again it ends with the uninterrupted run's
    metrics and adapters."""
    from refinery.tasks.train.metrics import read_metrics, without_timing

    cfg = OnlineDPOConfig(max_steps=4, batch_size=2, grad_accum=2, max_new_tokens=4, max_prompt_len=16, lr=1e-2,
                          reward_funcs=["number", "length"], skip_ties=True, lora={"enabled": True, "r": 4},
                          checkpoint_every=2, eval_every=2, warmup_steps=1)
    whole = _run(tiny_causal_lm_dir, cfg, ckpt_dir=tmp_path / "a")
    part = _run(tiny_causal_lm_dir, cfg, ckpt_dir=tmp_path / "b", stop_after=2)
    assert part.stats["status"] == "stopped" and part.stats["steps"] == 2
    rest = _run(tiny_causal_lm_dir, cfg, ckpt_dir=tmp_path / "b")
    assert rest.stats["status"] == "done" and rest.stats["resumed_from"].endswith("step-00000002")
    a = _rows(without_timing(read_metrics(tmp_path / "a" / "metrics" / "metrics.jsonl")))
    b = _rows(without_timing(read_metrics(tmp_path / "b" / "metrics" / "metrics.jsonl")))
    assert len(a) == len(b) == 4 + 3   # validation at 0, 2, 4
    assert_same_metrics(a, b)
    wa, wb = whole.model.state_dict(), rest.model.state_dict()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6
    assert whole.stats["trainable_params"] < whole.stats["params"] / 2   # the adapters
    assert any(r["loss"] != 0 for r in a if r["split"] == "train")


def test_online_dpo_stage_on_gsm8k_file(tmp_path, tiny_causal_lm_dir, shared_data, exec_log):
    """``method=online_dpo`` settings become the stage config; the stage on the real GSM8K file
    publishes a model with its metrics, and a second run is the cached dataset."""
    from refinery_testlib import read_exec_log, shared_file

    from refinery.flows.align import AlignParams, online_dpo_config
    from refinery.tasks.align.stage import online_dpo_stage

    data = shared_file(shared_data, "eval/gsm8k-test.jsonl")
    p = AlignParams(input=str(tiny_causal_lm_dir), data=str(data), method="online_dpo", max_pairs=12,
                    val_fraction=0.25, online_dpo={"max_steps": 2, "batch_size": 2, "max_new_tokens": 6,
                                                   "max_prompt_len": 32, "reward_funcs": "number,length"})
    cfg = online_dpo_config(p)
    assert cfg.train.reward_funcs == ["number", "length"] and cfg.reward_funcs_id["number"] == "builtin:number"
    ds = online_dpo_stage.run(tmp_path, [], cfg)
    m = ds.manifest
    assert m["method"] == "online_dpo" and m["counts"]["steps"] == 2 and m["counts"]["prompts_held_out"] == 3
    assert {"model/model.safetensors", "metrics/metrics.jsonl"} <= {f["path"] for f in m["files"]}
    assert {"held_out_reward_before", "held_out_reward", "reward_margin_last"} <= set(m["metrics"])
    from refinery.tasks.train.metrics import read_metrics

    rows = [r for r in read_metrics(ds.file("metrics")) if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2] and all("rollout_tokens_per_s" in r and "gen_share" in r for r in rows)
    assert read_exec_log(exec_log) == [f"online_dpo {ds.fingerprint}"]
    exec_log.unlink()
    assert online_dpo_stage.run(tmp_path, [], cfg).path == ds.path and read_exec_log(exec_log) == []
