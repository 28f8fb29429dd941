"""Fixtures of the evaluation tests: offline Hugging Face caches, tiny models, a documents dataset."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# lm-eval reads task data through `datasets`, which fixes its cache folder when first imported:
# set a private, offline cache before anything imports it.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="refinery-eval-hf-datasets-"))


def _doc_texts() -> list[str]:
    """Real English prose on every Python install: standard-library docstrings."""
    import collections
    import json

    texts = []
    for mod in (json, collections):
        for name in sorted(dir(mod)):
            doc = getattr(getattr(mod, name, None), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 200:
                texts.append(" ".join(doc.split()))
    return texts


@pytest.fixture(scope="session")
def second_model_dir(tmp_path_factory, tiny_causal_lm_dir) -> Path:
    """The tiny causal LM's architecture with other random weights (seed 1): a second model."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny_causal_lm_2")
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_causal_lm_dir))
    model.save_pretrained(out)
    for f in Path(tiny_causal_lm_dir).iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".txt") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture
def docs_dataset(tmp_path):
    """A documents dataset (id, text, source, lang) of 12 real texts from two sources."""
    import pyarrow as pa

    from refinery.tasks.store import Store

    texts = _doc_texts()[:12]
    assert len(texts) == 12
    b = Store(tmp_path / "docs-root").builder("documents", "testdocs")
    b.write_table("part-00000.parquet", pa.table({
        "id": [f"d{i}" for i in range(12)], "text": texts,
        "source": ["json" if i < 6 else "collections" for i in range(12)], "lang": ["en"] * 12}))
    return b.publish(version="1", config={}, inputs=[])
