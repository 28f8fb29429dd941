"""Mixing at curate time: per-source token weights or token targets, and FineWeb-2-style
rehydration by duplicate-cluster size, as two sharded stages after dedup (and after paragraph
dedup and decontamination when those run).

``mix_tally`` (sharded, one shard per documents part; inputs = [documents], plus the dedup
dataset with rehydration when the documents are a later stage's output): per document its
source, its tokens (the measure below), its rehydration copies and its sampling bucket; per part
a side table ``tally/tally-XXXXX.parquet`` of (source,
bucket, docs, tokens) summed over the documents, and in the reduce step their sum
``tally/tally.parquet``. This is all the mixture needs to know globally: sources x 65,536 buckets,
whatever the number of documents.

``mix`` (sharded, one shard per documents part; inputs = [documents, mix_tally] (+ dedup, as
for the tally)): the mixture plan is computed once from the tally (see :func:`mixture_plan`), each
shard writes every document ``copies`` times, in the input's schema.

Tokens (``measure``): ``bytes`` (default) counts ``ceil(UTF-8 bytes / 4)``, the usual ~4 bytes per
BPE token of English web text, which does not depend on spaces (code, CJK); ``words`` counts
whitespace-separated words (``len(text.split())``). Curate has no tokenizer, so the shares are
shares of this measure; a real tokenizer changes them only as far as sources differ in bytes per
token.

How a document's copies are chosen (deterministic, seeded, independent of sharding):

1. rehydration (``rehydrate: fineweb2``): a document that dedup kept as the survivor of a
   duplicate cluster of size n (dedup's ``clusters/`` side table; a document in no cluster has
   n = 1) gets ``rh = table[n]`` copies, the table being FineWeb-2's (``FINEWEB2_TABLE``, the
   entry with the largest minimum size <= n) or ``rehydrate_table``; without rehydration rh = 1.
2. the source's target: ``weights`` (shares of the output's tokens; the total is
   ``total_tokens``, default the largest mixture in which no source is repeated:
   ``min(T_s / w_s)``), ``tokens`` (a target per source) or neither (every source kept whole).
   Sources not listed are left out. With T_s the source's tokens after step 1 and G_s its target:
   every document of the source is written ``k = G_s // T_s`` whole times, and the remaining
   ``R = G_s - k T_s`` tokens come from one more copy of the documents of some buckets, where a
   document's bucket is the top 16 bits of ``xxh3_64("seed:id")`` (65,536 buckets): the buckets
   are visited in order and each is taken while it fits (``sum + t <= R``), then the smallest one
   left out is taken too when that lands closer to R (:func:`select_buckets`). So the output holds
   ``rh x (k + [bucket taken])`` copies of each document, and a source misses its target by at
   most half of the smallest bucket left out: on large data the taken buckets are a prefix but
   for a few (~T_s / 131,072 tokens off); on small data a bucket is one document and the rule
   picks documents.

Copies go to separate parts: copy r of input part i is ``part-<i>-<r>.train.parquet`` (rows in
input order), so repeated documents are never adjacent in the token stream. Rows are unchanged
(same schema, same id for every copy: the holdout split, by id, keeps all copies on one side).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from refinery.tasks.config import StrictModel
from refinery.tasks.runtime import ShardedStage, StageOutput, stage, sum_counts

BUCKET_BITS = 16
BUCKETS = 1 << BUCKET_BITS
TALLY_FILE = "tally/tally.parquet"
BYTES_PER_TOKEN = 4
# FineWeb-2's upsampling weights (github.com/huggingface/fineweb-2, README "Deduplication"): the
# smallest cluster size of each range -> copies. 1 -> 1, 2 -> 2, 3-4 -> 3, 5-99 -> 5, 100-999 -> 8,
# 1000+ -> 1 (very large clusters are assumed to be boilerplate, so they are not upsampled).
FINEWEB2_TABLE: dict[int, int] = {1: 1, 2: 2, 3: 3, 5: 5, 100: 8, 1000: 1}
MAX_COPIES = 1000


def _yaml_mapping(v: Any) -> Any:
    """``--set mix.weights='{web: 0.7, code: 0.3}'`` arrives as text (the CLI keeps a mapping typed on
    the command line as text): read it as safe YAML."""
    if not isinstance(v, str):
        return v
    import yaml

    try:
        loaded = yaml.safe_load(v) if v.strip() else {}
    except yaml.YAMLError as e:
        raise ValueError(f"not a YAML mapping: {e}") from None
    return {} if loaded is None else loaded


class MixConfig(StrictModel):
    """Per-source mixture and rehydration of the curated documents (off unless one of weights,
    tokens or rehydrate is set)."""

    weights: dict[str, float] = Field(default_factory=dict, description="Per-source shares of the output's tokens, e.g. {web: 0.7, code: 0.3} (normalised to sum 1); sources not listed are left out. Reached by seeded subsampling and, with total_tokens, repetition.")
    tokens: dict[str, int] = Field(default_factory=dict, description="Target tokens per source instead of weights, e.g. {web: 2000000, code: 500000}: a source with fewer is repeated, one with more subsampled; sources not listed are left out.")
    total_tokens: int | None = Field(None, ge=1, description="With weights: the output's total tokens (repeating sources when needed); null: the largest mixture in which no source is repeated.")
    rehydrate: Literal["none", "fineweb2"] = Field("none", description="fineweb2: repeat each document that survived a duplicate cluster of size n per the rehydration table (FineWeb-2's: 1 -> 1, 2 -> 2, 3-4 -> 3, 5-99 -> 5, 100-999 -> 8, 1000+ -> 1), before the weights or targets apply.")
    rehydrate_table: dict[int, int] = Field(default_factory=dict, description="Overrides the rehydration table: {smallest cluster size: copies}, e.g. {1: 1, 2: 2, 5: 3}; a size takes the entry with the largest key <= it; must have key 1. Empty: FineWeb-2's table.")
    measure: Literal["bytes", "words"] = Field("bytes", description="How tokens are counted without a tokenizer: bytes = ceil(UTF-8 bytes / 4); words = whitespace-separated words.")
    seed: int = Field(0, description="Seed of the subsampling (which documents fill a fractional copy).")
    text_field: str = Field("text", description="Column holding the documents' text.")

    @field_validator("weights", "tokens", "rehydrate_table", mode="before")
    @classmethod
    def _mapping_text(cls, v: Any) -> Any:
        return _yaml_mapping(v)

    @model_validator(mode="after")
    def _check(self):
        if self.weights and self.tokens:
            raise ValueError("mix: give weights or tokens, not both")
        if any(v < 0 for v in self.weights.values()) or (self.weights and sum(self.weights.values()) <= 0):
            raise ValueError(f"mix.weights: weights must be >= 0 with a positive sum, got {self.weights}")
        if any(v < 0 for v in self.tokens.values()):
            raise ValueError(f"mix.tokens: targets must be >= 0, got {self.tokens}")
        if self.total_tokens is not None and not self.weights:
            raise ValueError("mix.total_tokens applies to mix.weights (mix.tokens are absolute already)")
        if self.rehydrate_table:
            if self.rehydrate == "none":
                raise ValueError("mix.rehydrate_table is set but mix.rehydrate is none: add --set mix.rehydrate=fineweb2")
            if 1 not in self.rehydrate_table or min(self.rehydrate_table) < 1:
                raise ValueError(f"mix.rehydrate_table: keys are cluster sizes >= 1 and must include 1, "
                                 f"got {sorted(self.rehydrate_table)}")
            if any(not 0 <= c <= MAX_COPIES for c in self.rehydrate_table.values()):
                raise ValueError(f"mix.rehydrate_table: copies must be in [0, {MAX_COPIES}]")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.weights or self.tokens or self.rehydrate != "none")

    def table(self) -> list[list[int]]:
        """The rehydration table in force as sorted [smallest size, copies] pairs; [] without."""
        if self.rehydrate == "none":
            return []
        return [[int(k), int(v)] for k, v in sorted((self.rehydrate_table or FINEWEB2_TABLE).items())]


class TallyConfig(StrictModel):
    """What the tally depends on (a change of weights or targets reuses it)."""

    measure: str
    seed: int
    text_field: str
    rehydrate_table: list[list[int]]


def tally_config(cfg: MixConfig) -> TallyConfig:
    return TallyConfig(measure=cfg.measure, seed=cfg.seed, text_field=cfg.text_field, rehydrate_table=cfg.table())


# --------------------------------------------------------------------------- per document
@dataclasses.dataclass
class DocKeys:
    """Per row of one documents table: what the mixture decides by."""

    valid: np.ndarray       # bool: id, text and source present (else the row is corrupt)
    sources: list           # source name per row (None when invalid)
    tokens: np.ndarray      # int64, the measure
    rehydrate: np.ndarray   # int64, copies from the rehydration table (1 without)
    bucket: np.ndarray      # int64 in [0, BUCKETS)


def count_tokens(texts, measure: str) -> np.ndarray:
    """Tokens of each text (0 for a null): ceil(UTF-8 bytes / 4), or whitespace-separated words."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if measure == "bytes":
        n = pc.fill_null(pc.binary_length(texts), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        return (n + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    return np.fromiter((0 if t is None else len(t.split()) for t in texts.to_pylist()), dtype=np.int64,
                       count=len(texts))


def buckets(ids: list, seed: int) -> np.ndarray:
    """The sampling bucket of each id: the top BUCKET_BITS bits of xxh3_64("seed:id")."""
    import xxhash

    h = xxhash.xxh3_64_intdigest
    return np.fromiter(((h(f"{seed}:{i}".encode()) >> (64 - BUCKET_BITS)) if i is not None else 0 for i in ids),
                       dtype=np.int64, count=len(ids))


def table_copies(sizes: np.ndarray, table: list[list[int]]) -> np.ndarray:
    """Copies per cluster size: the entry with the largest smallest-size <= the size."""
    keys = np.array([k for k, _ in table], dtype=np.int64)
    vals = np.array([v for _, v in table], dtype=np.int64)
    return vals[np.searchsorted(keys, sizes, side="right") - 1]


@functools.lru_cache(maxsize=2)
def kept_cluster_sizes(path: str, fingerprint: str):
    """(ids, cluster sizes) of the documents a dedup dataset kept as the survivors of duplicate
    clusters: its ``clusters/`` side table (the dedup contract: manifest ``dedup.clusters_file``;
    columns id, kept, cluster_size). Read once per process and dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from refinery.tasks.store import Dataset

    ds = Dataset.open(path)
    if ds.stage != "dedup":
        raise ValueError(f"rehydration needs a dedup dataset, got a {ds.stage} dataset ({path})")
    name = (ds.manifest.get("dedup") or {}).get("clusters_file")
    if not name:   # no document had a duplicate
        return pa.array([], pa.string()), np.zeros(0, dtype=np.int64)
    with ds.fs.open(ds.file(name), "rb") as f:
        t = pq.read_table(f, columns=["id", "kept", "cluster_size"])
    t = t.filter(t.column("kept"))
    return t.column("id").combine_chunks().cast(pa.string()), t.column("cluster_size").to_numpy().astype(np.int64)


def cluster_sizes(ids, clusters) -> np.ndarray:
    """The cluster size of each id (1 when it is in no cluster)."""
    import pyarrow.compute as pc

    cl_ids, cl_sizes = clusters
    sizes = np.ones(len(ids), dtype=np.int64)
    if len(cl_ids):
        pos = pc.index_in(ids, value_set=cl_ids)
        found = np.asarray(pos.is_valid(), dtype=bool)
        sizes[found] = cl_sizes[pc.drop_null(pos).to_numpy().astype(np.int64)]
    return sizes


def doc_keys(table, cfg: TallyConfig, clusters=None) -> DocKeys:
    """The keys of every row of ``table`` (columns id, source and the text field)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = table.column_names
    for col in ("id", "source", cfg.text_field):
        if col not in names:
            raise ValueError(f"mix needs an {col!r} column (columns: {names})")
    text = table.column(cfg.text_field)
    if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
        raise ValueError(f"column {cfg.text_field!r} holds {text.type}, not text")
    ids = pc.cast(table.column("id"), pa.string()).combine_chunks()
    src = pc.cast(table.column("source"), pa.string()).combine_chunks()
    valid = ~(np.asarray(ids.is_null(), dtype=bool) | np.asarray(src.is_null(), dtype=bool)
              | np.asarray(text.is_null(), dtype=bool))
    id_list = ids.to_pylist()
    rh = np.ones(table.num_rows, dtype=np.int64)
    if cfg.rehydrate_table:
        rh = table_copies(cluster_sizes(ids, clusters), cfg.rehydrate_table)
    rh[~valid] = 0
    return DocKeys(valid=valid, sources=[s if ok else None for s, ok in zip(src.to_pylist(), valid)],
                   tokens=count_tokens(text, cfg.measure), rehydrate=rh, bucket=buckets(id_list, cfg.seed))


def _read_part(item: dict):
    from refinery.tasks.store import Dataset

    try:
        return next(Dataset.open(item["dataset"]).iter_tables(files=[item["file"]]))
    except Exception as e:  # noqa: BLE001 - name the unreadable part
        raise RuntimeError(f"mix: cannot read input part {item['file']}: {e}") from e


def _clusters_of(item: dict):
    return kept_cluster_sizes(*item["dedup"]) if item.get("dedup") else None


def _parts_plan(docs, extra: dict) -> list[dict]:
    """One shard per documents part."""
    return [{"name": f"part-{i:05d}", "index": i, "dataset": docs.path, "file": path, **extra}
            for i, path in enumerate(p for p in docs.files if p.endswith(".parquet"))]


def _dedup_ref(inputs, at: int) -> list[str]:
    """[path, fingerprint] of the dedup dataset whose clusters rehydration reads: the input at
    ``at``, else the documents themselves when they are dedup's output."""
    ds = inputs[at] if len(inputs) > at else inputs[0]
    if ds.stage != "dedup":
        raise ValueError("rehydration needs the dedup dataset (its clusters/ table) as an input")
    return [ds.path, ds.fingerprint]


def _by_source(sources: list, values: np.ndarray) -> dict[str, int]:
    out: dict[str, int] = {}
    for s, v in zip(sources, values.tolist()):
        if s is not None:
            out[s] = out.get(s, 0) + int(v)
    return out


# --------------------------------------------------------------------------- mix_tally
def _tally_rows(keys: DocKeys):
    """(source, bucket, docs, tokens) summed over the valid rows, rehydration copies included."""
    import pyarrow as pa

    rows = np.flatnonzero(keys.valid)
    names = sorted({keys.sources[r] for r in rows})
    code = np.array([names.index(keys.sources[r]) for r in rows], dtype=np.int64) if names else np.zeros(0, np.int64)
    key = code * BUCKETS + keys.bucket[rows]
    uniq, inv = np.unique(key, return_inverse=True)
    docs = np.zeros(len(uniq), np.int64)   # integer sums (np.bincount would go through float64)
    toks = np.zeros(len(uniq), np.int64)
    np.add.at(docs, inv, keys.rehydrate[rows])
    np.add.at(toks, inv, (keys.tokens * keys.rehydrate)[rows])
    return pa.table({"source": pa.array([names[int(c)] for c in uniq // BUCKETS], pa.string()),
                     "bucket": pa.array(uniq % BUCKETS, pa.int32()),
                     "docs": pa.array(docs, pa.int64()), "tokens": pa.array(toks, pa.int64())})


def _input_counts(keys: DocKeys) -> dict:
    c = {"docs_in": int(len(keys.valid)), "corrupt": int((~keys.valid).sum()),
         "tokens_in": int(keys.tokens[keys.valid].sum()),
         "docs_in_by_source": _by_source(keys.sources, np.ones(len(keys.valid), dtype=np.int64)),
         "tokens_in_by_source": _by_source(keys.sources, keys.tokens)}
    return c


@stage("mix_tally", version="1", sharded=True)
class MixTally(ShardedStage):
    """inputs = [documents] (+ dedup: see the module docstring) -> per (source, bucket) docs and tokens."""

    @staticmethod
    def plan(inputs, cfg: TallyConfig) -> list[dict]:
        return _parts_plan(inputs[0], {"dedup": _dedup_ref(inputs, 1) if cfg.rehydrate_table else None})

    @staticmethod
    def shard(b, item: dict, cfg: TallyConfig) -> dict:
        table = _read_part(item)
        try:
            keys = doc_keys(table, cfg, _clusters_of(item))
        except ValueError as e:
            raise ValueError(f"{item['file']}: {e}") from e
        rows = _tally_rows(keys)
        name = None
        if rows.num_rows:
            name = f"tally/tally-{item['index']:05d}.parquet"
            b.write_table(name, rows)
        counts = _input_counts(keys)
        counts["docs_rehydrated_by_source"] = _by_source(keys.sources, keys.rehydrate)
        counts["tokens_rehydrated_by_source"] = _by_source(keys.sources, keys.tokens * keys.rehydrate)
        return {"counts": counts, "tally": name}

    @staticmethod
    def reduce(b, results: list[dict], cfg: TallyConfig, inputs) -> StageOutput:
        import fsspec
        import pyarrow.parquet as pq

        sums: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for r in results:
            if not r.get("tally"):
                continue
            with fsspec.open(b.path(r["tally"]), "rb") as f:
                _add_tally(sums, pq.read_table(f))
        wrote = False
        if sums:
            b.write_table(TALLY_FILE, _merged_table(sums))
            wrote = True
        counts = sum_counts([r["counts"] for r in results])
        for k in ("docs_in", "corrupt", "tokens_in"):
            counts.setdefault(k, 0)
        return StageOutput(counts=counts, extra={"tally": TALLY_FILE if wrote else None, "bucket_bits": BUCKET_BITS})


def _add_tally(sums: dict[str, tuple[np.ndarray, np.ndarray]], t) -> None:
    """Add a tally table's rows into per-source (docs, tokens) arrays over the buckets."""
    import pyarrow.compute as pc

    for s in sorted(set(t.column("source").to_pylist())):
        part = t.filter(pc.equal(t.column("source"), s))
        docs, toks = sums.setdefault(s, (np.zeros(BUCKETS, np.int64), np.zeros(BUCKETS, np.int64)))
        bk = part.column("bucket").to_numpy().astype(np.int64)
        np.add.at(docs, bk, part.column("docs").to_numpy())
        np.add.at(toks, bk, part.column("tokens").to_numpy())


def _merged_table(sums: dict[str, tuple[np.ndarray, np.ndarray]]):
    import pyarrow as pa

    src, bk, docs, toks = [], [], [], []
    for s in sorted(sums):
        d, n = sums[s]
        nz = np.flatnonzero(d)
        src += [s] * len(nz)
        bk.append(nz)
        docs.append(d[nz])
        toks.append(n[nz])
    return pa.table({"source": pa.array(src, pa.string()),
                     "bucket": pa.array(np.concatenate(bk), pa.int32()),
                     "docs": pa.array(np.concatenate(docs), pa.int64()),
                     "tokens": pa.array(np.concatenate(toks), pa.int64())})


def read_tally(ds) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """source -> (docs per bucket, tokens per bucket) of a mix_tally dataset (rehydrated counts)."""
    import pyarrow.parquet as pq

    if ds.stage != "mix_tally":
        raise ValueError(f"expected a mix_tally dataset, got {ds.stage} ({ds.path})")
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if not ds.manifest.get("tally"):
        return out
    with ds.fs.open(ds.file(ds.manifest["tally"]), "rb") as f:
        _add_tally(out, pq.read_table(f))
    return out


# --------------------------------------------------------------------------- the plan
def select_buckets(toks: np.ndarray, want: int) -> tuple[int, list[int]]:
    """Which buckets fill ``want`` tokens (first fit, then one best step): buckets are visited in
    order and each is taken when it still fits (``sum + t <= want``); then the smallest bucket
    left out is taken too when that lands closer to ``want``. Returns (m, extra): every bucket
    below m is taken, and the buckets in ``extra`` (sorted). The sum misses ``want`` by at most
    half of the smallest bucket left out: on large data nearly all of ``want`` is a prefix of
    similar buckets; on small data a bucket is one document and the rule picks documents."""
    csum = np.cumsum(toks)
    m = int(np.searchsorted(csum > want, True))   # the first bucket that does not fit
    if m >= len(toks):
        return m, []
    acc = int(csum[m - 1]) if m else 0
    extra: list[int] = []
    smallest = m                                  # the smallest bucket left out (first of ties)
    for j in range(m + 1, len(toks)):
        t = int(toks[j])
        if not t or acc == want:
            continue
        if acc + t <= want:
            acc += t
            extra.append(j)
        elif t < toks[smallest]:
            smallest = j
    if acc + int(toks[smallest]) - want < want - acc:
        extra = sorted(extra + [smallest])
    return m, extra


def targets(available: dict[str, int], cfg: MixConfig) -> dict[str, int]:
    """Target tokens per source (after rehydration)."""
    if cfg.weights:
        total_w = sum(cfg.weights.values())
        w = {s: v / total_w for s, v in cfg.weights.items()}
        missing = sorted(s for s, v in w.items() if v > 0 and available.get(s, 0) == 0)
        if missing:
            raise ValueError(f"mix.weights: no tokens of source(s) {missing} reach the mix "
                             f"(sources found: {sorted(available)})")
        total = cfg.total_tokens or min(available[s] / v for s, v in w.items() if v > 0)
        return {s: int(round(v * total)) for s, v in w.items()}
    if cfg.tokens:
        missing = sorted(s for s, v in cfg.tokens.items() if v > 0 and available.get(s, 0) == 0)
        if missing:
            raise ValueError(f"mix.tokens: no tokens of source(s) {missing} reach the mix "
                             f"(sources found: {sorted(available)})")
        return dict(cfg.tokens)
    return dict(available)


def mixture_plan(tally: dict[str, tuple[np.ndarray, np.ndarray]], cfg: MixConfig) -> dict[str, dict]:
    """Per source: tokens available (after rehydration), target, whole copies k, the buckets taken
    for the remainder (all below take_below, and take_also) and the exact docs and tokens the mix
    will write (see the module docstring)."""
    available = {s: int(t.sum()) for s, (_, t) in tally.items()}
    goal = targets(available, cfg)
    plan = {}
    for s in sorted(set(available) | set(goal)):
        docs, toks = tally.get(s, (np.zeros(BUCKETS, np.int64), np.zeros(BUCKETS, np.int64)))
        have, want = available.get(s, 0), int(goal.get(s, 0))
        whole, rest = divmod(want, have) if have else (0, 0)
        m, extra = select_buckets(toks, rest)
        taken = int(toks[:m].sum() + toks[extra].sum()), int(docs[:m].sum() + docs[extra].sum())
        plan[s] = {"tokens_available": have, "target_tokens": want, "whole_copies": int(whole), "take_below": m,
                   "take_also": extra, "tokens_out": int(whole * have + taken[0]),
                   "docs_out": int(whole * docs.sum() + taken[1])}
    return plan


# --------------------------------------------------------------------------- mix
def _copies(keys: DocKeys, plan: dict[str, list]) -> np.ndarray:
    """rh x (k + [bucket taken]) per row; 0 for corrupt rows and sources outside the mixture
    (``plan``: source -> [k, m, extra buckets], for the sources with a target)."""
    out = np.zeros(len(keys.valid), dtype=np.int64)
    src = np.array([s if s is not None else "" for s in keys.sources], dtype=object)
    for s, (k, m, extra) in plan.items():
        rows = src == s
        taken = (keys.bucket[rows] < m) | np.isin(keys.bucket[rows], np.asarray(extra, dtype=np.int64))
        out[rows] = keys.rehydrate[rows] * (k + taken)
    return out


def _drop_reasons(keys: DocKeys, copies: np.ndarray, plan: dict[str, list[int]]) -> dict[str, int]:
    zero = copies == 0
    listed = np.array([s in plan for s in keys.sources], dtype=bool)
    return {"corrupt": int((~keys.valid).sum()),
            "not_in_mixture": int((zero & keys.valid & ~listed).sum()),
            "rehydrate_table": int((zero & listed & (keys.rehydrate == 0)).sum()),
            "subsampled": int((zero & listed & (keys.rehydrate > 0)).sum())}


@stage("mix", version="1", sharded=True)
class Mix(ShardedStage):
    """inputs = [documents, mix_tally] (+ dedup, as for the tally) -> the mixed documents."""

    @staticmethod
    def plan(inputs, cfg: MixConfig) -> list[dict]:
        if len(inputs) < 2 or inputs[1].stage != "mix_tally":
            raise ValueError("mix takes the documents and their mix_tally dataset (and dedup, to rehydrate)")
        want = tally_config(cfg).model_dump(mode="json")
        if inputs[1].config != want:
            raise ValueError(f"the mix_tally input was made with {inputs[1].config}, the mix config needs {want}")
        plan = mixture_plan(read_tally(inputs[1]), cfg)
        copies = {s: [p["whole_copies"], p["take_below"], p["take_also"]] for s, p in plan.items()
                  if p["target_tokens"] > 0}
        dedup = _dedup_ref(inputs, 2) if cfg.rehydrate != "none" else None
        return _parts_plan(inputs[0], {"copies": copies, "dedup": dedup})

    @staticmethod
    def shard(b, item: dict, cfg: MixConfig) -> dict:
        import pyarrow as pa

        from refinery.tasks.card import part_name

        table = _read_part(item)
        try:
            keys = doc_keys(table, tally_config(cfg), _clusters_of(item))
        except ValueError as e:
            raise ValueError(f"{item['file']}: {e}") from e
        copies = _copies(keys, item["copies"])
        for r in range(int(copies.max(initial=0))):   # copy r of every document, in input order
            b.write_table(part_name(item["index"], r), table.take(pa.array(np.flatnonzero(copies > r))))
        counts = _input_counts(keys)
        hist = np.bincount(copies[keys.valid]) if keys.valid.any() else np.zeros(0, np.int64)
        counts.update({"docs_out": int(copies.sum()), "tokens_out": int((keys.tokens * copies).sum()),
                       "docs_out_by_source": _by_source(keys.sources, copies),
                       "tokens_out_by_source": _by_source(keys.sources, keys.tokens * copies),
                       "dropped": _drop_reasons(keys, copies, item["copies"]),
                       "docs_by_copies": {str(c): int(n) for c, n in enumerate(hist) if n}})
        if cfg.rehydrate != "none":
            rh = np.bincount(keys.rehydrate[keys.valid]) if keys.valid.any() else np.zeros(0, np.int64)
            counts["docs_by_rehydrate_copies"] = {str(c): int(n) for c, n in enumerate(rh) if n}
        return {"counts": counts}

    @staticmethod
    def reduce(b, results: list[dict], cfg: MixConfig, inputs) -> StageOutput:
        counts = sum_counts([r["counts"] for r in results])
        for k in ("docs_in", "docs_out", "tokens_in", "tokens_out", "corrupt"):
            counts.setdefault(k, 0)
        plan = mixture_plan(read_tally(inputs[1]), cfg)
        out = counts.setdefault("tokens_out_by_source", {})
        wrong = {s: (p["tokens_out"], out.get(s, 0)) for s, p in plan.items() if p["tokens_out"] != out.get(s, 0)}
        if wrong:   # the shards and the plan read the same documents: a difference is a bug, not data
            raise RuntimeError(f"mix: tokens written differ from the plan (planned, written): {wrong}")
        total_target = sum(p["target_tokens"] for p in plan.values())
        total_out = counts["tokens_out"]
        counts["target_tokens_by_source"] = {s: p["target_tokens"] for s, p in plan.items()}
        settings = mix_settings(cfg)
        share = ({s: settings["weights"].get(s, 0.0) for s in plan} if settings["weights"] else
                 {s: p["target_tokens"] / total_target if total_target else 0.0 for s, p in plan.items()})
        counts["mixture_ppm"] = {s: round(1e6 * v) for s, v in share.items()}   # the mixture asked for
        counts["share_out_ppm"] = {s: round(1e6 * out.get(s, 0) / total_out) if total_out else 0 for s in plan}
        rows = mix_table(counts, plan)
        return StageOutput(counts=counts, stats={"table": rows},
                           extra={"mix": {**settings, "plan": plan, "bucket_bits": BUCKET_BITS}})


def mix_settings(cfg: MixConfig) -> dict:
    """The mixture as configured and resolved (weights normalised, the rehydration table in force)."""
    total_w = sum(cfg.weights.values())
    mode = "weights" if cfg.weights else "tokens" if cfg.tokens else "keep"
    return {"mode": mode, "weights": {s: v / total_w for s, v in cfg.weights.items()} if cfg.weights else {},
            "tokens": dict(cfg.tokens), "total_tokens": cfg.total_tokens, "rehydrate": cfg.rehydrate,
            "rehydrate_table": cfg.table(), "measure": cfg.measure,
            "bytes_per_token": BYTES_PER_TOKEN if cfg.measure == "bytes" else None, "seed": cfg.seed}


def mix_table(counts: dict, plan: dict) -> list[dict]:
    """One row per source: documents and tokens before and after, target and shares."""
    rows = []
    for s, p in plan.items():
        rows.append({"source": s, "docs_in": counts.get("docs_in_by_source", {}).get(s, 0),
                     "tokens_in": counts.get("tokens_in_by_source", {}).get(s, 0),
                     "tokens_rehydrated": p["tokens_available"], "target_tokens": p["target_tokens"],
                     "docs_out": counts.get("docs_out_by_source", {}).get(s, 0),
                     "tokens_out": counts.get("tokens_out_by_source", {}).get(s, 0),
                     "target_share": counts["mixture_ppm"][s] / 1e6, "share_out": counts["share_out_ppm"][s] / 1e6})
    return rows


# --------------------------------------------------------------------------- composition
def _extra_inputs(docs, dedup, cfg: MixConfig) -> list:
    """[dedup] when rehydration needs its clusters and the documents are a later stage's output."""
    if cfg.rehydrate == "none" or dedup is None or getattr(dedup, "path", dedup) == getattr(docs, "path", docs):
        return []
    return [dedup]


def mix_stages(workdir: str, docs, dedup, cfg: MixConfig, runner: Any = None) -> dict:
    """The tally, then the mixed documents; ``{}`` when the mix is off. ``dedup`` is the dedup
    dataset whose clusters rehydration reads (``docs`` may be a later stage's output)."""
    if not cfg.enabled:
        return {}
    extra = _extra_inputs(docs, dedup, cfg)
    tally = MixTally.call(workdir, [docs, *extra], tally_config(cfg), runner=runner)
    return {"mix_tally": tally, "mix": Mix.call(workdir, [docs, tally, *extra], cfg, runner=runner)}


def run_mix(store, docs, dedup, cfg: MixConfig, map_fn=None) -> dict:
    """Plain Python (tests, benches): the tally and the mixed documents."""
    extra = _extra_inputs(docs, dedup, cfg)
    tally = MixTally.run(store, [docs, *extra], tally_config(cfg), map_fn=map_fn)
    return {"mix_tally": tally, "mix": Mix.run(store, [docs, tally, *extra], cfg, map_fn=map_fn)}


__all__ = ["MixConfig", "TallyConfig", "MixTally", "Mix", "FINEWEB2_TABLE", "mix_stages", "run_mix",
           "mixture_plan", "read_tally", "doc_keys", "count_tokens", "table_copies", "tally_config", "mix_table"]
