"""Dataset cards and data-file names: what makes a refinery dataset folder load anywhere.

A dataset folder's data is its top-level ``part-*.parquet`` (or ``part-*.arrow``) files, none of
them empty; side tables (exclusions, clusters, index segments) live in subfolders. Two readers
find the data without knowing refinery:

- ``datasets.load_dataset(PATH)`` reads the ``configs`` of the ``README.md`` card written here
  (``data_files: part-*.parquet``), so nothing else in the folder is read.
- ``datasets.load_dataset("parquet", data_dir=PATH)`` ignores the card and globs the folder. Its
  first pattern that matches wins, and the catch-all ``**`` would also take ``manifest.json`` and
  the side tables; names carrying the split (``part-00000.train.parquet``, see :func:`part_name`)
  match the earlier "split in the file name" pattern, so only the data is read. Side tables must
  therefore never carry a split word (train, test, eval, validation, dev, ...) in their names.

The card is written by :meth:`refinery.tasks.store.Builder.publish` as a record, so the manifest
lists it. Its text depends only on the fingerprint, counts, inputs and files, never on where the
dataset lives or when it was built: two builds of one fingerprint stay byte-identical.
"""
from __future__ import annotations

import json
import posixpath
from typing import Any, Iterable, Sequence

CARD = "README.md"
SPLIT = "train"
DATA_PREFIX = "part-"


def part_name(*index: int, ext: str = "parquet") -> str:
    """The name of a data part: ``part_name(3) == "part-00003.train.parquet"``,
    ``part_name(3, 1) == "part-00003-00001.train.parquet"``."""
    if not index:
        raise ValueError("part_name needs at least one index")
    return DATA_PREFIX + "-".join(f"{int(i):05d}" for i in index) + f".{SPLIT}.{ext}"


def is_data_file(rel: str) -> bool:
    """A top-level ``part-*.parquet``/``part-*.arrow`` file (side tables live in subfolders)."""
    return "/" not in rel and rel.startswith(DATA_PREFIX) and rel.endswith((".parquet", ".arrow"))


def data_pattern(records: Iterable[dict]) -> str | None:
    """The ``data_files`` glob of a dataset's records, or None when it has no data parts."""
    exts = {posixpath.splitext(r["path"])[1] for r in records if is_data_file(r["path"])}
    if not exts:
        return None
    if len(exts) > 1:  # one builder reads one format: the documents (Parquet) win
        return f"{DATA_PREFIX}*.parquet"
    return f"{DATA_PREFIX}*{exts.pop()}"


# --------------------------------------------------------------------------- the card's text
DEFAULT_LICENSE = "other"   # crawled web text: its licensing is the user's to establish (hub: "other")
# the hub's size_categories, by upper bound of the row count
_SIZES = [(10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M"), (10**7, "1M<n<10M"),
          (10**8, "10M<n<100M"), (10**9, "100M<n<1B"), (10**10, "1B<n<10B"), (10**11, "10B<n<100B"),
          (10**12, "100B<n<1T")]


def size_category(rows: int) -> str:
    """The hub's ``size_categories`` value of a dataset of ``rows`` rows."""
    return next((name for bound, name in _SIZES if rows < bound), "n>1T")


def card_languages(counts: dict) -> list[str]:
    """Languages with documents out in a stage's ``by_language`` counts (the filter's), sorted."""
    by = counts.get("by_language")
    if not isinstance(by, dict):
        return []
    return sorted(str(k) for k, v in by.items() if isinstance(v, dict) and (v.get("docs_out") or 0) > 0)


def _front_matter(pattern: str | None, *, license: str = DEFAULT_LICENSE, languages: Sequence[str] = (),
                  size: str | None = None, sources: Sequence[str] = ()) -> str:
    """The YAML block Hugging Face ``datasets`` and the hub read (written by hand: no YAML library
    needed; every free value double-quoted, so a language code like ``no`` stays a string)."""
    q = json.dumps
    lines = ["---"]
    if pattern is not None:
        lines += ["configs:", "- config_name: default", "  data_files:",
                  f"  - split: {SPLIT}", f'    path: "{pattern}"']
    lines += [f"license: {q(license)}"]
    if languages:
        lines += ["language:", *[f"- {q(x)}" for x in languages]]
    if size is not None:
        lines += ["size_categories:", f"- {q(size)}"]
    lines += ["source_datasets:", *[f"- {q(x)}" for x in (list(sources) or ["original"])]]
    lines += ["tags:", "- refinery", "---"]
    return "\n".join(lines)


def _count_lines(counts: dict) -> list[str]:
    """Integer counts (one level of nesting flattened), sorted by name; floats and timings stay in
    the manifest, so the card does not change between two builds of one fingerprint. Sorted, since
    the order of a stage's counts is not data: a resumed build reads its finished shards' counts
    back from their records (JSON with sorted keys) and sums them in another order than the
    uninterrupted build that keeps each shard's own order."""
    out = []
    for k, v in sorted(counts.items()):
        if isinstance(v, bool):
            continue
        if isinstance(v, int):
            out.append(f"| {k} | {v:,} |")
        elif isinstance(v, dict):
            out += [f"| {k}.{k2} | {v2:,} |" for k2, v2 in sorted(v.items())
                    if isinstance(v2, int) and not isinstance(v2, bool)]
    return out


def _layout_lines(records: list[dict], pattern: str | None) -> list[str]:
    data = [r for r in records if is_data_file(r["path"])]
    rows = sum(r.get("rows") or 0 for r in data)
    out = []
    if pattern is not None:
        out.append(f"- `{pattern}`: the data, {len(data)} file(s), {rows:,} row(s)")
    folders: dict[str, int] = {}
    for r in records:
        if "/" in r["path"]:
            top = r["path"].split("/", 1)[0]
            folders[top] = folders.get(top, 0) + 1
    out += [f"- `{d}/`: side files ({n})" for d, n in sorted(folders.items())]
    others = sorted(r["path"] for r in records if "/" not in r["path"] and not is_data_file(r["path"])
                    and r["path"] != CARD)
    out += [f"- `{p}`" for p in others]
    out.append("- `manifest.json`: fingerprint, config, inputs, every file's size and sha256, counts, stats")
    return out


def card_text(*, stage: str, fingerprint: str, code_version: str, inputs: list[dict], counts: dict,
              records: list[dict], license: str = DEFAULT_LICENSE) -> str:
    """The card: front matter (with the hub's ``license``, ``language`` from the counts,
    ``size_categories`` from the data rows, ``source_datasets``: the inputs by ``STAGE/FINGERPRINT``,
    ``original`` for raw inputs), then what the dataset is, its counts, lineage and layout."""
    pattern = data_pattern(records)
    rows = sum(r.get("rows") or 0 for r in records if is_data_file(r["path"]))
    sources = [f"{i.get('stage')}/{i.get('fingerprint')}" for i in inputs]
    front = _front_matter(pattern, license=license, languages=card_languages(counts),
                          size=size_category(rows) if pattern is not None else None, sources=sources)
    parts = [front, "",
             f"# `{stage}` dataset `{fingerprint}`", "",
             f"Written by the refinery `{stage}` stage ({code_version}); the folder name is the "
             "fingerprint of the stage, its code version, its config and its inputs.", ""]
    if pattern is not None:
        parts += ["Load it with `datasets.load_dataset(\"<this folder>\")`, "
                  f"`datasets.load_dataset(\"{pattern.rsplit('.', 1)[1]}\", data_dir=\"<this folder>\")` "
                  "or pyarrow.", ""]
    count_lines = _count_lines(counts)
    if count_lines:
        parts += ["## Counts", "", "| count | value |", "| --- | ---: |", *count_lines, ""]
    images = sorted(r["path"] for r in records if "/" not in r["path"] and r["path"].endswith(".png"))
    if images:   # charts the stage drew (evaluate's chart.png, filter's drops.png)
        parts += ["## Charts", "", *[f"![{p}]({p})" for p in images], ""]
    parts += ["## Lineage", ""]
    parts += [f"- input `{i.get('stage')}` `{i.get('fingerprint')}`" for i in inputs] or ["- no dataset inputs"]
    parts += ["", "## Files", "", *_layout_lines(records, pattern), ""]
    return "\n".join(parts)


def write_card(b: Any, *, code_version: str, inputs: list[dict], counts: dict) -> dict | None:
    """Write ``README.md`` into the dataset ``b`` (a Builder) is building, as a record.

    A stage that wrote its own top-level ``README.md`` (a model card, say) keeps it; a card left
    by an earlier, interrupted publish of this fingerprint is rewritten.
    """
    records = [r for r in b.records() if r["path"] != CARD]
    own = b.done(CARD)
    if own is not None and not own.get("card"):
        return None
    text = card_text(stage=b.stage, fingerprint=b.fingerprint, code_version=code_version,
                     inputs=inputs, counts=counts, records=records)
    return b.write_bytes(CARD, text.encode(), card=True)


__all__ = ["CARD", "SPLIT", "DEFAULT_LICENSE", "size_category", "card_languages", "part_name", "is_data_file", "data_pattern", "card_text", "write_card"]
