"""Checkpoints: a Hugging Face model folder plus the training state that makes resume exact.

    <ckpt_root>/
        step-00000100/
            config.json, generation_config.json, model.safetensors   (save_pretrained)
            tokenizer.json, tokenizer_config.json, ...                 (copied from the reader's tokenizer)
            trainer_state.pt    optimizer, scheduler, step, RNG (torch, CUDA, numpy, python), reader
                                position, metric history, best so far   (torch.load(weights_only=True))
            trainer_state.json  the same small facts, readable
            files.json          every file's size and sha256, written last: what resume checks
                                (checkpoints of older versions: sizes only, or no files.json)
        checkpoints.json        {"latest": ..., "best": ..., "steps": [...]} for humans and tools

A checkpoint is written into a temporary folder, fsynced, hashed and renamed into place, so a crash
while saving leaves the previous checkpoints intact; a full disk is a :class:`CheckpointDiskFullError`
naming the checkpoint, with the temporary folder removed. The last ``keep_last`` checkpoints and the
best one are kept. Resume (:func:`latest_checkpoint`) takes the newest *intact* checkpoint: one whose
files are all there with their recorded sizes and checksums and whose state and weights files are
structurally whole; a damaged newer one (a truncated copy, a block flipped in place) is moved aside
to ``.damaged-step-*`` with a warning, and training resumes from the one before. What a checkpoint
holds can still be non-finite (written before checksums, or by a run that diverged at its last
step): :func:`nonfinite_tensors` and :class:`NonFiniteCheckpointError` are what the loop checks after
loading it and after its first step.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import struct
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

STATE = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
FILES = "files.json"
WEIGHTS = "model.safetensors"
INDEX = "checkpoints.json"
log = logging.getLogger("refinery.train.checkpoint")
_STEP_RE = re.compile(r"^step-(\d+)$")
_TOKENIZER_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|"
                              r".*\.model|chat_template.*)$")
# how a full disk reaches us from torch.save (its zip writer's enforce message: a short write shows as
# "unexpected pos", a failed stream as "file write failed") and from safetensors (an IoError's text)
_DISK_FULL = re.compile(r"inline_container\.cc.*(unexpected pos|file write failed)|No space left on device|"
                        r"os error 28\b|Disk quota exceeded|os error 122\b", re.S)
_HASH_THREADS = 4   # hashlib releases the GIL: the weights and the optimizer state hash side by side


class CheckpointDiskFullError(OSError):
    """The disk filled up while a checkpoint was written (errno ENOSPC). The partial checkpoint was
    removed; the previous ones are intact and a re-run resumes from the newest of them."""


class NonFiniteCheckpointError(FloatingPointError):
    """A checkpoint that passed the file checks holds NaN or infinite numbers (weights, optimizer
    state, or a first loss after resume that is not finite)."""

    @classmethod
    def of(cls, ckpt: str | Path, what: list[str]) -> NonFiniteCheckpointError:
        ckpt = Path(ckpt)
        shown = ", ".join(what[:5]) + (f" and {len(what) - 5} more" if len(what) > 5 else "")
        return cls(f"checkpoint {ckpt} is not finite after resume: {shown}. It was damaged, or saved by a run "
                   f"that had diverged: delete it or move it aside (e.g. to {ckpt.parent / ('.damaged-' + ckpt.name)}) "
                   f"and run again to resume from the previous checkpoint")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a training state), by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and (p / STATE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def checkpoint_problems(ckpt: str | Path, *, checksums: bool = False) -> list[str]:
    """Why a checkpoint cannot be resumed from (empty when it looks intact). Cheap: sizes from
    ``files.json`` (absent in checkpoints of older versions), the training state's zip directory,
    and the safetensors header against the file's length; no tensor is read. ``checksums``: also
    read every file and compare its sha256 with ``files.json`` (in place damage keeps the size)."""
    ckpt = Path(ckpt)
    problems = []
    try:
        manifest = json.loads((ckpt / FILES).read_text())
        sizes, digests = manifest["files"], manifest.get("sha256", {})   # no "sha256": an older version
    except FileNotFoundError:
        sizes, digests = {}, {}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"{FILES}: unreadable ({e})"]
    for name, want in sizes.items():
        try:
            have = (ckpt / name).stat().st_size
        except OSError:
            problems.append(f"{name}: missing")
            continue
        if have != want:
            problems.append(f"{name}: {have} bytes, {FILES} says {want}")
    if checksums and not problems:
        problems += _checksum_problems(ckpt, digests)
    if not zipfile.is_zipfile(ckpt / STATE):   # torch.save writes a zip; truncation loses its directory
        problems.append(f"{STATE}: not a complete torch file")
    if (ckpt / WEIGHTS).exists() or WEIGHTS in sizes:
        problem = _safetensors_problem(ckpt / WEIGHTS)
        if problem:
            problems.append(problem)
    return problems


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes; the
    header's largest end offset must match the data's length."""
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        return f"{path.name}: unreadable header ({type(e).__name__})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"{path.name}: {size} bytes, its header needs {8 + n + end}"
    return None


def _checksum_problems(ckpt: Path, digests: dict[str, str]) -> list[str]:
    names = sorted(digests)
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        have = list(pool.map(lambda n: _sha256(ckpt / n), names))
    return [f"{n}: sha256 {h[:12]}..., {FILES} says {digests[n][:12]}... (damaged in place)"
            for n, h in zip(names, have) if h != digests[n]]


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest intact checkpoint, checksums verified (every file is read: it is the checkpoint
    about to be loaded, so the read also warms the page cache for the load). Damaged newer ones are
    moved aside (``.damaged-step-*``, kept for inspection, out of the way of :func:`prune` and of the
    next save of that step) with a warning that names the checkpoint resumed from instead."""
    root = Path(root)
    for step, path in reversed(list_checkpoints(root)):
        problems = checkpoint_problems(path, checksums=True)
        if not problems:
            return path
        dest = root / f".damaged-{path.name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:4]}"
        os.rename(path, dest)
        earlier = [p for s, p in list_checkpoints(root) if s < step]
        log.warning("checkpoint %s is damaged (%s); moved aside to %s; %s", path, "; ".join(problems[:3]),
                    dest.name, f"falling back to {earlier[-1].name}" if earlier else "no earlier checkpoint")
    return None


# ----------------------------------------------------------------------------- RNG and reader state
def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # (str, ndarray, int, int, float)
    keys = np.asarray(keys)
    version, pystate, gauss = random.getstate()
    out = {"torch": torch.get_rng_state(),
           "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                     "has_gauss": int(has_gauss), "cached": float(cached)},
           "python": {"version": version, "state": list(pystate), "gauss": gauss}}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = st["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


def to_safe(obj: Any) -> Any:
    """Make a reader state loadable with ``weights_only=True``: numpy values become tensors/Python scalars."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj).astype(obj.dtype.newbyteorder("="))),
                "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_safe(v) for v in obj]
    return obj


def from_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__ndarray__" in obj and "dtype" in obj:
            return obj["__ndarray__"].numpy().astype(np.dtype(obj["dtype"]))
        return {k: from_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_safe(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- save / load
def copy_tokenizer(src: str | Path | None, dest: str | Path) -> list[str]:
    """Copy the tokenizer files of a Hugging Face tokenizer folder."""
    if not src:
        return []
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer folder {src} does not exist")
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and _TOKENIZER_FILES.match(f.name):
            shutil.copyfile(f, Path(dest) / f.name)
            copied.append(f.name)
    return copied


def save_checkpoint(root: str | Path, step: int, model, tokenizer_path: str | None, state: dict,
                    summary: dict | None = None, *, state_dict: dict | None = None,
                    extra_dirs: dict[str, Path] | None = None) -> Path:
    """Write ``step-XXXXXXXX`` atomically and return its path. ``state`` goes to trainer_state.pt.
    ``state_dict``: the weights to save (an FSDP run's gathered full state; with ``model`` None, the
    named tensors that make up model.safetensors on their own); ``extra_dirs``: folders
    moved in under the given names before the checkpoint is sealed (an FSDP run's shards)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    with naming_a_full_disk(final, cleanup=tmp):
        _write(tmp, step, model, tokenizer_path, state, summary, state_dict, extra_dirs)
        _seal(tmp)
    if final.exists():  # the same step saved again (e.g. the final save right after an eval save)
        trash = root / f".trash-{final.name}-{uuid.uuid4().hex[:6]}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync(root)
    return final


def _write(tmp: Path, step: int, model, tokenizer_path: str | None, state: dict, summary: dict | None,
           state_dict: dict | None, extra_dirs: dict[str, Path] | None) -> None:
    """Every file of a checkpoint, into its temporary folder."""
    if model is None:   # a trainer's trainable tensors (adapters, heads), not a Hugging Face folder
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in (state_dict or {}).items()}, str(tmp / WEIGHTS))
    else:
        _save_pretrained(model, tmp, state_dict)
    copy_tokenizer(tokenizer_path, tmp)
    for name, folder in (extra_dirs or {}).items():
        os.rename(folder, tmp / name)
    torch.save(state, tmp / STATE)
    (tmp / STATE_JSON).write_text(json.dumps(summary or {"step": step}, indent=2, sort_keys=True, default=str))


def _save_pretrained(model, folder: Path, state_dict: dict | None) -> None:
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()   # no "Writing model shards" bar at every checkpoint
    try:
        if state_dict is not None:
            model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
        else:
            model.save_pretrained(folder, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def naming_a_full_disk(final: Path, cleanup: Path | None = None) -> Iterator[None]:
    """Around the writing of checkpoint ``final``: on any error, ``cleanup`` (its temporary folder)
    is removed, since half a checkpoint would only take the space a retry needs; a full disk, in
    whatever words torch, safetensors or the OS put it, becomes :class:`CheckpointDiskFullError`."""
    try:
        yield
    except BaseException as e:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        if _disk_full(e):
            raise CheckpointDiskFullError(errno.ENOSPC, f"No space left on device while writing checkpoint {final}: "
                                                        "free space and run again, the previous checkpoints are "
                                                        "intact and the run resumes from the newest") from e
        raise


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, Exception) and bool(_DISK_FULL.search(str(e)))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seal(folder: Path) -> None:
    """fsync and hash every file of a checkpoint being written (read back right after writing, from
    the page cache), then record their sizes and sha256 in ``files.json`` (written last, fsynced
    too), so what the rename publishes is on disk and checkable. "files" keeps its meaning (sizes)
    so older versions still read the manifest."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    names = [p.relative_to(folder).as_posix() for p in files]
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        digests = list(pool.map(_fsync_and_hash, files))
    manifest = {"files": {n: p.stat().st_size for n, p in zip(names, files)}, "sha256": dict(zip(names, digests))}
    (folder / FILES).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    _fsync(folder / FILES)
    _fsync(folder)


def _fsync_and_hash(path: Path) -> str:
    _fsync(path)
    return _sha256(path)


def load_state(ckpt: str | Path) -> dict:
    return torch.load(Path(ckpt) / STATE, map_location="cpu", weights_only=True)


def load_weights(model, ckpt: str | Path) -> None:
    """Load ``model.safetensors`` into ``model`` in place (tied weights are shared, so may be absent)."""
    from safetensors.torch import load_file

    path = Path(ckpt) / "model.safetensors"
    sd = load_file(str(path))
    res = model.load_state_dict(sd, strict=False)
    if res.unexpected_keys:
        raise ValueError(f"{path}: unexpected weights {res.unexpected_keys[:5]}")
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in sd if k in own}
    missing = [k for k in res.missing_keys if own[k].data_ptr() not in loaded]
    if missing:
        raise ValueError(f"{path}: missing weights {missing[:5]}")


def nonfinite_tensors(model, optimizer=None) -> list[str]:
    """The names of the floating point weights (and optimizer state tensors) that hold a NaN or an
    infinity: a loaded checkpoint must have none. Sharded (FSDP) tensors: this rank's shards."""
    named = list(model.state_dict().items())
    if optimizer is not None:
        named += [(f"optimizer {key} of parameter {i}", t) for i, per in optimizer.state_dict()["state"].items()
                  for key, t in per.items()]
    return [name for name, t in named if _floating(t) and not bool(torch.isfinite(_local(t)).all())]


def _floating(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _local(t):
    """A DTensor's shard on this rank (a plain tensor as it is)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def write_index(root: str | Path, latest: int | None, best: int | None) -> None:
    root = Path(root)
    data = {"latest": latest, "best": best, "steps": [s for s, _ in list_checkpoints(root)]}
    tmp = root / f".{INDEX}.{uuid.uuid4().hex[:6]}"
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, root / INDEX)


def prune(root: str | Path, keep_last: int, keep: frozenset[int] | set[int] = frozenset()) -> list[int]:
    """Delete all but the last ``keep_last`` checkpoints and those in ``keep``; also stale temp folders."""
    root = Path(root)
    cks = list_checkpoints(root)
    recent = {s for s, _ in cks[-keep_last:]}
    removed = []
    for s, p in cks:
        if s not in recent and s not in keep:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(s)
    for p in root.glob(".tmp-step-*"):
        if str(os.getpid()) not in p.name:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".trash-step-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".dcp-step-*"):   # FSDP shards of a save that died before the rename (prune runs after a save)
        shutil.rmtree(p, ignore_errors=True)
    return removed


__all__ = ["save_checkpoint", "load_state", "load_weights", "latest_checkpoint", "list_checkpoints", "prune",
           "checkpoint_problems", "nonfinite_tensors", "CheckpointDiskFullError", "NonFiniteCheckpointError",
           "step_dir", "rng_state", "set_rng_state", "to_safe", "from_safe", "copy_tokenizer", "write_index",
           "STATE"]
