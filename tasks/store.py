"""Dataset directories on local disk or any fsspec URL: manifests, fingerprints, atomic publish.

Layout (ARCHITECTURE.md, section 3)::

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

Trust (see the README's "Reliability" section):

* **One writer per fingerprint.** :meth:`Store.lock` serializes builders of one ``(stage,
  fingerprint)``: an ``flock`` on ``<root>/<stage>/.lock-<fp>`` on local disks and shared volumes
  (the kernel drops it when the holder dies), a lease object with an expiry and a heartbeat on
  object stores (``.lease-<fp>/<generation>.json`` created with a conditional write, so two
  writers never both win). A second run waits, then reuses what the first published.
* **Verify on open.** :meth:`Dataset.open` checks that every file of the manifest exists with the
  manifest's size, that no manifest path leaves the dataset folder, that the file list still has
  the count and rows recorded at publish (``totals``) and that no data part (``part-*``) on disk is
  missing from it (one folder listing, no data read); :meth:`Dataset.verify` also checks sha256s
  and each part's own row count (``refinery verify PATH``). :meth:`Store.recover`, called by the lock
  holder, moves a damaged dataset (or a folder without a manifest, or a staging folder whose
  files do not match their records) aside to ``<stage>/.quarantine-<fp>-<time>`` with a warning.
* Parts are fsynced before their rename; ``*.tmp-*`` files never reach a published folder.
* **No links in the store's own folders** (local disks): a stage folder, staging folder, its
  record folders, a lock file or a dataset folder that is a symbolic link is refused
  (:class:`UnsafeLink`), since a build would write into, and delete from, the link's target. The
  root itself may be a link: that is the user's choice of where the store lives.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

import refinery.tasks.extras  # noqa: F401  (a missing s3fs is then reported with the extra that installs it)

from refinery.tasks.card import DATA_PREFIX, write_card   # the card never imports the store

REFINERY_VERSION = "0.1.0"
MANIFEST = "manifest.json"
_RECORDS = ".records"
_SHARDS = ".shards"
_TMP_MARK = ".tmp-"          # in the name of every file being written (see _tmp_name)

log = logging.getLogger("refinery.store")


class DatasetNotFound(FileNotFoundError):
    """A path that holds no complete dataset (no manifest.json)."""


class DatasetCorrupt(DatasetNotFound):
    """A dataset whose files do not match its manifest (missing or resized file, path outside
    the folder, unreadable manifest). A subclass of DatasetNotFound: it is not a usable dataset."""


class UnsafeLink(RuntimeError):
    """A symbolic link where the store keeps one of its own folders or files (local disks)."""


def _refuse_link(path: str) -> None:
    """Raise :class:`UnsafeLink` when ``path`` is a symbolic link: the store renames, writes and
    deletes inside its folders, which through a link would happen to the link's target."""
    if os.path.islink(path):
        raise UnsafeLink(f"{path}: is a symbolic link (to {os.readlink(path)}); refinery follows no link in "
                         "its own folders, since a build would write into and delete from the link's target: "
                         "remove the link (keep the store's folders real; the root may be a link) and run again")


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


def _tmp_name(path: str) -> str:
    return f"{path}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _local_atomic(path: str):
    """Yield a binary file to write; on success it is fsynced and renamed to ``path``, on any
    error (a full disk, an exception in the writer) the temporary file is removed."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _atomic_write_bytes(fs, path: str, data: bytes) -> None:
    if _is_local(fs):
        with _local_atomic(path) as f:
            f.write(data)
    else:  # object stores: a PUT is atomic
        with fs.open(path, "wb") as f:
            f.write(data)


# --------------------------------------------------------------------------- integrity checks
def path_problem(rel: Any) -> str | None:
    """Why a manifest path is not a plain relative path inside the dataset folder, else None."""
    if not isinstance(rel, str) or not rel:
        return f"bad path {rel!r}"
    if rel.startswith(("/", "~")) or "\\" in rel or rel[1:3] in (":/", ":\\") or "://" in rel:
        return f"{rel}: absolute path (manifest paths must stay inside the dataset folder)"
    if any(p in ("", ".", "..") for p in rel.split("/")):
        return f"{rel}: path leaves the dataset folder or is not normalized"
    if _TMP_MARK in rel.rsplit("/", 1)[-1]:
        return f"{rel}: temporary file listed in the manifest"
    return None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def totals(files: list[dict]) -> dict:
    """What publish records of a file list (manifest key ``totals``) so that a list emptied or cut
    short later is noticed: how many files, and the rows of those that have rows (data parts and
    side tables). Not ``counts``: what a stage counts there is its own business (documents in,
    tokens, training steps), not always rows."""
    return {"files": len(files), "rows": sum(f["rows"] for f in files if _is_count(f.get("rows")))}


def _totals_problems(want: Any, files: list[dict]) -> list[str]:
    """The file list against the totals recorded at publish (older manifests have none)."""
    if want is None:
        return []
    if not isinstance(want, dict):
        return ["manifest 'totals' is not an object"]
    have = totals(files)
    if have == want:
        return []
    return [f"manifest lists {have['files']} files with {have['rows']} rows, but the dataset was published with "
            f"{want.get('files')} files, {want.get('rows')} rows (its file list was edited or cut short)"]


def _list_problems(manifest: Any) -> list[str]:
    """Problems of a manifest's shape and file paths: with any, no file may be looked up."""
    if not isinstance(manifest, dict):
        return ["manifest is not a JSON object"]
    missing = [k for k in ("stage", "fingerprint", "files") if k not in manifest]
    if missing:
        return [f"manifest lacks {', '.join(missing)}"]
    files = manifest["files"]
    if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
        return ["manifest 'files' is not a list of objects"]
    out = [p for p in (path_problem(f.get("path")) for f in files) if p]
    seen = [f["path"] for f in files if isinstance(f.get("path"), str)]
    if len(set(seen)) != len(seen):
        out.append("manifest lists a file twice")
    return out


def manifest_problems(manifest: Any) -> list[str]:
    """Problems of a manifest on its own (no file is read): its shape, its file paths, and its
    file list against the totals recorded at publish."""
    return _list_problems(manifest) or _totals_problems(manifest.get("totals"), manifest["files"])


def _sizes(fs, root: str, rels: list[str]) -> dict[str, int | None]:
    """Size of each file (None when absent): one stat per file on local disks, one listing on
    object stores (cheaper than a request per file)."""
    if _is_local(fs):
        out: dict[str, int | None] = {}
        for rel in rels:
            try:
                st = os.stat(os.path.join(root, rel))
                out[rel] = st.st_size if not os.path.isdir(os.path.join(root, rel)) else None
            except OSError:
                out[rel] = None
        return out
    fs.invalidate_cache(root)
    try:
        listing = fs.find(root, detail=True)
    except FileNotFoundError:
        listing = {}
    prefix = fs._strip_protocol(root).rstrip("/") + "/"
    by_rel = {fs._strip_protocol(k)[len(prefix):]: v.get("size") for k, v in listing.items()
              if fs._strip_protocol(k).startswith(prefix) and v.get("type", "file") == "file"}
    return {rel: by_rel.get(rel) for rel in rels}


def size_problems(fs, root: str, files: list[dict]) -> list[str]:
    """Files of a manifest (or of staging records) that are absent or not of the recorded size."""
    sizes = _sizes(fs, root, [f["path"] for f in files])
    out = []
    for f in files:
        have, want = sizes.get(f["path"]), f.get("bytes")
        if have is None:
            out.append(f"{f['path']}: missing")
        elif isinstance(want, int) and have != want:
            out.append(f"{f['path']}: {have} bytes, manifest says {want}")
    return out


def _top_names(fs, root: str) -> list[str]:
    """Names directly inside ``root`` (one listing; none when it does not exist)."""
    if _is_local(fs):
        try:
            return os.listdir(root)
        except OSError:
            return []
    fs.invalidate_cache(root)
    try:
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []


def _unrecorded_parts(fs, root: str, files: list[dict]) -> list[str]:
    """Data parts (top-level ``part-*``, side tables live in subfolders) in ``root`` that ``files``
    does not list."""
    listed = {f["path"] for f in files}
    return sorted(n for n in _top_names(fs, root) if n.startswith(DATA_PREFIX) and n not in listed)


def _content_problems(fs, path: str, f: dict) -> list[str]:
    """One file of a manifest against its sha256 and, for a table, its own row count (reads it)."""
    if f.get("sha256"):
        digest, _ = sha256_file(fs, path)
        if digest != f["sha256"]:
            return [f"{f['path']}: sha256 {digest[:16]}..., manifest says {f['sha256'][:16]}..."]
    if not (_is_count(f.get("rows")) and f["path"].endswith((".parquet", ".arrow"))):
        return []
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as fh:
            rows = (pq.ParquetFile(fh).metadata.num_rows if f["path"].endswith(".parquet")
                    else pa.ipc.open_file(fh).count_rows())
    except (pa.ArrowException, OSError) as e:
        return [f"{f['path']}: unreadable table ({e})"]
    return [] if rows == f["rows"] else [f"{f['path']}: {rows} rows, manifest says {f['rows']}"]


def dataset_problems(fs, root: str, manifest: Any, *, check: bool = True, content: bool = False) -> list[str]:
    """Every problem of a published dataset at ``root`` against its ``manifest``: the manifest's
    shape and paths; with ``check`` (cheap: a stat per file, one folder listing, no data read) its
    files missing or of another size, data parts on disk that it does not list and its file list
    against the totals recorded at publish; with ``content`` too (reads every byte) each file's
    sha256 and each table's own row count. Empty when the dataset is intact."""
    out = _list_problems(manifest)
    if out or not check:
        return out   # with a path that may leave the folder, nothing is looked up
    files = manifest["files"]
    out = size_problems(fs, root, files)
    if content:
        bad = {p.split(": ", 1)[0] for p in out}
        out += [p for f in files if f["path"] not in bad for p in _content_problems(fs, _join(root, f["path"]), f)]
    out += [f"{n}: on disk but not in the manifest (its file list was edited or cut short)"
            for n in _unrecorded_parts(fs, root, files)]
    return out + _totals_problems(manifest.get("totals"), files)


def _summary(problems: list[str]) -> str:
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


class Dataset:
    """A complete dataset: its directory and manifest."""

    def __init__(self, path: str, manifest: dict, fs=None):
        self.fs = fs if fs is not None else fsspec.core.url_to_fs(path)[0]
        self.path = path
        self._fs_path = fsspec.core.url_to_fs(path)[1] if fs is None else self.fs._strip_protocol(path)
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | os.PathLike, check: bool = True) -> "Dataset":
        """Open a published dataset. Its manifest must be readable with every path inside the
        folder (always checked); with ``check`` (the default, cheap: a stat per file or one
        listing, and one listing of the folder, no data read) every file must exist with the
        manifest's size, every data part on disk must be listed and the file list must match the
        totals recorded at publish. Raises DatasetNotFound when there is no manifest,
        DatasetCorrupt (a subclass) when the files do not match it (see :func:`dataset_problems`)."""
        where = str(path)
        fs, fs_path = fsspec.core.url_to_fs(where)
        if _is_local(fs):
            where = fs_path = os.path.abspath(fs_path)
        mpath = _join(fs_path, MANIFEST)
        try:
            with fs.open(mpath, "rb") as f:
                manifest = json.loads(f.read())
        except FileNotFoundError:
            raise DatasetNotFound(f"{where}: no {MANIFEST}, so not a complete refinery dataset") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetCorrupt(f"{where}: unreadable {MANIFEST}: {e}") from None
        problems = dataset_problems(fs, fs_path, manifest, check=check)
        if problems:
            raise DatasetCorrupt(f"{where}: damaged dataset: {_summary(problems)}")
        return cls(where, manifest, fs)

    def verify(self) -> list[str]:
        """Every problem of the dataset (reads every byte): what :meth:`open` checks, and files
        whose sha256 or row count differs from the manifest's. Empty when the dataset is intact."""
        return dataset_problems(self.fs, self._fs_path, self.manifest, content=True)

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
        """The main data parts (top-level tables named ``part-*``; side tables live in subfolders),
        in manifest order."""
        return [self.file(f["path"]) for f in self.manifest.get("files", [])
                if "/" not in f["path"] and f["path"].startswith("part-") and f.get("rows") is not None]

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
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.fingerprint}-", dir=str(cache)))
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

    def own(self, *rels: str) -> str:
        """The path of one of the store's own folders or files below the root (``own(stage,
        ".staging-" + fp, ".records")``); on local disks every level below the root that is a
        symbolic link is refused (:class:`UnsafeLink`)."""
        path = self._root
        for part in "/".join(rels).split("/"):
            path = _join(path, part)
            if self.local:
                _refuse_link(path)
        return path

    def get(self, stage: str, fp: str) -> Dataset | None:
        """The published dataset, or None when there is none or it fails the open check (the
        writer that takes the lock then moves it aside: see :meth:`recover`)."""
        try:
            return Dataset.open(_url(self.fs, self.own(stage, fp)))
        except DatasetNotFound:
            return None

    def builder(self, stage: str, fp: str) -> "Builder":
        return Builder(self, stage, fp)

    # -- one writer per fingerprint
    def lock(self, stage: str, fp: str, timeout: float | None = None,
             lease_seconds: float | None = None) -> "WriterLock":
        """The writer lock of ``(stage, fp)``, a context manager (see :class:`WriterLock`)."""
        return WriterLock(self, stage, fp, timeout=timeout, lease_seconds=lease_seconds)

    def recover(self, stage: str, fp: str) -> Dataset | None:
        """For the lock holder, before it builds: the published dataset if it is intact, else
        None, after moving aside (with a warning) a damaged dataset, a final folder without a
        manifest, and a staging folder whose files do not match their records, so the build
        starts from a clean place instead of failing on every run."""
        final = self.own(stage, fp)
        try:
            return Dataset.open(_url(self.fs, final))
        except DatasetCorrupt as e:
            self.quarantine(stage, fp, final, str(e))
        except DatasetNotFound:
            # On object stores the final prefix *is* the staging area: files without a manifest
            # there are a build to resume. On local disks they are debris.
            if self.local and os.path.lexists(final):
                self.quarantine(stage, fp, final, f"{final}: folder without {MANIFEST}")
        staging = self.own(stage, f".staging-{fp}") if self.local else final
        problems = _staging_problems(self.fs, staging)
        if problems:
            self.quarantine(stage, fp, staging, f"{staging}: staged files do not match their records: "
                            + _summary(problems))
        return None

    def quarantine(self, stage: str, fp: str, path: str, reason: str) -> str:
        """Move ``path`` aside to ``<stage>/.quarantine-<fp>-<UTC time>-<id>`` (kept for
        inspection) and log a warning naming both."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = _join(self._root, stage, f".quarantine-{fp}-{stamp}-{uuid.uuid4().hex[:4]}")
        if self.local:
            os.rename(path, dest)
        else:
            self.fs.mv(path, dest, recursive=True)
            self.fs.invalidate_cache(path)
        log.warning("%s; moved aside to %s (kept for inspection); it will be rebuilt", reason,
                    _url(self.fs, dest))
        return _url(self.fs, dest)


def quarantine_published(path: str, problems: Callable[[], list[str]], timeout: float = 10.0) -> str | None:
    """For a reader that found a published local dataset damaged in a way the cheap open check
    cannot see (a model's weights file cut short, say): move it aside as :meth:`Store.recover`
    would, so that the stage which built it rebuilds it on its next run. Only a folder laid out by
    a store (``<root>/<stage>/<fingerprint>`` whose manifest names that stage and fingerprint), and
    only while ``problems()``, checked again under the writer lock, still finds any (a writer may
    have rebuilt it meanwhile). Returns where it went, or None when it stays (not a store's
    folder, remote, its writer busy for ``timeout`` seconds, or intact after all)."""
    if "://" in path:
        return None
    folder = Path(os.path.abspath(path))
    try:
        manifest = json.loads((folder / MANIFEST).read_bytes())
    except (OSError, ValueError):   # no manifest: nothing published to move aside
        return None
    stage, fp = folder.parent.name, folder.name
    if not isinstance(manifest, dict) or (manifest.get("stage"), manifest.get("fingerprint")) != (stage, fp):
        return None
    store = Store(str(folder.parent.parent))
    try:
        with store.lock(stage, fp, timeout=timeout):
            found = problems() if (folder / MANIFEST).is_file() else []
            if not found:
                return None
            return store.quarantine(stage, fp, store.own(stage, fp), f"{folder}: damaged dataset: {_summary(found)}")
    except TimeoutError:
        log.warning("%s: damaged, but its writer is busy; left in place", path)
    except OSError as e:   # a read-only copy, say: the caller's error still names the damage
        log.warning("%s: damaged, but could not be moved aside (%s); left in place", path, e)
    return None


def _staging_problems(fs, staging: str) -> list[str]:
    """Records of a staging folder whose file is missing or of another size, or unreadable."""
    try:
        names = fs.ls(_join(staging, _RECORDS), detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    recs = []
    for p in names:
        if not p.endswith(".json"):
            continue
        try:
            with fs.open(p, "rb") as f:
                rec = json.loads(f.read())
            recs.append({"path": rec["path"], "bytes": rec.get("bytes")})
        except (OSError, ValueError, KeyError, TypeError) as e:
            return [f"{p}: unreadable record ({e})"]
    bad = [p for p in (path_problem(r["path"]) for r in recs) if p]
    return bad or size_problems(fs, staging, recs)


# --------------------------------------------------------------------------- one writer per fingerprint
LEASE_SECONDS = 60.0     # an object-store lease's lifetime; its holder renews it every third of that
_POLL_MIN, _POLL_MAX = 0.05, 1.0
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_HELD: dict[str, "WriterLock"] = {}     # locks held in this process, by key: publish checks its lease
_THREAD_LOCKS_GUARD = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child must not inherit in-process locks that its parent's other threads held."""
    global _THREAD_LOCKS_GUARD
    _THREAD_LOCKS_GUARD = threading.Lock()
    _THREAD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def _holder_info() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex[:12],
            "since": round(time.time(), 3)}


def _describe(info: dict | None) -> str:
    if not info:
        return "another writer"
    return f"pid {info.get('pid')} on {info.get('host')} (lease {info.get('id')})"


class WriterLock:
    """The one writer of ``(stage, fingerprint)``: whoever holds it builds and publishes; others
    wait (``timeout`` seconds at most, None: as long as it takes), then find the dataset published.

    * Local disks and shared volumes: ``fcntl.flock`` on ``<stage>/.lock-<fp>`` (released by the
      kernel when the holder dies, also on NFS, where Linux maps it to POSIX locks). The holder
      unlinks the file before unlocking; a waiter that then locks the old inode sees that the
      path no longer names it and tries again.
    * Object stores (and volumes without ``flock``): a lease object ``<stage>/.lease-<fp>/<gen>.json``
      created with a conditional write (``If-None-Match: *``), renewed by a heartbeat thread. An
      expired lease (its holder died or hung for ``lease_seconds``) is taken over by creating the
      next generation, which, being a conditional create too, only one waiter can win.
    * Threads of one process are serialized by an in-process lock first.
    """

    def __init__(self, store: Store, stage: str, fp: str, timeout: float | None = None,
                 lease_seconds: float | None = None):
        self.store, self.stage, self.fingerprint = store, stage, fp
        self.timeout = timeout
        self.lease_seconds = lease_seconds or float(os.environ.get("REFINERY_LEASE_SECONDS", LEASE_SECONDS))
        self.key = self.key_of(store, stage, fp)
        self._impl: Any = None
        self._thread_lock: threading.Lock | None = None

    @staticmethod
    def key_of(store: Store, stage: str, fp: str) -> str:
        return f"{store.root}|{stage}|{fp}"

    def __enter__(self) -> "WriterLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def lost(self) -> bool:
        """True when a lease expired while held (its heartbeat could not renew it in time)."""
        return bool(getattr(self._impl, "lost", False))

    def _new_impl(self):
        base = self.store.own(self.stage)
        if self.store.local:
            os.makedirs(base, exist_ok=True)
            return _Flock(self.store.own(self.stage, f".lock-{self.fingerprint}"))
        return _Lease(self.store.fs, self.store.own(self.stage, f".lease-{self.fingerprint}"), self.lease_seconds)

    def acquire(self) -> None:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        with _THREAD_LOCKS_GUARD:
            tl = _THREAD_LOCKS.setdefault(self.key, threading.Lock())
        if not tl.acquire(timeout=-1 if deadline is None else max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"{self.stage} {self.fingerprint}: another thread holds the writer lock")
        try:
            self._impl = self._new_impl()
            self._wait(deadline)
        except BaseException:
            self._impl = None
            tl.release()
            raise
        self._thread_lock = tl
        _HELD[self.key] = self

    def _wait(self, deadline: float | None) -> None:
        delay, told = _POLL_MIN, False
        info = _holder_info()
        while True:
            try:
                got = self._impl.try_acquire(info)
            except OSError as e:
                if e.errno in _READ_ONLY and isinstance(self._impl, _Flock):
                    # Nobody can build here, so no writer to exclude: reading a published dataset
                    # from a read-only copy still works (building fails at its first write).
                    log.warning("%s: cannot create the writer lock (%s); going on without it", self._impl.path, e)
                    self._impl = _NoLock()
                    return
                if not isinstance(self._impl, _Flock) or e.errno not in _NO_FLOCK:
                    raise
                log.warning("%s: no flock on this volume (%s); using a lease file instead", self._impl.path, e)
                self._impl = _Lease(self.store.fs, self.store.own(self.stage, f".lease-{self.fingerprint}"),
                                    self.lease_seconds)
                continue
            if got is True:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{self.stage} {self.fingerprint}: still built by {got} after "
                                   f"{self.timeout} s")
            if not told and got:
                log.warning("%s %s is being built by %s; waiting for it", self.stage, self.fingerprint, got)
                told = True
            time.sleep(delay)
            delay = min(_POLL_MAX, delay * 1.5)

    def release(self) -> None:
        if self._impl is not None:
            _HELD.pop(self.key, None)
            try:
                self._impl.release()
            finally:
                self._impl = None
                if self._thread_lock is not None:
                    self._thread_lock.release()
                    self._thread_lock = None


class _NoLock:
    def release(self) -> None:
        pass


class _Flock:
    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None

    def try_acquire(self, info: dict) -> bool | str:
        """True once held; else who holds it ("" to retry at once)."""
        import fcntl

        try:   # O_NOFOLLOW: a link put there while we wait must not have its target truncated
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                _refuse_link(self.path)
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"null")
            except ValueError:
                holder = None
            os.close(fd)
            return _describe(holder)
        except OSError:
            os.close(fd)
            raise
        try:   # the previous holder may have unlinked the file between our open and our lock
            same = os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return ""
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return True

    def release(self) -> None:
        import fcntl

        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)   # before unlocking: see WriterLock
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _create_exclusive(fs, path: str, data: bytes) -> None:
    """Create ``path`` with ``data`` unless it exists (FileExistsError): ``O_EXCL`` on local
    disks, a conditional PUT (``mode="xb"``) on object stores that support it."""
    if _is_local(fs):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
    except FileExistsError:
        raise
    except (ValueError, NotImplementedError, TypeError) as e:  # no conditional writes: best effort
        log.warning("%s: this store has no conditional writes (%s); the writer lock is best effort", path, e)
        if fs.exists(path):
            raise FileExistsError(path) from None
        with fs.open(path, "wb") as f:
            f.write(data)
    except OSError as e:   # S3 answers 412 Precondition Failed
        if "412" in str(e) or "Precondition" in str(e) or "ConditionalRequestConflict" in str(e):
            raise FileExistsError(path) from e
        raise


class _Lease:
    def __init__(self, fs, directory: str, lease_seconds: float):
        self.fs, self.dir, self.seconds = fs, directory, lease_seconds
        self.path = directory
        self.gen: int | None = None
        self.info: dict = {}
        self.lost = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _file(self, gen: int) -> str:
        return _join(self.dir, f"{gen:012d}.json")

    def _gens(self) -> list[int]:
        self.fs.invalidate_cache(self.dir)
        try:
            names = self.fs.ls(self.dir, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            base = n.rstrip("/").rsplit("/", 1)[-1]
            if base.endswith(".json") and base[:-5].isdigit():
                out.append(int(base[:-5]))
        return sorted(out)

    def _read(self, gen: int) -> dict | None:
        try:
            with self.fs.open(self._file(gen), "rb") as f:
                return json.loads(f.read())
        except (FileNotFoundError, ValueError):
            return None   # released or still being written: look again

    def try_acquire(self, info: dict) -> bool | str:
        gens = self._gens()
        gen = 1
        if gens:
            top = self._read(gens[-1])
            if top is None:
                return ""
            if top.get("expires", 0) > time.time():
                return _describe(top)
            log.warning("%s: lease %d of %s expired; taking over", self.dir, gens[-1], _describe(top))
            gen = gens[-1] + 1
        if _is_local(self.fs):
            self.fs.makedirs(self.dir, exist_ok=True)
        self.info = dict(info, expires=time.time() + self.seconds)
        try:
            _create_exclusive(self.fs, self._file(gen), json.dumps(self.info).encode())
        except FileExistsError:
            return ""
        self.gen = gen
        for g in gens:   # superseded leases of dead holders: safe to drop, ours is above them
            with contextlib.suppress(OSError):
                self.fs.rm(self._file(g))
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lease-{gen}", daemon=True)
        self._beat.start()
        return True

    def _heartbeat(self) -> None:
        gen = self.gen
        assert gen is not None
        while not self._stop.wait(self.seconds / 3):
            try:
                if self._gens()[-1:] != [gen] or time.time() > self.info["expires"]:
                    self.lost = True
                    log.error("%s: lease %s was lost (expired or taken over)", self.dir, gen)
                    return
                self.info["expires"] = time.time() + self.seconds
                with self.fs.open(self._file(gen), "wb") as f:
                    f.write(json.dumps(self.info).encode())
            except Exception as e:  # noqa: BLE001 - a failed renewal is retried at the next beat
                log.warning("%s: could not renew lease %s: %s", self.dir, self.gen, e)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        if self.gen is not None and not self.lost:
            with contextlib.suppress(OSError):
                self.fs.rm(self._file(self.gen))
        self.gen = None


class Builder:
    """The staging area of one dataset under construction. Re-creatable in any process."""

    def __init__(self, store: Store, stage: str, fp: str):
        self.store, self.stage, self.fingerprint = store, stage, fp
        self.fs = store.fs
        self.final = store.own(stage, fp)
        self._staging = (stage, f".staging-{fp}" if store.local else fp)   # below the store's root
        self.dir = store.own(*self._staging)
        for sub in (_RECORDS, _SHARDS):
            self.fs.makedirs(store.own(*self._staging, sub), exist_ok=True)
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

    def discard(self, rel: str) -> None:
        """Forget a file written by a shard that then failed (its record first, then the file), so
        a partial shard never reaches the manifest; the retry writes it again."""
        for p in (_join(self.dir, _RECORDS, self._record_name(rel)), _join(self.dir, rel)):
            try:
                self.fs.rm(p)
            except FileNotFoundError:
                pass

    # -- writing
    def _dest(self, rel: str) -> str:
        """Staging path of ``rel`` (its folder created); refuses paths that leave the dataset."""
        problem = path_problem(rel)
        if problem:
            raise ValueError(f"{self.stage}: cannot write {problem}")
        dest = self.store.own(*self._staging, rel)
        self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
        return dest

    def write_table(self, rel: str, table, **extra) -> dict:
        """Write a pyarrow Table atomically as Parquet (``.parquet``) or Arrow IPC (``.arrow``):
        locally into a temporary file, fsynced, then renamed (removed if writing fails)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not rel.endswith((".arrow", ".parquet")):
            raise ValueError(f"{rel}: write_table needs a .parquet or .arrow name")
        dest = self._dest(rel)

        def write(f) -> None:
            if rel.endswith(".arrow"):
                with pa.ipc.new_file(f, table.schema) as w:
                    w.write_table(table)
            else:
                pq.write_table(table, f, compression="zstd")

        if self.store.local:
            with _local_atomic(dest) as f:
                write(f)
        else:
            with self.fs.open(dest, "wb") as f:
                write(f)
        digest, size = sha256_file(self.fs, dest)
        return self._write_record({"path": rel, "rows": table.num_rows, "bytes": size, "sha256": digest, **extra})

    def write_bytes(self, rel: str, data: bytes, **extra) -> dict:
        dest = self._dest(rel)
        _atomic_write_bytes(self.fs, dest, data)
        return self._write_record({"path": rel, "rows": None, "bytes": len(data),
                                   "sha256": hashlib.sha256(data).hexdigest(), **extra})

    def put_file(self, local_path: str | os.PathLike, rel: str, **extra) -> dict:
        dest = self._dest(rel)
        if self.store.local:
            with open(local_path, "rb") as src, _local_atomic(dest) as f:
                shutil.copyfileobj(src, f, 1 << 20)
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
        inputs = list(inputs)  # the card (a record, so the manifest lists it) and the manifest both read them
        code_version = f"refinery-{REFINERY_VERSION}/{self.stage}-v{version}"
        write_card(self, code_version=code_version, inputs=inputs, counts=counts or {})
        files = self.records()
        manifest = {
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "code_version": code_version,
            "inputs": list(inputs),
            "config": config,
            "files": files,
            "totals": totals(files),
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
        self._check_before_publish(manifest)
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
            # Only without the writer lock (see Store.lock): another process published the same
            # fingerprint first; its copy is as good as ours if it is intact.
            if self.store.get(self.stage, self.fingerprint) is None:
                raise
            shutil.rmtree(self.dir, ignore_errors=True)
        _fsync_dir(os.path.dirname(self.final))
        return Dataset.open(self.final)

    def _check_before_publish(self, manifest: dict) -> None:
        """Nothing damaged or temporary gets published: every recorded file must be there with its
        recorded size (else the staging folder is moved aside and the stage fails: a rerun
        rebuilds it); data parts without a record and leftover ``*.tmp-*`` files (a write
        interrupted by a full disk, a kill) are deleted, since an open refuses unlisted parts."""
        held = _HELD.get(WriterLock.key_of(self.store, self.stage, self.fingerprint))
        if held is not None and held.lost:
            raise RuntimeError(f"{self.stage} {self.fingerprint}: the writer lease expired while building "
                               "(another run may have taken over); not publishing")
        problems = manifest_problems(manifest) or size_problems(self.fs, self.dir, manifest["files"])
        if problems:
            where = self.store.quarantine(self.stage, self.fingerprint, self.dir,
                                          f"{self.path('')}: not published, staged files are damaged: "
                                          + _summary(problems))
            raise DatasetCorrupt(f"{self.stage} {self.fingerprint}: staged files are damaged "
                                 f"({_summary(problems)}); moved aside to {where}; a rerun rebuilds them")
        for name in _unrecorded_parts(self.fs, self.dir, manifest["files"]):
            if _TMP_MARK not in name:   # temporary files: below
                log.warning("%s: %s has no record (its writer stopped before recording it), so it is "
                            "not data; removing it before publishing", self.stage, name)
                self.fs.rm(self.store.own(*self._staging, name), recursive=True)
        if self.store.local:
            for folder, _, names in os.walk(self.dir):
                for name in names:
                    if _TMP_MARK in name:
                        log.info("%s: removing temporary file %s before publishing", self.stage, name)
                        os.unlink(os.path.join(folder, name))
