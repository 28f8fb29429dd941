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
its unfinished shards are spread over the task runner in ``TASKS_PER_SLOT`` Prefect tasks per
runner slot (see :func:`shard_groups`). Either way a dataset whose manifest exists is returned
without any work, and a sharded stage that crashed resumes from its finished shards.

Failures: a shard that raises is never recorded as finished (the next run redoes it); the other
shards still run, and the stage fails at the end with :class:`ShardsFailed` naming every failed
shard and its error, unless the stage tolerates some (``max_failed_shards`` on the config, default 0,
or the stage's own ``max_failed(cfg)``); tolerated failures are listed in the manifest under
``stats.failed_shards``. Prefect results are read only as JSON (see :func:`check_result_record`).

Set ``REFINERY_EXEC_LOG=/path`` to get one line per real execution (``stage fp [shard]``): the
tests count executions with it.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Sequence

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
        found = store.get(self.name, fp)
        if found is not None:
            return _mark(found, cached=True)
        with store.lock(self.name, fp):   # one writer per fingerprint: the others wait, then reuse its dataset
            found = store.recover(self.name, fp)
            if found is not None:
                return _mark(found, cached=True)
            return _mark(self._build(store, fp, inputs, cfg, map_fn), cached=False)

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
    def call(self, root: str, inputs: Sequence[Dataset | str] = (), cfg: Any = None, runner: Any = None) -> Dataset:
        """From a flow: Prefect tasks (shards through ``runner`` when given), cached by fingerprint."""
        store = Store(root)
        inputs = _open_inputs(inputs)
        fp = self.fingerprint(inputs, cfg)
        # One writer per fingerprint: the others wait, then reuse its dataset. Taken even when the
        # dataset exists: the writer publishes before Prefect writes its result record, which a
        # reader must not see half-written.
        with store.lock(self.name, fp):
            return self._call(store, inputs, fp, cfg, runner, exists=store.recover(self.name, fp) is not None)

    def _call(self, store: Store, inputs: list[Dataset], fp: str, cfg: Any, runner: Any, exists: bool) -> Dataset:
        input_paths = [d.path for d in inputs]
        failed: list[dict] = []
        if self.sharded and not exists:
            items = self.obj.plan(inputs, cfg)
            _check_items(self.name, items)
            b = store.builder(self.name, fp)
            results: list | None = [b.shard_result(it["name"]) for it in items]   # finished shards need no task
            todo = [i for i, r in enumerate(results or []) if r is None]
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
            for group, fut in futures:   # every group is waited for before any failure is raised
                for i, r in zip(group, _group_outcomes(b, [items[i] for i in group], fut)):
                    results[i] = r   # type: ignore[index]
            results, failed = self._settle(items, results or [], cfg)
        else:
            results = None
        storage = result_storage(store)
        key = _stage_key(None, {"stage_ref": self.ref, "fp": fp, "root": store.root})
        check_stored_result(storage, key)   # a planted record is refused here, with its file named
        task = _prefect_stage_task().with_options(name=self.name, task_run_name=f"{self.name}:{fp}",
                                                  refresh_cache=not exists, result_storage=storage)
        manifest = task(stage_ref=self.ref, root=store.root, fp=fp, input_paths=input_paths, cfg=cfg,
                        shard_results=results, failed_shards=failed)
        return _mark(Dataset.open(manifest["path"]), cached=exists)

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
    ds.cached = cached
    return ds


def _check_items(name: str, items: list[dict]) -> None:
    names = [it["name"] for it in items]
    if len(set(names)) != len(names):
        raise ValueError(f"stage {name}: shard names are not unique")


def stage(name: str, version: str = "1", sharded: bool = False) -> Callable[[Any], Stage]:
    def wrap(obj: Any) -> Stage:
        if sharded:
            for attr in ("plan", "shard"):
                if not callable(getattr(obj, attr, None)):
                    raise TypeError(f"sharded stage {name} needs a static {attr}()")
        return Stage(name, version, obj, sharded)
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


_SAFE_DECODERS = (None, "prefect.serializers.prefect_json_object_decoder")


def check_result_record(content: bytes, where: str) -> bytes:
    """``content`` unchanged if it is a plain JSON result record; otherwise
    :class:`UnsafeResultRecord` naming ``where``.

    Why: Prefect decodes a record with whatever the record itself names: a serializer (pickle), a
    ``jsonlib`` or ``object_decoder`` to import, or ``__class__``/``__exc_type__`` objects in the
    payload that its JSON decoder imports and builds. Anyone who can write the result store (a
    shared volume, a bucket) could make every worker run their code. Our stage results are JSON
    manifests (``result_serializer="json"``), so only that is read: serializer ``json`` with the
    standard ``json`` module, Prefect's default decoder (or none), no loader options, and a payload
    of plain JSON values. The check parses with the standard library only, before Prefect does."""
    def refuse(why: str) -> UnsafeResultRecord:
        return UnsafeResultRecord(f"{where}: {why}; refusing to decode this result record "
                                  "(only plain JSON records are read; delete the file to rebuild it)")

    try:
        record = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        raise refuse("not JSON") from None
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
    names another serializer."""

    class JsonOnly(base):  # type: ignore[misc, valid-type]
        _block_type_name = f"Refinery JSON Results ({base._block_type_name})"

        def _where(self, path: str) -> str:
            return str(self._resolve_path(path))

        async def aread_path(self, path: str) -> bytes:
            return check_result_record(await super().aread_path(path), self._where(path))

        def read_path(self, path: str, _sync: bool | None = None) -> Any:
            if _sync is False:
                return self.aread_path(path)
            return check_result_record(base.read_path(self, path, _sync=True), self._where(path))

    JsonOnly.__name__ = JsonOnly.__qualname__ = f"JsonOnly{base.__name__}"
    return JsonOnly


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


def check_stored_result(storage: Any, key: str) -> None:
    """Raise :class:`UnsafeResultRecord` (naming the file) when the record Prefect would read for
    ``key`` exists and is not JSON; a missing record is fine (the task will write one)."""
    try:
        storage.read_path(key, _sync=True)
    except UnsafeResultRecord:
        raise
    except Exception:  # noqa: BLE001 - no record yet (LocalFileSystem says ValueError, fsspec OSError)
        return


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
    """A Prefect task runner from a config string: ``threads[:N]``, ``processes[:N]``,
    ``dask`` (a local cluster) or ``dask://HOST:PORT`` / ``tcp://HOST:PORT`` (an existing one)."""
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
        return DaskTaskRunner(cluster_kwargs={"n_workers": int(arg) if arg else 2, "processes": True,
                                              "threads_per_worker": 1})
    raise ValueError(f"unknown task runner {spec!r}: use threads[:N], processes[:N], dask[:N] or tcp://host:port")


__all__ = ["stage", "Stage", "StageOutput", "ShardsFailed", "UnsafeResultRecord", "sum_counts", "file_identity", "make_runner",
           "config_dict", "resolve", "check_result_record"]
