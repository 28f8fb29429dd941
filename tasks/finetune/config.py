"""The fine-tuning stage's configuration (pydantic only: cheap to import from refinery.flows and the CLI).

Learning-rate defaults by method (used when ``lr`` is not set; see :data:`DEFAULT_LR`):

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

from typing import Any, Literal

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

from refinery.tasks.modelref import model_identity  # noqa: E402 (after the tables above)
from refinery.tasks.train.config import LMTrainingParams, LoraParams, ParallelParams  # noqa: E402

WeightsDType = Literal["auto", "float32", "bfloat16", "float16"]


class FinetuneLora(LoraParams):
    """LoRA settings of the lora and qlora methods."""

    field_defaults = dict(dropout=0.05, target_modules=None)

    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")


class IA3Settings(StrictModel):
    """(IA)^3 settings of the ia3 method."""

    target_modules: str | list[str] | None = Field(None, description="Modules that get a learned scaling: empty = "
                                                   "PEFT's per-architecture default, 'all-linear', or a list of names.")


class FinetuneSettings(LMTrainingParams, ParallelParams):
    """Every fine-tuning setting except the two inputs (the base model and the instruction file):
    the finetune flow's parameters and the pipeline's ``finetune`` section."""

    field_defaults = dict(max_steps=100, batch_size=4, seq_len=512, early_stopping_patience=3,
                          lr=None)  # None: filled from the method (_method_lr)

    # -- inputs' format
    data_format: Literal["auto", "alpaca", "sharegpt", "openai", "self_instruct"] = Field("auto", description="Record format; auto detects it per record.")
    tokenizer: str | None = Field(None, description="Tokenizer folder or hub id when the model folder has none.")
    revision: str | None = Field(None, description="Hub revision of the base model (hub ids only).")
    # -- method
    method: Method = Field("lora", description="full | lora | qlora | ia3 | llama_adapter | prompt_tuning | prefix_tuning. "
                           "When lr is not set, each method has its own: full 2e-5, lora/qlora 2e-4, ia3 3e-3, "
                           "llama_adapter 9e-3, prompt_tuning 3e-2, prefix_tuning 1e-2.")
    lora: FinetuneLora = Field(default_factory=FinetuneLora, description="LoRA settings (lora, qlora); "
                               "lora.target_modules empty = the attention projections.")
    ia3: IA3Settings = Field(default_factory=IA3Settings, description="(IA)^3 settings (ia3).")
    num_virtual_tokens: int = Field(8, ge=1, description="Soft-prompt / prefix length (prompt_tuning, prefix_tuning).")
    adapter_len: int = Field(8, ge=1, description="LLaMA-Adapter prompt length per layer.")
    adapter_layers: int | None = Field(None, ge=1, description="LLaMA-Adapter: number of top layers that get prompts (empty = all).")
    # -- QLoRA
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (qlora).")
    bnb_double_quant: bool = Field(True, description="Quantize the quantization constants too (qlora).")
    # -- numerics
    weights_dtype: WeightsDType = Field("auto", description="Frozen base weights' dtype for adapter methods: auto = dtype. Full fine-tuning always keeps float32 master weights.")
    merged_dtype: WeightsDType = Field("auto", description="dtype of the merged model: auto = the base config's dtype.")
    optimizer: Literal["auto", "adamw", "adamw_8bit", "paged_adamw_8bit"] = Field("auto", description="auto = paged 8-bit AdamW for qlora on a GPU, else torch AdamW.")
    # -- data
    packing: bool = Field(False, description="Pack several examples per row (position ids restart per example; no attention across examples).")
    max_records: int | None = Field(None, ge=1, description="Use only the first N valid records.")
    max_val_examples: int = Field(256, ge=1, description="At most this many held-out examples.")
    # -- best weights, samples
    load_best: bool = Field(True, description="Restore the trainable weights of the best validation loss at the end.")
    num_samples: int = Field(3, ge=0, description="Held-out instructions generated before and after training.")
    sample_max_new_tokens: int = Field(32, ge=1, description="Tokens generated per sample.")

    @model_validator(mode="before")
    @classmethod
    def _method_lr(cls, data: Any) -> Any:
        """No ``lr`` (or an empty one): the method's default (:data:`DEFAULT_LR`)."""
        if isinstance(data, dict) and data.get("lr") is None:
            method = data.get("method", "lora")
            data = {**data, "lr": DEFAULT_LR.get(method, DEFAULT_LR["lora"])}
        return data

    @model_validator(mode="after")
    def _processes(self):
        if self.devices > 1 and self.method not in ("full", "lora"):
            raise ValueError(f"devices={self.devices}: several processes train methods full and lora "
                             f"(not {self.method}); use devices=1")
        return self

    @model_validator(mode="after")
    def _check(self):
        if self.packing and self.method in PROMPT_METHODS:
            raise ValueError(f"packing is not supported with method={self.method} (virtual tokens would "
                             "attend across packed examples); set packing=false")
        return self

    def resolved_lr(self) -> float:
        return self.lr


class FinetuneConfig(FinetuneSettings):
    """Supervised fine-tuning of a causal LM on an instruction file, by one of seven methods."""

    model: str = Field(description="Base model: a Hugging Face model folder, a hub id, or a refinery dataset folder whose manifest names a model (e.g. pretrain's output).")
    data: str = Field(description="Instruction data: Alpaca (instruction, input, output), ShareGPT (conversations), OpenAI-style messages, or self-instruct (instruction, instances) records in JSON, JSONL (gzipped too), Parquet, a dataset folder or an fsspec URL.")
    # identity of the raw inputs (filled automatically; part of the fingerprint)
    identity: dict | None = Field(None, description="Identities of model and data (filled in from the files when left empty).")

    @model_validator(mode="after")
    def _identify(self):
        if self.identity is None:
            self.identity = {"model": model_identity(self.model, self.revision),
                             "data": file_identity(self.data)}
        return self


# --------------------------------------------------------------------------- input identities
def file_identity(path: str) -> str:
    """Identity of the instruction data (:func:`refinery.tasks.records.identity`: a file's is the
    runtime's one rule for raw inputs, location, size, mtime), ``PATH|missing|...`` when absent."""
    from refinery.tasks.records import identity

    return identity(path)
