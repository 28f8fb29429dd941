"""Fixtures and helpers of the pretraining tests (imported by each test module; deliberately not a
conftest.py, which would shadow tests/conftest.py as the module ``conftest``).

Real text from ../shared/data tokenized by the tiny tokenizer (plus T5 sentinels), in-memory readers
with the token reader's interface, tiny model overrides, and a short-run config."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from refinery_testlib import shared_file

TINY_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
N_SENTINELS = 32
_CACHE: dict = {}   # session-wide: these fixtures are imported into several modules


@pytest.fixture(scope="session")
def corpus_texts(shared_data) -> list[str]:
    """300 real C4 documents (quality/c4-demo.jsonl)."""
    path = shared_file(shared_data, "quality/c4-demo.jsonl")
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def train_tokenizer_dir(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """The tiny byte-level BPE tokenizer plus <extra_id_0..31> sentinels (as the tokenizer stage adds them)."""
    if "tokenizer" not in _CACHE:
        from transformers import AutoTokenizer

        out = tmp_path_factory.mktemp("train_tokenizer")
        tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
        tok.add_special_tokens({"additional_special_tokens": [f"<extra_id_{i}>" for i in range(N_SENTINELS)]})
        tok.save_pretrained(out)
        _CACHE["tokenizer"] = out
    return _CACHE["tokenizer"]


@pytest.fixture(scope="session")
def corpus_tokens(train_tokenizer_dir, corpus_texts, tmp_path_factory) -> dict:
    """The corpus as one EOS-separated token array saved as .npy; returns its reader spec."""
    if "tokens" not in _CACHE:
        from transformers import AutoTokenizer

        from refinery.tasks.train.data import tokenize_texts

        ids = tokenize_texts(corpus_texts, train_tokenizer_dir)
        tok = AutoTokenizer.from_pretrained(str(train_tokenizer_dir))
        path = tmp_path_factory.mktemp("tokens") / "c4.npy"
        np.save(path, ids)
        _CACHE["tokens"] = {"kind": "array", "tokens": str(path), "tokenizer_path": str(train_tokenizer_dir),
                            "vocab_size": len(tok), "eos_id": tok.eos_token_id}
    return _CACHE["tokens"]


@pytest.fixture
def readers(corpus_tokens):
    """``readers(seq_len, seed=0) -> (train, val, unigram)`` fresh in-memory readers."""
    from refinery.tasks.train.data import open_reader

    def make(seq_len: int, seed: int = 0):
        return tuple(open_reader(corpus_tokens, seq_len, split=s, seed=seed) for s in ("train", "val", "train"))
    return make


@pytest.fixture(autouse=True)
def one_thread():
    """CPU determinism and a fair share of the 2-core test machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- helpers
def cfg_for(**kw):
    from refinery.tasks.train.config import TrainConfig

    base = dict(model=TINY_MODEL, seq_len=64, batch_size=8, max_steps=30, warmup_steps=3, lr=3e-3,
                eval_every=10, eval_batches=4, log_every=1000, unigram_max_tokens=50_000, device="cpu", devices=1)
    base.update(kw)
    return TrainConfig(**base)


def run(cfg, readers, ckpt_dir, **kw):
    from refinery.tasks.train.loop import train

    tr, va, uni = readers(cfg.seq_len, cfg.seed)
    return train(cfg, tr, va, ckpt_dir, unigram_reader=uni, log=lambda m: None, progress=False, **kw)


def losses(result) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in result["history"] if r.get("loss") is not None}


def val_losses(result) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in result["history"] if r.get("val_loss") is not None}


def make_token_dataset(root, texts: list[str], vocab_size: int = 512, sentinels: int = 32) -> str:
    """A real token dataset made by the upstream stages: a documents dataset of ``texts``, the
    ``tokenizer`` stage (byte-level BPE with eos/pad/mask and <extra_id_N> sentinels) and the
    ``tokenize`` stage (Arrow IPC shards), all in the store at ``root``."""
    import hashlib

    import pyarrow as pa

    from refinery.tasks.store import Store, fingerprint
    from refinery.tasks.tokens.stage import Tokenize, TokenizeConfig
    from refinery.tasks.tokens.tokenizer import TokenizerConfig, tokenizer_stage

    store = Store(root)
    ids = [hashlib.sha1(t.encode()).hexdigest()[:16] + f"-{i}" for i, t in enumerate(texts)]
    fp = fingerprint("docs", "test", {}, [hashlib.sha256("\0".join(ids).encode()).hexdigest()])
    docs = store.get("docs", fp)
    if docs is None:
        b = store.builder("docs", fp)
        n = len(texts)
        b.write_table("part-00000.parquet", pa.table({
            "id": pa.array(ids, type=pa.string()), "text": pa.array(texts, type=pa.string()),
            "url": pa.array([None] * n, type=pa.string()), "source": pa.array(["c4-demo"] * n),
            "lang": pa.array(["en"] * n), "lang_score": pa.array([1.0] * n), "metadata": pa.array(["{}"] * n)}))
        docs = b.publish(version="test", config={}, inputs=[], counts={"docs_out": n})
    tok = tokenizer_stage.run(store, [docs], TokenizerConfig(vocab_size=vocab_size, sentinels=sentinels))
    tokens = Tokenize.run(store, [docs, tok], TokenizeConfig(max_tokens_per_file=60_000, batch_tokens=8192))
    return tokens.path


@pytest.fixture(scope="session")
def token_dataset(tmp_path_factory, corpus_texts) -> str:
    """The C4 sample as a token dataset from the real tokenizer and tokenize stages (read by TokenReader)."""
    if "token_dataset" not in _CACHE:
        _CACHE["token_dataset"] = make_token_dataset(tmp_path_factory.mktemp("token_store"), corpus_texts)
    return _CACHE["token_dataset"]
