"""What every trainer shares (pretrain, finetune, and the reward, DPO and PPO trainers): the
device, the dtypes, seeding, and peak-memory measurement. One copy, so the three stages pick a GPU,
spell a dtype and report memory the same way.

Heavy imports (torch, numpy) happen inside the functions: the config modules import nothing from here.
"""
from __future__ import annotations

import contextlib
import os
import random
import resource

# One spelling per dtype inside the code; the configs' spellings (``bf16`` or ``bfloat16``) map here.
DTYPE_NAMES: dict[str, str] = {
    "fp32": "float32", "float32": "float32",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16",
}


# --------------------------------------------------------------------------- device
def pick_device(spec: str = "auto", local_rank: int | None = None):
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` (device ``local_rank``, one per
    process; default: torchrun's LOCAL_RANK, else 0), ``cuda:N``, ``mps``. Asking for CUDA on a machine without it is an error here,
    not a crash deep inside the first forward pass."""
    import torch

    name = spec or "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={spec} but no CUDA device is available (use device=cpu or auto)")
    if name == "cuda":
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) if local_rank is None else local_rank}"
    return torch.device(name)


# --------------------------------------------------------------------------- dtypes
def torch_dtype(name: str):
    """A dtype name (``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``) -> torch dtype;
    ``auto`` stays ``"auto"`` (``from_pretrained``: the dtype the weights were saved in)."""
    import torch

    if name == "auto":
        return "auto"
    try:
        return getattr(torch, DTYPE_NAMES[name])
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: one of auto, {', '.join(DTYPE_NAMES)}") from None


def compute_dtype(name: str, device):
    """The matmul dtype of a run: ``auto`` is bfloat16 on a GPU that has it, else float32."""
    import torch

    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return torch_dtype(name)


def autocast(device, dtype):
    """A context that runs matmuls in ``dtype`` (bf16/fp16 autocast), or does nothing for float32.
    CPU autocast has no float16, so float16 on CPU computes in float32."""
    import torch

    if dtype in (torch.bfloat16, torch.float16) and not (device.type == "cpu" and dtype == torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- seed
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (each trainer's explicit generators
    are seeded where they are made)."""
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


# --------------------------------------------------------------------------- parameter groups
def is_head_param(name: str, head_prefixes) -> bool:
    """Whether parameter ``name`` belongs to a newly added layer named by one of ``head_prefixes``
    (``score``, ``v_head``, ``classifier``...). A prefix matches a whole dotted path segment
    anywhere in the name, so the head is still found once PEFT wraps the model
    (``base_model.model.score.modules_to_save.default.weight``)."""
    dotted = "." + name + "."
    return any(("." + p.strip(".") + ".") in dotted for p in head_prefixes if p)


def param_groups(model, lr: float, head_lr: float | None = None, head_prefixes=(),
                 weight_decay: float = 0.0) -> list[dict]:
    """AdamW parameter groups: the pretrained backbone at ``lr`` and the newly added layers
    (parameters under ``head_prefixes``) at ``head_lr`` (None: ``lr``), because a freshly
    initialised head needs a larger step (about 1e-4) than pretrained weights can take (1e-5 to
    5e-5) without being damaged. Weight decay goes to matrices only (not norms or biases).

    Only trainable parameters are included, each once (tied weights share a tensor); empty groups
    are left out. Each group carries a ``name`` (``backbone``, ``backbone_no_decay``, ``head``,
    ``head_no_decay``), which torch keeps, so logs can report every group's learning rate.
    A LambdaLR schedule scales each group from its own base rate, so the ratio is kept."""
    head_lr = lr if head_lr is None else head_lr
    buckets: dict[str, list] = {"backbone": [], "backbone_no_decay": [], "head": [], "head_no_decay": []}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        part = "head" if is_head_param(name, head_prefixes) else "backbone"
        buckets[part if p.dim() >= 2 else part + "_no_decay"].append(p)
    groups = []
    for gname, params in buckets.items():
        if params:
            groups.append({"name": gname, "params": params, "lr": head_lr if gname.startswith("head") else lr,
                           "weight_decay": 0.0 if gname.endswith("no_decay") else weight_decay})
    return groups


# --------------------------------------------------------------------------- memory
def rss_mb() -> float:
    """The process's resident set now, in MiB (NaN where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def peak_rss_mb() -> float:
    """The process's high-water resident set, in MiB. On Linux the image's own ``VmHWM``: its
    ``ru_maxrss`` carries the parent's peak across fork and exec (a probe started by a big test
    process would report the parent's size). Elsewhere ``ru_maxrss`` (macOS reports bytes)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if os.uname().sysname == "Darwin" else r / 1024


class PeakMemory:
    """Peak memory over a stretch of work: CUDA max allocated on a GPU, process peak RSS on CPU.

    ``with PeakMemory(device) as mem: ...; mem.stats()`` -> ``peak_memory_mb``, ``peak_memory_kind``."""

    def __init__(self, device):
        self.device = device
        self.rss_start = float("nan")

    def start(self) -> "PeakMemory":
        """Start measuring (what ``with`` does), for a stretch of work that is not one block."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss_start = rss_mb()
        return self

    def __enter__(self):
        return self.start()

    def stats(self) -> dict:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return {"peak_memory_mb": round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1),
                    "peak_memory_kind": "cuda_max_allocated"}
        return {"peak_memory_mb": round(peak_rss_mb(), 1), "peak_memory_kind": "process_peak_rss",
                "rss_start_mb": round(self.rss_start, 1)}

    def __exit__(self, *exc):
        return False


__all__ = ["DTYPE_NAMES", "pick_device", "torch_dtype", "compute_dtype", "autocast", "seed_everything",
           "is_head_param", "param_groups",
           "rss_mb", "peak_rss_mb", "PeakMemory"]
