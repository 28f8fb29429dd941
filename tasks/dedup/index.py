"""The persistent dedup index: band keys (and shingles) of every document earlier runs have seen.

Layout of the index directory (local path or fsspec URL)::

    index.json                     the manifest: parameters, ordered list of segments
    seg-<dedup fingerprint>/       one segment per dedup run that was added
        seg-00000.parquet          per input part: id, band keys b00.., exact, url, kept
        shingles-00000.arrow       (verify only) sorted unique shingle hashes per document

A run on input X reads the *base state*: the segments added before X's own segment if X was
added already (so re-running X is idempotent and hits the cache), else all segments. The base
state's segment names are part of the dedup stage's config, hence of its fingerprint.

Updates are atomic: the new segment's files are copied under a fresh folder first, then
``index.json`` is replaced in one write (``os.replace`` locally, one PUT on object stores). Before
writing, the manifest is re-read: if another run added a segment meanwhile (the base state is no
longer current), the update is refused and the run must be repeated on the new state.
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Any

import fsspec

INDEX_MANIFEST = "index.json"
FORMAT = "refinery-dedup-index/1"
PARAM_KEYS = ("ngram", "num_perm", "bands", "rows", "seed", "scheme", "normalize")
NORMALIZE_VERSION = "1"


class IndexMismatch(ValueError):
    """The index was built with other MinHash parameters, or changed during the run."""


class DedupIndex:
    def __init__(self, path: str):
        self.path = str(path).rstrip("/")
        self.fs, self._root = fsspec.core.url_to_fs(self.path)
        from fsspec.implementations.local import LocalFileSystem

        self.local = isinstance(self.fs, LocalFileSystem)

    def _p(self, rel: str) -> str:
        return f"{self._root}/{rel}"

    def url(self, rel: str) -> str:
        return self._p(rel) if self.local else self.fs.unstrip_protocol(self._p(rel))

    def manifest(self) -> dict | None:
        try:
            with self.fs.open(self._p(INDEX_MANIFEST), "rb") as f:
                data = json.loads(f.read())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise IndexMismatch(f"{self.path}: unreadable {INDEX_MANIFEST}: {e}") from None
        if data.get("format") != FORMAT:
            raise IndexMismatch(f"{self.path}: not a {FORMAT} index")
        return data

    def check_params(self, params: dict) -> None:
        m = self.manifest()
        if m is None:
            return
        mine = {k: params[k] for k in PARAM_KEYS}
        theirs = {k: m["params"].get(k) for k in PARAM_KEYS}
        if mine != theirs:
            raise IndexMismatch(f"{self.path}: index built with {theirs}, this run uses {mine}")

    def base_segments(self, input_fp: str) -> list[dict]:
        """The segments a run on input ``input_fp`` deduplicates against."""
        m = self.manifest()
        if m is None:
            return []
        segs = m["segments"]
        for i, s in enumerate(segs):
            if s["input"] == input_fp:
                return segs[:i]
        return segs

    def has_input(self, input_fp: str) -> bool:
        m = self.manifest()
        return m is not None and any(s["input"] == input_fp for s in m["segments"])

    def append(self, ds, input_fp: str, params: dict, base: list[str]) -> bool:
        """Add the segment written by dedup dataset ``ds`` (files ``index/*``). Returns False when
        the input is already in the index (nothing to do)."""
        m = self.manifest()
        if m is not None and any(s["input"] == input_fp for s in m["segments"]):
            return False
        current = [s["name"] for s in m["segments"]] if m else []
        if current != list(base):
            raise IndexMismatch(
                f"{self.path}: the index changed during this run (was {base}, now {current}); "
                "run the dedup again so it deduplicates against the new state")
        if m is not None:
            self.check_params(params)
        name = f"seg-{ds.fingerprint}"
        files = []
        entries = [f for f in ds.manifest.get("files", []) if f["path"].startswith("index/")]
        by_part: dict[str, dict] = {}
        for f in sorted(entries, key=lambda f: f["path"]):
            base_name = f["path"].split("/", 1)[1]
            dest = f"{name}/{base_name}"
            self.fs.makedirs(self._p(name), exist_ok=True)
            with ds.fs.open(ds.file(f["path"]), "rb") as src, \
                    self.fs.open(self._p(dest), "wb") as dst:
                while True:
                    block = src.read(1 << 22)
                    if not block:
                        break
                    dst.write(block)
            part = base_name.split("-", 1)[1].split(".")[0]
            entry = by_part.setdefault(part, {"sig": None, "shingles": None, "rows": None})
            if base_name.startswith("seg-"):
                entry["sig"], entry["rows"] = dest, f["rows"]
            elif base_name.startswith("shingles-"):
                entry["shingles"] = dest
        for part in sorted(by_part):
            files.append(by_part[part])
        seg = {"name": name, "input": input_fp, "dedup": ds.fingerprint, "files": files,
               "docs": sum(f["rows"] or 0 for f in files)}
        new: dict[str, Any] = {"format": FORMAT, "params": {k: params[k] for k in PARAM_KEYS} | {
            "exact": params.get("exact"), "by_url": params.get("by_url"), "verify": params.get("verify")},
            "segments": (m["segments"] if m else []) + [seg]}
        new["docs"] = sum(s["docs"] for s in new["segments"])
        data = json.dumps(new, indent=2, sort_keys=True).encode()
        # last check, then one atomic write of the manifest
        again = self.manifest()
        if ([s["name"] for s in again["segments"]] if again else []) != current:
            raise IndexMismatch(f"{self.path}: the index changed during this run; run the dedup again")
        if self.local:
            os.makedirs(self._root, exist_ok=True)
            tmp = self._p(f"{INDEX_MANIFEST}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._p(INDEX_MANIFEST))
        else:
            with self.fs.open(self._p(INDEX_MANIFEST), "wb") as f:
                f.write(data)
        return True
