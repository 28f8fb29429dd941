"""The seven fine-tuning methods, all through PEFT (full fine-tuning aside): loading the base model
(4-bit NF4 for QLoRA), wrapping it, counting trainable parameters, which optimizer (the optimizer itself and the
schedule are the training engine's, refinery.tasks.engine), and saving the adapter, the merged
model or the full model in formats plain transformers / peft load.

Heavy imports (torch, transformers, peft, bitsandbytes) happen inside functions.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from refinery.tasks.export import finalize_model_dir
from refinery.tasks.finetune.config import MERGEABLE, FinetuneConfig
from refinery.tasks.modelref import resolve_model

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


# --------------------------------------------------------------------------- model source
def resolve_model_source(path: str) -> str:
    """A loadable model: an HF folder, a hub id, or the model folder a refinery dataset names."""
    return resolve_model(path, allow_hub=True)


def resolve_device(cfg: FinetuneConfig):
    """The device every trainer would pick for ``cfg.device`` (refinery.tasks.train.common)."""
    from refinery.tasks.train.common import pick_device

    return pick_device(cfg.device)


def resolve_dtypes(cfg: FinetuneConfig, device) -> tuple[Any, Any]:
    """(compute dtype, frozen-weights dtype)."""
    import torch

    from refinery.tasks.train.common import compute_dtype, torch_dtype

    compute = compute_dtype(cfg.dtype, device)
    weights = compute if cfg.weights_dtype == "auto" else torch_dtype(cfg.weights_dtype)
    if cfg.method == "full":
        weights = torch.float32  # master weights for AdamW
    return compute, weights


def effective_seq_len(cfg: FinetuneConfig, source: str) -> int:
    """``cfg.seq_len`` capped by the model's position limit (less the virtual tokens of prompt and
    prefix tuning, which take positions too)."""
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(source, revision=cfg.revision)
    limit = None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(conf, key, None)
        if isinstance(v, int) and v > 0:
            limit = v
            break
    n = cfg.seq_len
    if limit is not None:
        virtual = cfg.num_virtual_tokens if cfg.method in ("prompt_tuning", "prefix_tuning") else 0
        n = min(n, limit - virtual)
    return max(n, 2)


def load_tokenizer(cfg: FinetuneConfig, source: str):
    from transformers import AutoTokenizer

    src = cfg.tokenizer or source
    try:
        tok = AutoTokenizer.from_pretrained(src, revision=cfg.revision if src == source else None)
    except (OSError, ValueError) as e:
        raise ValueError(f"{src}: cannot load a tokenizer ({e}); set tokenizer=PATH") from e
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"{src}: tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(cfg: FinetuneConfig, source: str, device, compute_dtype, weights_dtype):
    """The base model on ``device``: 4-bit NF4 (double quantization, ``compute_dtype`` matmuls) for
    QLoRA, else ``weights_dtype`` (float32 for full fine-tuning)."""
    AutoModelForCausalLM = model_class(source)   # noqa: N806 (causal LM, or seq2seq for encoder-decoders)

    kwargs: dict[str, Any] = {"revision": cfg.revision} if cfg.revision else {}
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        from refinery.tasks.extras import require

        require("bitsandbytes", "method=qlora")   # transformers loads it when it quantises

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=cfg.bnb_double_quant, bnb_4bit_compute_dtype=compute_dtype)
        kwargs["device_map"] = {"": device.index if device.type == "cuda" and device.index is not None
                                else (0 if device.type == "cuda" else "cpu")}
        kwargs["dtype"] = compute_dtype
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=weights_dtype, **kwargs).to(device)
    model.config.use_cache = False
    return model


# --------------------------------------------------------------------------- targets
_LINEAR_NAMES = ("Linear", "Linear4bit", "Linear8bitLt", "Conv1D")


def _is_linear(module) -> bool:
    return type(module).__name__ in _LINEAR_NAMES


def attention_targets(model) -> str:
    """A PEFT target regex for the linear layers inside the attention blocks (q/k/v/o projections
    for Llama-style models, c_attn/c_proj for GPT-2, query_key_value/dense for GPT-NeoX...)."""
    pairs: set[tuple[str, str]] = set()
    for name, module in model.named_modules():
        if not _is_linear(module) or "." not in name:
            continue
        parent, leaf = name.rsplit(".", 1)
        owner = parent.rsplit(".", 1)[-1]
        if re.search(r"attn|attention", owner, re.IGNORECASE):
            pairs.add((owner, leaf))
    if not pairs:
        raise ValueError("found no linear layers inside attention blocks; set target_modules explicitly")
    owners = "|".join(sorted({re.escape(o) for o, _ in pairs}))
    leaves = "|".join(sorted({re.escape(x) for _, x in pairs}))
    return rf".*\.(?:{owners})\.(?:{leaves})"


def model_class(source: str):
    """AutoModelForSeq2SeqLM for encoder-decoder models (T5 style), else AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from refinery.tasks.finetune.seq2seq import model_kind

    return AutoModelForSeq2SeqLM if model_kind(source) == "seq2seq" else AutoModelForCausalLM


def peft_config(cfg: FinetuneConfig, model):
    """The PEFT config for ``cfg.method`` (None for full fine-tuning)."""
    from peft import (AdaptionPromptConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig,
                      TaskType)

    # the same methods on an encoder-decoder get PEFT's seq2seq task
    task: Any = _Seq2SeqTask if getattr(model.config, "is_encoder_decoder", False) else TaskType

    m = cfg.method
    if m == "full":
        return None
    if m in ("lora", "qlora"):
        lora = cfg.lora
        targets = lora.target_modules if lora.target_modules is not None else attention_targets(model)
        return LoraConfig(task_type=task.CAUSAL_LM, r=lora.r, lora_alpha=lora.alpha,
                          lora_dropout=lora.dropout, target_modules=targets, use_dora=lora.use_dora,
                          bias="none")
    if m == "ia3":
        kw: dict[str, Any] = {}
        if cfg.ia3.target_modules is not None:
            targets = cfg.ia3.target_modules
            kw["target_modules"] = targets
            # feed-forward layers get their scaling on the input: the MLP output projections
            if targets != "all-linear":
                names = [targets] if isinstance(targets, str) else list(targets)
                kw["feedforward_modules"] = [n for n in names if re.search(r"down|fc2|c_proj|dense_4h", n)]
        return IA3Config(task_type=task.CAUSAL_LM, **kw)
    if m == "llama_adapter":
        n_layers = getattr(model.config, "num_hidden_layers", None)
        layers = cfg.adapter_layers or n_layers
        if layers is None:
            raise ValueError("llama_adapter: set adapter_layers (the model's config names no num_hidden_layers)")
        if n_layers is not None:
            layers = min(layers, n_layers)
        return AdaptionPromptConfig(task_type=task.CAUSAL_LM, adapter_len=cfg.adapter_len,
                                    adapter_layers=layers)
    if m == "prompt_tuning":
        return PromptTuningConfig(task_type=task.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)
    if m == "prefix_tuning":
        return PrefixTuningConfig(task_type=task.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)
    raise ValueError(f"unknown method {m!r}")


def wrap_model(cfg: FinetuneConfig, model, base_name: str):
    """Make the trainable model: all weights for ``full``, else a PeftModel (QLoRA after
    ``prepare_model_for_kbit_training``). Gradient checkpointing as configured."""
    gc = cfg.grad_checkpointing if cfg.grad_checkpointing is not None else cfg.method == "qlora"
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.method != "full":
            model.enable_input_require_grads()
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    pc = peft_config(cfg, model)
    pc.base_model_name_or_path = base_name
    if cfg.revision:
        pc.revision = cfg.revision
    return get_peft_model(model, pc)


def trainable_summary(model) -> dict:
    """Trainable and total parameters (4-bit weights counted as their unpacked size) and the share."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": int(trainable), "total_params": int(total),
            "trainable_pct": round(100.0 * trainable / max(total, 1), 4)}


def memory_footprint(model) -> dict:
    """Bytes held by weights (4-bit storage as stored) and by trainable weights."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"weight_bytes": int(weights), "trainable_bytes": int(trainable)}


# --------------------------------------------------------------------------- optimizer
def optimizer_kind(cfg: FinetuneConfig, device) -> str:
    """``cfg.optimizer`` resolved: auto is paged 8-bit AdamW for qlora on CUDA, else AdamW (the
    optimizer itself: :func:`refinery.tasks.engine.optim.build_optimizer`)."""
    if cfg.optimizer != "auto":
        return cfg.optimizer
    return "paged_adamw_8bit" if cfg.method == "qlora" and device.type == "cuda" else "adamw"


# --------------------------------------------------------------------------- saving
def save_tokenizer(tokenizer, out_dir: str) -> None:
    tokenizer.save_pretrained(out_dir)


def save_adapter(model, tokenizer, out_dir: str, base_ref: str | None = None) -> None:
    """PEFT format: adapter_config.json + adapter_model.safetensors (+ tokenizer files).
    ``base_ref``: what ``base_model_name_or_path`` records instead of the folder the base was loaded
    from (an absolute workdir path): a hub id, or the base folder relative to the adapter's
    published folder (see :func:`adapter_base_model`, refinery.tasks.export.card.portable_ref)."""
    model.save_pretrained(out_dir, safe_serialization=True)
    readme = Path(out_dir) / "README.md"
    if readme.exists():  # PEFT's model-card template: not ours to ship (the stage writes the card)
        readme.unlink()
    if base_ref is not None:
        conf_path = Path(out_dir) / "adapter_config.json"
        conf = json.loads(conf_path.read_text())
        conf["base_model_name_or_path"] = base_ref
        conf_path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    save_tokenizer(tokenizer, out_dir)


def adapter_base_model(adapter_dir: str | os.PathLike) -> str:
    """The base model of a saved adapter, loadable: its ``base_model_name_or_path`` as a hub id, or,
    when it is a relative path, resolved against the adapter's folder (so a dataset copied or moved
    with its workdir keeps working) and checked like every model input (refinery.tasks.modelref)."""
    conf = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    base = conf.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ValueError(f"{adapter_dir}: adapter_config.json names no base_model_name_or_path")
    if os.path.isabs(base) or not base.startswith("."):
        return resolve_model(base, allow_hub=True)
    return resolve_model(os.path.normpath(os.path.join(os.fspath(adapter_dir), base)), allow_hub=False)


def save_full(model, tokenizer, out_dir: str) -> None:
    if hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    model.config.use_cache = True
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(tokenizer, out_dir)
    finalize_model_dir(out_dir)   # use_cache: true + generation_config.json


def merged_torch_dtype(cfg: FinetuneConfig, source: str):
    import torch
    from transformers import AutoConfig

    if cfg.merged_dtype != "auto":
        return getattr(torch, cfg.merged_dtype)
    conf = AutoConfig.from_pretrained(source, revision=cfg.revision)
    d = getattr(conf, "dtype", None) or getattr(conf, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else torch.float32


class _Seq2SeqTask:
    CAUSAL_LM = "SEQ_2_SEQ_LM"


def merge_adapter(cfg: FinetuneConfig, source: str, adapter_dir: str, tokenizer, out_dir: str) -> None:
    """Fold the saved adapter into a fresh, unquantized copy of the base (QLoRA too: the merged
    model is the base at full precision plus the learned low-rank update) and save it."""
    import torch
    from peft import PeftModel

    AutoModelForCausalLM = model_class(source)  # noqa: N806
    dtype = merged_torch_dtype(cfg, source)
    kwargs = {"revision": cfg.revision} if cfg.revision else {}
    base = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    model = PeftModel.from_pretrained(base, adapter_dir)
    with torch.no_grad():
        merged = model.merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(tokenizer, out_dir)
    finalize_model_dir(out_dir)
    del model, merged, base


def is_mergeable(method: str) -> bool:
    return method in MERGEABLE
