"""The tokenizer and tokenize stages: HF-format tokenizer with special tokens, caching, lossless
round trip on real multilingual WARC text, shard layout, bad input, determinism."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from refinery.tasks.runtime import ShardsFailed
from refinery.tasks.store import Store
from refinery.tasks.tokens.shards import index_file_name, read_docs_index
from refinery.tasks.tokens.stage import Tokenize, TokenizeConfig
from refinery.tasks.tokens.tokenizer import TokenizerConfig, tokenizer_stage
from refinery_testlib import read_exec_log
from tests.tokens.conftest import EXTRA_TEXTS, make_docs

TOK = TokenizerConfig(vocab_size=700, sentinels=8)


@pytest.fixture(scope="module")
def warc_run(tmp_path_factory, warc_texts):
    """Documents from the shared WARC files (+ edge cases) in 3 parts, a tokenizer trained on them,
    and their token dataset cut into small files."""
    root = tmp_path_factory.mktemp("warc_run")
    texts = warc_texts + EXTRA_TEXTS
    docs = make_docs(root, texts, parts=3)
    tok = tokenizer_stage.run(root, [docs], TOK)
    tokens = Tokenize.run(root, [docs, tok], TokenizeConfig(max_tokens_per_file=30_000, batch_tokens=4096, batch_docs=16))
    return root, docs, tok, tokens


def doc_tokens(tokens_ds):
    """{doc id: its token array (EOS included)} read back through the document index."""
    out = {}
    for name in tokens_ds.manifest["token_files"]:
        with pa.memory_map(f"{tokens_ds.path}/{name}") as m:
            arr = ipc.open_file(m).read_all().column("tokens").to_numpy()
        idx = read_docs_index(f"{tokens_ds.path}/{index_file_name(name)}")
        for off, n, doc_id in zip(idx["offset"].to_pylist(), idx["length"].to_pylist(), idx["id"].to_pylist()):
            out[doc_id] = arr[off: off + n]
    return out


def test_tokenizer_is_hf_loadable_with_special_tokens(warc_run):
    from transformers import AutoTokenizer

    _, _, tok_ds, _ = warc_run
    t = AutoTokenizer.from_pretrained(tok_ds.path)
    assert len(t) == 700 == tok_ds.manifest["tokenizer"]["vocab_size"]
    assert (t.eos_token, t.pad_token, t.mask_token) == ("<|endoftext|>", "<|pad|>", "<|mask|>")
    assert (t.eos_token_id, t.pad_token_id, t.mask_token_id) == (0, 1, 2)
    vocab = t.get_vocab()
    assert [vocab[f"<extra_id_{i}>"] for i in range(8)] == list(range(3, 11)) and "<extra_id_8>" not in vocab
    assert tok_ds.manifest["tokenizer"]["sentinels"] == 8
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(f"{tok_ds.path}/tokenizer.json").get_vocab_size() == 700


def test_lossless_round_trip_on_warc_text(warc_run):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    _, docs, tok_ds, tokens = warc_run
    texts = dict(zip(docs.read_table(columns=["id"])["id"].to_pylist(), docs.read_table(columns=["text"])["text"].to_pylist()))
    raw = Tokenizer.from_file(f"{tok_ds.path}/tokenizer.json")
    hf = AutoTokenizer.from_pretrained(tokens.manifest["tokenizer"]["path"])
    got = doc_tokens(tokens)
    nonempty = {k: v for k, v in texts.items() if v}
    assert set(got) == set(nonempty)  # every document but the empty one, which is counted as dropped
    assert tokens.counts["dropped"] == {"empty": 1, "null_text": 0, "invalid_utf8": 0}
    cjk = sum(any("\u4e00" <= c <= "\u9fff" or "\u3040" <= c <= "\u30ff" for c in t) for t in nonempty.values())
    assert cjk >= 20  # the shared crawl is mostly Chinese and Japanese
    for doc_id, ids in got.items():
        assert ids[-1] == 0 and 0 not in ids[:-1]  # EOS ends every document, and only there
        assert raw.decode(ids[:-1].tolist(), skip_special_tokens=False) == nonempty[doc_id], doc_id
    # literal special-token strings are text, never special ids; HF decoding is lossless too
    lit = next(k for k, v in nonempty.items() if "<|endoftext|>" in v)
    assert not set(got[lit][:-1].tolist()) & set(range(11))
    for doc_id in list(got)[:10] + [lit]:
        assert hf.decode(got[doc_id][:-1].tolist()) == nonempty[doc_id]


def test_manifest_and_layout(warc_run):
    _, docs, tok_ds, tokens = warc_run
    m = tokens.manifest
    assert m["dtype"] == "uint16" and m["vocab_size"] == 700 and m["eos_id"] == 0
    assert m["tokenizer"]["path"] == tok_ds.path and m["tokenizer"]["sha256"] == tok_ds.manifest["tokenizer"]["sha256"]
    assert len(m["token_files"]) > 3  # one input part makes several files of <= 30k tokens (document boundaries)
    total = 0
    for name in m["token_files"]:
        with pa.memory_map(f"{tokens.path}/{name}") as mm:
            f = ipc.open_file(mm)
            assert f.schema.names == ["tokens"] and f.schema.field("tokens").type == pa.uint16()
            n = sum(f.get_batch(i).num_rows for i in range(f.num_record_batches))
            assert all(f.get_batch(i).num_rows <= 4096 for i in range(f.num_record_batches))
        assert n == m["tokens_per_file"][name]
        total += n
    assert total == m["total_tokens"] == m["counts"]["tokens"]
    assert m["documents"] == sum(m["documents_per_file"].values()) == m["counts"]["docs_out"] == len(doc_tokens(tokens))
    assert os.path.exists(f"{tokens.path}/tokenizer/tokenizer.json")
    from refinery.tasks.tokens.reader import TokenReader

    r = TokenReader(tokens.path, 64)
    assert r.tokenizer_path == f"{tokens.path}/tokenizer" and r.vocab_size == 700  # self-contained copy


def test_caching_and_fingerprints(tmp_path, prose_texts, exec_log):
    docs = make_docs(tmp_path, prose_texts, parts=2)
    cfg = TokenizerConfig(vocab_size=400, sentinels=2)
    a = tokenizer_stage.run(tmp_path, [docs], cfg)
    t1 = Tokenize.run(tmp_path, [docs, a], TokenizeConfig())
    log = read_exec_log(exec_log)
    assert log == [f"tokenizer {a.fingerprint}", f"tokenize {t1.fingerprint} part-00000",
                   f"tokenize {t1.fingerprint} part-00001", f"tokenize {t1.fingerprint}"]
    assert tokenizer_stage.run(tmp_path, [docs], cfg).path == a.path
    assert Tokenize.run(tmp_path, [docs, a], TokenizeConfig()).path == t1.path
    assert read_exec_log(exec_log) == log  # cached: nothing ran again
    b = tokenizer_stage.run(tmp_path, [docs], cfg.model_copy(update={"vocab_size": 420}))
    other_docs = make_docs(tmp_path, prose_texts[:-3], parts=2)
    c = tokenizer_stage.run(tmp_path, [other_docs], cfg)
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3  # config and corpus both count
    # deterministic: another store, same inputs -> byte-identical tokenizer and token files
    other = tmp_path / "other"
    docs2 = make_docs(other, prose_texts, parts=2)
    a2 = tokenizer_stage.run(other, [docs2], cfg)
    t2 = Tokenize.run(other, [docs2, a2], TokenizeConfig())
    assert a2.manifest["tokenizer"]["sha256"] == a.manifest["tokenizer"]["sha256"]
    sha = lambda ds: {f["path"]: f["sha256"] for f in ds.manifest["files"]}  # noqa: E731
    assert sha(t2) == sha(t1)
    # a second corpus ("books") tokenized with the first one's tokenizer, loaded by path: same
    # tokenizer hash, so the reader mixes the two token datasets
    from refinery.tasks.tokens.reader import TokenReader

    reused = tokenizer_stage.run(tmp_path, [], TokenizerConfig(path=a.path))
    assert reused.manifest["tokenizer"]["sha256"] == a.manifest["tokenizer"]["sha256"]
    books = Tokenize.run(tmp_path, [make_docs(tmp_path, prose_texts[::-1], name="books"), reused], TokenizeConfig())
    mixed = TokenReader([t1.path, books.path], 16, weights=[0.5, 0.5])
    assert mixed.next_batch(4).shape == (4, 17)


def test_load_existing_tokenizer(tmp_path, tiny_tokenizer_dir, prose_texts):
    docs = make_docs(tmp_path, prose_texts[:20])
    tok = tokenizer_stage.run(tmp_path, [], TokenizerConfig(path=str(tiny_tokenizer_dir)))
    src = json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text())
    assert json.loads(open(f"{tok.path}/tokenizer.json").read())["model"]["vocab"] == src["model"]["vocab"]
    assert tok.manifest["tokenizer"]["source"] == str(tiny_tokenizer_dir)
    out = Tokenize.run(tmp_path, [docs, tok], TokenizeConfig(dtype="uint32"))
    assert out.manifest["dtype"] == "uint32" and out.counts["docs_out"] == 20
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        tokenizer_stage.run(tmp_path, [], TokenizerConfig(path=str(tmp_path / "no-such-tokenizer")))
    # the fingerprint of a loaded local tokenizer follows its content, not only its path
    copy = tmp_path / "copied-tokenizer"
    shutil.copytree(tiny_tokenizer_dir, copy)
    fp1 = tokenizer_stage.fingerprint([], TokenizerConfig(path=str(copy)))
    assert tokenizer_stage.fingerprint([], TokenizerConfig(path=str(copy))) == fp1
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text() + "\n")
    assert tokenizer_stage.fingerprint([], TokenizerConfig(path=str(copy))) != fp1


def test_bad_input_counted_or_named(tmp_path, prose_texts):
    texts = prose_texts[:10] + [None, "", prose_texts[10]]
    docs = make_docs(tmp_path, texts, ids=[f"d{i}" for i in range(len(texts))])
    tok = tokenizer_stage.run(tmp_path, [docs], TokenizerConfig(vocab_size=300, sentinels=0))
    out = Tokenize.run(tmp_path, [docs, tok], TokenizeConfig())
    assert out.counts["docs_in"] == 13 and out.counts["docs_out"] == 11
    assert out.counts["dropped"] == {"null_text": 1, "empty": 1, "invalid_utf8": 0}
    # a binary text column: invalid UTF-8 is counted and skipped, the rest tokenized
    store = Store(tmp_path / "bin")
    b = store.builder("docs", "binary")
    b.write_table("part-00000.parquet", pa.table({"id": ["a", "b", "c"],
                                                  "text": pa.array([b"caf\xc3\xa9 ok", b"\xff\xfe broken", b"fine"])}))
    bin_docs = b.publish(version="1", config={}, inputs=[])
    out = Tokenize.run(tmp_path / "bin", [bin_docs, tok], TokenizeConfig())
    assert out.counts["docs_out"] == 2 and out.counts["dropped"]["invalid_utf8"] == 1
    # an unreadable part is named in the error
    bad = make_docs(tmp_path / "bad", prose_texts[:6], parts=2)
    part = bad.files[1]
    shutil.copy(part, part + ".orig")
    with open(part, "wb") as f:
        f.write(b"this is not parquet")
    # (the shard fails; the runtime finishes the others, then names it)
    with pytest.raises(ShardsFailed, match=r"part-00001[\s\S]*not a parquet file"):
        Tokenize.run(tmp_path / "bad", [bad, tok], TokenizeConfig())
    with pytest.raises(ShardsFailed, match="no 'body' column"):
        Tokenize.run(tmp_path, [docs, tok], TokenizeConfig(text_field="body"))
    with pytest.raises(ValueError, match="vocab_size"):
        TokenizerConfig(vocab_size=300, sentinels=100)


def test_token_dtype():
    from refinery.tasks.tokens.shards import token_dtype

    assert token_dtype(512) == "uint16" and token_dtype(65_536) == "uint16" and token_dtype(65_537) == "uint32"
    assert np.iinfo(token_dtype(65_536)).max == 65_535
