"""Small stages used by the store/runtime/flow tests (importable by worker processes)."""
import os
import time

import pyarrow as pa
from pydantic import BaseModel

from refinery.tasks.runtime import StageOutput, stage, sum_counts


class ToyConfig(BaseModel):
    shards: int = 3
    rows: int = 4


@stage("toy", version="1", sharded=True)
class Toy:
    @staticmethod
    def plan(inputs, cfg):
        return [{"name": f"s{i}", "i": i} for i in range(cfg.shards)]

    @staticmethod
    def shard(b, item, cfg):
        if item["name"] == os.environ.get("TOY_HANG"):  # kill tests: signal, then hang
            open(os.environ["TOY_SIGNAL"], "w").close()
            time.sleep(600)
        b.write_table(f"part-{item['i']:05d}.parquet", pa.table({"x": [item["i"]] * cfg.rows}))
        return {"docs_out": cfg.rows}

    @staticmethod
    def reduce(b, results, cfg, inputs):
        return StageOutput(counts=sum_counts(results))


class DoubleConfig(BaseModel):
    factor: int = 2


@stage("double", version="1")
def double(b, inputs, cfg):
    t = inputs[0].read_table()
    x = pa.compute.multiply(t["x"], cfg.factor)
    b.write_table("part-00000.parquet", pa.table({"x": x}))
    return StageOutput(counts={"docs_in": t.num_rows, "docs_out": t.num_rows})
