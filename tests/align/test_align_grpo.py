"""GRPO: group-relative advantages and the loss against TRL's on the same batch, the built-in
reward functions, and a mean reward that rises on short arithmetic prompts a tiny model can learn."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
from refinery_testlib import assert_same_metrics, trl_grpo_loss
import torch

from refinery.tasks.align.grpo import GRPOConfig, group_advantages, grpo_loss, train_grpo
from refinery.tasks.align.rewards import BUILTIN, exact_match, final_number, resolve_reward_func


def test_exact_match_and_format_rewards_on_gsm8k_answers():
    gold = ["Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18"] * 6
    replies = ["9 * 2 = 18\n#### 18", "The answer is $18.", "#### 18.0", "#### 1,018", "no idea", "18 then 17"]
    assert exact_match(None, replies, answer=gold) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert BUILTIN["format"](None, replies) == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert BUILTIN["number"](None, replies) == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    assert final_number("#### 1,018") == 1018.0 and final_number("x") is None
    assert resolve_reward_func("refinery.tasks.align.rewards:length") is BUILTIN["length"]
    with pytest.raises(ValueError, match="built-in"):
        resolve_reward_func("exact")
    with pytest.raises(ValueError, match="cannot be imported"):
        resolve_reward_func("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="answer"):
        exact_match(None, ["1"])


def test_group_advantages_match_hand_and_trl():
    from trl.trainer.utils import nanstd

    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(r, 4)
    g = r.view(2, 4)
    want = (g - g.mean(1, keepdim=True)) / (nanstd(g, dim=1)[:, None] + 1e-4)   # TRL's scale_rewards="group"
    assert torch.allclose(adv, want.reshape(-1))
    assert torch.allclose(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (torch.tensor(1 / 3).sqrt() + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))   # a group that all scored the same teaches nothing
    assert torch.allclose(group_advantages(r, 4, scale=False)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_equals_trl(beta):
    g = torch.Generator().manual_seed(0)
    B, T = 6, 5
    old = -torch.rand(B, T, generator=g) * 3
    logp = (old + 0.4 * torch.randn(B, T, generator=g)).requires_grad_()   # some ratios beyond the clip
    ref = old + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    ours, _ = grpo_loss(logp, old, ref, adv, mask.float(), beta, 0.2)
    theirs = trl_grpo_loss(logp, old, ref, adv, mask, beta, "grpo", 0.2, 0.2, T)
    assert torch.allclose(ours, theirs, atol=1e-6), (ours.item(), theirs.item())
    (gours,) = torch.autograd.grad(ours, logp)
    (gtheirs,) = torch.autograd.grad(theirs, logp)
    assert torch.allclose(gours, gtheirs, atol=1e-6)


def _sums(n: int, seed: int = 0):
    """Short arithmetic prompts with checkable answers, in GSM8K's answer format."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rnd.randint(0, 4), rnd.randint(0, 4)
        out.append((f"{a}+{b}=", {"answer": f"{a}+{b}={a + b}\n#### {a + b}"}))
    return out


def test_grpo_raises_mean_reward_on_arithmetic(tiny_causal_lm_dir):
    """A random tiny model rarely writes a number; GRPO with exact_match plus the weak `number`
    format check learns to: the mean reward of its groups rises, the KL stays finite."""
    data = _sums(32)
    prompts, cols = [p for p, _ in data], [c for _, c in data]
    cfg = GRPOConfig(max_steps=16, batch_size=4, num_generations=8, mini_batch_size=32, max_new_tokens=6,
                     max_prompt_len=16, lr=3e-3, beta=0.02, reward_funcs=["exact_match", "number"],
                     warmup_steps=0, scheduler="constant", eval_every=8)
    held = _sums(8, seed=1)
    funcs = {n: resolve_reward_func(n) for n in cfg.reward_funcs}
    res = train_grpo(str(tiny_causal_lm_dir), prompts, cols, funcs, cfg, seed=0,
                     held_out=([p for p, _ in held], [c for _, c in held]))
    train = [r for r in res.history if r["split"] == "train"]
    assert len(train) == 16
    for r in train:
        for k in ("reward", "reward_exact_match", "reward_number", "kl", "loss", "clipfrac", "completion_len", "lr"):
            assert r[k] == r[k], (k, r)   # not NaN
    start = sum(r["reward"] for r in train[:4]) / 4
    end = sum(r["reward"] for r in train[-4:]) / 4
    assert end > start + 0.2, (start, end)
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-5)   # the first batch comes from the reference itself
    assert 0 < max(r["kl"] for r in train) < 5
    vals = [r for r in res.history if r["split"] == "val"]
    assert [v["step"] for v in vals] == [0, 8, 16] and "val_reward_exact_match" in vals[0]
    print(f"GRPO arithmetic: mean group reward {start:.3f} -> {end:.3f}; held-out greedy "
          f"{vals[0]['val_reward']:.3f} -> {vals[-1]['val_reward']:.3f}")


def test_grpo_config_reads_cli_lists_and_checks_weights():
    cfg = GRPOConfig(reward_funcs="exact_match, format", reward_weights="1, 0.5")
    assert cfg.reward_funcs == ["exact_match", "format"] and cfg.reward_weights == [1.0, 0.5]
    with pytest.raises(ValueError, match="weights"):
        GRPOConfig(reward_funcs=["exact_match"], reward_weights=[1.0, 2.0])


def test_grpo_stage_on_gsm8k_file(tmp_path, tiny_causal_lm_dir, shared_data, exec_log):
    """The stage end to end on the real GSM8K test file (question, answer '... #### N'): the default
    reward is the numeric exact match; the model, metrics and figures land in the dataset; cached."""
    from refinery_testlib import read_exec_log, shared_file

    from refinery.flows.align import AlignParams, grpo_config
    from refinery.tasks.align.stage import grpo_stage

    data = shared_file(shared_data, "eval/gsm8k-test.jsonl")
    p = AlignParams(input=str(tiny_causal_lm_dir), data=str(data), method="grpo", max_pairs=24, val_fraction=0.25,
                    grpo={"max_steps": 2, "batch_size": 2, "num_generations": 2, "max_new_tokens": 8,
                          "max_prompt_len": 32})
    cfg = grpo_config(p)
    assert cfg.train.reward_funcs == ["exact_match"] and cfg.reward_funcs_id == {"exact_match": "builtin:exact_match"}
    ds = grpo_stage.run(tmp_path, [], cfg)
    m = ds.manifest
    assert m["counts"]["prompts"] == 24 and m["counts"]["prompts_held_out"] == 6 and m["counts"]["steps"] == 2
    assert m["metrics"]["held_out_reward_before"] == 0.0 and m["method"] == "grpo"
    assert {"model/model.safetensors", "metrics/metrics.jsonl"} <= {f["path"] for f in m["files"]}
    from refinery.tasks.train.metrics import read_metrics

    rows = read_metrics(ds.file("metrics"))
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
    assert all("reward_exact_match" in r for r in rows if r["split"] == "train")
    assert read_exec_log(exec_log) == [f"grpo {ds.fingerprint}"]
    exec_log.unlink()
    assert grpo_stage.run(tmp_path, [], cfg).path == ds.path and read_exec_log(exec_log) == []


def test_grpo_stopped_run_resumes_to_the_uninterrupted_curve(tiny_causal_lm_dir, tmp_path):
    """On the engine: a LoRA run stopped after step 8 (checkpoints every 4) and run again ends with
    the uninterrupted run's metrics and adapters (two sampled batches and two updates per step)."""
    from refinery.tasks.train.metrics import read_metrics, without_timing

    data, held = _sums(12), _sums(2, seed=1)
    cfg = GRPOConfig(max_steps=12, batch_size=2, num_generations=2, mini_batch_size=2, grad_accum=2, num_iterations=2,
                     max_new_tokens=4, max_prompt_len=16, lr=1e-2, beta=0.04, reward_funcs=["number", "length"],
                     lora={"enabled": True, "r": 4}, checkpoint_every=4, eval_every=4, warmup_steps=2)
    funcs = {n: resolve_reward_func(n) for n in cfg.reward_funcs}

    def run(name, **kw):
        return train_grpo(str(tiny_causal_lm_dir), [p for p, _ in data], [c for _, c in data], funcs, cfg, seed=0,
                          held_out=([p for p, _ in held], [c for _, c in held]), ckpt_dir=tmp_path / name, **kw)

    whole = run("a")
    part = run("b", stop_after=8)
    assert part.stats["status"] == "stopped" and part.stats["steps"] == 8
    rest = run("b")
    assert rest.stats["status"] == "done" and rest.stats["resumed_from"].endswith("step-00000008")
    a = without_timing(read_metrics(tmp_path / "a" / "metrics" / "metrics.jsonl"))
    b = without_timing(read_metrics(tmp_path / "b" / "metrics" / "metrics.jsonl"))
    assert len(a) == len(b) == 12 + 4   # validation at 0, 4, 8, 12
    assert_same_metrics(a, b)
    wa, wb = whole.model.state_dict(), rest.model.state_dict()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6
    assert whole.stats["trainable_params"] < whole.stats["params"] / 2   # the adapters


def test_minibatch_weights_make_two_processes_one():
    """The update of two processes (each the whole groups of half the prompts, its own advantages,
    minibatches weighted by micro_weight, gradients averaged as DDP does) is the one-process update
    of the whole batch: 2 sampled batches of 4 groups of 2 completions, minibatches of 3."""
    from refinery.tasks.align.grpo import micro_weight

    g = torch.Generator().manual_seed(0)
    G, groups, accum, mbs, T = 2, 4, 2, 3, 5
    feats = [torch.randn(groups * G, T, generator=g) for _ in range(accum)]
    rewards = [torch.rand(groups * G, generator=g) for _ in range(accum)]
    old = [-torch.rand(groups * G, T, generator=g) for _ in range(accum)]
    ref = [o + 0.1 * torch.randn(groups * G, T, generator=g) for o in old]
    mask = torch.ones(groups * G, T)
    mask[1, 3:] = 0

    def grad(rank: int, world: int):
        theta = torch.tensor(0.3, requires_grad=True)
        for b in range(accum):
            rows = [i for k in range(rank, groups, world) for i in range(k * G, (k + 1) * G)]   # whole groups
            adv = group_advantages(rewards[b][rows], G)
            for s in range(0, len(rows), mbs):
                sl = rows[s:s + mbs]
                logp = old[b][sl] + theta * feats[b][sl]
                loss, _ = grpo_loss(logp, old[b][sl], ref[b][sl], adv[s:s + mbs], mask[sl], 0.04, 0.2)
                (loss * micro_weight(len(sl), len(rows), accum)).backward()
        return theta.grad

    one = grad(0, 1)
    two = (grad(0, 2) + grad(1, 2)) / 2   # DDP averages the processes' gradients
    assert one.abs() > 1e-4 and torch.allclose(one, two, atol=1e-7), (one, two)


@pytest.mark.slow
def test_grpo_on_two_processes(tmp_path, tiny_causal_lm_dir, shared_data):
    """grpo.devices=2 with strategy=fsdp (FSDP2, gloo) and LoRA: the stage launches two processes, each
    samples and scores the groups of half of every batch's prompts with ``generate`` on the sharded
    model (synced), the reference is the same sharded model with its adapters off; they end in step
    (the same weights, the same averaged figures), the held-out reward is over both parts (5 prompts:
    one process pads its part, so both generate alike), and the trained weights are published. DDP
    runs the same code unsharded; its arithmetic is test_minibatch_weights_make_two_processes_one."""
    from refinery_testlib import shared_file

    from refinery.tasks.align.stage import GRPOStageConfig, grpo_stage
    from refinery.tasks.store import Store
    from refinery.tasks.train.metrics import read_metrics

    cfg = GRPOStageConfig(model=str(tiny_causal_lm_dir), data=str(shared_file(shared_data, "eval/gsm8k-test.jsonl")),
                          max_prompts=16, val_fraction=0.3125,
                          train=GRPOConfig(max_steps=2, batch_size=4, num_generations=2, mini_batch_size=2,
                                           max_new_tokens=6, max_prompt_len=32, lr=1e-2, device="cpu", devices=2,
                                           strategy="fsdp", lora={"enabled": True}, eval_every=2,
                                           reward_funcs=["number", "length"]))
    ds = grpo_stage.run(Store(tmp_path / "grpo"), [], cfg)
    s = ds.manifest["stats"]
    assert s["world_size"] == 2 and s["strategy"] == "fsdp" and s["steps"] == 2 and s["status"] == "done"
    assert s["ranks_agree"] is True
    rows = read_metrics(ds.file("metrics"))
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and train[1]["tokens"] > train[0]["tokens"] > 0
    assert all(r["reward"] == r["reward"] and r["kl"] >= 0 for r in train)
    vals = [r for r in rows if r["split"] == "val"]
    assert [v["step"] for v in vals] == [0, 2] and ds.manifest["counts"]["prompts_held_out"] == 5
    assert all(0.0 <= v["val_reward_number"] <= 1.0 for v in vals)   # a mean over the 5, the padding left out
    from safetensors.torch import load_file

    start = load_file(str(tiny_causal_lm_dir / "model.safetensors"))
    trained = load_file(str(Path(ds.path) / ds.manifest["model"] / "model.safetensors"))
    assert any(float((start[k] - trained[k]).abs().max()) > 0 for k in start)
