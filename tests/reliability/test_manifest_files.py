"""A manifest's file list is checked against the folder and against itself.

Emptying or shortening ``files`` used to pass ``Dataset.open`` and ``refinery verify``, and the next
stage then published an empty dataset with exit code 0. Now: ``open`` (cheap: one folder listing,
no data read) refuses data parts on disk that the manifest does not list, and a file list whose
count or rows differ from the totals recorded at publish; ``verify`` also reads each part's own
row count. Older manifests (no ``totals``) keep opening.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refinery.flows.cli import main
from refinery.tasks.store import Dataset, DatasetCorrupt, Store
from toy_stages import Toy, ToyConfig, double

CFG = ToyConfig(shards=3, rows=4)


@pytest.fixture
def built(tmp_path) -> Dataset:
    return Toy.run(tmp_path / "w", [], CFG)


def edit_manifest(ds: Dataset, change) -> None:
    m = Path(ds.path) / "manifest.json"
    manifest = json.loads(m.read_text())
    change(manifest)
    m.write_text(json.dumps(manifest))


def parts_only(keep):
    def change(manifest):
        manifest["files"] = [f for f in manifest["files"] if not f["path"].startswith("part-") or keep(f["path"])]
    return change


def test_publish_records_the_totals(built):
    assert built.manifest["totals"] == {"files": len(built.manifest["files"]), "rows": 12}


def test_emptied_file_list_is_refused_downstream_and_rebuilt(tmp_path, built, caplog):
    edit_manifest(built, lambda m: m.update(files=[]))
    with pytest.raises(DatasetCorrupt, match="part-00000.parquet: on disk but not in the manifest"):
        Dataset.open(built.path)
    problems = Dataset.open(built.path, check=False).verify()
    assert "manifest lists 0 files with 0 rows, but the dataset was published with 4 files, 12 rows " \
        "(its file list was edited or cut short)" in problems and len(problems) == 4   # and the 3 parts
    assert main(["verify", built.path]) == 1
    with pytest.raises(DatasetCorrupt):                 # formerly: an empty `double` dataset, rc 0
        double.run(tmp_path / "w", [built.path])
    assert not list((tmp_path / "w").glob("double/[!.]*"))
    with caplog.at_level(logging.WARNING, logger="refinery.store"):
        again = Toy.run(tmp_path / "w", [], CFG)
    assert again.read_table().num_rows == 12 and again.verify() == []
    assert "moved aside" in caplog.text


def test_shortened_file_list_names_the_unlisted_part(built, capsys):
    edit_manifest(built, parts_only(lambda p: p != "part-00001.parquet"))
    with pytest.raises(DatasetCorrupt, match="part-00001.parquet: on disk but not in the manifest"):
        Dataset.open(built.path)
    assert main(["verify", built.path]) == 1
    out = capsys.readouterr().out
    assert "part-00001.parquet: on disk but not in the manifest" in out and "manifest lists" in out


def test_shortened_list_with_the_part_deleted_too_is_caught_by_the_totals(built):
    edit_manifest(built, parts_only(lambda p: p != "part-00001.parquet"))
    (Path(built.path) / "part-00001.parquet").unlink()
    with pytest.raises(DatasetCorrupt, match=r"manifest lists \d+ files with 8 rows.*published with \d+ files, 12 rows"):
        Dataset.open(built.path)


def test_edited_row_counts_are_caught_by_open_and_by_verify(built):
    def more_rows(m):
        next(f for f in m["files"] if f["path"] == "part-00001.parquet")["rows"] += 1
    edit_manifest(built, more_rows)
    with pytest.raises(DatasetCorrupt, match="13 rows"):
        Dataset.open(built.path)
    edit_manifest(built, lambda m: m["totals"].update(rows=13))   # consistent with itself again:
    ds = Dataset.open(built.path)                                 # only the file can tell
    assert ds.verify() == ["part-00001.parquet: 4 rows, manifest says 5"]


def test_older_manifests_without_totals_keep_working(built):
    edit_manifest(built, lambda m: m.pop("totals"))
    ds = Dataset.open(built.path)
    assert ds.verify() == [] and ds.read_table().num_rows == 12
    edit_manifest(built, parts_only(lambda p: p != "part-00002.parquet"))
    with pytest.raises(DatasetCorrupt, match="part-00002.parquet: on disk but not in the manifest"):
        Dataset.open(built.path)


def test_side_tables_and_other_files_are_not_data_parts(tmp_path):
    b = Store(tmp_path).builder("side", "fp")
    b.write_table("part-00000.parquet", pa.table({"x": [1]}))
    b.write_table("excluded/part-00000.parquet", pa.table({"x": [2]}))
    ds = b.publish(version="1", config={}, inputs=[])
    pq.write_table(pa.table({"x": [3]}), Path(ds.path) / "excluded" / "part-00009.parquet")
    Dataset.open(ds.path)          # only top-level parts are the data (side folders are not listed)


def test_unrecorded_staged_part_is_not_published(tmp_path, caplog):
    """A part whose record was never written (a crash between the rename and the record) is not
    data: it is deleted at publish instead of making the dataset fail every later open."""
    b = Store(tmp_path).builder("side", "fp")
    b.write_table("part-00000.parquet", pa.table({"x": [1]}))
    pq.write_table(pa.table({"x": [2]}), Path(b.dir) / "part-00001.parquet")
    with caplog.at_level(logging.WARNING, logger="refinery.store"):
        ds = b.publish(version="1", config={}, inputs=[])
    assert "part-00001.parquet" in caplog.text
    assert not (Path(ds.path) / "part-00001.parquet").exists() and ds.read_table().num_rows == 1


def test_remote_emptied_file_list_is_refused():
    store = Store("memory://manifest-files")
    ds = Toy.run(store, [], CFG)
    manifest = dict(ds.manifest, files=[])
    manifest.pop("totals")                          # an older manifest: only the listing can tell
    with store.fs.open(ds.file("manifest.json"), "wb") as f:
        f.write(json.dumps(manifest).encode())
    with pytest.raises(DatasetCorrupt, match="part-00000.parquet: on disk but not in the manifest"):
        Dataset.open(ds.path)
