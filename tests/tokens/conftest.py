"""Fixtures of the token tests: documents datasets built with the store, a tiny tokenizer dataset,
and real multilingual texts extracted from the shared WARC files (fastwarc + resiliparse)."""
from __future__ import annotations

import glob
import hashlib

import pyarrow as pa
import pytest

from refinery.tasks.store import Store, fingerprint

WARC_GLOB = "warc/*.warc.gz"


def make_docs(root, texts: list, parts: int = 1, ids: list | None = None, name: str = "docs"):
    """A complete documents dataset (ARCHITECTURE.md, section 4 columns) of ``texts`` in ``parts`` parts."""
    store = Store(root)
    ids = ids or [hashlib.sha1(f"{i}:{t}".encode()).hexdigest()[:16] for i, t in enumerate(texts)]
    fp = fingerprint(name, "1", {}, [hashlib.sha256(repr(list(zip(ids, texts))).encode()).hexdigest()])
    found = store.get(name, fp)
    if found is not None:
        return found
    b = store.builder(name, fp)
    n = len(texts)
    for p in range(parts):
        lo, hi = p * n // parts, (p + 1) * n // parts
        b.write_table(f"part-{p:05d}.parquet", pa.table({
            "id": pa.array(ids[lo:hi], type=pa.string()),
            "text": pa.array(texts[lo:hi], type=pa.string()),
            "url": pa.array([None] * (hi - lo), type=pa.string()),
            "source": pa.array(["test"] * (hi - lo)),
            "lang": pa.array(["und"] * (hi - lo)),
            "lang_score": pa.array([0.0] * (hi - lo)),
            "metadata": pa.array(["{}"] * (hi - lo)),
        }))
    return b.publish(version="1", config={}, inputs=[], counts={"docs_out": n})


def extract_warc_texts(data_dir) -> list[str]:
    """Main texts of every HTML response in the shared WARC files (undecodable archives skipped)."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding
    from resiliparse.parse.html import HTMLTree

    texts = []
    for fn in sorted(glob.glob(str(data_dir / WARC_GLOB))):
        try:
            with open(fn, "rb") as f:
                for rec in ArchiveIterator(f, record_types=WarcRecordType.response):
                    body = rec.reader.read()
                    html = bytes_to_str(body, detect_encoding(body))
                    text = extract_plain_text(HTMLTree.parse(html), main_content=False)
                    if text.strip():
                        texts.append(text)
        except Exception:  # a deliberately broken archive: keep what was read before the damage
            continue
    return texts


@pytest.fixture(scope="session")
def warc_texts(shared_data) -> list[str]:
    texts = extract_warc_texts(shared_data)
    if not texts:
        pytest.skip("no texts extracted from the shared WARC files")
    return texts


EXTRA_TEXTS = [
    "",                                        # empty: dropped and counted
    "Literal specials stay text: <|endoftext|> <|pad|> <extra_id_0> end.",
    "  leading spaces, trailing spaces  \r\n\ttabs\u00a0nbsp\u200bzero-width ",
    "Emoji 👩‍👩‍👧‍👦 and combining e\u0301 and RTL عربى and Devanagari नमस्ते",
    "日本語のテキストと中文文本，한국어 텍스트도。",
]


@pytest.fixture(scope="session")
def prose_texts() -> list[str]:
    """English prose available everywhere: standard-library docstrings (no shared data needed)."""
    import argparse, collections, email, inspect, json, textwrap  # noqa: E401

    out = []
    for mod in (json, collections, email, argparse, textwrap, inspect):
        for name in sorted(dir(mod)):
            doc = getattr(getattr(mod, name, None), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 80:
                out.append(doc)
    return out


def make_token_dataset(root, docs: list, *, vocab_size: int = 70_000, eos_id: int = 0, max_tokens: int = 4000,
                       batch_tokens: int = 777, parts: int = 2, sha: str = "synthetic", tokenizer_path: str = "synthetic-tokenizer",
                       name: str = "tokenize"):
    """A token dataset written with the stage's own writer, from given token arrays (each already
    ending with EOS), without a tokenizer run: fast, and every token value is chosen by the test."""
    import numpy as np

    from refinery.tasks.tokens.shards import ShardWriter, token_dtype, token_manifest

    store = Store(root)
    dtype = token_dtype(vocab_size)
    h = hashlib.sha256()
    for d in docs:
        h.update(np.asarray(d, dtype=np.int64).tobytes())
    fp = fingerprint(name, "1", {"max": max_tokens, "bt": batch_tokens, "parts": parts, "sha": sha}, [h.hexdigest()])
    found = store.get(name, fp)
    if found is not None:
        return found
    b = store.builder(name, fp)
    files = []
    n = len(docs)
    for p in range(parts):
        w = ShardWriter(b, p, dtype, max_tokens, batch_tokens)
        lo, hi = p * n // parts, (p + 1) * n // parts
        w.add([np.asarray(d, dtype=dtype) for d in docs[lo:hi]], [f"doc{i}" for i in range(lo, hi)])
        w.flush()
        files += w.files
    extra = token_manifest(files, dtype=dtype, vocab_size=vocab_size, eos_id=eos_id,
                           tokenizer={"path": tokenizer_path, "sha256": sha, "dir": "tokenizer"})
    return b.publish(version="1", config={}, inputs=[], counts={"tokens": extra["total_tokens"]}, extra=extra)


def counting_docs(n_docs: int, seed: int = 0, lo: int = 20, hi: int = 400, start: int = 1):
    """Documents whose tokens count up through the whole stream (token = 1 + global position, EOS
    = 0 at each end), so a window's first token tells where it starts."""
    import numpy as np

    rng = np.random.default_rng(seed)
    docs, pos = [], start
    for _ in range(n_docs):
        k = int(rng.integers(lo, hi))
        d = np.arange(pos, pos + k + 1, dtype=np.int64)
        d[-1] = 0
        docs.append(d)
        pos += k + 1
    return docs
