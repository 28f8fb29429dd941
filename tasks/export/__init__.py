"""The last step of every model export (pretrain, finetune, align): make the folder generate well.

Training runs with ``use_cache: false`` (the KV cache is useless with teacher forcing and costs
memory), and ``save_pretrained`` keeps that in ``config.json``, so ``generate()`` on the exported
model would recompute every past token at each step. :func:`finalize_model_dir` sets
``use_cache: true`` in ``config.json`` and writes a ``generation_config.json`` (from the model config:
BOS/EOS/pad ids) when the folder has none. A folder without ``config.json`` (a PEFT adapter) is left
as it is.
"""
from __future__ import annotations

import json
from pathlib import Path


def finalize_model_dir(path: str | Path) -> bool:
    """Make a saved HF model folder use the KV cache; False when it holds no model config."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        return False
    conf = json.loads(cfg_path.read_text())
    if conf.get("use_cache") is not True:
        conf["use_cache"] = True
        cfg_path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        gen = json.loads(gen_path.read_text())
        if gen.get("use_cache") is False:   # a stale explicit false would override config.json
            del gen["use_cache"]
            gen_path.write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    else:
        from transformers import AutoConfig, GenerationConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(path)).save_pretrained(path)
    return True


__all__ = ["finalize_model_dir"]
