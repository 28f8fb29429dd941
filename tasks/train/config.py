"""The pretraining configuration: one pydantic model, fingerprinted by the stage.

Light module (pydantic only), so flows can import it at start-up.
"""
from __future__ import annotations

from typing import Any, Literal

import json

from pydantic import Field, field_validator
from refinery.tasks.config import StrictModel

Objective = Literal["clm", "mlm", "span"]


class TrainConfig(StrictModel):
    """Everything that decides a pretraining run's numbers (model, data, optimisation, schedule)."""

    # -- model
    objective: Objective = Field("clm", description="clm: causal LM (Llama-style decoder); mlm: masked LM "
                                 "(ModernBERT-style encoder); span: T5 span corruption (encoder-decoder).")
    preset: str = Field("tiny", description="Model size preset: tiny (CPU demo), 25M, 124M, 350M, 1B.")
    model: dict[str, Any] = Field(default_factory=dict, description="Overrides of the Hugging Face config "
                                  "fields of the preset, e.g. {hidden_size: 64, num_hidden_layers: 2}.")
    # -- data
    seq_len: int = Field(128, ge=8, description="Tokens per training window.")
    batch_size: int = Field(16, ge=1, description="Windows per micro-batch on each device.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="Share of windows held out for validation.")
    weights: list[float] | None = Field(None, description="Mixing weights when several token datasets are given.")
    # -- optimisation
    max_steps: int = Field(300, ge=1, description="Optimizer steps.")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of lr (cosine decay).")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = Field(1.0, ge=0, description="Max global gradient norm (0 disables clipping).")
    # -- evaluation, early stopping, checkpoints
    eval_every: int = Field(50, ge=1, description="Evaluate validation loss every N steps (and at step 0 and the end).")
    eval_batches: int = Field(20, ge=1, description="Validation batches per evaluation.")
    patience: int = Field(0, ge=0, description="Stop after this many evaluations without improvement (0: never).")
    min_delta: float = Field(0.0, ge=0, description="Smallest validation loss decrease that counts as improvement.")
    save_every: int | None = Field(None, ge=1, description="Checkpoint every N steps (default: eval_every).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept besides the best one.")
    log_every: int = Field(10, ge=1, description="Print/log training metrics every N steps.")
    export: Literal["last", "best"] = Field("last", description="Which checkpoint becomes the stage output.")
    # -- objectives
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    noise_density: float = Field(0.15, gt=0, lt=1)
    mean_span_length: float = Field(3.0, ge=1)
    # -- runtime
    seed: int = 0
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:N, mps.")
    devices: int = Field(0, ge=0, description="Processes for data parallelism: 0 (default) uses every visible "
                         "GPU (one process on CPU); more than one launches torchrun (DDP; gloo on CPU).")
    dtype: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU.")
    compile: bool = Field(False, description="torch.compile the model.")
    grad_checkpointing: bool = Field(False, description="Activation checkpointing (recompute in backward).")
    unigram_max_tokens: int = Field(2_000_000, ge=1000, description="Training tokens counted for the unigram baseline.")

    @field_validator("model", mode="before")
    @classmethod
    def _model_from_json(cls, v: Any) -> Any:
        """Accept a JSON object string too (``--set 'model={"hidden_size": 64}'``)."""
        if isinstance(v, str):
            try:
                return json.loads(v) if v.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(f"model overrides: not a JSON object: {e}") from None
        return v

    @property
    def checkpoint_every(self) -> int:
        return self.save_every or self.eval_every


__all__ = ["TrainConfig", "Objective"]
