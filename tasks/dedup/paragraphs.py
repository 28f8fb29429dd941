"""Sub-document dedup: remove paragraphs (lines) already seen earlier in the corpus, keeping each first
occurrence, with memory bounded by a Bloom filter.

Like dolma's ``dedupe_paragraphs`` (a paragraph is a ``\\n``-separated line; seen paragraphs go into a
Bloom filter sized from an expected count and a false-positive rate), so boilerplate repeated across
pages (menus, footers, cookie banners) goes while the page keeps its own text. Memory is the filter
only: ``-n ln p / (ln 2)^2`` bits for ``n`` expected paragraphs at false-positive rate ``p`` (10^8
paragraphs at 10^-6: ~360 MB), whatever the corpus size; a false positive removes one paragraph that
was not a duplicate, with probability ``p``. Documents are processed in input order (parts, then rows)
so "first occurrence" is deterministic; that makes the stage one sequential pass.

:func:`dolma_spans` gives dolma's attribute for the same decision (``[start, end, 1]`` per duplicate
paragraph, in characters, each span counting its newline, the last one too: dolma compares a character
offset with the UTF-8 byte length), checked against dolma's expected output in the tests.
"""
from __future__ import annotations

import math
import time
from typing import Literal

import numpy as np
from pydantic import Field

from refinery.tasks.config import StrictModel
from refinery.tasks.runtime import StageOutput, stage


class BloomFilter:
    """A bit array with ``k`` hash positions per key (double hashing of one 128-bit xxhash)."""

    def __init__(self, expected_items: int, false_positive_rate: float):
        if expected_items < 1 or not 0 < false_positive_rate < 1:
            raise ValueError("BloomFilter: expected_items >= 1 and 0 < false_positive_rate < 1")
        self.m = max(64, math.ceil(-expected_items * math.log(false_positive_rate) / math.log(2) ** 2))
        self.k = max(1, round(self.m / expected_items * math.log(2)))
        self.bits = np.zeros((self.m + 7) // 8, dtype=np.uint8)

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)

    def _positions(self, key: str) -> np.ndarray:
        import xxhash

        h = xxhash.xxh3_128_intdigest(key.encode("utf-8"))
        h1, h2 = h & 0xFFFFFFFFFFFFFFFF, (h >> 64) | 1
        return np.array([(h1 + i * h2) % self.m for i in range(self.k)], dtype=np.int64)

    def __contains__(self, key: str) -> bool:
        pos = self._positions(key)
        return bool(np.all(self.bits[pos >> 3] & np.left_shift(np.uint8(1), (pos & 7).astype(np.uint8))))

    def add(self, key: str) -> bool:
        """Insert ``key``; True when it was (probably) present already."""
        pos = self._positions(key)
        byte, bit = pos >> 3, (pos & 7).astype(np.uint8)
        mask = np.left_shift(np.uint8(1), bit)
        present = bool(np.all(self.bits[byte] & mask))
        if not present:
            np.bitwise_or.at(self.bits, byte, mask)
        return present


def dolma_spans(text: str, seen) -> list[list[int]]:
    """dolma's ``bff_duplicate_paragraph_spans`` for ``text``, adding its paragraphs to ``seen`` (a set or
    a :class:`BloomFilter`)."""
    spans: list[list[int]] = []
    limit = len(text.encode("utf-8")) - 1
    off = 0
    for p in text.split("\n"):
        start = off
        off += len(p)
        if off < limit:
            off += 1
        if _seen_add(seen, p):
            spans.append([start, off, 1])
    return spans


def _seen_add(seen, key: str) -> bool:
    if isinstance(seen, BloomFilter):
        return seen.add(key)
    if key in seen:
        return True
    seen.add(key)
    return False


def dedup_text(text: str, seen, sep: str = "\n", min_chars: int = 0) -> tuple[str, int, int]:
    """(text without the paragraphs seen before, paragraphs removed, characters removed). Blank and
    shorter-than-``min_chars`` paragraphs are kept and not recorded."""
    out, removed, chars = [], 0, 0
    for p in text.split(sep):
        if len(p.strip()) >= max(1, min_chars) and _seen_add(seen, p):
            removed += 1
            chars += len(p)
            continue
        out.append(p)
    return sep.join(out).strip("\n") if removed else text, removed, chars


class ParagraphDedupConfig(StrictModel):
    enabled: bool = Field(False, description="run paragraph dedup (curate: after document dedup)")
    unit: Literal["line", "paragraph"] = Field("line", description="line: split on newlines (dolma's paragraphs); "
                                                                    "paragraph: on blank lines")
    expected_paragraphs: int = Field(10_000_000, ge=1, description="sizes the Bloom filter (memory)")
    false_positive_rate: float = Field(1e-6, gt=0, lt=1, description="chance that a new paragraph is "
                                                                      "removed as if seen")
    min_chars: int = Field(0, ge=0, description="shorter paragraphs are never removed (0 = dolma: every "
                                                "non-blank paragraph counts)")
    text_field: str = "text"


@stage("paragraph_dedup", version="1")
def paragraph_dedup(b, inputs, cfg: ParagraphDedupConfig) -> StageOutput:
    """One pass over the input documents in order: repeated paragraphs removed, documents left empty
    dropped."""
    import pyarrow as pa

    from refinery.tasks.card import part_name

    t0 = time.perf_counter()
    bloom = BloomFilter(cfg.expected_paragraphs, cfg.false_positive_rate)
    sep = "\n" if cfg.unit == "line" else "\n\n"
    counts = {"docs_in": 0, "docs_out": 0, "docs_modified": 0, "docs_emptied": 0, "paragraphs_removed": 0,
              "chars_in": 0, "chars_removed": 0}
    index = 0
    for ds in inputs:
        for path in [p for p in ds.files if p.endswith(".parquet")]:
            table = next(ds.iter_tables(files=[path]))
            texts = table.column(cfg.text_field).to_pylist()
            new, keep = [], []
            for t in texts:
                counts["docs_in"] += 1
                if not isinstance(t, str):
                    keep.append(False)
                    continue
                counts["chars_in"] += len(t)
                out, removed, chars = dedup_text(t, bloom, sep, cfg.min_chars)
                counts["paragraphs_removed"] += removed
                counts["chars_removed"] += chars
                counts["docs_modified"] += removed > 0
                if not out.strip():
                    counts["docs_emptied"] += 1
                    keep.append(False)
                    continue
                keep.append(True)
                new.append(out)
            kept = table.filter(pa.array(keep, type=pa.bool_()))
            i = kept.column_names.index(cfg.text_field)
            kept = kept.set_column(i, kept.schema.field(i), pa.array(new, type=kept.schema.field(i).type))
            counts["docs_out"] += kept.num_rows
            if kept.num_rows:
                b.write_table(part_name(index), kept)
            index += 1
    return StageOutput(counts=counts, stats={"seconds": round(time.perf_counter() - t0, 3),
                                             "bloom_bytes": bloom.nbytes, "bloom_hashes": bloom.k},
                       extra={"unit": cfg.unit})


def paragraph_stages(workdir: str, docs, cfg: ParagraphDedupConfig, runner=None) -> dict:
    """``{"paragraph_dedup": dataset}`` when enabled, else ``{}`` (for flows)."""
    if not cfg.enabled:
        return {}
    return {"paragraph_dedup": paragraph_dedup.call(workdir, [docs], cfg, runner=runner)}


__all__ = ["BloomFilter", "dolma_spans", "dedup_text", "ParagraphDedupConfig", "paragraph_dedup", "paragraph_stages"]
