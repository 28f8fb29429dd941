"""Stages: plain functions over datasets, cached by fingerprint, runnable with or without Prefect.

A stage is declared once::

    @stage("tokenize", version="1")
    def tokenize(b: Builder, inputs: list[Dataset], cfg: TokenizeConfig) -> StageOutput: ...

    @stage("filter", version="1", sharded=True)
    class Filter:
        def plan(inputs, cfg) -> list[dict]          # each item has a unique "name"
        def shard(b, item, cfg) -> dict              # JSON-able counts of one shard
        def reduce(b, results, cfg, inputs) -> StageOutput
        def identity(cfg) -> list[str]               # optional: raw inputs' identities

and used either as plain Python (``stage.run(store, inputs, cfg)``, what tests call) or from a
flow (``stage.call(root, inputs, cfg, runner=...)``), where the stage is a Prefect task whose
cache key is the fingerprint (plus the storage root) and whose result is the manifest as JSON, and
its unfinished shards are handed, from one Prefect task, to the task runner's engine (a Dask
cluster, Ray, or a local pool: see :func:`shard_engine`), which schedules and runs them; the flow
gathers their outcomes as they finish. Either way a dataset whose manifest exists is returned
without any work, and a sharded stage that crashed resumes from its finished shards.

Failures: a shard that raises is retried on its worker with backoff (``shard_retries``), and is
never recorded as finished (the next run redoes it); a worker that dies mid-shard loses only that
shard, which the engine reruns elsewhere; the other shards still run, and the stage fails at the end with :class:`ShardsFailed` naming every failed
shard and its error, unless the stage tolerates some (``max_failed_shards`` on the config, default 0,
or the stage's own ``max_failed(cfg)``); tolerated failures are listed in the manifest under
``stats.failed_shards``. Prefect results are read only as JSON (see :func:`check_result_record`).

Set ``REFINERY_EXEC_LOG=/path`` to get one line per real execution (``stage fp [shard]``): the
tests count executions with it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import pickle
import random
import re
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Sequence

from pydantic import BaseModel

from refinery.tasks.store import Builder, Dataset, Store, fingerprint


log = logging.getLogger("refinery.runtime")


@dataclasses.dataclass
class StageOutput:
    counts: dict = dataclasses.field(default_factory=dict)
    stats: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)


def config_dict(cfg: Any) -> dict:
    if cfg is None:
        return {}
    if isinstance(cfg, BaseModel):
        return cfg.model_dump(mode="json")
    return dict(cfg)


def _log_exec(line: str) -> None:
    path = os.environ.get("REFINERY_EXEC_LOG")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def _open_inputs(inputs: Sequence[Dataset | str | os.PathLike]) -> list[Dataset]:
    return [d if isinstance(d, Dataset) else Dataset.open(d) for d in inputs]


class ShardsFailed(RuntimeError):
    """Shards of a sharded stage failed; raised once every other shard has finished.

    ``failures`` is ``[(shard name, error text), ...]``. Picklable (its args rebuild it), so it
    crosses process and Dask boundaries intact."""

    def __init__(self, stage: str, failures: Sequence[Sequence[str]], unit: str = "shard"):
        self.stage, self.failures, self.unit = stage, [(str(n), str(e)) for n, e in failures], unit
        super().__init__(stage, self.failures, unit)

    def __str__(self) -> str:
        lines = "\n".join(f"  {name}: {err}" for name, err in self.failures)
        return f"stage {self.stage}: {len(self.failures)} {self.unit}(s) failed:\n{lines}"


@dataclasses.dataclass
class ShardFailure:
    """The outcome of a shard that raised: never recorded as finished, so a rerun redoes it."""

    name: str
    error: str


def error_text(e: BaseException, limit: int = 1000) -> str:
    """``Type: message`` of an exception, cut to ``limit`` characters (messages may quote input)."""
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[:limit] + "..."


def file_identity(path: str | os.PathLike, storage_options: dict | None = None) -> str:
    """The identity of a raw input file (one that is not a dataset) in a fingerprint:
    ``location|size|version``, where version is the modification time (local files: st_mtime_ns)
    or what the store gives (an object store's ETag, else its modification time).

    The one rule for every stage that reads raw files: ingest's crawl files and dumps, finetune's
    instruction file, align's preference pairs. Metadata rather than content, because crawl inputs
    are many gigabytes and often remote: hashing them would read every byte on every run just to
    compute a fingerprint, where a stat is one call. A changed file changes its size or its
    mtime/ETag, so a stale dataset is never reused; the price is the other direction (a touched or
    copied but identical file is rebuilt). A missing or unreadable file gives
    ``location|missing|ErrorName`` so the fingerprint exists and the stage reports the error."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    path = os.fspath(path)
    try:
        fs, fs_path = fsspec.core.url_to_fs(path, **(storage_options or {}))
        if isinstance(fs, LocalFileSystem):   # nanosecond mtimes; absolute, so the cwd does not matter
            st = os.stat(fs_path)
            return f"{os.path.abspath(fs_path)}|{st.st_size}|{st.st_mtime_ns}"
        info = fs.info(fs_path)
    except (OSError, ValueError) as e:
        return f"{path}|missing|{type(e).__name__}"
    version: Any = None
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            version = info[key]
            break
    if hasattr(version, "isoformat"):
        version = version.isoformat()
    return f"{path}|{info.get('size')}|{version}"


def sum_counts(results: Sequence[dict]) -> dict:
    """Add up nested dicts of numbers (shard counts)."""
    out: dict = {}
    for r in results:
        for k, v in r.items():
            if isinstance(v, dict):
                out[k] = sum_counts([out.get(k, {}), v])
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    return out


class Stage:
    def __init__(self, name: str, version: str, obj: Any, sharded: bool):
        self.name, self.version, self.sharded = name, version, sharded
        self.obj = obj
        self.ref = f"{obj.__module__}:{obj.__name__}"
        self.__doc__ = obj.__doc__
        self.__wrapped__ = obj

    # -- identity
    def fingerprint(self, inputs: Sequence[Dataset], cfg: Any) -> str:
        ids = [d.fingerprint for d in inputs]
        identity = getattr(self.obj, "identity", None)
        if self.sharded and identity is not None:
            ids += list(identity(cfg))
        return fingerprint(self.name, self.version, config_dict(cfg), ids)

    # -- the work
    def _body(self, b: Builder, inputs: list[Dataset], cfg: Any) -> StageOutput:
        _log_exec(f"{self.name} {b.fingerprint}")
        out = self.obj(b, inputs, cfg)
        if not isinstance(out, StageOutput):
            raise TypeError(f"stage {self.name} returned {type(out).__name__}, not StageOutput")
        return out

    def _shard(self, b: Builder, item: dict, cfg: Any) -> dict:
        done = b.shard_result(item["name"])
        if done is not None:
            return done
        _log_exec(f"{self.name} {b.fingerprint} {item['name']}")
        t0 = time.perf_counter()
        result = self.obj.shard(b, item, cfg)
        b.record_shard(item["name"], result, time.perf_counter() - t0)
        return result

    def _try_shard(self, b: Builder, item: dict, cfg: Any) -> dict | ShardFailure:
        """One shard; an exception becomes a :class:`ShardFailure` (logged by name) so the other
        shards still run."""
        try:
            return self._shard(b, item, cfg)
        except Exception as e:  # noqa: BLE001 - reported with every other failure in _settle
            failure = ShardFailure(item["name"], error_text(e))
            _warn("%s: shard %s failed: %s", self.name, failure.name, failure.error)
            return failure

    @property
    def shard_unit(self) -> str:
        """What one shard is, in messages (the stage's ``shard_unit``, e.g. "input file")."""
        return getattr(self.obj, "shard_unit", "shard")

    def max_failed(self, cfg: Any) -> int:
        """How many shards may fail before the stage does: the stage's ``max_failed(cfg)`` hook,
        else ``cfg.max_failed_shards``, else 0."""
        hook = getattr(self.obj, "max_failed", None)
        if hook is not None:
            return int(hook(cfg))
        return int(getattr(cfg, "max_failed_shards", 0) or 0)

    def _settle(self, items: list[dict], outcomes: list, cfg: Any) -> tuple[list[dict], list[dict]]:
        """(results for reduce, failures) from every shard's outcome. Raises :class:`ShardsFailed`
        naming each failed shard when more failed than the stage tolerates. A tolerated failure
        reaches reduce as the stage's ``failed(item, error)`` result when it has that hook."""
        failed = [{"name": o.name, "error": o.error} for o in outcomes if isinstance(o, ShardFailure)]
        if failed and len(failed) > self.max_failed(cfg):
            raise ShardsFailed(self.name, [(f["name"], f["error"]) for f in failed], self.shard_unit)
        hook = getattr(self.obj, "failed", None)
        results = []
        for item, o in zip(items, outcomes):
            if not isinstance(o, ShardFailure):
                results.append(o)
            elif hook is not None:
                results.append(hook(item, o.error))
        return results, failed

    def _run_shards(self, b: Builder, items: list[dict], cfg: Any, mapper: Callable | None = None):
        """Every shard in this process (or through ``mapper``); see :meth:`_settle`."""
        mapper = mapper or (lambda f, xs: [f(x) for x in xs])
        outcomes = list(mapper(lambda it: self._try_shard(b, it, cfg), items))
        return self._settle(items, outcomes, cfg)

    def _reduce(self, b: Builder, results: list[dict], inputs: list[Dataset], cfg: Any) -> StageOutput:
        _log_exec(f"{self.name} {b.fingerprint}")
        reduce = getattr(self.obj, "reduce", None)
        if reduce is None:
            return StageOutput(counts=sum_counts(results))
        return reduce(b, results, cfg, inputs)

    def _publish(self, b: Builder, inputs: list[Dataset], cfg: Any, out: StageOutput, seconds: float,
                 failed: list[dict] | None = None) -> Dataset:
        stats = dict(out.stats)
        if failed:  # tolerated failures (max_failed_shards): listed, never silent
            stats["failed_shards"] = failed
        if self.sharded:  # work seconds: every shard's time (timed once, here in _shard) plus the reduce step's
            stats["shard_seconds"] = round(b.shard_seconds(), 3)
            seconds += stats["shard_seconds"]
        stats.setdefault("seconds", round(seconds, 3))
        return b.publish(version=self.version, config=config_dict(cfg), inputs=[d.ref() for d in inputs],
                         counts=out.counts, stats=stats, extra=out.extra)

    def run(self, store: Store | str, inputs: Sequence[Dataset | str] = (), cfg: Any = None,
            map_fn: Callable | None = None) -> Dataset:
        """Plain Python: return the cached dataset, or build and publish it."""
        store = store if isinstance(store, Store) else Store(store)
        inputs = _open_inputs(inputs)
        fp = self.fingerprint(inputs, cfg)
        elsewhere = self._without_lock(store, inputs, fp, cfg)
        if elsewhere is not None:
            return elsewhere
        found = store.get(self.name, fp)
        if found is not None:
            return _mark(found, cached=True)
        with store.lock(self.name, fp):   # one writer per fingerprint: the others wait, then reuse its dataset
            found = store.recover(self.name, fp)
            if found is not None:
                return _mark(found, cached=True)
            return _mark(self._build(store, fp, inputs, cfg, map_fn), cached=False)

    def _without_lock(self, store: Store, inputs: list[Dataset], fp: str, cfg: Any) -> Dataset | None:
        """A hook for stages whose dataset this process must not build or wait for under the
        writer lock (a multi-node training stage on a node other than node 0: see
        ``refinery.tasks.train.multinode``); the dataset, or None to take the ordinary path."""
        return None

    def _build(self, store: Store, fp: str, inputs: list[Dataset], cfg: Any, map_fn: Callable | None) -> Dataset:
        t0 = time.perf_counter()
        b = store.builder(self.name, fp)
        failed: list[dict] = []
        if self.sharded:
            items = self.obj.plan(inputs, cfg)
            _check_items(self.name, items)
            results, failed = self._run_shards(b, items, cfg, map_fn)
            out = self._reduce(b, results, inputs, cfg)
        else:
            out = self._body(b, inputs, cfg)
        return self._publish(b, inputs, cfg, out, time.perf_counter() - t0, failed)

    # -- Prefect
    def call(self, root: str, inputs: Sequence[Dataset | str] = (), cfg: Any = None, runner: Any = None,
             fanout: str = "engine") -> Dataset:
        """From a flow: Prefect tasks, cached by fingerprint; a sharded stage's unfinished shards go
        to ``runner``'s engine (see :func:`shard_engine`). ``fanout="tasks"`` is the older path, one
        Prefect task per shard group (kept for ``bench/orchestration.py`` to measure against)."""
        store = Store(root)
        inputs = _open_inputs(inputs)
        fp = self.fingerprint(inputs, cfg)
        elsewhere = self._without_lock(store, inputs, fp, cfg)
        if elsewhere is not None:
            return elsewhere
        # One writer per fingerprint: the others wait, then reuse its dataset. Taken even when the
        # dataset exists: the writer publishes before Prefect writes its result record, which a
        # reader must not see half-written.
        with store.lock(self.name, fp):
            return self._call(store, inputs, fp, cfg, runner, exists=store.recover(self.name, fp) is not None,
                              fanout=fanout)

    def _call(self, store: Store, inputs: list[Dataset], fp: str, cfg: Any, runner: Any, exists: bool,
              fanout: str = "engine") -> Dataset:
        input_paths = [d.path for d in inputs]
        failed: list[dict] = []
        if self.sharded and not exists:
            items = self.obj.plan(inputs, cfg)
            _check_items(self.name, items)
            b = store.builder(self.name, fp)
            results: list | None = [b.shard_result(it["name"]) for it in items]   # finished shards need no work
            todo = [i for i, r in enumerate(results or []) if r is None]
            if fanout == "tasks":
                outcomes = self._shard_tasks(store, b, fp, items, todo, cfg, runner)
            else:
                outcomes = self._engine_shards(store, fp, [items[i] for i in todo], cfg, runner)
            for i, r in zip(todo, outcomes):
                results[i] = r   # type: ignore[index]
            results, failed = self._settle(items, results or [], cfg)
        else:
            results = None
        storage = result_storage(store)
        key = _stage_key(None, {"stage_ref": self.ref, "fp": fp, "root": store.root})
        expect = RecordIdentity(store.dataset_path(self.name, fp), self.name, fp)
        # A planted record is refused here, with its file named; one naming another dataset is moved aside.
        check_stored_result(storage, key, expect)
        task = _prefect_stage_task().with_options(name=self.name, task_run_name=f"{self.name}:{fp}",
                                                  refresh_cache=not exists, result_storage=storage)
        manifest = task(stage_ref=self.ref, root=store.root, fp=fp, input_paths=input_paths, cfg=cfg,
                        shard_results=results, failed_shards=failed)
        # Belt and braces: whatever Prefect returned, only this stage's own dataset is the output.
        wrong = expect.mismatch(manifest)
        if wrong:
            raise UnsafeResultRecord(f"{storage.basepath}/{key}: the stage result {wrong}; refusing it")
        return _mark(Dataset.open(expect.path), cached=exists)

    def _engine_shards(self, store: Store, fp: str, items: list[dict], cfg: Any, runner: Any) -> list:
        """Each shard's outcome (result or :class:`ShardFailure`), in ``items`` order: one Prefect
        task (``<stage>-shards``) hands them all to the engine, which schedules, retries and runs
        them; the flow process only submits them and gathers their outcomes as they finish."""
        if not items:
            return []
        engine = shard_engine(runner)
        retries, backoff = shard_retry_policy(cfg)
        fan = FanOut(self, engine, ShardJob(self.ref, store.root, fp, cfg, retries, backoff), items)
        task = _prefect_fanout_task().with_options(
            name=f"{self.name}-shards", task_run_name=f"{self.name}:{len(items)} shards on {engine.name}")
        return task(stage=self.name, shards=len(items), fan=fan)

    def _shard_tasks(self, store: Store, b: Builder, fp: str, items: list[dict], todo: list[int], cfg: Any,
                     runner: Any) -> list:
        """The older path: one Prefect task per shard group, submitted from the flow process."""
        shard_task = _prefect_shard_task().with_options(name=f"{self.name}-shards")
        futures = []
        for group in shard_groups(todo, runner_slots(runner)):
            first, last = items[group[0]]["name"], items[group[-1]]["name"]
            label = first if len(group) == 1 else f"{first}..{last} ({len(group)} shards)"
            t = shard_task.with_options(task_run_name=f"{self.name}:{label}")
            params = {"stage_ref": self.ref, "root": store.root, "fp": fp,
                      "items": [items[i] for i in group], "cfg": cfg}
            fut = runner.submit(t, parameters=params) if runner is not None else t.submit(**params)
            futures.append((group, fut))
        outcome: dict[int, Any] = {}
        for group, fut in futures:   # every group is waited for before any failure is raised
            outcome.update(zip(group, _group_outcomes(b, [items[i] for i in group], fut)))
        return [outcome[i] for i in todo]

    def __call__(self, *args, **kwargs):
        return self.obj(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<stage {self.name} v{self.version}{' sharded' if self.sharded else ''}>"


def _warn(msg: str, *args: Any) -> None:
    """A warning in our log and, inside a Prefect run, in that run's log (the UI shows it)."""
    log.warning(msg, *args)
    if "prefect" not in sys.modules:   # plain Python: no run to report to (and no Prefect import)
        return
    from prefect.context import TaskRunContext, FlowRunContext
    from prefect.logging import get_run_logger

    if TaskRunContext.get() is not None or FlowRunContext.get() is not None:
        get_run_logger().warning(msg, *args)


def _mark(ds: Dataset, cached: bool) -> Dataset:
    """Tell the flow's reports whether this run built ``ds`` or found it already built."""
    ds.cached = cached  # type: ignore[attr-defined]  # read with getattr by the flows' reports
    return ds


def _check_items(name: str, items: list[dict]) -> None:
    names = [it["name"] for it in items]
    if len(set(names)) != len(names):
        raise ValueError(f"stage {name}: shard names are not unique")


class ShardedStage:
    """Base of a sharded stage's class (``@stage(NAME, sharded=True) class X(ShardedStage)``).

    At run time ``@stage`` replaces the class by a :class:`Stage`; type checkers do not apply class
    decorators, so this base declares for them what the decorated name offers."""

    if TYPE_CHECKING:
        name: ClassVar[str]
        version: ClassVar[str]
        run: ClassVar[Callable[..., Dataset]]
        call: ClassVar[Callable[..., Dataset]]
        fingerprint: ClassVar[Callable[..., str]]


def stage(name: str, version: str = "1", sharded: bool = False, kind: type[Stage] = Stage) -> Callable[[Any], Stage]:
    """Declare a stage. ``kind``: a subclass of :class:`Stage` for stages with their own path
    around the writer lock (``refinery.tasks.train.multinode.MultiNodeStage``)."""
    def wrap(obj: Any) -> Stage:
        if sharded:
            for attr in ("plan", "shard"):
                if not callable(getattr(obj, attr, None)):
                    raise TypeError(f"sharded stage {name} needs a static {attr}()")
        return kind(name, version, obj, sharded)
    return wrap


def resolve(stage_ref: str) -> Stage:
    module, attr = stage_ref.split(":")
    return getattr(importlib.import_module(module), attr)


# --------------------------------------------------------------------------- Prefect task bodies
def _stage_key(context, parameters) -> str:
    return f"refinery-{parameters['stage_ref'].split(':')[-1]}-{parameters['fp']}-" + \
        fingerprint("root", "", {"root": parameters["root"]}, [])


def _run_shard_task(stage_ref: str, root: str, fp: str, items: list[dict], cfg: Any) -> list[dict]:
    """Run a group of shards; one that fails does not stop the others (those are recorded as done),
    and :class:`ShardsFailed` naming the failed ones is raised once all were tried (so Prefect
    retries the task, which redoes only the failed shards)."""
    st = resolve(stage_ref)
    b = Store(root).builder(st.name, fp)
    outcomes = [st._try_shard(b, item, cfg) for item in items]
    failed = [(o.name, o.error) for o in outcomes if isinstance(o, ShardFailure)]
    if failed:
        raise ShardsFailed(st.name, failed, st.shard_unit)
    return [o for o in outcomes if not isinstance(o, ShardFailure)]


def _group_outcomes(b: Builder, items: list[dict], fut: Any) -> list:
    """Each shard's outcome in a finished shard task: its result, or a :class:`ShardFailure` (a
    task that failed as a whole, e.g. a lost worker, fails those of its shards with no record)."""
    try:
        return list(fut.result())
    except ShardsFailed as e:
        errors = dict(e.failures)
    except Exception as e:  # noqa: BLE001 - reported per shard by Stage._settle
        errors = {it["name"]: error_text(e) for it in items}
    out: list = []
    for it in items:
        done = b.shard_result(it["name"])
        out.append(done if done is not None else ShardFailure(it["name"], errors.get(it["name"], "no record")))
    return out


TASKS_PER_SLOT = 2


def runner_slots(runner: Any) -> int | None:
    """How many tasks ``runner`` runs at once: a Dask cluster's worker threads, a pool's size;
    None when unbounded or unknown."""
    if hasattr(runner, "_client"):   # prefect-dask: ``client`` connects on first use
        try:
            return max(1, sum(runner.client.nthreads().values()))
        except Exception:  # noqa: BLE001 - a cluster that cannot say: one shard per task
            return None
    n = getattr(runner, "_max_workers", None)
    return n if isinstance(n, int) and 0 < n < 1 << 20 else None


def shard_groups(todo: list[int], slots: int | None) -> list[list[int]]:
    """Split shard indices into Prefect tasks: ``TASKS_PER_SLOT`` tasks per slot of the runner
    (round-robin, so neighbouring shards of similar size land in different tasks), or one task
    per shard when the runner's width is unknown.

    Each Prefect task costs the flow ~0.1-0.3 s to submit (context and argument serialization)
    whatever its size, so one task per shard caps a cluster at a few shards per second; grouping
    keeps the submissions proportional to the cluster, not to the input. Resume granularity is
    unchanged: every shard records its own completion."""
    if not todo:
        return []
    n_tasks = len(todo) if not slots else min(len(todo), TASKS_PER_SLOT * slots)
    return [todo[k::n_tasks] for k in range(n_tasks)]


# --------------------------------------------------------------------------- shards on the engine
# A stage hands its shards to the engine's own scheduler (a Dask cluster, Ray, or a local pool)
# from one Prefect task in the flow process, so the flow pays microseconds per shard instead of a
# Prefect task submission (0.1-0.3 s) per shard group. Each shard still records its own completion
# (Builder.record_shard), which is what a rerun resumes from.

SHARD_RETRIES = 1          # extra attempts of a failing shard, on its worker (env REFINERY_SHARD_RETRIES)
SHARD_BACKOFF_S = 1.0      # the first retry's delay, doubled per attempt, jittered (env REFINERY_SHARD_BACKOFF)
SHARD_BACKOFF_CAP_S = 60.0
ENGINE_TASK_RETRIES = 3    # reruns of a shard whose worker died under it (Ray; Dask: allowed-failures)
BATCHES_PER_SLOT = 16      # engine tasks per worker slot: shards ride in batches when there are many more
PROGRESS_EVERY_S = 2.0     # the progress artifact is updated at most this often (one API call each)
LOG_EVERY_S = 30.0         # a progress line in the run's log at most this often


def shard_retry_policy(cfg: Any) -> tuple[int, float]:
    """(retries, first backoff in seconds) of a failing shard: the config's ``shard_retries`` /
    ``shard_backoff`` when it has them, else the environment's, else the module defaults."""
    retries = getattr(cfg, "shard_retries", None)
    if retries is None:
        retries = int(os.environ.get("REFINERY_SHARD_RETRIES", SHARD_RETRIES))
    backoff = getattr(cfg, "shard_backoff", None)
    if backoff is None:
        backoff = float(os.environ.get("REFINERY_SHARD_BACKOFF", SHARD_BACKOFF_S))
    return max(0, int(retries)), max(0.0, float(backoff))


# Errors another attempt cannot change: the input's content (an empty file, a format or schema
# error, bad UTF-8), a missing or forbidden path, a bug. Retrying them only delays the report.
_PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, TypeError, LookupError, AttributeError, NotImplementedError, AssertionError,
    FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def is_permanent(e: BaseException) -> bool:
    """Whether a shard's error cannot go away on another attempt: an error that says so itself
    (``permanent`` attribute), else one of :data:`_PERMANENT_ERRORS`, or one raised from such an
    error (a stage's wrapper naming the file, e.g. ``IngestFileError(...) from NotAnArchive``).
    Everything else (I/O errors, timeouts, a worker's memory error) is worth another attempt."""
    seen = 0
    while e is not None and seen < 8:   # the cause chain, bounded (a cycle cannot hang us)
        said = getattr(e, "permanent", None)
        if said is not None:
            return bool(said)
        if isinstance(e, _PERMANENT_ERRORS):
            return True
        e, seen = e.__cause__, seen + 1   # type: ignore[assignment]
    return False


def backoff_delay(first: float, attempt: int) -> float:
    """Seconds to wait before retry ``attempt + 1``: exponential, capped, jittered (so shards that
    failed together, e.g. on a store outage, do not all come back at once)."""
    return min(SHARD_BACKOFF_CAP_S, first * 2 ** attempt) * random.uniform(0.5, 1.0)


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """What every shard of one stage run needs on a worker (sent once per worker, not per shard)."""
    stage_ref: str
    root: str
    fp: str
    cfg: Any
    retries: int = SHARD_RETRIES
    backoff: float = SHARD_BACKOFF_S

    def blob(self) -> bytes:
        return pickle.dumps(self)


_JOBS: dict[bytes, ShardJob] = {}     # worker side: unpickled jobs by digest (one per stage run)
_STORES: dict[str, Store] = {}


def _job(job: ShardJob | bytes) -> ShardJob:
    if isinstance(job, ShardJob):
        return job
    key = hashlib.sha1(job).digest()
    if key not in _JOBS:
        if len(_JOBS) >= 16:
            _JOBS.pop(next(iter(_JOBS)))
        _JOBS[key] = pickle.loads(job)
    return _JOBS[key]


def run_engine_shard(item: dict, job: ShardJob | bytes) -> dict | ShardFailure:
    """One shard on an engine worker: its result (recorded as done by :meth:`Stage._shard`, which
    also returns an earlier run's record without redoing it), or, once ``retries`` more attempts
    with backoff failed too, a :class:`ShardFailure` with the last error (never recorded as done).
    An error that cannot go away (:func:`is_permanent`) fails the shard at once."""
    j = _job(job)
    st = resolve(j.stage_ref)
    store = _STORES.get(j.root) or _STORES.setdefault(j.root, Store(j.root))
    b = store.builder(st.name, j.fp)
    for attempt in range(j.retries + 1):
        try:
            return st._shard(b, item, j.cfg)
        except Exception as e:  # noqa: BLE001 - retried, then reported by name with the others
            if attempt == j.retries or is_permanent(e):
                return ShardFailure(item["name"], error_text(e))
            delay = backoff_delay(j.backoff, attempt)
            log.warning("%s: shard %s failed (attempt %d of %d): %s; retrying in %.1f s",
                        st.name, item["name"], attempt + 1, j.retries + 1, error_text(e), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def run_engine_batch(items: list[dict], job: ShardJob | bytes) -> list:
    """A batch of shards, one after the other, on one worker (see :func:`shard_batches`): each
    shard's outcome. A worker killed mid-batch loses only the shard it was in: the engine reruns
    the batch, whose finished shards return their records without redoing any work."""
    return [run_engine_shard(it, job) for it in items]


def shard_batches(n: int, slots: int | None) -> list[list[int]]:
    """Shard indices in engine tasks: one shard per task while there are fewer than
    ``BATCHES_PER_SLOT`` per worker slot (a 1,000 x 16-thread cluster runs a snapshot of 90,000
    files one file per task), else batches, the shards dealt round-robin (neighbours, often of
    similar size, land in different batches). An engine task costs
    the scheduler about a millisecond whatever it holds (more on a loaded machine), which a
    10,000-shard stage of tiny shards on 2 workers would otherwise spend mostly on scheduling."""
    if n == 0:
        return []
    tasks = n if not slots else min(n, BATCHES_PER_SLOT * slots)
    return [list(range(k, n, tasks)) for k in range(tasks)]


class PoolEngine:
    """Shards on a local thread or process pool (``threads[:N]`` / ``processes[:N]``)."""

    def __init__(self, kind: str = "threads", workers: int | None = None):
        self.kind, self.workers = kind, workers
        self.name = f"{kind}:{workers}" if workers else kind

    def slots(self) -> int:
        return self.workers or os.cpu_count() or 1

    def run(self, job: ShardJob, batches: list[list[dict]]) -> Iterator[tuple[int, Any]]:
        import concurrent.futures as cf
        import multiprocessing

        if self.kind == "processes":   # spawn: the flow process has threads, which fork would copy mid-lock
            pool: cf.Executor = cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
            arg: ShardJob | bytes = job.blob()
        else:
            pool, arg = cf.ThreadPoolExecutor(self.workers, thread_name_prefix="shard"), job
        with pool:
            futures = {pool.submit(run_engine_batch, batch, arg): i for i, batch in enumerate(batches)}
            for fut in cf.as_completed(futures):
                exc = fut.exception()
                yield futures.pop(fut), exc if exc is not None else fut.result()


class DaskEngine:
    """Shards as plain Dask tasks (``Client.map``), gathered with ``as_completed`` in batches. A
    worker that dies mid-shard has its shard rerun elsewhere by the scheduler
    (``distributed.scheduler.allowed-failures``); the job travels once, as one task's result."""

    def __init__(self, client: Any):
        self.client = client
        self.name = "dask"

    def slots(self) -> int:
        return max(1, sum(self.client.nthreads().values()))

    def run(self, job: ShardJob, batches: list[list[dict]]) -> Iterator[tuple[int, Any]]:
        from distributed import as_completed

        # The job as a task's result (not scattered data): recomputed if its worker dies.
        job_future = self.client.submit(_identity, job.blob(), pure=False)
        futures = self.client.map(run_engine_batch, batches, job=job_future, pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        done = as_completed(futures, loop=self.client.loop, with_results=True, raise_errors=False)
        del futures   # as_completed holds them now; each is released once gathered
        for fut, res in done:
            if fut.status != "finished":   # erred (e.g. KilledWorker) or cancelled: (type, exc, tb) or None
                res = res[1] if isinstance(res, tuple) and len(res) == 3 else RuntimeError(f"shard task {fut.status}")
            yield index.pop(fut.key), res
        job_future.release()


def _identity(x: Any) -> Any:
    return x


class RayRunner:
    """Ray as the engine: ``ray[:N]`` starts a local Ray cluster of N CPUs (N shards at once) whose
    every process listens on 127.0.0.1 only (:meth:`_start_local`); ``ray://HOST:PORT`` connects
    through the Ray client to a cluster someone started, listening where they bound it (on several
    machines: ``ray start --head --node-ip-address=ADDR`` on the address the nodes share). A context
    manager like Prefect's task runners; shards are Ray tasks (``max_retries``: a killed worker's
    shard reruns)."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        self.address, self.num_cpus = address, num_cpus
        self.name = address or (f"ray:{num_cpus}" if num_cpus else "ray")
        self._started = False

    def __enter__(self) -> "RayRunner":
        import ray

        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
            else:
                self._start_local()
            self._started = True
        return self

    def _start_local(self) -> None:
        """Start a local cluster (no dashboard) whose GCS, raylet (object manager included), workers'
        gRPC servers, runtime env agent and autoscaler monitor all listen on 127.0.0.1 (whoever
        reaches a Ray cluster can run code in it). Ray binds them to its node address, which
        ``ray._private.services.get_node_ip_address`` resolves to the machine's outward address,
        ``ray.init(_node_ip_address="127.0.0.1")`` included, unless clusters are off
        (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, what Ray does on macOS and Windows): then loopback.
        The variable reaches the processes the cluster starts; Ray read it into ``ray_constants``
        when it was imported, so this process's copy is switched too, both only while it starts."""
        import ray
        from ray._private import ray_constants

        var = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
        saved = os.environ.get(var), ray_constants.ENABLE_RAY_CLUSTER
        os.environ[var], ray_constants.ENABLE_RAY_CLUSTER = "0", False
        try:
            ray.init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = saved[1]
            if saved[0] is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = saved[0]

    def __exit__(self, *exc: Any) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def slots(self) -> int:
        import ray

        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def run(self, job: ShardJob, batches: list[list[dict]]) -> Iterator[tuple[int, Any]]:
        import ray

        remote = ray.remote(max_retries=ENGINE_TASK_RETRIES, retry_exceptions=False)(run_engine_batch)
        job_ref: Any = ray.put(job.blob())   # each task gets the bytes, fetched once per worker
        refs = [remote.remote(batch, job_ref) for batch in batches]
        index = {r: i for i, r in enumerate(refs)}
        pending = refs
        while pending:   # whatever finished within the timeout, in one pass over the pending list
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            for ref in ready:
                try:
                    out = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a worker that died more often than max_retries
                    out = e
                yield index.pop(ref), out


def shard_engine(runner: Any) -> Any:
    """The engine behind a flow's task runner: the Dask cluster of a ``DaskTaskRunner``, a
    :class:`RayRunner` itself, a thread/process pool of a Prefect pool runner's width, or (no
    runner) a thread pool."""
    if runner is None:
        return PoolEngine("threads")
    if hasattr(runner, "run") and hasattr(runner, "name") and not hasattr(runner, "submit"):
        return runner   # already an engine (RayRunner, PoolEngine, DaskEngine)
    if hasattr(runner, "_client"):   # prefect-dask: ``client`` connects on first use
        return DaskEngine(runner.client)
    workers = runner_slots(runner)
    kind = "processes" if type(runner).__name__.startswith("ProcessPool") else "threads"
    return PoolEngine(kind, workers)


class FanOut:
    """One stage's shards on an engine, gathered as they finish (a plain class, not a dataclass:
    Prefect does not walk it as a task parameter)."""

    def __init__(self, st: "Stage", engine: Any, job: ShardJob, items: list[dict]):
        self.stage, self.engine, self.job, self.items = st, engine, job, items

    def run(self) -> list:
        st, n = self.stage, len(self.items)
        outcomes: list = [None] * n
        progress = _Progress(st.name, n)
        batches = shard_batches(n, self.engine.slots())
        b = None
        for k, outs in self.engine.run(self.job, [[self.items[i] for i in batch] for batch in batches]):
            if isinstance(outs, BaseException):   # the task itself failed (a worker lost too often)
                b = b or Store(self.job.root).builder(st.name, self.job.fp)
                outs = [self._lost(b, self.items[i]["name"], outs) for i in batches[k]]
            for i, out in zip(batches[k], outs):
                if isinstance(out, ShardFailure):
                    _warn("%s: shard %s failed: %s", st.name, out.name, out.error)
                outcomes[i] = out
                progress.step(isinstance(out, ShardFailure))
        progress.finish()
        return outcomes

    @staticmethod
    def _lost(b: Builder, name: str, error: BaseException) -> dict | ShardFailure:
        """A shard of a task that failed as a whole: its record if it finished before, else a failure."""
        done = b.shard_result(name)
        return done if done is not None else ShardFailure(name, error_text(error))


class _Progress:
    """Shards done/failed, as a Prefect progress artifact (throttled) and a log line now and then."""

    def __init__(self, stage: str, total: int):
        self.stage, self.total, self.done, self.failed = stage, total, 0, 0
        self.t0 = self.t_art = self.t_log = time.monotonic()
        self.artifact = self._call("create_progress_artifact", progress=0.0,
                                   description=f"{stage}: shards done of {total}")

    def _call(self, name: str, **kw: Any) -> Any:
        if "prefect" not in sys.modules:
            return None
        try:
            from prefect.context import TaskRunContext
            if TaskRunContext.get() is None:
                return None
            import prefect.artifacts as artifacts
            return getattr(artifacts, name)(**kw)
        except Exception as e:  # noqa: BLE001 - progress is a convenience: never fail a stage for it
            log.debug("progress artifact: %s", e)
            return None

    def step(self, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        now = time.monotonic()
        if self.artifact is not None and now - self.t_art >= PROGRESS_EVERY_S:
            self.t_art = now
            self._call("update_progress_artifact", artifact_id=self.artifact, progress=100.0 * self.done / self.total)
        if now - self.t_log >= LOG_EVERY_S:
            self.t_log = now
            log.info("%s: %d/%d shards done (%d failed), %.1f shards/s", self.stage, self.done, self.total,
                     self.failed, self.done / max(now - self.t0, 1e-9))

    def finish(self) -> None:
        if self.artifact is not None:
            self._call("update_progress_artifact", artifact_id=self.artifact, progress=100.0)


def _run_fanout_task(stage: str, shards: int, fan: FanOut) -> list:
    """The Prefect task of a stage's shards (``stage``/``shards`` name it in the UI)."""
    return fan.run()


def _run_stage_task(stage_ref: str, root: str, fp: str, input_paths: list[str], cfg: Any,
                    shard_results: list[dict] | None, failed_shards: list[dict] | None = None) -> dict:
    st = resolve(stage_ref)
    store = Store(root)
    found = store.get(st.name, fp)
    if found is None:
        inputs = _open_inputs(input_paths)
        t0 = time.perf_counter()
        b = store.builder(st.name, fp)
        if st.sharded:
            if shard_results is None:  # cached stage result vanished: redo shards here
                shard_results, failed_shards = st._run_shards(b, st.obj.plan(inputs, cfg), cfg)
            out = st._reduce(b, shard_results, inputs, cfg)
        else:
            out = st._body(b, inputs, cfg)
        found = st._publish(b, inputs, cfg, out, time.perf_counter() - t0, failed_shards)
    return {"path": found.path, **found.manifest}


_TASKS: dict[str, Any] = {}


class UnsafeResultRecord(RuntimeError):
    """A Prefect result record that is not plain JSON (it names pickle or another serializer).

    Not an OSError/ValueError on purpose: Prefect and our own "no record yet" checks swallow
    those, and a planted record must stop the run, not be taken for a cache miss."""


class TornResultRecord(FileNotFoundError, ValueError):
    """A result record cut short (empty, or the start of a JSON record): what a crash or a full disk
    in the middle of Prefect's write leaves (its file write is not atomic). Our storage block moves
    it aside and raises this, which both readers take for "no record yet": Prefect's ``exists``
    (any exception), a missing file to ``LocalFileSystem`` (``ValueError``) and to fsspec
    (``FileNotFoundError``), and :func:`check_stored_result`; so the task runs again and writes a
    fresh record."""

    def __init__(self, where: str, why: str):
        super().__init__(f"{where}: {why}")
        self.where, self.why = where, why


_SAFE_DECODERS = (None, "prefect.serializers.prefect_json_object_decoder")
_SERIALIZER_TYPE = re.compile(rb'"serializer"\s*:\s*\{\s*"type"\s*:\s*"([^"]*)"')


def check_result_record(content: bytes, where: str) -> bytes:
    """``content`` unchanged if it is a plain JSON result record; :class:`TornResultRecord` if it
    was cut short; otherwise :class:`UnsafeResultRecord` naming ``where``.

    Why: Prefect decodes a record with whatever the record itself names: a serializer (pickle), a
    ``jsonlib`` or ``object_decoder`` to import, or ``__class__``/``__exc_type__`` objects in the
    payload that its JSON decoder imports and builds. Anyone who can write the result store (a
    shared volume, a bucket) could make every worker run their code. Our stage results are JSON
    manifests (``result_serializer="json"``), so only that is read: serializer ``json`` with the
    standard ``json`` module, Prefect's default decoder (or none), no loader options, and a payload
    of plain JSON values. The check parses with the standard library only, before Prefect does.

    Torn records: a record that does not parse but is empty (or blank, or NUL bytes as some file
    systems leave after a crash) or begins with ``{`` is the prefix of a record Prefect was writing
    (its records are one JSON object): it is :class:`TornResultRecord`, which the storage block
    moves aside, so nobody decodes it and the task rebuilds it (unless what is left names a
    serializer other than ``json``: not a record of ours, refused). Any other bytes that are not JSON
    (e.g. a raw pickle stream) are refused: a crash cannot write them, and Prefect hands a record
    that is not JSON to the result store's fallback serializer, which is pickle for any task not set
    to JSON. A record whose envelope parses but whose payload is not JSON is refused too, on
    purpose: truncation cannot produce it (the payload is a string inside the envelope, so cutting
    the file breaks the envelope), and Prefect's decoder builds each ``__class__`` object of a
    payload as soon as that object closes, before it reaches the error, so a payload that does not
    parse could still run code and our scan for typed objects cannot see into it."""
    def refuse(why: str) -> UnsafeResultRecord:
        return UnsafeResultRecord(f"{where}: {why}; refusing to decode this result record "
                                  "(only plain JSON records are read; delete the file to rebuild it)")

    try:
        record = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        head = content.strip(b"\x00 \t\r\n")
        if not head:
            raise TornResultRecord(where, f"empty result record ({len(content)} bytes)") from None
        named = _SERIALIZER_TYPE.search(head)
        if named and named.group(1) != b"json":   # never one of ours: a planted record, cut or not
            kind = named.group(1)[:40].decode(errors="replace")
            raise refuse(f"it is cut short and names serializer {kind!r}") from None
        if head.startswith(b"{"):
            raise TornResultRecord(where, f"result record cut short ({len(content)} bytes, not complete "
                                          "JSON)") from None
        raise refuse("not JSON, nor the start of a JSON record") from None
    meta = record.get("metadata") if isinstance(record, dict) else None
    ser = meta.get("serializer") if isinstance(meta, dict) else None
    if not isinstance(ser, dict) or ser.get("type") != "json":
        kind = ser.get("type") if isinstance(ser, dict) else ser
        raise refuse(f"it names serializer {str(kind)[:40]!r}")
    if ser.get("jsonlib", "json") != "json" or ser.get("object_decoder") not in _SAFE_DECODERS \
            or ser.get("loads_kwargs"):
        raise refuse("its JSON serializer names a non-standard loader or decoder")
    payload = record.get("result")
    try:
        value = json.loads(payload) if isinstance(payload, str) else payload
    except ValueError:
        raise refuse("its payload is not JSON") from None
    if _has_typed_objects(value):
        raise refuse("its payload holds __class__/__exc_type__ objects")
    return content


def _has_typed_objects(value: Any) -> bool:
    """Whether any JSON object in ``value`` is one Prefect's decoder would import and build."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if "__class__" in v or "__exc_type__" in v:
                return True
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _json_only(base: Any) -> type:
    """A Prefect storage block like ``base`` whose reads pass :func:`check_result_record`, so no
    read path of Prefect's (cache lookup, ``exists``, result retrieval) can decode a record that
    names another serializer; a torn record is moved aside (see :func:`_set_aside`) and read as
    missing. Local writes are atomic (see :func:`_write_whole`)."""

    class JsonOnly(base):  # type: ignore[misc, valid-type]
        _block_type_name = f"Refinery JSON Results ({base._block_type_name})"

        def _where(self, path: str) -> str:
            return str(self._resolve_path(path))

        def _checked(self, content: bytes, path: str) -> bytes:
            try:
                return check_result_record(content, self._where(path))
            except TornResultRecord as e:
                _set_aside(self, e)
                raise

        async def aread_path(self, path: str) -> bytes:
            return self._checked(await super().aread_path(path), path)

        def read_path(self, path: str, _sync: bool | None = None) -> Any:
            if _sync is False:
                return self.aread_path(path)
            return self._checked(base.read_path(self, path, _sync=True), path)

        # Local records are written whole or not at all (Prefect writes the file in place);
        # object stores already make an object visible only once it is fully written.
        async def awrite_path(self, path: str, content: bytes) -> str:
            if not local:
                return await super().awrite_path(path, content)
            return _write_whole(self._resolve_path(path), content)

        def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> Any:
            if _sync is False:
                return self.awrite_path(path, content)
            if not local:
                return base.write_path(self, path, content, _sync=True)
            return _write_whole(self._resolve_path(path), content)

    local = base.__name__ == "LocalFileSystem"
    JsonOnly.__name__ = JsonOnly.__qualname__ = f"JsonOnly{base.__name__}"
    return JsonOnly


def _write_whole(path: Any, content: bytes) -> str:
    """Write a local record through a hidden temporary file beside it, synced, then renamed over
    it: a reader sees the old record or the new one, never part of one. A failed write (a full
    disk) removes its temporary file and raises; a crash can leave one (``.<record>.tmp-<id>``,
    never read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_file():
        raise ValueError(f"Path {path} already exists and is not a file.")
    tmp = path.with_name(f".{path.name}.tmp-{os.urandom(3).hex()}")
    try:
        with open(tmp, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return str(path)


def _set_aside(block: Any, torn: TornResultRecord) -> str | None:
    """Move a torn record to ``.quarantine-<record>-<UTC time>-<id>`` beside it (the naming of
    ``Store.quarantine``; a dot name is never a record key), kept for inspection, and log one
    warning naming both; the destination, or None when it could not be moved (gone already:
    another reader moved it; or a store that refuses the move: the task's write replaces it)."""
    src = torn.where
    head, _, name = src.rpartition("/")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = f"{head}/.quarantine-{name}-{stamp}-{os.urandom(2).hex()}"
    try:
        if "://" in src and not src.startswith("file://"):
            fs = block.filesystem
            fs.mv(src, dest)
            fs.invalidate_cache(src)
        else:
            os.rename(src.removeprefix("file://"), dest.removeprefix("file://"))
    except FileNotFoundError:
        return None
    except OSError as e:
        _warn("%s; could not move it aside (%s): the task rebuilds it and overwrites this one",
              torn, error_text(e, 200))
        return None
    _warn("%s; moved aside to %s (kept for inspection); the task runs again and writes a new one", torn, dest)
    return dest


_BLOCK_CLASSES: dict[str, type] = {}


def _block_class(kind: str) -> type:
    """The JSON-only block class for ``local`` or ``remote`` storage (defined once per process:
    Prefect registers block types by class)."""
    if kind not in _BLOCK_CLASSES:
        from prefect.filesystems import LocalFileSystem, RemoteFileSystem

        cls = _json_only(LocalFileSystem if kind == "local" else RemoteFileSystem)
        globals()[cls.__name__] = cls   # importable by name (pickled to Dask workers)
        cls.__module__ = __name__
        _BLOCK_CLASSES[kind] = cls
    return _BLOCK_CLASSES[kind]


def __getattr__(name: str) -> Any:
    """``JsonOnlyLocalFileSystem`` / ``JsonOnlyRemoteFileSystem`` on demand (unpickling in a
    process that has not built them yet), without importing Prefect when this module loads."""
    kinds = {"JsonOnlyLocalFileSystem": "local", "JsonOnlyRemoteFileSystem": "remote"}
    if name in kinds:
        return _block_class(kinds[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass(frozen=True)
class RecordIdentity:
    """What a stage's result record must name: its own dataset (path, stage, fingerprint).

    Why: a record is plain JSON, so anyone who can write the result store could also plant a
    well-formed one whose manifest names another dataset (another fingerprint, a folder outside
    the workdir); Prefect would hand it back as the stage's output."""
    path: str
    stage: str
    fingerprint: str

    def mismatch(self, manifest: Any) -> str | None:
        """Why ``manifest`` (a record's payload) is not this stage's result; None when it is."""
        if not isinstance(manifest, dict):
            return f"is a {type(manifest).__name__}, not a manifest"
        for field, want in (("path", self.path), ("stage", self.stage), ("fingerprint", self.fingerprint)):
            have = manifest.get(field)
            if have != want:
                return f"names {field} {str(have)[:200]!r}, not {want!r}"
        return None


def check_stored_result(storage: Any, key: str, expect: RecordIdentity | None = None) -> None:
    """Raise :class:`UnsafeResultRecord` (naming the file) when the record Prefect would read for
    ``key`` exists and is not JSON; a missing record is fine (the task will write one), and so is a
    torn one: the read moves it aside (:class:`TornResultRecord`) and the task writes a new one.
    With ``expect``, a plain JSON record whose manifest is not that stage's own dataset is moved
    aside the same way (logged), so the task rebuilds the record from the dataset."""
    try:
        content = storage.read_path(key, _sync=True)
    except UnsafeResultRecord:
        raise
    except Exception:  # noqa: BLE001 - no record yet (LocalFileSystem says ValueError, fsspec OSError)
        return
    if expect is None:
        return
    payload = json.loads(content).get("result")
    wrong = expect.mismatch(json.loads(payload) if isinstance(payload, str) else payload)
    if wrong:
        where = str(storage._resolve_path(key))
        _set_aside(storage, TornResultRecord(where, f"result record {wrong}"))


def result_storage_location(store: Store) -> str:
    """Where Prefect results go: ``REFINERY_RESULT_STORAGE`` (a path or URL, e.g. a bucket that
    only the workers can write), else ``<root>/.prefect-results``."""
    return os.environ.get("REFINERY_RESULT_STORAGE") or f"{store.root.rstrip('/')}/.prefect-results"


def result_storage(store: Store):
    """Prefect results (the manifests) live beside the data, in ``<root>/.prefect-results``, so
    every worker that shares the storage root shares the cache, whatever its Prefect database.
    ``REFINERY_RESULT_STORAGE`` (a path or URL) overrides the location. Records are read only as
    JSON (see :func:`check_result_record`)."""
    from prefect.settings import get_current_settings

    where = result_storage_location(store)
    # Prefect wants result storage saved server-side; the name is derived from the location. One
    # save per server, database and location in this process (each save is an API round trip).
    settings = get_current_settings()
    db = settings.server.database.connection_url
    key = (settings.api.url, getattr(db, "get_secret_value", lambda: db)(), where)
    if key not in _SAVED_BLOCKS:
        if "://" in where and not where.startswith("file://"):
            block = _block_class("remote")(basepath=where)
        else:
            block = _block_class("local")(basepath=where.removeprefix("file://"))
        block.save("refinery-results-" + fingerprint("results", "", {"where": where}, []), overwrite=True)
        _SAVED_BLOCKS[key] = block
    return _SAVED_BLOCKS[key]


_SAVED_BLOCKS: dict[tuple, Any] = {}


def _prefect_stage_task():
    if "stage" not in _TASKS:
        from prefect import task

        _TASKS["stage"] = task(_run_stage_task, name="stage", cache_key_fn=_stage_key,
                               persist_result=True, result_serializer="json")
    return _TASKS["stage"]


def _prefect_fanout_task():
    """The one Prefect task of a stage's shards, run in the flow process: not cached (shard records
    are what a rerun resumes from), no result kept, no task retry (the engine retries each shard)."""
    if "fanout" not in _TASKS:
        from prefect import task
        from prefect.cache_policies import NO_CACHE

        _TASKS["fanout"] = task(_run_fanout_task, name="shards", cache_policy=NO_CACHE, persist_result=False)
    return _TASKS["fanout"]


def _prefect_shard_task():
    """Shard tasks are not cached by Prefect: each shard's completion is recorded in the dataset's
    staging folder (see ``Builder.record_shard``), which is what a rerun resumes from."""
    if "shard" not in _TASKS:
        from prefect import task
        from prefect.cache_policies import NO_CACHE

        _TASKS["shard"] = task(_run_shard_task, name="shards", cache_policy=NO_CACHE, persist_result=False,
                               retries=1)
    return _TASKS["shard"]


def make_runner(spec: str | None):
    """A task runner from a config string: ``threads[:N]``, ``processes[:N]``, ``dask[:N]`` (a
    local cluster), ``dask://HOST:PORT`` / ``tcp://HOST:PORT`` (an existing one), ``ray[:N]`` (a
    local Ray cluster of N CPUs) or ``ray://HOST:PORT`` (an existing one, through the Ray client).
    A sharded stage runs its shards on the runner's engine (see :func:`shard_engine`).

    The clusters started here listen on 127.0.0.1 only (Dask's scheduler, workers, nannies and
    dashboard, on http://127.0.0.1:8787 or the next free port; Ray: :class:`RayRunner`). A cluster
    spanning machines is started by its user, bound to the address the machines share (e.g.
    ``dask scheduler --host ADDR``, ``ray start --head --node-ip-address=ADDR``), and named here by
    that address."""
    spec = (spec or "threads").strip()
    kind, _, arg = spec.partition(":")
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner
        return ThreadPoolTaskRunner(max_workers=int(arg) if arg else None)
    if kind == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner
        return ProcessPoolTaskRunner(max_workers=int(arg) if arg else None)
    if kind in ("dask", "tcp"):
        from prefect_dask import DaskTaskRunner
        if kind == "tcp":
            return DaskTaskRunner(address=spec)
        if arg.startswith("//"):
            return DaskTaskRunner(address="tcp:" + arg)
        # host: the scheduler, workers and nannies; the dashboard has its own address (':8787' by
        # default, which binds every interface)
        return DaskTaskRunner(cluster_kwargs={"n_workers": int(arg) if arg else 2, "processes": True,
                                              "threads_per_worker": 1, "host": "127.0.0.1",
                                              "dashboard_address": "127.0.0.1:8787"})
    if kind == "ray":
        if arg.startswith("//"):
            return RayRunner(address=spec)
        return RayRunner(num_cpus=int(arg) if arg else None)
    raise ValueError(f"unknown task runner {spec!r}: use threads[:N], processes[:N], dask[:N], tcp://host:port, "
                     "ray[:N] or ray://host:port")


__all__ = ["stage", "Stage", "ShardedStage", "StageOutput", "ShardsFailed", "RayRunner", "shard_engine", "UnsafeResultRecord", "TornResultRecord", "sum_counts", "file_identity", "make_runner",
           "config_dict", "resolve", "check_result_record"]
