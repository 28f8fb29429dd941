"""Model references, as every training stage takes them: a Hugging Face model folder, a hub id,
or a refinery dataset folder (local or fsspec URL) whose manifest names its model subfolder
(``merged`` preferred, then ``model``), e.g. the pretrain, finetune or align flows' outputs.

This is part of the contract between stages (like the store), so finetune and align share it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
MODEL_KEYS = ("merged", "model")  # manifest keys naming a model subfolder, in order of preference


def _sub(base: Path, value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("path")
    if not isinstance(value, str) or not value:
        return None
    return os.path.normpath(value if os.path.isabs(value) else str(base / value))


def dataset_manifest(path: str) -> dict | None:
    """The manifest when ``path`` is a refinery dataset, else None."""
    if "://" in path:
        from refinery.tasks.store import Dataset, DatasetNotFound

        try:
            return Dataset.open(path).manifest
        except DatasetNotFound:
            return None
    p = Path(path) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable {MANIFEST}: {e}") from e


def resolve_model(path: str | os.PathLike, allow_hub: bool = True) -> str:
    """A loadable model: the folder itself, the model folder a refinery dataset names (remote
    datasets are copied to the local cache first), or, when ``allow_hub``, a hub id as given."""
    path = os.fspath(path)
    if "://" in path:
        from refinery.tasks.store import Dataset

        path = Dataset.open(path).local_path()
    p = Path(path)
    manifest = dataset_manifest(path)
    if manifest is not None:
        extra = manifest.get("extra")
        extra = extra if isinstance(extra, dict) else {}
        for value in [manifest.get(k) for k in MODEL_KEYS] + [extra.get(k) for k in MODEL_KEYS]:
            sub = _sub(p, value)
            if sub and (Path(sub) / "config.json").is_file():
                return sub
        for key in MODEL_KEYS:  # conventional folder names without a manifest key
            if (p / key / "config.json").is_file():
                return str(p / key)
        if (p / "config.json").is_file():
            return str(p)
        raise ValueError(f"{path}: refinery dataset (stage {manifest.get('stage')!r}) names no model folder "
                         f"(manifest keys {list(MODEL_KEYS)} with a config.json inside)")
    if (p / "config.json").is_file():
        return str(p)
    if p.is_dir():
        raise ValueError(f"{path}: neither a Hugging Face model folder (config.json) nor a refinery dataset (manifest.json)")
    if p.exists() or not allow_hub or path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{path}: no such model folder")
    return path  # a hub id


def model_identity(path: str | os.PathLike | None, revision: str | None = None) -> str | None:
    """What identifies a model input in fingerprints: ``dataset:STAGE:FINGERPRINT`` for a refinery
    dataset, a hash of a folder's file names, sizes and mtimes (``dir:...``), or ``hub:ID@REVISION``."""
    if path is None:
        return None
    path = os.fspath(path)
    m = dataset_manifest(path)
    if m is not None and "fingerprint" in m:
        return f"dataset:{m.get('stage')}:{m['fingerprint']}"
    p = Path(path)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(p).as_posix()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return f"dir:{h.hexdigest()[:16]}"
    if p.exists():
        st = p.stat()
        return f"file:{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return f"hub:{path}@{revision or 'main'}"
