"""The training vocabulary (one name per knob, shared by every trainer) and the pretraining config.

Every trainer's config (pretrain's :class:`TrainConfig`, finetune's ``FinetuneConfig``, align's
reward/DPO/PPO configs) subclasses :class:`TrainingParams`, so ``max_steps``, ``lr``,
``batch_size``, ``weight_decay``, ``grad_clip``, ``device`` and ``dtype`` are declared once, with one
description and one set of bounds. Every trainer also follows the practice of
:class:`ScheduleParams` (gradient accumulation, warm-up and schedule, validation and early
stopping); the two language-model training loops (pretrain and finetune) add
:class:`LMTrainingParams` (sequence length, validation split, seed). LoRA settings are one nested model,
:class:`LoraParams` (``lora.r``, ``lora.alpha``, ...). A subclass changes a default, never a name:
it lists its own defaults in ``field_defaults``.

Light module (pydantic only), so flows and the CLI can import it at start-up.
"""
from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo

from refinery.tasks.config import StrictModel
from refinery.tasks.train.metrics import REPORT_TO_HELP, ReportTo

Objective = Literal["clm", "mlm", "span"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Scheduler = Literal["cosine", "linear", "constant"]


class _Defaults(StrictModel):
    """A model whose subclasses may change inherited fields' defaults (``field_defaults``) while
    the field itself (type, bounds, description) stays declared once, in the base."""

    field_defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        own = cls.__dict__.get("field_defaults") or {}
        if not own:
            return
        fields = cls.__pydantic_fields__
        unknown = sorted(set(own) - set(fields))
        if unknown:
            raise TypeError(f"{cls.__name__}.field_defaults names no field: {', '.join(unknown)}")
        for name, value in own.items():
            fields[name] = FieldInfo.merge_field_infos(fields[name], default=value)
        cls.model_rebuild(force=True)


class TrainingParams(_Defaults):
    """The knobs every trainer has (pretrain, finetune, and align's reward, DPO and PPO trainers)."""

    max_steps: int = Field(100, ge=0, description="Optimizer steps. Trainers that also count `epochs` "
                           "stop at whichever comes first; 0 there means no cap (elsewhere at least 1).")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW); finetune: empty = the method's default.")
    head_lr: float | None = Field(None, gt=0, description="Peak learning rate of newly initialised layers (reward, "
                                  "value and classification heads); empty = lr. Practice: 1e-5 to 5e-5 for "
                                  "pretrained weights (lr), about 1e-4 for new layers (head_lr).")
    batch_size: int = Field(8, ge=1, description="Examples per micro-batch (pretrain: windows per device; "
                            "finetune: sequences; reward and DPO: pairs; PPO: prompts sampled per step).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, ge=0, description="Max global gradient norm (0: no clipping).")
    device: str = Field("auto", description="auto (CUDA when available, else CPU), cpu, cuda, cuda:N.")
    dtype: DType = Field("auto", description="Precision the model computes in: float32, bfloat16, float16, "
                         "or auto (pretrain and finetune: bfloat16 on a GPU that has it, else float32; "
                         "align: the dtype the weights were saved in).")
    report_to: ReportTo = Field(default_factory=list, description=REPORT_TO_HELP)

    def resolved_head_lr(self) -> float:
        """The new layers' learning rate: ``head_lr``, or ``lr`` when it is empty."""
        return self.head_lr if self.head_lr is not None else self.lr

    @model_validator(mode="after")
    def _steps(self):
        if self.max_steps == 0 and "epochs" not in type(self).model_fields:
            raise ValueError("max_steps must be at least 1")
        return self


class ScheduleParams(TrainingParams):
    """The optimisation practice every trainer follows (pretrain, finetune, and align's reward, DPO,
    PPO and GRPO trainers): gradient accumulation, warm-up and schedule, periodic validation and
    early stopping on it (the best validated weights restored)."""

    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warm-up steps; empty = warmup_ratio * the run's steps.")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Warm-up as a fraction of the run's steps (when warmup_steps is empty).")
    scheduler: Scheduler = Field("cosine", description="Learning-rate decay after warm-up: cosine | linear | constant.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final learning rate as a fraction of lr (cosine, linear).")
    eval_every: int | None = Field(None, ge=1, description="Validate every N steps (and at the end); empty = the run's steps / 5.")
    early_stopping_patience: int = Field(0, ge=0, description="Stop after this many validations without improvement (0: never).")
    early_stopping_min_delta: float = Field(0.0, ge=0, description="Smallest improvement of the validated metric that counts "
                                            "(pretrain, finetune: validation loss; align: the trainer's held-out metric).")
    checkpoint_every: int | None = Field(None, ge=1, description="Checkpoint every N steps, so that a rerun of the "
                                         "same command after a crash or SIGTERM resumes from there (a SIGTERM always "
                                         "checkpoints); empty = pretrain: eval_every, other trainers: only on SIGTERM.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept besides the best one.")

    def resolved_warmup(self, total: int | None = None) -> int:
        """Warm-up steps of a run of ``total`` steps (default ``max_steps``)."""
        total = self.max_steps if total is None else total
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total)
        return int(round(self.warmup_ratio * total))

    def resolved_eval_every(self, total: int | None = None) -> int:
        total = self.max_steps if total is None else total
        return self.eval_every or max(1, total // 5)

    def resolved_checkpoint_every(self, total: int | None = None) -> int:
        """Steps between checkpoints (0: none but the one a SIGTERM writes)."""
        return self.checkpoint_every or 0


class LMTrainingParams(ScheduleParams):
    """The language-model training loops' knobs (pretrain and finetune): the shared practice plus
    sequence length, validation split, activation checkpointing and seed."""

    seq_len: int = Field(512, ge=8, description="Tokens per training sequence (pretrain: the window length; "
                         "finetune: longer examples are truncated, and the packed row length).")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="Share of the data held out for validation loss and early stopping.")
    grad_checkpointing: bool | None = Field(None, description="Activation checkpointing (recompute in backward); "
                                            "empty = the trainer's default (on for qlora, else off).")
    seed: int = Field(0, description="Seed of the data split, shuffling, initialisation and dropout.")


class LoraParams(_Defaults):
    """LoRA adapter settings (``lora.r``, ``lora.alpha``, ``lora.dropout``, ``lora.target_modules``)."""

    r: int = Field(8, ge=1, description="Adapter rank.")
    alpha: int = Field(16, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: str | list[str] | None = Field(None, description="Modules to adapt: 'all-linear', a list of "
                                                   "names (or comma-separated), or empty for the trainer's default.")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        """``q_proj, v_proj`` from the CLI or YAML is a list of two names."""
        if isinstance(v, str) and "," in v:
            return [x.strip() for x in v.split(",") if x.strip()]
        return v


class ParallelParams(_Defaults):
    """How a run spreads over processes: every trainer (pretrain, finetune, and every align method)."""

    devices: int = Field(1, ge=0, description="Processes (one per GPU on CUDA; gloo processes on CPU): more than one "
                         "launches torchrun, and the global batch is devices x batch_size x grad_accum; 0 = one per "
                         "visible GPU (one process on CPU).")
    strategy: Literal["auto", "ddp", "fsdp"] = Field("auto", description="How several processes share the work: "
                                                    "ddp (every process holds the whole model; gradients averaged), "
                                                    "fsdp (PyTorch's fully_shard, FSDP2: weights, gradients and "
                                                    "optimizer state sharded per transformer block, mixed precision "
                                                    "at dtype, sharded checkpoints via torch.distributed.checkpoint), "
                                                    "auto = ddp. One process: no effect.")
    fsdp_cpu_offload: bool = Field(False, description="fsdp: keep parameter shards, gradients and optimizer "
                                   "state in host memory (CPUOffloadPolicy).")

    def processes(self) -> int:
        """Processes this run starts (``devices`` resolved: 0 = every visible GPU; imports torch)."""
        from refinery.tasks.train.distributed import world_size_for

        return world_size_for(self.devices, getattr(self, "device", "auto"))

    def world_size(self) -> int:
        """Processes in the whole run: :meth:`processes` on each of ``REFINERY_NNODES`` nodes."""
        from refinery.tasks.train.distributed import num_nodes

        return self.processes() * num_nodes()

    def launches(self) -> bool:
        """Whether the run goes through torchrun: several processes here, or several nodes
        (``REFINERY_NNODES`` > 1, every node starting the same run)."""
        from refinery.tasks.train.distributed import num_nodes

        return self.processes() > 1 or num_nodes() > 1


CONTINUED_LR = 3e-5   # pretrain's default lr with init_from (the middle of practice's 1e-5..5e-5)


class TrainConfig(LMTrainingParams, ParallelParams):
    """Everything that decides a pretraining run's numbers (model, data, optimisation, schedule)."""

    field_defaults = dict(max_steps=300, lr=3e-3, batch_size=16, seq_len=128, weight_decay=0.1, min_lr_ratio=0.1,
                          warmup_ratio=0.05, eval_every=50, devices=0)

    # -- model
    objective: Objective = Field("clm", description="clm: causal LM (Llama-style decoder); mlm: masked LM "
                                 "(ModernBERT-style encoder); span: T5 span corruption (encoder-decoder).")
    preset: str = Field("tiny", description="Model size preset: tiny (CPU demo), 25M, 124M, 350M, 1B.")
    model: dict[str, Any] = Field(default_factory=dict, description="Overrides of the Hugging Face config "
                                  "fields of the preset, e.g. {hidden_size: 64, num_hidden_layers: 2}.")
    # -- starting point (continued pretraining)
    init_from: str | None = Field(None, description="Continue pretraining an existing model instead of a fresh one: "
                                  "a Hugging Face model folder, a hub id, or a refinery model dataset (a pretrain, "
                                  "finetune or align output). preset and model are then ignored, objective must "
                                  "match the model (causal LM: clm, masked LM: mlm, encoder-decoder: span), and the "
                                  "token dataset must have been made with its tokenizer (tokenize --set "
                                  "tokenizer.path=MODEL), else the run stops before the first step. lr then "
                                  f"defaults to {CONTINUED_LR:g}: continued pretraining takes 1e-5 to 5e-5 (the "
                                  "from-scratch default would wreck the pretrained weights).")
    init_identity: str | None = Field(None, description="Identity of init_from (its files' names, sizes and mtimes, "
                                      "the dataset fingerprint or the hub id; filled in, part of the fingerprint).")
    # -- data
    weights: list[float] | None = Field(None, description="Mixing weights when several token datasets are given.")
    # -- optimisation
    beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, gt=0, lt=1, description="AdamW beta2.")
    # -- evaluation, checkpoints
    eval_batches: int = Field(20, ge=1, description="Validation batches per evaluation.")
    log_every: int = Field(10, ge=1, description="Print/log training metrics every N steps.")
    export: Literal["last", "best"] = Field("last", description="Which checkpoint becomes the stage output.")
    # -- objectives
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="mlm: share of tokens masked.")
    noise_density: float = Field(0.15, gt=0, lt=1, description="span: share of tokens corrupted.")
    mean_span_length: float = Field(3.0, ge=1, description="span: mean corrupted span length in tokens.")
    # -- runtime (devices, strategy, fsdp_cpu_offload: ParallelParams)
    compile: bool = Field(False, description="torch.compile the model.")
    loss_chunk_tokens: int = Field(0, ge=0, description="clm: compute the loss's logits this many tokens at a "
                                   "time (chunked linear + cross-entropy: the full tokens x vocabulary logits are "
                                   "never materialised, in forward or for backward); 0 = off (one logits tensor "
                                   "and F.cross_entropy). Practice: 1024 to 8192 when the vocabulary is large.")
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

    @model_validator(mode="before")
    @classmethod
    def _continued_lr(cls, data: Any) -> Any:
        """Continued pretraining's learning rate unless one is given: pretrained weights take 1e-5..5e-5."""
        if isinstance(data, dict) and data.get("init_from") and data.get("lr") is None:
            data = {**data, "lr": CONTINUED_LR}
        return data

    @model_validator(mode="after")
    def _init_identity(self):
        if self.init_from and self.init_identity is None:
            from refinery.tasks.modelref import model_identity   # light (hashlib, json, pathlib)

            self.init_identity = model_identity(self.init_from)
        return self

    @model_validator(mode="after")
    def _pretrain_limits(self):
        # fp16 would need loss scaling, which the loop does not do; validation needs held-out windows
        if self.dtype == "float16":
            raise ValueError("pretrain dtype: auto, float32 or bfloat16 (float16 needs loss scaling)")
        if self.val_fraction <= 0:
            raise ValueError("pretrain val_fraction must be above 0 (validation needs held-out windows)")
        if self.loss_chunk_tokens and self.objective != "clm":
            raise ValueError(f"loss_chunk_tokens applies to the clm objective only (objective={self.objective}): "
                             "set loss_chunk_tokens=0")
        return self

    def resolved_checkpoint_every(self, total: int | None = None) -> int:
        """Pretraining checkpoints every ``eval_every`` steps unless told otherwise."""
        return self.checkpoint_every or self.resolved_eval_every(total)


__all__ = ["TrainingParams", "ScheduleParams", "LMTrainingParams", "LoraParams", "ParallelParams", "TrainConfig", "Objective", "DType", "Scheduler"]
