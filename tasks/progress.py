"""Whether console progress bars show, for every bar the stages draw (curation's tqdm bars and the
training bars alike): ``REFINERY_PROGRESS``, which ``refinery --progress=auto|always|never`` sets
(refinery.flows.console.set_progress), ``always`` or ``never``; otherwise (``auto``, unset) only
when stderr is a terminal, so a logged run's stderr holds no bar redraws.

A stage passes ``disable=bar_disabled()`` to tqdm: tqdm's own ``disable=None`` means "no bar unless
stderr is a terminal" whatever the command asked, and an explicit argument wins over the
``TQDM_DISABLE`` environment variable, so ``--progress=always`` would not reach such a bar.
Standard library only.
"""
from __future__ import annotations

import os
import sys

PROGRESS_ENV = "REFINERY_PROGRESS"


def show_progress() -> bool:
    """Whether a console progress bar shows (see the module's docstring)."""
    mode = os.environ.get(PROGRESS_ENV, "auto").strip().lower()
    if mode in ("always", "1", "true"):
        return True
    if mode in ("never", "0", "false"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def bar_disabled() -> bool:
    """tqdm's ``disable`` argument for a stage's bar: the opposite of :func:`show_progress`."""
    return not show_progress()


__all__ = ["PROGRESS_ENV", "bar_disabled", "show_progress"]
