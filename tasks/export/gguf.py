"""Export a causal LM to one GGUF file (llama.cpp, Ollama, LM Studio), with its tokenizer and chat
template: ``refinery export MODEL --format gguf --quant f16|q8_0|q4_k_m``.

What is exported: the Llama architecture (``LlamaForCausalLM``: what pretrain's ``clm`` objective
trains, finetune's merged LoRA models, align's outputs, and Llama-family hub models) with a
byte-level BPE tokenizer (what the tokenizer stage trains: ``tokenizer.ggml.model = gpt2``, pre-
tokenizer ``gpt-2``; a Llama-3 style split regex is written as ``llama-bpe``). Anything else (the
``mlm`` and ``span`` objectives' ModernBERT and T5, a PEFT adapter without its merged model, a
SentencePiece tokenizer, RoPE scaling other than linear) is refused by name, before any file is
written.

The layout follows llama.cpp's ``convert_hf_to_gguf.py`` (names and metadata keys from the
``gguf`` package, ``gguf.constants`` and ``gguf.tensor_mapping``):

* tensors are renamed through ``gguf.TensorNameMap`` (``model.layers.3.self_attn.q_proj.weight`` ->
  ``blk.3.attn_q.weight``); every tensor must map, and every tensor llama.cpp needs must be there;
* the query and key projections are permuted from Hugging Face's rotate-half RoPE layout to
  llama.cpp's interleaved pairs (per head, for grouped-query attention per key/value head);
* tied embeddings write no ``output.weight`` (llama.cpp and transformers then reuse
  ``token_embd.weight``);
* the vocabulary has as many entries as the embedding has rows: rows beyond the tokenizer (the
  pretrain stage pads the embedding to a multiple of 64) are ``[PADn]`` tokens of type UNUSED;
  special tokens are CONTROL, other added tokens USER_DEFINED; ``add_bos_token`` is true, as
  ``refinery generate`` starts a plain prompt with BOS and pretraining saw every document after one;
* ``f16``: 2-D weights float16, norms float32; ``q8_0``: 2-D weights Q8_0 (``gguf.quants``; a
  tensor whose rows are not a multiple of 32 stays float16), norms float32; ``q4_k_m``: the ``gguf``
  package has no Q4_K quantizer (only its dequantizer), so the f16 file is quantized by llama.cpp's
  own ``llama_model_quantize`` through ``llama-cpp-python`` when it is installed; without it the
  error says how to get it (or run ``llama-quantize FILE OUT Q4_K_M`` on an f16 export).

The file is written to a temporary name beside the output and renamed when complete, so a crash
never leaves a half-written ``.gguf`` under the final name. Heavy imports (torch, gguf,
transformers) happen inside the functions.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

QUANTS = ("f16", "q8_0", "q4_k_m")
ARCHITECTURES = {"llama": "LlamaForCausalLM"}   # HF model_type -> the class the file must hold
# The split regex of Llama-3 style byte-level tokenizers (llama.cpp's pre-tokenizer "llama-bpe").
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


class ExportError(ValueError):
    """A model, tokenizer or option that cannot be exported; the message says which and why."""


@dataclass
class GGUFExport:
    """What :func:`export_gguf` wrote."""

    path: Path
    source: str                    # the model folder (or hub id) read
    quant: str
    architecture: str
    tensors: int
    tensor_types: dict[str, int]   # ggml type name -> tensor count
    vocab: int                     # entries of tokenizer.ggml.tokens (= embedding rows)
    chat_template: bool
    bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "source": self.source, "format": "gguf", "quant": self.quant,
                "architecture": self.architecture, "tensors": self.tensors, "tensor_types": self.tensor_types,
                "vocab": self.vocab, "chat_template": self.chat_template, "bytes": self.bytes, "notes": self.notes}


# --------------------------------------------------------------------------- the model
def _read_config(folder: str) -> dict:
    p = Path(folder) / "config.json"
    if p.is_file():
        return json.loads(p.read_text())
    from transformers import AutoConfig   # a hub id

    return AutoConfig.from_pretrained(folder).to_dict()


def check_architecture(conf: dict, where: str) -> str:
    """The GGUF architecture name for a model config, or ExportError naming what is not supported."""
    model_type = conf.get("model_type")
    archs = conf.get("architectures") or []
    supported = ", ".join(f"{v} (model_type {k!r})" for k, v in ARCHITECTURES.items())
    if model_type not in ARCHITECTURES:
        name = archs[0] if archs else model_type
        raise ExportError(f"{where}: cannot export {name} (model_type {model_type!r}) to GGUF: refinery exports "
                          f"{supported}, the architecture pretrain's clm objective trains (the mlm and span objectives' "
                          "ModernBERT and T5 models are not exported)")
    want = ARCHITECTURES[model_type]
    if archs and want not in archs:
        raise ExportError(f"{where}: cannot export {archs[0]} to GGUF: only the causal LM head ({want}) is exported")
    for flag in ("attention_bias", "mlp_bias"):
        if conf.get(flag):
            raise ExportError(f"{where}: cannot export a Llama model with {flag}=true to GGUF (not supported by this exporter)")
    rope = conf.get("rope_parameters") or conf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ("default", "linear"):
        raise ExportError(f"{where}: cannot export RoPE scaling {rope_type!r} to GGUF (default and linear are supported)")
    return "llama"


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise ExportError(f"{folder}: no model.safetensors (or sharded index) to export; refinery reads safetensors only")


def _local_folder(source: str) -> Path:
    p = Path(source)
    if p.is_dir():
        return p
    from huggingface_hub import snapshot_download   # a hub id: the same files from_pretrained reads

    return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]))


def iter_tensors(folder: Path) -> Iterator[tuple[str, Any]]:
    """``(name, float32 numpy array)`` for every tensor of the model's safetensors files, one at a time."""
    from safetensors import safe_open

    for f in _weight_files(folder):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name).float().numpy()


def permute_rope(w, n_head: int):
    """Hugging Face's rotate-half q/k rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf's
    ``LlamaModel.permute``), per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- the tokenizer
@dataclass
class GGUFVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int]       # bos, eos, pad, mask, unk -> id (those the tokenizer has)
    chat_template: str | list[dict[str, str]] | None
    tokenizer_len: int


def _pre_tokenizer_type(backend: dict, where: str) -> str:
    pre, norm = backend.get("pre_tokenizer") or {}, backend.get("normalizer")
    if norm:
        raise ExportError(f"{where}: cannot export a tokenizer with a normalizer ({norm.get('type')}) to GGUF: "
                          "byte-level BPE without one (what the tokenizer stage trains) is supported")
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space", False):
        return "gpt-2"
    if (kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT
            and not steps[1].get("use_regex", True)):
        return "llama-bpe"
    raise ExportError(f"{where}: cannot export this tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) to GGUF: "
                      "supported are byte-level BPE with the GPT-2 split (the tokenizer stage's) or the Llama-3 split")


def build_vocab(folder: str, n_vocab: int) -> GGUFVocab:
    """The tokenizer metadata llama.cpp expects (``tokenizer.ggml.*``) for ``n_vocab`` embedding rows."""
    import gguf
    from transformers import AutoTokenizer

    where = f"{folder} (tokenizer)"
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ExportError(f"{where}: cannot load the tokenizer to export it: {e}") from e
    if not getattr(tok, "is_fast", False):
        raise ExportError(f"{where}: a slow tokenizer: GGUF export reads tokenizer.json (a fast tokenizer)")
    backend = json.loads(tok.backend_tokenizer.to_str())
    model = backend.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(f"{where}: cannot export a {model.get('type')} tokenizer"
                          f"{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''} to "
                          "GGUF: byte-level BPE (what the tokenizer stage trains) is supported")
    pre = _pre_tokenizer_type(backend, where)
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=True)
    if len(vocab) > n_vocab:
        raise ExportError(f"{where}: the tokenizer has {len(vocab)} tokens but the embedding only {n_vocab} rows")
    by_id = {i: t for t, i in vocab.items()}
    added = {int(i): a for i, a in tok.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(added[i].content)
            types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    special = {name: getattr(tok, f"{name}_token_id") for name in ("bos", "eos", "pad", "mask", "unk")}
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    return GGUFVocab(tokens, types, merges, pre, {k: int(v) for k, v in special.items() if v is not None},
                     template or None, len(vocab))


# --------------------------------------------------------------------------- the file
def _name(source: str) -> str:
    """``general.name``: the model folder's (or dataset's) name."""
    from refinery.tasks.modelref import dataset_manifest

    p = Path(source)
    for base in (p, p.parent):
        m = dataset_manifest(str(base)) if base.is_dir() else None
        if m and m.get("stage") and m.get("fingerprint"):
            return f"refinery-{m['stage']}-{str(m['fingerprint'])[:12]}"
    return p.name or source


def _write_f(path: Path, source: str, folder: Path, conf: dict, vocab: GGUFVocab, ftype: str, name: str) -> dict[str, int]:
    """Write a GGUF of the float (``f16``) or Q8_0 (``q8_0``) type to ``path``; tensor type counts."""
    import gguf
    import numpy as np

    n_head, n_layer = int(conf["num_attention_heads"]), int(conf["num_hidden_layers"])
    n_kv = int(conf.get("num_key_value_heads") or n_head)
    hidden = int(conf["hidden_size"])
    head_dim = int(conf.get("head_dim") or hidden // n_head)
    n_vocab = int(conf["vocab_size"])
    rope = conf.get("rope_parameters") or conf.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta") or conf.get("rope_theta") or 10000.0)
    tied = bool(conf.get("tie_word_embeddings", False))
    arch = gguf.MODEL_ARCH.LLAMA
    names = gguf.get_tensor_name_map(arch, n_layer)
    allowed = set(gguf.MODEL_TENSORS[arch])

    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(name)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16 if ftype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(n_vocab)
    w.add_context_length(int(conf.get("max_position_embeddings") or 2048))
    w.add_embedding_length(hidden)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(int(conf["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if (rope.get("rope_type") or rope.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    w.add_layer_norm_rms_eps(float(conf.get("rms_norm_eps") or 1e-6))
    # the tokenizer
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    setters = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "pad": w.add_pad_token_id,
               "mask": w.add_mask_token_id, "unk": w.add_unk_token_id}
    for key, tid in vocab.special.items():
        setters[key](tid)
    w.add_add_bos_token("bos" in vocab.special)
    w.add_add_eos_token(False)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)

    counts: dict[str, int] = {}
    seen: set[str] = set()
    for hf_name, data in iter_tensors(folder):
        if hf_name.endswith("rotary_emb.inv_freq"):   # a buffer older checkpoints saved; recomputed from theta
            continue
        if hf_name == "lm_head.weight" and tied:
            continue
        found = names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in allowed:
            raise ExportError(f"{source}: tensor {hf_name!r} has no GGUF counterpart in the llama architecture; "
                              "is this a plain Llama model?")
        new = found[1]
        if new in seen:
            raise ExportError(f"{source}: two tensors map to {new!r}")
        seen.add(new)
        if new.endswith("attn_q.weight"):
            data = permute_rope(data, n_head)
        elif new.endswith("attn_k.weight"):
            data = permute_rope(data, n_kv)
        if data.ndim == 1:
            qtype = gguf.GGMLQuantizationType.F32
        elif ftype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
        else:
            qtype = gguf.GGMLQuantizationType.F16
        out = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)
        w.add_tensor(new, out, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    need = ["token_embd.weight", "output_norm.weight"] + ([] if tied else ["output.weight"]) + [
        f"blk.{i}.{t}.weight" for i in range(n_layer)
        for t in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")]
    missing = [n for n in need if n not in seen]
    if missing:
        raise ExportError(f"{source}: the weights lack {len(missing)} tensor(s) llama.cpp needs, e.g. {missing[:3]}")
    if len(vocab.tokens) != n_vocab:
        raise ExportError(f"{source}: {len(vocab.tokens)} tokens for an embedding of {n_vocab} rows")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return counts


def _llama_cpp(quant: str):
    """The llama_cpp module (llama-cpp-python), or ExportError saying how to get a K-quant without it."""
    try:
        import llama_cpp
    except (ImportError, OSError) as e:   # not installed, or installed without its library (FileNotFoundError)
        missing = "" if isinstance(e, ImportError) else f" (llama-cpp-python is installed but cannot load llama.cpp: {e})"
        raise ExportError(f"--quant {quant}{missing}: the gguf package cannot write K-quants (it has Q8_0 but only a Q4_K "
                          "dequantizer), so this needs llama.cpp's quantizer: pip install llama-cpp-python (it builds "
                          "llama.cpp from source; see bench/gguf_llamacpp.py), or export --quant f16 and run llama.cpp's "
                          f"`llama-quantize FILE.gguf OUT.gguf {quant.upper()}`") from None
    return llama_cpp


def _quantize_llamacpp(src: Path, dst: Path, quant: str) -> None:
    """llama.cpp's own quantizer (``llama_model_quantize``) through llama-cpp-python."""
    import ctypes

    llama_cpp = _llama_cpp(quant)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    params.nthread = max(1, min(4, os.cpu_count() or 1))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise ExportError(f"llama.cpp's quantizer failed on {src} (return code {rc})")


def tensor_types(path: str | os.PathLike) -> dict[str, int]:
    """ggml type name -> tensor count of a GGUF file."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def export_gguf(model: str, out: str | os.PathLike | None = None, quant: str = "f16") -> GGUFExport:
    """Write ``model`` (a refinery dataset, a Hugging Face folder or a hub id) as one GGUF file
    (default ``./<name>.<quant>.gguf``), atomically; ExportError for what cannot be exported."""
    from refinery.tasks.modelref import resolve_model

    quant = quant.lower()
    if quant not in QUANTS:
        raise ExportError(f"unknown --quant {quant!r}: choose one of {', '.join(QUANTS)}")
    p = Path(os.fspath(model))
    if p.is_dir() and (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        raise ExportError(f"{model}: a PEFT adapter without its base weights; export the merged model "
                          "(finetune's dataset names it as `merged` when the method allows merging)")
    if quant == "q4_k_m":
        _llama_cpp(quant)   # before any work
    source = resolve_model(model)
    conf = _read_config(source)
    arch = check_architecture(conf, source)
    name = _name(source)
    dest = Path(out) if out is not None else Path(f"{name}.{quant}.gguf")
    if dest.is_dir() or str(out).endswith(("/", os.sep)):   # a folder (a trailing slash: one to create)
        dest = dest / f"{name}.{quant}.gguf"
    dest.parent.mkdir(parents=True, exist_ok=True)
    folder = _local_folder(source)
    vocab = build_vocab(str(folder), int(conf["vocab_size"]))
    notes: list[str] = []
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")   # same folder: rename is atomic
    half = tmp.with_name(tmp.name + ".f16")
    try:
        if quant == "q4_k_m":
            _write_f(half, source, folder, conf, vocab, "f16", name)
            _quantize_llamacpp(half, tmp, quant)
            counts = tensor_types(tmp)
            fallback = sorted(set(counts) - {"Q4_K", "Q6_K", "F32"})
            if fallback:   # llama.cpp's K-quants need rows that are a multiple of 256
                notes.append(f"tensors whose rows are not a multiple of 256 got llama.cpp's fallback types "
                             f"({', '.join(fallback)})")
        else:
            counts = _write_f(tmp, source, folder, conf, vocab, quant, name)
        os.replace(tmp, dest)
    finally:
        for f in (tmp, half):
            if f.exists():
                f.unlink()
    if vocab.tokenizer_len < int(conf["vocab_size"]):
        notes.append(f"{int(conf['vocab_size']) - vocab.tokenizer_len} embedding rows beyond the tokenizer written as unused [PADn] tokens")
    return GGUFExport(dest, source, quant, arch, sum(counts.values()), counts, len(vocab.tokens),
                      bool(vocab.chat_template), dest.stat().st_size, notes)


__all__ = ["QUANTS", "ExportError", "GGUFExport", "export_gguf", "check_architecture", "build_vocab",
           "permute_rope", "tensor_types"]
