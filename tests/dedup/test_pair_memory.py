"""The global ``dedup`` step holds state for the documents in candidate pairs only (issue 30):
the union-find is compacted to them, singletons never enter it, and the clusters, survivors and
output bytes are those of a union-find over every document."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import docs_dataset
from refinery.tasks.dedup.clusters import PairUnionFind, UnionFind, cluster_sizes, verify_edges
from refinery.tasks.dedup.stage import DedupConfig, DedupRunConfig, _cluster, _Run, read_clusters, run_dedup
from refinery.tasks.store import Store
from test_partitioned import synthetic_rows


def _dense_clusters(n: int, pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    uf = UnionFind(n)
    for u, v in pairs:
        uf.union(u, v)
    return uf.roots()


def test_same_roots_as_a_union_find_over_all_documents():
    rng = np.random.default_rng(3)
    n = 50_000
    batches = []
    for _ in range(6):   # keys of different sizes, documents spread over the whole range
        k = int(rng.integers(1, 800))
        u = rng.integers(0, n, k)
        v = np.minimum(u + rng.integers(1, 5000, k), n - 1)
        batches.append((u, v))
    dense = _dense_clusters(n, batches)
    puf = PairUnionFind()
    merged = [puf.union(u, v) for u, v in batches]
    nodes, roots = puf.roots()
    assert np.array_equal(nodes, np.unique(np.concatenate([np.concatenate(b) for b in batches])))
    assert np.array_equal(roots, dense[nodes])             # same sets, same roots (smallest member)
    assert np.array_equal(puf.find(nodes), dense[nodes])
    uf = UnionFind(n)
    assert merged == [uf.union(u, v) for u, v in batches]   # same "newly joined" counts
    sizes = cluster_sizes(roots, nodes)
    assert np.array_equal(sizes, np.bincount(dense, minlength=n)[dense[nodes]])
    with pytest.raises(KeyError):
        puf.find(np.array([int(np.setdiff1d(np.arange(n), nodes)[0])]))


def test_verification_takes_the_same_decisions():
    """verify_edges only asks find/union, so the compact union-find gives the same verified sets."""
    rng = np.random.default_rng(5)
    n = 3000
    sets = {i: np.unique(rng.integers(0, 60, 40)) for i in range(n)}
    first = rng.integers(0, n - 50, 400)
    member = first + rng.integers(1, 50, 400)
    got, want = PairUnionFind(), UnionFind(n)
    got.add(first, member)
    s1 = verify_edges(first, member, got, lambda i: sets[i], 0.3)
    s2 = verify_edges(first, member, want, lambda i: sets[i], 0.3)
    assert s1 == s2 and 0 < s1["verified"] and 0 < s1["rejected"]
    nodes, roots = got.roots()
    assert np.array_equal(roots, want.roots()[nodes])


def test_clustering_memory_follows_the_documents_in_pairs(tmp_path):
    """100 million documents, 3,000 in candidate pairs: the clustering holds ~16 bytes per
    document in a pair; one array over all documents (the old union-find's parents: 800 MB)
    would fail the bound by orders of magnitude. Measured with tracemalloc, not by timing."""
    n_total = 100_000_000
    rng = np.random.default_rng(0)
    files = {}
    pair_docs = set()
    for key in ("b00", "b01", "exact"):
        first = np.sort(rng.choice(n_total - 10, 1000, replace=False))
        member = first + rng.integers(1, 10, 1000)
        pair_docs |= set(first.tolist()) | set(member.tolist())
        files[key] = str(tmp_path / f"part-{key}.parquet")
        pq.write_table(pa.table({"first": first, "member": member}), files[key])
    run = _Run(parts=[], sources=[], n_total=n_total, n_index=0, keys=["b00", "b01", "exact"], pair_files=files)
    import fsspec  # noqa: F401 - what the clustering imports, imported before the measurement
    import tqdm.auto  # noqa: F401

    tracemalloc.start()
    try:
        c = _cluster(run, DedupRunConfig(**DedupConfig(bands=2, rows=8).model_dump()), lambda: str(tmp_path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert c.pair_docs == len(pair_docs)
    assert peak < 2 * 2**20, peak                   # ~0.3 MB measured; all documents: >= 800 MB
    assert c.involved.nbytes + c.roots.nbytes + c.sizes.nbytes <= 24 * c.pair_docs
    hist = c.new_clusters(0, n_total)
    assert sum(sz * k for sz, k in hist.items()) == n_total
    assert hist[1] == n_total - len(c.involved)


@pytest.mark.parametrize("kw", [{}, {"verify": True, "by_url": True}])
def test_outputs_match_a_union_find_over_all_documents(tmp_path, kw):
    """On a corpus with exact, near and same-URL duplicates (and corrupt records): the dedup
    stage's clusters and survivors are those of a union-find over every document built from the
    same candidate pairs, and a rerun in a fresh store writes the same bytes."""
    rows = synthetic_rows()
    store = Store(tmp_path / "w")
    docs = docs_dataset(store, rows, name="syn", parts=3)
    cfg = DedupConfig(**kw)
    res = run_dedup(store, docs, cfg)
    out, bands = res["dedup"], res["lsh_bands"]
    n = bands.counts["docs"]
    pairs = []
    for name in bands.manifest["lsh_bands"]["files"].values():
        t = pq.read_table(bands.file(name))
        pairs.append((t.column("first").to_numpy(), t.column("member").to_numpy()))
    ids = np.array([r["id"] for r in rows], dtype=object)   # global number = input order here
    cl = read_clusters(out).to_pylist()
    assert cl and {r["reason"] for r in cl if not r["kept"]} >= {"exact_duplicate", "near_duplicate"}
    got = {}
    for r in cl:
        got.setdefault(r["cluster_id"], set()).add(r["id"])
    if not cfg.verify:   # without verification the clusters are exactly the pair graph's components
        dense = _dense_clusters(n, pairs)
        sizes = np.bincount(dense, minlength=n)
        want: dict = {}
        for i in np.flatnonzero(sizes[dense] > 1):
            want.setdefault(int(dense[i]), set()).add(ids[i])
        assert sorted(map(sorted, got.values())) == sorted(map(sorted, want.values()))
    kept = set(out.read_table(columns=["id"]).column("id").to_pylist())
    in_clusters = {r["id"] for r in cl}
    valid = {r["id"] for r in rows if r["id"] is not None and r["text"] is not None}
    assert kept == (valid - in_clusters) | {r["id"] for r in cl if r["kept"]}
    again = run_dedup(Store(tmp_path / "fresh"), docs, cfg)["dedup"]
    assert [(f["path"], f["sha256"]) for f in again.manifest["files"]] == \
        [(f["path"], f["sha256"]) for f in out.manifest["files"]]
    assert again.counts == out.counts
    assert again.manifest["stats"]["cluster_size_histogram"] == out.manifest["stats"]["cluster_size_histogram"]
