"""Byte-level BPE tokenizers: train one on a documents dataset, or load an existing one, and save it
in Hugging Face format (``tokenizer.json`` plus a folder ``PreTrainedTokenizerFast`` /
``AutoTokenizer`` loads, with eos/pad/mask and the ``<extra_id_N>`` sentinels set).

Byte-level BPE with no normalizer and no prefix space is lossless: decoding a document's ids gives
back its exact text, for any UTF-8 (CJK, emoji, control characters).

The ``tokenizer`` stage (:data:`tokenizer_stage`) is cached like any other: its fingerprint covers
the input corpus (trained) or the source path/hub id (loaded), and the config.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from pydantic import Field, computed_field, model_validator
from refinery.tasks.config import StrictModel

from refinery.tasks.runtime import StageOutput, stage

BYTE_ALPHABET = 256


class TokenizerConfig(StrictModel):
    """Train a byte-level BPE tokenizer (``path`` empty) or load an existing one (``path`` set)."""

    path: str | None = Field(None, description="Load this tokenizer instead of training one: a local folder "
                             "(Hugging Face format or a bare tokenizer.json) or a hub id.")
    vocab_size: int = Field(8192, ge=BYTE_ALPHABET + 1, le=1 << 32,
                            description="Vocabulary size of a trained tokenizer, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair count for a BPE merge.")
    eos_token: str = Field("<|endoftext|>", description="End of text: appended after every document.")
    pad_token: str = Field("<|pad|>", description="Padding token.")
    mask_token: str = Field("<|mask|>", description="Mask token (masked LM).")
    sentinels: int = Field(100, ge=0, description="Sentinel tokens <extra_id_0> ... for span corruption.")
    extra_special_tokens: list[str] = Field(default_factory=list, description="More special tokens, after the sentinels.")
    max_train_docs: int | None = Field(None, ge=1, description="Train on at most this many documents (dataset order).")
    max_train_chars: int = Field(1_000_000_000, ge=1, description="Train on at most this many characters.")
    text_field: str = Field("text", description="Column of the documents holding the text.")

    @model_validator(mode="after")
    def _check(self):
        if self.path is None and self.vocab_size < BYTE_ALPHABET + len(self.special_tokens()):
            raise ValueError(f"vocab_size {self.vocab_size} is smaller than the 256 byte symbols plus "
                             f"{len(self.special_tokens())} special tokens")
        return self

    @computed_field(  # type: ignore[prop-decorator]  # pydantic's documented computed_field pattern
        description="Content hash of a local `path` (so editing that tokenizer changes the "
                    "fingerprint); null for a trained tokenizer or a hub id.")
    @property
    def source_sha256(self) -> str | None:
        return local_tokenizer_hash(self.path) if self.path else None

    def sentinel_tokens(self) -> list[str]:
        return [f"<extra_id_{i}>" for i in range(self.sentinels)]

    def special_tokens(self) -> list[str]:
        """Special tokens in id order: eos, pad, mask, sentinels, extras (duplicates dropped)."""
        out: list[str] = []
        for t in [self.eos_token, self.pad_token, self.mask_token, *self.sentinel_tokens(), *self.extra_special_tokens]:
            if t and t not in out:
                out.append(t)
        return out


def local_tokenizer_hash(path: str) -> str | None:
    """sha256 over the files (names and bytes) of a local tokenizer folder or file; None otherwise."""
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.name != "manifest.json")
    else:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def iter_texts(datasets, text_field: str = "text", max_docs: int | None = None,
               max_chars: int | None = None, batch_rows: int = 4096, skip_ids: frozenset[str] = frozenset(),
               id_field: str = "id") -> Iterator[str]:
    """Texts of documents datasets in order (nulls and empty texts skipped), within the limits.
    Documents whose id is in ``skip_ids`` (the held-out split) are skipped; a dataset without an id
    column names its documents ``PART:ROW``, as the holdout and tokenize stages do."""
    import pyarrow.parquet as pq

    docs = chars = 0
    for ds in datasets:
        for part, path in enumerate(ds.files):
            try:
                with ds.fs.open(path, "rb") as f:
                    pf = pq.ParquetFile(f)
                    has_id = bool(skip_ids) and id_field in pf.schema_arrow.names
                    columns = [text_field, id_field] if has_id else [text_field]
                    row = 0
                    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                        texts = batch.column(0).to_pylist()
                        ids = batch.column(1).to_pylist() if has_id else [None] * len(texts)
                        for t, i in zip(texts, ids):
                            row += 1
                            if not t:
                                continue
                            if skip_ids and (f"{part}:{row - 1}" if i is None else str(i)) in skip_ids:
                                continue
                            yield t
                            docs += 1
                            chars += len(t)
                            if (max_docs is not None and docs >= max_docs) or (max_chars is not None and chars >= max_chars):
                                return
            except (OSError, ValueError) as e:
                raise ValueError(f"{path}: unreadable documents part: {e}") from e


def train_bpe(texts: Iterable[str], cfg: TokenizerConfig, show_progress: bool = False):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=cfg.special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_hf(tok, cfg: TokenizerConfig, out_dir: str | os.PathLike):
    """Save a ``tokenizers.Tokenizer`` as a Hugging Face folder with eos/pad/mask/sentinels set."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=cfg.eos_token, bos_token=cfg.eos_token, pad_token=cfg.pad_token,
        mask_token=cfg.mask_token, clean_up_tokenization_spaces=False,
        additional_special_tokens=cfg.sentinel_tokens() + list(cfg.extra_special_tokens),
    )
    fast.model_max_length = 1 << 30
    fast.save_pretrained(str(out))
    return fast


def load_existing(path_or_id: str, out_dir: str | os.PathLike):
    """Copy an existing tokenizer (local folder, bare tokenizer.json, or hub id) into ``out_dir`` in
    Hugging Face format. It must be a fast tokenizer with an EOS token."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out = Path(out_dir)
    p = Path(path_or_id)
    tok: Any
    if p.is_file() and p.suffix == ".json":
        tok = PreTrainedTokenizerFast(tokenizer_file=str(p), clean_up_tokenization_spaces=False)
    else:
        if p.exists() and not p.is_dir():
            raise ValueError(f"{path_or_id}: not a tokenizer folder or tokenizer.json")
        try:
            # a local folder never goes near the hub (transformers would otherwise probe it)
            tok = AutoTokenizer.from_pretrained(str(path_or_id), local_files_only=p.is_dir())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path_or_id}: cannot load a tokenizer: {e}") from e
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{path_or_id}: a slow tokenizer; the tokenize stage needs a fast one (tokenizer.json)")
    if tok.eos_token_id is None:
        raise ValueError(f"{path_or_id}: the tokenizer has no EOS token, which every document must end with")
    tok.save_pretrained(str(out))
    return tok


def tokenizer_info(folder: str | os.PathLike, tok=None) -> dict:
    """sha256 of tokenizer.json and the ids that matter (``tok``: the HF tokenizer saved there,
    else it is loaded from ``folder``)."""
    folder = Path(folder)
    data = (folder / "tokenizer.json").read_bytes()
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    vocab = tok.get_vocab()
    n_sent = 0
    while f"<extra_id_{n_sent}>" in vocab:
        n_sent += 1
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "vocab_size": len(tok),
        "eos_token": tok.eos_token, "eos_id": tok.eos_token_id,
        "pad_token": tok.pad_token, "pad_id": tok.pad_token_id,
        "mask_token": tok.mask_token, "mask_id": tok.mask_token_id,
        "sentinels": n_sent,
    }


@stage("tokenizer", version="1")
def tokenizer_stage(b, inputs, cfg: TokenizerConfig) -> StageOutput:
    """Train a byte-level BPE tokenizer on the input documents (or load ``cfg.path``) and store it in
    Hugging Face format as the dataset's files (the dataset folder is the tokenizer folder).

    ``inputs = [documents(, holdout)]``: the documents of the optional held-out split
    (refinery.tasks.tokens.holdout) are not trained on, so evaluation texts stay unseen."""
    import time

    tmp = Path(b.tmpdir()) / "tokenizer"
    t0 = time.perf_counter()
    counts: dict = {}
    if cfg.path:
        fast = load_existing(cfg.path, tmp)
        source = cfg.path
    else:
        if not inputs:
            raise ValueError("training a tokenizer needs a documents dataset (or set tokenizer.path)")
        stats = {"docs": 0, "chars": 0}

        skip: frozenset[str] = frozenset()
        if len(inputs) > 1:
            from refinery.tasks.tokens.holdout import heldout_ids

            skip = heldout_ids(inputs[1].path, inputs[1].fingerprint)

        def texts():
            for t in iter_texts(inputs[:1], cfg.text_field, cfg.max_train_docs, cfg.max_train_chars, skip_ids=skip):
                stats["docs"] += 1
                stats["chars"] += len(t)
                yield t

        import sys

        tok = train_bpe(texts(), cfg, show_progress=sys.stderr.isatty())
        if stats["docs"] == 0:
            raise ValueError(f"no non-empty '{cfg.text_field}' in {inputs[0].path}: nothing to train on")
        fast = save_hf(tok, cfg, tmp)
        counts.update({"train_docs": stats["docs"], "train_chars": stats["chars"]})
        source = "trained"
    info = tokenizer_info(tmp, fast)
    b.put_dir(tmp)
    counts["vocab_size"] = info["vocab_size"]
    return StageOutput(counts=counts, stats={"train_seconds": round(time.perf_counter() - t0, 3)},
                       extra={"tokenizer": {**info, "source": source}})


__all__ = ["TokenizerConfig", "train_bpe", "save_hf", "load_existing", "tokenizer_info", "tokenizer_stage",
           "iter_texts"]
