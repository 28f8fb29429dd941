"""Every documents dataset (ingest, filter, dedup and, where the stages exist, decontaminate and
tokenize's held-out split) loads with Hugging Face ``datasets``, both ways, and gives exactly its documents: ``load_dataset(PATH)`` (through the README.md card's ``configs``) and
``load_dataset("parquet", data_dir=PATH)`` (through the file names alone).

The demo crawl is small but has what used to break this: an input file whose documents the
filter drops entirely and parts whose documents are all duplicates (zero-row parts), exclusion
and cluster side tables with other schemas. Hugging Face runs offline with its caches in tmp.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refinery.tasks.card import CARD, is_data_file
from refinery.tasks.dedup.stage import DedupConfig, read_clusters, run_dedup
from refinery.tasks.filters import FilterConfig, read_exclusions, run_filter
from refinery.tasks.ingest.stage import IngestConfig, InputSpec, doc_id, run_ingest
from refinery.tasks.store import Dataset, Store


@pytest.fixture
def hf_datasets(tmp_path, monkeypatch):
    """``datasets``, offline, caching under tmp (never the user's cache)."""
    hf = tmp_path / "hf"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(hf))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(hf / "datasets"))
    datasets = pytest.importorskip("datasets")
    # the module reads its settings once, at import: an earlier import must not leak the user's cache
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf / "datasets", raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    datasets.disable_progress_bars()
    return datasets


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> dict[str, Dataset]:
    """ingest -> filter -> dedup over a demo crawl plus one dump of pages the filter drops."""
    from refinery.tasks.demo.crawl import make_demo_crawl

    tmp = tmp_path_factory.mktemp("load_anywhere")
    make_demo_crawl(tmp / "crawl", seed=0, n_pages=60, n_files=3)
    junk = tmp / "junk.jsonl"   # one input file whose every document the filter drops
    junk.write_text("".join(json.dumps({"id": f"j{i}", "text": f"buy cheap {i}"}) + "\n" for i in range(5)))
    store = Store(tmp / "w")
    cfg = IngestConfig(inputs=[InputSpec(path=str(tmp / "crawl" / "*.warc.gz"), source="demo"),
                               InputSpec(path=str(junk), source="junk")])
    ingest = run_ingest(store, cfg)
    filt = run_filter(store, [ingest], FilterConfig())
    out = {"ingest": ingest, "filter": filt, "dedup": run_dedup(store, filt, DedupConfig())["dedup"]}
    try:  # tokenize's held-out documents: a documents dataset of its own
        from refinery.tasks.tokens.holdout import HoldoutConfig, holdout

        out["holdout"] = holdout.run(store, [out["dedup"]], HoldoutConfig(fraction=0.05))
    except ImportError:
        pass
    try:
        from refinery.tasks.decontam.stage import DecontamConfig, run_decontaminate
    except ImportError:  # the stage is optional here: tested when present
        return out
    # a "benchmark" holding three kept documents: decontaminate drops them
    bench = tmp / "bench.jsonl"
    texts = out["dedup"].read_table(columns=["text"]).column("text").to_pylist()[:3]
    bench.write_text("".join(json.dumps({"question": t}) + "\n" for t in texts))
    out["decontaminate"] = run_decontaminate(store, out["dedup"], DecontamConfig(sources=[str(bench)]))["decontaminate"]
    return out


STAGES = ["ingest", "filter", "dedup", "decontaminate", "holdout"]


def _stage(curated: dict, stage: str) -> Dataset:
    if stage not in curated:
        pytest.skip(f"no {stage} stage in this checkout")
    return curated[stage]


def _ids(table) -> list[str]:
    return table.column("id").to_pylist()


@pytest.mark.parametrize("stage", STAGES)
def test_load_dataset_gives_exactly_the_documents(curated, stage, hf_datasets, tmp_path):
    ds = _stage(curated, stage)
    want = ds.read_table()
    assert want.num_rows == ds.counts["docs_out"] > 0
    by_card = hf_datasets.load_dataset(ds.path, cache_dir=str(tmp_path / "c1"))
    by_dir = hf_datasets.load_dataset("parquet", data_dir=ds.path, cache_dir=str(tmp_path / "c2"))
    for got in (by_card, by_dir):
        assert list(got) == ["train"]
        train = got["train"]
        assert train.num_rows == ds.counts["docs_out"]
        assert train["id"] == _ids(want)                       # same documents, same order
        assert train.column_names == want.column_names
        assert train["text"] == want.column("text").to_pylist()


@pytest.mark.parametrize("stage", STAGES)
def test_layout_parts_side_tables_and_card(curated, stage):
    ds = _stage(curated, stage)
    files = ds.manifest["files"]
    parts = [f for f in files if is_data_file(f["path"])]
    assert parts and all(f["rows"] > 0 for f in parts)        # no zero-row part
    assert [ds.file(f["path"]) for f in parts] == ds.files
    # every other table lives in a subfolder
    assert all("/" in f["path"] for f in files if f["rows"] is not None and not is_data_file(f["path"]))
    card = Path(ds.file(CARD)).read_text()
    assert CARD in {f["path"] for f in files}                 # the manifest lists the card
    front = card.split("---")[1]
    assert 'path: "part-*.parquet"' in front and "split: train" in front and "config_name: default" in front
    assert ds.fingerprint in card and f"| docs_out | {ds.counts['docs_out']:,} |" in card
    for inp in ds.manifest["inputs"]:
        assert inp["fingerprint"] in card                     # lineage


def test_zero_row_shards_write_nothing_but_count(curated):
    """The junk file's filter shard wrote no part, yet its documents are counted (as exclusions)
    and the data still lines up with the counts."""
    ingest, filt, dedup = curated["ingest"], curated["filter"], curated["dedup"]
    assert len(filt.files) < len(ingest.files)                 # the junk file's part kept nothing
    assert filt.counts["docs_in"] == ingest.counts["docs_out"]
    assert dedup.counts["docs_in"] == filt.counts["docs_out"]
    ex = read_exclusions(filt)
    junk = {doc_id("junk", f"j{i}") for i in range(5)}
    assert ex.num_rows == filt.counts["dropped"] and junk <= set(_ids(ex))
    cl = read_clusters(dedup)
    assert cl.num_rows > 0 and cl.column("kept").to_pylist().count(False) == \
        dedup.counts["docs_in"] - dedup.counts["docs_out"] - dedup.counts["dropped"]["corrupt"]


def _docs(store: Store, parts: list[list[str]]) -> Dataset:
    b = store.builder("docs", f"docs{len(parts):012d}")
    for k, texts in enumerate(parts):
        ids = [f"d{k}-{i}" for i in range(len(texts))]
        b.write_table(f"part-{k:05d}.parquet", pa.table({"id": ids, "text": texts}))
    return b.publish(version="1", config={}, inputs=[], counts={"docs_out": sum(map(len, parts))})


def test_dedup_part_of_only_duplicates_writes_no_part(tmp_path, hf_datasets):
    texts = ["alpha beta gamma delta epsilon zeta eta theta", "one two three four five six seven eight"]
    store = Store(tmp_path / "w")
    out = run_dedup(store, _docs(store, [texts, [t.upper() for t in texts]]), DedupConfig())["dedup"]
    assert [f["path"] for f in out.manifest["files"] if f["path"].startswith("part-")] == ["part-00000.train.parquet"]
    assert out.counts["docs_out"] == 2 and out.counts["dropped"]["exact_duplicate"] == 2
    assert hf_datasets.load_dataset(out.path, cache_dir=str(tmp_path / "c"))["train"]["id"] == ["d0-0", "d0-1"]


def test_dedup_without_duplicates_writes_no_clusters_table(tmp_path):
    store = Store(tmp_path / "w")
    texts = ["alpha beta gamma delta epsilon zeta eta theta", "one two three four five six seven eight"]
    out = run_dedup(store, _docs(store, [texts]), DedupConfig())["dedup"]
    assert out.counts["docs_out"] == 2 and out.manifest["dedup"]["clusters_file"] is None
    assert not any(f["path"].startswith("clusters") for f in out.manifest["files"])
    assert read_clusters(out).num_rows == 0 and "cluster_id" in read_clusters(out).column_names
    assert pq.read_table(out.files[0]).num_rows == 2


def test_card_is_deterministic_and_keeps_a_stages_own_readme(tmp_path):
    """Two builds of one fingerprint in different places write the same card bytes (it names no
    path or date); a stage's own top-level README.md (a model card) is kept; a dataset without
    parts gets a card without ``configs``; token shards get ``part-*.arrow``."""
    from refinery.tasks.card import card_text, part_name

    def build(root, **files):
        b = Store(root).builder("toy", "toy0123456789abc")
        for rel, table in files.items():
            b.write_table(rel, table)
        return b

    t = pa.table({"id": ["a", "b"], "text": ["x", "y"]})
    cards = []
    for where in ("one", "two"):
        ds = build(tmp_path / where, **{part_name(0): t}).publish(version="1", config={}, inputs=[],
                                                                  counts={"docs_out": 2, "seconds": 0.5})
        cards.append(Path(ds.file(CARD)).read_bytes())
        rec = next(f for f in ds.manifest["files"] if f["path"] == CARD)
        assert rec["card"] is True and rec["rows"] is None
    assert cards[0] == cards[1] and b"0.5" not in cards[0]            # floats and timings stay out

    b = build(tmp_path / "model")
    b.write_bytes(CARD, b"# my model\n")
    b.write_bytes("model/config.json", b"{}")
    ds = b.publish(version="1", config={}, inputs=[], counts={})
    assert Path(ds.file(CARD)).read_bytes() == b"# my model\n"

    text = card_text(stage="pretrain", fingerprint="f", code_version="v", inputs=[], counts={},
                     records=[{"path": "model/config.json", "rows": None}])
    assert "configs:" not in text.split("---")[1] and "`model/`" in text
    arrow = card_text(stage="tokenize", fingerprint="f", code_version="v", inputs=[], counts={},
                      records=[{"path": "part-00000-000.arrow", "rows": 10}, {"path": "index/docs-00000-000.arrow",
                                                                             "rows": 3}])
    assert 'path: "part-*.arrow"' in arrow
