"""Dedup stages: ``minhash`` (sharded: signatures and band keys per input part), ``lsh_bands``
(sharded: one task per LSH band / exact / URL key, which buckets that key over all documents and
writes its candidate pairs) then ``dedup`` (global: union-find over the pairs, band by band,
verification, keep rule, kept documents + clusters for audit).

Outputs of ``dedup``: the kept documents in the input's schema (``part-XXXXX.train.parquet``, one
per input part that keeps any document), the audit table in the ``clusters/`` side folder (see
:func:`read_clusters`) and, with ``index``, the segment files under ``index/``.

Semantics
---------
- A *cluster* is a connected component of the graph whose edges are: documents with the same
  normalized text (``exact``), the same normalized URL (``by_url``), or a shared MinHash LSH
  bucket in any band (verified by exact shingle Jaccard >= ``threshold`` when ``verify``).
- One document per cluster is kept: the first by ``keep_rule`` (default: earliest
  ``crawl_date``, then highest ``quality_score``, then smallest ``id``; nulls sort last; the
  global document number breaks any remaining tie).
- Incremental (``index``): documents in the index (all documents of earlier runs, kept or not)
  take part in the clustering, and the index's *kept* documents always win: a new document in a
  cluster with an earlier-kept document is dropped, and earlier-kept documents are never
  un-kept. Clusters are computed from the same pairwise edges as a joint run, so adding snapshot
  B after A gives exactly the kept set of one run over A+B whenever every A document sorts before
  every B document in the keep rule (crawl dates in snapshot order) and no B document bridges two
  clusters that A kept separately (a joint run would then keep one of the two A documents; the
  incremental run cannot retract a published one and keeps both).

Memory
------
The signature stage holds one input batch at a time. An ``lsh_bands`` shard holds one key column
of all documents, its sort scratch and that key's candidate pairs:
``peak ~ 26 bytes x documents + 32 bytes x pairs of that key``, whatever the number of bands or
workers (shards run in parallel, each in its own bound). The ``dedup`` stage holds nothing per
document of the crawl, only per document in a candidate pair: its union-find is compacted to the
documents that appear in some pair (a singleton never enters it), it reads one key's pairs at a
time and builds the kept-documents mask one input part at a time:
``peak ~ 32 bytes x documents in pairs + 48 bytes x pairs of one key`` (+ the ids and keep-rule
keys of documents in non-singleton clusters, + one input part). Signatures on disk:
``documents x (4 x num_perm + 8 x (bands + 2))`` bytes; candidate pairs: ~16 bytes per pair
before compression.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator
from refinery.tasks.config import StrictModel

from refinery.tasks.card import part_name
from refinery.tasks.runtime import ShardedStage, StageOutput, stage, sum_counts
from refinery.tasks.store import Dataset, Store

BATCH = 2048


class DedupConfig(StrictModel):
    """Exact and MinHash LSH near-duplicate removal (defaults: FineWeb)."""

    exact: bool = Field(True, description="Drop documents whose normalized text equals a kept document's.")
    by_url: bool = Field(False, description="Also treat documents with the same normalized URL as duplicates.")
    near: bool = Field(True, description="MinHash LSH near-duplicate detection.")
    ngram: int = Field(5, ge=1, le=64, description="Word n-gram size of the shingles (FineWeb: 5).")
    num_perm: int = Field(112, ge=1, le=4096, description="MinHash permutations (FineWeb: 112).")
    bands: int = Field(14, ge=1, description="LSH bands (FineWeb: 14); a pair is a candidate when all rows of one band agree.")
    rows: int = Field(8, ge=1, le=256, description="Rows per band (FineWeb: 8). P(candidate | Jaccard s) = 1-(1-s^rows)^bands: 0.50 at s=0.69, 0.77 at 0.75, 0.92 at 0.80, 0.99 at 0.85.")
    threshold: float = Field(0.8, gt=0.0, le=1.0, description="Exact shingle Jaccard a candidate pair must reach when verify is on. 0.8 rather than FineWeb's nominal 0.75 so that 14x8 bands detect >= 95% of pairs at threshold+0.05 (0.99 at 0.85; only 0.92 at 0.80).")
    verify: bool = Field(False, description="Verify candidate pairs by exact Jaccard on shingles (removes LSH false positives).")
    keep_rule: list[str] = Field(default_factory=lambda: ["crawl_date", "-quality_score", "id"],
                                 description="Which document of a cluster is kept: sort keys, '-' for descending; a column name or a key of the JSON metadata column.")
    index: str | None = Field(None, description="Persistent index directory (path or fsspec URL): dedup against all earlier runs and add this run to it.")
    seed: int = Field(1, description="Seed of the MinHash permutations (datasketch's seed).")
    scheme: Literal["affine32", "legacy"] = Field("affine32", description="datasketch permutation scheme: affine32 (datasketch>=2 default) or legacy (mod 2^61-1).")

    @model_validator(mode="after")
    def _check(self):
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands x rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        for k in self.keep_rule:
            if not k.lstrip("-"):
                raise ValueError(f"empty keep_rule entry {k!r}")
        return self


class SignatureConfig(StrictModel):
    """What the signature shards depend on (a keep_rule or threshold change reuses them)."""
    ngram: int = 5
    num_perm: int = 112
    bands: int = 14
    rows: int = 8
    seed: int = 1
    scheme: str = "affine32"
    near: bool = True
    exact: bool = True
    by_url: bool = False
    shingles: bool = False


class DedupRunConfig(DedupConfig):
    """DedupConfig plus the index state the run deduplicates against (part of the fingerprint)."""

    index_base: list[dict] = Field(default_factory=list)


class BandsConfig(StrictModel):
    """What the ``lsh_bands`` shards depend on: the keys to bucket and the index state."""
    # not "keys": Prefect reads models with dict(model), which would call a field named keys
    key_names: list[str] = Field(default_factory=list)
    index: str | None = None
    index_base: list[dict] = Field(default_factory=list)


def bands_config(cfg: DedupRunConfig) -> BandsConfig:
    return BandsConfig(key_names=_key_names(cfg), index=cfg.index, index_base=cfg.index_base)


def signature_config(cfg: DedupConfig) -> SignatureConfig:
    return SignatureConfig(ngram=cfg.ngram, num_perm=cfg.num_perm, bands=cfg.bands, rows=cfg.rows,
                           seed=cfg.seed, scheme=cfg.scheme, near=cfg.near, exact=cfg.exact,
                           by_url=cfg.by_url, shingles=cfg.verify)


def index_params(cfg) -> dict:
    from refinery.tasks.dedup.index import NORMALIZE_VERSION

    return {"ngram": cfg.ngram, "num_perm": cfg.num_perm, "bands": cfg.bands, "rows": cfg.rows,
            "seed": cfg.seed, "scheme": cfg.scheme, "normalize": NORMALIZE_VERSION,
            "exact": cfg.exact, "by_url": cfg.by_url, "verify": cfg.verify}


# --------------------------------------------------------------------------- helpers
def _open(path: str, mode: str = "rb"):
    import fsspec

    return fsspec.open(path, mode).open()


def _band_names(cfg) -> list[str]:
    return [f"b{j:02d}" for j in range(cfg.bands)] if cfg.near else []


def _key_names(cfg) -> list[str]:
    return _band_names(cfg) + (["exact"] if cfg.exact else []) + (["url"] if cfg.by_url else [])


def normalize_url(url: str) -> str:
    """Scheme, ``www.``, fragment and trailing slash removed; host lowercased."""
    u = url.strip()
    u = u.split("#", 1)[0]
    if "://" in u:
        u = u.split("://", 1)[1]
    host, sep, rest = u.partition("/")
    host = host.lower()
    if host.startswith("www."):
        host = host[4:]
    return (host + sep + rest).rstrip("/")


def _url_keys(urls: list) -> np.ndarray:
    import xxhash

    out = np.zeros(len(urls), dtype=np.uint64)
    for i, u in enumerate(urls):
        if u:
            out[i] = xxhash.xxh3_64_intdigest(normalize_url(u).encode("utf-8", "replace")) or 1
    return out


_POS_MULT = (np.random.RandomState(0xE8AC7).randint(0, 1 << 62, 1024, dtype=np.uint64) * np.uint64(2)
             + np.uint64(1)).astype(np.uint64)


def exact_keys(h: np.ndarray, nsh: np.ndarray) -> np.ndarray:
    """64-bit key of each document's normalized word sequence, from its ordered n-gram hashes
    (consecutive overlapping n-grams determine the words). 0 = no words."""
    from refinery.tasks.dedup.normalize import fmix64

    n = len(nsh)
    out = np.zeros(n, dtype=np.uint64)
    nz = np.flatnonzero(nsh)
    if len(nz) == 0:
        return out
    starts = np.cumsum(nsh) - nsh
    pos = np.arange(len(h), dtype=np.int64) - np.repeat(starts, nsh)
    contrib = (h.astype(np.uint64) + np.uint64(1)) * _POS_MULT[pos & 1023]
    contrib ^= pos.astype(np.uint64) >> np.uint64(10)
    sums = np.add.reduceat(contrib, starts[nz])
    keys = fmix64(sums + nsh[nz].astype(np.uint64))
    keys[keys == 0] = 1
    out[nz] = keys
    return out


def _sorted_unique_lists(h: np.ndarray, nsh: np.ndarray):
    """pyarrow list<uint32> of each document's sorted unique shingle hashes."""
    import pyarrow as pa

    doc = np.repeat(np.arange(len(nsh)), nsh)
    order = np.lexsort((h, doc))
    hs, ds = h[order], doc[order]
    keep = np.ones(len(hs), dtype=bool)
    if len(hs):
        keep[1:] = (hs[1:] != hs[:-1]) | (ds[1:] != ds[:-1])
    counts = np.bincount(ds[keep], minlength=len(nsh))
    offsets = np.zeros(len(nsh) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(hs[keep], type=pa.uint32()))


def _keep_columns(batch, fields: list[str]) -> dict:
    """The keep-rule values of a record batch: column, else JSON ``metadata`` key, else null."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = batch.schema.names
    out = {}
    meta = None
    for name in fields:
        if name in names:
            col = batch.column(names.index(name))
            if pa.types.is_timestamp(col.type):  # microseconds since the epoch, whatever the unit
                col = pc.cast(pc.cast(col, pa.timestamp("us", col.type.tz), safe=False), pa.int64())
            elif pa.types.is_date(col.type):
                col = pc.cast(pc.cast(col, pa.timestamp("us")), pa.int64())
            elif pa.types.is_boolean(col.type):
                col = pc.cast(col, pa.int64())
            out[f"k_{name}"] = col
            continue
        if meta is None:
            meta = []
            if "metadata" in names:
                for m in batch.column(names.index("metadata")).to_pylist():
                    if isinstance(m, str):
                        try:
                            m = json.loads(m)
                        except ValueError:
                            m = None
                    meta.append(m if isinstance(m, dict) else {})
            else:
                meta = [{}] * batch.num_rows
        vals = [m.get(name) for m in meta]
        vals = [v if isinstance(v, (int, float, str)) and not isinstance(v, bool) else None for v in vals]
        try:
            out[f"k_{name}"] = pa.array(vals)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            out[f"k_{name}"] = pa.array([None if v is None else str(v) for v in vals], type=pa.string())
    return out


def _keep_values(path: str, fields: list[str], rows: np.ndarray) -> dict[str, list]:
    """The keep-rule values (see :func:`_keep_columns`) of rows ``rows`` (sorted positions) of one
    input part, computed batch by batch (``BATCH`` rows) over the whole batch, so a value's type
    never depends on which rows are asked for. Per field: a list of Arrow arrays (one per batch
    that holds any of the rows; their lengths add up to ``len(rows)``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out: dict[str, list] = {f: [] for f in fields}
    if not fields or len(rows) == 0:
        return {f: [pa.nulls(len(rows))] for f in fields}
    try:
        fh = _open(path)
        pf = pq.ParquetFile(fh)
    except Exception as e:  # noqa: BLE001 - name the unreadable file
        raise OSError(f"dedup: cannot read input part {path}: {e}") from e
    with fh:
        names = pf.schema_arrow.names
        wanted = [c for c in names if c in set(fields) | {"metadata"}]
        if not wanted:
            return {f: [pa.nulls(len(rows))] for f in fields}
        pos = 0
        for batch in pf.iter_batches(batch_size=BATCH, columns=wanted):
            lo, hi = np.searchsorted(rows, [pos, pos + batch.num_rows])
            if hi > lo:
                cols = _keep_columns(batch, fields)
                idx = pa.array(rows[lo:hi] - pos, type=pa.int64())
                for f in fields:
                    out[f].append(cols[f"k_{f}"].take(idx))
            pos += batch.num_rows
    if any(sum(len(a) for a in v) != len(rows) for v in out.values()):
        raise ValueError(f"dedup: {path} has fewer rows than its signatures")
    return out


def _clean_texts(mh, ids, texts):
    """``(texts with corrupt records blanked, valid mask)``: a record is corrupt when its id or
    text is null, or its text is not valid UTF-8."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        texts = texts.cast(pa.string())
    valid = ~(np.asarray(ids.is_null(), dtype=bool) | np.asarray(texts.is_null(), dtype=bool))
    try:
        pc.utf8_lower(texts)
    except pa.ArrowInvalid:
        for i in range(len(texts)):
            try:
                pc.utf8_lower(texts.slice(i, 1))
            except pa.ArrowInvalid:
                valid[i] = False
    if not valid.all():
        texts = pc.if_else(pa.array(valid), texts, pa.scalar("", texts.type))
    return texts, valid


def _signature_tables(mh, batch, cfg: SignatureConfig):
    """``(signature table, shingle lists or None, counts)`` of one record batch."""
    import pyarrow as pa

    from refinery.tasks.dedup.minhash import band_keys

    names = batch.schema.names
    for col in ("id", "text"):
        if col not in names:
            raise ValueError(f"dedup needs an {col!r} column; found {names}")
    ids = batch.column(names.index("id"))
    texts, valid = _clean_texts(mh, ids, batch.column(names.index("text")))
    h, nsh = mh.shingles(texts)
    cols: dict = {"id": ids.cast(pa.string()), "valid": pa.array(valid)}
    if cfg.near:
        sig = mh.signatures_from_shingles(h, nsh)
        bk = band_keys(sig, cfg.bands, cfg.rows, empty=nsh == 0)
        for j in range(cfg.bands):
            cols[f"b{j:02d}"] = pa.array(bk[:, j])
    if cfg.exact:
        cols["exact"] = pa.array(exact_keys(h, nsh))
    if cfg.by_url:
        urls = batch.column(names.index("url")).to_pylist() if "url" in names else [None] * batch.num_rows
        uk = _url_keys(urls)
        uk[~valid] = 0
        cols["url"] = pa.array(uk)
    if cfg.near:
        cols["nsh"] = pa.array(nsh.astype(np.int32))
        cols["sig"] = pa.FixedSizeListArray.from_arrays(pa.array(sig.reshape(-1), type=pa.uint32()), cfg.num_perm)
    shingles = _sorted_unique_lists(h, nsh) if cfg.shingles else None
    counts = {"docs": batch.num_rows, "corrupt": int((~valid).sum()),
              "empty": int(((nsh == 0) & valid).sum()), "shingles": int(nsh.sum())}
    return pa.table(cols), shingles, counts


@stage("minhash", version="2", sharded=True)
class Minhash(ShardedStage):
    """Signatures, LSH band keys and exact/URL keys of each input part (no keep-rule values: the
    ``dedup`` stage reads those from the documents, so a keep-rule change reuses this stage)."""

    @staticmethod
    def plan(inputs: list[Dataset], cfg: SignatureConfig) -> list[dict]:
        (docs,) = inputs
        return [{"name": f"sig-{i:05d}", "i": i, "file": f} for i, f in enumerate(docs.files)]

    @staticmethod
    def shard(b, item: dict, cfg: SignatureConfig) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from refinery.tasks.dedup.minhash import MinHasher

        mh = MinHasher(ngram=cfg.ngram, num_perm=cfg.num_perm, seed=cfg.seed, scheme=cfg.scheme)
        t0 = time.perf_counter()
        tables, shingles, counts = [], [], []
        try:
            f = _open(item["file"])
            pf = pq.ParquetFile(f)
        except Exception as e:  # noqa: BLE001 - name the unreadable file
            raise OSError(f"dedup: cannot read input part {item['file']}: {e}") from e
        with f:
            names = pf.schema_arrow.names
            wanted = [c for c in names if c in {"id", "text", "url"}]
            for batch in pf.iter_batches(batch_size=BATCH, columns=wanted):
                t, sh, c = _signature_tables(mh, batch, cfg)
                tables.append(t)
                counts.append(c)
                if sh is not None:
                    shingles.append(sh)
        if tables:
            table = pa.concat_tables(tables)
        else:  # an empty part still gets a (schema-complete) signature file
            empty = pa.RecordBatch.from_pydict({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())})
            table, sh, c = _signature_tables(mh, empty, cfg)
            shingles = [sh] if sh is not None else []
        b.write_table(f"sig-{item['i']:05d}.parquet", table)
        if cfg.shingles:
            lists = pa.concat_arrays(shingles) if shingles else pa.array([], pa.list_(pa.uint32()))
            b.write_table(f"shingles-{item['i']:05d}.arrow", pa.table({"shingles": lists}))
        out = sum_counts(counts) or {"docs": 0, "corrupt": 0, "empty": 0, "shingles": 0}
        out["seconds"] = round(time.perf_counter() - t0, 3)
        return out

    @staticmethod
    def reduce(b, results: list[dict], cfg: SignatureConfig, inputs) -> StageOutput:
        c = sum_counts(results)
        secs = c.pop("seconds", 0.0)
        stats = {"signature_seconds": round(secs, 3),
                 "docs_per_second": round(c.get("docs", 0) / secs, 1) if secs else None,
                 "shard_rows": [r.get("docs", 0) for r in results]}
        return StageOutput(counts={"docs_in": c.get("docs", 0), **c}, stats=stats)


# --------------------------------------------------------------------------- stage 2: global dedup
class _Source:
    """One signature table (an index segment part or a new input part) and its row range."""

    def __init__(self, sig: str, shingles: str | None, rows: int, start: int, is_index: bool):
        self.sig, self.shingles, self.rows, self.start, self.is_index = sig, shingles, rows, start, is_index

    def column(self, name: str):
        import pyarrow.parquet as pq

        with _open(self.sig) as f:
            pf = pq.ParquetFile(f)
            if name not in pf.schema_arrow.names:
                return None
            return pf.read(columns=[name]).column(0)


class _Shingles:
    """Random access to the sorted shingle sets of all documents (memory-mapped Arrow files)."""

    def __init__(self, sources: list[_Source], tmpdir: str):
        import os

        import fsspec
        import pyarrow as pa
        from fsspec.implementations.local import LocalFileSystem

        self.starts = np.array([s.start for s in sources], dtype=np.int64)
        self.parts = []
        for k, s in enumerate(sources):
            if s.shingles is None:
                raise ValueError(f"verify needs shingles, but {s.sig} has none (index built without verify?)")
            fs, p = fsspec.core.url_to_fs(s.shingles)
            local = p if isinstance(fs, LocalFileSystem) else None
            if local is None:
                local = os.path.join(tmpdir, f"shingles-{k:05d}.arrow")
                fs.get(p, local)
            table = pa.ipc.open_file(pa.memory_map(local, "r")).read_all()
            arr = table.column(0).combine_chunks() if table.num_rows else pa.array([], pa.list_(pa.uint32()))
            offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset: arr.offset + len(arr) + 1]
            values = np.frombuffer(arr.buffers()[3], dtype=np.uint32) if len(arr) and arr.buffers()[3] is not None \
                else np.zeros(0, np.uint32)
            self.parts.append((offsets, values))

    def __call__(self, i: int) -> np.ndarray:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        offsets, values = self.parts[k]
        r = i - self.starts[k]
        return values[offsets[r]:offsets[r + 1]]


def _sources(sig_ds: Dataset, index_path: str | None, index_base: list[dict]) -> list[_Source]:
    """All documents in global order: index segments first (they win ties and keep their numbers
    low), then the new parts; each with its first global document number."""
    sig_files = sorted(sig_ds.files_with_prefix("sig-"))
    sig_rows = {f["path"]: f["rows"] for f in sig_ds.manifest["files"]}
    sh_files = {f"sig-{p.rsplit('shingles-', 1)[1]}".replace(".arrow", ".parquet"): p
                for p in sig_ds.files_with_prefix("shingles-")}
    sources: list[_Source] = []
    start = 0
    if index_base:
        from refinery.tasks.dedup.index import DedupIndex

        if index_path is None:
            raise ValueError("dedup: index segments given without the index's path")
        index = DedupIndex(index_path)
    for seg in index_base:
        for f in seg["files"]:
            sources.append(_Source(index.url(f["sig"]), index.url(f["shingles"]) if f.get("shingles") else None,
                                   int(f["rows"]), start, True))
            start += int(f["rows"])
    for path in sig_files:
        name = path.rsplit("/", 1)[-1]
        rows = sig_rows[name]
        sources.append(_Source(path, sh_files.get(name), rows, start, False))
        start += rows
    return sources


def _traced(fn):
    """``(fn(), traced peak bytes or None)``; traced when ``REFINERY_DEDUP_TRACEMALLOC`` is set
    (benchmarks: numpy reports its buffers to tracemalloc)."""
    if not os.environ.get("REFINERY_DEDUP_TRACEMALLOC"):
        return fn(), None
    import tracemalloc

    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _pairs_name(key: str) -> str:
    return f"part-{key}.parquet"


# version 2: no empty pairs files
@stage("lsh_bands", version="2", sharded=True)
class LshBands(ShardedStage):
    """Candidate pairs of each LSH band (and of the exact and URL keys), one shard per key: the
    shard reads that one key column of every signature part (index segments first), sorts it and
    links each bucket member to the bucket's first member. Pairs are global document numbers."""

    @staticmethod
    def plan(inputs: list[Dataset], cfg: BandsConfig) -> list[dict]:
        (sig_ds,) = inputs
        srcs = [[s.sig, s.rows] for s in _sources(sig_ds, cfg.index, cfg.index_base)]
        return [{"name": key, "key": key, "sources": srcs} for key in cfg.key_names]

    @staticmethod
    def shard(b, item: dict, cfg: BandsConfig) -> dict:
        import pyarrow as pa

        from refinery.tasks.dedup.clusters import bucket_edges_owned

        key = item["key"]
        n = sum(int(r) for _, r in item["sources"])
        t0 = time.perf_counter()

        def work():
            keys = np.empty(n, dtype=np.uint64)
            pos = 0
            for path, rows in item["sources"]:
                try:
                    col = _Source(path, None, rows, pos, False).column(key)
                except Exception as e:  # noqa: BLE001 - name the unreadable file
                    raise OSError(f"lsh_bands: cannot read {path}: {e}") from e
                if col is None:
                    raise ValueError(f"dedup: key column {key!r} missing in {path} (index built with other settings?)")
                if len(col) != rows:
                    raise ValueError(f"lsh_bands: {path} has {len(col)} rows, expected {rows}")
                for chunk in col.chunks:
                    keys[pos: pos + len(chunk)] = np.asarray(chunk, dtype=np.uint64)
                    pos += len(chunk)
                del col
            holder = [keys]
            del keys
            return bucket_edges_owned(holder)  # frees the keys once sorted

        (first, member), traced = _traced(work)
        if len(first):  # a key without pairs writes no (empty) part; dedup reads it as no pairs
            b.write_table(_pairs_name(key), pa.table({"first": first, "member": member}), key=key)
        out = {"key": key, "docs": n, "pairs": int(len(first)),
               "memory_model_bytes": 24 * n + 32 * int(len(first)),
               "seconds": round(time.perf_counter() - t0, 3)}
        if traced is not None:
            out["traced_peak_bytes"] = int(traced)
        return out

    @staticmethod
    def reduce(b, results: list[dict], cfg: BandsConfig, inputs) -> StageOutput:
        (sig_ds,) = inputs
        srcs = _sources(sig_ds, cfg.index, cfg.index_base)
        n_total = sum(s.rows for s in srcs)
        n_index = sum(s.rows for s in srcs if s.is_index)
        pairs = {r["key"]: r["pairs"] for r in results}
        counts = {"docs": n_total, "index_docs": n_index, "keys": len(results),
                  "candidate_pairs": sum(pairs.values()), "pairs_per_key": pairs}
        traced = [r["traced_peak_bytes"] for r in results if "traced_peak_bytes" in r]
        stats = {"shard_seconds_per_key": {r["key"]: r.get("seconds") for r in results},
                 "memory_model_bytes_per_shard": max((r["memory_model_bytes"] for r in results), default=0),
                 "traced_peak_bytes_per_shard": max(traced) if traced else None}
        return StageOutput(counts=counts, stats=stats, extra={"lsh_bands": {
            "keys": [r["key"] for r in results],
            "files": {r["key"]: _pairs_name(r["key"]) for r in results if r["pairs"]},
            "docs": n_total, "index_segments": [s["name"] for s in cfg.index_base]}})


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# The dedup stage runs in named phases, each a function over small dataclasses:
#   _inputs_of      check that documents, signatures and pairs belong together (a _Run)
#   _cluster        union-find over the candidate pairs, key by key (a _Clustering)
#   _members        ids and keep-rule values of the documents in non-singleton clusters (_Members)
#   _decide         the winner of every cluster, why the others go, what is kept (a _Decisions)
#   _write_clusters / _write_parts   the audit side table, the kept documents, the index segments
#   _summary        counts and stats for the manifest
CLUSTERS_FILE = "clusters/clusters.parquet"   # a side table: a subfolder, so readers of the parts never see it
# Memory model of the clustering (per document in some candidate pair: sorted node numbers and
# union-find parents, 16 B, with the same again as scratch when a key adds nodes; per pair of the
# largest key: first and member, 16 B, plus as much for the compact numbers and find scratch).
CLUSTER_BYTES_PER_NODE = 32
CLUSTER_BYTES_PER_PAIR = 48


@dataclasses.dataclass
class _Run:
    """What one dedup run reads: the documents' parts, every signature source (index segments
    first) and where each key's candidate pairs are."""
    parts: list[str]
    sources: list[_Source]
    n_total: int
    n_index: int
    keys: list[str]
    pair_files: dict[str, str]   # key -> pairs file in the lsh_bands dataset (absent: no pairs)

    @property
    def n_new(self) -> int:
        return self.n_total - self.n_index

    @property
    def new_sources(self) -> list[_Source]:
        return self.sources[len(self.sources) - len(self.parts):]

    def new_rows(self, s: _Source) -> slice:
        """The rows of a new source among the new documents (``kept_new``, ``valid_new``)."""
        return slice(s.start - self.n_index, s.start - self.n_index + s.rows)


@dataclasses.dataclass
class _Clustering:
    """The non-singleton connected components over all documents (index and new) and how they
    were found. Only documents in a cluster of two or more are held (every other document is a
    cluster of its own): memory follows the documents in candidate pairs, not all documents."""
    involved: np.ndarray              # global numbers of the documents in non-singleton clusters, sorted
    roots: np.ndarray                 # per involved document: its cluster's root (smallest member)
    sizes: np.ndarray                 # per involved document: its cluster's size
    pair_docs: int                    # documents in any candidate pair (the union-find's nodes)
    pair_stats: dict[str, int]
    edges_by_key: dict[str, int]
    seconds: float
    traced_peak: int | None

    @classmethod
    def of(cls, nodes: np.ndarray, roots: np.ndarray, **kw: Any) -> _Clustering:
        """From the union-find's nodes and their roots: a node whose pairs were all rejected
        (verification) is a singleton and is left out."""
        from refinery.tasks.dedup.clusters import cluster_sizes

        sizes = cluster_sizes(roots, nodes)
        keep = sizes > 1
        return cls(involved=nodes[keep], roots=roots[keep], sizes=sizes[keep], pair_docs=int(len(nodes)), **kw)

    def new_clusters(self, n_index: int, n_new: int) -> dict[int, int]:
        """``{size: clusters}`` over the clusters holding a new document (a new document in no
        cluster is one of size 1), sizes ascending, zero counts left out."""
        new = self.involved >= n_index
        roots, first = np.unique(self.roots[new], return_index=True)
        hist = np.bincount(self.sizes[new][first], minlength=2)
        hist[1] = n_new - int(new.sum())
        return {sz: int(n) for sz, n in enumerate(hist) if n}


@dataclasses.dataclass
class _Members:
    """The documents in non-singleton clusters (``involved``, global numbers, sorted) and what the
    keep rule and the drop reasons need of them, as arrays (no Python object per document); plus
    how many new documents are corrupt."""
    involved: np.ndarray
    ids: Any                          # pyarrow string array
    kept_before: np.ndarray           # bool: an index document its run kept
    exact: np.ndarray                 # uint64 keys (0: none)
    url: np.ndarray
    rule_keys: list[np.ndarray]       # one float64 sort key per keep-rule entry (see _rule_key)
    corrupt: int = 0


@dataclasses.dataclass
class _Decisions:
    is_index: np.ndarray              # per involved document
    winner_pos: np.ndarray            # per involved document: position of its cluster's winner
    winner_is_self: np.ndarray
    reasons: np.ndarray               # per involved document: why it is dropped ("" = kept)
    new_inv: np.ndarray               # positions (in involved) of the new documents
    dropped: dict[str, int]


def _inputs_of(docs_ds: Dataset, sig_ds: Dataset, bands_ds: Dataset, cfg: DedupRunConfig) -> _Run:
    """Fail early when the three inputs do not describe the same documents and keys."""
    parts = docs_ds.files
    sources = _sources(sig_ds, cfg.index, cfg.index_base)
    n_new_parts = sum(not s.is_index for s in sources)
    if n_new_parts != len(parts):
        raise ValueError(f"dedup: {len(parts)} input parts but {n_new_parts} signature files in {sig_ds.path}")
    n_total = sum(s.rows for s in sources)
    meta = bands_ds.manifest.get("lsh_bands", {})
    keys = _key_names(cfg)
    if meta.get("keys") != keys or meta.get("docs") != n_total or \
            meta.get("index_segments") != [s["name"] for s in cfg.index_base]:
        raise ValueError(f"dedup: {bands_ds.path} holds the pairs of keys {meta.get('keys')} over "
                         f"{meta.get('docs')} documents; this run needs {keys} over {n_total}")
    return _Run(parts=parts, sources=sources, n_total=n_total,
                n_index=sum(s.rows for s in sources if s.is_index), keys=keys,
                pair_files={k: bands_ds.file(f) for k, f in meta["files"].items()})


def _read_pairs(run: _Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The candidate pairs of one key (a key with no pairs has no file)."""
    import pyarrow.parquet as pq

    path = run.pair_files.get(key)
    if path is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    try:
        with _open(path) as f:
            t = pq.read_table(f)
    except Exception as e:  # noqa: BLE001
        raise OSError(f"dedup: cannot read candidate pairs {path}: {e}") from e
    return t.column("first").to_numpy(), t.column("member").to_numpy()


def _cluster(run: _Run, cfg: DedupRunConfig, tmpdir) -> _Clustering:
    """Union-find over every key's pairs. Key by key, in the order of the single-pass algorithm
    (bands, exact, url): verification skips pairs already joined, so the order keeps the result
    identical to it. Only one key's pairs are in memory at a time."""
    from tqdm.auto import tqdm
    from refinery.tasks.progress import bar_disabled

    from refinery.tasks.dedup.clusters import PairUnionFind, verify_edges

    t0 = time.perf_counter()
    trace = bool(os.environ.get("REFINERY_DEDUP_TRACEMALLOC"))  # bench: measure the clustering's memory
    if trace:
        import tracemalloc

        tracemalloc.start()
    uf = PairUnionFind()   # only the documents that appear in some pair: singletons never enter it
    shingles = _Shingles(run.sources, tmpdir()) if (cfg.verify and cfg.near) else None
    pair_stats = {"candidates": 0, "verified": 0, "rejected": 0, "skipped": 0}
    edges_by_key: dict[str, int] = {}
    for name in tqdm(run.keys, desc="dedup: clustering candidate pairs", unit="key", disable=bar_disabled(), leave=False):
        first, member = _read_pairs(run, name)
        edges_by_key[name] = int(len(first))
        uf.add(first, member)
        if shingles is not None and name.startswith("b"):
            for k, v in verify_edges(first, member, uf, shingles, cfg.threshold).items():
                pair_stats[k] += v
        else:
            pair_stats["candidates"] += int(len(first))
            uf.union(first, member)
        del first, member
    nodes, roots = uf.roots()
    del uf
    seconds = time.perf_counter() - t0
    traced_peak = None
    if trace:
        traced_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return _Clustering.of(nodes, roots, pair_stats=pair_stats, edges_by_key=edges_by_key, seconds=seconds,
                          traced_peak=traced_peak)


def _members(run: _Run, clustering: _Clustering, cfg: DedupRunConfig) -> _Members:
    """Read, source by source, what deciding needs of the documents in non-singleton clusters:
    ids, the index's kept flags, exact/URL keys (for the drop reason) and keep-rule values. Index
    documents have no keep-rule values: they rank by their tier only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    involved = clustering.involved
    ids: list = []
    kept_before: list[np.ndarray] = []
    exact: list[np.ndarray] = []
    url: list[np.ndarray] = []
    rule_chunks: dict[str, list] = {f: [] for f in {k.lstrip("-") for k in cfg.keep_rule}}
    corrupt = 0
    fields = sorted(rule_chunks)
    new_part = dict(zip((s.sig for s in run.sources if not s.is_index), run.parts))
    for s in run.sources:
        lo, hi = np.searchsorted(involved, [s.start, s.start + s.rows])
        rows = involved[lo:hi] - s.start
        need = ["id", "valid"] + (["kept"] if s.is_index else []) + \
            [c for c in ("exact", "url") if getattr(cfg, "exact" if c == "exact" else "by_url")]
        with _open(s.sig) as f:
            pf = pq.ParquetFile(f)
            have = [c for c in need if c in pf.schema_arrow.names]
            t = pf.read(columns=have)
        if not s.is_index:
            corrupt += int(np.count_nonzero(~np.asarray(t.column("valid"), dtype=bool)))
        t = t.take(pa.array(rows, type=pa.int64()))
        del pf
        ids.append(t.column("id").combine_chunks())
        kept_before.append(np.asarray(t.column("kept").fill_null(False), dtype=bool) if s.is_index
                           else np.zeros(len(rows), dtype=bool))
        for name, out in (("exact", exact), ("url", url)):
            out.append(np.asarray(t.column(name), dtype=np.uint64) if name in have else np.zeros(len(rows), np.uint64))
        vals = _keep_values(new_part[s.sig], fields, rows) if not s.is_index else \
            {f: [pa.nulls(len(rows))] for f in fields}
        for f in fields:
            rule_chunks[f] += vals[f]
        del t
    keys = {f: _rule_keys(chunks) for f, chunks in rule_chunks.items()}
    return _Members(involved=involved, ids=pa.concat_arrays(ids) if ids else pa.array([], pa.string()),
                    kept_before=np.concatenate(kept_before) if kept_before else np.zeros(0, bool),
                    exact=np.concatenate(exact) if exact else np.zeros(0, np.uint64),
                    url=np.concatenate(url) if url else np.zeros(0, np.uint64),
                    rule_keys=[_rule_key(keys[k.lstrip("-")], k.startswith("-")) for k in cfg.keep_rule],
                    corrupt=corrupt)


def _rule_keys(chunks: list):
    """One keep-rule field's values over the involved documents (Arrow arrays, one per batch),
    reduced to what :func:`~refinery.tasks.dedup.clusters.sort_key` needs: ``(values, nulls)``
    with ``values`` a float64 array (numbers: their value; strings: their rank) or, for any other
    mix of types, the Python list that ``sort_key`` takes as it is."""
    import pyarrow as pa
    import pyarrow.compute as pc

    typed = [c for c in chunks if not pa.types.is_null(c.type)]
    n = sum(len(c) for c in chunks)
    if all(pa.types.is_string(c.type) or pa.types.is_large_string(c.type) for c in typed) and typed:
        col = pa.concat_arrays([c.cast(pa.large_string()) for c in chunks])
        nulls = np.asarray(col.is_null(), dtype=bool)
        # the rank of each string (nulls as ""), as np.unique's inverse: UTF-8 byte order is code point order
        rank = pc.rank(col.fill_null(""), sort_keys="ascending", tiebreaker="dense")
        return np.asarray(rank, dtype=np.float64), nulls
    if all(pa.types.is_integer(c.type) or pa.types.is_floating(c.type) for c in typed):
        vals = np.zeros(n, dtype=np.float64)
        nulls = np.ones(n, dtype=bool)
        pos = 0
        for c in chunks:
            if not pa.types.is_null(c.type):
                nulls[pos:pos + len(c)] = np.asarray(c.is_null(), dtype=bool)
                vals[pos:pos + len(c)] = np.asarray(pc.cast(c, pa.float64(), safe=False).fill_null(0.0), dtype=np.float64)
            pos += len(c)
        return vals, nulls
    return [v for c in chunks for v in c.to_pylist()], None


def _rule_key(values, descending: bool) -> np.ndarray:
    """The float64 sort key of one keep-rule entry (nulls last), from :func:`_rule_keys`: the
    same order as ``sort_key`` over the Python values."""
    from refinery.tasks.dedup.clusters import sort_key

    vals, nulls = values
    if nulls is None:
        return sort_key(vals, descending)
    key = -vals if descending else vals.copy()
    key[nulls] = np.inf
    return key


def _decide(run: _Run, clustering: _Clustering, m: _Members, cfg: DedupRunConfig) -> _Decisions:
    """One winner per cluster: earlier-kept index documents, then other index documents, then new
    documents by the keep rule (the index never un-keeps what it published). A dropped document's
    reason is the strongest link to its winner: exact, else same URL, else near."""
    from refinery.tasks.dedup.clusters import choose_winners

    involved, n_index = m.involved, run.n_index
    is_index = involved < n_index
    tier = np.where(is_index, np.where(m.kept_before, 0, 1), 2).astype(np.float64)
    keys = [tier] + m.rule_keys
    winner_pos, _ = choose_winners(clustering.roots, keys)
    winner_is_self = winner_pos == np.arange(len(involved))
    new_inv = np.flatnonzero(~is_index)

    exact_k, url_k = m.exact, m.url
    reasons = np.full(len(involved), "", dtype=object)
    dup, w = ~winner_is_self, winner_pos
    reasons[dup] = "near_duplicate"
    if cfg.by_url:
        reasons[dup & (url_k != 0) & (url_k == url_k[w])] = "url_duplicate"
    if cfg.exact:
        reasons[dup & (exact_k != 0) & (exact_k == exact_k[w])] = "exact_duplicate"
    dropped = {"exact_duplicate": 0, "url_duplicate": 0, "near_duplicate": 0, "corrupt": m.corrupt}
    for r in reasons[new_inv][dup[new_inv]]:
        dropped[r] += 1
    return _Decisions(is_index=is_index, winner_pos=winner_pos, winner_is_self=winner_is_self,
                      reasons=reasons, new_inv=new_inv, dropped=dropped)


def _write_clusters(b, clustering: _Clustering, m: _Members, d: _Decisions) -> bool:
    """The audit side table: every new document in a non-singleton cluster, its cluster (the id
    of the kept document), whether it is kept and why not. Nothing is written when no new
    document has a duplicate (see :func:`read_clusters`)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    sel = d.new_inv
    if not len(sel):
        return False
    w = d.winner_pos
    cluster_id = m.ids.take(pa.array(w[sel], pa.int64())).cast(pa.string())
    kept = pa.array(d.winner_is_self[sel])
    clusters = pa.table({
        "id": m.ids.take(pa.array(sel, pa.int64())).cast(pa.string()),
        "cluster_id": cluster_id,
        "kept": kept,
        "duplicate_of": pc.if_else(kept, pa.scalar(None, pa.string()), cluster_id),
        "reason": pa.array([r or None for r in d.reasons[sel].tolist()], pa.string()),
        "cluster_size": pa.array(clustering.sizes[sel].astype(np.int64)),
        "winner_from_index": pa.array(d.is_index[w[sel]]),
    })
    b.write_table(CLUSTERS_FILE, clusters)
    return True


def _write_parts(b, run: _Run, m: _Members, d: _Decisions, cfg: DedupRunConfig) -> int:
    """The kept documents, input part by input part, in the input's schema (a part that keeps
    nothing writes no file); with an index, every part's signature segment and kept flags (all
    documents, so later runs deduplicate against them). A document is kept when it is valid and
    wins its cluster (a document in no cluster wins its own); the mask is built one part at a
    time. Returns how many documents are kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm
    from refinery.tasks.progress import bar_disabled

    kept = 0
    for k, (part, s) in enumerate(tqdm(list(zip(run.parts, run.new_sources)), desc="dedup: writing parts",
                                       unit="part", disable=bar_disabled(), leave=False)):
        with _open(s.sig) as f:
            mask = np.asarray(pq.read_table(f, columns=["valid"]).column("valid"), dtype=bool).copy()
        lo, hi = np.searchsorted(m.involved, [s.start, s.start + s.rows])
        mask[m.involved[lo:hi] - s.start] &= d.winner_is_self[lo:hi]
        kept += int(mask.sum())
        try:
            with _open(part) as f:
                table = pq.read_table(f)
        except Exception as e:  # noqa: BLE001
            raise OSError(f"dedup: cannot read input part {part}: {e}") from e
        if table.num_rows != s.rows:
            raise ValueError(f"dedup: {part} has {table.num_rows} rows, its signatures {s.rows}")
        if mask.any():
            b.write_table(part_name(k), table.filter(pa.array(mask)))
        if cfg.index:
            with _open(s.sig) as f:
                st = pq.read_table(f, columns=["id", "valid"] + _key_names(cfg))
            b.write_table(f"index/seg-{k:05d}.parquet", st.append_column("kept", pa.array(mask)))
            if s.shingles:
                with _open(s.shingles) as src:
                    b.write_bytes(f"index/shingles-{k:05d}.arrow", src.read())
    return kept


def _summary(run: _Run, c: _Clustering, d: _Decisions, docs_out: int) -> tuple[dict, dict]:
    """Counts and stats; the cluster-size histogram covers the clusters with new documents."""
    hist = c.new_clusters(run.n_index, run.n_new)
    dup_new = ~d.winner_is_self[d.new_inv]
    counts = {"docs_in": run.n_new, "docs_out": docs_out, "dropped": d.dropped,
              "clusters": sum(n for sz, n in hist.items() if sz >= 2),
              "index_docs": run.n_index,
              "duplicates_of_index": int((dup_new & d.is_index[d.winner_pos[d.new_inv]]).sum()),
              "candidate_pairs": c.pair_stats["candidates"]}
    max_pairs = max(c.edges_by_key.values(), default=0)
    stats = {"cluster_size_histogram": {str(sz): n for sz, n in hist.items()},
             "pairs": c.pair_stats, "edges_per_key": c.edges_by_key,
             "cluster_seconds": round(c.seconds, 3), "peak_rss_mb": _peak_rss_mb(),
             "memory_model_bytes": {"per_doc_in_pairs": CLUSTER_BYTES_PER_NODE, "per_pair": CLUSTER_BYTES_PER_PAIR,
                                    "docs": run.n_total, "docs_in_pairs": c.pair_docs, "max_pairs_per_key": max_pairs,
                                    "estimate": CLUSTER_BYTES_PER_NODE * c.pair_docs + CLUSTER_BYTES_PER_PAIR * max_pairs,
                                    "measured_cluster_peak": c.traced_peak}}
    return counts, stats


# version 3: parts named part-XXXXX.train.parquet, none empty; clusters under clusters/
@stage("dedup", version="3")
def dedup(b, inputs: list[Dataset], cfg: DedupRunConfig) -> StageOutput:
    """Cluster duplicates over the input (and the index) from the ``lsh_bands`` candidate pairs,
    keep one document per cluster."""
    docs_ds, sig_ds, bands_ds = inputs
    run = _inputs_of(docs_ds, sig_ds, bands_ds, cfg)
    clustering = _cluster(run, cfg, b.tmpdir)
    members = _members(run, clustering, cfg)
    decisions = _decide(run, clustering, members, cfg)
    wrote_clusters = _write_clusters(b, clustering, members, decisions)
    docs_out = _write_parts(b, run, members, decisions, cfg)
    counts, stats = _summary(run, clustering, decisions, docs_out)
    return StageOutput(counts=counts, stats=stats, extra={"dedup": {
        "index": cfg.index, "index_segments": [s["name"] for s in cfg.index_base],
        "clusters_file": CLUSTERS_FILE if wrote_clusters else None}})


# --------------------------------------------------------------------------- composition
def run_config(cfg: DedupConfig, docs: Dataset) -> DedupRunConfig:
    from refinery.tasks.dedup.index import DedupIndex

    base: list[dict] = []
    if cfg.index:
        idx = DedupIndex(cfg.index)
        idx.check_params(index_params(cfg))
        base = idx.base_segments(docs.fingerprint)
    return DedupRunConfig(**cfg.model_dump(), index_base=base)


def dedup_stages(workdir: str | Store, docs: Dataset | str, cfg: DedupConfig, runner: Any = None,
                 prefect: bool = True, map_fn=None) -> dict[str, Dataset]:
    """Run ``minhash``, ``lsh_bands`` then ``dedup`` (then add the run to ``cfg.index``); returns
    the three datasets in that order (the last one holds the deduplicated documents).

    ``prefect=True`` (flows) runs the stages as Prefect tasks (shards through ``runner``);
    ``prefect=False`` runs them as plain Python (``map_fn`` may parallelize the shards).
    """
    from refinery.tasks.dedup.index import DedupIndex

    docs = docs if isinstance(docs, Dataset) else Dataset.open(docs)
    scfg = signature_config(cfg)
    rcfg = run_config(cfg, docs)
    bcfg = bands_config(rcfg)
    if prefect:
        root = workdir.root if isinstance(workdir, Store) else workdir
        sig = Minhash.call(root, [docs], scfg, runner=runner)
        bands = LshBands.call(root, [sig], bcfg, runner=runner)
        out = dedup.call(root, [docs, sig, bands], rcfg)
    else:
        store = workdir if isinstance(workdir, Store) else Store(workdir)
        sig = Minhash.run(store, [docs], scfg, map_fn=map_fn)
        bands = LshBands.run(store, [sig], bcfg, map_fn=map_fn)
        out = dedup.run(store, [docs, sig, bands], rcfg)
    if cfg.index:
        DedupIndex(cfg.index).append(out, docs.fingerprint, index_params(cfg),
                                     base=[s["name"] for s in rcfg.index_base])
    return {"minhash": sig, "lsh_bands": bands, "dedup": out}


def run_dedup(store: Store | str, docs: Dataset | str, cfg: DedupConfig | None = None, map_fn=None) -> dict[str, Dataset]:
    """Plain-Python entry point (tests, benchmarks): same as :func:`dedup_stages` without Prefect."""
    return dedup_stages(store, docs, cfg or DedupConfig(), prefect=False, map_fn=map_fn)


def read_clusters(ds: Dataset):
    """The audit table of a dedup dataset: id, cluster_id, kept, duplicate_of, reason,
    cluster_size, winner_from_index (no rows when no document had a duplicate)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = ds.manifest.get("dedup", {}).get("clusters_file")
    if name is None:
        return pa.table({c: pa.array([], t) for c, t in [
            ("id", pa.string()), ("cluster_id", pa.string()), ("kept", pa.bool_()), ("duplicate_of", pa.string()),
            ("reason", pa.string()), ("cluster_size", pa.int64()), ("winner_from_index", pa.bool_())]})
    with ds.fs.open(ds.file(name), "rb") as f:
        return pq.read_table(f)
