"""The pretrain stage and flow on a real token dataset (TokenReader over Arrow shards)."""
from __future__ import annotations

import json
from pathlib import Path

from train_fixtures import TINY_MODEL, corpus_texts, one_thread, token_dataset  # noqa: F401

from refinery_testlib import read_exec_log


def stage_cfg(**kw):
    from refinery.tasks.train.config import TrainConfig

    base = dict(model=TINY_MODEL, seq_len=64, batch_size=16, max_steps=60, warmup_steps=5, lr=1e-2,
                eval_every=20, eval_batches=4, log_every=1000, device="cpu", devices=1)
    base.update(kw)
    return TrainConfig(**base)


def metric_losses(ds_path) -> dict[int, float]:
    rows = [json.loads(x) for x in (Path(ds_path) / "metrics" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_stage_output_cache_and_crash_resume(token_dataset, tmp_path, exec_log):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refinery.tasks.store import Dataset, Store
    from refinery.tasks.train.loop import run_training
    from refinery.tasks.train.stage import checkpoint_dir, pretrain

    cfg = stage_cfg()
    ds = pretrain.run(Store(tmp_path / "a"), [token_dataset], cfg)
    m = ds.manifest
    assert m["counts"]["steps"] == 60 and m["counts"]["tokens"] == 60 * 16 * 64
    assert m["val_loss_end"] < m["val_loss_start"] - 1.0
    # the model beats the unigram baseline computed from the training tokens
    # below the unigram baseline (entropy of the training tokens, ~5.26 nats) after 60 tiny steps; the
    # demo's 300 steps of the tiny preset get far below it
    assert 4.0 < m["unigram_entropy"] < 6.0
    assert m["val_loss_end"] < m["unigram_entropy"], (m["val_loss_end"], m["unigram_entropy"])
    assert m["best_step"] == 60 and m["training"]["exported_step"] == 60
    model = AutoModelForCausalLM.from_pretrained(ds.path)
    tok = AutoTokenizer.from_pretrained(ds.path)
    assert model.config.model_type == "llama" and tok.convert_tokens_to_ids("<extra_id_0>") is not None
    files = {f["path"] for f in m["files"]}
    assert m["model"] == "."   # the model folder, where every training dataset names it
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics/loss.png", "metrics/metrics.jsonl"} <= files
    assert any(f.startswith("metrics/tensorboard/events.out.tfevents.") for f in files)
    assert "trainer_state.pt" not in files, "the training state stays with the checkpoints"
    ck = checkpoint_dir(Store(tmp_path / "a").builder("pretrain", ds.fingerprint))
    assert ck == tmp_path / "a" / "checkpoints" / ds.fingerprint and (ck / "checkpoints.json").exists()

    # cached: a second run does no work
    n = len(read_exec_log(exec_log))
    assert pretrain.run(Store(tmp_path / "a"), [token_dataset], cfg).path == ds.path
    assert len(read_exec_log(exec_log)) == n

    # a run that died at step 25 (its checkpoints in the fingerprint's folder) resumes when re-run
    store_b = Store(tmp_path / "b")
    fp = pretrain.fingerprint([Dataset.open(token_dataset)], cfg)
    ck_b = store_b.root + f"/checkpoints/{fp}"
    part = run_training(cfg, {"kind": "tokens", "datasets": [token_dataset]}, ck_b, stop_after=25,
                        log=lambda m: None, progress=False)
    assert part["status"] == "stopped" and part["steps"] == 25
    resumed = pretrain.run(store_b, [token_dataset], cfg)
    a, b = metric_losses(ds.path), metric_losses(resumed.path)
    assert sorted(a) == sorted(b) == list(range(1, 61))
    assert all(abs(a[s] - b[s]) <= 1e-6 for s in a)
    assert abs(resumed.manifest["val_loss_end"] - m["val_loss_end"]) <= 1e-6


def test_cli_run_pretrain_writes_a_loadable_checkpoint(token_dataset, tmp_path, capsys, monkeypatch):
    """``refinery run pretrain --set input=... --set max_steps=N --json`` (the CLI's main, in this process:
    the same parsing, Prefect flow and JSON line, without paying for a second interpreter)."""
    from transformers import AutoModelForCausalLM

    from refinery.flows.cli import main

    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # a busy machine starts slowly
    model = [x for k, v in TINY_MODEL.items() for x in ("--set", f"model.{k}={v}")]
    args = ["run", "pretrain", "--set", f"input={token_dataset}", "--set", "max_steps=8",
            "--set", "seq_len=64", "--set", "batch_size=8", "--set", "eval_every=4", "--set", "eval_batches=2",
            *model, "--set", "device=cpu", "--workdir", str(tmp_path / "work"), "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    path = out["outputs"]["pretrain"]
    assert out["counts"]["pretrain"]["steps"] == 8
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    assert manifest["val_loss_start"] > manifest["val_loss_end"] > 0
    assert out["val_loss_start"] == manifest["val_loss_start"]
    assert AutoModelForCausalLM.from_pretrained(path).config.hidden_size == 64
    # the common metrics folder inside the model folder: rows, loss curve, TensorBoard events
    rows = [json.loads(x) for x in (Path(path) / "metrics" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in rows if r["split"] == "val"] == [0, 4, 8]
    assert (Path(path) / "metrics" / "loss.png").exists()
    assert list((Path(path) / "metrics" / "tensorboard").glob("events.out.tfevents.*"))
