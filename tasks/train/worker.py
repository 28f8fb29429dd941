"""One DDP process, started by torchrun (see :func:`refinery.tasks.train.distributed.launch`).

    python -m torch.distributed.run --standalone --nproc_per_node=N -m refinery.tasks.train.worker launch.json

``launch.json`` holds the TrainConfig, the reader spec, the checkpoint folder and an optional
``stop_after``; rank 0 writes ``result.json`` beside it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m refinery.tasks.train.worker LAUNCH.json", file=sys.stderr)
        return 2
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())

    from refinery.tasks.train import distributed as dist
    from refinery.tasks.train.config import TrainConfig
    from refinery.tasks.train.loop import run_local

    cfg = TrainConfig.model_validate(spec["config"])
    dist.init(force=cfg.strategy == "fsdp")
    rank = dist.env()[0]
    try:
        result = run_local(cfg, spec["reader"], spec["ckpt_dir"], stop_after=spec.get("stop_after"),
                           log=(lambda m: print(m, flush=True)) if rank == 0 else (lambda m: None),
                           progress=False)
        if rank == 0:
            dist.write_json_atomic(spec_path.parent / "result.json", result)
        dist.barrier()
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
