"""A sharded stage for the engine tests (importable by Dask and Ray worker processes): shard
``KILL_SHARD`` writes its process id to ``KILL_DIR/pid`` and hangs the first time, so a test can kill
the worker under it; later attempts finish normally."""
import os
import time
from pathlib import Path

import pyarrow as pa
from pydantic import BaseModel

from refinery.tasks.runtime import StageOutput, stage, sum_counts


class KillConfig(BaseModel):
    shards: int = 6
    rows: int = 3


@stage("killable", version="1", sharded=True)
class Killable:
    @staticmethod
    def plan(inputs, cfg):
        return [{"name": f"k{i}", "i": i} for i in range(cfg.shards)]

    @staticmethod
    def shard(b, item, cfg):
        b.write_table(f"part-{item['i']:05d}.parquet", pa.table({"x": [item["i"]] * cfg.rows}))
        pid_file = Path(os.environ.get("KILL_DIR", "."), "pid")
        if item["name"] == os.environ.get("KILL_SHARD") and not pid_file.exists():
            pid_file.write_text(str(os.getpid()))   # half its work done: a part written, no record
            time.sleep(600)
        return {"docs_out": cfg.rows}

    @staticmethod
    def reduce(b, results, cfg, inputs):
        return StageOutput(counts=sum_counts(results))
