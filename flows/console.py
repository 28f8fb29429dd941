"""What the ``refinery`` command prints, and how it ends: short error blocks, quiet logs, signals.

- :func:`describe` turns an expected failure (a failed shard, a missing path, too many bad
  records, a refused secret, a model that does not load, a full disk, an interrupted training run)
  into a few lines: what failed, which file or parameter, what to do. ``--debug`` (or
  ``REFINERY_DEBUG=1``) shows the tracebacks instead.
- :func:`install_log_filters` keeps Prefect's console handlers from printing the traceback of
  those same failures (the flow run's state and the server's log keep it) and drops known
  third-party noise, once, at the command's start (:func:`quiet_third_party`).
- :class:`SignalWatch` makes SIGTERM and SIGINT end the command promptly: the first signal lets
  the flow stop in order (Prefect reports the run, a training loop checkpoints), and if the
  process is still there after ``REFINERY_STOP_GRACE_S`` seconds (default 6; while an engine
  trains, ``REFINERY_TRAIN_STOP_GRACE_S``, default 120, for its checkpoint) or a second Ctrl-C
  comes, the temporary server is stopped and the process exits (143 for SIGTERM, 130 for SIGINT).

Standard library only at import: the command imports this before anything heavy.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import signal
import sys
import threading
import warnings
from typing import Any

DEBUG_ENV = "REFINERY_DEBUG"
PROGRESS_ENV = "REFINERY_PROGRESS"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- expected failures
def _names(e: BaseException) -> set[str]:
    return {c.__name__ for c in type(e).__mro__}


def _first_lines(text: str, n: int = 4, width: int = 300) -> str:
    lines = [ln[:width] for ln in str(text).strip().splitlines() if ln.strip()]
    return "\n".join(lines[:n]) + (f"\n  ... ({len(lines) - n} more lines)" if len(lines) > n else "")


def describe(e: BaseException) -> tuple[str, str] | None:
    """(what failed, what to do) of an expected failure, else None (a bug: the traceback shows)."""
    names = _names(e)
    msg = str(e)
    if "PathProblem" in names:
        return msg.split("; ")[0], getattr(e, "hint", "") or "check the path"
    if "ShardsFailed" in names:
        failures = getattr(e, "failures", [])
        shown = "\n".join(f"  {name}: {err[:300]}" for name, err in failures[:5])
        more = f"\n  ... and {len(failures) - 5} more" if len(failures) > 5 else ""
        unit = getattr(e, "unit", "shard")
        return (f"stage {getattr(e, 'stage', '?')}: {len(failures)} {unit}(s) failed:\n{shown}{more}",
                f"fix or remove the {unit}(s) named above and rerun the same command: finished {unit}s are kept")
    if "TooManyBadRecords" in names:
        return _first_lines(msg), "fix the data file's records, or lower min_valid_fraction (0 turns the check off)"
    if "CheckpointDiskFullError" in names:
        return _first_lines(msg), "free disk space (or lower keep_last) and rerun the same command: it resumes from the last checkpoint"
    if "TrainingInterrupted" in names:
        return _first_lines(msg) or "training interrupted", "rerun the same command: it resumes from the checkpoint"
    if "ModelCorrupt" in names:
        return _first_lines(msg), "copy or download the model again"
    if "NonFiniteCheckpointError" in names:
        return _first_lines(msg), "delete the damaged checkpoint folder named above and rerun"
    if "DatasetNotFound" in names or "DatasetCorrupt" in names:
        return _first_lines(msg), "check the dataset path (refinery inspect WORKDIR lists the datasets)"
    if names & {"IngestError", "IngestFileError", "UnknownFormat", "NotAnArchive", "TruncatedArchive"}:
        return _first_lines(msg), "check the input files named above"
    if "UnsafeLink" in names or "UnsafeResultRecord" in names:
        return _first_lines(msg), "remove the file named above; rerun the same command"
    if names & {"PermissionError"}:
        return _first_lines(msg), "check the file's permissions"
    if names & {"IsADirectoryError", "NotADirectoryError", "FileNotFoundError"}:
        return _first_lines(msg), "check the path"
    if "OSError" in names and getattr(e, "errno", None) == 28:
        return _first_lines(msg), "free disk space and rerun the same command"
    if "ValueError" in names and ("credentials" in msg or "no such model" in msg or "neither a Hugging Face model folder" in msg
                                 or "holds no model" in msg or "holds only a PEFT adapter" in msg):
        return _first_lines(msg), "see the message above"
    if "OSError" in names and ("config.json" in msg or "does not appear to have" in msg
                               or "is not a valid model identifier" in msg or "Can't load" in msg):
        return _first_lines(msg), "give a Hugging Face model folder, a refinery model dataset or a hub id this machine can reach"
    return None


def error_block(command: str, e: BaseException) -> str | None:
    """The short block printed for an expected failure, else None."""
    found = describe(e)
    if found is None:
        return None
    what, todo = found
    return (f"refinery {command}: {what}\n  what to do: {todo}\n"
            f"  (exit 1; --debug or {DEBUG_ENV}=1 shows the traceback)")


def known_failure(exc: BaseException | None) -> bool:
    if exc is None:
        return False
    return describe(exc) is not None or "TerminationSignal" in _names(exc) or isinstance(exc, KeyboardInterrupt)


# --------------------------------------------------------------------------- logs
class _ConsoleFilter(logging.Filter):
    """On console handlers: no traceback of an expected failure (the CLI prints its short block),
    Prefect's server help text cut to its first line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if debug_enabled():
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and known_failure(exc):
            return False
        if isinstance(record.msg, str) and record.msg.startswith("Starting temporary server"):
            record.msg = record.msg.split("\n", 1)[0]
        return True


_FILTER = _ConsoleFilter()


def install_log_filters() -> None:
    """Add the console filter to every stream handler of Prefect's loggers and the root logger
    (after Prefect configured logging, i.e. once it is imported). Idempotent."""
    loggers: list[Any] = [logging.getLogger()]
    loggers += [lg for name, lg in logging.root.manager.loggerDict.items()
                if isinstance(lg, logging.Logger) and (name.startswith("prefect") or name.startswith("refinery"))]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) and _FILTER not in h.filters:
                h.addFilter(_FILTER)


# Known third-party noise, filtered at its source once (messages matched from their start).
_WARNINGS = (
    # transformers / torch on gradient checkpointing
    (r".*gradient.checkpointing", FutureWarning),
    (r".*use_reentrant", UserWarning),
    (r".*use_reentrant", FutureWarning),
    # bitsandbytes without a GPU kernel
    (r".*bitsandbytes.*(GPU|CPU|cuda)", UserWarning),
)
_QUIET_LOGGERS = {"bitsandbytes": logging.ERROR, "bitsandbytes.cextension": logging.ERROR,
                  "httpx": logging.WARNING, "lm_eval.loggers.utils": logging.ERROR}


class _PatchLmEvalGit(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """lm-eval runs ``git describe`` with the terminal as its stderr, so outside a git checkout
    every evaluation printed ``fatal: not a git repository``: after ``lm_eval.loggers.utils`` is
    imported, its ``get_git_commit_hash`` runs git with stderr discarded."""

    target = "lm_eval.loggers.utils"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        import subprocess

        def get_git_commit_hash():
            try:
                out = subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL)
                return out.strip().decode()
            except (subprocess.CalledProcessError, FileNotFoundError, OSError):
                return None

        module.get_git_commit_hash = get_git_commit_hash


def quiet_third_party() -> None:
    """Warnings filters and logger levels for known noise; Prefect's telemetry off. Once, at start."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY", "false")
    if debug_enabled():
        return
    for message, category in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    if not any(isinstance(f, _PatchLmEvalGit) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchLmEvalGit())


def set_progress(mode: str, quiet: bool = False) -> bool:
    """Progress bars: ``always``, ``never`` or ``auto`` (only when stderr is a terminal). Sets
    ``REFINERY_PROGRESS``, which every bar of the stages reads (the curation stages' tqdm bars
    through refinery.tasks.progress, the training bars through the metrics log), and tqdm's
    ``TQDM_DISABLE`` for the bars that do not decide themselves; returns whether bars show."""
    if quiet:
        mode = "never"
    show = mode == "always" or (mode == "auto" and sys.stderr.isatty())
    os.environ[PROGRESS_ENV] = "always" if show else "never"
    if show:
        os.environ.pop("TQDM_DISABLE", None)
    else:
        os.environ["TQDM_DISABLE"] = "1"
    return show


# --------------------------------------------------------------------------- signals
class SignalWatch:
    """SIGTERM and SIGINT end the command promptly (see the module's docstring).

    The main thread's SIGTERM handler raises :class:`Terminated` (a KeyboardInterrupt, so
    ``except Exception`` blocks let it through); Prefect's flow engine replaces it while a flow runs
    (its TerminationSignal) and re-sends the signal to it once the run is reported. A watcher thread
    reads the signal wake-up pipe, which sees every signal whichever handler is installed, and
    ends the process if it is still there after the grace period."""

    def __init__(self, grace_s: float | None = None):
        self.grace_s = grace_s if grace_s is not None else float(os.environ.get("REFINERY_STOP_GRACE_S", "6"))
        self.received: int | None = None
        self._timer: threading.Timer | None = None

    def install(self) -> "SignalWatch":
        if threading.current_thread() is not threading.main_thread():
            return self
        signal.signal(signal.SIGTERM, self._on_term)
        from refinery.tasks.engine.signals import add_listener   # light: signal and threading only

        add_listener(self._signalled)   # a training engine's own SIGTERM handler tells us too
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:   # pragma: no cover
            return self
        threading.Thread(target=self._watch, args=(r,), name="refinery-signals", daemon=True).start()
        return self

    def exit_code(self) -> int:
        return 128 + (self.received or signal.SIGTERM)

    def _on_term(self, signum, frame):
        raise Terminated(signum)

    def _watch(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            for b in data:
                if b in (signal.SIGTERM, signal.SIGINT):
                    self._signalled(int(b))

    def _signalled(self, signum: int) -> None:
        from refinery.tasks.engine.signals import request_stop, training_active

        if self.received is None:
            self.received = signum
        elif signum == signal.SIGINT:   # Ctrl-C twice: now (a second SIGTERM may be Prefect re-sending the first)
            self.force_exit()
        request_stop()   # a trainer in any thread checkpoints at the end of its step and stops
        if self._timer is None:
            # a training run gets the time to finish its step and write its checkpoint
            grace = max(self.grace_s, float(os.environ.get("REFINERY_TRAIN_STOP_GRACE_S", "120"))) \
                if training_active() else self.grace_s
            self._timer = threading.Timer(grace, self.force_exit)
            self._timer.daemon = True
            self._timer.start()

    def force_exit(self) -> None:
        """Stop the server, say so in one line, and leave without waiting for worker threads."""
        try:
            name = signal.Signals(self.received or signal.SIGTERM).name
            print(f"refinery: stopped by {name}; rerun the same command to resume (finished stages and "
                  "checkpoints are kept)", file=sys.stderr, flush=True)
            from refinery.flows.server import stop_temporary_server

            stop_temporary_server(wait=False)
        finally:
            os._exit(self.exit_code())


class Terminated(KeyboardInterrupt):
    """SIGTERM in the main thread, outside a flow run."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


__all__ = ["describe", "error_block", "install_log_filters", "quiet_third_party", "set_progress", "SignalWatch",
           "Terminated", "debug_enabled"]
