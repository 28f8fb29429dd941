"""The fine-tuning stage's configuration (pydantic only: cheap to import from refinery.flows and the CLI).

Learning-rate defaults by method (``lr=None`` picks them; see :data:`DEFAULT_LR`):

=============== ======== =================================================================
method          lr       why
=============== ======== =================================================================
full            2e-5     all weights move: the usual 1e-5 .. 5e-5 range for SFT
lora, qlora     2e-4     LoRA / QLoRA papers and PEFT examples use 1e-4 .. 2e-4 (QLoRA: 2e-4
                         for models up to 13B)
ia3             3e-3     (IA)^3 learns a few rescaling vectors; T-Few used 3e-3
llama_adapter   9e-3     LLaMA-Adapter paper's base learning rate (zero-init gated prompts)
prompt_tuning   3e-2     soft prompts need large steps (Lester et al. used 0.3 with Adafactor;
                         3e-2 is PEFT's AdamW example)
prefix_tuning   1e-2     PEFT's prefix-tuning example; Li & Liang used 5e-5 .. 8e-5 with the
                         reparametrisation MLP, which we leave off
=============== ======== =================================================================
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from refinery.tasks.config import StrictModel

Method = Literal["full", "lora", "qlora", "ia3", "llama_adapter", "prompt_tuning", "prefix_tuning"]
METHODS: tuple[str, ...] = ("full", "lora", "qlora", "ia3", "llama_adapter", "prompt_tuning", "prefix_tuning")

DEFAULT_LR: dict[str, float] = {
    "full": 2e-5,
    "lora": 2e-4,
    "qlora": 2e-4,
    "ia3": 3e-3,
    "llama_adapter": 9e-3,
    "prompt_tuning": 3e-2,
    "prefix_tuning": 1e-2,
}
# methods whose adapter can be folded into the base weights (merge_and_unload)
MERGEABLE: tuple[str, ...] = ("lora", "qlora", "ia3")
# methods that feed extra virtual tokens / past key-values: no packing with them
PROMPT_METHODS: tuple[str, ...] = ("prompt_tuning", "prefix_tuning", "llama_adapter")

from refinery.tasks.modelref import model_identity


class FinetuneConfig(StrictModel):
    """Supervised fine-tuning of a causal LM on an instruction file, by one of seven methods."""

    # -- inputs
    model: str = Field(description="Base model: a Hugging Face model folder, a hub id, or a refinery dataset folder whose manifest names a model (e.g. pretrain's output).")
    data: str = Field(description="Instruction file: Alpaca JSON/JSONL (instruction, input, output), ShareGPT (conversations), OpenAI-style messages JSONL, or self-instruct (instruction, instances).")
    data_format: Literal["auto", "alpaca", "sharegpt", "openai", "self_instruct"] = Field("auto", description="Record format; auto detects it per record.")
    tokenizer: str | None = Field(None, description="Tokenizer folder or hub id when the model folder has none.")
    revision: str | None = Field(None, description="Hub revision of the base model (hub ids only).")
    # -- method
    method: Method = Field("lora", description="full | lora | qlora | ia3 | llama_adapter | prompt_tuning | prefix_tuning.")
    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA) for lora/qlora.")
    target_modules: str | list[str] | None = Field(None, description="Modules to adapt (lora, qlora, ia3): None = attention projections (ia3: PEFT's per-architecture default), 'all-linear', or a list of module names.")
    num_virtual_tokens: int = Field(8, ge=1, description="Soft-prompt / prefix length (prompt_tuning, prefix_tuning).")
    adapter_len: int = Field(8, ge=1, description="LLaMA-Adapter prompt length per layer.")
    adapter_layers: int | None = Field(None, ge=1, description="LLaMA-Adapter: number of top layers that get prompts (None = all).")
    # -- QLoRA
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (qlora).")
    bnb_double_quant: bool = Field(True, description="Quantize the quantization constants too (qlora).")
    # -- numerics and device
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Matmul dtype (autocast / 4-bit compute): auto = bfloat16 on a GPU that has it, else float32.")
    weights_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Frozen base weights' dtype for adapter methods: auto = compute dtype. Full fine-tuning always keeps float32 master weights.")
    merged_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="dtype of the merged model: auto = the base config's dtype.")
    optimizer: Literal["auto", "adamw", "adamw_8bit", "paged_adamw_8bit"] = Field("auto", description="auto = paged 8-bit AdamW for qlora on a GPU, else torch AdamW.")
    gradient_checkpointing: bool | None = Field(None, description="None = on for qlora (prepare_model_for_kbit_training's default), off otherwise.")
    # -- optimisation
    lr: float | None = Field(None, gt=0, description="Peak learning rate; None = the method's default (DEFAULT_LR).")
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int | None = Field(None, ge=0, description="Linear warm-up steps; None = warmup_ratio * max_steps.")
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0)
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Final lr as a fraction of the peak (cosine, linear).")
    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    grad_clip: float = Field(1.0, ge=0.0, description="Max gradient norm (0 = off).")
    seq_len: int = Field(512, ge=8, description="Max tokens per example (longer ones are truncated and counted) and the packed row length.")
    packing: bool = Field(False, description="Pack several examples per row (position ids restart per example; no attention across examples).")
    # -- validation, early stopping, samples
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of records held out for validation and sample generations.")
    max_val_examples: int = Field(256, ge=1)
    eval_every: int | None = Field(None, ge=1, description="Validate every N steps (None = max_steps // 5).")
    early_stopping_patience: int = Field(3, ge=0, description="Stop after this many validations without improvement (0 = never).")
    early_stopping_min_delta: float = Field(0.0, ge=0.0)
    load_best: bool = Field(True, description="Restore the trainable weights of the best validation loss at the end.")
    num_samples: int = Field(3, ge=0, description="Held-out instructions generated before and after training.")
    sample_max_new_tokens: int = Field(32, ge=1)
    max_records: int | None = Field(None, ge=1, description="Use only the first N valid records.")
    seed: int = Field(0)
    # -- identity of the raw inputs (filled automatically; part of the fingerprint)
    identity: dict | None = Field(None, description="Identities of model and data (filled in from the files when left empty).")

    @model_validator(mode="after")
    def _check(self):
        if self.packing and self.method in PROMPT_METHODS:
            raise ValueError(f"packing is not supported with method={self.method} (virtual tokens would "
                             "attend across packed examples); set packing=false")
        if self.identity is None:
            self.identity = {"model": model_identity(self.model, self.revision),
                             "data": file_identity(self.data)}
        return self

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def resolved_warmup(self) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, self.max_steps)
        return int(round(self.warmup_ratio * self.max_steps))

    def resolved_eval_every(self) -> int:
        return self.eval_every or max(1, self.max_steps // 5)


# --------------------------------------------------------------------------- input identities
def file_identity(path: str) -> str:
    """Content hash of the instruction file (``missing:PATH`` when it does not exist yet)."""
    p = Path(path)
    if not p.is_file():
        return f"missing:{path}"
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()}:{p.stat().st_size}"
