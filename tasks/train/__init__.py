"""Pretraining: models from config (size presets), objectives (clm, mlm, span), the training loop,
checkpoints, DDP, metrics, and the ``pretrain`` stage.

Submodules import torch/transformers lazily or at their own top level; this package imports nothing
heavy, so ``from refinery.tasks.train.config import TrainConfig`` is cheap.
"""
