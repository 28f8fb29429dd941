"""SIGTERM (a preempted spot machine, a cluster draining a node): the loop finishes its step,
checkpoints and stops, and the same command resumes from there."""
from __future__ import annotations

import signal
import threading


class Preemption:
    """SIGTERM sets a flag; the engine checkpoints at the end of the step and stops.

    Signal handlers can only be installed from the main thread; elsewhere (a Prefect task in a
    worker thread) the periodic checkpoints are what a re-run resumes from."""

    def __init__(self):
        self.flag = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.flag = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


__all__ = ["Preemption"]
