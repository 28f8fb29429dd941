"""Data-parallel training (DDP): process-group helpers and the torchrun launcher.

When a run asks for more than one process, :func:`launch` starts ``torchrun`` (``python -m
torch.distributed.run``) on this machine with :mod:`refinery.tasks.train.worker` as the program; every
worker runs the same loop (``refinery.tasks.train.loop.train``) and rank 0 writes the result JSON. On GPUs
the backend is NCCL (one process per GPU); on CPU it is gloo, which is how the tests exercise the
very same code path with two processes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) outside it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init(backend: str | None = None, force: bool = False) -> None:
    """Join the process group (torchrun set MASTER_ADDR/PORT, RANK, WORLD_SIZE); a single process
    joins a group of one only when ``force`` (FSDP on one GPU still needs a device mesh)."""
    import torch
    import torch.distributed as dist

    rank, world, local = env()
    if (world <= 1 and not force) or is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)


def shutdown() -> None:
    import torch.distributed as dist

    if is_initialized():
        dist.destroy_process_group()


def mean(x):
    """Average a scalar tensor over all processes (identity when not distributed)."""
    import torch.distributed as dist

    if not is_initialized():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / dist.get_world_size()


def any_true(flag: bool, device) -> bool:
    """True on every process when ``flag`` is true on any of them (e.g. a SIGTERM seen by one)."""
    import torch
    import torch.distributed as dist

    if not is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj, src: int = 0):
    import torch.distributed as dist

    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    import torch.distributed as dist

    if is_initialized():
        dist.barrier()


def cuda_device(device: str = "auto") -> bool:
    """Whether a run with ``device`` trains on CUDA."""
    import torch

    return torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))


def world_size_for(devices: int, device: str = "auto") -> int:
    """Processes to run: ``devices`` (0 = every visible GPU). More GPUs than exist is an error."""
    import torch

    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    n_gpu = torch.cuda.device_count() if cuda else 0
    if devices == 0:
        return max(n_gpu, 1)
    if cuda and devices > n_gpu:
        raise ValueError(f"devices={devices} but only {n_gpu} GPU(s) are visible")
    return devices


class FollowerNodeDone(Exception):
    """On a node other than node 0 of a multi-node run, :func:`launch` ends with this once the
    node's processes have finished: node 0 reports the run and publishes the stage's dataset."""


def follower_node() -> bool:
    """Whether this is a node other than node 0 of a multi-node run (``REFINERY_NNODES`` > 1)."""
    return num_nodes() > 1 and int(os.environ.get("REFINERY_NODE_RANK", "0")) > 0


def num_nodes() -> int:
    """Nodes of a multi-node run (``REFINERY_NNODES``; 1 when unset)."""
    return int(os.environ.get("REFINERY_NNODES", "1"))


def rendezvous_args(run_id: str) -> list[str]:
    """torchrun's rendezvous: one node (``--standalone``) unless ``REFINERY_NNODES`` > 1, when every
    node runs the same flow with ``REFINERY_NODE_RANK`` and ``REFINERY_RDZV_ENDPOINT`` (host:port of
    node 0) set, e.g. by a Kubernetes indexed job, and they meet there (c10d backend)."""
    nnodes = int(os.environ.get("REFINERY_NNODES", "1"))
    if nnodes <= 1:
        return ["--standalone"]
    endpoint = os.environ.get("REFINERY_RDZV_ENDPOINT")
    if not endpoint:
        raise ValueError("REFINERY_NNODES > 1 needs REFINERY_RDZV_ENDPOINT=host:port of node 0")
    return [f"--nnodes={nnodes}", f"--node_rank={int(os.environ.get('REFINERY_NODE_RANK', '0'))}",
            "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", f"--rdzv_id={run_id}"]


def launch(spec: dict, nproc: int, workdir: str | Path, timeout: float | None = None,
           module: str = "refinery.tasks.train.worker") -> dict:
    """Run the training spec on ``nproc`` processes with torchrun (``module``: the worker program,
    pretrain's by default, finetune's ``refinery.tasks.finetune.worker``) and return rank 0's result."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = workdir / "launch.json", workdir / "result.json"
    node_rank = int(os.environ.get("REFINERY_NODE_RANK", "0")) if num_nodes() > 1 else 0
    if node_rank == 0:
        result_path.unlink(missing_ok=True)
    # atomically: nodes sharing the folder (tests run two "nodes" on one machine) write the same spec
    write_json_atomic(spec_path, spec)
    cmd = [sys.executable, "-m", "torch.distributed.run", *rendezvous_args(workdir.name),
           f"--nproc_per_node={nproc}", "-m", module, str(spec_path)]
    env_ = dict(os.environ)
    env_.setdefault("OMP_NUM_THREADS", "1")
    root = str(Path(__file__).resolve().parents[2])
    env_["PYTHONPATH"] = root + (os.pathsep + env_["PYTHONPATH"] if env_.get("PYTHONPATH") else "")
    proc = subprocess.Popen(cmd, env=env_, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        for line in proc.stdout or ():   # stream the workers' output through (rank 0 prints progress)
            lines.append(line)
            print(line, end="", file=sys.stderr)
        proc.wait(timeout=timeout)
    except BaseException:
        proc.terminate()   # SIGTERM: torchrun forwards it, the workers checkpoint and exit
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if proc.returncode == 0 and node_rank > 0:   # rank 0 (on node 0) reports; this node's part is done
        raise FollowerNodeDone(f"node {node_rank}: its {nproc} processes finished; node 0 reports the run")
    if proc.returncode != 0 or not result_path.exists():
        tail = "".join(lines[-40:])
        raise RuntimeError(f"torchrun with {nproc} processes failed (exit {proc.returncode}):\n{tail}")
    return json.loads(result_path.read_text())


def wrap(model, strategy: str, device, compute_dtype, cpu_offload: bool = False, find_unused: bool = False):
    """The model that trains on several processes: sharded in place per block with ``fsdp``
    (FSDP2; names unchanged), else wrapped in DDP (``find_unused``: some trainable parameters may
    get no gradient in a step, e.g. a value head whose loss weight is 0)."""
    if strategy == "fsdp":
        from refinery.tasks.train.fsdp import shard_model

        return shard_model(model, compute_dtype, cpu_offload)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused)


def unwrap(model):
    """The module inside a DDP wrapper (an FSDP2-sharded model is its own module)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model


def gather_trainable(model, trainable: set[str]) -> dict:
    """The named trainable tensors, whole and on the CPU, on rank 0 (collective when sharded: every
    rank must call it); the state a stage loads back with :func:`load_trainable`."""
    from refinery.tasks.train.fsdp import full_state_dict, is_sharded

    sd = full_state_dict(model) if is_sharded(model) else unwrap(model).state_dict()
    return {k: v.detach().cpu() for k, v in sd.items() if k in trainable}


def load_trainable(model, path: str | Path) -> None:
    """Copy the tensors that :func:`gather_trainable` saved at ``path`` into ``model``'s parameters;
    every trainable parameter must be there."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    missing = {n for n, p in params.items() if p.requires_grad} - set(state)
    unknown = set(state) - set(params)
    if missing or unknown:
        raise RuntimeError(f"{path}: the workers' weights do not match the model (missing {sorted(missing)[:5]}, "
                           f"unknown {sorted(unknown)[:5]})")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as JSON so that a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(obj, default=str))
    os.replace(tmp, path)


def worker_main(argv: list[str] | None, module: str, body, sharded=lambda spec: False) -> int:
    """What every torchrun worker program does around its training (``python -m MODULE launch.json``):
    read the launch spec, join the process group (a group of one too when ``sharded(spec)``: FSDP
    on one GPU), run ``body(spec, rank)`` and, on rank 0, write what it returns, ``(result,
    trained)``: ``trained.pt`` (the trained tensors, when not None) and then ``result.json`` beside
    the spec; the stage reads them once ``result.json`` is there. Every rank waits for rank 0."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(f"usage: python -m {module} LAUNCH.json", file=sys.stderr)
        return 2
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    init(force=sharded(spec))
    rank = env()[0]
    try:
        result, trained = body(spec, rank)
        if rank == 0:
            if trained is not None:
                import torch

                tmp = spec_path.parent / f".trained.{os.getpid()}.pt"
                torch.save(trained, tmp)
                os.replace(tmp, spec_path.parent / "trained.pt")
            write_json_atomic(spec_path.parent / "result.json", result)
        barrier()
    finally:
        shutdown()
    return 0


__all__ = ["env", "init", "wrap", "worker_main", "FollowerNodeDone", "follower_node", "num_nodes", "unwrap", "gather_trainable", "load_trainable", "write_json_atomic", "shutdown", "mean", "any_true", "broadcast_object", "barrier", "world_size_for", "launch"]
