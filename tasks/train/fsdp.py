"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the pretraining loop (``strategy=fsdp``).

    shard_model(model, compute_dtype, cpu_offload)  each transformer block, then the root, becomes an
                                                    FSDP unit: parameters are DTensors sharded on dim 0
                                                    across the ranks, gathered for a block's forward
                                                    and backward and freed after; gradients are
                                                    reduce-scattered (averaged) in float32
    full_state_dict(model)                          the whole model on rank 0 (collective), for the
                                                    Hugging Face folder of every checkpoint
    save_sharded / load_sharded                     model and optimizer shards through
                                                    torch.distributed.checkpoint (each rank writes
                                                    its own shard; resume reads them back exactly)
    shard_stats(model, optimizer)                   elements this rank holds (parameters, optimizer)

The optimizer must be built over the sharded parameters, so the loop builds it after
:func:`shard_model`. Heavy imports are lazy.
"""
from __future__ import annotations

from pathlib import Path

DCP_DIR = "dcp"   # the sharded state's folder inside a checkpoint


def blocks(model) -> list:
    """The repeated transformer blocks: the members of every ``nn.ModuleList`` whose members are
    alike (Llama/ModernBERT ``layers``, T5 ``block`` of encoder and decoder)."""
    import torch

    out: list = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and sum(p.numel() for p in module[0].parameters()) > 0:
                out.extend(module)
    return out


def shard_model(model, compute_dtype, cpu_offload: bool = False):
    """Shard ``model`` in place across the default process group, per block then the root
    (the embeddings, tied output head and final norm live in the root unit)."""
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    # compute in the run's dtype, keep float32 master shards, reduce gradients in float32
    mp = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                              reduce_dtype=torch.float32)
    kw: dict = {"mp_policy": mp}
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    units = blocks(model)
    if not units:
        raise ValueError(f"fsdp: found no transformer blocks in {type(model).__name__} to shard")
    for block in units:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    model.register_forward_hook(_reshard_after_inference)
    return model


def _reshard_after_inference(module, args, output) -> None:
    """After a forward without gradients (evaluation, scoring a reference), free the root's gathered
    parameters. FSDP2 keeps them gathered after a root forward, expecting the backward; a later
    training forward would then reuse tensors gathered without autograd, and the root parameters'
    gradients (embeddings, output head) would not be reduced correctly over the ranks."""
    import torch

    if not torch.is_grad_enabled():
        module.reshard()


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def set_gradient_sync(model, sync: bool) -> None:
    """FSDP2's no_sync: accumulate unsharded gradients locally until the last micro-batch."""
    model.set_requires_gradient_sync(sync)


def to_float(x) -> float:
    """A scalar that may be a DTensor (clip_grad_norm_ over sharded parameters returns one)."""
    full = getattr(x, "full_tensor", None)
    return float(full() if full is not None else x)


def full_state_dict(model) -> dict:
    """The unsharded model state on rank 0, on the CPU (every rank must call it; others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model, optimizer, folder: str | Path) -> bool:
    """Every rank writes its shards of the model and the optimizer to ``folder`` (collective);
    returns whether the optimizer was included. An optimizer that has not stepped yet is left out:
    asking torch for its state dict would initialise it by a zero step, which counts as a step in
    AdamW's bias correction and would put the run off the single-process curve."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if not optimizer.state:
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(folder))
        return False
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder))
    return True


def load_sharded(model, optimizer, folder: str | Path, with_optimizer: bool = True) -> None:
    """Read the shards written by :func:`save_sharded` back into the sharded model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)

    if not with_optimizer:
        state: dict = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=str(folder))
        set_model_state_dict(model, state["model"])
        return
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def shard_stats(model, optimizer) -> dict:
    """Elements this rank holds: its parameter shards, and its optimizer state (local tensors)."""
    import torch

    def local(t) -> int:
        to_local = getattr(t, "to_local", None)
        return int((to_local() if to_local is not None else t).numel())

    params = sum(local(p) for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    optim = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                optim += local(v)
    return {"param_numel_local": params, "param_numel_total": int(total), "optim_numel_local": optim}


__all__ = ["blocks", "shard_model", "is_sharded", "set_gradient_sync", "to_float", "full_state_dict",
           "save_sharded", "load_sharded", "shard_stats", "DCP_DIR"]
