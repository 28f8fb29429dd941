"""Continued pretraining (``pretrain --set init_from=MODEL``): load an existing model's weights and
check, before any step runs, that the token dataset speaks that model's tokenizer.

    resolve_init(cfg)             the loadable folder or hub id (refinery model datasets resolved)
    init_objective(config)        clm / mlm / span from the model's config (architecture decides)
    tokenizer_problems(...)       what differs between the data's tokenizer and the model's:
                                  vocabulary size, tokenizer hash, special tokens
    check_init_from(cfg, reader)  both checks, one clear ValueError listing every problem
    load_init_model(cfg, path)    the model in float32 (the loop's autocast decides the compute dtype)

The tokenizer hash is the sha256 of ``tokenizer.json``; when the bytes differ (``tokenize --set
tokenizer.path=MODEL`` re-saves the tokenizer, which may reformat the file) the *content* hash
decides: the vocabulary, merges and added tokens serialized canonically. Heavy imports are lazy.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

OBJECTIVE_NAMES = {"clm": "a causal LM", "mlm": "a masked LM", "span": "an encoder-decoder (span corruption)"}


def resolve_init(init_from: str) -> str:
    from refinery.tasks.modelref import resolve_model

    return resolve_model(init_from, allow_hub=True)


def model_config_dict(path: str) -> dict:
    """The model's config.json as a dict (a hub id goes through AutoConfig and its cache)."""
    p = Path(path) / "config.json"
    if p.is_file():
        return json.loads(p.read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).to_dict()


def init_objective(config: dict) -> str:
    """The pretraining objective a model's architecture implies."""
    if config.get("is_encoder_decoder"):
        return "span"
    archs = " ".join(config.get("architectures") or [])
    if "MaskedLM" in archs or (not archs and config.get("model_type") in ("bert", "roberta", "modernbert")):
        return "mlm"
    return "clm"


# ----------------------------------------------------------------------------- tokenizer identity
def _file_sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def content_sha(tokenizer_json: Path) -> str | None:
    """sha256 of what decides the token ids: the model section (vocabulary, merges) and the added
    tokens, serialized canonically (key order and whitespace do not count)."""
    if not tokenizer_json.is_file():
        return None
    data = json.loads(tokenizer_json.read_text())
    core = {"model": data.get("model"), "added_tokens": [(t.get("id"), t.get("content"))
                                                          for t in data.get("added_tokens") or []]}
    return hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _specials(tok) -> dict[str, Any]:
    names = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")
    out: dict[str, Any] = {n: (getattr(tok, n), getattr(tok, n + "_id")) for n in names}
    extra = getattr(tok, "extra_special_tokens", None) or getattr(tok, "additional_special_tokens", None) or []
    out["extra_special_tokens"] = sorted(str(t) for t in extra)   # transformers 5 name; 4.x: additional_...
    return out


def _tokenizer_folder(path: str) -> Path | None:
    """The local folder holding the model's tokenizer (hub ids: the cached snapshot)."""
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, allow_patterns=["tokenizer*", "special_tokens_map.json", "*.model",
                                                           "vocab*", "merges.txt"]))
    except Exception:   # offline / not cached: the loaded tokenizer is still compared below
        return None


def tokenizer_problems(model_path: str, model_vocab: int, data_tokenizer: str, data_vocab: int) -> list[str]:
    """Why tokens made with ``data_tokenizer`` cannot train the model at ``model_path`` (empty: they can)."""
    from transformers import AutoTokenizer

    problems = []
    if data_vocab > model_vocab:
        problems.append(f"vocab size: the token dataset has {data_vocab} token ids, the model's embedding only "
                        f"{model_vocab} rows")
    try:
        model_tok = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        return problems + [f"tokenizer: the model has no loadable tokenizer to check the data against ({e})"]
    data_tok = AutoTokenizer.from_pretrained(str(data_tokenizer))
    if len(model_tok) != len(data_tok):
        problems.append(f"vocab size: the data's tokenizer has {len(data_tok)} tokens, the model's {len(model_tok)}")
    mdir, ddir = _tokenizer_folder(model_path), Path(data_tokenizer)
    m_json, d_json = (mdir / "tokenizer.json") if mdir else None, ddir / "tokenizer.json"
    if m_json is not None and m_json.is_file() and d_json.is_file():
        same_bytes = _file_sha(m_json) == _file_sha(d_json)
        if not same_bytes and content_sha(m_json) != content_sha(d_json):
            problems.append(f"tokenizer hash: the data's tokenizer.json (sha256 {(_file_sha(d_json) or '')[:12]}, content "
                            f"{(content_sha(d_json) or '')[:12]}) is not the model's (sha256 {(_file_sha(m_json) or '')[:12]}, "
                            f"content {(content_sha(m_json) or '')[:12]})")
    elif model_tok.get_vocab() != data_tok.get_vocab():
        problems.append("tokenizer hash: the data's vocabulary differs from the model's")
    sm, sd = _specials(model_tok), _specials(data_tok)
    diff = [f"{k} {sd[k]!r} (data) vs {sm[k]!r} (model)" for k in sm if sm[k] != sd[k]]
    if diff:
        problems.append("special tokens: " + "; ".join(diff))
    return problems


def check_init_from(init_from: str, objective: str, data_tokenizer: str, data_vocab: int) -> tuple[str, dict]:
    """(resolved path, model config) when ``init_from`` can continue on this data; else a ValueError
    that names every mismatch and the command that makes matching tokens."""
    path = resolve_init(init_from)
    config = model_config_dict(path)
    wants = init_objective(config)
    problems = []
    if wants != objective:
        problems.append(f"objective: the model is {OBJECTIVE_NAMES[wants]} ({config.get('model_type')}); set "
                        f"objective={wants}")
    vocab = int(config.get("vocab_size") or 0)
    problems += tokenizer_problems(path, vocab, data_tokenizer, data_vocab)
    if problems:
        raise ValueError(f"init_from={init_from}: cannot continue pretraining it on this token dataset:\n  - "
                         + "\n  - ".join(problems)
                         + f"\n(make the tokens with the model's tokenizer: refinery run tokenize --set "
                           f"tokenizer.path={init_from} ...)")
    return path, config


def load_init_model(path: str, objective: str):
    """The pretrained model in float32 with SDPA attention where the architecture has it."""
    import torch

    from refinery.tasks.train.models import auto_class

    cls = auto_class(objective)
    try:
        model = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    except (ValueError, ImportError):
        model = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.config.use_cache = False
    return model


__all__ = ["resolve_init", "init_objective", "tokenizer_problems", "check_init_from", "load_init_model",
           "content_sha", "model_config_dict"]
