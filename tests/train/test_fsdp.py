"""FSDP (strategy=fsdp: FSDP2 fully_shard) on 2 CPU processes (gloo, through our launcher), the one
end-to-end FSDP launch of pretraining: the loss curve (chunked loss) equals the single-process one
(same global batch) within 1e-4; each rank holds about half of the parameters and optimizer state
(counted from the sharded tensors); a SIGTERM mid-run checkpoints the shards and the rerun resumes
onto the same curve; two launchers act as two nodes."""
from __future__ import annotations

from pathlib import Path

import pytest
from train_fixtures import (corpus_texts, corpus_tokens, cfg_for, losses, one_thread,  # noqa: F401
                            train_tokenizer_dir, val_losses)

TOL = 1e-4   # float32 on CPU; the sharded all-reduce sums in another order than one process


@pytest.fixture(scope="module")
def curves(corpus_tokens, tmp_path_factory):
    """One process with the global batch of 8, and FSDP on 2 processes with 4 each."""
    from refinery.tasks.train.loop import run_training

    common = dict(max_steps=6, eval_every=3, grad_accum=2, warmup_steps=2)
    root = tmp_path_factory.mktemp("fsdp")
    single = run_training(cfg_for(batch_size=8, **common), corpus_tokens, root / "one", log=lambda m: None,
                          progress=False)
    # the chunked loss too (refinery.tasks.train.chunked_ce): FSDP2 keeps the root unit (the tied head)
    # gathered after a training forward and reshards it after validation's; the curve must not notice
    fsdp = run_training(cfg_for(batch_size=4, devices=2, strategy="fsdp", loss_chunk_tokens=96, **common),
                        corpus_tokens, root / "two", log=lambda m: None, progress=False)
    return single, fsdp, common, root


def test_fsdp_matches_single_process(curves):
    single, fsdp, _, _ = curves
    assert fsdp["world_size"] == 2 and fsdp["strategy"] == "fsdp" and single["strategy"] == "single"
    assert fsdp["tokens"] == single["tokens"]
    a, b = losses(single), losses(fsdp)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) < TOL, (step, a[step], b[step])
    for step, v in val_losses(single).items():
        assert abs(v - val_losses(fsdp)[step]) < TOL
    # the checkpoint's HF folder holds the gathered full model; the shards sit beside it
    ck = Path(fsdp["final_checkpoint"])
    assert (ck / "model.safetensors").exists() and any((ck / "dcp").glob("*.distcp"))


def test_each_rank_holds_half(curves):
    _, fsdp, _, _ = curves
    shards = fsdp["shards"]
    assert len(shards) == 2
    total = shards[0]["param_numel_total"]
    assert sum(s["param_numel_local"] for s in shards) == total
    for s in shards:
        assert abs(s["param_numel_local"] / total - 0.5) < 0.05, shards
        # AdamW's two moments per parameter element this rank holds
        assert abs(s["optim_numel_local"] - 2 * s["param_numel_local"]) <= 2 * 64, shards


LAUNCHER = r"""
import json, sys
import torch
torch.set_num_threads(1)
from refinery.tasks.train.config import TrainConfig
from refinery.tasks.train.loop import run_training
cfg = TrainConfig.model_validate_json(sys.argv[1])
from refinery.tasks.train.distributed import FollowerNodeDone
try:
    res = run_training(cfg, json.loads(sys.argv[2]), sys.argv[3], log=lambda m: None, progress=False)
except FollowerNodeDone:   # node 1: its processes finished; node 0 reports
    res = {"status": "node_done"}
print("RESULT " + json.dumps({k: res.get(k) for k in ("status", "steps", "world_size", "history")}))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _python_env(**extra) -> dict:
    import os

    root = Path(__file__).resolve().parents[2]
    return dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", **extra)


@pytest.mark.slow
def test_two_launchers_as_two_nodes_match_one_node(curves, corpus_tokens, tmp_path):
    """Two launchers on this machine act as two nodes of one process each (c10d rendezvous on
    loopback, gloo): the curve is the one-process curve with the same global batch. (DDP: the
    multi-node path is the same for FSDP, whose sharding the 2-process launch above covers.)"""
    import json
    import subprocess
    import sys

    single, _, common, _ = curves
    cfg = cfg_for(batch_size=4, devices=1, strategy="ddp", **common)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", LAUNCHER, cfg.model_dump_json(), json.dumps(corpus_tokens),
                               str(tmp_path / "ck")], env=_python_env(
                                   REFINERY_NNODES="2", REFINERY_NODE_RANK=str(node),
                                   REFINERY_RDZV_ENDPOINT=f"127.0.0.1:{port}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    node0 = json.loads(outs[0][0].split("RESULT ", 1)[1])
    node1 = json.loads(outs[1][0].split("RESULT ", 1)[1])
    assert node0["world_size"] == 2 and node0["status"] == "done" and node1["status"] == "node_done"
    a, b = losses(single), losses(node0)
    assert sorted(b) == list(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) < TOL, (step, a[step], b[step])


@pytest.mark.slow
def test_sigterm_fsdp_run_resumes_onto_the_same_curve(curves, corpus_tokens, tmp_path):
    """SIGTERM to torchrun: it forwards the signal, every rank checkpoints its shards at the end
    of the step and exits; the re-run resumes from them onto the uninterrupted curve."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from refinery.tasks.train.loop import run_training

    _, fsdp, common, _ = curves
    cfg = cfg_for(batch_size=4, devices=2, strategy="fsdp", loss_chunk_tokens=96, **common)
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "launch.json").write_text(json.dumps({"config": cfg.model_dump(mode="json"), "reader": corpus_tokens,
                                                "ckpt_dir": str(ck), "stop_after": None}))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "refinery.tasks.train.worker", str(ck / "launch.json")], env=_python_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = ck / "metrics" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        if sum("loss" in r for r in rows) >= 1:
            break
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    result = json.loads((ck / "result.json").read_text())
    k = result["steps"]
    assert result["status"] == "preempted" and 1 <= k < 6, (result["status"], k, out[-2000:])
    assert (ck / f"step-{k:08d}" / "dcp").is_dir(), "SIGTERM wrote the sharded checkpoint of the current step"

    resumed = run_training(cfg, corpus_tokens, ck, log=lambda m: None, progress=False)
    assert resumed["status"] == "done"
    a, b = losses(fsdp), losses(resumed)
    for step in range(k + 1, 7):
        assert abs(a[step] - b[step]) < 1e-6, (step, a[step], b[step])
