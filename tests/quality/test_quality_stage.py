"""The quality stage: the NumPy fastText trainer writes models fastText itself scores identically, the
cached training stage, threshold / top-fraction keeping, scores in metadata, histogram, HF scorer."""
from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest
from pydantic import ValidationError

from refinery.tasks.quality.fasttext_train import TrainParams, fnv1a, prepare, train
from refinery.tasks.quality.stage import (QualityConfig, histogram, keep_mask, read_texts, run_quality,
                                          score_table)
from refinery.tasks.store import Store
from refinery_testlib import read_exec_log, shared_file

SMALL = {"dim": 16, "epoch": 20, "bucket": 5000, "max_docs": 120}


def test_fnv1a_matches_fasttext_hash():
    # FNV-1a offset basis for the empty string; bytes >= 0x80 are sign-extended as in fastText's int8 cast
    assert fnv1a("") == 2166136261
    assert fnv1a("a") == ((2166136261 ^ 0x61) * 16777619) & 0xFFFFFFFF
    assert fnv1a("é") == ((((2166136261 ^ 0xFFFFFFC3) * 16777619 & 0xFFFFFFFF) ^ 0xFFFFFFA9) * 16777619) & 0xFFFFFFFF


def test_trained_bin_scores_the_same_in_fasttext(tmp_path, shared_data):
    """The .bin we write loads in fastText (fasttext-predict) and gives our probabilities: dictionary,
    bigram hashing (with non-ASCII words) and matrices are in fastText's own format."""
    fasttext = pytest.importorskip("fasttext")
    pos = read_texts(str(shared_file(shared_data, "sft/self-instruct-seed-tasks.jsonl")))[:80]
    neg = read_texts(str(shared_file(shared_data, "quality/c4-demo.jsonl")))[:80]
    model = train([prepare(t) for t in pos + neg], ["hq"] * len(pos) + ["lq"] * len(neg),
                  TrainParams(dim=16, epoch=20, bucket=5000, lr=0.5))
    path = tmp_path / "m.bin"
    model.save(path)
    ft = fasttext.load_model(str(path))
    probes = [prepare(t) for t in pos[:5] + neg[:5]] + ["Écrivez un poème sur la mer", "写一首关于大海的诗", ""]
    for line in probes:
        ours = model.predict_proba(line)
        theirs = {lab: float(p) for p, lab in ft.f.predict(line + "\n", -1, 0.0, "strict")}
        assert set(theirs) == {"__label__hq", "__label__lq"}
        for lab, p in ours.items():
            assert theirs[lab] == pytest.approx(p, abs=2e-5), line
    # it learned something: training documents are separated
    assert sum(model.predict_proba(prepare(t))["__label__hq"] > 0.5 for t in pos) >= 0.8 * len(pos)
    assert sum(model.predict_proba(prepare(t))["__label__hq"] < 0.5 for t in neg) >= 0.8 * len(neg)


def _docs(store: Store, texts: list[str | None]):
    n = len(texts)
    b = store.builder("docs", "docsfixture00001")
    b.write_table("part-00000.parquet", pa.table({
        "id": [f"d{i}" for i in range(n)], "text": pa.array(texts, pa.string()), "url": [None] * n,
        "lang": ["en"] * n, "metadata": [json.dumps({"file": "x"})] * n}))
    return b.publish(version="1", config={}, inputs=[], counts={"docs": n})


def _training_files(shared_data):
    return (str(shared_file(shared_data, "sft/self-instruct-seed-tasks.jsonl")),
            str(shared_file(shared_data, "quality/c4-demo.jsonl")))


def test_stage_trains_once_scores_and_keeps(tmp_path, shared_data, exec_log):
    pytest.importorskip("fasttext")
    pos, neg = _training_files(shared_data)
    store = Store(str(tmp_path / "store"))
    eval_texts = read_texts(pos)[100:130] + read_texts(neg)[200:230] + [None]
    docs = _docs(store, eval_texts)
    cfg = QualityConfig(model="fasttext", positive=[pos], negative=[neg], train=SMALL, threshold=0.5)
    out = run_quality(store, docs, cfg)
    model_ds, ds = out["quality_model"], out["quality"]
    assert model_ds.counts["positive"] == model_ds.counts["negative"] == 120    # balanced, capped
    c = ds.counts
    assert c["docs_in"] == 61 and c["corrupt"] == 1 and c["docs_out"] + c["dropped"] == 61
    assert sum(c["score_histogram"].values()) == 60 and len(c["score_histogram"]) == 20
    kept = ds.read_table(files=[ds.file(f["path"]) for f in ds.manifest["files"] if f["path"].startswith("part-")])
    metas = [json.loads(m) for m in kept.column("metadata").to_pylist()]
    assert all(m["quality_score"] >= 0.5 and m["file"] == "x" and m["quality_model"].startswith("fasttext:")
               for m in metas)
    ex = ds.read_table(files=[ds.file(f["path"]) for f in ds.manifest["files"] if f["path"].startswith("excluded/")])
    values = ex.column("value").to_pylist()
    assert sum(v is None for v in values) == 1 and all(v < 0.5 for v in values if v is not None)
    # held-out instruction texts score higher than held-out C4 text
    score = {i: m["quality_score"] for i, m in zip(kept.column("id").to_pylist(), metas)}
    assert sum(f"d{i}" in score for i in range(30)) > sum(f"d{i}" in score for i in range(30, 60))
    # same config again: nothing re-runs; a different threshold re-scores but does not retrain
    n_exec = len(read_exec_log(exec_log))
    again = run_quality(store, docs, cfg)
    assert again["quality"].path == ds.path and len(read_exec_log(exec_log)) == n_exec
    top = run_quality(store, docs, cfg.model_copy(update={"keep": "top_fraction", "top_fraction": 0.25}))
    assert top["quality_model"].path == model_ds.path and top["quality"].counts["docs_out"] == math.ceil(0.25 * 60)
    # the trained .bin can be given by path instead
    bin_path = model_ds.file(model_ds.manifest["model"])
    by_path = run_quality(store, docs, QualityConfig(model="fasttext", path=bin_path, threshold=0.5))
    assert "quality_model" not in by_path and by_path["quality"].counts["docs_out"] == c["docs_out"]


def test_keep_rules_and_histogram():
    assert keep_mask([0.1, 0.9, 0.5], QualityConfig(model="fasttext", path="m.bin", threshold=0.5)) == [False, True, True]
    cfg = QualityConfig(model="fasttext", path="m.bin", keep="top_fraction", top_fraction=0.5)
    assert keep_mask([0.1, 0.9, 0.5, 0.7], cfg) == [False, True, False, True]
    h = histogram([0.0, 0.26, 0.99, 1.0, 7.0, -1.0], 0.0, 1.0, 4)
    assert list(h.values()) == [2, 1, 0, 3]


def test_bad_configs_and_inputs(tmp_path):
    with pytest.raises(ValidationError, match="needs quality.path"):
        QualityConfig(model="hf")
    with pytest.raises(ValidationError, match="positive and quality.negative"):
        QualityConfig(model="fasttext", positive=["a.jsonl"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_texts(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not JSON"):
        read_texts(str(bad))


def test_hf_regression_head_batched(tmp_path, tiny_tokenizer_dir):
    """A FineWeb-Edu-style regression head (num_labels=1) built from a config: batched scores equal the
    one-by-one scores, go into metadata, and the histogram spans 0-5."""
    import shutil

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from refinery.tasks.quality.stage import HFScorer

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=1,
                                                     pad_token_id=1, max_position_embeddings=128))
    out = tmp_path / "edu"
    model.save_pretrained(out)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    texts = ["The river runs through the old town.", "Buy now!!!", "A longer text about photosynthesis " * 5]
    batched = HFScorer(str(out), "hq", batch_size=3, max_length=64, device="cpu")
    single = HFScorer(str(out), "hq", batch_size=1, max_length=64, device="cpu")
    assert batched.regression
    assert batched.score(texts) == pytest.approx(single.score(texts), abs=1e-4)
    cfg = QualityConfig(model="hf", path=str(out), keep="all")
    kept, _, counts = score_table(pa.table({"id": ["a", "b", "c"], "text": texts}), cfg, batched, "hf:edu")
    assert kept.num_rows == 3 and list(counts["score_histogram"])[-1] == "4.75..5"
    metas = [json.loads(m) for m in kept.column("metadata").to_pylist()]
    assert [m["quality_score"] for m in metas] == pytest.approx(batched.score(texts), abs=1e-5)
    assert [m["quality_int_score"] for m in metas] == [int(round(max(0, min(s, 5)))) for s in batched.score(texts)]


def test_curate_params_take_a_quality_section():
    from refinery.flows.curate import CurateParams

    p = CurateParams(input="x.warc.gz", quality={"model": "fasttext", "positive": "a.json, b.jsonl",
                                                 "negative": "c.jsonl", "keep": "top_fraction"})
    assert p.quality.positive == ["a.json", "b.jsonl"] and p.quality.negative == ["c.jsonl"]
    assert CurateParams(input="x.warc.gz").quality.model is None      # off unless asked for
