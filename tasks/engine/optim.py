"""The optimizer of every trainer: AdamW over parameter groups (the backbone at ``lr``, newly added
layers at ``head_lr``; weight decay on matrices only), or bitsandbytes' 8-bit AdamW on CUDA."""
from __future__ import annotations

from typing import Sequence

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")


def build_optimizer(model, cfg, device, *, lr: float | None = None, head_prefixes: Sequence[str] = (),
                    kind: str = "adamw", betas: tuple[float, float] = (0.9, 0.999), fused: bool | None = None):
    """The optimizer of ``model``'s trainable parameters (``model`` unwrapped or FSDP-sharded, so
    the head names match). ``lr`` defaults to ``cfg.lr``; ``cfg.head_lr`` (empty: ``lr``) applies to
    parameters under ``head_prefixes``. ``fused`` (default: on CUDA, and on CPU for unsharded
    parameters) is torch's single-kernel AdamW; ``device`` is where the optimizer state lives."""
    import torch

    from refinery.tasks.train.common import param_groups

    lr = cfg.lr if lr is None else lr
    head_lr = cfg.head_lr if cfg.head_lr is not None else lr
    groups = param_groups(model, lr, head_lr, head_prefixes, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if kind in ("adamw_8bit", "paged_adamw_8bit"):
        if device.type != "cuda":
            raise ValueError(f"optimizer={kind} needs a CUDA device; use optimizer=adamw on CPU")
        from refinery.tasks.extras import require

        bnb = require("bitsandbytes", f"optimizer={kind}")

        cls = bnb.optim.PagedAdamW8bit if kind == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(groups, lr=lr, betas=betas)
    if kind != "adamw":
        raise ValueError(f"optimizer={kind}: one of {', '.join(OPTIMIZERS)}")
    if fused is None:   # torch's fused CPU AdamW takes no DTensor
        fused = device.type == "cuda" or (device.type == "cpu" and not _sharded(groups))
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=fused)


def _sharded(groups) -> bool:
    return any(type(p).__name__ == "DTensor" for g in groups for p in g["params"])


def rates(optimizer) -> dict:
    """The current learning rate of the backbone (``lr``) and, when it has its own group, of the new
    layers (``head_lr``)."""
    out: dict = {}
    for g in optimizer.param_groups:
        key = "head_lr" if g.get("name", "").startswith("head") else "lr"
        out.setdefault(key, float(f"{g['lr']:.6g}"))
    return out


__all__ = ["OPTIMIZERS", "build_optimizer", "rates"]
