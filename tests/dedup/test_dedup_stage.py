"""The minhash + dedup stages on the store: outputs, counts, keep rule, caching, determinism."""
from __future__ import annotations

import datetime as dt
import json

import pyarrow.parquet as pq
import pytest

from helpers import docs_dataset
from refinery.tasks.dedup.stage import DedupConfig, read_clusters, run_dedup
from refinery.tasks.store import Dataset, Store

D = dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc)


def _row(i, text, days=0, q=None, url=None):
    return {"id": i, "text": text, "url": url or f"https://site/{i}", "source": "t",
            "crawl_date": D + dt.timedelta(days=days), "metadata": json.dumps({"quality_score": q})}


def _kept(ds: Dataset) -> list[str]:
    return sorted(ds.read_table(columns=["id"]).column("id").to_pylist())


def test_outputs_counts_and_histogram(tmp_path, planted, exec_log):
    rows, pairs = planted
    store = Store(tmp_path / "w")
    docs = docs_dataset(store, rows, parts=3)
    res = run_dedup(store, docs, DedupConfig())
    sig, out = res["minhash"], res["dedup"]
    assert out.stage == "dedup" and sig.stage == "minhash"
    assert len(out.files) == 3
    table = out.read_table()
    assert table.schema == docs.read_table().schema  # same document schema
    c = out.counts
    assert c["docs_out"] == table.num_rows == c["docs_in"] - sum(c["dropped"].values())
    cl = read_clusters(out)
    assert cl.column_names[:4] == ["id", "cluster_id", "kept", "duplicate_of"]
    recs = cl.to_pylist()
    kept_ids = set(table.column("id").to_pylist())
    by_cluster: dict = {}
    for r in recs:
        by_cluster.setdefault(r["cluster_id"], []).append(r)
        assert (r["id"] in kept_ids) == r["kept"]
        assert r["duplicate_of"] == (None if r["kept"] else r["cluster_id"])
    assert all(sum(r["kept"] for r in m) == 1 for m in by_cluster.values())
    hist = out.manifest["stats"]["cluster_size_histogram"]
    assert sum(int(k) * v for k, v in hist.items()) == c["docs_in"]
    assert sum(v for k, v in hist.items() if k != "1") == c["clusters"] == len(by_cluster)
    # cached: no stage body runs again
    before = len(exec_log.read_text().splitlines())
    again = run_dedup(store, docs, DedupConfig())
    assert again["dedup"].path == out.path
    assert len(exec_log.read_text().splitlines()) == before
    # a keep-rule change reuses the signatures, recomputes the clustering only
    run_dedup(store, docs, DedupConfig(keep_rule=["crawl_date", "quality_score", "-id"]))
    new_lines = exec_log.read_text().splitlines()[before:]
    assert [ln.split()[0] for ln in new_lines] == ["dedup"]


def test_deterministic_bytes_sequential_or_threads(tmp_path, planted):
    """Same inputs and config -> byte-identical outputs, whether shards run in sequence or in
    parallel threads (the numba kernels release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    rows, _ = planted
    shas = []
    for k in range(2):
        store = Store(tmp_path / f"w{k}")
        docs = docs_dataset(store, rows[:300], parts=3)
        if k == 0:
            res = run_dedup(store, docs, DedupConfig(verify=True))
        else:
            with ThreadPoolExecutor(2) as pool:
                res = run_dedup(store, docs, DedupConfig(verify=True), map_fn=pool.map)
        shas.append({name: {f["path"]: f["sha256"] for f in ds.manifest["files"]} for name, ds in res.items()})
    assert shas[0] == shas[1]


def test_keep_rule_and_reasons(tmp_path):
    t = "the quick brown fox jumps over the lazy dog near the river bank " * 5
    rows = [
        _row("a", t, days=3, q=0.9),
        _row("b", t.upper(), days=1, q=0.1),       # earliest: wins
        _row("c", t + "!!!", days=1, q=0.2),       # same normalized text and day as b, higher quality
        _row("x", "completely different words here about cooking pasta with tomato sauce " * 4, days=9,
             url="http://www.Site/x/"),
        _row("y", "unrelated text about the weather in the mountains during winter months " * 4, days=2,
             url="https://site/x"),
    ]
    store = Store(tmp_path)
    out = run_dedup(store, docs_dataset(store, rows, parts=1), DedupConfig(by_url=True))["dedup"]
    # a, b, c share the normalized text; earliest dates: b and c, highest quality: c
    assert _kept(out) == ["c", "y"]
    cl = {r["id"]: r for r in read_clusters(out).to_pylist()}
    assert cl["a"]["duplicate_of"] == "c" and cl["a"]["reason"] == "exact_duplicate"
    assert cl["x"]["duplicate_of"] == "y" and cl["x"]["reason"] == "url_duplicate"
    assert out.counts["dropped"]["exact_duplicate"] == 2 and out.counts["dropped"]["url_duplicate"] == 1
    # tie on date and quality -> smallest id
    out2 = run_dedup(store, docs_dataset(store, rows[:3], name="d2", parts=1),
                     DedupConfig(keep_rule=["-id"]))["dedup"]
    assert _kept(out2) == ["c"]


def test_corrupt_records_are_counted_and_skipped(tmp_path):
    rows = [_row("a", "some text with enough words to make shingles of five words"),
            _row(None, "a record without an id"), _row("n", None)]
    store = Store(tmp_path)
    out = run_dedup(store, docs_dataset(store, rows, parts=1), DedupConfig())["dedup"]
    assert _kept(out) == ["a"]
    assert out.counts["dropped"]["corrupt"] == 2


def test_config_validation():
    with pytest.raises(ValueError):
        DedupConfig(bands=20, rows=8)
    with pytest.raises(ValueError):
        DedupConfig(keep_rule=["-"])
    with pytest.raises(ValueError):
        DedupConfig(nonsense=1)


def test_unreadable_part_is_named(tmp_path, planted):
    rows, _ = planted
    store = Store(tmp_path)
    docs = docs_dataset(store, rows[:20], parts=2)
    bad = docs.files[1]
    with open(bad, "wb") as f:
        f.write(b"not parquet")
    # the shard's OSError, or the runtime's summary of failed shards, names the file
    with pytest.raises((OSError, RuntimeError), match="part-00001"):
        run_dedup(store, docs, DedupConfig())


def test_parts_keep_parquet_metadata(tmp_path, planted):
    rows, _ = planted
    store = Store(tmp_path)
    out = run_dedup(store, docs_dataset(store, rows[:50], parts=2), DedupConfig())["dedup"]
    for f in out.files:
        pq.read_metadata(f)
