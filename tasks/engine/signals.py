"""SIGTERM (a preempted spot machine, a cluster draining a node): the loop finishes its step,
checkpoints and stops, and the same command resumes from there."""
from __future__ import annotations

import signal
import threading
from typing import Callable

_REQUESTED = threading.Event()
_LISTENERS: list[Callable[[int], None]] = []
_ACTIVE = [0]   # engines inside their loop in this process


def add_listener(fn: Callable[[int], None]) -> None:
    """``fn(signum)`` is called whenever an engine's SIGTERM handler fires (a program's own watchdog:
    the engine's handler replaces the program's while it trains)."""
    _LISTENERS.append(fn)


def training_active() -> bool:
    """Whether an engine of this process is training now (a stop should wait for its checkpoint)."""
    return _ACTIVE[0] > 0


def request_stop() -> None:
    """Ask every running engine in this process to checkpoint at the end of its step and stop: what
    a program's own SIGTERM handler calls when the training runs in another thread (a Prefect task
    in a worker thread, where the engine cannot install a handler)."""
    _REQUESTED.set()


def stop_requested() -> bool:
    return _REQUESTED.is_set()


class Preemption:
    """SIGTERM sets a flag; the engine checkpoints at the end of the step and stops.

    Signal handlers can only be installed from the main thread; elsewhere (a Prefect task in a
    worker thread) the program's handler calls :func:`request_stop`, and the periodic checkpoints
    are what a rerun resumes from when even that does not happen (SIGKILL)."""

    def __init__(self):
        self._flag = False
        self._old = None

    @property
    def flag(self) -> bool:
        return self._flag or _REQUESTED.is_set()

    def __enter__(self):
        _ACTIVE[0] += 1
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self._flag = True
        for fn in list(_LISTENERS):
            fn(signum)

    def __exit__(self, *exc):
        _ACTIVE[0] -= 1
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


__all__ = ["Preemption", "request_stop", "stop_requested", "add_listener", "training_active"]
