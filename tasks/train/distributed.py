"""Data-parallel training (DDP, FSDP): process-group helpers and the launcher.

When a run asks for more than one process, :func:`launch` starts them with
:mod:`refinery.tasks.train.worker` (or finetune's, align's worker) as the program; every worker runs
the same loop (``refinery.tasks.train.loop.train``) and rank 0 writes the result JSON. On one node
the launcher starts the processes itself and they meet through a file (:func:`local_worker_env`), so
nothing they start listens beyond loopback; several nodes meet through torchrun's c10d rendezvous
at the address the user names (:func:`rendezvous_args`). On GPUs the backend is NCCL (one process
per GPU); on CPU it is gloo, which is how the tests exercise the very same code path with two
processes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

# The file store that the processes of one node meet through (set by launch for each of them).
RDZV_FILE_ENV = "REFINERY_RDZV_FILE"
# The loopback interface, which gloo and NCCL use between the processes of one node.
LOOPBACK_IF = "lo0" if sys.platform == "darwin" else "lo"
# SIGTERM then this long for the processes to checkpoint and exit, before SIGKILL.
STOP_GRACE_S = 120
# After one process failed, the others (waiting in a collective for it) get torchrun's 30 s.
PEER_GRACE_S = 30


def env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) outside it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init(backend: str | None = None, force: bool = False) -> None:
    """Join the process group: through the file store that :func:`launch` names in
    ``REFINERY_RDZV_FILE`` (one node), else torchrun's ``env://`` (MASTER_ADDR/PORT: several nodes,
    or torchrun started by hand); RANK and WORLD_SIZE from either. A single process joins a group of
    one only when ``force`` (FSDP on one GPU still needs a device mesh)."""
    import torch
    import torch.distributed as dist

    rank, world, local = env()
    if (world <= 1 and not force) or is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    store = os.environ.get(RDZV_FILE_ENV)
    if store:
        dist.init_process_group(backend=backend, store=dist.FileStore(store, world), rank=rank, world_size=world)
    else:
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


def gather_objects(obj) -> list:
    """Every process's ``obj``, in rank order, on every process (``[obj]`` when not distributed)."""
    import torch.distributed as dist

    if not is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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
    """torchrun's rendezvous. Several nodes (``REFINERY_NNODES`` > 1): every node runs the same flow
    with ``REFINERY_NODE_RANK`` and ``REFINERY_RDZV_ENDPOINT`` set (host:port of node 0, e.g. by a
    Kubernetes indexed job) and they meet there (c10d backend). Node 0's TCP store listens on that
    port on every interface (torch's store binds the wildcard address, whatever host it is given),
    and gloo / NCCL between the nodes use the interface named by ``GLOO_SOCKET_IFNAME`` /
    ``NCCL_SOCKET_IFNAME``: name the nodes' private network there. One node: ``--standalone``, for
    torchrun started by hand; :func:`launch` starts one node's processes without torchrun, whose
    standalone store would listen on every interface too."""
    nnodes = int(os.environ.get("REFINERY_NNODES", "1"))
    if nnodes <= 1:
        return ["--standalone"]
    endpoint = os.environ.get("REFINERY_RDZV_ENDPOINT")
    if not endpoint:
        raise ValueError("REFINERY_NNODES > 1 needs REFINERY_RDZV_ENDPOINT=host:port of node 0")
    return [f"--nnodes={nnodes}", f"--node_rank={int(os.environ.get('REFINERY_NODE_RANK', '0'))}",
            "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", f"--rdzv_id={run_id}"]


def local_worker_env(rank: int, nproc: int, store: str | Path) -> dict[str, str]:
    """The variables of process ``rank`` of ``nproc`` on one node: torchrun's (RANK, LOCAL_RANK,
    WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK...), the file they meet through instead of torchrun's
    TCP store (``REFINERY_RDZV_FILE``, read by :func:`init`), and the loopback interface for gloo's
    and NCCL's own sockets (by default they take the host name's address, reachable from outside)."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(nproc),
            RDZV_FILE_ENV: str(store), "GLOO_SOCKET_IFNAME": LOOPBACK_IF, "NCCL_SOCKET_IFNAME": LOOPBACK_IF}


def launch(spec: dict, nproc: int, workdir: str | Path, timeout: float | None = None,
           module: str = "refinery.tasks.train.worker") -> dict:
    """Run the training spec on ``nproc`` processes of this node (``python -m MODULE launch.json``;
    ``module``: the worker program, pretrain's by default, finetune's
    ``refinery.tasks.finetune.worker``) and return rank 0's result.

    One node: the processes are started here (:func:`local_worker_env`) and nothing listens beyond
    127.0.0.1. Several nodes: through torchrun (:func:`rendezvous_args`). One process failing stops
    the others, as torchrun does; an exception here (SIGTERM, Ctrl-C, ``timeout`` seconds) sends
    SIGTERM to every process (on several nodes to torchrun, which forwards it): the workers
    checkpoint and exit."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = workdir / "launch.json", workdir / "result.json"
    node_rank = int(os.environ.get("REFINERY_NODE_RANK", "0")) if num_nodes() > 1 else 0
    if node_rank == 0:
        result_path.unlink(missing_ok=True)
    # atomically: nodes sharing the folder (tests run two "nodes" on one machine) write the same spec
    write_json_atomic(spec_path, spec)
    with tempfile.TemporaryDirectory(prefix="refinery-rdzv-") as rdzv:   # local disk: the store locks it
        code, tail = _run_group(_commands(module, spec_path, nproc, Path(rdzv) / "store"), _launch_env(), timeout)
    if code == 0 and node_rank > 0:   # rank 0 (on node 0) reports; this node's part is done
        raise FollowerNodeDone(f"node {node_rank}: its {nproc} processes finished; node 0 reports the run")
    if code != 0 or not result_path.exists():
        raise RuntimeError(f"the {nproc} training processes failed (exit {code}):\n{''.join(tail)}")
    return json.loads(result_path.read_text())


def _commands(module: str, spec_path: Path, nproc: int, store: Path) -> list[tuple[list[str], dict[str, str]]]:
    """What :func:`launch` starts: torchrun on several nodes (it starts this node's ``nproc``
    processes, its rendezvous id is the run folder's name), else the ``nproc`` processes, which
    meet through ``store``."""
    if num_nodes() > 1:
        return [([sys.executable, "-m", "torch.distributed.run", *rendezvous_args(spec_path.parent.name),
                  f"--nproc_per_node={nproc}", "-m", module, str(spec_path)], {})]
    program = [sys.executable, "-u", "-m", module, str(spec_path)]
    return [(program, local_worker_env(rank, nproc, store)) for rank in range(nproc)]


def _launch_env() -> dict[str, str]:
    env_ = {k: v for k, v in os.environ.items() if k != RDZV_FILE_ENV}
    env_.setdefault("OMP_NUM_THREADS", "1")
    root = str(Path(__file__).resolve().parents[2])
    env_["PYTHONPATH"] = root + (os.pathsep + env_["PYTHONPATH"] if env_.get("PYTHONPATH") else "")
    return env_


def _run_group(commands: list[tuple[list[str], dict[str, str]]], env: dict[str, str],
              timeout: float | None = None) -> tuple[int, deque[str]]:
    """Start every ``(argv, variables)`` of ``commands`` (over ``env``) on one shared output pipe,
    stream their lines through to stderr (rank 0 prints progress) and wait for them all. Returns
    the group's exit code (0, or the first failure's: the others are then stopped) and the last 40
    lines. On an exception (KeyboardInterrupt, a SIGTERM turned into one, ``timeout``) every process
    gets SIGTERM, then SIGKILL after :data:`STOP_GRACE_S`, and the exception goes on."""
    tail: deque[str] = deque(maxlen=40)
    read_fd, write_fd = os.pipe()
    procs: list[subprocess.Popen] = []
    try:
        for argv, variables in commands:
            procs.append(subprocess.Popen(argv, env={**env, **variables}, stdout=write_fd, stderr=subprocess.STDOUT))
    except BaseException:
        os.close(read_fd)
        _stop(procs, STOP_GRACE_S)
        raise
    finally:
        os.close(write_fd)   # the processes hold it now: the pipe ends when the last of them does
    relay = threading.Thread(target=_relay, args=(read_fd, tail), daemon=True)
    relay.start()
    try:
        code = _wait_all(procs, timeout)
    except BaseException:
        _stop(procs, STOP_GRACE_S)
        raise
    relay.join(timeout=5)   # a grandchild still holding the pipe must not hold the launch
    return code, tail


def _relay(fd: int, tail: deque[str]) -> None:
    with open(fd, errors="replace") as out:
        for line in out:
            tail.append(line)
            print(line, end="", file=sys.stderr)


def _wait_all(procs: list[subprocess.Popen], timeout: float | None) -> int:
    """0 once every process exited 0; the exit code of the first that failed, once the others are
    stopped (they would wait in their next collective for it until the group's timeout)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            _stop(procs, PEER_GRACE_S)
            return failed[0]
        if None not in codes:
            return 0
        if deadline is not None and time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(procs[0].args, timeout or 0)
        time.sleep(0.2)


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM to every process still running (the training loops checkpoint at the end of their
    step and exit), SIGKILL to those still running ``grace`` seconds later."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


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

    assign_trainable(model, torch.load(path, map_location="cpu", weights_only=True), f"{path}: the workers' weights")


def assign_trainable(model, state: dict, what: str) -> None:
    """Copy the named tensors of ``state`` into ``model``'s parameters, which must match: every
    trainable parameter there, nothing the model lacks (``what`` names the source in the error)."""
    import torch

    params = dict(model.named_parameters())
    missing = {n for n, p in params.items() if p.requires_grad} - set(state)
    unknown = set(state) - set(params)
    if missing or unknown:
        raise RuntimeError(f"{what} do not match the model (missing {sorted(missing)[:5]}, unknown {sorted(unknown)[:5]}): "
                           "written by another configuration?")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as JSON so that a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(obj, default=str))
    os.replace(tmp, path)


def worker_main(argv: list[str] | None, module: str, body, sharded=lambda spec: False) -> int:
    """What every worker program does around its training (``python -m MODULE launch.json``):
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


__all__ = ["env", "init", "wrap", "worker_main", "FollowerNodeDone", "follower_node", "num_nodes", "unwrap", "gather_trainable", "load_trainable", "assign_trainable", "write_json_atomic", "shutdown", "mean", "any_true", "broadcast_object", "gather_objects", "barrier", "world_size_for", "launch",
           "local_worker_env", "rendezvous_args"]
