"""Model references, as every training stage takes them: a Hugging Face model folder, a hub id,
or a refinery dataset folder (local or fsspec URL) holding a model, e.g. the pretrain, finetune or
align flows' outputs.

This is part of the contract between stages (like the store), so finetune, align, evaluate and
``refinery generate`` share it. **Where a training dataset keeps its model** (ARCHITECTURE.md,
section 6): its manifest's ``model`` key names, relative to the dataset folder, a complete
Hugging Face folder (config, weights, tokenizer: ``from_pretrained`` loads it as it is); where the
method trained a PEFT adapter, ``adapter`` names the adapter folder and ``model`` the merged model.
Every consumer therefore takes the dataset folder itself. Datasets written before the key was
written everywhere are read too: ``merged``, then the conventional folders ``model/`` and
``merged/``, then the dataset folder itself. A dataset that holds only an adapter (prompt or prefix
tuning, LLaMA-Adapter: methods that cannot be merged) is refused with a message saying so.

Trust: a model input is checked before anything loads it, as a dataset is on open.

* A manifest's model keys name a folder inside the dataset (``"."``: the dataset itself); ``../``,
  absolute paths and links out of the folder are refused.
* The files of a model inside a dataset are checked against the manifest as the store checks a
  dataset (:func:`refinery.tasks.store.dataset_problems`: sizes, totals, data parts it does not
  list), and files in the model folder that it does not list are refused.
* Every ``*.safetensors`` file of the model folder, in a dataset or not, has its header checked
  against its size (8 bytes and the header read, no tensor), so a file cut short is named here,
  not by a safetensors traceback from inside the loader.

A damaged dataset raises :class:`~refinery.tasks.store.DatasetCorrupt` naming the file and is moved
aside (``.quarantine-...``) when it sits in a store, so the stage that built it rebuilds it on its
next run; a damaged plain folder raises :class:`ModelCorrupt`.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import struct
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
MODEL_KEYS = ("model", "merged")  # manifest keys naming the model folder, in order of preference
_MAX_HEADER = 100_000_000         # safetensors refuses larger headers too


class ModelCorrupt(ValueError):
    """A model folder (not in a refinery dataset) whose weights file is damaged."""


def _inside(base: Path, rel: str, what: str) -> Path:
    """``base / rel``, refused (DatasetCorrupt) when it leaves the dataset folder ``base``, by its
    name or through a symbolic link; ``what`` names the reference in the message."""
    from refinery.tasks.store import DatasetCorrupt, path_problem

    rel = posixpath.normpath(rel)
    if rel == ".":
        return base
    sub = base / rel
    real, top = os.path.realpath(sub), os.path.realpath(base)
    if path_problem(rel):
        leaves = "outside the dataset folder"
    elif os.path.commonpath([real, top]) != top:
        leaves = f"a symbolic link to {real}, outside the dataset folder"
    else:
        return sub
    raise DatasetCorrupt(f"{base}: {what}, {leaves}; refinery follows model references only to a folder "
                         "inside the dataset: pass the model folder itself instead")


def _sub(base: Path, key: str, value: Any) -> Path | None:
    """The folder a manifest's model key names (a path or ``{"path": ...}``), inside ``base``."""
    if isinstance(value, dict):
        value = value.get("path")
    if not isinstance(value, str) or not value:
        return None
    return _inside(base, value, f"manifest key {key!r} names {value!r}")


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


# --------------------------------------------------------------------------- checks
def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be whole (its header's length and tensor offsets against the
    file's size, as safetensors checks them when it loads), else None. Reads the header only."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"cut short: {size} bytes, not even the 8-byte header length"
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            return f"cut short or not safetensors: its header claims {n:,} bytes, the file has {size:,}"
        try:
            header = json.loads(f.read(n))
            ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            return f"unreadable header ({type(e).__name__}: {e})"
    want = 8 + n + max(ends, default=0)
    if want != size:
        return f"{'cut short' if size < want else 'longer than its tensors'}: its header needs {want:,} bytes, the file has {size:,}"
    return None


def weight_problems(folder: Path, base: Path | None = None) -> list[str]:
    """Every damaged ``*.safetensors`` file directly in ``folder``, named relative to ``base``
    (the dataset folder) when given, else by its full path."""
    out = []
    for f in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            out.append(f"{f.relative_to(base).as_posix() if base else f}: {problem}")
    return out


def model_problems(base: Path, manifest: dict, folder: Path) -> list[str]:
    """The model ``folder`` of the dataset ``base`` against the dataset's ``manifest``. A manifest
    without a file list (written by hand, not by the store) has only the weights checked."""
    from fsspec.implementations.local import LocalFileSystem

    from refinery.tasks.store import dataset_problems

    if "files" not in manifest:
        return weight_problems(folder, base)
    problems = dataset_problems(LocalFileSystem(), str(base), manifest)
    listed = {f.get("path") for f in manifest["files"] if isinstance(f, dict)}
    for f in sorted(folder.iterdir()):
        rel = f.relative_to(base).as_posix()
        if f.is_file() and not f.name.startswith(".") and rel not in listed and rel != MANIFEST:
            problems.append(f"{rel}: on disk but not in the manifest (its file list was edited or cut short)")
    bad = {p.split(": ", 1)[0] for p in problems}
    return problems + [p for p in weight_problems(folder, base) if p.split(": ", 1)[0] not in bad]


def _refuse_damaged(base: Path, manifest: dict, folder: Path, problems: list[str]) -> None:
    """Raise DatasetCorrupt naming the damaged files, after moving the dataset aside when it sits
    in a store (so the stage that built it rebuilds it)."""
    from refinery.tasks.store import DatasetCorrupt, quarantine_published

    def still() -> list[str]:
        return model_problems(base, dataset_manifest(str(base)) or manifest, folder)

    where = quarantine_published(str(base), still)
    then = (f"moved aside to {where}: run the {manifest.get('stage')!r} stage (its flow) again to rebuild it"
            if where else f"rebuild it (run the {manifest.get('stage')!r} stage again) or copy it again")
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    raise DatasetCorrupt(f"{base}: damaged model dataset: {'; '.join(problems[:3])}{more}; {then}")


def _dataset_model(p: Path, manifest: dict) -> Path:
    """The model folder the dataset ``p`` names (model keys, then the conventional folder names,
    then the dataset folder itself), checked."""
    extra = manifest.get("extra")
    extra = extra if isinstance(extra, dict) else {}
    named = [(k, manifest.get(k)) for k in MODEL_KEYS] + [(k, extra.get(k)) for k in MODEL_KEYS]
    subs = [_sub(p, k, v) for k, v in named]
    candidates = [s for s in subs if s is not None] + [p / k for k in MODEL_KEYS] + [p]
    folder = next((c for c in candidates if (c / "config.json").is_file()), None)
    if folder is None:
        adapter = manifest.get("adapter", extra.get("adapter"))
        if isinstance(adapter, str) and adapter:
            raise ValueError(f"{p}: refinery dataset (stage {manifest.get('stage')!r}, method "
                             f"{manifest.get('method', extra.get('method'))!r}) holds only a PEFT adapter ({adapter}/), "
                             "no complete model: that method cannot be merged into its base; load the adapter with "
                             f"peft on its base model ({manifest.get('base_model', extra.get('base_model'))}), or "
                             "fine-tune with a method that merges (lora, qlora, ia3, full)")
        raise ValueError(f"{p}: refinery dataset (stage {manifest.get('stage')!r}) holds no model: its manifest "
                         f"names no model folder (key 'model' with a config.json inside); give a pretrain, "
                         "finetune or align output, or a Hugging Face model folder")
    if folder != p:   # a conventional folder name, without a key, may be a link too
        rel = folder.relative_to(p).as_posix()
        _inside(p, rel, f"model folder {rel!r}")
    problems = model_problems(p, manifest, folder)
    if problems:
        _refuse_damaged(p, manifest, folder, problems)
    return folder


def resolve_model(path: str | os.PathLike, allow_hub: bool = True) -> str:
    """A loadable, checked model (see the module's docstring): the folder itself, the model folder a
    refinery dataset names (remote datasets are copied to the local cache first), or, when
    ``allow_hub``, a hub id as given."""
    path = os.fspath(path)
    if "://" in path:
        from refinery.tasks.store import Dataset

        path = Dataset.open(path).local_path()
    p = Path(path)
    manifest = dataset_manifest(path)
    if manifest is not None:
        return str(_dataset_model(p, manifest))
    if (p / "config.json").is_file():
        problems = weight_problems(p)
        if problems:
            raise ModelCorrupt(f"damaged model weights: {'; '.join(problems)}; copy or download the model again")
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
