"""The loop: loss falls on real text for every objective, exact resume, early stopping, checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from train_fixtures import (corpus_texts, corpus_tokens, cfg_for, losses, one_thread, readers, run,  # noqa: F401
                            train_tokenizer_dir, val_losses)


@pytest.mark.parametrize("objective", ["clm", "mlm", "span"])
def test_loss_falls_on_real_text(objective, readers, tmp_path):
    res = run(cfg_for(objective=objective), readers, tmp_path / "ck")
    assert res["status"] == "done" and res["steps"] == 30
    assert res["val_loss_start"] > 5.5, "starts near log(vocab) = ln 576"
    assert res["val_loss_end"] < res["val_loss_start"] - 0.7, (res["val_loss_start"], res["val_loss_end"])
    assert sorted(val_losses(res)) == [0, 10, 20, 30]


@pytest.mark.parametrize("objective,accum", [("clm", 2), ("mlm", 1)])
def test_resume_is_exact(objective, accum, readers, tmp_path):
    cfg = cfg_for(objective=objective, grad_accum=accum, max_steps=12, eval_every=4, batch_size=4)
    full = run(cfg, readers, tmp_path / "full")
    first = run(cfg, readers, tmp_path / "resumed", stop_after=5)
    assert first["status"] == "stopped" and first["steps"] == 5
    second = run(cfg, readers, tmp_path / "resumed")   # fresh readers and model: everything from the checkpoint
    assert second["status"] == "done"
    a, b = losses(full), losses(second)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in range(6, 13):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    assert val_losses(full).keys() == val_losses(second).keys()
    for step, v in val_losses(full).items():
        assert abs(v - val_losses(second)[step]) <= 1e-6
    # a finished run is not retrained
    again = run(cfg, readers, tmp_path / "resumed")
    assert again["steps"] == 12 and losses(again) == b


def test_early_stopping_and_checkpoints(readers, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refinery.tasks.train.checkpoint import list_checkpoints, load_state

    # a high constant-ish lr: validation loss stalls after a dozen steps and patience 2 stops the run
    cfg = cfg_for(max_steps=200, lr=0.05, warmup_steps=0, eval_every=3, early_stopping_patience=2, keep_last=2, grad_clip=0)
    res = run(cfg, readers, tmp_path / "ck")
    assert res["status"] == "early_stopped" and res["steps"] < 200
    vals = val_losses(res)
    best = min(vals, key=vals.get)
    assert res["best_step"] == best and res["best_val_loss"] == vals[best]
    assert best > 0 and res["steps"] == best + 2 * 3, "stopped after 2 evaluations without improvement"
    kept = [s for s, _ in list_checkpoints(tmp_path / "ck")]
    assert best in kept and res["steps"] in kept and len(kept) <= 3, kept
    index = json.loads((tmp_path / "ck" / "checkpoints.json").read_text())
    assert index["best"] == best and index["latest"] == res["steps"]
    # Hugging Face format: model + tokenizer load; weights in safetensors; state loads with weights_only
    ck = Path(res["final_checkpoint"])
    model = AutoModelForCausalLM.from_pretrained(ck)
    assert model.config.hidden_size == 64
    assert AutoTokenizer.from_pretrained(ck).eos_token == "<|endoftext|>"
    with safe_open(ck / "model.safetensors", "pt") as f:
        assert any("embed_tokens" in k for k in f.keys())
    st = load_state(ck)
    assert st["step"] == res["steps"] and st["status"] == "early_stopped"
    assert set(st["rng"]) >= {"torch", "numpy", "python"} and "epoch" in st["method"]["reader"]
    mdir = tmp_path / "ck" / "metrics"   # the common metrics folder (refinery.tasks.train.metrics)
    for name in ("metrics.jsonl", "loss.png"):
        assert (mdir / name).exists()
    assert (mdir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((mdir / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(x) for x in (mdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, res["steps"] + 1))
    assert all(r["lr"] > 0 and r["tokens_per_sec"] > 0 for r in rows if "loss" in r)
    # the common row schema: step, split, seconds, tokens, then the metrics
    assert all({"step", "split", "seconds", "tokens"} <= set(r) for r in rows)
    assert {r["split"] for r in rows if "loss" in r} == {"train"} and {r["split"] for r in rows if "val_loss" in r} == {"val"}
    train_rows = [r for r in rows if r["split"] == "train"]
    assert all(b["seconds"] >= a["seconds"] and b["tokens"] == a["tokens"] + 8 * 64 for a, b in zip(train_rows, train_rows[1:]))
    assert res["peak_memory_mb"] > 0


def test_activation_checkpointing_gives_the_same_losses(readers, tmp_path):
    cfg = cfg_for(max_steps=3, eval_every=3, batch_size=4)
    plain = run(cfg, readers, tmp_path / "plain")
    ckpt = run(cfg.model_copy(update={"grad_checkpointing": True}), readers, tmp_path / "gc")
    for step, v in losses(plain).items():
        assert abs(v - losses(ckpt)[step]) < 1e-5
