"""The ``tokenize`` stage: documents (Parquet parts) -> token shards (Arrow IPC, see shards.py).

Sharded: one shard per input Parquet part, so parts tokenize in parallel on any task runner; within
a part, ``encode_batch_fast`` tokenizes ``batch_docs`` documents at a time (multi-threaded in Rust
unless ``TOKENIZERS_PARALLELISM=false``). Every document is followed by EOS. Special-token strings
that occur literally in a document's text are encoded as ordinary text, so a document can never
forge a document boundary. A null text is counted (``dropped.null_text``) and skipped, an empty
text likewise (``dropped.empty``), and so is a binary text that is not UTF-8
(``dropped.invalid_utf8``); an unreadable part is named in the error.
"""
from __future__ import annotations

import functools
import time
from typing import Literal

import numpy as np
from pydantic import Field
from refinery.tasks.config import StrictModel

from refinery.tasks.runtime import ShardedStage, StageOutput, stage
from refinery.tasks.tokens.shards import TOKENIZER_DIR, ShardWriter, token_dtype, token_manifest


class TokenizeConfig(StrictModel):
    max_tokens_per_file: int = Field(100_000_000, ge=1, description="Target size of a token file in tokens "
                                     "(cut at document boundaries); a larger input part gives several files.")
    batch_tokens: int = Field(1 << 20, ge=1, description="Tokens per Arrow record batch inside a file.")
    batch_docs: int = Field(1024, ge=1, description="Documents per encode_batch call.")
    dtype: Literal["auto", "uint16", "uint32"] = Field("auto", description="Token dtype; auto = uint16 when the vocabulary fits.")
    text_field: str = Field("text", description="Column holding the text.")
    id_field: str = Field("id", description="Column holding the document id (recorded in the document index).")


@functools.lru_cache(maxsize=4)
def load_fast_tokenizer(tokenizer_ds: str, sha256: str | None = None):
    """The ``tokenizers.Tokenizer`` of a tokenizer dataset, with literal special tokens encoded as
    text (cached per process: tokenizer.json is parsed once per worker, not per shard)."""
    import hashlib

    from tokenizers import Tokenizer

    from refinery.tasks.store import Dataset

    tokenizer_json = f"{Dataset.open(tokenizer_ds).local_path()}/tokenizer.json"
    if sha256 is not None:
        with open(tokenizer_json, "rb") as fh:
            if hashlib.sha256(fh.read()).hexdigest() != sha256:
                raise ValueError(f"{tokenizer_json}: sha256 differs from the tokenizer manifest's {sha256}")
    try:
        tok = Tokenizer.from_file(tokenizer_json)
    except Exception as e:  # tokenizers raises a plain Exception on malformed files
        raise ValueError(f"{tokenizer_json}: unreadable tokenizer: {e}") from e
    tok.encode_special_tokens = True
    return tok


def encode_docs(tok, texts: list[str], eos_id: int, dtype: str) -> list[np.ndarray]:
    """Token arrays of ``texts``, each followed by ``eos_id``."""
    encs = tok.encode_batch_fast(texts, add_special_tokens=False)
    out = []
    for e in encs:
        ids = e.ids
        arr = np.empty(len(ids) + 1, dtype=dtype)
        arr[:-1] = ids
        arr[-1] = eos_id
        out.append(arr)
    return out


def _tokenizer_of(ds) -> tuple[str, dict]:
    info = ds.manifest.get("tokenizer")
    if not info or "eos_id" not in info:
        raise ValueError(f"{ds.path}: not a tokenizer dataset (no 'tokenizer' in its manifest)")
    return ds.local_path(), info


@stage("tokenize", version="1", sharded=True)
class Tokenize(ShardedStage):
    """inputs = [documents dataset, tokenizer dataset(, holdout dataset)] -> token shards + manifest.
    The documents of the optional holdout dataset (refinery.tasks.tokens.holdout) are skipped."""

    @staticmethod
    def plan(inputs, cfg: TokenizeConfig) -> list[dict]:
        if len(inputs) not in (2, 3):
            raise ValueError("tokenize takes two or three inputs: a documents dataset, a tokenizer dataset "
                             "and optionally a holdout dataset")
        docs, tok_ds = inputs[:2]
        held = {"path": inputs[2].path, "fingerprint": inputs[2].fingerprint} if len(inputs) == 3 else None
        tok_dir, info = _tokenizer_of(tok_ds)
        dtype = token_dtype(info["vocab_size"]) if cfg.dtype == "auto" else cfg.dtype
        if dtype == "uint16" and info["vocab_size"] > 1 << 16:
            raise ValueError(f"dtype uint16 cannot hold a vocabulary of {info['vocab_size']}")
        return [{"name": f"part-{i:05d}", "part": i, "file": path, "tokenizer": tok_ds.path, "sha256": info["sha256"],
                 "eos_id": int(info["eos_id"]), "dtype": dtype, "holdout": held}
                for i, path in enumerate(docs.files)]

    @staticmethod
    def shard(b, item: dict, cfg: TokenizeConfig) -> dict:
        import fsspec
        import pyarrow.parquet as pq

        tok = load_fast_tokenizer(item["tokenizer"], item["sha256"])
        writer = ShardWriter(b, item["part"], item["dtype"], cfg.max_tokens_per_file, cfg.batch_tokens)
        docs_in = docs_out = null_text = empty = bad_utf8 = chars = held_out = 0
        encode_s = 0.0
        held = _heldout_ids(item.get("holdout"))
        path = item["file"]
        try:
            fs, fs_path = fsspec.core.url_to_fs(path)
            f = fs.open(fs_path, "rb")
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: unreadable documents part: {e}") from e
        if cfg.text_field not in names:
            raise ValueError(f"{path}: no '{cfg.text_field}' column (columns: {names})")
        cols = [cfg.text_field] + ([cfg.id_field] if cfg.id_field in names else [])
        from tqdm.auto import tqdm
        from refinery.tasks.progress import bar_disabled

        bar = tqdm(total=pf.metadata.num_rows, unit="doc", desc=f"tokenize {item['name']}", disable=bar_disabled(), leave=False)
        with f, bar:
            try:
                batches = pf.iter_batches(batch_size=cfg.batch_docs, columns=cols)
                for batch in batches:
                    bar.update(batch.num_rows)
                    texts = batch.column(0).to_pylist()
                    ids = batch.column(1).to_pylist() if len(cols) > 1 else \
                        [f"{item['part']}:{docs_in + i}" for i in range(len(texts))]
                    docs_in += len(texts)
                    keep_t, keep_i = [], []
                    for t, d in zip(texts, ids):
                        if held and d is not None and str(d) in held:   # held out: never trained on
                            held_out += 1
                            continue
                        if isinstance(t, bytes):  # a binary text column: keep what is valid UTF-8
                            try:
                                t = t.decode("utf-8")
                            except UnicodeDecodeError:
                                bad_utf8 += 1
                                continue
                        if t is None:
                            null_text += 1
                        elif not t:
                            empty += 1
                        else:
                            keep_t.append(t)
                            keep_i.append("" if d is None else str(d))
                    if not keep_t:
                        continue
                    e0 = time.perf_counter()
                    arrays = encode_docs(tok, keep_t, item["eos_id"], item["dtype"])
                    encode_s += time.perf_counter() - e0
                    chars += sum(len(t) for t in keep_t)
                    docs_out += len(keep_t)
                    writer.add(arrays, keep_i)
            except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
                raise ValueError(f"{path}: unreadable documents part: {e}") from e
        writer.flush()
        tokens = sum(x["tokens"] for x in writer.files)
        return {"docs_in": docs_in, "docs_out": docs_out, "tokens": tokens, "chars": chars,
                "dropped": {"null_text": null_text, "empty": empty, "invalid_utf8": bad_utf8},
                "files": writer.files, "encode_seconds": round(encode_s, 4), "held_out": held_out}

    @staticmethod
    def reduce(b, results: list[dict], cfg: TokenizeConfig, inputs) -> StageOutput:
        from refinery.tasks.runtime import sum_counts

        docs, tok_ds = inputs[:2]
        tok_dir, info = _tokenizer_of(tok_ds)
        files = [f for r in results for f in r["files"]]
        _put_tokenizer(b, tok_dir)
        dtype = (token_dtype(info["vocab_size"]) if cfg.dtype == "auto" else cfg.dtype)
        extra = token_manifest(files, dtype=dtype, vocab_size=info["vocab_size"], eos_id=info["eos_id"],
                               tokenizer={"path": tok_ds.path, "sha256": info["sha256"], "dir": TOKENIZER_DIR,
                                          "fingerprint": tok_ds.fingerprint, "eos_token": info.get("eos_token")})
        c = sum_counts([{k: r[k] for k in ("docs_in", "docs_out", "tokens", "chars", "dropped")} for r in results])
        c.setdefault("dropped", {"null_text": 0, "empty": 0, "invalid_utf8": 0})
        for k in ("docs_in", "docs_out", "tokens", "chars"):
            c.setdefault(k, 0)
        c["files"] = len(files)
        if len(inputs) == 3:   # the held-out documents: a documents dataset of their own, for evaluation
            c["held_out"] = sum(r.get("held_out", 0) for r in results)
            extra["holdout"] = {"path": inputs[2].path, "fingerprint": inputs[2].fingerprint,
                                "docs": inputs[2].counts.get("docs_out")}
        shard_s = b.shard_seconds()   # the runtime times every shard (its shard_seconds stat)
        enc_s = sum(r["encode_seconds"] for r in results)
        stats = {
            "encode_seconds": round(enc_s, 3),
            "tokens_per_sec_per_shard": round(c["tokens"] / shard_s, 1) if shard_s else None,
            "chars_per_token": round(c["chars"] / max(1, c["tokens"] - c["docs_out"]), 4),
            "tokens_per_doc": round(c["tokens"] / max(1, c["docs_out"]), 2),
        }
        return StageOutput(counts=c, stats=stats, extra=extra)


def _heldout_ids(ref: dict | None) -> frozenset[str]:
    if not ref:
        return frozenset()
    from refinery.tasks.tokens.holdout import heldout_ids

    return heldout_ids(ref["path"], ref["fingerprint"])


def _put_tokenizer(b, tok_dir: str) -> None:
    """Copy the tokenizer's Hugging Face files (not its dataset manifest or card) into ``tokenizer/``."""
    from pathlib import Path

    for p in sorted(Path(tok_dir).iterdir()):
        if p.is_file() and p.name not in ("manifest.json", "README.md"):
            b.put_file(p, f"{TOKENIZER_DIR}/{p.name}")


__all__ = ["Tokenize", "TokenizeConfig", "encode_docs", "load_fast_tokenizer"]
