"""Training records from wherever users keep them, read streaming and identified like raw inputs.

One reader for the data of every training stage (finetune's instruction files, align's preference
pairs, unpaired KTO examples and GRPO prompts). A location is a local path or an fsspec URL
(``s3://``, ``gs://``, ``memory://`` ...); credentials and storage options come from the
environment only (see :mod:`refinery.tasks.ingest.sources`), never from a config. What it names:

* **a file**, its format found from its content (the name only breaks ties):

  - JSONL: one record per line (records numbered by line; a line that is not JSON is an
    :class:`InvalidRecord`, counted by the caller, and reading goes on);
  - JSON: a list of records, or an object holding the list under ``data``, ``train``,
    ``examples``, ``records`` or ``pairs`` (records numbered from 1); a file that is not valid JSON
    raises :class:`ValueError` naming it;
  - either of them gzipped;
  - Parquet (read by row group batch) or Arrow IPC (stream or file; what ``save_to_disk`` writes).
    Columns a row leaves empty (``None``) are left out of its record, as a JSON record would;

* **a folder**, read the way ``datasets.load_dataset`` would:

  - a refinery dataset (``manifest.json``: the data parts it lists, ``part-*.parquet``, not its side
    tables; a curated output included);
  - a Hugging Face ``save_to_disk`` folder (``state.json``: its Arrow files; a ``DatasetDict``
    folder, ``dataset_dict.json``: its ``train`` split, or its only one);
  - any other folder: its data files (``.parquet``, ``.arrow``, ``.jsonl``, ``.json``, gzipped
    JSON), recursively, sorted; when some of them are named for the ``train`` split (as
    ``load_dataset`` would use), only those. Record numbers run on across the files.

Nothing holds a whole file: JSONL is read line by line, JSON lists element by element
(``json.JSONDecoder.raw_decode`` over a sliding buffer), Parquet and Arrow batch by batch.

:func:`identity` gives the fingerprint identity: a file's is the runtime's one rule for raw inputs
(:func:`refinery.tasks.runtime.file_identity`: location, size, mtime or ETag); a refinery
dataset's is its fingerprint; another folder's is a hash of its data files' identities.

Light module: no torch; pyarrow is imported only for Parquet and Arrow.
"""
from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import os
import re
from typing import IO, Any, Iterator

# keys under which a JSON object holds its list of records, in order of preference
LIST_KEYS = ("data", "train", "examples", "records", "pairs")
DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".jsonl.gz", ".json.gz")
BATCH_ROWS = 1024                 # Parquet / Arrow rows turned into records at a time
_CHUNK = 1 << 20                  # characters read at a time from a JSON document
_GZIP = b"\x1f\x8b"
# how `datasets` tells a train-split file from its name (its default patterns, split "train")
_TRAIN_NAME = re.compile(r"(^|[-._ /\\])(train|training)([-._ 0-9/\\]|$)")


class DataFileNotFound(FileNotFoundError, ValueError):
    """The data location does not exist (a FileNotFoundError, and a ValueError like every other
    unreadable input)."""


class InvalidRecord:
    """A record that is not JSON (a JSONL line that does not parse); ``message`` says why."""

    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message

    def __repr__(self) -> str:
        return f"InvalidRecord({self.message!r})"


# --------------------------------------------------------------------------- locations
def _fs(path: str):
    from refinery.tasks.ingest.sources import url_to_fs

    return url_to_fs(path)   # storage options: none; fsspec takes credentials from the environment


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _location(fs, fs_path: str) -> str:
    return os.path.abspath(fs_path) if _is_local(fs) else fs.unstrip_protocol(fs_path)


def _join(base: str, rel: str) -> str:
    return base.rstrip("/") + "/" + rel.lstrip("/")


def _read_json_file(fs, fs_path: str) -> Any:
    with fs.open(fs_path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def data_files(path: str | os.PathLike) -> list[str]:
    """The files a location names, in reading order (fs paths of its filesystem); a folder is
    resolved as the module docstring says. Raises FileNotFoundError / ValueError naming it."""
    path = os.fspath(path)
    fs, fs_path = _fs(path)
    try:
        is_dir = fs.isdir(fs_path)
        if not is_dir and not fs.exists(fs_path):
            raise DataFileNotFound(f"{path}: data file not found")
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ValueError(f"{path}: cannot reach the data: {e}") from e
    if not is_dir:
        return [fs_path]
    return _folder_files(fs, fs_path, path)


def _folder_files(fs, root: str, shown: str) -> list[str]:
    names = {os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)}
    if "manifest.json" in names:   # a refinery dataset: its parts, as the manifest lists them
        manifest = _read_json_file(fs, _join(root, "manifest.json"))
        from refinery.tasks.card import is_data_file

        parts = sorted(f["path"] for f in manifest.get("files") or [] if is_data_file(str(f.get("path", ""))))
        if not parts:
            raise ValueError(f"{shown}: the refinery dataset lists no data parts (part-*.parquet)")
        return [_join(root, p) for p in parts]
    if "dataset_dict.json" in names:   # a DatasetDict saved with save_to_disk: its train split
        splits = _read_json_file(fs, _join(root, "dataset_dict.json")).get("splits") or []
        if "train" in splits:
            split = "train"
        elif len(splits) == 1:
            split = splits[0]
        else:
            raise ValueError(f"{shown}: a saved DatasetDict with splits {splits} and no 'train' split; "
                             "name the split's folder")
        return _folder_files(fs, _join(root, split), _join(shown, split))
    if "state.json" in names:   # a Dataset saved with save_to_disk
        state = _read_json_file(fs, _join(root, "state.json"))
        files = [f["filename"] for f in state.get("_data_files") or []]
        if not files:
            raise ValueError(f"{shown}: state.json lists no data files")
        return [_join(root, f) for f in files]
    found = []
    for p in sorted(fs.find(root)):
        rel = p[len(root.rstrip("/")) + 1:] if p.startswith(root.rstrip("/") + "/") else os.path.basename(p)
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue   # hidden, staging and side files (as load_dataset skips them)
        if rel.endswith(DATA_SUFFIXES) and os.path.basename(rel) not in ("dataset_info.json", "state.json"):
            found.append((rel, p))
    if not found:
        raise ValueError(f"{shown}: a folder without data files ({', '.join(DATA_SUFFIXES)})")
    train = [(r, p) for r, p in found if _TRAIN_NAME.search(r.lower())]
    return [p for _, p in (train or found)]


# --------------------------------------------------------------------------- identity
def identity(path: str | os.PathLike, required: bool = False) -> str:
    """The identity of a data location in a fingerprint (see the module docstring). A missing one
    gives ``location|missing|ErrorName`` (the stage reports the error), or with ``required`` raises
    FileNotFoundError naming it."""
    from refinery.tasks.runtime import file_identity

    path = os.fspath(path)
    try:
        fs, fs_path = _fs(path)
        is_dir = fs.isdir(fs_path)
    except (OSError, ValueError) as e:
        if required:
            raise FileNotFoundError(f"{path}: {e}") from e
        return f"{path}|missing|{type(e).__name__}"
    if not is_dir:
        ident = file_identity(path)
        if required and "|missing|" in ident:
            raise FileNotFoundError(f"{path}: no such data file")
        return ident
    where = _location(fs, fs_path)
    names = {os.path.basename(p.rstrip("/")) for p in fs.ls(fs_path, detail=False)}
    if "manifest.json" in names:
        fingerprint = _read_json_file(fs, _join(fs_path, "manifest.json")).get("fingerprint")
        if fingerprint:
            return f"{where}|dataset|{fingerprint}"
    files = data_files(path)
    h = hashlib.sha256()
    for f in files:
        h.update(file_identity(_location(fs, f)).encode() + b"\n")
    return f"{where}|folder|{len(files)}|{h.hexdigest()[:32]}"


# --------------------------------------------------------------------------- reading
def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(record number, record)`` for every record a location holds, streaming; a record is parsed
    JSON (usually a dict) or an :class:`InvalidRecord`. A file that cannot be read raises
    FileNotFoundError (absent) or ValueError, naming it."""
    path = os.fspath(path)
    fs, _ = _fs(path)
    files = data_files(path)
    base = 0
    for fs_path in files:
        shown = path if len(files) == 1 else _location(fs, fs_path)
        last = 0
        for n, rec in _iter_file(fs, fs_path, shown):
            last = n
            yield base + n, rec
        base += last


def _open(fs, fs_path: str) -> Any:
    from refinery.tasks.ingest.sources import with_retries

    if _is_local(fs):
        return open(fs_path, "rb", buffering=1 << 20)
    f = with_retries(lambda: fs.open(fs_path, "rb", block_size=8 << 20), fs_path)
    return f if isinstance(f, io.BufferedIOBase) else io.BufferedReader(f, 1 << 20)   # readline(size)


def _iter_file(fs, fs_path: str, shown: str) -> Iterator[tuple[int, Any]]:
    try:
        raw = _open(fs, fs_path)
    except FileNotFoundError:
        raise DataFileNotFound(f"{shown}: data file not found") from None
    except OSError as e:
        raise ValueError(f"{shown}: unreadable data file: {e}") from e
    with raw:
        try:
            head = raw.read(8)
            raw.seek(0)
            if head[:4] == b"PAR1":
                yield from _iter_parquet(raw)
                return
            if head[:6] == b"ARROW1" or head[:4] == b"\xff\xff\xff\xff":
                yield from _iter_arrow(raw, file_format=head[:6] == b"ARROW1")
                return
            name = fs_path[:-3] if fs_path.endswith(".gz") else fs_path
            stream: Any = raw
            if head[:2] == _GZIP:
                stream = gzip.GzipFile(fileobj=raw, mode="rb")   # buffered itself
            elif fs_path.endswith(".gz"):
                raise ValueError("named .gz but not gzip-compressed")
            yield from _iter_json(stream, name)
        except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
            raise ValueError(f"{shown}: cannot read the data file: {e}") from e
        except Exception as e:   # pyarrow's errors (ArrowInvalid ...) without importing it here
            if type(e).__module__.startswith("pyarrow"):
                raise ValueError(f"{shown}: cannot read the data file: {e}") from e
            raise


def _columnar(rows: list[dict]) -> Iterator[dict]:
    for row in rows:
        yield {k: v for k, v in row.items() if v is not None}


def _iter_parquet(f: IO[bytes]) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    n = 0
    for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS):
        for rec in _columnar(batch.to_pylist()):
            n += 1
            yield n, rec


def _iter_arrow(f: IO[bytes], file_format: bool) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa

    if file_format:
        reader = pa.ipc.open_file(f)
        batches: Iterator = (reader.get_batch(i) for i in range(reader.num_record_batches))
    else:
        batches = iter(pa.ipc.open_stream(f))
    n = 0
    for batch in batches:
        for start in range(0, batch.num_rows, BATCH_ROWS):
            for rec in _columnar(batch.slice(start, BATCH_ROWS).to_pylist()):
                n += 1
                yield n, rec


def _iter_json(f: IO[bytes], name: str) -> Iterator[tuple[int, Any]]:
    """JSONL, a JSON list, or a JSON object holding the list (see the module docstring)."""
    first = b""
    lineno = 0
    while not first.strip():   # the first non-blank line tells the format apart
        line = f.readline(_CHUNK)   # at most a window: a one-line JSON document is not read whole
        if not line:
            return   # an empty file: no records
        lineno += 1
        first = line
    if lineno == 1 and first.startswith(codecs.BOM_UTF8):
        first = first[len(codecs.BOM_UTF8):]
    lead = first.lstrip()[:1]
    if lead == b"[":
        yield from _JSONStream(first, f).array()
        return
    if not first.endswith(b"\n") and len(first) >= _CHUNK:   # a long first line
        if lead == b"{" and not name.endswith(".jsonl"):   # one JSON object holding the list
            yield from _JSONStream(first, f).wrapped()
            return
        first += f.readline()   # a long JSONL record
    if lead == b"{":
        try:
            rec = json.loads(first)
        except json.JSONDecodeError:
            rec = None
        if rec is None and not name.endswith(".jsonl"):
            # not one line of JSON: a (pretty-printed) object holding the list
            yield from _JSONStream(first, f).wrapped()
            return
        if isinstance(rec, dict):
            nxt, at = f.readline(), lineno + 1
            while nxt and not nxt.strip():
                nxt, at = f.readline(), at + 1
            if not nxt and not name.endswith(".jsonl"):   # the whole document is one object
                listed = _listed(rec)
                if listed is None:
                    raise ValueError(f"a JSON object without a list under {'/'.join(LIST_KEYS)}")
                yield from enumerate(listed, 1)
                return
            yield lineno, rec
            yield from _jsonl(f, at, nxt)
            return
    yield from _jsonl(f, lineno, first)


def _listed(obj: dict) -> list | None:
    for k in LIST_KEYS:
        if isinstance(obj.get(k), list):
            return obj[k]
    return None


def _jsonl(f: IO[bytes], lineno: int, line: bytes) -> Iterator[tuple[int, Any]]:
    """Records of JSONL from ``line`` (number ``lineno``) on."""
    n = lineno
    while line:
        if line.strip():
            try:
                yield n, json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield n, InvalidRecord(getattr(e, "msg", str(e)))
        line = f.readline()
        n += 1


class _JSONStream:
    """Values of a JSON document read incrementally: the buffer holds about one element."""

    def __init__(self, head: bytes, f: IO[bytes]):
        self.text = io.TextIOWrapper(f, encoding="utf-8")
        self.buf = head.decode("utf-8")
        self.pos = 0
        self.eof = False
        self.decoder = json.JSONDecoder()

    def _more(self, at_least: int = _CHUNK) -> bool:
        if self.eof:
            return False
        if self.pos > _CHUNK:   # drop what was consumed
            self.buf, self.pos = self.buf[self.pos:], 0
        chunk = self.text.read(max(at_least, _CHUNK))
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def _peek(self) -> str:
        """The next non-whitespace character ('' at the end), not consumed."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return ""

    def _expect(self, ch: str) -> None:
        got = self._peek()
        if got != ch:
            raise ValueError(f"not valid JSON: expected {ch!r}, found {got or 'the end of the file'!r} "
                             f"(character {self.pos} of the current window)")
        self.pos += 1

    def _value(self) -> Any:
        self._peek()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                cut = e.pos >= len(self.buf) - 1 or e.msg.startswith("Unterminated string")
                if cut and self._more(len(self.buf) - self.pos):   # cut off by the window: read on
                    continue
                raise ValueError(f"not valid JSON ({e.msg})") from None
            if end == len(self.buf) and self._more():   # a number may go on in the next chunk
                continue
            self.pos = end
            return value

    def array(self) -> Iterator[tuple[int, Any]]:
        """The elements of a document that is one list."""
        yield from self.elements()
        if self._peek():
            raise ValueError("not valid JSON: more data after the list")

    def wrapped(self) -> Iterator[tuple[int, Any]]:
        """The records of ``{"data": [...], ...}``: the first key of :data:`LIST_KEYS` holding a list
        in the order the object gives them (other keys are skipped)."""
        self._expect("{")
        while True:
            if self._peek() == "}":
                break
            key = self._value()
            self._expect(":")
            if key in LIST_KEYS and self._peek() == "[":
                yield from self.elements()
                return
            self._value()
            if self._peek() == ",":
                self.pos += 1
        raise ValueError(f"a JSON object without a list under {'/'.join(LIST_KEYS)}")

    def elements(self) -> Iterator[tuple[int, Any]]:
        """``(number, element)`` of the list that starts here."""
        self._expect("[")
        n = 0
        if self._peek() == "]":
            self.pos += 1
            return
        while True:
            n += 1
            yield n, self._value()
            sep = self._peek()
            self.pos += 1
            if sep == "]":
                return
            if sep != ",":
                raise ValueError(f"not valid JSON: expected ',' or ']' after record {n}")


__all__ = ["InvalidRecord", "DataFileNotFound", "iter_records", "data_files", "identity", "LIST_KEYS", "DATA_SUFFIXES"]
