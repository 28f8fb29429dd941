"""The ``holdout`` stage: a deterministic document-level held-out split, never trained on.

Each document gets a score in [0, 1) from a hash of its id (xxh3 of ``salt:id``); the documents
scoring below ``fraction`` are held out, topped up to ``min_docs`` or cut to ``max_docs`` by lowest
score (and never more than half of the documents). The choice depends only on the ids, not on
part order or sharding, and a document keeps its side when others are added. A document without
an ``id`` column is named ``PART:ROW`` as the tokenize stage names it.

Output: the held-out documents in the input's schema (``part-XXXXX.train.parquet``), a documents
dataset of its own that ``tokenize`` skips (its third input) and names in its manifest
(``holdout``), and that ``evaluate`` scores by default.
"""
from __future__ import annotations

import functools

import numpy as np
from pydantic import Field

from refinery.tasks.config import StrictModel
from refinery.tasks.runtime import StageOutput, stage


class HoldoutConfig(StrictModel):
    fraction: float = Field(0.005, ge=0, lt=1, description="Share of documents held out for evaluation (0 disables the split).")
    min_docs: int = Field(8, ge=0, description="Hold out at least this many documents (at most half of them).")
    max_docs: int = Field(10_000, ge=0, description="Hold out at most this many documents.")
    salt: str = Field("refinery-holdout", description="Mixed into the hash: another salt, another split.")
    id_field: str = Field("id", description="Column holding the document id.")
    text_field: str = Field("text", description="Column holding the text (documents without text are never held out).")


def doc_id(value, part: int, row: int) -> str:
    """The id the tokenize stage records: the id column's value, else ``PART:ROW``."""
    return f"{part}:{row}" if value is None else str(value)


def scores(ids: list[str], salt: str) -> np.ndarray:
    import xxhash

    h = xxhash.xxh3_64_intdigest
    return np.fromiter((h(f"{salt}:{i}".encode()) for i in ids), dtype=np.uint64, count=len(ids)) / 2.0 ** 64


def _read_ids(ds, cfg: HoldoutConfig) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, part index, row) of every document with a non-empty text."""
    import pyarrow.compute as pc

    ids, parts, rows = [], [], []
    for p, table in enumerate(ds.iter_tables()):
        names = table.column_names
        if cfg.text_field not in names:
            raise ValueError(f"{ds.path}: no '{cfg.text_field}' column (columns: {names})")
        text = table.column(cfg.text_field)
        ok = pc.fill_null(pc.greater(pc.binary_length(text) if text.type in ("binary", "large_binary")
                                     else pc.utf8_length(text), 0), False).to_numpy(zero_copy_only=False)
        col = table.column(cfg.id_field).to_pylist() if cfg.id_field in names else [None] * table.num_rows
        for r in np.flatnonzero(ok):
            if col[r] is None and cfg.id_field in names:   # no id to skip it by in tokenize
                continue
            ids.append(doc_id(col[r], p, int(r)))
            parts.append(p)
            rows.append(int(r))
    return ids, np.array(parts, dtype=np.int64), np.array(rows, dtype=np.int64)


def choose(score: np.ndarray, cfg: HoldoutConfig) -> np.ndarray:
    """Indices of the held-out documents (lowest scores first)."""
    n = len(score)
    below = int((score < cfg.fraction).sum()) if cfg.fraction > 0 else 0
    k = min(max(below, cfg.min_docs if cfg.fraction > 0 else 0), cfg.max_docs, n // 2)
    return np.argsort(score, kind="stable")[:k]


@stage("holdout", version="1")
def holdout(b, inputs, cfg: HoldoutConfig) -> StageOutput:
    """inputs = [documents dataset] -> the held-out documents."""
    import pyarrow as pa

    from refinery.tasks.card import part_name

    if len(inputs) != 1:
        raise ValueError("holdout takes one input: a documents dataset")
    docs = inputs[0]
    ids, parts, rows = _read_ids(docs, cfg)
    chosen = choose(scores(ids, cfg.salt), cfg)
    written = 0
    for p, table in enumerate(docs.iter_tables()):
        take = np.sort(rows[chosen][parts[chosen] == p])
        if not len(take):
            continue
        out = table.take(pa.array(take))
        if cfg.id_field not in out.column_names:   # keep the ids tokenize skips
            out = out.append_column(cfg.id_field, pa.array([doc_id(None, p, int(r)) for r in take], pa.string()))
        b.write_table(part_name(written), out)
        written += 1
    return StageOutput(counts={"docs_in": len(ids), "docs_out": int(len(chosen))},
                       stats={"fraction_held_out": round(len(chosen) / len(ids), 6) if ids else 0.0},
                       extra={"holdout_of": docs.path})


@functools.lru_cache(maxsize=4)
def heldout_ids(path: str, fingerprint: str, id_field: str = "id") -> frozenset[str]:
    """The ids of a holdout dataset (read once per process)."""
    from refinery.tasks.store import Dataset

    ds = Dataset.open(path)
    return frozenset(str(v) for t in ds.iter_tables(columns=[id_field]) for v in t.column(0).to_pylist())


__all__ = ["holdout", "HoldoutConfig", "heldout_ids", "choose", "scores", "doc_id"]
