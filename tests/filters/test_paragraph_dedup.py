"""Paragraph (line) dedup across documents: parity with dolma's expected results, bounded-memory Bloom
filter, the stage keeps first occurrences."""
from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pytest

from refinery.tasks.dedup.paragraphs import (BloomFilter, ParagraphDedupConfig, dedup_text, dolma_spans,
                                             paragraph_dedup)
from refinery.tasks.store import Store
from refinery_testlib import shared_file


def _dolma(shared_data):
    d = "dedup/dolma-tests/data/"
    with gzip.open(shared_file(shared_data, d + "provided/deduper/documents/000.json.gz"), "rt") as f:
        docs = [json.loads(line) for line in f]
    with gzip.open(shared_file(shared_data, d + "expected/dedupe-paragraphs.json.gz"), "rt") as f:
        expected = {r["id"]: r["attributes"]["bff_duplicate_paragraph_spans"] for r in map(json.loads, f)}
    return docs, expected


@pytest.mark.parametrize("seen", ["set", "bloom"])
def test_matches_dolma_expected_paragraph_spans(shared_data, seen):
    docs, expected = _dolma(shared_data)
    assert len(docs) == 10
    store = set() if seen == "set" else BloomFilter(10_000, 1e-6)
    got = {d["id"]: dolma_spans(d["text"], store) for d in docs}
    assert got == expected
    assert sum(len(v) for v in expected.values()) == 43      # all in the second page of one site


def test_dedup_text_keeps_first_occurrence(shared_data):
    docs, expected = _dolma(shared_data)
    seen: set = set()
    outs = [dedup_text(d["text"], seen) for d in docs]
    # the first page of the site is untouched, the second loses exactly dolma's 43 paragraphs
    assert outs[0] == (docs[0]["text"], 0, 0)
    text, removed, chars = outs[1]
    assert removed == 43 and len(text) < len(docs[1]["text"]) - chars + 1
    for s, e, _ in expected[docs[1]["id"]]:
        para = docs[1]["text"][s:e].rstrip("\n")
        assert para not in text.split("\n")


def test_bloom_filter_false_positive_rate_is_bounded():
    bf = BloomFilter(20_000, 1e-3)
    assert bf.nbytes < 40_000                         # ~1.44 log2(1/p) bits per item
    # while filling, a new key is reported as seen less often than the target rate
    assert sum(bf.add(f"para {i}") for i in range(20_000)) < 1e-3 * 20_000
    assert all(bf.add(f"para {i}") for i in range(0, 20_000, 97))
    fp = sum(f"other {i}" in bf for i in range(20_000)) / 20_000
    assert fp < 3e-3
    with pytest.raises(ValueError):
        BloomFilter(0, 0.01)


def test_stage_removes_repeated_boilerplate_across_parts(tmp_path, shared_data):
    docs, _ = _dolma(shared_data)
    store = Store(str(tmp_path / "store"))
    b = store.builder("docs", "paradedup0000001")
    for i in range(2):                         # the 10 pages in two parts, plus an all-duplicate page
        part = docs[i * 5:(i + 1) * 5] + ([{"id": "copy", "text": docs[0]["text"]}] if i else [])
        b.write_table(f"part-{i:05d}.parquet", pa.table({"id": [d["id"] for d in part],
                                                         "text": [d["text"] for d in part]}))
    ds = b.publish(version="1", config={}, inputs=[], counts={})
    out = paragraph_dedup.run(store, [ds], ParagraphDedupConfig(expected_paragraphs=100_000))
    c = out.counts
    assert c["docs_in"] == 11 and c["docs_emptied"] == 1 and c["docs_out"] == 10
    assert c["docs_modified"] == 2 and c["paragraphs_removed"] >= 43
    assert out.manifest["stats"]["bloom_bytes"] < 500_000
