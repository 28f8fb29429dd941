"""One process of a multi-process align run (``reward``/``dpo``/``kto``/``orpo``/``ppo`` with ``devices``
> 1), started by :func:`refinery.tasks.train.distributed.launch` (through torchrun on several nodes):

    python -m refinery.tasks.align.worker launch.json

``launch.json`` names the method, its stage config and the stage's checkpoint folder. Every rank
runs the stage's own training (:data:`refinery.tasks.align.stage.RUNS`) on the engine, which wraps
the model (DDP or FSDP2, :mod:`refinery.tasks.engine.parallel`), checkpoints into that folder (rank
0 writes; every rank writes its shards under FSDP) and resumes from it. Rank 0 writes the metrics
(in the folder's ``metrics/``), the trained tensors (``trained.pt``, gathered from the shards under
FSDP; not when the run stopped early) and ``result.json`` (figures, counts and the run's status).
"""
from __future__ import annotations

import sys

from refinery.tasks.train.distributed import worker_main


def _train(spec: dict, rank: int):
    from refinery.tasks.align.stage import RUNS
    from refinery.tasks.engine.trainer import INTERRUPTED
    from refinery.tasks.train import distributed as dist

    method = RUNS[spec["method"]]
    cfg = method.config.model_validate(spec["config"])
    res, counts, _ = method.run(cfg, spec["ckpt_dir"], False)
    result = {"stats": res.stats, "counts": counts}
    if res.stats.get("status") in INTERRUPTED:   # nothing to publish: the checkpoint is what counts
        return result, None
    model = res.policy if spec["method"] == "ppo" else res.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = dist.gather_trainable(model, trainable)   # collective under FSDP
    return result, state


def main(argv: list[str] | None = None) -> int:
    return worker_main(argv, "refinery.tasks.align.worker", _train)


if __name__ == "__main__":
    sys.exit(main())
