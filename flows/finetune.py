"""finetune: supervised fine-tuning of a causal LM on an instruction file.

``refinery run finetune --set input=MODEL --set data=FILE.json --set method=lora --set max_steps=100``

``input`` is a Hugging Face model folder, a hub id, or a refinery dataset naming a model (the
pretrain flow's output). ``method`` is one of full, lora, qlora, ia3, llama_adapter,
prompt_tuning, prefix_tuning. The output dataset holds ``adapter/`` (PEFT format) and, for
lora/qlora/ia3, ``merged/`` (plain transformers); for ``full`` the model sits at its top.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from pydantic import Field, field_validator

from refinery.flows.common import FlowParams, emit_completed, gpu_slot, refinery_flow
from refinery.tasks.finetune.config import FinetuneConfig, Method


class FinetuneParams(FlowParams):
    input: str = Field(description="Base model: a Hugging Face model folder, a hub id, or a refinery dataset naming a model (e.g. the pretrain flow's output).")
    data: str = Field(description="Instruction file: Alpaca JSON (instruction/input/output), ShareGPT (conversations), OpenAI messages JSONL or self-instruct.")
    method: Method = Field("lora", description="full | lora | qlora | ia3 | llama_adapter | prompt_tuning | prefix_tuning.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    lr: float | None = Field(None, description="Peak learning rate; empty = the method's default (full 2e-5, lora/qlora 2e-4, ia3 3e-3, llama_adapter 9e-3, prompt_tuning 3e-2, prefix_tuning 1e-2).")
    lora_r: int = Field(8, ge=1, description="LoRA rank (lora, qlora).")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: str | list[str] | None = Field(None, description="Modules to adapt: empty = attention projections, 'all-linear', or names (a list or comma-separated).")
    seq_len: int = Field(512, ge=8, description="Max tokens per example (longer ones are truncated and counted); packed row length.")
    batch_size: int = Field(4, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    packing: bool = Field(False, description="Pack examples into rows (no attention across examples).")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of records held out for validation loss, early stopping and sample generations.")
    early_stopping_patience: int = Field(3, ge=0, description="Stop after this many validations without improvement (0 = never).")
    eval_every: int | None = Field(None, ge=1, description="Validate every N steps (empty = max_steps / 5).")
    warmup_steps: int | None = Field(None, ge=0, description="Warm-up steps (empty = 3% of max_steps).")
    scheduler: str = Field("cosine", description="cosine | linear | constant.")
    device: str = Field("auto", description="auto | cpu | cuda.")
    seed: int = Field(0, description="Seed of the split, shuffling, adapter init and dropout.")
    options: dict[str, Any] = Field(default_factory=dict, description="Any other FinetuneConfig field, e.g. {\"use_dora\": true, \"num_virtual_tokens\": 16, \"compute_dtype\": \"bfloat16\"}.")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str) and "," in v:
            return [x.strip() for x in v.split(",") if x.strip()]
        return v

    def stage_config(self) -> FinetuneConfig:
        def local(p: str) -> str:  # absolute local paths, so the fingerprint does not depend on the cwd
            return os.path.abspath(p) if "://" not in p and os.path.exists(p) else p

        fields = {k: getattr(self, k) for k in (
            "method", "max_steps", "lr", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "seq_len",
            "batch_size", "grad_accum", "packing", "val_fraction", "early_stopping_patience", "eval_every",
            "warmup_steps", "scheduler", "device", "seed")}
        return FinetuneConfig.model_validate({**fields, **self.options, "model": local(self.input),
                                              "data": local(self.data)})


@refinery_flow("finetune", FinetuneParams)
def finetune_flow(p: FinetuneParams) -> dict:
    """Fine-tune a causal LM on instructions (full, LoRA, QLoRA, IA3, LLaMA-Adapter, prompt or prefix tuning)."""
    from refinery.tasks.finetune.stage import finetune
    from refinery.tasks.report import format_table, table_artifact

    cfg = p.stage_config()
    with gpu_slot():
        ds = finetune.call(p.workdir, [], cfg)
    m, s = ds.manifest, ds.manifest.get("stats", {})
    row = {"method": cfg.method, "trainable": s.get("trainable_params"), "trainable_%": s.get("trainable_pct"),
           "val_before": s.get("val_loss_before"), "val_after": s.get("val_loss_after"),
           "steps": ds.counts.get("steps"), "peak_mb": s.get("peak_memory_mb"), "tok/s": s.get("tokens_per_sec"),
           "bad_records": ds.counts.get("bad_records"), "truncated": ds.counts.get("truncated")}
    print(format_table([row], title="== finetune"), file=sys.stderr)
    table_artifact("finetune-summary", [row], description="fine-tuning summary")
    outputs = {}
    for key in ("adapter", "merged"):
        if m.get(key):
            outputs[f"finetune_{key}"] = ds.file(m[key])
    outputs["finetune"] = ds.path  # last: the primary output the next flow takes as input
    out = {"outputs": outputs, "counts": {"finetune": ds.counts}}
    emit_completed("finetune", out, primary=ds.path)
    return out
