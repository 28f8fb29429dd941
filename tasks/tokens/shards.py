"""The token shard layout (ARCHITECTURE.md, section 5): writing and memory-mapped reading.

A token dataset directory holds::

    part-SSSSS-FFF.arrow          Arrow IPC *file* format, one column ``tokens`` (uint16 when the
                                  vocabulary fits, else uint32), no nulls, written as record batches
                                  of ``batch_tokens`` tokens: a flat token stream, documents back to
                                  back, each ending with EOS. Memory-mapping it gives numpy views of
                                  each record batch with no copy.
    index/docs-SSSSS-FFF.arrow    the documents of that file: ``offset`` (uint64, first token of the
                                  document in the file), ``length`` (uint32, tokens including EOS),
                                  ``id`` (string, the document id).
    tokenizer/                    a copy of the tokenizer (Hugging Face format), so the dataset is
                                  self-contained wherever it is copied.
    manifest.json                 ``dtype``, ``vocab_size``, ``eos_id``, ``total_tokens``,
                                  ``documents``, ``tokens_per_file``, ``documents_per_file``,
                                  ``token_files`` (ordered), ``tokenizer`` {path, sha256, dir}.

``SSSSS`` is the input part's index and ``FFF`` the file's index within that part (a part whose
tokens exceed ``max_tokens_per_file`` is cut at a document boundary into several files).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

TOKENS_COLUMN = "tokens"
INDEX_DIR = "index"
TOKENIZER_DIR = "tokenizer"


def token_dtype(vocab_size: int) -> str:
    """``uint16`` when every id fits (vocab_size <= 65,536, ids 0..65,535), else ``uint32``."""
    return "uint16" if int(vocab_size) <= 1 << 16 else "uint32"


def token_file_name(part: int, k: int) -> str:
    return f"part-{part:05d}-{k:03d}.arrow"


def index_file_name(token_file: str) -> str:
    return f"{INDEX_DIR}/docs-{token_file.removeprefix('part-')}"


def tokens_table(tokens: np.ndarray, dtype: str, batch_tokens: int):
    """A one-column table whose chunks become the file's record batches."""
    import pyarrow as pa

    tokens = np.ascontiguousarray(tokens, dtype=dtype)
    step = max(1, int(batch_tokens))
    chunks = [pa.array(tokens[i: i + step]) for i in range(0, len(tokens), step)] or [pa.array(tokens)]
    return pa.table({TOKENS_COLUMN: pa.chunked_array(chunks, type=pa.from_numpy_dtype(np.dtype(dtype)))})


def docs_table(offsets: np.ndarray, lengths: np.ndarray, ids: list[str]):
    import pyarrow as pa

    return pa.table({"offset": pa.array(np.asarray(offsets, dtype=np.uint64)),
                     "length": pa.array(np.asarray(lengths, dtype=np.uint32)),
                     "id": pa.array(ids, type=pa.string())})


class ShardWriter:
    """Collects documents' token arrays of one input part and writes token files of at most
    ``max_tokens`` tokens (cut at document boundaries; a single longer document gets its own file)."""

    def __init__(self, b, part: int, dtype: str, max_tokens: int, batch_tokens: int):
        self.b, self.part, self.dtype = b, part, dtype
        self.max_tokens, self.batch_tokens = int(max_tokens), int(batch_tokens)
        self.files: list[dict] = []
        self._arrays: list[np.ndarray] = []
        self._ids: list[str] = []
        self._n = 0

    def add(self, doc_tokens: list[np.ndarray], ids: list[str]) -> None:
        for arr, doc_id in zip(doc_tokens, ids):
            if self._n and self._n + len(arr) > self.max_tokens:
                self.flush()
            self._arrays.append(arr)
            self._ids.append(doc_id)
            self._n += len(arr)

    def flush(self) -> None:
        if not self._arrays:
            return
        lengths = np.fromiter((len(a) for a in self._arrays), dtype=np.int64, count=len(self._arrays))
        offsets = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        tokens = np.concatenate(self._arrays).astype(self.dtype, copy=False)
        name = token_file_name(self.part, len(self.files))
        idx_name = index_file_name(name)
        self.b.write_table(idx_name, docs_table(offsets, lengths, self._ids))
        rec = self.b.write_table(name, tokens_table(tokens, self.dtype, self.batch_tokens),
                                 tokens=int(len(tokens)), documents=len(lengths), index=idx_name)
        self.files.append({"path": name, "tokens": int(len(tokens)), "documents": int(len(lengths)),
                           "index": idx_name, "sha256": rec["sha256"]})
        self._arrays, self._ids, self._n = [], [], 0


# ----------------------------------------------------------------------------- reading
class MappedTokenFile:
    """One token file, memory-mapped: ``chunks`` are zero-copy numpy views of its record batches."""

    def __init__(self, path: str):
        import pyarrow as pa
        import pyarrow.ipc as ipc

        self.path = path
        try:
            self._mmap = pa.memory_map(path, "r")
            reader = ipc.open_file(self._mmap)
        except (OSError, pa.ArrowInvalid) as e:
            raise ValueError(f"{path}: not a readable Arrow IPC token file: {e}") from e
        if reader.schema.names[:1] != [TOKENS_COLUMN]:
            raise ValueError(f"{path}: expected a '{TOKENS_COLUMN}' column, found {reader.schema.names}")
        self.dtype = reader.schema.field(TOKENS_COLUMN).type.to_pandas_dtype()
        self.chunks: list[np.ndarray] = []
        for i in range(reader.num_record_batches):
            col = reader.get_batch(i).column(0)
            if col.null_count:
                raise ValueError(f"{path}: record batch {i} has null tokens")
            if len(col):
                self.chunks.append(col.to_numpy(zero_copy_only=True))
        self.num_tokens = int(sum(len(c) for c in self.chunks))

    def read_all(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=self.dtype)


def read_docs_index(path: str):
    import pyarrow as pa
    import pyarrow.ipc as ipc

    with pa.memory_map(path, "r") as m:
        return ipc.open_file(m).read_all()


def token_files_of(manifest: dict, root: str) -> list[str]:
    """Local paths of a token dataset's token files, in manifest order."""
    names = manifest.get("token_files")
    if names is None:
        names = [f["path"] for f in manifest.get("files", []) if f["path"].endswith(".arrow")
                 and os.path.basename(f["path"]).startswith("part-")]
    return [os.path.join(root, n) for n in names]


def tokenizer_dir_of(manifest: dict, root: str) -> str:
    """The tokenizer folder of a token dataset: its own copy when present, else the recorded path."""
    tok: dict[str, Any] = manifest.get("tokenizer") or {}
    own = os.path.join(root, tok.get("dir") or TOKENIZER_DIR)
    if os.path.exists(os.path.join(own, "tokenizer.json")):
        return own
    if tok.get("path"):
        return tok["path"]
    raise ValueError(f"{root}: the token manifest names no tokenizer")


def token_manifest(files: list[dict], *, dtype: str, vocab_size: int, eos_id: int, tokenizer: dict) -> dict:
    """The token-specific manifest keys (StageOutput.extra) from the written files' records."""
    return {
        "dtype": dtype,
        "vocab_size": int(vocab_size),
        "eos_id": int(eos_id),
        "total_tokens": int(sum(f["tokens"] for f in files)),
        "documents": int(sum(f["documents"] for f in files)),
        "token_files": [f["path"] for f in files],
        "tokens_per_file": {f["path"]: int(f["tokens"]) for f in files},
        "documents_per_file": {f["path"]: int(f["documents"]) for f in files},
        "tokenizer": tokenizer,
        "layout": {"format": "arrow-ipc-file", "column": TOKENS_COLUMN, "index_dir": INDEX_DIR,
                   "doc_separator": "eos_after_each_document"},
    }
