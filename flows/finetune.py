"""finetune: supervised fine-tuning of a causal LM on an instruction file.

``refinery run finetune --set input=MODEL --set data=FILE.json --set method=lora --set lora.r=16 --set max_steps=100``

``input`` is a Hugging Face model folder, a hub id, or a refinery dataset naming a model (the
pretrain flow's output). The model's config picks the task: a causal LM is instruction-tuned on
chat-rendered conversations; an encoder-decoder (pretrain's span-corruption T5) is tuned text to
text (the instruction and input on the encoder, the answer as labels); a masked-LM encoder gets a
sequence-classification head and ``data`` is a file of ``{"text", "label"}`` records. ``method`` is one of full, lora, qlora, ia3, llama_adapter,
prompt_tuning, prefix_tuning. The output dataset holds ``adapter/`` (PEFT format) and, for
lora/qlora/ia3, ``merged/`` (plain transformers); for ``full`` the model sits at its top.
"""
from __future__ import annotations

import os
from typing import ClassVar

from pydantic import Field

from refinery.flows.common import FlowParams, emit_completed, gpu_slot, print_table, refinery_flow
from refinery.tasks.finetune.config import FinetuneConfig, FinetuneSettings


class _Inputs(FlowParams):
    """The storage root and the two inputs: first in the help and the Prefect form."""

    input: str = Field(description="Base model: a Hugging Face model folder, a hub id, or a refinery dataset naming a model (e.g. the pretrain flow's output).")
    data: str = Field(description="Instruction data: Alpaca (instruction/input/output), ShareGPT (conversations), OpenAI messages or self-instruct records; JSON, JSONL (gzipped too), Parquet, a dataset folder or an fsspec URL.")


class FinetuneParams(FinetuneSettings, _Inputs):
    """Flow parameters: the storage root, the two inputs, then every fine-tuning setting (one field
    each, declared in :class:`FinetuneSettings`; LoRA's under ``lora.``)."""

    flow_name: ClassVar[str] = "finetune"

    def stage_config(self) -> FinetuneConfig:
        def local(p: str) -> str:  # absolute local paths, so the fingerprint does not depend on the cwd
            return os.path.abspath(p) if "://" not in p and os.path.exists(p) else p

        settings = self.model_dump(include=set(FinetuneSettings.model_fields))
        return FinetuneConfig.model_validate({**settings, "model": local(self.input), "data": local(self.data)})

    def memory_plan(self):
        """The memory estimate per device of this run (``refinery plan finetune``)."""
        from refinery.tasks.train.plan import plan_finetune

        return plan_finetune(self.stage_config())


@refinery_flow("finetune", FinetuneParams)
def finetune_flow(p: FinetuneParams) -> dict:
    """Fine-tune a causal LM on instructions (full, LoRA, QLoRA, IA3, LLaMA-Adapter, prompt or prefix tuning)."""
    from refinery.tasks.finetune.stage import finetune
    from refinery.tasks.report import table_artifact
    from refinery.tasks.train.metrics import report_metrics

    cfg = p.stage_config()
    with gpu_slot():
        ds = finetune.call(p.workdir, [], cfg)
    m, s = ds.manifest, ds.manifest.get("stats", {})
    row = {"method": cfg.method, "trainable": s.get("trainable_params"), "trainable_%": s.get("trainable_pct"),
           "val_before": s.get("val_loss_before"), "val_after": s.get("val_loss_after"),
           "steps": ds.counts.get("steps"), "peak_mb": s.get("peak_memory_mb"), "tok/s": s.get("tokens_per_sec"),
           "bad_records": ds.counts.get("bad_records"), "truncated": ds.counts.get("truncated")}
    print_table([row], title="== finetune")
    table_artifact("finetune-summary", [row], description="fine-tuning summary")
    report_metrics(ds, "finetune", description="loss, learning rate and validation loss by step")
    outputs = {}
    for key in ("adapter", "merged"):
        if m.get(key):
            outputs[f"finetune_{key}"] = ds.file(m[key])
    outputs["finetune"] = ds.path  # last: the primary output the next flow takes as input
    out = {"outputs": outputs, "counts": {"finetune": ds.counts}}
    emit_completed("finetune", out, primary=ds.path)
    return out
