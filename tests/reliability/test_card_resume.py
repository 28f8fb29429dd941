"""One fingerprint, one set of bytes: a dataset card does not depend on how the build went.

A resumed build reads its finished shards' counts back from their records (JSON with sorted keys)
while an uninterrupted one keeps them in the order the shard returned them; the card must come out
the same either way, or one fingerprint has two README.md sha256s.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import BaseModel

from refinery.tasks.runtime import StageOutput, stage, sum_counts
from refinery.tasks.store import Store


class CountsConfig(BaseModel):
    shards: int = 3


@stage("counts", version="1", sharded=True)
class Counts:
    """Counts in an order that is not sorted (keys and nested keys), as real stages return them."""

    @staticmethod
    def plan(inputs, cfg):
        return [{"name": f"s{i}", "i": i} for i in range(cfg.shards)]

    @staticmethod
    def shard(b, item, cfg):
        if item["name"] == "s1" and Path(b.dir, "crash").exists():
            raise KeyboardInterrupt   # a crash after s0 was recorded
        b.write_table(f"part-{item['i']:05d}.parquet", pa.table({"x": [item["i"]] * 2}))
        return {"docs_out": 2, "docs_in": 3, "dropped": {"short": 1, "lang": 0}}

    @staticmethod
    def reduce(b, results, cfg, inputs):
        return StageOutput(counts=sum_counts(results))


def test_card_is_byte_identical_after_a_crash_and_resume(tmp_path):
    cfg = CountsConfig()
    clean = Counts.run(tmp_path / "clean", [], cfg)

    store = Store(tmp_path / "resumed")
    b = store.builder("counts", clean.fingerprint)
    Path(b.dir, "crash").touch()
    with pytest.raises(KeyboardInterrupt):
        Counts.run(store, [], cfg)
    assert b.shard_result("s0") is not None, "s0's record must be there before the resumed run"
    Path(b.dir, "crash").unlink()
    resumed = Counts.run(store, [], cfg)

    card = (Path(clean.path) / "README.md").read_bytes()
    assert (Path(resumed.path) / "README.md").read_bytes() == card
    assert [f for f in resumed.manifest["files"] if f["path"] == "README.md"] == \
        [f for f in clean.manifest["files"] if f["path"] == "README.md"]
    assert b"| dropped.lang | 0 |" in card and b"| docs_in | 9 |" in card


def test_card_rows_do_not_depend_on_the_order_of_the_counts():
    from refinery.tasks.card import card_text

    def text(counts):
        return card_text(stage="s", fingerprint="f", code_version="v", inputs=[], counts=counts, records=[])

    assert text({"b": 1, "a": 2, "n": {"y": 1, "x": 2}}) == text({"n": {"x": 2, "y": 1}, "a": 2, "b": 1})
