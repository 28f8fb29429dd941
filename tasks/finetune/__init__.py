"""Supervised fine-tuning (full, LoRA, QLoRA, IA3, LLaMA-Adapter, prompt and prefix tuning).

``refinery.tasks.finetune.stage.finetune`` is the stage; ``refinery.tasks.finetune.config.FinetuneConfig`` its
configuration. Importing this package is cheap: torch / transformers / peft load only when used.
"""
from refinery.tasks.finetune.config import DEFAULT_LR, METHODS, FinetuneConfig

__all__ = ["FinetuneConfig", "METHODS", "DEFAULT_LR"]
