"""Incremental dedup through the persistent index: B after A == A+B together."""
from __future__ import annotations

import datetime as dt
import json
import random

import pytest

from helpers import docs_dataset, mutate
from refinery.tasks.dedup.index import DedupIndex, IndexMismatch
from refinery.tasks.dedup.stage import DedupConfig, read_clusters, run_dedup
from refinery.tasks.store import Store

JAN = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
MAR = dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc)


def _snapshots(planted):
    """Snapshot A (January) and B (March): B holds new documents, copies of A's documents, copies
    of A's *dropped* copies (chains through a document A did not keep) and copies of its own."""
    rows, pairs = planted
    rng = random.Random(1)
    copy_of = {c: o for o, c, _ in pairs}
    originals = [r for r in rows if r["id"] not in copy_of][:260]
    orig_ids = {r["id"] for r in originals}
    copies = [r for r in rows if r["id"] in copy_of and copy_of[r["id"]] in orig_ids]
    half = {r["id"] for r in originals[:130]}
    a, b = [], []
    for r in originals:
        (a if r["id"] in half else b).append(dict(r))
    for k, r in enumerate(copies):
        (a if copy_of[r["id"]] in half and k % 2 == 0 else b).append(dict(r))
    vocab = sorted({w for r in originals[:20] for w in r["text"].split()})
    for k, r in enumerate([r for r in a if r["id"].startswith("c")][:15]):  # second-generation copies
        text, _ = mutate(r["text"], 0.85, rng, vocab)
        b.append({**r, "id": f"cc{k:03d}", "text": text, "url": f"https://third.example/{k}"})
    for i, r in enumerate(a):
        r["crawl_date"] = JAN + dt.timedelta(hours=i)
    for i, r in enumerate(b):
        r["crawl_date"] = MAR + dt.timedelta(hours=i)
        r["metadata"] = json.dumps({"quality_score": rng.random()})
    return a, b


def _kept(ds) -> set:
    return set(ds.read_table(columns=["id"]).column("id").to_pylist())


@pytest.mark.parametrize("verify", [False, True])
def test_b_after_a_equals_joint_run(tmp_path, planted, exec_log, verify):
    a, b = _snapshots(planted)
    store = Store(tmp_path / "w")
    index = str(tmp_path / "index")
    cfg = DedupConfig(index=index, verify=verify)
    ds_a = docs_dataset(store, a, name="snap-a", parts=2)
    ds_b = docs_dataset(store, b, name="snap-b", parts=2)
    out_a = run_dedup(store, ds_a, cfg)["dedup"]
    out_b = run_dedup(store, ds_b, cfg)["dedup"]
    joint = run_dedup(store, docs_dataset(store, a + b, name="snap-ab", parts=3),
                      DedupConfig(verify=verify))["dedup"]
    assert _kept(out_a) | _kept(out_b) == _kept(joint)
    # B really was deduplicated against A: some B documents lost to A documents
    assert out_b.counts["duplicates_of_index"] > 0
    assert out_b.counts["index_docs"] == len(a)
    cl = {r["id"]: r for r in read_clusters(out_b).to_pylist()}
    assert any(r["winner_from_index"] and r["id"].startswith("cc") for r in cl.values())
    m = DedupIndex(index).manifest()
    assert [s["input"] for s in m["segments"]] == [ds_a.fingerprint, ds_b.fingerprint]
    assert m["docs"] == len(a) + len(b)

    # re-running B is idempotent: same base state -> same fingerprint -> cached, index unchanged
    n_lines = len(exec_log.read_text().splitlines())
    again = run_dedup(store, ds_b, cfg)["dedup"]
    assert again.path == out_b.path
    assert len(exec_log.read_text().splitlines()) == n_lines
    assert DedupIndex(index).manifest() == m


def test_index_parameters_must_match(tmp_path, planted):
    rows, _ = planted
    store = Store(tmp_path / "w")
    index = str(tmp_path / "index")
    run_dedup(store, docs_dataset(store, rows[:40], name="s1", parts=1), DedupConfig(index=index))
    with pytest.raises(IndexMismatch):
        run_dedup(store, docs_dataset(store, rows[40:80], name="s2", parts=1),
                  DedupConfig(index=index, bands=10, rows=10))


def test_concurrent_update_is_refused(tmp_path, planted):
    rows, _ = planted
    store = Store(tmp_path / "w")
    index = str(tmp_path / "index")
    cfg = DedupConfig(index=index)
    first = run_dedup(store, docs_dataset(store, rows[:40], name="s1", parts=1), cfg)["dedup"]
    idx = DedupIndex(index)
    # a run that started from the empty index cannot publish over the newer state
    with pytest.raises(IndexMismatch):
        idx.append(first, "some-other-input", {**first.config, "normalize": "1"}, base=[])
