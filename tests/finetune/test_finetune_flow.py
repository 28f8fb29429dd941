"""The finetune flow: parameters map onto the stage config (one field each, LoRA's nested; unknown
keys fail); a run writes an adapter and a merged model that plain transformers loads; a rerun is
served from the cache."""
from __future__ import annotations

import datetime
import os

import pytest
from pydantic import ValidationError

from refinery.flows.finetune import FinetuneParams


def test_params_to_stage_config(tiny_causal_lm_dir, sft_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(sft_file, tmp_path)
    p = FinetuneParams(input=str(tiny_causal_lm_dir), data=rel, method="qlora", lr=1e-4, num_virtual_tokens=4,
                       lora={"target_modules": "q_proj, v_proj", "use_dora": True, "r": 4}, dtype="bfloat16")
    cfg = p.stage_config()
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.lora.use_dora and cfg.lora.r == 4
    assert cfg.num_virtual_tokens == 4 and cfg.dtype == "bfloat16"
    assert cfg.data == str(sft_file) and cfg.method == "qlora" and cfg.resolved_lr() == 1e-4
    st = os.stat(sft_file)  # the runtime's one rule for raw input files: location|size|mtime
    assert cfg.identity["data"] == f"{sft_file}|{st.st_size}|{st.st_mtime_ns}"
    with pytest.raises(ValidationError):
        FinetuneParams(input="m", data="d", method="adapterz")


@pytest.mark.parametrize("bad", [{"lora": {"rr": 4}}, {"lora_r": 4}, {"options": {"use_dora": True}},
                                 {"compute_dtype": "bfloat16"}, {"dtype": "bf16"}])
def test_unknown_and_old_keys_fail(bad):
    """``lora.rr`` (a typo) and the old spellings (``lora_r``, ``options``, ``compute_dtype``, ``bf16``) are errors."""
    with pytest.raises(ValidationError):
        FinetuneParams(input="m", data="d", **bad)


def test_flow_run_writes_loadable_outputs(tiny_causal_lm_dir, sft_file, tmp_path, exec_log):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    from refinery.flows.finetune import finetune_flow

    p = FinetuneParams(input=str(tiny_causal_lm_dir), data=str(sft_file), method="lora", max_steps=2, seq_len=64, device="cpu",
                       val_fraction=0.25, workdir=str(tmp_path / "work"), num_samples=1, sample_max_new_tokens=4)
    started = datetime.datetime.now(datetime.timezone.utc)
    with temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180}):  # busy CI machines
        out = finetune_flow.run_params(p)
        # while training, a Prefect progress artifact (the share of steps done) tracked the run
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["finetune-lora-progress"])))
        assert [(a.type, a.data) for a in arts if a.created >= started] == [("progress", 100.0)]
    assert list(out["outputs"]) == ["finetune_adapter", "finetune_merged", "finetune"]  # primary output last
    assert out["counts"]["finetune"]["steps"] == 2
    merged = AutoModelForCausalLM.from_pretrained(out["outputs"]["finetune_merged"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out["outputs"]["finetune_merged"])
    ids = tok("### User:\nhello", return_tensors="pt")["input_ids"]
    assert merged(ids).logits.shape[-1] == merged.config.vocab_size
    assert os.path.isfile(os.path.join(out["outputs"]["finetune_adapter"], "adapter_model.safetensors"))
    # the common metrics folder: rows, loss curve and TensorBoard events; the model folders keep a copy
    from refinery.tasks.train.metrics import read_metrics

    metrics = os.path.join(out["outputs"]["finetune"], "metrics")
    assert [r["step"] for r in read_metrics(metrics) if r["split"] == "train"] == [1, 2]
    assert os.path.isfile(os.path.join(metrics, "loss.png")) and os.listdir(os.path.join(metrics, "tensorboard"))
    assert read_metrics(os.path.join(out["outputs"]["finetune_merged"], "metrics")) == read_metrics(metrics)
    n = len(exec_log.read_text().splitlines())
    assert finetune_flow.run_params(p)["outputs"] == out["outputs"]
    assert len(exec_log.read_text().splitlines()) == n == 1
