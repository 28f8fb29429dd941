"""The align trainers on several processes. In process: each rank's share of a micro-batch (two
ranks simulated by two threads that sum their batch statistics) gives the one-process loss and
gradient, for the reward model, DPO, KTO (whose reference point z0 is the whole micro-batch's) and
ORPO (whose NLL token count is). End to end, on 2 CPU processes (gloo): KTO under FSDP2 and the
reward model's LoRA adapters and score head under FSDP2 follow the one-process curve with the same
global batch (within TOL: only float summation order differs) and the trained weights come back
into the published model; DPO on two nodes (DDP); PPO data-parallel (DDP) with its figures averaged
over the ranks.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

TOL = 1e-4


def _train_rows(ds) -> list[dict]:
    from refinery.tasks.train.metrics import read_metrics

    return [r for r in read_metrics(ds.file("metrics")) if r["split"] == "train"]


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < TOL for x, y in zip(a, b))


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(next(folder.glob("*.safetensors"))))


def test_shares_add_up_to_the_micro_batch_mean():
    import torch

    from refinery.tasks.engine.parallel import Parallel

    values = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0])
    for idx in ([0, 1, 2, 3, 4], [3]):   # uneven shares; a rank left without an example
        shares = [Parallel(rank=r, world=2).share(idx) for r in range(2)]
        # what gradient averaging over the ranks computes: the mean of the ranks' losses
        averaged = sum(float(s.mean(values[s.idx])) for s in shares) / 2
        assert averaged == pytest.approx(float(values[idx].mean()))
    lonely = Parallel(rank=1, world=2).share([3])
    assert lonely.idx == [3] and lonely.weight == [0.0] and lonely.count([7]) == 0


class _ThreadRank:
    """One simulated rank of a two-rank run inside this process: ``sum`` exchanges the values with the
    other rank's thread (what the all-reduce does between processes)."""

    def __init__(self, rank: int, model, barrier, box: dict):
        from refinery.tasks.engine.parallel import Parallel

        self.par = Parallel(rank=rank, world=2, train=model)
        self.barrier, self.box = barrier, box
        self.par.sum = self.sum   # type: ignore[method-assign]

    def sum(self, values):
        self.box[self.par.rank] = list(values)
        self.barrier.wait()
        out = [a + b for a, b in zip(self.box[0], self.box[1])]
        self.barrier.wait()
        return out


def _method(name: str, model_dir, dpo_en_path, shared_data, batch_size: int):
    """A trainer's Method on 12 training examples, its model loaded as the trainer loads it."""
    from types import SimpleNamespace

    from refinery_testlib import shared_file

    from refinery.tasks.align import data
    from refinery.tasks.align.common import load_policy

    if name == "kto":
        from refinery.tasks.align.kto import KTOConfig as Config, KTOMethod as Method

        examples, _ = data.load_unpaired(shared_file(shared_data, "preference/kto_en_demo.json"), 12)
    else:
        examples, _ = data.load_pairs(dpo_en_path, 12)
    kw = dict(batch_size=batch_size, max_prompt_len=32, max_len=64, device="cpu")
    if name == "reward":
        from refinery.tasks.align.reward import RewardConfig as Config, RewardMethod as Method, load_reward_model

        cfg = Config(**kw)
        model, tok = load_reward_model(str(model_dir))
    else:
        if name == "dpo":
            from refinery.tasks.align.dpo import DPOConfig as Config, DPOMethod as Method
        elif name == "orpo":
            from refinery.tasks.align.orpo import ORPOConfig as Config, ORPOMethod as Method
        cfg = Config(**kw)
        tok, model, _, _ = load_policy(str(model_dir), cfg, 0)
    method = Method(model, tok, examples, [], cfg, 0)
    method.engine = SimpleNamespace(train_model=model, par=None, cfg=cfg, scheduler=None)
    return method


@pytest.mark.parametrize("name", ["reward", "dpo", "kto", "orpo"])
def test_two_ranks_shares_give_the_one_process_loss_and_gradient(name, tiny_causal_lm_dir, dpo_en_path, shared_data):
    """The ranks' losses averaged (what DDP and FSDP do to their gradients) are the one-process
    loss, and so are the gradients, for a micro-batch of 5 (shares of 3 and 2) and of 1 (rank 1
    holds a stand-in of weight 0); the figures each rank logs average to the one-process figures."""
    import copy
    import threading

    import torch

    from refinery.tasks.engine.parallel import Parallel

    for batch_size in (5, 1):
        one = _method(name, tiny_causal_lm_dir, dpo_en_path, shared_data, batch_size)
        one.engine.par = Parallel(train=one.model)
        one.setup()
        ranks = [copy.deepcopy(one) for _ in range(2)]   # the same model, data order and reference on each
        barrier, box = threading.Barrier(2), {}
        for r, m in enumerate(ranks):
            m.engine.train_model = m.model
            m.engine.par = _ThreadRank(r, m.model, barrier, box).par
        out: list = [None, None]

        def step(r: int, ranks=ranks, out=out) -> None:
            out[r] = ranks[r].micro_step(0)

        threads = [threading.Thread(target=step, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ref = one.micro_step(0)
        assert float(sum(o.loss.detach() for o in out)) / 2 == pytest.approx(float(ref.loss.detach()), abs=1e-6), \
            (name, batch_size)
        for k, v in ref.figures.items():
            mine = [o.figures[k] for o in out]
            got = sum(mine) if k == "tokens" else sum(mine) / 2
            assert got == pytest.approx(v, abs=1e-5), (name, batch_size, k)
        ref.loss.backward()
        for o in out:
            o.loss.backward()
        grads = lambda m: torch.cat([p.grad.flatten() for p in m.model.parameters() if p.grad is not None])  # noqa: E731
        averaged = (grads(ranks[0]) + grads(ranks[1])) / 2
        assert torch.allclose(averaged, grads(one), atol=1e-6, rtol=1e-4), (name, batch_size)


@pytest.mark.slow
def test_kto_fsdp_on_two_processes_matches_one(tmp_path, tiny_causal_lm_dir, shared_data):
    """KTO on 2 processes under FSDP2 (its reference point z0 summed over the ranks) follows the
    one-process run: the curve, the held-out figures, the published weights."""
    from refinery_testlib import shared_file

    from refinery.tasks.align.kto import KTOConfig
    from refinery.tasks.align.stage import KTOStageConfig, kto_stage
    from refinery.tasks.store import Store

    data = shared_file(shared_data, "preference/kto_en_demo.json")

    def run(name, **kw):
        cfg = KTOStageConfig(model=str(tiny_causal_lm_dir), data=str(data), max_examples=40, val_fraction=0.25,
                             train=KTOConfig(lr=1e-3, batch_size=6, max_steps=4, eval_every=2, max_prompt_len=32,
                                             max_len=64, device="cpu", **kw))
        return kto_stage.run(Store(tmp_path / name), [], cfg)

    one, fsdp = run("one"), run("fsdp", devices=2, strategy="fsdp")
    ref, rows = _train_rows(one), _train_rows(fsdp)
    assert len(ref) == 4 and min(r["loss"] for r in ref[1:]) < ref[0]["loss"]   # it trains
    assert any(r["z0"] > 0 for r in ref)                                          # z0 is not the clamped 0
    s = fsdp.manifest["stats"]
    assert s["world_size"] == 2 and s["strategy"] == "fsdp"
    plan = fsdp.manifest["memory_plan"]["setup"]   # the estimate per device, recorded before training
    assert plan["world_size"] == 2 and plan["strategy"] == "fsdp" and plan["micro_batch"] == 3
    for key in ("loss", "z0", "reward_desirable", "reward_undesirable", "grad_norm"):
        assert _close([r[key] for r in ref], [r[key] for r in rows]), key
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in ref]   # the same global batches
    # held-out figures (the reference is scored under FSDP before training, validation between steps)
    for key in ("loss", "margin"):
        assert s["held_out_after"][key] == pytest.approx(one.manifest["stats"]["held_out_after"][key], abs=TOL)
    a, b = _weights(Path(one.path) / "model"), _weights(Path(fsdp.path) / "model")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < TOL
    start = _weights(tiny_causal_lm_dir)
    assert any(float((start[k] - b[k]).abs().max()) > 1e-3 for k in start)


@pytest.mark.slow
def test_reward_lora_under_fsdp_matches_one_process(tmp_path, tiny_causal_lm_dir, dpo_en_path):
    from refinery.tasks.align.reward import RewardConfig
    from refinery.tasks.align.stage import RewardStageConfig, reward_stage
    from refinery.tasks.store import Store

    def run(name, **kw):
        cfg = RewardStageConfig(model=str(tiny_causal_lm_dir), data=str(dpo_en_path), max_pairs=24, val_fraction=0.25,
                                train=RewardConfig(lr=1e-3, head_lr=1e-2, batch_size=5, max_steps=3, eval_every=2,
                                                   max_prompt_len=32, max_len=64, device="cpu",
                                                   lora={"enabled": True}, **kw))
        return reward_stage.run(Store(tmp_path / name), [], cfg)

    one, fsdp = run("one"), run("fsdp", devices=2, strategy="fsdp")
    ref, rows = _train_rows(one), _train_rows(fsdp)
    for key in ("loss", "accuracy", "grad_norm"):
        assert _close([r[key] for r in ref], [r[key] for r in rows]), key
    assert fsdp.manifest["metrics"]["held_out_accuracy"] == pytest.approx(one.manifest["metrics"]["held_out_accuracy"])
    # the adapters and the score head came back: the merged models agree
    a, b = _weights(Path(one.path) / "merged"), _weights(Path(fsdp.path) / "merged")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < TOL


@pytest.mark.slow
def test_ppo_data_parallel_on_two_processes(tmp_path, tiny_causal_lm_dir, trained_reward, hh_subset):
    from refinery.tasks.align.ppo import PPOConfig
    from refinery.tasks.align.stage import PPOStageConfig, ppo_stage
    from refinery.tasks.store import Store

    cfg = PPOStageConfig(model=str(tiny_causal_lm_dir), reward_model=str(trained_reward.path), data=str(hh_subset),
                         max_pairs=64, max_prompts=32,
                         train=PPOConfig(batch_size=8, mini_batch_size=4, max_steps=3, max_new_tokens=8, lr=1e-4,
                                         device="cpu", devices=2, eval_every=3, kl_target=1.0))
    ds = ppo_stage.run(Store(tmp_path / "ppo"), [], cfg)
    s = ds.manifest["stats"]
    assert s["world_size"] == 2 and s["strategy"] == "ddp" and s["steps"] == 3
    rows = _train_rows(ds)
    assert [(r["step"], type(r["step"])) for r in rows] == [(1, int), (2, int), (3, int)]
    # every rank rolled out 4 of the 8 prompts; the tokens are counted over both
    assert rows[-1]["tokens"] > rows[0]["tokens"] > 0
    # the adaptive KL coefficient moved from the ranks' averaged KL
    assert s["kl_coef_last"] != s["kl_coef_first"]
    start, trained = _weights(tiny_causal_lm_dir), _weights(Path(ds.path) / "model")
    assert any(float((start[k] - trained[k]).abs().max()) > 0 for k in start)
    assert (Path(ds.path) / "value_head.safetensors").is_file()


@pytest.mark.parametrize("section, kw, message", [
    ("ppo", dict(devices=2, batch_size=6, mini_batch_size=3), "mini_batch_size=3 must be a multiple of devices=2"),
    ("ppo", dict(devices=4, batch_size=6), "batch_size=6 must be a multiple of devices=4"),
])
def test_multi_process_settings_are_checked(section, kw, message):
    from pydantic import ValidationError

    from refinery.tasks.align.ppo import PPOConfig

    with pytest.raises(ValidationError, match=message):
        PPOConfig(**kw)


def test_kto_and_orpo_take_several_devices():
    from refinery.tasks.align.kto import KTOConfig
    from refinery.tasks.align.orpo import ORPOConfig
    from refinery.tasks.align.stage import RUNS

    for cls in (KTOConfig, ORPOConfig):
        cfg = cls(devices=2, strategy="fsdp")
        assert cfg.strategy == "fsdp" and cfg.processes() == 2 and cfg.launches()
    assert {"reward", "dpo", "kto", "orpo"} <= set(RUNS)   # what the worker runs on every process


def _dpo_config(model, data, **kw):
    from refinery.tasks.align.dpo import DPOConfig
    from refinery.tasks.align.stage import DPOStageConfig

    return DPOStageConfig(model=str(model), data=str(data), max_pairs=32, val_fraction=0.25,
                          train=DPOConfig(lr=1e-3, batch_size=6, max_steps=4, eval_every=2, max_prompt_len=32,
                                          max_len=64, device="cpu", **kw))


_NODE = r"""
import json, sys
import torch
torch.set_num_threads(1)
from refinery.tasks.align.stage import DPOStageConfig, dpo_stage
from refinery.tasks.store import Store
ds = dpo_stage.run(Store(sys.argv[1]), [], DPOStageConfig.model_validate_json(sys.argv[2]))
print("DATASET " + ds.path)
"""


@pytest.mark.slow
def test_two_nodes_run_one_dpo_stage(tmp_path, tiny_causal_lm_dir, dpo_en_path):
    """Two `dpo` stages started with REFINERY_NNODES=2 on one shared workdir act as two nodes of one
    process each (c10d rendezvous on loopback): node 1 runs without the writer lock that node 0
    holds while training, joins the launch, then returns the dataset node 0 published. DDP over the
    two processes: the curve is the one-process curve with the same global batch, the held-out
    figures and the published weights are the one-process ones."""
    import os
    import socket
    import subprocess
    import sys

    from refinery.tasks.align.stage import config_json, dpo_stage
    from refinery.tasks.store import Store

    one = dpo_stage.run(Store(tmp_path / "one"), [], _dpo_config(tiny_causal_lm_dir, dpo_en_path))
    cfg = _dpo_config(tiny_causal_lm_dir, dpo_en_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", _NODE, str(tmp_path / "shared"), json.dumps(config_json(cfg))],
                              env=dict(os.environ, OMP_NUM_THREADS="1", REFINERY_NNODES="2",
                                       REFINERY_NODE_RANK=str(node), REFINERY_RDZV_ENDPOINT=f"127.0.0.1:{port}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    paths = [out.split("DATASET ", 1)[1].strip() for out, _ in outs]
    assert paths[0] == paths[1]   # one dataset, published once, by node 0
    from refinery.tasks.store import Dataset

    two = Dataset.open(paths[0])
    s = two.manifest["stats"]
    assert s["world_size"] == 2 and s["strategy"] == "ddp"
    ref, rows = _train_rows(one), _train_rows(two)
    assert len(ref) == 4 and min(r["loss"] for r in ref[1:]) < ref[0]["loss"]   # it trains
    for key in ("loss", "accuracy", "margin", "grad_norm"):
        assert _close([r[key] for r in ref], [r[key] for r in rows]), key
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in ref]   # the same global batches
    assert s["held_out_after"]["loss"] == pytest.approx(one.manifest["stats"]["held_out_after"]["loss"], abs=TOL)
    a, b = _weights(Path(one.path) / "model"), _weights(Path(two.path) / "model")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < TOL
