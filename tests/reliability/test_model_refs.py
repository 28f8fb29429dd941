"""Model inputs are checked like datasets before anything loads them.

A manifest's model keys (``merged``, ``model``) used to be followed wherever they pointed (``../``,
an absolute path, a linked folder), and a damaged ``model.safetensors`` surfaced as a raw
safetensors traceback from deep inside the loader. Now ``resolve_model`` keeps references inside
the dataset folder, checks a dataset's files against its manifest (sizes, weights on disk that it
does not list) and every weights file's header against its size, names the damaged file, and
moves a damaged dataset aside so the stage that built it rebuilds it. Hub ids and plain model
folders keep working.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from refinery.tasks.modelref import ModelCorrupt, model_identity, resolve_model
from refinery.tasks.store import DatasetCorrupt, Store

WEIGHTS = save({"w": np.arange(64, dtype=np.float32).reshape(8, 8), "b": np.zeros(8, np.float32)})


def model_folder(path: Path, weights: bytes = WEIGHTS) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(weights)
    return path


def publish_model(root: Path, sub: str = "merged", weights: bytes = WEIGHTS, **extra) -> Path:
    """A model dataset as finetune publishes one (``sub`` "" puts the model at the top)."""
    b = Store(root).builder("finetune", "fp1")
    prefix = f"{sub}/" if sub else ""
    b.write_bytes(f"{prefix}config.json", b'{"model_type": "llama"}')
    b.write_bytes(f"{prefix}model.safetensors", weights)
    key = {"merged": sub} if sub else {"model": "."}
    return Path(b.publish(version="1", config={}, inputs=[], extra={**key, **extra}).path)


def test_good_models_resolve(tmp_path):
    ds = publish_model(tmp_path / "w")
    assert resolve_model(ds) == str(ds / "merged")
    top = publish_model(tmp_path / "top", sub="")
    assert resolve_model(top) == str(top)
    plain = model_folder(tmp_path / "plain")
    assert resolve_model(plain) == str(plain)
    assert resolve_model("org/some-model") == "org/some-model"
    assert model_identity(str(ds)) == "dataset:finetune:fp1"


@pytest.mark.parametrize("ref", ["../../elsewhere", "{elsewhere}", "merged/../../../elsewhere"])
def test_model_reference_outside_the_dataset_is_refused(tmp_path, ref):
    elsewhere = model_folder(tmp_path / "w" / "elsewhere")
    ref = ref.format(elsewhere=elsewhere)
    b = Store(tmp_path / "w").builder("finetune", "fp1")
    b.write_bytes("notes.txt", b"no model here")
    ds = b.publish(version="1", config={}, inputs=[], extra={"merged": ref})
    with pytest.raises(DatasetCorrupt, match=re.escape(f"manifest key 'merged' names {ref!r}, outside the dataset folder")):
        resolve_model(ds.path)
    assert Path(ds.path).is_dir(), "a refused reference is not damage: the dataset stays"


def test_model_folder_linked_out_of_the_dataset_is_refused(tmp_path):
    elsewhere = model_folder(tmp_path / "elsewhere")
    ds = publish_model(tmp_path / "w", sub="weights")
    b = Store(tmp_path / "w2").builder("finetune", "fp2")
    b.write_bytes("notes.txt", b"x")
    linked = Path(b.publish(version="1", config={}, inputs=[], extra={"merged": "merged"}).path)
    os.symlink(elsewhere, linked / "merged")
    with pytest.raises(DatasetCorrupt, match="'merged'.*symbolic link"):
        resolve_model(linked)
    assert resolve_model(ds) == str(ds / "weights")


def test_truncated_weights_in_a_model_dataset_are_named_and_moved_aside(tmp_path):
    ds = publish_model(tmp_path / "w")
    weights = ds / "merged" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 10)
    with pytest.raises(DatasetCorrupt, match=r"merged/model.safetensors: \d+ bytes, manifest says \d+.*moved aside"):
        resolve_model(ds)
    assert not ds.exists()
    assert len(list((tmp_path / "w" / "finetune").glob(".quarantine-fp1-*"))) == 1


def test_weights_published_cut_short_are_named(tmp_path):
    ds = publish_model(tmp_path / "w", weights=WEIGHTS[:-12])    # sizes match the manifest
    with pytest.raises(DatasetCorrupt, match="merged/model.safetensors: cut short.*header"):
        resolve_model(ds)


def test_weights_the_manifest_does_not_list_are_refused(tmp_path):
    ds = publish_model(tmp_path / "w")
    m = json.loads((ds / "manifest.json").read_text())
    del m["totals"]                                               # an older manifest
    m["files"] = [f for f in m["files"] if not f["path"].endswith(".safetensors")]
    (ds / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetCorrupt, match="merged/model.safetensors: on disk but not in the manifest"):
        resolve_model(ds)


@pytest.mark.parametrize("damage", [lambda w: w[:-1], lambda w: w[:5], lambda w: w + b"\0",
                                    lambda w: (10**9).to_bytes(8, "little") + w[8:]],
                         ids=["cut-short", "no-header-length", "trailing-byte", "header-past-the-end"])
def test_plain_model_folder_with_damaged_weights_is_named(tmp_path, damage):
    plain = model_folder(tmp_path / "plain", damage(WEIGHTS))
    with pytest.raises(ModelCorrupt, match=re.escape(f"{plain / 'model.safetensors'}: ")):
        resolve_model(plain)
