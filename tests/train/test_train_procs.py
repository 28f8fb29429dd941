"""Multi-process behaviour: SIGTERM checkpoints and the resumed run continues the same loss curve;
DDP on 2 CPU processes (gloo, launched through torchrun) matches one process with the same global batch."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from train_fixtures import (corpus_texts, corpus_tokens, cfg_for, losses, one_thread, readers, run,  # noqa: F401
                            train_tokenizer_dir, val_losses)

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from refinery.tasks.train.config import TrainConfig
from refinery.tasks.train.data import open_reader
from refinery.tasks.train.loop import train

cfg = TrainConfig.model_validate_json(sys.argv[1])
spec = json.loads(sys.argv[2])
tr, va, uni = (open_reader(spec, cfg.seq_len, split=s, seed=cfg.seed) for s in ("train", "val", "train"))
slow = tr.next_batch
def next_batch(n):          # slow the steps down so the parent can signal mid-run
    time.sleep(0.05)
    return slow(n)
tr.next_batch = next_batch
res = train(cfg, tr, va, sys.argv[3], unigram_reader=uni, progress=False, log=lambda m: None)
print("RESULT " + json.dumps({"status": res["status"], "steps": res["steps"]}))
"""


def test_sigterm_checkpoints_and_resume_is_exact(readers, corpus_tokens, tmp_path):
    cfg = cfg_for(max_steps=24, eval_every=5, batch_size=4)
    ck = tmp_path / "ck"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, cfg.model_dump_json(), json.dumps(corpus_tokens), str(ck)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = ck / "metrics" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline:
        rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        if sum("loss" in r for r in rows) >= 3:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    child = json.loads(out.split("RESULT ", 1)[1])
    k = child["steps"]
    assert child["status"] == "preempted" and 3 <= k < 24, child
    assert (ck / f"step-{k:08d}" / "trainer_state.pt").exists(), "SIGTERM wrote a checkpoint at the current step"

    resumed = run(cfg, readers, ck)
    full = run(cfg, readers, tmp_path / "full")
    assert resumed["status"] == full["status"] == "done"
    a, b = losses(full), losses(resumed)
    assert sorted(b) == list(range(1, 25))
    for step in range(k + 1, 25):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    for step, v in val_losses(full).items():
        assert abs(v - val_losses(resumed)[step]) <= 1e-6


def test_ddp_two_cpu_processes_match_single_process(corpus_tokens, tmp_path):
    from refinery.tasks.train.loop import run_training

    common = dict(max_steps=6, eval_every=3, grad_accum=2, warmup_steps=2)
    single = run_training(cfg_for(batch_size=8, **common), corpus_tokens, tmp_path / "one", log=lambda m: None,
                          progress=False)
    # the chunked loss too: its forward goes through the DDP wrapper, so the head's gradient from it is
    # all-reduced with the rest (the one end-to-end DDP launch of pretraining)
    ddp = run_training(cfg_for(batch_size=4, devices=2, loss_chunk_tokens=96, **common), corpus_tokens,
                       tmp_path / "two", log=lambda m: None, progress=False)
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["tokens"] == single["tokens"] == 6 * 2 * 8 * 64
    a, b = losses(single), losses(ddp)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])
    assert a[6] < a[1] - 0.3
    for step, v in val_losses(single).items():
        assert abs(v - val_losses(ddp)[step]) < 1e-4
    assert Path(ddp["final_checkpoint"], "model.safetensors").exists()
