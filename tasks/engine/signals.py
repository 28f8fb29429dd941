"""SIGTERM (a preempted spot machine, a cluster draining a node): the loop finishes its step,
checkpoints and stops, and the same command resumes from there."""
from __future__ import annotations

import signal
import threading

_REQUESTED = threading.Event()


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
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self._flag = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


__all__ = ["Preemption", "request_stop", "stop_requested"]
