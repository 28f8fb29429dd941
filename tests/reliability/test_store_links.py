"""The store follows no symbolic link in its own folders.

A link where the store keeps a stage folder, a staging folder, its records, a lock file or a
published dataset used to be followed: a build wrote into, and deleted from, the link's target
(a lock file link truncated its target). Each is now refused with an error naming the link, and
the target is left as it was.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow as pa
import pytest

from refinery.tasks.store import Store, UnsafeLink
from toy_stages import Toy, ToyConfig

CFG = ToyConfig(shards=2, rows=3)
FP = Toy.fingerprint([], CFG)


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def victim(tmp_path) -> Path:
    """A folder the store must not touch, with a file and a folder a build would write or delete."""
    v = tmp_path / "victim"
    (v / ".records").mkdir(parents=True)
    (v / ".records" / "keep.json").write_text("{}")
    (v / "precious.txt").write_text("precious")
    return v


@pytest.mark.parametrize("link", ["toy", f"toy/.staging-{FP}", f"toy/.staging-{FP}/.records",
                                  f"toy/.staging-{FP}/.shards", f"toy/{FP}"])
def test_linked_store_folder_is_refused(tmp_path, victim, link):
    root = tmp_path / "w"
    where = root / link
    where.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(victim, where)
    before = snapshot(victim)
    with pytest.raises(UnsafeLink, match=re.escape(f"{where}: is a symbolic link")):
        Toy.run(root, [], CFG)
    assert snapshot(victim) == before


def test_linked_lock_file_is_refused_and_its_target_kept(tmp_path, victim):
    root = tmp_path / "w"
    (root / "toy").mkdir(parents=True)
    os.symlink(victim / "precious.txt", root / "toy" / f".lock-{FP}")
    with pytest.raises(UnsafeLink, match=f".lock-{FP}: is a symbolic link"):
        Toy.run(root, [], CFG)
    assert (victim / "precious.txt").read_text() == "precious"


def test_linked_folder_inside_the_staging_folder_is_refused(tmp_path, victim):
    b = Store(tmp_path / "w").builder("toy", "fp")
    os.symlink(victim, Path(b.dir) / "excluded")
    with pytest.raises(UnsafeLink, match="excluded: is a symbolic link"):
        b.write_table("excluded/rows.parquet", pa.table({"x": [1]}))
    assert not (victim / "rows.parquet").exists()


def test_a_linked_root_is_the_users_choice(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "root")
    assert Toy.run(tmp_path / "root", [], CFG).read_table().num_rows == 6
