"""Damage that keeps a checkpoint's size (a flipped block on disk, a bad copy) is caught by the
sha256 manifest and resume falls back to the previous checkpoint; a full disk while saving is
named as such and leaves the previous checkpoints intact; non-finite weights, optimizer state or
first loss after resume are an error naming the checkpoint."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import struct
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))   # the training tests' fixtures

from test_checkpoint_fallback import three_checkpoints, tiny_model  # noqa: E402,F401
from train_fixtures import (cfg_for, corpus_texts, corpus_tokens, losses, one_thread, readers, run,  # noqa: E402,F401
                            train_tokenizer_dir, val_losses)

NAN = b"\xff"                 # all-ones bytes: NaN in float32 and bfloat16
HUGE = b"\x7f\x7f\x7f\x7f"    # 3.4e38 in float32: finite, but overflows the first matmul


# ----------------------------------------------------------------------------- damaging files in place
def flip_middle_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def _overwrite(path: Path, start: int, end: int, fill: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(start)
        f.write((fill * (end - start))[:end - start])


def fill_weight(path: Path, name_part: str, fill: bytes) -> str:
    """Overwrite the bytes of the first safetensors tensor whose name contains ``name_part``."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    name = next(k for k in sorted(header) if name_part in k)
    lo, hi = header[name]["data_offsets"]
    _overwrite(path, 8 + n + lo, 8 + n + hi, fill)
    return name


def fill_largest_saved_tensor(path: Path, fill: bytes) -> None:
    """Overwrite the largest tensor of a torch.save file (stored uncompressed in its zip): in a
    trainer state, an AdamW moment of the embedding."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    start = info.header_offset + 30 + name_len + extra_len
    _overwrite(path, start, start + info.file_size, fill)


def drop_checksums(ckpt: Path) -> None:
    """Make ``ckpt`` look like one written before checksums (files.json with sizes only)."""
    manifest = json.loads((ckpt / "files.json").read_text())
    manifest.pop("sha256", None)
    (ckpt / "files.json").write_text(json.dumps(manifest))


# ----------------------------------------------------------------------------- the manifest
def test_checkpoint_records_a_sha256_per_file(three_checkpoints):
    ck = three_checkpoints / "step-00000030"
    manifest = json.loads((ck / "files.json").read_text())
    assert set(manifest["sha256"]) == set(manifest["files"]) >= {"model.safetensors", "trainer_state.pt"}
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((ck / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize("victim", ["model.safetensors", "trainer_state.pt", "config.json"])
def test_same_size_damage_falls_back_to_the_previous(three_checkpoints, caplog, victim):
    from refinery.tasks.train.checkpoint import latest_checkpoint

    flip_middle_byte(three_checkpoints / "step-00000030" / victim)
    with caplog.at_level(logging.WARNING, logger="refinery.train.checkpoint"):
        ck = latest_checkpoint(three_checkpoints)
    assert ck.name == "step-00000020"
    assert victim in caplog.text and "sha256" in caplog.text and "falling back to step-00000020" in caplog.text
    assert len(list(three_checkpoints.glob(".damaged-step-00000030-*"))) == 1


def test_checkpoint_without_checksums_is_still_readable(three_checkpoints):
    """Checkpoints of the previous version: files.json holds sizes only; sizes are still checked."""
    from refinery.tasks.train.checkpoint import checkpoint_problems, latest_checkpoint

    for step in ("step-00000020", "step-00000030"):
        drop_checksums(three_checkpoints / step)
    assert checkpoint_problems(three_checkpoints / "step-00000030", checksums=True) == []
    assert latest_checkpoint(three_checkpoints).name == "step-00000030"
    (three_checkpoints / "step-00000030" / "config.json").write_text("{}")
    assert latest_checkpoint(three_checkpoints).name == "step-00000020"


# ----------------------------------------------------------------------------- a full disk
TORCH_ENOSPC = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"   # torch 2.x, tmpfs full
TORCH_WRITE_FAILED = ("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                      "data/0: file write failed")
SAFETENSORS_ENOSPC = "Error while serializing: I/O error: No space left on device (os error 28)"


def _raise(exc):
    def fail(*a, **k):
        raise exc
    return fail


@pytest.mark.parametrize("where,exc", [
    ("torch.save", RuntimeError(TORCH_ENOSPC)),
    ("torch.save", RuntimeError(TORCH_WRITE_FAILED)),
    ("torch.save", OSError(errno.ENOSPC, "No space left on device")),
    ("safetensors", Exception(SAFETENSORS_ENOSPC)),     # SafetensorError derives from Exception
    ("files.json", OSError(errno.ENOSPC, "No space left on device")),
], ids=["torch-pos", "torch-write", "torch-oserror", "safetensors", "manifest"])
def test_full_disk_is_named_and_keeps_the_previous_checkpoint(three_checkpoints, tiny_model, monkeypatch,
                                                              where, exc):
    import torch
    import transformers.modeling_utils

    from refinery.tasks.train import checkpoint as ckpt

    if where == "torch.save":
        monkeypatch.setattr(torch, "save", _raise(exc))
    elif where == "safetensors":
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _raise(exc))
    else:
        real = json.dumps
        monkeypatch.setattr(ckpt.json, "dumps", lambda obj, **k: _raise(exc)() if "sha256" in obj else real(obj, **k))
    with pytest.raises(OSError) as err:
        ckpt.save_checkpoint(three_checkpoints, 40, tiny_model, None, {"step": 40})
    assert err.value.errno == errno.ENOSPC
    assert f"No space left on device while writing checkpoint {three_checkpoints / 'step-00000040'}" in str(err.value)
    assert not [p.name for p in three_checkpoints.iterdir() if p.name.startswith(".tmp")]
    assert [s for s, _ in ckpt.list_checkpoints(three_checkpoints)] == [10, 20, 30]
    assert ckpt.checkpoint_problems(three_checkpoints / "step-00000030", checksums=True) == []


def test_other_write_errors_are_not_called_a_full_disk(three_checkpoints, tiny_model, monkeypatch):
    import torch

    from refinery.tasks.train import checkpoint as ckpt

    monkeypatch.setattr(torch, "save", _raise(PermissionError(errno.EACCES, "Permission denied")))
    with pytest.raises(PermissionError):
        ckpt.save_checkpoint(three_checkpoints, 40, tiny_model, None, {"step": 40})
    assert not [p.name for p in three_checkpoints.iterdir() if p.name.startswith(".tmp")]


def test_a_full_disk_in_the_sharded_save_is_named_too(tmp_path):
    """FSDP's shards are written by torch.distributed.checkpoint outside save_checkpoint; the loop
    wraps that write the same way: the staged shards go, the error names the checkpoint."""
    from refinery.tasks.train import checkpoint as ckpt

    staged = tmp_path / ".dcp-step-00000040"
    staged.mkdir()
    (staged / "__0_0.distcp").write_bytes(b"x" * 10)
    with pytest.raises(ckpt.CheckpointDiskFullError, match="while writing checkpoint .*step-00000040"):
        with ckpt.naming_a_full_disk(ckpt.step_dir(tmp_path, 40), cleanup=staged):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")
    assert not staged.exists()


# ----------------------------------------------------------------------------- the training loop
CFG = dict(objective="clm", max_steps=8, eval_every=4, batch_size=4)
_CLEAN: dict = {}


@pytest.fixture
def clean(readers, tmp_path_factory) -> dict:
    """An uninterrupted run of CFG (shared by the tests of this module: it is the reference)."""
    if "run" not in _CLEAN:
        folder = tmp_path_factory.mktemp("clean")
        _CLEAN["run"] = run(cfg_for(**CFG), readers, folder)
        _CLEAN["dir"] = folder
    return _CLEAN


def test_same_size_damage_to_the_final_weights_is_not_published(clean, readers, tmp_path, caplog):
    """Issue 25: a finished run whose final model.safetensors was damaged in place used to be
    "resumed" as finished and its NaN weights published with the clean run's validation loss."""
    import shutil

    from safetensors.torch import load_file

    ck = tmp_path / "ck"
    shutil.copytree(clean["dir"], ck)
    fill_weight(ck / "step-00000008" / "model.safetensors", "embed_tokens", NAN)
    with caplog.at_level(logging.WARNING, logger="refinery.train.checkpoint"):
        again = run(cfg_for(**CFG), readers, ck)
    assert "model.safetensors" in caplog.text and "falling back to step-00000004" in caplog.text
    assert again["status"] == "done" and again["steps"] == 8
    assert abs(again["val_loss_end"] - clean["run"]["val_loss_end"]) <= 1e-6
    published = load_file(str(ck / "step-00000008" / "model.safetensors"))
    reference = load_file(str(clean["dir"] / "step-00000008" / "model.safetensors"))
    for name, t in published.items():
        assert t.isfinite().all() and (t - reference[name]).abs().max() <= 1e-5, name


def test_same_size_damage_to_the_state_resumes_from_the_previous(clean, readers, tmp_path, caplog):
    """A damaged trainer_state.pt (NaN AdamW moments) used to give NaN on every rerun."""
    cfg = cfg_for(**CFG)
    ck = tmp_path / "ck"
    assert run(cfg, readers, ck, stop_after=5)["steps"] == 5
    fill_largest_saved_tensor(ck / "step-00000005" / "trainer_state.pt", NAN)
    with caplog.at_level(logging.WARNING, logger="refinery.train.checkpoint"):
        second = run(cfg, readers, ck)
    assert "trainer_state.pt" in caplog.text and "falling back to step-00000004" in caplog.text
    a, b = losses(clean["run"]), losses(second)
    for step in range(5, 9):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


@pytest.mark.parametrize("damage,says", [
    (lambda ck: fill_weight(ck / "model.safetensors", "embed_tokens", NAN), "model.embed_tokens.weight"),
    (lambda ck: fill_largest_saved_tensor(ck / "trainer_state.pt", NAN), "optimizer"),
    (lambda ck: fill_weight(ck / "model.safetensors", "q_proj", HUGE), "first loss after resume"),
], ids=["nan-weights", "nan-optimizer", "overflowing-weights"])
def test_nonfinite_after_resume_names_the_checkpoint(readers, tmp_path, damage, says):
    """Checkpoints with sizes only (older versions), or saved with non-finite numbers, get past
    the manifest: what they load into, and the first loss after them, are checked."""
    from refinery.tasks.train.checkpoint import NonFiniteCheckpointError

    cfg = cfg_for(**CFG)
    ck = tmp_path / "ck"
    run(cfg, readers, ck, stop_after=5)
    damage(ck / "step-00000005")
    drop_checksums(ck / "step-00000005")
    with pytest.raises(NonFiniteCheckpointError) as err:
        run(cfg, readers, ck)
    msg = str(err.value)
    assert str(ck / "step-00000005") in msg and says in msg and "move it aside" in msg, msg
