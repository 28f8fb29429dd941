"""`refinery generate` and what every exported model carries: use_cache: true and a generation_config.json."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REFINERY = str(Path(sys.executable).parent / "refinery")
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"


def _tiny(tmp_path, tiny_causal_lm_dir, use_cache: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    model.config.use_cache = use_cache
    return model, AutoTokenizer.from_pretrained(tiny_causal_lm_dir)


def _assert_generates_with_cache(folder: Path) -> None:
    from transformers import GenerationConfig

    assert json.loads((folder / "config.json").read_text())["use_cache"] is True
    gen = GenerationConfig.from_pretrained(folder)
    assert gen.eos_token_id == 0 and gen.pad_token_id == 1
    assert json.loads((folder / "generation_config.json").read_text()).get("use_cache", True) is True


def test_finalize_sets_use_cache_and_writes_the_generation_config(tmp_path, tiny_causal_lm_dir):
    from refinery.tasks.export import finalize_model_dir

    model, tok = _tiny(tmp_path, tiny_causal_lm_dir, use_cache=False)
    out = tmp_path / "m"
    model.save_pretrained(out)
    (out / "generation_config.json").unlink(missing_ok=True)
    assert json.loads((out / "config.json").read_text())["use_cache"] is False
    assert finalize_model_dir(out)
    _assert_generates_with_cache(out)
    assert not finalize_model_dir(tmp_path)          # no config.json (e.g. an adapter): untouched


def test_finetune_and_align_exports_carry_use_cache(tmp_path, tiny_causal_lm_dir):
    from refinery.tasks.align.common import save_model
    from refinery.tasks.finetune.methods import save_full

    model, tok = _tiny(tmp_path, tiny_causal_lm_dir, use_cache=False)
    save_full(model, tok, str(tmp_path / "full"))
    _assert_generates_with_cache(tmp_path / "full")
    model, tok = _tiny(tmp_path, tiny_causal_lm_dir, use_cache=False)
    tok.chat_template = CHAT_TEMPLATE   # the template a policy was aligned with travels with it
    keys = save_model(model, tok, str(tmp_path / "aligned"), lora=False)
    _assert_generates_with_cache(tmp_path / "aligned" / keys["model"])
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "aligned" / keys["model"]).chat_template == CHAT_TEMPLATE


def _run(args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([REFINERY, "generate", *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_refinery_generate_prints_the_greedy_completion(tmp_path, tiny_causal_lm_dir):
    from refinery.tasks.eval.generate import generate, load_model
    from refinery.tasks.store import Store

    b = Store(tmp_path / "work").builder("pretrain", "fp1")   # a model as the flows publish it
    b.put_dir(tiny_causal_lm_dir)
    ds = b.publish(version="1", config={}, inputs=[])
    expected = generate(load_model(ds.path, "cpu"), "Once upon a time", max_new_tokens=12)
    r = _run([ds.path, "--prompt", "Once upon a time", "--max-new-tokens", "12", "--device", "cpu"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == expected + "\n" and expected.strip()
    sampled = _run([ds.path, "--prompt", "Once", "--max-new-tokens", "8", "--temperature", "1.0", "--top-p", "0.9",
                    "--seed", "3", "--device", "cpu"])
    assert sampled.returncode == 0 and sampled.stdout.strip(), sampled.stderr[-3000:]


@pytest.mark.slow
def test_refinery_generate_chat_uses_the_template_or_says_there_is_none(tmp_path, tiny_causal_lm_dir):
    from transformers import AutoTokenizer

    from refinery.tasks.eval.generate import prompt_ids

    r = _run([str(tiny_causal_lm_dir), "--prompt", "hi", "--chat", "--device", "cpu"])
    assert r.returncode == 2 and "no chat template" in r.stderr
    chat = tmp_path / "chat"
    shutil.copytree(tiny_causal_lm_dir, chat)
    tok = AutoTokenizer.from_pretrained(chat)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(chat)
    ids = prompt_ids(AutoTokenizer.from_pretrained(chat), "hi", chat=True)
    assert AutoTokenizer.from_pretrained(chat).decode(ids) == "<|user|>hi\n<|assistant|>"
    r = _run([str(chat), "--prompt", "hi", "--chat", "--max-new-tokens", "6", "--device", "cpu"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run([str(tmp_path / "missing"), "--prompt", "hi"])
    assert r.returncode == 2 and "no such model folder" in r.stderr
