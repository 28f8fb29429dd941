"""The finetune stage: caching by fingerprint (inputs' identities included), determinism, learning,
early stopping, gradient accumulation, packing, learning-rate defaults, refinery-dataset inputs."""
from __future__ import annotations

import json

import pytest

from refinery.tasks.finetune.config import DEFAULT_LR, METHODS, FinetuneConfig, model_identity
from refinery.tasks.finetune.stage import finetune

FAST = dict(device="cpu", max_steps=3, eval_every=3, seq_len=64, batch_size=4, val_fraction=0.25, num_samples=1, sample_max_new_tokens=4)


def _exec_lines(path):
    return path.read_text().splitlines() if path.exists() else []


def _losses(ds):
    from refinery.tasks.train.metrics import read_metrics

    return [r["loss"] for r in read_metrics(ds.file("metrics")) if r["split"] == "train"]


def test_cached_deterministic_and_input_identity(tiny_causal_lm_dir, sft_file, tmp_path, exec_log):
    cfg = FinetuneConfig(model=str(tiny_causal_lm_dir), data=str(sft_file), method="lora", lora={"dropout": 0.1}, **FAST)
    a = finetune.run(tmp_path / "s1", cfg=cfg)
    again = finetune.run(tmp_path / "s1", cfg=FinetuneConfig.model_validate(cfg.model_dump()))
    assert again.path == a.path and len(_exec_lines(exec_log)) == 1  # cached: no second execution
    b = finetune.run(tmp_path / "s2", cfg=cfg)
    assert len(_exec_lines(exec_log)) == 2 and b.fingerprint == a.fingerprint
    # byte-identical outputs and identical loss curves (dropout on: seeded); the metrics folders
    # differ only in wall-clock figures and TensorBoard's timestamped file names
    from refinery.tasks.train.metrics import read_metrics, without_timing

    sha = lambda ds: {f["path"]: f["sha256"] for f in ds.manifest["files"] if "metrics/" not in f["path"]}  # noqa: E731
    assert sha(a) == sha(b)
    assert _losses(a) == _losses(b)
    assert without_timing(read_metrics(a.file("metrics"))) == without_timing(read_metrics(b.file("metrics")))
    files = {f["path"] for f in a.manifest["files"]}
    for folder in ("", "adapter/", "merged/"):   # the common metrics folder, also in each exported model
        assert {f"{folder}metrics/metrics.jsonl", f"{folder}metrics/loss.png"} <= files
    tensorboard = {f.split("metrics/tensorboard/")[0] for f in files if "metrics/tensorboard/events.out.tfevents." in f}
    assert tensorboard == {""}, "TensorBoard events once, at the top (each run listed once)"
    rows = read_metrics(a.file("metrics"))
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    # the engine validates the starting point (step 0) too
    assert [r["step"] for r in rows if r["split"] == "val"] == [0, 3] and rows[-1]["val_loss"] > 0
    assert all({"step", "split", "seconds", "tokens"} <= set(r) for r in rows)
    assert a.manifest["stats"]["val_loss_after"] == b.manifest["stats"]["val_loss_after"]

    # the data file's content is part of the fingerprint
    changed = tmp_path / "changed.json"
    recs = json.loads(sft_file.read_text())
    recs[0]["output"] = "something else"
    changed.write_text(json.dumps(recs))
    cfg2 = FinetuneConfig(model=str(tiny_causal_lm_dir), data=str(changed), method="lora", **FAST)
    cfg3 = FinetuneConfig(model=str(tiny_causal_lm_dir), data=str(sft_file), method="lora", **FAST)
    assert cfg2.identity["data"] != cfg3.identity["data"]
    assert finetune.fingerprint([], cfg2) != finetune.fingerprint([], cfg3)
    assert cfg3.identity["model"].startswith("dir:")
    assert model_identity("some-org/some-model") == "hub:some-org/some-model@main"


def test_learns_and_reports(tiny_causal_lm_dir, sft_file, tmp_path):
    cfg = FinetuneConfig(model=str(tiny_causal_lm_dir), data=str(sft_file), method="full", lr=3e-3, max_steps=10,
                         device="cpu", seq_len=64, batch_size=6, val_fraction=0.25, warmup_steps=2, eval_every=5,
                         num_samples=2, sample_max_new_tokens=6)
    ds = finetune.run(tmp_path / "s", cfg=cfg)
    s = ds.manifest["stats"]
    assert s["val_loss_after"] < s["val_loss_before"] - 0.5, (s["val_loss_before"], s["val_loss_after"])
    assert s["train_loss_last"] < s["train_loss_first"]
    assert [h["step"] for h in s["val_history"]][:2] == [5, 10]
    assert s["samples_before"][0]["record"] == s["samples_after"][0]["record"]
    assert s["samples_before"][0]["generation"] != s["samples_after"][0]["generation"]
    plan = ds.manifest["memory_plan"]   # the estimate made before training, per device
    assert plan["setup"]["method"] == "full" and plan["fits"] is True
    assert plan["bytes"]["optimizer"] == 2 * plan["bytes"]["parameters"] and plan["bytes"]["activations"] > 0
    from refinery.tasks.finetune.stage import summary_markdown

    md = summary_markdown(cfg, ds.counts, s)
    assert "trainable parameters" in md and "before:" in md and "after:" in md


def test_early_stopping_restores_best(tiny_causal_lm_dir, sft_file, tmp_path):
    # min_delta so large that nothing after the first validation (the starting point, step 0)
    # counts as an improvement: two validations later training stops, and the starting weights
    # (the adapter's zero update) come back
    cfg = FinetuneConfig(model=str(tiny_causal_lm_dir), data=str(sft_file), method="lora", max_steps=50, device="cpu",
                         eval_every=1, early_stopping_patience=2, early_stopping_min_delta=100.0, seq_len=64,
                         batch_size=4, val_fraction=0.25, num_samples=0, lr=5e-3)
    ds = finetune.run(tmp_path / "s", cfg=cfg)
    s = ds.manifest["stats"]
    assert ds.counts["steps"] == 2 and s["stopped_early"] and s["best_step"] == 0 and s["restored_best"]
    assert s["val_loss_after"] == pytest.approx(s["best_val_loss"], abs=1e-6)
    assert s["val_loss_after"] == pytest.approx(s["val_loss_before"], abs=1e-6)
    assert [h["step"] for h in s["val_history"]] == [1, 2]
    assert s["val_history"][-1]["val_loss"] != pytest.approx(s["best_val_loss"], abs=1e-6)


def test_grad_accum_matches_bigger_batch(tiny_causal_lm_dir, sft_file, tmp_path):
    common = dict(model=str(tiny_causal_lm_dir), data=str(sft_file), method="full", lr=1e-3, max_steps=3, device="cpu", eval_every=3,
                  seq_len=64, val_fraction=0.25, num_samples=0, early_stopping_patience=0)
    big = finetune.run(tmp_path / "a", cfg=FinetuneConfig(batch_size=4, grad_accum=1, **common))
    acc = finetune.run(tmp_path / "b", cfg=FinetuneConfig(batch_size=2, grad_accum=2, **common))
    assert _losses(big) == pytest.approx(_losses(acc), abs=1e-5)
    assert big.manifest["stats"]["val_loss_after"] == pytest.approx(acc.manifest["stats"]["val_loss_after"], abs=1e-5)


def test_packing_trains_same_examples(tiny_causal_lm_dir, sft_file, tmp_path):
    cfg = FinetuneConfig(model=str(tiny_causal_lm_dir), data=str(sft_file), method="lora", packing=True,
                         **{**FAST, "seq_len": 128, "batch_size": 2})
    ds = finetune.run(tmp_path / "s", cfg=cfg)
    s = ds.manifest["stats"]
    assert s["train_label_tokens"] > 0 and ds.counts["train_examples"] == 18
    with pytest.raises(ValueError, match="packing"):
        FinetuneConfig(model="m", data="d", method="prompt_tuning", packing=True)


def test_learning_rate_defaults():
    for m in METHODS:
        assert FinetuneConfig(model="m", data="d", method=m).resolved_lr() == DEFAULT_LR[m]
    assert 1e-5 <= DEFAULT_LR["full"] <= 5e-5
    assert 1e-4 <= DEFAULT_LR["lora"] <= 2e-4 and DEFAULT_LR["qlora"] == DEFAULT_LR["lora"]
    assert FinetuneConfig(model="m", data="d", lr=0.1).resolved_lr() == 0.1
    assert FinetuneConfig(model="m", data="d", method="full", lr=None).lr == DEFAULT_LR["full"]  # empty: method's
    c = FinetuneConfig(model="m", data="d", max_steps=100)
    assert c.resolved_warmup() == 3 and c.resolved_eval_every() == 20


def test_refinery_dataset_as_base_model(tiny_causal_lm_dir, sft_file, tmp_path):
    store = tmp_path / "store"
    full = finetune.run(store, cfg=FinetuneConfig(model=str(tiny_causal_lm_dir), data=str(sft_file), method="full",
                                                  **{**FAST, "max_steps": 1}))
    cfg = FinetuneConfig(model=full.path, data=str(sft_file), method="lora", **{**FAST, "max_steps": 1})
    assert cfg.identity["model"] == f"dataset:finetune:{full.fingerprint}"
    ds = finetune.run(store, cfg=cfg)
    assert ds.manifest["base_model"] == full.path
    with pytest.raises(FileNotFoundError, match="missing-model"):
        finetune.run(store, cfg=FinetuneConfig(model=str(tmp_path / "missing-model"), data=str(sft_file)))
