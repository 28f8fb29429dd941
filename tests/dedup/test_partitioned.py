"""The partitioned global step (``lsh_bands`` shards + ``dedup``) gives byte-identical outputs to
the single-body implementation it replaced, and the same bytes whatever runs the shards.

``fixtures/single_body_outputs.json`` was produced by the single-body ``dedup`` stage (git
commit before ``lsh_bands`` existed) on the synthetic corpus below: per configuration, the sha256
of every kept-documents part, of ``clusters.parquet`` and of the index segment files, plus a
content digest of the same tables (independent of the Parquet writer). File hashes are compared
when the pyarrow version matches the fixture's; content digests always. Only the file *names*
of the fixture were updated since (``part-XXXXX.train.parquet``, ``clusters/clusters.parquet``:
the layout that loads with Hugging Face ``datasets``); the hashes are the original ones.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import docs_dataset
from refinery.tasks.dedup.stage import DedupConfig, read_clusters, run_dedup
from refinery.tasks.store import Store

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "single_body_outputs.json"
D = dt.datetime(2024, 2, 1, tzinfo=dt.timezone.utc)


def synthetic_rows(seed: int = 7, n_base: int = 300) -> list[dict]:
    """Random-word documents with planted exact copies (case/punctuation), near copies at
    several substitution rates, chains of copies, same-URL pairs, tied keep-rule values and a
    few corrupt records."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = sorted({"".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(2500)})
    rows: list[dict] = []

    def add(text, url=None, days=None, q=None):
        i = len(rows)
        rows.append({"id": f"s{i:05d}", "text": text, "url": url or f"https://ex.org/{i}", "source": "syn",
                     "crawl_date": D + dt.timedelta(days=rng.randint(0, 5) if days is None else days),
                     "metadata": json.dumps({"quality_score": round(rng.random(), 1) if q is None else q})})

    base = []
    for _ in range(n_base):
        words = [rng.choice(vocab) for _ in range(rng.randint(80, 200))]
        base.append(words)
        add(" ".join(words))
    for _ in range(40):  # exact copies up to case and punctuation
        w = rng.choice(base)
        add(" ".join(w).upper() + " !!")
    prev = None
    for k in range(150):  # near copies, some of earlier copies (chains)
        src = prev if (prev is not None and k % 5 == 0) else rng.choice(base)
        w = list(src)
        for p in rng.sample(range(len(w)), int(len(w) * rng.choice([0.005, 0.02, 0.05, 0.1, 0.2]))):
            w[p] = rng.choice(vocab)
        prev = w
        add(" ".join(w))
    for _ in range(20):  # same URL, different text
        add(" ".join(rng.choice(vocab) for _ in range(60)), url=f"http://www.Ex.org/{rng.randint(0, n_base - 1)}/")
    rows.append({"id": None, "text": "no id", "url": None, "source": "syn", "crawl_date": D, "metadata": None})
    rows.append({"id": "nul", "text": None, "url": None, "source": "syn", "crawl_date": D, "metadata": None})
    rng.shuffle(rows)
    return rows


CONFIGS = {
    "default": {},
    "verify_url": {"verify": True, "by_url": True},
    "wide_buckets": {"verify": True, "num_perm": 40, "bands": 20, "rows": 2, "keep_rule": ["-quality_score", "id"]},
}


def _digest(table: pa.Table) -> str:
    return hashlib.sha256(json.dumps(table.to_pylist(), default=str, sort_keys=True).encode()).hexdigest()


def _summary(ds) -> dict:
    files = {f["path"]: f["sha256"] for f in ds.manifest["files"]
             if f["path"].startswith(("part-", "clusters", "index/"))}
    content = {"kept": _digest(ds.read_table()), "clusters": _digest(read_clusters(ds))}
    return {"files": files, "content": content, "counts": ds.counts}


def produce(tmp: Path, map_fn=None) -> dict:
    rows = synthetic_rows()
    out = {}
    store = Store(tmp / "w")
    docs = docs_dataset(store, rows, name="syn", parts=3)
    for name, kw in CONFIGS.items():
        out[name] = _summary(run_dedup(store, docs, DedupConfig(**kw), map_fn=map_fn)["dedup"])
    # incremental: first half, then second half against the index
    cfg = DedupConfig(index=str(tmp / "index"), verify=True)
    half = len(rows) // 2
    a = docs_dataset(store, rows[:half], name="syn-a", parts=2)
    b = docs_dataset(store, rows[half:], name="syn-b", parts=2)
    out["index_a"] = _summary(run_dedup(store, a, cfg, map_fn=map_fn)["dedup"])
    out["index_b"] = _summary(run_dedup(store, b, cfg, map_fn=map_fn)["dedup"])
    return out


def _compare(got: dict, want: dict) -> None:
    same_writer = want.get("pyarrow") == pa.__version__
    for name in CONFIGS.keys() | {"index_a", "index_b"}:
        g, w = got[name], want[name]
        assert g["content"] == w["content"], name
        assert g["counts"] == w["counts"], name
        if same_writer:
            assert g["files"] == w["files"], name


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    return produce(tmp_path_factory.mktemp("seq"))


def test_matches_single_body_implementation(sequential):
    want = json.loads(FIXTURE.read_text())
    _compare(sequential, want)
    # the corpus exercises every path: drops of each kind, index wins, verification rejects
    assert want["verify_url"]["counts"]["dropped"]["url_duplicate"] > 0
    assert want["default"]["counts"]["dropped"]["exact_duplicate"] > 0
    assert want["default"]["counts"]["dropped"]["near_duplicate"] > 0
    assert want["index_b"]["counts"]["duplicates_of_index"] > 0


def test_threaded_shards_give_the_same_bytes(sequential, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        threaded = produce(tmp_path, map_fn=pool.map)
    for name in sequential:
        assert threaded[name]["files"] == sequential[name]["files"], name
        assert threaded[name]["counts"] == sequential[name]["counts"], name


def test_one_shard_per_key_with_global_pairs(tmp_path, exec_log):
    """lsh_bands runs one shard per band (and per exact/URL key); each writes exactly the pairs
    of bucketing that key over all documents; a threshold or keep-rule change reuses them."""
    import numpy as np

    from refinery.tasks.dedup.clusters import bucket_edges

    store = Store(tmp_path / "w")
    docs = docs_dataset(store, synthetic_rows(n_base=120), name="syn-small", parts=3)
    cfg = DedupConfig(verify=True, by_url=True, bands=6, rows=4, num_perm=24)
    res = run_dedup(store, docs, cfg)
    assert list(res) == ["minhash", "lsh_bands", "dedup"]
    keys = [f"b{j:02d}" for j in range(6)] + ["exact", "url"]
    lines = [ln.split() for ln in exec_log.read_text().splitlines()]
    assert [ln[2] for ln in lines if ln[0] == "lsh_bands" and len(ln) == 3] == keys
    bands, sig = res["lsh_bands"], res["minhash"]
    n = bands.counts["docs"]
    assert n == docs.counts["docs_out"]
    total = 0
    files = bands.manifest["lsh_bands"]["files"]
    assert all(bands.counts["pairs_per_key"][k] > 0 for k in files)   # no empty pairs files
    for key in keys:
        if key not in files:
            t = pa.table({"first": pa.array([], pa.int64()), "member": pa.array([], pa.int64())})
        else:
            with open(bands.file(files[key]), "rb") as f:
                t = pq.read_table(f)
        assert t.schema.types == [pa.int64(), pa.int64()]
        col = np.concatenate([np.asarray(x, dtype=np.uint64) for x in sig.read_table(
            columns=[key], files=sorted(sig.files_with_prefix("sig-"))).column(key).chunks])
        want_first, want_member = bucket_edges(col)
        assert np.array_equal(t.column("first").to_numpy(), want_first)
        assert np.array_equal(t.column("member").to_numpy(), want_member)
        assert (want_first < want_member).all() and (want_member < n).all()
        total += t.num_rows
    assert bands.counts["candidate_pairs"] == total > 0
    assert bands.counts["pairs_per_key"]["exact"] > 0 and bands.counts["pairs_per_key"]["url"] > 0
    # the clustering threshold and the keep rule (even over other fields) are not part of the
    # signatures or the pairs: only dedup reruns
    before = len(lines)
    run_dedup(store, docs, cfg.model_copy(update={"threshold": 0.9}))
    run_dedup(store, docs, cfg.model_copy(update={"keep_rule": ["-id"]}))
    assert [ln.split()[0] for ln in exec_log.read_text().splitlines()[before:]] == ["dedup", "dedup"]


if __name__ == "__main__":  # regenerate the fixture (only from the single-body implementation!)
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        res = produce(Path(d))
    res["pyarrow"] = pa.__version__
    FIXTURE.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    sys.stdout.write(json.dumps({k: v["counts"] for k, v in res.items() if k != "pyarrow"}, indent=1))
