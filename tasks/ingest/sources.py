"""Input files: resolve paths/globs/URLs deterministically, identify them, sniff their format."""
from __future__ import annotations

import bz2
import lzma
import os
import zlib
from typing import IO, Any

import fsspec

FORMATS = ("auto", "warc", "wet", "arc", "jsonl", "parquet")
_GLOB_CHARS = "*?["


class UnknownFormat(ValueError):
    """The file is none of the formats ingest reads."""


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
    """``url|size|version`` where version is the ETag or modification time: changes when the file does."""
    fs, fs_path = url_to_fs(path, storage_options)
    try:
        info = fs.info(fs_path)
    except (FileNotFoundError, OSError, ValueError) as e:  # unreadable: its error shows up in the shard
        return f"{path}|missing|{type(e).__name__}"
    version: Any = None
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            version = info[key]
            break
    if hasattr(version, "isoformat"):
        version = version.isoformat()
    return f"{path}|{info.get('size')}|{version}"


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
        raise UnknownFormat(f"{name}: looks {head[:3]!r}-compressed but does not decompress")
    text = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"WARC/"):
        return "warc", comp
    if text.startswith(b"filedesc://"):
        return "arc", comp
    if text.startswith(b"{"):
        return "jsonl", comp
    raise UnknownFormat(f"{name}: not a WARC/WET/ARC/JSONL/Parquet file (it starts with {text[:24]!r})")
