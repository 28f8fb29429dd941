"""Input files: resolve paths/globs/URLs deterministically, identify them, sniff their format;
retry transient I/O errors; keep credentials out of configs.

Credentials: storage options whose name looks like a secret (key, secret, token, password,
credential, auth...) are refused (:func:`check_storage_options`), as are URLs with a password in
them (:func:`check_url`): configs travel into fingerprints, manifests, Prefect flow-run parameters
and logs. fsspec backends read credentials from the environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``GOOGLE_APPLICATION_CREDENTIALS``,
``AZURE_STORAGE_*``) or from a Prefect credentials block loaded in code; neither reaches a config.
"""
from __future__ import annotations

import bz2
import logging
import lzma
import os
import random
import time
import zlib
from typing import IO, Callable, TypeVar

import fsspec

# the secret checks live with the config base model, so flow parameters use them too (re-exported)
from refinery.tasks.config import SECRET_HINT, check_storage_options, check_url, secret_option_paths  # noqa: F401

log = logging.getLogger("refinery.ingest")
T = TypeVar("T")

FORMATS = ("auto", "warc", "wet", "arc", "jsonl", "parquet")
_GLOB_CHARS = "*?["


class UnknownFormat(ValueError):
    """The file is none of the formats ingest reads."""


# --------------------------------------------------------------------------- transient errors
READ_ATTEMPTS = 4            # one try and three retries
RETRY_BASE_SECONDS = 1.0     # backoff 1, 2, 4 s (times a 0.5-1 jitter)

# OSErrors that say the file is absent, forbidden or not gzip: another try gives the same answer.
_PERMANENT_OS_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, IsADirectoryError,
                                                         NotADirectoryError, PermissionError)


def is_transient(e: BaseException) -> bool:
    """Whether an error is worth another try: I/O errors (``OSError``: connection resets, timeouts,
    S3 throttling as s3fs raises them) and aiohttp's connection/5xx errors; not a missing or
    forbidden file, not bad content."""
    import gzip

    if isinstance(e, _PERMANENT_OS_ERRORS + (gzip.BadGzipFile,)):
        return False
    if isinstance(e, OSError):
        return True
    if type(e).__module__.split(".")[0] == "aiohttp":  # fsspec's HTTP filesystem
        status = getattr(e, "status", None)
        return status is None or status >= 500 or status == 429
    return False


def with_retries(fn: Callable[[], T], what: str, cleanup: Callable[[], None] | None = None) -> T:
    """``fn()``, tried up to :data:`READ_ATTEMPTS` times with exponential backoff while it raises a
    transient error (:func:`is_transient`); ``cleanup()`` runs before each retry (forget partial
    output). Each retry is logged with ``what`` (the file's name); the last error is raised."""
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == READ_ATTEMPTS or not is_transient(e):
                raise
            delay = RETRY_BASE_SECONDS * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
            log.warning("%s: %s: %s (attempt %d of %d); retrying in %.1f s", what, type(e).__name__,
                        str(e)[:300], attempt, READ_ATTEMPTS, delay)
            if cleanup is not None:
                cleanup()
            time.sleep(delay)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- paths
def _has_glob(path: str) -> bool:
    return any(c in path for c in _GLOB_CHARS)


def url_to_fs(path: str, storage_options: dict | None = None):
    return fsspec.core.url_to_fs(path, **(storage_options or {}))


def _full(fs, p: str) -> str:
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        return os.path.abspath(p)
    return fs.unstrip_protocol(p)


def resolve_paths(path: str, storage_options: dict | None = None) -> list[str]:
    """The files a path, glob or URL names, sorted; a glob that matches nothing is an error."""
    fs, fs_path = url_to_fs(path, storage_options)
    if _has_glob(fs_path):
        found = sorted(p for p in fs.glob(fs_path) if not fs.isdir(p))
        if not found:
            raise FileNotFoundError(f"input glob {path!r} matches no file")
        return [_full(fs, p) for p in found]
    return [_full(fs, fs_path)]


def identity(path: str, storage_options: dict | None = None) -> str:
    """``url|size|version`` (ETag or modification time): the runtime's one rule for raw input
    files, :func:`refinery.tasks.runtime.file_identity`. Unreadable: its error shows up in the shard."""
    from refinery.tasks.runtime import file_identity

    return file_identity(path, storage_options)


def open_binary(path: str, storage_options: dict | None = None) -> IO[bytes]:
    """A seekable binary file object for a local path or fsspec URL."""
    fs, fs_path = url_to_fs(path, storage_options)
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        return open(fs_path, "rb", buffering=1 << 20)
    return fs.open(fs_path, "rb")


def _peek_decompressed(head: bytes) -> tuple[str | None, bytes]:
    """(compression, first decompressed bytes) from the first bytes of a file."""
    try:
        if head[:3] == b"\x1f\x8b\x08":
            return "gzip", zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 4096)
        if head[:3] == b"BZh":
            return "bz2", bz2.BZ2Decompressor().decompress(head)[:4096]
        if head[:6] == b"\xfd7zXZ\x00":
            return "xz", lzma.LZMADecompressor().decompress(head, 4096)
        if head[:4] == b"\x28\xb5\x2f\xfd":
            try:
                import zstandard
            except ImportError:
                return "zstd", b""
            return "zstd", zstandard.ZstdDecompressor().decompressobj().decompress(head)[:4096]
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError):
        return "broken", b""
    return None, head


def _magic(head: bytes) -> str | None:
    return {b"\x1f\x8b": "gzip", b"BZ": "bz2", b"\xfd7": "xz", b"\x28\xb5": "zstd"}.get(head[:2])


def sniff(f: IO[bytes], name: str = "") -> tuple[str, str | None]:
    """(format, compression) of a file from its content (magic bytes), not its name.

    format is one of warc (also WET: the record types tell them apart), arc, jsonl, parquet.
    """
    head = f.read(65536)
    f.seek(0)
    if not head:
        raise UnknownFormat(f"{name}: empty file")
    if head[:4] == b"PAR1":
        return "parquet", None
    comp, data = _peek_decompressed(head)
    if comp == "broken":
        raise UnknownFormat(f"{name}: looks {_magic(head)}-compressed but does not decompress")
    text = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"WARC/"):
        return "warc", comp
    if text.startswith(b"filedesc://"):
        return "arc", comp
    if text.startswith(b"{"):
        return "jsonl", comp
    # The file's bytes are not quoted: they reach logs and artifacts, and may be anything.
    kind = "text" if text[:512].isascii() and b"\x00" not in text[:512] else "binary data"
    raise UnknownFormat(f"{name}: not a WARC/WET/ARC/JSONL/Parquet file (it starts with {kind} that matches "
                        "none of their signatures)")
