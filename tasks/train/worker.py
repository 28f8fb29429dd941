"""One DDP/FSDP process, started by :func:`refinery.tasks.train.distributed.launch` (N of them on one
node, each with torchrun's RANK, LOCAL_RANK, WORLD_SIZE...; through torchrun on several nodes):

    python -m refinery.tasks.train.worker launch.json

``launch.json`` holds the TrainConfig, the reader spec, the checkpoint folder and an optional
``stop_after``; rank 0 writes ``result.json`` beside it.
"""
from __future__ import annotations

import sys

from refinery.tasks.train.distributed import worker_main


def _train(spec: dict, rank: int):
    from refinery.tasks.train.config import TrainConfig
    from refinery.tasks.train.loop import run_local

    cfg = TrainConfig.model_validate(spec["config"])
    result = run_local(cfg, spec["reader"], spec["ckpt_dir"], stop_after=spec.get("stop_after"),
                       log=(lambda m: print(m, flush=True)) if rank == 0 else (lambda m: None), progress=False)
    return result, None


def main(argv: list[str] | None = None) -> int:
    return worker_main(argv, "refinery.tasks.train.worker", _train,
                       sharded=lambda spec: spec["config"].get("strategy") == "fsdp")


if __name__ == "__main__":
    sys.exit(main())
