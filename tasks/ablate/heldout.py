"""The held-out documents of an ablation as a decontamination source.

Every variant's training documents are decontaminated against the held-out documents (word
n-grams, refinery.tasks.decontam), so a variant that keeps duplicates does not train on copies or
near-copies of the documents it is evaluated on; the held-out documents themselves go too, which
is what the tokenize stage's holdout input does for one dataset. The decontaminate stage reads
JSONL files, so the held-out texts are written to one, named by the held-out dataset's
fingerprint (the decontamination index is fingerprinted by the texts' hash, so the file's place
and time do not change what is cached).
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def heldout_jsonl(ds, folder: str | os.PathLike, text_field: str = "text") -> Path:
    """``folder/heldout-<fp16>.jsonl``: one ``{"text": ...}`` per non-empty held-out document,
    written atomically and only when absent or different."""
    lines = []
    for table in ds.iter_tables(columns=[text_field]):
        for t in table.column(0).to_pylist():
            if t:
                lines.append(json.dumps({"text": t}, ensure_ascii=False))
    if not lines:
        raise ValueError(f"{ds.path}: no held-out document with a non-empty '{text_field}'")
    data = ("\n".join(lines) + "\n").encode("utf-8")
    out = Path(folder) / f"heldout-{ds.fingerprint[:16]}.jsonl"
    if out.exists() and out.read_bytes() == data:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    return out


__all__ = ["heldout_jsonl"]
