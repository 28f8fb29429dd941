"""Shared fixtures: real data location, execution log, tiny models built on the fly (no hub)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from refinery_testlib import read_exec_log  # noqa: F401  (re-exported for older imports)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` from the project root; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture
def exec_log(tmp_path, monkeypatch) -> Path:
    """Path of a file that gets one line per real stage execution (see refinery.tasks.runtime)."""
    path = tmp_path / "exec.log"
    monkeypatch.setenv("REFINERY_EXEC_LOG", str(path))
    return path


def _corpus_lines() -> list[str]:
    """Real English prose available on every Python install: standard-library docstrings."""
    import json, collections, email, argparse, textwrap, inspect  # noqa: E401

    texts = []
    for mod in (json, collections, email, argparse, textwrap, inspect):
        for name in sorted(dir(mod)):
            doc = getattr(getattr(mod, name, None), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 80:
                texts.append(" ".join(doc.split()))
    return texts


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 512) trained on the fly, saved in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|pad|>", "<|mask|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        pad_token="<|pad|>", mask_token="<|mask|>",
    )
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_causal_lm_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny Llama-style causal LM (random weights, seed 0) with its tokenizer, in HF format."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = tmp_path_factory.mktemp("tiny_causal_lm")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=0, eos_token_id=0, pad_token_id=1, tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    for f in Path(tiny_tokenizer_dir).iterdir():
        shutil.copy(f, out / f.name)
    return out
