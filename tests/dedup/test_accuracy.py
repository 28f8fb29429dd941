"""Planted near-duplicates of known exact Jaccard in real text: recall and precision."""
from __future__ import annotations

import pytest

from helpers import docs_dataset, jaccard, shingle_set
from refinery.tasks.dedup.stage import DedupConfig, read_clusters, run_dedup
from refinery.tasks.store import Store


@pytest.mark.parametrize("verify", [False, True])
def test_recall_and_precision(tmp_path, planted, verify):
    rows, pairs = planted
    cfg = DedupConfig(verify=verify)
    out = run_dedup(Store(tmp_path), docs_dataset(Store(tmp_path), rows), cfg)["dedup"]
    clusters = {r["id"]: r for r in read_clusters(out).to_pylist()}
    cid = {i: r["cluster_id"] for i, r in clusters.items()}

    strong = [p for p in pairs if p[2] >= cfg.threshold + 0.05]
    assert len(strong) >= 40
    found = [p for p in strong if p[0] in cid and cid[p[0]] == cid.get(p[1])]
    recall = len(found) / len(strong)
    print(f"verify={verify}: recall {recall:.3f} on {len(strong)} pairs with J >= {cfg.threshold + 0.05}")
    assert recall >= 0.95

    text = {r["id"]: r["text"] for r in rows}
    detected = [(r["id"], r["duplicate_of"]) for r in clusters.values() if not r["kept"]]
    good = [d for d in detected if jaccard(shingle_set(text[d[0]]), shingle_set(text[d[1]])) >= cfg.threshold]
    precision = len(good) / len(detected)
    print(f"verify={verify}: precision {precision:.3f} on {len(detected)} dropped documents")
    if verify:
        assert precision >= 0.99
    # weak pairs (well below the threshold) are mostly left alone when verifying
    weak = [p for p in pairs if p[2] < cfg.threshold - 0.1]
    weak_found = [p for p in weak if p[0] in cid and cid[p[0]] == cid.get(p[1])]
    if verify:
        assert not weak_found
    assert out.counts["docs_in"] == len(rows)
    assert out.counts["docs_out"] == len(rows) - len(detected)
