"""Nothing a local run starts listens beyond loopback, and its temporary Prefect server ends with it.

While each server runs (the Ray cluster of ``task_runner=ray:2``, the Dask cluster of ``dask:2``, the
processes of ``devices=2``, the temporary Prefect server of ``refinery run``), psutil lists the
sockets that this process and everything it started listen on (TCP) or receive on (unconnected
UDP): every one must be on 127.0.0.0/8 or ::1. Then ``refinery run`` is killed with SIGKILL, which
runs none of its exit handlers: its server must go too.

This file is also the program of the two training processes (``python -m test_listeners``): they
join their process group, say they are ready and wait until the test has looked at their sockets.
"""
from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def listeners(pid: int | None = None) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP or unconnected UDP socket of process
    ``pid`` (this one by default) and its descendants."""
    top = psutil.Process(pid)
    tree = {top.pid, *(p.pid for p in top.children(recursive=True))}
    found = []
    for c in psutil.net_connections(kind="inet"):
        serving = c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr)
        if c.pid in tree and serving:
            try:
                name = psutil.Process(c.pid).name()
            except psutil.Error:
                name = "?"
            found.append((name, c.laddr.ip, c.laddr.port))
    return sorted(found)


def exposed(found: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """The sockets of ``found`` that other machines can reach (not on loopback)."""
    def loopback(ip: str) -> bool:
        addr = ipaddress.ip_address(ip.split("%")[0])
        mapped = getattr(addr, "ipv4_mapped", None)   # ::ffff:127.0.0.1 is IPv4 loopback
        return (mapped or addr).is_loopback

    return [s for s in found if not loopback(s[1])]


def test_ray_cluster_listens_on_loopback_only():
    ray = pytest.importorskip("ray")
    from refinery.tasks.runtime import make_runner

    with make_runner("ray:2"):
        ping = ray.remote(lambda: os.getpid())   # by value: the workers cannot import this file
        assert ray.get([ping.remote() for _ in range(4)])   # workers up: their gRPC servers too
        found = listeners()
    assert any(name == "gcs_server" for name, _, _ in found), found
    assert not exposed(found), f"ray:2 listens beyond loopback: {exposed(found)}"


def test_dask_cluster_listens_on_loopback_only():
    pytest.importorskip("prefect_dask")
    from refinery.tasks.runtime import make_runner

    with make_runner("dask:2") as runner:
        assert len(runner.client.scheduler_info()["workers"]) == 2
        found = listeners()
    assert len(found) >= 5, found   # scheduler, dashboard, two workers and their nannies
    assert not exposed(found), f"dask:2 listens beyond loopback: {exposed(found)}"


def _hold(spec: dict, rank: int):
    """The body of each training process: joined (a collective has run), ready, until released."""
    import torch
    import torch.distributed as dist

    one = torch.ones(1)
    dist.all_reduce(one)
    folder = Path(spec["folder"])
    (folder / f"ready.{rank}").write_text(str(os.getpid()))
    deadline = time.time() + 120
    while not (folder / "release").exists() and time.time() < deadline:
        time.sleep(0.05)
    return {"world": int(one.item())}, None


def _outward_interface() -> str | None:
    """A network interface with an address other machines can reach, if this machine has one."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback for a in addrs):
            return name
    return None


def test_training_processes_listen_on_loopback_only(tmp_path, monkeypatch):
    from refinery.tasks.train.distributed import launch

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    outward = _outward_interface()
    if outward:   # as a multi-node setting would name it: gloo would listen there (here the host name is loopback)
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", outward)
    done: dict = {}

    def run():
        try:
            done["result"] = launch({"folder": str(tmp_path)}, 2, tmp_path / "run", timeout=180, module="test_listeners")
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            done["error"] = e

    runner = threading.Thread(target=run)
    runner.start()
    try:
        deadline = time.time() + 120
        while len(list(tmp_path.glob("ready.*"))) < 2 and runner.is_alive() and time.time() < deadline:
            time.sleep(0.05)
        found = listeners()
    finally:
        (tmp_path / "release").write_text("")
        runner.join(timeout=180)
    assert done.get("result") == {"world": 2}, done
    assert not exposed(found), f"devices=2 listens beyond loopback: {exposed(found)}"


HOLD_FLOW = """
import sys, time
from refinery.flows import cli
from refinery.flows.common import FlowParams, refinery_flow

@refinery_flow("hold", FlowParams)
def hold(params):
    print("HOLDING", flush=True)   # through the flow's logger (log_prints): a line ending so
    time.sleep(300)

cli.load_flow = lambda name: hold
sys.exit(cli.main(["run", "hold", "--workdir", sys.argv[1]]))
"""


def _prefect_servers(pid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if "prefect.server.api.server:create_app" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_temporary_prefect_server_is_on_loopback_and_dies_with_refinery_run(tmp_path):
    """``refinery run`` (its run command, with a flow that waits) starts Prefect's temporary server;
    SIGKILL of the command, which runs no exit handler, must end that server too."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env["PYTHONPATH"] = str(ROOT)
    cli = subprocess.Popen([sys.executable, "-c", HOLD_FLOW, str(tmp_path / "work")], env=env, cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    servers: list[psutil.Process] = []
    try:
        lines = []
        for line in cli.stdout:   # the flow runs: the server is up
            lines.append(line)
            if line.rstrip().endswith("HOLDING"):
                break
        assert cli.poll() is None, "".join(lines)
        servers = _prefect_servers(cli.pid)
        assert len(servers) == 1, "".join(lines)
        found = listeners(servers[0].pid)
        assert found and not exposed(found), found

        cli.send_signal(signal.SIGKILL)
        cli.wait()
        gone, alive = psutil.wait_procs(servers, timeout=20)
        assert not alive, f"the temporary Prefect server outlived `refinery run` (SIGKILL): {alive}"
    finally:
        for p in servers:
            try:
                p.kill()
            except psutil.Error:
                pass
        cli.kill()
        cli.wait()


if __name__ == "__main__":
    from refinery.tasks.train.distributed import worker_main

    sys.exit(worker_main(None, "test_listeners", _hold))
