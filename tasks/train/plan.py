"""The memory planner: will a training run fit its device? Estimated per device before training.

    shape = model_shape(config_or_folder, objective)      parameter counts from a meta-device model
    plan = estimate(shape, Setup(method=..., ...))        bytes per device, by kind
    plan.table(); plan.check()                            the table; MemoryError with advice

Rows (bytes per device):

* **parameters**: trainable weights in float32 (AdamW's master copy); frozen weights of adapter
  methods in ``weights_dtype``; QLoRA's frozen linear weights in 4 bits plus their block scales
  (NF4: one 8-bit scale per 64 weights and a float32 per 256 scales with double quantization,
  else one float32 per 64). ``fsdp`` keeps 1/world of it plus the largest block gathered.
* **gradients**: one per trainable weight, in its dtype (``ddp`` adds its bucket copy; ``fsdp``: 1/world).
* **optimizer**: AdamW's two moments, float32 (8-bit AdamW: 2 bytes per weight); 1/world under fsdp;
  none on the device with ``cpu_offload``.
* **activations**: what autograd saves for backward, per token and layer (a Llama-style block saves
  about 10 hidden-wide and 4 FFN-wide tensors when every weight trains, 6 + 3 when the weights are
  frozen and only adapters train), times micro-batch x sequence length x layers, plus the logits
  (the LM head's output, its float32 copy for the loss and its gradient: 3 x vocab per token). With
  activation checkpointing each layer keeps only its input, and one layer is recomputed at a time.
  With ``loss_chunk_tokens`` (chunked linear + cross-entropy) the loss keeps no logits, only its
  gradients computed in forward: float32 hidden-wide per token plus a vocab x hidden float32 matrix.
* **workspace**: the largest weight materialised at the compute dtype (QLoRA dequantises one
  linear weight per matmul; fsdp gathers one block).

The constants are the saved tensors counted from the modelling code (nothing fitted); the check
against measured peaks (CPU RSS, ``bench/plan_check.py``, ``tests/train/test_plan.py``) is in the README.
Heavy imports (torch, transformers) are lazy; this module imports nothing heavy at the top.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GiB = 2 ** 30
MiB = 2 ** 20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAPTER_METHODS = ("lora", "qlora", "ia3", "llama_adapter", "prompt_tuning", "prefix_tuning")


# ----------------------------------------------------------------------------- the model's shape
@dataclass
class ModelShape:
    """Parameter counts of a model, taken from a meta-device instance (no memory, exact counts)."""

    total: int                      # every parameter, tied ones once
    linear: dict[str, tuple[int, int]]   # module name -> (in_features, out_features) of each nn.Linear
    embedding: int                  # input-embedding parameters
    layers: int
    hidden: int
    ffn: int
    vocab: int
    kv_width: int                   # key/value projection width (GQA makes it smaller than hidden)
    largest_block: int              # parameters of the biggest transformer block (fsdp's gather unit)
    lm_head: str | None = None      # name of the output projection (never quantised or adapted)
    encoder_decoder: bool = False
    model_type: str = ""
    file_bytes: int = 4             # bytes per weight in the saved checkpoint (config dtype)

    def linear_params(self, names: list[str] | None = None) -> int:
        return sum(i * o for n, (i, o) in self.linear.items() if names is None or n in names)

    def quantizable(self) -> list[str]:
        """The linear layers bitsandbytes quantises (all but the output head)."""
        return [n for n in self.linear if n != self.lm_head]


def _auto_class(objective: str):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    return {"clm": AutoModelForCausalLM, "mlm": AutoModelForMaskedLM, "span": AutoModelForSeq2SeqLM}[objective]


def model_shape(config, objective: str = "clm") -> ModelShape:
    """Counts from a Hugging Face config (object, dict, or a folder / hub id holding one)."""
    import torch
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, (str, os.PathLike)):
        config = AutoConfig.from_pretrained(str(config))
    elif isinstance(config, dict):
        config = AutoConfig.for_model(**config)
    assert isinstance(config, PretrainedConfig)
    with torch.device("meta"):
        model = _auto_class(objective).from_config(config)
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    linear = {n: (m.in_features, m.out_features) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    blocks = [m for n, m in model.named_modules() if n.count(".") >= 1 and n.rsplit(".", 1)[-1].isdigit()]
    largest = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=total)
    c = config
    hidden = getattr(c, "hidden_size", None) or c.d_model
    heads = getattr(c, "num_attention_heads", None) or c.num_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or getattr(c, "d_kv", None) or hidden // heads
    layers = getattr(c, "num_hidden_layers", None) or c.num_layers
    if getattr(c, "is_encoder_decoder", False):
        layers = layers + (getattr(c, "num_decoder_layers", None) or layers)
    return ModelShape(total=total, linear=linear, embedding=model.get_input_embeddings().weight.numel(),
                      layers=int(layers), hidden=int(hidden),
                      ffn=int(getattr(c, "intermediate_size", None) or getattr(c, "d_ff", 4 * hidden)),
                      vocab=int(c.vocab_size), kv_width=int(kv * head_dim), largest_block=int(largest),
                      lm_head=head_name, encoder_decoder=bool(getattr(c, "is_encoder_decoder", False)),
                      model_type=str(getattr(c, "model_type", "")),
                      file_bytes=DTYPE_BYTES.get(str(c.dtype if hasattr(c, "dtype") else getattr(c, "torch_dtype", None)
                                                     or "float32").split(".")[-1], 4))


def lora_targets(shape: ModelShape, targets) -> list[str]:
    """The linear layers a LoRA ``target_modules`` setting adapts (None: the attention projections,
    as finetune's default; 'all-linear': every linear but the head; names or a regex)."""
    import re

    names = [n for n in shape.linear if n != shape.lm_head]
    if targets is None:
        return [n for n in names if re.search(r"(attn|attention)\.[^.]+$", n, re.IGNORECASE)]
    if targets == "all-linear":
        return names
    if isinstance(targets, str):
        return [n for n in names if re.fullmatch(targets, n)]
    return [n for n in names if n.rsplit(".", 1)[-1] in set(targets)]


# ----------------------------------------------------------------------------- the setup
@dataclass
class Setup:
    """What decides a run's memory besides the model."""

    flow: str = "pretrain"
    method: str = "full"                    # full | lora | qlora | ia3 | ...
    compute_dtype: str = "float32"          # matmul dtype (autocast)
    weights_dtype: str = "float32"          # frozen weights (adapter methods)
    quant: str = "none"                     # none | nf4 | fp4
    double_quant: bool = True
    optimizer: str = "adamw"                # adamw | adamw_8bit | paged_adamw_8bit
    strategy: str = "ddp"                   # ddp | fsdp (single process: either)
    world_size: int = 1
    micro_batch: int = 8
    seq_len: int = 512
    grad_checkpointing: bool = False
    cpu_offload: bool = False
    lora_r: int = 8
    lora_targets: Any = None
    lora_dropout: float = 0.05
    device: str = "cpu"
    loss_chunk_tokens: int = 0              # chunked linear + cross-entropy (0: one full logits tensor)
    trainable_dtype: str = "float32"        # trained weights, their gradients and AdamW moments (align: its dtype)
    frozen_copies: dict = field(default_factory=dict)   # name -> parameters of another model held (reference, reward)


@dataclass
class MemoryPlan:
    setup: Setup
    params_total: int
    params_trainable: int
    rows: dict[str, int] = field(default_factory=dict)   # kind -> bytes per device
    runtime: int = 0                 # what the process holds besides training state (CPU: RSS now; GPU: context)
    available: int | None = None     # the device's memory that is free for it
    device_name: str = ""

    @property
    def total(self) -> int:
        """The peak: gradients appear during backward as the activations they replace are freed,
        so the larger of the two counts, plus everything else."""
        r = self.rows
        rest = sum(v for k, v in r.items() if k not in ("gradients", "activations"))
        return rest + max(r.get("gradients", 0), r.get("activations", 0))

    @property
    def needed(self) -> int:
        """Per device, with the runtime (several CPU processes share one RAM: times world size there)."""
        per = self.total + self.runtime
        return per * self.setup.world_size if self.setup.device == "cpu" else per

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.needed <= self.available

    def to_dict(self) -> dict:
        return {"setup": asdict(self.setup), "params_total": self.params_total,
                "params_trainable": self.params_trainable,
                "bytes": dict(self.rows), "total_bytes": self.total, "runtime_bytes": self.runtime,
                "needed_bytes": self.needed, "available_bytes": self.available, "fits": self.fits,
                "device": self.device_name,
                "mib": {k: round(v / MiB, 1) for k, v in {**self.rows, "total": self.total}.items()}}

    def table(self) -> str:
        s = self.setup
        head = (f"memory plan ({s.flow}, {s.method}, {s.compute_dtype}"
                f"{', ' + s.quant + ' 4-bit' if s.quant != 'none' else ''}, {s.strategy} x {s.world_size}, "
                f"micro-batch {s.micro_batch} x {s.seq_len} tokens"
                f"{', activation checkpointing' if s.grad_checkpointing else ''}"
                f"{', cpu offload' if s.cpu_offload else ''}): "
                f"{self.params_total / 1e6:,.2f}M params, {self.params_trainable / 1e6:,.2f}M trainable")
        lines = [head, f"  {'per device':<28}{'MiB':>12}"]
        for k, v in self.rows.items():
            lines.append(f"  {k:<28}{v / MiB:>12,.1f}")
        lines.append(f"  {'peak (max of grads, acts)':<28}{self.total / MiB:>12,.1f}")
        lines.append(f"  {'+ runtime (process/context)':<28}{self.runtime / MiB:>12,.1f}")
        if self.available is not None:
            scope = f" x {s.world_size} processes" if s.device == "cpu" and s.world_size > 1 else ""
            lines.append(f"  {'needed' + scope:<28}{self.needed / MiB:>12,.1f}")
            lines.append(f"  {'available (' + self.device_name + ')':<28}{self.available / MiB:>12,.1f}"
                         f"   {'fits' if self.fits else 'DOES NOT FIT'}")
        return "\n".join(lines)

    def advice(self) -> list[str]:
        """What would shrink the biggest rows, biggest first."""
        s, tips = self.setup, []
        rows = sorted(self.rows.items(), key=lambda kv: -kv[1])
        for kind, _ in rows[:3]:
            if kind == "activations":
                if not s.grad_checkpointing:
                    tips.append("grad_checkpointing=true (keeps one tensor per layer)")
                tips.append(f"batch_size={max(1, s.micro_batch // 2)} with grad_accum doubled, or a shorter seq_len")
            elif kind in ("optimizer", "gradients", "parameters"):
                if s.method == "full" and s.flow == "finetune":
                    tips.append("method=lora or method=qlora (trains adapters only)")
                elif s.method == "full" and s.flow.startswith("align/"):
                    tips.append(f"{s.flow.split('/')[1]}.lora.enabled=true (trains adapters only; no reference copy)")
                elif s.method == "lora":
                    tips.append("method=qlora (4-bit frozen weights)")
                if s.strategy != "fsdp" and s.flow in ("pretrain", "finetune", "align/reward", "align/dpo", "align/kto", "align/orpo", "align/ppo", "align/grpo"):
                    tips.append("strategy=fsdp with more devices (shards weights, gradients and optimizer)")
                elif s.strategy == "fsdp" and not s.cpu_offload:
                    tips.append("fsdp_cpu_offload=true (keeps shards and optimizer in host memory)")
                if s.compute_dtype == "float32" and s.device != "cpu":
                    tips.append("dtype=bfloat16")
        return list(dict.fromkeys(tips))

    def check(self) -> None:
        if self.fits is False:
            raise MemoryError(f"this run does not fit {self.device_name}:\n{self.table()}\nwhat to change:\n  - "
                              + "\n  - ".join(self.advice() or ["a device with more memory"]))


# ----------------------------------------------------------------------------- the estimate
def _bytes(dtype: str) -> int:
    return DTYPE_BYTES[dtype]


def _activations(shape: ModelShape, s: Setup, trainable_linears: int, adapted: list[str]) -> int:
    """Bytes autograd keeps between forward and backward, per device (see the module docstring)."""
    tokens = s.micro_batch * s.seq_len
    b = _bytes(s.compute_dtype)
    h, f, kv = shape.hidden, shape.ffn, shape.kv_width
    if s.method == "full":
        # norms' inputs and outputs (4h), q (h) k v (2kv) and attention output (h) for SDPA, the
        # o_proj and gate/up inputs (2h, the norm output counted above), gate, up, act, act*up (4f)
        per_layer = 8 * h + 2 * kv + 4 * f
    else:
        # frozen weights: norms' inputs (2h), SDPA q k v out (2h + 2kv), gate, up, act (3f); each
        # adapted linear keeps its input twice (the dropout's output and the matmul's view) and
        # the rank-r intermediate
        per_layer = 4 * h + 2 * kv + 3 * f
        per_layer += sum(2 * shape.linear[n][0] + s.lora_r for n in adapted) // max(shape.layers, 1)
    log_softmax = tokens * shape.vocab * 4            # the loss keeps float32 log-probabilities
    if s.loss_chunk_tokens:                           # ... or, chunked, the gradients of hidden and head
        log_softmax = tokens * h * 4 + shape.vocab * h * 4
    if s.grad_checkpointing:
        layers = tokens * h * b * shape.layers + tokens * per_layer * b   # inputs + one recomputed layer
    else:
        layers = tokens * per_layer * b * shape.layers
    return int(layers + log_softmax)


def estimate(shape: ModelShape, s: Setup) -> MemoryPlan:
    """Bytes per device of ``s`` on ``shape``: parameters, gradients, optimizer state, activations."""
    world = max(1, s.world_size)
    shard = world if s.strategy == "fsdp" else 1
    wb = _bytes(s.weights_dtype)
    adapted: list[str] = []
    tb = _bytes(s.trainable_dtype)
    if s.method == "full":
        trainable, frozen_bytes = shape.total, 0
        param_bytes = shape.total * tb
    elif s.method in ("lora", "qlora"):
        adapted = lora_targets(shape, s.lora_targets)
        trainable = sum(s.lora_r * (shape.linear[n][0] + shape.linear[n][1]) for n in adapted)
        if s.method == "qlora" or s.quant != "none":
            q = shape.linear_params(shape.quantizable())
            scale = (1 / 64 + 4 / (64 * 256)) if s.double_quant else 4 / 64
            # bitsandbytes' prepare_model_for_kbit_training casts the rest (embeddings, norms, head) to float32
            frozen_bytes = int(q * (0.5 + scale)) + (shape.total - q) * 4
        else:
            frozen_bytes = shape.total * wb
        param_bytes = frozen_bytes + trainable * tb
    else:   # other PEFT methods: a few vectors or virtual tokens; count them as 0.1% of the model
        trainable = max(1, shape.total // 1000)
        param_bytes = shape.total * wb + trainable * tb
    grad_bytes = trainable * tb
    if s.strategy == "ddp" and world > 1:
        grad_bytes *= 2                              # DDP's bucket copy of every gradient
    opt_bytes = trainable * (2 if "8bit" in s.optimizer else 2 * tb)
    rows = {
        "parameters": param_bytes // shard,
        "gradients": grad_bytes // shard,
        "optimizer": 0 if s.cpu_offload else opt_bytes // shard,
        "activations": _activations(shape, s, trainable, adapted) // 1,
    }
    work = 0
    if s.method == "qlora" or s.quant != "none":
        work = max((i * o for n, (i, o) in shape.linear.items() if n in shape.quantizable()), default=0) * \
            _bytes(s.compute_dtype)
    if shard > 1:
        work += shape.largest_block * 4 * 2           # the gathered block and the next one prefetched
    # the loss's transient tensors: the head's output at the compute dtype and its float32 gradient
    # (chunked: one chunk's worth)
    loss_rows = s.micro_batch * s.seq_len
    if s.loss_chunk_tokens:
        loss_rows = min(loss_rows, s.loss_chunk_tokens)
    work += loss_rows * shape.vocab * (_bytes(s.compute_dtype) + 4)
    rows["workspace"] = int(work)
    if s.device == "cpu" and (s.method == "qlora" or s.quant != "none"):
        # quantising reads the float checkpoint through a memory map whose pages stay resident
        rows["mapped checkpoint"] = shape.linear_params(shape.quantizable()) * shape.file_bytes
    for name, n in s.frozen_copies.items():      # whole models held beside the trained one (not sharded)
        rows[name] = n * wb
    if s.cpu_offload:
        rows["parameters"] = rows["gradients"] = 0
    return MemoryPlan(setup=s, params_total=shape.total, params_trainable=int(trainable), rows=rows)


# ----------------------------------------------------------------------------- the device
def device_budget(plan: MemoryPlan, device: str = "auto") -> MemoryPlan:
    """Fill in the runtime overhead and the free memory of the device the run will use."""
    import torch

    from refinery.tasks.train.common import rss_mb

    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        idx = torch.device(device).index if device.startswith("cuda:") else 0
        free, _total = torch.cuda.mem_get_info(idx)
        plan.available = int(free)
        plan.runtime = int(0.5 * GiB)   # CUDA context and allocator slack, outside torch's counters
        plan.device_name = torch.cuda.get_device_name(idx)
        plan.setup.device = "cuda"
    else:
        import psutil

        plan.available = int(psutil.virtual_memory().available)
        plan.runtime = int(rss_mb() * MiB)   # this process with torch and transformers loaded
        plan.device_name = "cpu RAM"
        plan.setup.device = "cpu"
    return plan


def report(plan: MemoryPlan, log=print, check: bool = True) -> dict:
    """Print the table, raise MemoryError (with advice) when it does not fit; the manifest's dict."""
    log(plan.table())
    if check:
        plan.check()
    return plan.to_dict()


# ----------------------------------------------------------------------------- per flow
def plan_pretrain(cfg, inputs: list[str], strategy: str | None = None) -> MemoryPlan:
    """The plan of a pretrain run (TrainConfig ``cfg`` on token datasets ``inputs``)."""
    from refinery.tasks.train.common import compute_dtype, pick_device
    from refinery.tasks.train.models import model_config, padded_vocab

    if cfg.init_from:
        from refinery.tasks.train.init_from import resolve_init

        shape = model_shape(resolve_init(cfg.init_from), cfg.objective)
    else:
        vocab = _token_vocab(inputs)
        conf = model_config(cfg.objective, cfg.preset, padded_vocab(vocab), cfg.seq_len,
                            {"eos": 0, "pad": 1, "bos": 0, "mask": 2}, cfg.model)
        shape = model_shape(conf, cfg.objective)
    device = pick_device(cfg.device)
    world = cfg.world_size()
    s = Setup(flow="pretrain", method="full", compute_dtype=str(compute_dtype(cfg.dtype, device)).split(".")[-1],
              weights_dtype="float32", strategy=strategy or getattr(cfg, "strategy", "ddp") or "ddp",
              world_size=world, micro_batch=cfg.batch_size, seq_len=cfg.seq_len + (cfg.seq_len if cfg.objective == "span" else 0),
              grad_checkpointing=bool(cfg.grad_checkpointing), device=device.type,
              cpu_offload=bool(getattr(cfg, "fsdp_cpu_offload", False)),
              loss_chunk_tokens=int(getattr(cfg, "loss_chunk_tokens", 0)))
    if s.strategy == "auto":
        s.strategy = "ddp"
    return device_budget(estimate(shape, s), cfg.device)


def _token_vocab(inputs: list[str]) -> int:
    from refinery.tasks.store import Dataset

    if not inputs:
        raise ValueError("pretrain plan: needs input=TOKEN_DATASET (its vocabulary sizes the embedding)")
    return int(Dataset.open(inputs[0]).manifest["vocab_size"])


def plan_finetune(cfg) -> MemoryPlan:
    """The plan of a finetune run (FinetuneConfig ``cfg``)."""
    from refinery.tasks.finetune import methods as M

    source = M.resolve_model_source(cfg.model)
    objective = finetune_objective(source)
    shape = model_shape(source, objective)
    device = M.resolve_device(cfg)
    compute, weights = M.resolve_dtypes(cfg, device)
    name = lambda d: str(d).split(".")[-1]  # noqa: E731
    world = cfg.world_size()
    strategy = cfg.strategy
    opt = cfg.optimizer
    if opt == "auto":
        opt = "paged_adamw_8bit" if cfg.method == "qlora" and device.type == "cuda" else "adamw"
    gc = cfg.grad_checkpointing if cfg.grad_checkpointing is not None else cfg.method == "qlora"
    s = Setup(flow="finetune", method=cfg.method, compute_dtype=name(compute), weights_dtype=name(weights),
              quant=cfg.bnb_4bit_quant_type if cfg.method == "qlora" else "none", double_quant=cfg.bnb_double_quant,
              optimizer=opt, strategy="ddp" if strategy == "auto" else strategy, world_size=world,
              micro_batch=cfg.batch_size, seq_len=M.effective_seq_len(cfg, source), grad_checkpointing=bool(gc),
              cpu_offload=bool(getattr(cfg, "fsdp_cpu_offload", False)), lora_r=cfg.lora.r,
              lora_targets=cfg.lora.target_modules, lora_dropout=cfg.lora.dropout, device=device.type)
    return device_budget(estimate(shape, s), cfg.device)


def finetune_objective(source: str) -> str:
    """clm for causal LMs; the architecture decides for encoder-decoder (span) and encoder (mlm) models."""
    p = Path(source) / "config.json"
    conf = json.loads(p.read_text()) if p.is_file() else {}
    from refinery.tasks.train.init_from import init_objective

    return init_objective(conf) if conf else "clm"


def _saved_dtype(model_dir: str) -> str:
    """The dtype a model folder's weights were saved in (its config), float32 when it does not say."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return name if name in DTYPE_BYTES else "float32"


def plan_align(method: str, cfg, reward_dir: str | None = None) -> MemoryPlan:
    """The plan of an align stage (``reward``, ``dpo``, ``orpo``, ``kto``, ``ppo``, ``grpo``, ``rloo``,
    ``online_dpo``) from its stage config. Sequences per forward and device: a pair is two (chosen and rejected), split over
    the processes; KTO one per example (its KL pass keeps no activations); PPO a minibatch over the
    processes; GRPO and RLOO a minibatch of completions; online DPO a sampled pair per prompt. Weights train in the trainer's ``dtype`` (no float32
    master copy); PPO, online DPO, and GRPO and RLOO with a KL term, hold a reference copy unless LoRA is on (the
    adapters are switched off instead); the sampling trainers hold their reward model."""
    import math

    from refinery.tasks.align.common import resolve_model_dir
    from refinery.tasks.train.common import pick_device

    t = cfg.train
    model_dir = resolve_model_dir(cfg.model)
    shape = model_shape(model_dir, "clm")
    device = pick_device(t.device)
    dtype = _saved_dtype(model_dir) if t.dtype == "auto" else t.dtype
    world = t.world_size() if hasattr(t, "devices") else 1
    strategy = "fsdp" if getattr(t, "strategy", "auto") == "fsdp" else "ddp"
    sampled = ("ppo", "grpo", "rloo", "online_dpo")   # trainers that sample from the policy and score it
    if method in ("ppo", "grpo", "rloo"):
        # PPO splits each minibatch between the processes; GRPO's (and RLOO's) mini_batch_size is per process
        per_process = t.mini_batch_size if method != "ppo" else max(1, t.mini_batch_size // world)
        seqs, seq_len = per_process, t.max_prompt_len + t.max_new_tokens
    elif method == "online_dpo":   # a pair of sampled completions per prompt, the prompts split over the processes
        seqs, seq_len = 2 * math.ceil(t.batch_size / world), t.max_prompt_len + t.max_new_tokens
    else:
        per = 1 if method == "kto" else 2
        seqs, seq_len = per * math.ceil(t.batch_size / world), t.max_len
    copies: dict[str, int] = {}
    if method in ("ppo", "online_dpo") or (method in ("grpo", "rloo") and t.beta > 0):
        if not t.lora.enabled:
            copies["reference model"] = shape.total
    reward = reward_dir or getattr(cfg, "reward_model", None)
    if method in sampled and reward:
        copies["reward model"] = model_shape(resolve_model_dir(reward), "clm").total
    s = Setup(flow=f"align/{method}", method="lora" if t.lora.enabled else "full", compute_dtype=dtype,
              weights_dtype=dtype, trainable_dtype=dtype, strategy=strategy, world_size=world, micro_batch=seqs,
              seq_len=seq_len, lora_r=t.lora.r, lora_targets=t.lora.target_modules, lora_dropout=t.lora.dropout,
              device=device.type, frozen_copies=copies)
    return device_budget(estimate(shape, s), t.device)


def plan_or_note(make, log=print) -> dict | None:
    """A stage's pre-training step: print the plan and stop (MemoryError) when it does not fit.
    A model the planner cannot describe is a note in the log, not a failed run."""
    try:
        plan = make()
    except MemoryError:
        raise
    except Exception as e:   # an architecture the meta-device count does not handle
        log(f"memory plan unavailable: {type(e).__name__}: {e}")
        return None
    return report(plan, log=log)


__all__ = ["ModelShape", "Setup", "MemoryPlan", "model_shape", "lora_targets", "estimate", "device_budget",
           "report", "plan_pretrain", "plan_finetune", "plan_align", "plan_or_note"]
