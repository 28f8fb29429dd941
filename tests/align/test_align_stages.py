"""The dpo and ppo stages: real pairs, chaining from a finetune-style dataset, HF outputs,
fingerprints over the input files, caching and determinism."""
from __future__ import annotations

import os

import pytest

from refinery_testlib import read_exec_log


@pytest.fixture(scope="module")
def finetune_like(tmp_path_factory, tiny_causal_lm_dir):
    """A dataset shaped like the finetune flow's output: the model in merged/, named by the manifest."""
    from refinery.tasks.store import Store

    store = Store(tmp_path_factory.mktemp("ft_store"))
    b = store.builder("finetune", "0123456789abcdef")
    b.put_dir(tiny_causal_lm_dir, "merged")
    return b.publish(version="1", config={}, inputs=[], extra={"merged": "merged"})


def test_dpo_on_real_pairs_reports_before_and_after(align_store, tiny_causal_lm_dir, hh_subset):
    from refinery.tasks.align.dpo import DPOConfig
    from refinery.tasks.align.stage import DPOStageConfig, dpo_stage

    cfg = DPOStageConfig(model=str(tiny_causal_lm_dir), data=str(hh_subset), max_pairs=600, val_fraction=0.25,
                         train=DPOConfig(lr=1e-3, beta=0.1, batch_size=16, max_prompt_len=32, max_len=128))
    ds = dpo_stage.run(align_store, [], cfg)
    m, s = ds.manifest["metrics"], ds.manifest["stats"]
    # before training the policy is the reference: every implicit reward is 0
    assert m["held_out_accuracy_before"] == 0.5 and m["held_out_margin_before"] == 0.0
    assert s["held_out_before"]["loss"] == pytest.approx(0.693147, abs=1e-5)
    # after: the held-out pairs (never trained on) are ranked better than chance
    assert m["held_out_accuracy"] >= 0.58 and m["held_out_margin"] > 0, m
    assert s["held_out_after"]["loss"] < s["held_out_before"]["loss"]
    assert s["train_after"]["accuracy"] > 0.6 and s["train_after"]["margin"] > m["held_out_margin"]
    assert s["held_out_after"]["reward_chosen"] > s["held_out_after"]["reward_rejected"]
    from refinery.tasks.train.metrics import read_metrics

    rows = read_metrics(ds.file("metrics"))
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows) == s["steps"] and all({"loss", "accuracy", "margin"} <= set(r) for r in train_rows)
    # the held-out figures as validation rows: before (step 0), every eval_every steps (steps / 5),
    # and after (the last step)
    val = [(r["step"], r["val_accuracy"]) for r in rows if r["split"] == "val"]
    every = s["steps"] // 5
    assert [v[0] for v in val] == [0, *range(every, s["steps"], every), s["steps"]]
    assert val[0] == (0, m["held_out_accuracy_before"]) and val[-1] == (s["steps"], m["held_out_accuracy"])
    # the schedule: warm-up then cosine decay of the logged learning rate; no early stop asked for
    lrs = [r["lr"] for r in train_rows]
    assert max(lrs) == pytest.approx(1e-3, rel=0.05) and lrs[-1] < 0.1 * max(lrs)
    assert s["restored_step"] is None and s["early_stopping_metric"] == "loss"
    files = {f["path"] for f in ds.manifest["files"]}
    assert {"metrics/metrics.jsonl", "metrics/loss.png", "metrics/curves.png", "model/metrics/loss.png"} <= files
    assert any(f.startswith("metrics/tensorboard/events.out.tfevents.") for f in files)


def test_dpo_lora_from_finetune_dataset_is_deterministic(tmp_path, finetune_like, dpo_en_path, exec_log):
    from transformers import AutoModelForCausalLM

    from refinery.tasks.align.common import LoraSettings, resolve_model_dir
    from refinery.tasks.align.dpo import DPOConfig
    from refinery.tasks.align.stage import DPOStageConfig, dpo_stage

    cfg = DPOStageConfig(model=finetune_like.path, data=str(dpo_en_path), max_pairs=24,
                         train=DPOConfig(lr=1e-3, max_steps=3, batch_size=4, max_len=64, lora=LoraSettings(enabled=True, r=4)))
    assert cfg.model_dump()["model_id"] == "dataset:finetune:0123456789abcdef"
    a = dpo_stage.run(tmp_path / "a", [finetune_like], cfg)
    b = dpo_stage.run(tmp_path / "b", [finetune_like], cfg)
    assert a.fingerprint == b.fingerprint and a.manifest["inputs"][0]["stage"] == "finetune"
    from refinery.tasks.train.metrics import read_metrics, without_timing

    # byte-identical models, adapters and tokenizers; the metrics differ only in wall-clock figures
    sha = lambda ds: {f["path"]: f["sha256"] for f in ds.manifest["files"] if "metrics/" not in f["path"]}  # noqa: E731
    assert sha(a) == sha(b)
    assert {"adapter/adapter_model.safetensors", "merged/model.safetensors", "merged/tokenizer.json"} <= set(sha(a))
    assert without_timing(read_metrics(a.file("metrics"))) == without_timing(read_metrics(b.file("metrics")))
    # 3 steps: validated before, then every step (eval_every = max(1, 3 // 5))
    assert [r["step"] for r in read_metrics(a.file("merged/metrics"))] == [0, 1, 1, 2, 2, 3, 3]
    AutoModelForCausalLM.from_pretrained(resolve_model_dir(a.path))
    assert dpo_stage.run(tmp_path / "a", [finetune_like], cfg).path == a.path
    assert len(read_exec_log(exec_log)) == 2  # the third call was a cache hit


def test_data_file_identity_is_in_the_fingerprint(tmp_path, tiny_causal_lm_dir, dpo_en_path):
    from refinery.tasks.align.dpo import DPOConfig
    from refinery.tasks.align.stage import DPOStageConfig, dpo_stage

    data = tmp_path / "pairs.json"
    data.write_bytes(dpo_en_path.read_bytes())
    cfg = DPOStageConfig(model=str(tiny_causal_lm_dir), data=str(data), max_pairs=8, train=DPOConfig(max_steps=1))
    fp1 = dpo_stage.fingerprint([], cfg)
    os.utime(data, ns=(10**18, 10**18))
    assert dpo_stage.fingerprint([], cfg) != fp1
    assert dpo_stage.fingerprint([], cfg.model_copy(update={"seed": 1})) != dpo_stage.fingerprint([], cfg)


def test_ppo_stage_against_trained_reward_model(tmp_path, finetune_like, trained_reward, hh_subset):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from refinery.tasks.align.common import resolve_model_dir
    from refinery.tasks.align.ppo import PPOConfig
    from refinery.tasks.align.stage import PPOStageConfig, ppo_stage

    cfg = PPOStageConfig(model=finetune_like.path, reward_model=trained_reward.path, data=str(hh_subset),
                         max_pairs=64, reward_max_prompt_len=32, reward_max_len=128,
                         train=PPOConfig(max_steps=3, batch_size=8, mini_batch_size=4, max_new_tokens=12,
                                         lr=1e-3, temperature=0.9, top_k=50, kl_coef=0.1))
    ds = ppo_stage.run(tmp_path, [finetune_like, trained_reward], cfg)
    m = ds.manifest
    assert m["config"]["reward_model_id"] == f"dataset:reward:{trained_reward.fingerprint}"
    assert [i["stage"] for i in m["inputs"]] == ["finetune", "reward"]
    assert m["counts"]["steps"] == 3 and m["counts"]["rollouts"] == 24 and m["counts"]["prompts"] > 8
    for k in ("reward_first", "reward_last", "kl_last", "kl_max", "entropy_last"):
        assert isinstance(m["metrics"][k], float)
    from refinery.tasks.train.metrics import read_metrics, without_timing

    rows = read_metrics(ds.file("metrics"))
    hist = [h for h in rows if h["split"] == "train"]
    assert [h["step"] for h in hist] == [1, 2, 3]
    # held-out prompts (never trained on) sampled before training and at every validation
    assert [h["step"] for h in rows if h["split"] == "val"] == [0, 1, 2, 3]
    assert all(isinstance(h["val_reward"], float) for h in rows if h["split"] == "val")
    assert [h["kl_coef"] for h in hist] == [0.1] * 3   # fixed coefficient (no kl_target)
    assert all(0 < h["reply_len"] <= 12 and h["entropy"] > 0 for h in hist)
    assert m["stats"]["reward_model"] == trained_reward.file("model")
    policy = AutoModelForCausalLM.from_pretrained(resolve_model_dir(ds.path))
    assert policy.config.vocab_size == 512
    head = load_file(ds.file(m["value_head"]))
    assert set(head) == {"weight", "bias"} and torch.isfinite(head["weight"]).all()
    # same inputs, config and seed => byte-identical policy, value head and per-step history
    again = ppo_stage.run(tmp_path / "again", [finetune_like, trained_reward], cfg)
    sha = lambda d: {f["path"]: f["sha256"] for f in d.manifest["files"] if "metrics/" not in f["path"]}  # noqa: E731
    assert sha(again) == sha(ds) and "metrics/metrics.jsonl" in {f["path"] for f in ds.manifest["files"]}
    assert without_timing(read_metrics(again.file("metrics"))) == without_timing(rows)
    assert {"split", "seconds", "tokens", "loss", "reward", "kl"} <= set(hist[0]) and hist[1]["tokens"] > hist[0]["tokens"]
