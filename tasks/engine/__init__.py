"""The training engine: the one loop every trainer runs on (pretrain, fine-tuning, every align method).

A trainer is a :class:`refinery.tasks.engine.trainer.Method`: it builds its model and data and gives
the loss of one micro-batch (``micro_step``) and its held-out figures (``validate``). The
:class:`refinery.tasks.engine.trainer.Engine` owns everything else, once:

    schedule.py        the learning-rate schedule (one warm-up formula)
    optim.py           the optimizer over parameter groups (backbone ``lr``, new heads ``head_lr``)
    early_stopping.py  the best validated weights, the patience count
    parallel.py        this process's place in a multi-process run (DDP, FSDP2), batch shares
    data.py            seeded example orders whose position is checkpointed
    signals.py         SIGTERM: checkpoint at the end of the step and stop
    state.py           checkpoints of the whole run (weights, optimizer, schedule, RNG, data
                       position, early stopping, metrics) and resume from the newest intact one
    trainer.py         the loop: accumulation, clipping, mixed precision, evaluation cadence,
                       metrics, checkpoints

This package imports nothing from the stage packages (``tasks.train``'s shared helpers aside:
devices, checkpoint files, metrics), so every stage can build on it. Heavy imports are lazy.
"""
