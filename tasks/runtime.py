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

Set ``REFINERY_EXEC_LOG=/path`` to get one line per real execution (``stage fp [shard]``): the
tests count executions with it.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import time
from typing import Any, Callable, Sequence

from pydantic import BaseModel

from refinery.tasks.store import Builder, Dataset, Store, fingerprint


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

    def _reduce(self, b: Builder, results: list[dict], inputs: list[Dataset], cfg: Any) -> StageOutput:
        _log_exec(f"{self.name} {b.fingerprint}")
        reduce = getattr(self.obj, "reduce", None)
        if reduce is None:
            return StageOutput(counts=sum_counts(results))
        return reduce(b, results, cfg, inputs)

    def _publish(self, b: Builder, inputs: list[Dataset], cfg: Any, out: StageOutput, seconds: float) -> Dataset:
        stats = dict(out.stats)
        if self.sharded:  # work seconds: every shard's time plus the reduce step's
            stats.setdefault("shard_seconds", round(b.shard_seconds(), 3))
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
            return found
        t0 = time.perf_counter()
        b = store.builder(self.name, fp)
        if self.sharded:
            items = self.obj.plan(inputs, cfg)
            _check_items(self.name, items)
            mapper = map_fn or (lambda f, xs: [f(x) for x in xs])
            results = list(mapper(lambda it: self._shard(b, it, cfg), items))
            out = self._reduce(b, results, inputs, cfg)
        else:
            out = self._body(b, inputs, cfg)
        return self._publish(b, inputs, cfg, out, time.perf_counter() - t0)

    # -- Prefect
    def call(self, root: str, inputs: Sequence[Dataset | str] = (), cfg: Any = None, runner: Any = None) -> Dataset:
        """From a flow: Prefect tasks (shards through ``runner`` when given), cached by fingerprint."""
        store = Store(root)
        inputs = _open_inputs(inputs)
        fp = self.fingerprint(inputs, cfg)
        exists = store.get(self.name, fp) is not None
        input_paths = [d.path for d in inputs]
        if self.sharded and not exists:
            items = self.obj.plan(inputs, cfg)
            _check_items(self.name, items)
            b = store.builder(self.name, fp)
            results: list = [b.shard_result(it["name"]) for it in items]   # finished shards need no task
            todo = [i for i, r in enumerate(results) if r is None]
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
            for group, fut in futures:
                for i, r in zip(group, fut.result()):
                    results[i] = r
        else:
            results = None
        task = _prefect_stage_task().with_options(name=self.name, task_run_name=f"{self.name}:{fp}",
                                                  refresh_cache=not exists, result_storage=result_storage(store))
        manifest = task(stage_ref=self.ref, root=store.root, fp=fp, input_paths=input_paths, cfg=cfg,
                        shard_results=results)
        return Dataset.open(manifest["path"])

    def __call__(self, *args, **kwargs):
        return self.obj(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<stage {self.name} v{self.version}{' sharded' if self.sharded else ''}>"


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
    """Run a group of shards; one that fails does not stop the others (they are recorded as done),
    and the first failure is raised once all were tried."""
    st = resolve(stage_ref)
    b = Store(root).builder(st.name, fp)
    results, failed = [], []
    for item in items:
        try:
            results.append(st._shard(b, item, cfg))
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other shards
            failed.append((item["name"], e))
    if failed:
        err = failed[0][1]
        err.add_note(f"{st.name}: {len(failed)} of {len(items)} shards of this task failed: "
                     + ", ".join(name for name, _ in failed))
        raise err
    return results


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
                    shard_results: list[dict] | None) -> dict:
    st = resolve(stage_ref)
    store = Store(root)
    found = store.get(st.name, fp)
    if found is None:
        inputs = _open_inputs(input_paths)
        t0 = time.perf_counter()
        b = store.builder(st.name, fp)
        if st.sharded:
            if shard_results is None:  # cached stage result vanished: redo shards here
                shard_results = [st._shard(b, it, cfg) for it in st.obj.plan(inputs, cfg)]
            out = st._reduce(b, shard_results, inputs, cfg)
        else:
            out = st._body(b, inputs, cfg)
        found = st._publish(b, inputs, cfg, out, time.perf_counter() - t0)
    return {"path": found.path, **found.manifest}


_TASKS: dict[str, Any] = {}


def result_storage(store: Store):
    """Prefect results (the manifests) live beside the data, in ``<root>/.prefect-results``, so
    every worker that shares the storage root shares the cache, whatever its Prefect database.
    ``REFINERY_RESULT_STORAGE`` (a path or URL) overrides the location."""
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem
    from prefect.settings import get_current_settings

    where = os.environ.get("REFINERY_RESULT_STORAGE") or f"{store.root.rstrip('/')}/.prefect-results"
    # Prefect wants result storage saved server-side; the name is derived from the location. One
    # save per server, database and location in this process (each save is an API round trip).
    settings = get_current_settings()
    db = settings.server.database.connection_url
    key = (settings.api.url, getattr(db, "get_secret_value", lambda: db)(), where)
    if key not in _SAVED_BLOCKS:
        if "://" in where and not where.startswith("file://"):
            block = RemoteFileSystem(basepath=where)
        else:
            block = LocalFileSystem(basepath=where.removeprefix("file://"))
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


__all__ = ["stage", "Stage", "StageOutput", "sum_counts", "make_runner", "config_dict", "resolve"]
