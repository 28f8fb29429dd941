"""Models built from a config (never downloaded): size presets for the three objectives.

One table of sizes (hidden, layers, heads, feed-forward) is mapped onto three architectures:

* ``clm``  -> ``LlamaConfig``       -> ``AutoModelForCausalLM.from_config`` (decoder, RoPE, SwiGLU)
* ``mlm``  -> ``ModernBertConfig``  -> ``AutoModelForMaskedLM.from_config`` (encoder, RoPE, GeGLU)
* ``span`` -> ``T5Config``          -> ``AutoModelForSeq2SeqLM.from_config`` (T5 v1.1 style, gated GELU)

Parameter counts of the clm presets (tied embeddings, 50k vocabulary; 1B at Llama-3's 128k):
tiny 1.0M non-embedding (7.5M total), 25M 27M non-embedding, 124M 124M total, 350M 360M total,
1B 1.24B total (the Llama-3.2-1B shape). The mlm encoder is about the same size; the T5 model has an
encoder and a decoder of that size.
"""
from __future__ import annotations

from typing import Any

# name -> (hidden, layers, heads, kv_heads, ffn)
PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (128, 4, 4, 4, 512),
    "25M": (512, 8, 8, 8, 1536),
    "124M": (768, 12, 12, 12, 2048),
    "350M": (1024, 24, 16, 16, 2816),
    "1B": (2048, 16, 32, 8, 8192),
}
ARCH = {"clm": "llama", "mlm": "modernbert", "span": "t5"}


def _preset(name: str) -> tuple[int, int, int, int, int]:
    for k, v in PRESETS.items():
        if k.lower() == str(name).lower():
            return v
    raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")


def padded_vocab(n: int, multiple: int = 64) -> int:
    """Embedding rows: the tokenizer's size rounded up (faster matmuls; extra rows are never targets)."""
    return ((int(n) + multiple - 1) // multiple) * multiple


def model_config(objective: str, preset: str, vocab_size: int, seq_len: int, special: dict[str, int | None],
                 overrides: dict[str, Any] | None = None):
    """The Hugging Face config for ``objective`` at size ``preset``; ``overrides`` win over the preset."""
    from transformers import LlamaConfig, ModernBertConfig, T5Config

    hidden, layers, heads, kv, ffn = _preset(preset)
    eos, pad = special.get("eos"), special.get("pad")
    pad = pad if pad is not None else eos
    overrides = dict(overrides or {})
    fields: dict[str, Any]
    if objective == "clm":
        fields = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max(seq_len, 128),
                      rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=special.get("bos", eos),
                      eos_token_id=eos, pad_token_id=pad, attention_dropout=0.0, use_cache=False)
        fields.update(overrides)
        if "hidden_size" in overrides and "head_dim" not in overrides:
            fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
        return LlamaConfig(**fields)
    if objective == "mlm":
        fields = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, max_position_embeddings=max(seq_len, 128),
                      local_attention=min(128, max(seq_len, 2)) // 2 * 2, pad_token_id=pad,
                      eos_token_id=eos, bos_token_id=special.get("bos", eos), cls_token_id=special.get("bos", eos),
                      sep_token_id=eos, mask_token_id=special.get("mask"),
                      embedding_dropout=0.0, attention_dropout=0.0, mlp_dropout=0.0, tie_word_embeddings=True)
        for k in ("num_key_value_heads",):
            overrides.pop(k, None)
        fields.update(overrides)
        return ModernBertConfig(**fields)
    if objective == "span":
        fields = dict(vocab_size=vocab_size, d_model=hidden, d_ff=ffn, num_layers=layers, num_decoder_layers=layers,
                      num_heads=heads, d_kv=hidden // heads, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                      # tied: the decoder output is scaled by d_model**-0.5, which keeps the initial
                      # logits small (untied T5 v1.1 init starts near loss 40 at these sizes)
                      tie_word_embeddings=True, pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad,
                      use_cache=False)
        # accept the decoder-style names too, so one override dict fits every objective
        alias = {"hidden_size": "d_model", "intermediate_size": "d_ff", "num_hidden_layers": "num_layers",
                 "num_attention_heads": "num_heads"}
        for k, v in list(overrides.items()):
            if k in alias:
                overrides.pop(k)
                overrides.setdefault(alias[k], v)
                if alias[k] == "num_layers":
                    overrides.setdefault("num_decoder_layers", v)
        overrides.pop("num_key_value_heads", None)
        fields.update(overrides)
        fields["d_kv"] = overrides.get("d_kv", fields["d_model"] // fields["num_heads"])
        return T5Config(**fields)
    raise ValueError(f"unknown objective {objective!r}: use clm, mlm or span")


def auto_class(objective: str):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    return {"clm": AutoModelForCausalLM, "mlm": AutoModelForMaskedLM, "span": AutoModelForSeq2SeqLM}[objective]


def build_model(objective: str, preset: str, vocab_size: int, seq_len: int, special: dict[str, int | None],
                overrides: dict[str, Any] | None = None, attn_implementation: str = "sdpa"):
    """A freshly initialised model (seed it with ``torch.manual_seed`` first for reproducibility)."""
    cfg = model_config(objective, preset, vocab_size, seq_len, special, overrides)
    cls = auto_class(objective)
    try:
        return cls.from_config(cfg, attn_implementation=attn_implementation)
    except (ValueError, ImportError):  # an architecture without SDPA support in this transformers release
        return cls.from_config(cfg, attn_implementation="eager")


def count_params(model, non_embedding: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        emb = model.get_input_embeddings()
        n -= emb.weight.numel()
    return n


def flops_per_token(model, seq_len: int, decoder_len: int = 0) -> float:
    """Model FLOPs of one training token (forward + backward = 3 x forward), as nanoGPT and PaLM
    (appendix B) count them for MFU: 6 x every weight a token meets in a matmul, plus
    12 x layers x attention width x context for the attention scores and values. Activation
    recomputation is not counted (that would be hardware FLOPs).

    The output projection counts even when it is tied to the input embedding: tied, it is the same
    weights but still a (hidden x vocab) matmul per token, over a quarter of a 124M model's work at a 50k
    vocabulary. The input embedding is a lookup and does not count.

    Encoder-decoder models (T5) take the encoder length ``seq_len`` and the decoder length
    ``decoder_len`` of one example: encoder tokens meet the encoder; decoder tokens meet the
    decoder and the output projection; the cross-attention projects its keys and values once per
    encoder token. The result is per token of ``seq_len + decoder_len``, which is how the span
    objective counts tokens.
    """
    cfg = model.config
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    head = out.weight.numel() if out is not None else 0

    def matmul_params(module) -> int:  # weights other than the (input or tied output) embedding
        return sum(p.numel() for p in module.parameters() if p is not emb and (out is None or p is not out.weight))

    if getattr(cfg, "is_encoder_decoder", False):
        width = cfg.num_heads * cfg.d_kv
        enc_layers, dec_layers = cfg.num_layers, cfg.num_decoder_layers
        cross_kv = 2 * cfg.d_model * width * dec_layers
        te, td = seq_len, decoder_len
        per_example = (6.0 * (matmul_params(model.encoder) * te + (matmul_params(model.decoder) - cross_kv + head) * td
                              + cross_kv * te)
                       + 12.0 * width * (enc_layers * te * te + dec_layers * td * td + dec_layers * td * te))
        return per_example / (te + td)
    heads = cfg.num_attention_heads
    width = heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return 6.0 * (matmul_params(model) + head) + 12.0 * cfg.num_hidden_layers * width * seq_len


__all__ = ["PRESETS", "ARCH", "model_config", "build_model", "auto_class", "padded_vocab", "count_params",
           "flops_per_token"]
