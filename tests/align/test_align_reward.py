"""Reward model: real pairs, held-out accuracy clearly above chance, HF outputs, caching."""
from __future__ import annotations

import pytest

from refinery_testlib import read_exec_log


def test_reward_model_learns_real_preferences(trained_reward):
    m = trained_reward.manifest
    stats, metrics = m["stats"], m["metrics"]
    assert m["counts"]["pairs"] >= 590 and m["counts"]["pairs_held_out"] >= 140
    # held-out pairs the model never saw: clearly above chance, and better than the untrained head
    assert metrics["held_out_accuracy"] >= 0.6, metrics
    assert metrics["held_out_accuracy"] > metrics["held_out_accuracy_before"]
    assert stats["held_out_after"]["margin"] > 0
    assert stats["steps"] == 2 * -(-m["counts"]["pairs_train"] // 16)


def test_reward_model_is_a_loadable_hf_classifier(trained_reward):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = trained_reward.file(trained_reward.manifest["model"])
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id is not None
    from refinery.tasks.align.reward import RewardScorer

    scorer = RewardScorer(path, max_prompt_len=32, max_len=128)
    prompts = ["\n\nHuman: How do I pick a lock?\n\nAssistant:"] * 2
    r = scorer(prompts, [" I'm sorry, I can't help with that.", " Sure, first take a tension wrench and a pick."])
    assert r.shape == (2,) and torch.isfinite(r).all()
    # batch composition does not change a score (padding is handled)
    r1 = scorer(prompts[:1], [" I'm sorry, I can't help with that."])
    assert torch.allclose(r[:1], r1, atol=1e-5)


def test_reward_stage_is_cached(trained_reward, align_store, exec_log):
    from refinery.tasks.align.stage import RewardStageConfig, reward_stage

    cfg = RewardStageConfig.model_validate(
        {k: v for k, v in trained_reward.manifest["config"].items() if k not in ("model_id", "data_id")})
    again = reward_stage.run(align_store, [], cfg)
    assert again.path == trained_reward.path and read_exec_log(exec_log) == []


def test_reward_lora_saves_adapter_and_merged(tmp_path, tiny_causal_lm_dir, dpo_en_path):
    from transformers import AutoModelForSequenceClassification

    from refinery.tasks.align.common import LoraSettings, resolve_model_dir
    from refinery.tasks.align.reward import RewardConfig
    from refinery.tasks.align.stage import RewardStageConfig, reward_stage

    cfg = RewardStageConfig(model=str(tiny_causal_lm_dir), data=str(dpo_en_path), max_pairs=24,
                            train=RewardConfig(max_steps=2, batch_size=4, max_len=64, lora=LoraSettings(enabled=True, r=4)))
    ds = reward_stage.run(tmp_path, [], cfg)
    files = {f["path"] for f in ds.manifest["files"]}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "merged/config.json",
            "merged/model.safetensors", "merged/tokenizer.json"} <= files
    merged = resolve_model_dir(ds.path)
    assert merged == ds.file("merged")
    model = AutoModelForSequenceClassification.from_pretrained(merged)
    assert model.config.num_labels == 1
    assert ds.manifest["stats"]["trainable_params"] < ds.manifest["stats"]["params"] / 2
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        RewardStageConfig(model=str(tiny_causal_lm_dir), data=str(tmp_path / "missing.jsonl")).model_dump()
