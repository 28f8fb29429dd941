"""Decontamination: documents that share word n-grams with benchmark texts are dropped, or lose the
paragraphs that do. Two stages:

``decontam_index`` (not sharded): the benchmarks' n-gram hashes (see ngrams.py) as a dataset of its
own, ``index/ngrams.parquet`` (hash, benchmark), fingerprinted by the benchmark texts themselves
(their SHA-256 is part of its config), so it is built once and reused by every shard and every run
with the same benchmarks, whatever the documents.

``decontaminate`` (sharded, one shard per documents part; inputs = [documents, index]): the kept
documents in the input's schema (``part-XXXXX.train.parquet``; with ``policy: drop_paragraph`` the
contaminated paragraphs are cut from ``text``), and per affected document a row in
``excluded/excluded-XXXXX.parquet``: ``rule`` (decontaminate), ``reason`` (the benchmark),
``value`` (the first matched n-gram, normalised words), ``action`` (dropped | paragraphs), the
number of matched n-grams, and the original text. Counts per benchmark are in the manifest
(``counts.by_benchmark``) and in ``stats.table``.

Paragraphs are the text's lines (``\\n``); an n-gram that spans two paragraphs removes both.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Literal

from pydantic import Field

from refinery.tasks.config import StrictModel
from refinery.tasks.runtime import ShardedStage, StageOutput, stage, sum_counts

EXCLUDED_DIR = "excluded"
INDEX_FILE = "index/ngrams.parquet"


class DecontamConfig(StrictModel):
    sources: list[str] = Field(default_factory=list, description="Benchmarks: JSONL/JSON files, lm-eval task YAML files or lm-eval task names; the stage runs when this is not empty.")
    fields: list[str] = Field(default_factory=list, description="Fields read from benchmark files (default: every string field).")
    n: int = Field(13, ge=1, description="n-gram length in normalised words (13: the GPT-3 / datatrove convention).")
    policy: Literal["drop", "drop_paragraph"] = Field("drop", description="drop: the whole document; drop_paragraph: only the paragraphs (lines) holding a benchmark n-gram.")
    text_field: str = Field("text", description="Column holding the documents' text.")


class BenchmarkSource(StrictModel):
    name: str
    source: str


class IndexConfig(StrictModel):
    n: int
    fields: list[str]
    sources: list[BenchmarkSource]
    texts_sha256: str = Field(description="SHA-256 of the benchmark texts: the index's identity.")


# --------------------------------------------------------------------------- the index
def _named_texts(sources: list[BenchmarkSource], fields: list[str]) -> list[tuple[str, list[str]]]:
    from refinery.tasks.decontam.benchmarks import benchmark_texts

    return [(s.name, benchmark_texts(s.source, fields)) for s in sources]


def index_config(cfg: DecontamConfig) -> IndexConfig:
    """Resolve the sources and hash their texts (read once more when the index is built)."""
    import os

    from refinery.tasks.decontam.benchmarks import source_name, texts_digest

    srcs = []
    for s in (x.strip() for x in cfg.sources):
        if s:
            local = os.path.abspath(s) if os.path.exists(s) else s
            srcs.append(BenchmarkSource(name=source_name(local), source=local))
    names = [s.name for s in srcs]
    if len(set(names)) != len(names):
        raise ValueError(f"decontaminate.sources: two benchmarks share a name: {names}")
    return IndexConfig(n=cfg.n, fields=cfg.fields, sources=srcs,
                       texts_sha256=texts_digest(_named_texts(srcs, cfg.fields)))


@stage("decontam_index", version="1")
def decontam_index(b, inputs, cfg: IndexConfig) -> StageOutput:
    """The benchmarks' n-gram hashes (no inputs: the benchmarks are in the config)."""
    import numpy as np
    import pyarrow as pa

    from refinery.tasks.decontam.benchmarks import texts_digest
    from refinery.tasks.decontam.ngrams import NgramIndex, ngram_hashes, word_hashes, words

    t0 = time.perf_counter()
    named = _named_texts(cfg.sources, cfg.fields)
    if texts_digest(named) != cfg.texts_sha256:
        raise ValueError("the benchmark texts changed while the index was being planned; run again")
    per: list[tuple[str, list]] = []
    rows: list[dict[str, Any]] = []
    for name, texts in named:
        arrays, short = [], 0
        for t in texts:
            h = ngram_hashes(word_hashes(words(t)), cfg.n)
            short += int(len(h) == 0)
            arrays.append(h)
        per.append((name, arrays))
        distinct = len(np.unique(np.concatenate(arrays))) if arrays else 0
        rows.append({"benchmark": name, "texts": len(texts), "too_short": short, "ngrams": int(distinct)})
    index = NgramIndex.build(cfg.n, per)
    b.write_table(INDEX_FILE, pa.table({"hash": pa.array(index.hashes, pa.uint64()),
                                        "benchmark": pa.array(index.bench, pa.uint16())}))
    counts = {"benchmarks": len(per), "texts": sum(r["texts"] for r in rows), "ngrams": len(index.hashes)}
    return StageOutput(counts=counts,
                       stats={"build_seconds": round(time.perf_counter() - t0, 3), "index_bytes": index.nbytes,
                              "bytes_per_ngram": round(index.nbytes / max(1, len(index.hashes)), 2)},
                       extra={"benchmarks": rows, "names": index.names, "n": cfg.n, "index": INDEX_FILE})


@functools.lru_cache(maxsize=2)
def load_index(path: str, fingerprint: str):
    """The index of a decontam_index dataset (read once per process and fingerprint)."""
    import numpy as np
    import pyarrow.parquet as pq

    from refinery.tasks.decontam.ngrams import NgramIndex
    from refinery.tasks.store import Dataset

    ds = Dataset.open(path)
    with ds.fs.open(ds.file(ds.manifest["index"]), "rb") as f:
        t = pq.read_table(f)
    return NgramIndex(ds.manifest["n"], t.column("hash").to_numpy().astype(np.uint64),
                      t.column("benchmark").to_numpy().astype(np.uint16), list(ds.manifest["names"]))


# --------------------------------------------------------------------------- documents
def scan_text(text: str, index, n: int) -> tuple[list[int], list[tuple[int, int]], list[str]]:
    """The normalised words of ``text``, the paragraph (line) of each, and the matches: (position
    of the n-gram's first word, benchmark index) for every n-gram found in the index."""
    from refinery.tasks.decontam.ngrams import ngram_hashes, word_hashes, words

    ws, para = [], []
    for k, line in enumerate(text.split("\n")):
        w = words(line)
        ws += w
        para += [k] * len(w)
    hs = ngram_hashes(word_hashes(ws), n)
    bench = index.lookup(hs)
    hits = [(int(i), int(bench[i])) for i in (bench >= 0).nonzero()[0]]
    return para, hits, ws


def decontaminate_table(table, index, cfg: DecontamConfig) -> tuple[Any, list[dict], dict]:
    """Kept documents (texts cut in drop_paragraph mode), exclusion rows, counts."""
    import pyarrow as pa

    names = table.column_names
    if cfg.text_field not in names:
        raise ValueError(f"no '{cfg.text_field}' column (columns: {names})")
    texts = table.column(cfg.text_field).to_pylist()
    ids = table.column("id").to_pylist() if "id" in names else [None] * len(texts)
    urls = table.column("url").to_pylist() if "url" in names else [None] * len(texts)
    keep, new_texts, excluded = [], list(texts), []
    by_bench: dict[str, int] = {}
    c: dict[str, Any] = {"docs_in": len(texts), "docs_out": 0, "dropped": 0, "modified": 0, "paragraphs_removed": 0,
         "ngrams_matched": 0}
    for r, text in enumerate(texts):
        if not text:
            keep.append(r)
            continue
        para, hits, ws = scan_text(text, index, cfg.n)
        if not hits:
            keep.append(r)
            continue
        first_pos, first_bench = hits[0]
        name = index.names[first_bench]
        by_bench[name] = by_bench.get(name, 0) + 1
        c["ngrams_matched"] += len(hits)
        action = "dropped"
        if cfg.policy == "drop_paragraph":
            bad = {para[i + j] for i, _ in hits for j in range(cfg.n)}
            lines = text.split("\n")
            rest = [ln for k, ln in enumerate(lines) if k not in bad]
            c["paragraphs_removed"] += len(bad)
            if any(ln.strip() for ln in rest):
                action = "paragraphs"
                new_texts[r] = "\n".join(rest)
                keep.append(r)
                c["modified"] += 1
        if action == "dropped":
            c["dropped"] += 1
        excluded.append({"id": ids[r], "url": urls[r], "rule": "decontaminate", "reason": name,
                         "value": " ".join(ws[first_pos:first_pos + cfg.n]), "action": action,
                         "matches": len(hits), "text": text})
    kept = table.take(pa.array(keep, pa.int64()))
    if cfg.policy == "drop_paragraph" and c["modified"]:
        col = names.index(cfg.text_field)
        kept = kept.set_column(col, cfg.text_field,
                               pa.array([new_texts[r] for r in keep], type=table.schema.field(cfg.text_field).type))
    c["docs_out"] = kept.num_rows
    c["by_benchmark"] = by_bench
    return kept, excluded, c


def _excluded_table(rows: list[dict]):
    import pyarrow as pa

    schema = pa.schema([("id", pa.string()), ("url", pa.string()), ("rule", pa.string()), ("reason", pa.string()),
                        ("value", pa.string()), ("action", pa.string()), ("matches", pa.int64()),
                        ("text", pa.string())])
    return pa.table({f.name: pa.array([None if r[f.name] is None else r[f.name] if f.name == "matches"
                                       else str(r[f.name]) for r in rows], f.type) for f in schema}, schema=schema)


def table_rows(counts: dict, names: list[str]) -> list[dict]:
    """One row per benchmark: documents affected (and its share of the input)."""
    docs_in = counts.get("docs_in", 0) or 0
    by = counts.get("by_benchmark", {})
    return [{"benchmark": n, "documents": by.get(n, 0),
             "pct_of_input": round(100.0 * by.get(n, 0) / docs_in, 4) if docs_in else 0.0} for n in names]


@stage("decontaminate", version="1", sharded=True)
class Decontaminate(ShardedStage):
    """inputs = [documents dataset, decontam_index dataset]."""

    @staticmethod
    def plan(inputs, cfg: DecontamConfig) -> list[dict]:
        if len(inputs) != 2 or inputs[1].stage != "decontam_index":
            raise ValueError("decontaminate takes two inputs: a documents dataset and a decontam_index dataset")
        docs, index = inputs
        return [{"name": f"part-{i:05d}", "index": i, "dataset": docs.path, "file": path,
                 "ngram_index": index.path, "ngram_fp": index.fingerprint}
                for i, path in enumerate(p for p in docs.files if p.endswith(".parquet"))]

    @staticmethod
    def shard(b, item: dict, cfg: DecontamConfig) -> dict:
        from refinery.tasks.card import part_name
        from refinery.tasks.store import Dataset

        index = load_index(item["ngram_index"], item["ngram_fp"])
        if index.n != cfg.n:
            raise ValueError(f"the n-gram index has n={index.n}, the config n={cfg.n}")
        try:
            table = next(Dataset.open(item["dataset"]).iter_tables(files=[item["file"]]))
        except Exception as e:
            raise RuntimeError(f"decontaminate: cannot read input part {item['file']}: {e}") from e
        t0 = time.perf_counter()
        try:
            kept, excluded, counts = decontaminate_table(table, index, cfg)
        except ValueError as e:
            raise ValueError(f"{item['file']}: {e}") from e
        seconds = time.perf_counter() - t0
        if kept.num_rows:
            b.write_table(part_name(item["index"]), kept)
        if excluded:
            b.write_table(f"{EXCLUDED_DIR}/excluded-{item['index']:05d}.parquet", _excluded_table(excluded))
        return {"counts": counts, "seconds": seconds}

    @staticmethod
    def reduce(b, results: list[dict], cfg: DecontamConfig, inputs) -> StageOutput:
        counts = sum_counts([r["counts"] for r in results])
        names = list(inputs[1].manifest.get("names", []))
        counts["by_benchmark"] = {n: counts.get("by_benchmark", {}).get(n, 0) for n in names}
        for k in ("docs_in", "docs_out", "dropped", "modified", "paragraphs_removed", "ngrams_matched"):
            counts.setdefault(k, 0)
        seconds = sum(r.get("seconds", 0.0) for r in results)
        rows = table_rows(counts, names)
        return StageOutput(counts=counts,
                           stats={"scan_seconds": round(seconds, 3), "table": rows,
                                  "docs_per_sec": round(counts["docs_in"] / seconds, 1) if seconds else None},
                           extra={"benchmarks": names, "policy": cfg.policy, "n": cfg.n})


def decontam_stages(workdir: str, docs, cfg: DecontamConfig, runner: Any = None) -> dict:
    """The index (built or found), then the decontaminated documents; ``{}`` without sources."""
    if not any(s.strip() for s in cfg.sources):
        return {}
    index = decontam_index.call(workdir, [], index_config(cfg), runner=runner)
    return {"decontam_index": index, "decontaminate": Decontaminate.call(workdir, [docs, index], cfg, runner=runner)}


def run_decontaminate(store, docs, cfg: DecontamConfig, map_fn=None) -> dict:
    """Plain Python (tests, benches): the index and the decontaminated documents."""
    index = decontam_index.run(store, [], index_config(cfg))
    return {"decontam_index": index, "decontaminate": Decontaminate.run(store, [docs, index], cfg, map_fn=map_fn)}


def read_exclusions(ds):
    """The excluded/ side table of a decontaminate dataset (empty when nothing matched)."""
    import pyarrow as pa

    files = [ds.file(f["path"]) for f in ds.manifest.get("files", [])
             if f["path"].startswith(f"{EXCLUDED_DIR}/") and f["path"].endswith(".parquet")]
    return ds.read_table(files=files) if files else pa.table({})


__all__ = ["DecontamConfig", "decontam_index", "Decontaminate", "decontam_stages", "run_decontaminate",
           "read_exclusions", "decontaminate_table", "index_config", "load_index", "table_rows"]
