"""Every method trains a few steps on the tiny model, and every output loads with plain transformers/peft."""
from __future__ import annotations

import pytest

from refinery.tasks.finetune.config import DEFAULT_LR, METHODS, FinetuneConfig
from refinery.tasks.finetune.stage import finetune

FAST = dict(device="cpu", max_steps=3, eval_every=3, seq_len=64, batch_size=4, val_fraction=0.25, num_samples=1, sample_max_new_tokens=4)
IDS = [[0, 5, 17, 99, 300, 42, 7, 8, 260, 11]]


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.ones(len(ids), len(ids[0]), dtype=torch.long)).logits.float()


def _base(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_outputs_load(method, tiny_causal_lm_dir, sft_file, tmp_path):
    import os

    from peft import PeftModel
    from transformers import AutoTokenizer

    cfg = FinetuneConfig(model=str(tiny_causal_lm_dir), data=str(sft_file), method=method, **FAST)
    ds = finetune.run(tmp_path / "store", cfg=cfg)
    m, s = ds.manifest, ds.manifest["stats"]

    # report
    assert m["method"] == method and m["counts"]["steps"] == 3
    assert m["counts"]["train_examples"] == 18 and m["counts"]["val_examples"] == 6
    assert s["lr"] == DEFAULT_LR[method]
    assert 0 < s["trainable_params"] <= s["total_params"]
    assert (s["trainable_pct"] == 100.0) == (method == "full")
    assert s["val_loss_before"] > 0 and s["val_loss_after"] > 0
    assert s["peak_memory_mb"] > 0 and s["tokens_per_sec"] > 0
    assert len(s["samples_before"]) == len(s["samples_after"]) == 1
    assert {"instruction", "reference", "generation", "record"} <= set(s["samples_after"][0])
    files = {f["path"] for f in m["files"]}
    assert {"metrics/metrics.jsonl", "metrics/loss.png", "samples.parquet"} <= files

    base = _base(tiny_causal_lm_dir)
    ref = _logits(base, IDS)
    if method == "full":
        assert m["model"] == "." and {"config.json", "model.safetensors", "tokenizer.json"} <= files
        tuned = _base(ds.path)
        assert (_logits(tuned, IDS) - ref).abs().max() > 1e-6
        tok = AutoTokenizer.from_pretrained(ds.path)
        assert tok.chat_template  # the template it was trained with travels with it
        return

    adapter = ds.file(m["adapter"])
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json"} <= files
    assert AutoTokenizer.from_pretrained(adapter).chat_template
    peft_model = PeftModel.from_pretrained(_base(tiny_causal_lm_dir), adapter).eval()
    with_adapter = _logits(peft_model, IDS)
    assert (with_adapter[:, -len(IDS[0]):] - ref).abs().max() > 1e-7  # training moved something

    if method in ("lora", "qlora", "ia3"):
        merged_dir = ds.file(m["merged"])
        assert m["model"] == "merged"   # the complete model, where every training dataset names it
        assert {"merged/config.json", "merged/model.safetensors", "merged/tokenizer.json"} <= files
        merged = _base(merged_dir)
        assert not any("lora" in k or "ia3" in k for k in merged.state_dict())
        diff = (_logits(merged, IDS) - with_adapter).abs().max().item()
        assert diff < 1e-4, diff
    else:
        assert "merged" not in m and "model" not in m   # an adapter only: consumers refuse it by name

    if method == "qlora":  # the frozen base really was 4-bit while training
        base_bytes = os.path.getsize(tiny_causal_lm_dir / "model.safetensors")
        assert s["weight_bytes"] < base_bytes
        assert s["val_loss_before"] != pytest.approx(0) and s["optimizer"] == "adamw"  # paged 8-bit is GPU-only


def test_lora_targets_attention_by_default_and_all_linear(tiny_causal_lm_dir):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from refinery.tasks.finetune.methods import attention_targets, peft_config

    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir, dtype=torch.float32)
    assert attention_targets(model) == r".*\.(?:self_attn)\.(?:k_proj|o_proj|q_proj|v_proj)"
    cfg = FinetuneConfig(model=str(tiny_causal_lm_dir), data="x.json", method="lora")
    pm = get_peft_model(model, peft_config(cfg, model))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in pm.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}

    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir, dtype=torch.float32)
    cfg = FinetuneConfig(model=str(tiny_causal_lm_dir), data="x.json", method="lora",
                         lora={"target_modules": "all-linear", "r": 4})
    pm = get_peft_model(model, peft_config(cfg, model))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in pm.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert pm.peft_config["default"].r == 4


def test_dora_merges_exactly(tiny_causal_lm_dir, sft_file, tmp_path):
    from peft import PeftModel

    cfg = FinetuneConfig(model=str(tiny_causal_lm_dir), data=str(sft_file), method="lora", lora={"use_dora": True},
                         **{**FAST, "max_steps": 2, "num_samples": 0})
    ds = finetune.run(tmp_path / "store", cfg=cfg)
    m = ds.manifest
    peft_model = PeftModel.from_pretrained(_base(tiny_causal_lm_dir), ds.file(m["adapter"])).eval()
    assert peft_model.peft_config["default"].use_dora
    diff = (_logits(_base(ds.file(m["merged"])), IDS) - _logits(peft_model, IDS)).abs().max().item()
    assert diff < 1e-4, diff
