"""Dataset directories on local disk or any fsspec URL: manifests, fingerprints, atomic publish.

Layout (DESIGN.md section 2)::

    <root>/<stage>/<fingerprint>/
        part-00000.parquet ...      main data parts ("part-" prefix), or .arrow token shards
        <other files>               side tables (e.g. excluded-*.parquet), model folders
        manifest.json               written last: its presence means the dataset is complete

While a dataset is built it lives in ``<root>/<stage>/.staging-<fingerprint>/`` (local roots), a
*deterministic* place, so a run that crashed leaves its finished parts there and the next run
with the same fingerprint resumes from them. Each finished file has a small record in
``.records/``; publish writes the manifest from those records and renames the staging folder to
its final name, so nothing half-written ever looks complete. On object stores, where there is no
atomic rename, files go to the final prefix and the manifest is written last.
"""
from __future__ import annotations

import datetime as _dt
import hashlib

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

REFINERY_VERSION = "0.1.0"
MANIFEST = "manifest.json"
_RECORDS = ".records"
_SHARDS = ".shards"


class DatasetNotFound(FileNotFoundError):
    """A path that holds no complete dataset (no manifest.json)."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def fingerprint(stage: str, version: str, config: dict, inputs: list[str]) -> str:
    """Hash of (stage name, stage code version, normalized config, input fingerprints)."""
    payload = canonical_json({"stage": stage, "version": version, "config": config, "inputs": list(inputs)})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def sha256_file(fs, path: str, chunk: int = 1 << 20) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def _is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def _join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts if p != "")


def _url(fs, path: str) -> str:
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _atomic_write_bytes(fs, path: str, data: bytes) -> None:
    if _is_local(fs):
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:  # object stores: a PUT is atomic
        with fs.open(path, "wb") as f:
            f.write(data)


class Dataset:
    """A complete dataset: its directory and manifest."""

    def __init__(self, path: str, manifest: dict, fs=None):
        self.fs = fs if fs is not None else fsspec.core.url_to_fs(path)[0]
        self.path = path
        self._fs_path = fsspec.core.url_to_fs(path)[1] if fs is None else self.fs._strip_protocol(path)
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Dataset":
        path = str(path)
        fs, fs_path = fsspec.core.url_to_fs(path)
        if _is_local(fs):
            path = fs_path = os.path.abspath(fs_path)
        mpath = _join(fs_path, MANIFEST)
        try:
            with fs.open(mpath, "rb") as f:
                manifest = json.loads(f.read())
        except FileNotFoundError:
            raise DatasetNotFound(f"{path}: no {MANIFEST}, so not a complete refinery dataset") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetNotFound(f"{path}: unreadable {MANIFEST}: {e}") from None
        return cls(path, manifest, fs)

    # -- manifest accessors
    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def counts(self) -> dict:
        return self.manifest.get("counts", {})

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    def ref(self) -> dict:
        return {"stage": self.stage, "fingerprint": self.fingerprint, "path": self.path}

    def file(self, rel: str) -> str:
        """Full path (or URL) of a file inside the dataset."""
        return _url(self.fs, _join(self._fs_path, rel))

    def files_with_prefix(self, prefix: str) -> list[str]:
        return [self.file(f["path"]) for f in self.manifest.get("files", [])
                if Path(f["path"]).name.startswith(prefix) and f.get("rows") is not None]

    @property
    def files(self) -> list[str]:
        """The main data parts (tables named ``part-*``), in manifest order."""
        return self.files_with_prefix("part-")

    def iter_tables(self, columns: list[str] | None = None, files: list[str] | None = None) -> Iterator:
        import pyarrow.parquet as pq

        for path in files if files is not None else self.files:
            with self.fs.open(self.fs._strip_protocol(path) if not _is_local(self.fs) else path, "rb") as f:
                yield pq.read_table(f, columns=columns)

    def read_table(self, columns: list[str] | None = None, files: list[str] | None = None):
        import pyarrow as pa

        tables = list(self.iter_tables(columns, files))
        if not tables:
            return pa.table({})
        return pa.concat_tables(tables)

    def local_path(self) -> str:
        """A local directory with the dataset's files (downloaded once into a cache if remote)."""
        if _is_local(self.fs):
            return self.path
        cache = Path(os.environ.get("REFINERY_CACHE", Path.home() / ".cache" / "refinery")) / "datasets"
        dest = cache / self.stage / self.fingerprint
        if (dest / MANIFEST).exists():
            return str(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.fingerprint}-", dir=str(cache.mkdir(parents=True, exist_ok=True) or cache)))
        self.fs.get(self._fs_path + "/", str(tmp), recursive=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, dest)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        return str(dest)

    def __repr__(self) -> str:
        return f"Dataset({self.path!r})"


class Store:
    """A root directory (local path or fsspec URL) holding datasets by stage and fingerprint."""

    def __init__(self, root: str | os.PathLike, **storage_options):
        root = str(root)
        self.fs, self._root = fsspec.core.url_to_fs(root, **storage_options)
        if self.local:
            self._root = os.path.abspath(self._root)
            os.makedirs(self._root, exist_ok=True)
        self.root = _url(self.fs, self._root)

    @property
    def local(self) -> bool:
        return _is_local(self.fs)

    def dataset_path(self, stage: str, fp: str) -> str:
        return _url(self.fs, _join(self._root, stage, fp))

    def get(self, stage: str, fp: str) -> Dataset | None:
        path = _join(self._root, stage, fp)
        if not self.fs.exists(_join(path, MANIFEST)):
            return None
        return Dataset.open(_url(self.fs, path))

    def builder(self, stage: str, fp: str) -> "Builder":
        return Builder(self, stage, fp)


class Builder:
    """The staging area of one dataset under construction. Re-creatable in any process."""

    def __init__(self, store: Store, stage: str, fp: str):
        self.store, self.stage, self.fingerprint = store, stage, fp
        self.fs = store.fs
        self.final = _join(store._root, stage, fp)
        self.dir = _join(store._root, stage, f".staging-{fp}") if store.local else self.final
        self.fs.makedirs(_join(self.dir, _RECORDS), exist_ok=True)
        self.fs.makedirs(_join(self.dir, _SHARDS), exist_ok=True)
        self._tmpdirs: list[str] = []

    # -- paths
    def path(self, rel: str) -> str:
        """Full staging path (URL for remote stores) of a file in the dataset being built."""
        return _url(self.fs, _join(self.dir, rel))

    @staticmethod
    def _record_name(rel: str) -> str:
        return hashlib.sha1(rel.encode()).hexdigest()[:20] + ".json"

    def _write_record(self, rec: dict) -> dict:
        data = canonical_json(rec).encode()
        _atomic_write_bytes(self.fs, _join(self.dir, _RECORDS, self._record_name(rec["path"])), data)
        return rec

    def done(self, rel: str) -> dict | None:
        """The record of a file already written (e.g. by a run that crashed later), else None."""
        rpath = _join(self.dir, _RECORDS, self._record_name(rel))
        if not (self.fs.exists(rpath) and self.fs.exists(_join(self.dir, rel))):
            return None
        with self.fs.open(rpath, "rb") as f:
            return json.loads(f.read())

    # -- writing
    def write_table(self, rel: str, table, **extra) -> dict:
        """Write a pyarrow Table atomically as Parquet (``.parquet``) or Arrow IPC (``.arrow``)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        dest = _join(self.dir, rel)
        self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{dest}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}" if self.store.local else dest
        with self.fs.open(tmp, "wb") as f:
            if rel.endswith(".arrow"):
                with pa.ipc.new_file(f, table.schema) as w:
                    w.write_table(table)
            elif rel.endswith(".parquet"):
                pq.write_table(table, f, compression="zstd")
            else:
                raise ValueError(f"{rel}: write_table needs a .parquet or .arrow name")
        if self.store.local:
            os.replace(tmp, dest)
        digest, size = sha256_file(self.fs, dest)
        return self._write_record({"path": rel, "rows": table.num_rows, "bytes": size, "sha256": digest, **extra})

    def write_bytes(self, rel: str, data: bytes, **extra) -> dict:
        dest = _join(self.dir, rel)
        self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
        _atomic_write_bytes(self.fs, dest, data)
        return self._write_record({"path": rel, "rows": None, "bytes": len(data),
                                   "sha256": hashlib.sha256(data).hexdigest(), **extra})

    def put_file(self, local_path: str | os.PathLike, rel: str, **extra) -> dict:
        dest = _join(self.dir, rel)
        self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
        if self.store.local:
            tmp = f"{dest}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, dest)
        else:
            self.fs.put_file(str(local_path), dest)
        digest, size = sha256_file(self.fs, dest)
        return self._write_record({"path": rel, "rows": None, "bytes": size, "sha256": digest, **extra})

    def put_dir(self, local_dir: str | os.PathLike, rel: str = "") -> list[dict]:
        local_dir = Path(local_dir)
        recs = []
        for p in sorted(local_dir.rglob("*")):
            if p.is_file():
                recs.append(self.put_file(p, _join(rel, p.relative_to(local_dir).as_posix()) if rel
                                          else p.relative_to(local_dir).as_posix()))
        return recs

    def tmpdir(self) -> str:
        """A private local scratch directory, removed when the dataset is published."""
        d = tempfile.mkdtemp(prefix=f"refinery-{self.stage}-{self.fingerprint}-")
        self._tmpdirs.append(d)
        return d

    # -- shard bookkeeping (used by refinery.tasks.runtime)
    def shard_result(self, name: str) -> dict | None:
        p = _join(self.dir, _SHARDS, hashlib.sha1(name.encode()).hexdigest()[:20] + ".json")
        if not self.fs.exists(p):
            return None
        with self.fs.open(p, "rb") as f:
            return json.loads(f.read())["result"]

    def record_shard(self, name: str, result: dict, seconds: float = 0.0) -> None:
        p = _join(self.dir, _SHARDS, hashlib.sha1(name.encode()).hexdigest()[:20] + ".json")
        _atomic_write_bytes(self.fs, p, canonical_json({"name": name, "result": result,
                                                        "seconds": round(seconds, 3)}).encode())

    def shard_seconds(self) -> float:
        """Total time spent in this dataset's shards (including those of earlier, crashed runs)."""
        total = 0.0
        for p in self._ls(_SHARDS):
            if p.endswith(".json"):
                with self.fs.open(p, "rb") as f:
                    total += json.loads(f.read()).get("seconds", 0.0)
        return total

    def _ls(self, sub: str) -> list[str]:
        try:
            return self.fs.ls(_join(self.dir, sub), detail=False)
        except FileNotFoundError:  # an object store's "folder" with nothing in it yet
            return []

    def records(self) -> list[dict]:
        out = []
        for p in sorted(self._ls(_RECORDS)):
            if p.endswith(".json"):
                with self.fs.open(p, "rb") as f:
                    out.append(json.loads(f.read()))
        return sorted(out, key=lambda r: r["path"])

    # -- publish
    def publish(self, *, version: str, config: dict, inputs: Iterable[dict], counts: dict | None = None,
                stats: dict | None = None, extra: dict | None = None) -> Dataset:
        manifest = {
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "code_version": f"refinery-{REFINERY_VERSION}/{self.stage}-v{version}",
            "inputs": list(inputs),
            "config": config,
            "files": self.records(),
            "counts": counts or {},
            "stats": stats or {},
        }
        for k, v in (extra or {}).items():
            if k in manifest:
                raise ValueError(f"extra manifest key {k!r} clashes with a standard key")
            manifest[k] = v
        for d in self._tmpdirs:
            shutil.rmtree(d, ignore_errors=True)
        self._tmpdirs.clear()
        data = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False, default=str).encode()
        if not self.store.local:
            for sub in (_RECORDS, _SHARDS):  # object stores have no empty folders: maybe absent
                try:
                    self.fs.rm(_join(self.dir, sub), recursive=True)
                except FileNotFoundError:
                    pass
            _atomic_write_bytes(self.fs, _join(self.final, MANIFEST), data)
            return Dataset.open(_url(self.fs, self.final))
        for sub in (_RECORDS, _SHARDS):
            shutil.rmtree(_join(self.dir, sub), ignore_errors=True)
        _atomic_write_bytes(self.fs, _join(self.dir, MANIFEST), data)
        try:
            os.rename(self.dir, self.final)
        except OSError:
            # Another process published the same fingerprint first; its copy is as good as ours.
            if not os.path.exists(_join(self.final, MANIFEST)):
                raise
            shutil.rmtree(self.dir, ignore_errors=True)
        return Dataset.open(self.final)
