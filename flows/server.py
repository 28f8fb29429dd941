"""The temporary Prefect server of a ``refinery`` command: on 127.0.0.1, and gone when the command is.

With no ``PREFECT_API_URL``, Prefect runs a temporary API server itself (``SubprocessASGIServer``:
uvicorn on 127.0.0.1, a free port in 8000-8999), a child process that it stops at exit. A command
that ends without running its exit handlers (SIGKILL, the OOM killer, a SIGTERM nothing handles)
left that server, some 235 MB, running for ever. :func:`start_temporary_server` starts it before
the flow, the same instance Prefect then uses, beside a guard (``python -m refinery.flows.server
PARENT SERVER``, a bare interpreter) that ends the server when the command's process is gone,
whatever ended it. A guard process rather than ``PR_SET_PDEATHSIG``: Prefect starts the server
with its own ``Popen``, and that signal would follow the starting thread, not the process.

The server and the guard run in sessions of their own: a signal sent to the command's process
group (``timeout -s TERM``, Ctrl-C in a terminal) reaches the command only, which then reports its
flow run's end to a server that is still there and stops it itself (:func:`stop_temporary_server`).
Before, the server died first and the command retried its API calls for minutes.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
import types

# How often the guard looks at its parent, and how long the server gets to stop before SIGKILL.
POLL_S = 0.5
STOP_GRACE_S = 10


def start_temporary_server() -> str | None:
    """Start Prefect's temporary server for this process and its guard, unless ``PREFECT_API_URL``
    names a server (then nothing starts here); the API URL of the temporary server, else None."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    server = SubprocessASGIServer()   # the instance Prefect's clients get (one per port; None: any)
    if not server.running:
        with _own_session():
            server.start()
        assert server.server_process is not None
        start_guard(server.server_process.pid)
    return server.api_url


def stop_temporary_server(wait: bool = True) -> None:
    """Stop this process's temporary server now (it would be stopped at exit or by the guard).
    ``wait=False``: send it SIGTERM and return at once (the guard kills it if it lingers)."""
    srv = sys.modules.get("prefect.server.api.server")
    if srv is None:   # Prefect's server module never loaded: no server here
        return
    for server in list(getattr(srv.SubprocessASGIServer, "_instances", {}).values()):
        proc = getattr(server, "server_process", None)
        if proc is None:
            continue
        with contextlib.suppress(Exception):
            if wait:
                server.stop()
            else:
                proc.terminate()


@contextlib.contextmanager
def _own_session():
    """Prefect's server ``Popen`` starts a new session while this is active (see the module's docstring)."""
    import prefect.server.api.server as srv

    original = srv.subprocess
    patched = types.SimpleNamespace(**{k: getattr(subprocess, k) for k in dir(subprocess) if not k.startswith("__")})
    patched.Popen = functools.partial(subprocess.Popen, start_new_session=True)  # type: ignore[attr-defined]
    srv.subprocess = patched  # type: ignore[assignment]
    try:
        yield
    finally:
        srv.subprocess = original


def start_guard(server_pid: int) -> subprocess.Popen:
    """A process that ends ``server_pid`` once this process is gone (or itself ends when the server
    does). Its output goes nowhere: holding this process's pipes, it would keep a reader waiting."""
    return subprocess.Popen([sys.executable, "-m", "refinery.flows.server", str(os.getpid()), str(server_pid)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def guard(parent: int, server: int) -> None:
    """Wait while ``parent`` is this process's parent and ``server`` runs; then stop the server
    (SIGTERM, SIGKILL after :data:`STOP_GRACE_S`). The parent's death shows as a new parent: the
    orphan is adopted by init or a subreaper."""
    # Ctrl-C reaches every process of the terminal: the command stops its server itself then
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while os.getppid() == parent and _alive(server):
        time.sleep(POLL_S)
    if not _alive(server):
        return
    os.kill(server, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(server):
        os.kill(server, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process now holds the number: ours is gone
        return False
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """An ended process that its new parent has not reaped yet still answers ``kill(pid, 0)``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


if __name__ == "__main__":
    guard(int(sys.argv[1]), int(sys.argv[2]))
