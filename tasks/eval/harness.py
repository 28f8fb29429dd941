"""Benchmarks through lm-evaluation-harness (``lm-eval``): its Python API, its ``HFLM`` model and
its metrics; nothing here re-implements a metric.

A task is either a name lm-eval knows (its registry; data from the hub unless cached) or the path
of a task YAML file in lm-eval's own format. A YAML task with ``dataset_path: json`` reads local
files through ``dataset_kwargs.data_files``: relative paths there are resolved against the YAML
file's folder, and ``data_files`` (task name -> path) overrides them, so the tasks shipped in
``configs/eval/`` run offline on any copy of their data. The loaded YAML (with resolved paths) and
the SHA-256 of its data files make the task's identity, which enters the stage fingerprint.
lm-eval's own CLI reads ``data_files`` from its working directory instead (it resolves only
``include`` and ``!function`` against a task file's folder): ``refinery.tasks.eval.taskfile`` writes
a copy with absolute paths for ``lm_eval --tasks``.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

from pydantic import Field

from refinery.tasks.config import StrictModel

YAML_SUFFIXES = (".yaml", ".yml")


class TaskSpec(StrictModel):
    """One benchmark, resolved: its name, where it came from, and its lm-eval config when local."""
    name: str = Field(description="The task name lm-eval reports results under.")
    source: str = Field(description="As given: an lm-eval task name or a YAML path.")
    config: dict[str, Any] | None = Field(None, description="The task YAML as a dict (local tasks), data paths resolved.")
    data_sha256: dict[str, str] = Field(default_factory=dict, description="SHA-256 of each local data file.")


def is_task_file(entry: str) -> bool:
    return entry.endswith(YAML_SUFFIXES) or os.path.isfile(entry)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _resolve_files(value: Any, base: Path, override: str | None) -> Any:
    """``data_files`` as a str, list or {split: str | list}, each path absolute; ``override``
    replaces every path (one data file for the task's splits)."""
    if isinstance(value, dict):
        return {k: _resolve_files(v, base, override) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_files(v, base, override) for v in value]
    if override:
        return str(Path(override).expanduser().resolve())
    p = Path(os.path.expandvars(str(value))).expanduser()
    return str(p if p.is_absolute() or "://" in str(value) else (base / p).resolve())


def _paths(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in _paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in _paths(v)]
    return [value]


def load_task_file(path: str, data_files: dict[str, str] | None = None) -> TaskSpec:
    """Read a task YAML (lm-eval's format, self-contained: no ``include`` or ``!function``)."""
    import yaml

    p = Path(path).expanduser()
    try:
        config = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ValueError(f"task file {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ValueError(f"task file {path}: not YAML lm-eval can read (self-contained, no !function tags): {e}") from e
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise ValueError(f"task file {path}: expected a mapping with a 'task' name (lm-eval's task format)")
    if "include" in config:
        raise ValueError(f"task file {path}: 'include' is not supported; inline the included settings")
    problem = task_code_problem(config)
    if problem:
        raise ValueError(f"task file {path}: {problem}; a task file may hold data and templates, never code")
    name = config["task"]
    override = (data_files or {}).get(name)
    kwargs = dict(config.get("dataset_kwargs") or {})
    sha: dict[str, str] = {}
    if "data_files" in kwargs or override:
        kwargs["data_files"] = _resolve_files(kwargs.get("data_files", {"test": override}), p.resolve().parent, override)
        for f in _paths(kwargs["data_files"]):
            if "://" in f:
                continue
            if not os.path.isfile(f):
                raise ValueError(f"task {name} ({path}): data file {f} not found; give its path with "
                                 f"--set data_files.{name}=PATH")
            sha[f] = _sha256(f)
        config["dataset_kwargs"] = kwargs
    return TaskSpec(name=name, source=str(path), config=config, data_sha256=sha)


# --------------------------------------------------------------------------- nothing in a task file runs
# A task file is data that anyone may hand us (a shared folder, a colleague's benchmark), yet
# lm-eval would run code from it three ways: a Jinja template reaching Python internals
# (``{{ cycler.__init__.__globals__.os.system(...) }}``), a metric name that is not in its
# registry (handed to ``evaluate.load``, which imports a local script of that name), and
# ``!function`` tags (``yaml.safe_load`` already refuses those). Templates are checked here, when
# the file is read, and rendered in jinja2's sandbox at run time (:func:`sandbox_templates`).

def _template_problem(text: str) -> str | None:
    """Why a Jinja template is unsafe (an attribute whose name starts with ``_``, or a string
    starting with ``__`` as an item or ``attr`` name: the ways out of the template's values into
    Python's internals), else None."""
    from jinja2 import nodes
    from jinja2.exceptions import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        tree = ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as e:
        return f"template {text[:80]!r} does not parse: {e.message}"
    for node in tree.find_all((nodes.Getattr, nodes.Const)):   # x.__y, x['__y'], x|attr('__y')
        key: Any
        if isinstance(node, nodes.Getattr):
            key, internal = node.attr, node.attr.startswith("_")
        else:
            key = getattr(node, "value", None)
            internal = isinstance(key, str) and key.startswith("__")
        if internal:
            return f"template {text[:80]!r} reaches the internal attribute {key!r}"
    return None


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def task_code_problem(config: dict) -> str | None:
    """Why a task config would run code (see above), else None."""
    for text in _strings(config):
        if "{{" in text or "{%" in text:
            problem = _template_problem(text)
            if problem:
                return problem
    from lm_eval.api.registry import metric_registry

    if not metric_registry:
        import lm_eval.api.metrics  # noqa: F401  (fills the registry)
    for entry in config.get("metric_list") or []:
        metric = entry.get("metric") if isinstance(entry, dict) else entry
        if isinstance(entry, dict) and entry.get("hf_evaluate"):
            return f"metric {metric!r} asks for hf_evaluate (a metric script is code)"
        if not isinstance(metric, str) or metric not in metric_registry:
            return (f"metric {str(metric)[:80]!r} is not one of lm-eval's registered metrics "
                    "(lm-eval would load it as a script)")
    return None


def sandbox_templates() -> None:
    """Make lm-eval render every task template in jinja2's ``ImmutableSandboxedEnvironment`` (same
    filters and settings as its own environment), so a template that slipped past
    :func:`task_code_problem` raises ``SecurityError`` instead of running code."""
    import lm_eval.utils as lm_utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    current = lm_utils.env
    if isinstance(current, ImmutableSandboxedEnvironment):
        return
    env = ImmutableSandboxedEnvironment(loader=current.loader, undefined=current.undefined,
                                        keep_trailing_newline=current.keep_trailing_newline)
    env.filters.update({k: v for k, v in current.filters.items() if k not in env.filters})
    lm_utils.env = env


def resolve_tasks(entries: list[str], data_files: dict[str, str] | None = None) -> list[TaskSpec]:
    """TaskSpecs of the ``tasks`` parameter: YAML files loaded, registry names kept as names."""
    specs = [load_task_file(e, data_files) if is_task_file(e) else TaskSpec(name=e, source=e)
             for e in (s.strip() for s in entries) if e]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"tasks: a task name appears twice: {names}")
    unknown = set(data_files or {}) - {s.name for s in specs if s.config is not None}
    if unknown:
        raise ValueError(f"data_files names tasks that are not local task files: {sorted(unknown)}")
    return specs


def lm_eval_tasks(specs: list[TaskSpec]) -> list:
    """What ``lm_eval.simple_evaluate(tasks=...)`` takes: config dicts for local tasks, names else."""
    return [dict(s.config) if s.config is not None else s.name for s in specs]


def run_harness(model_path: str, specs: list[TaskSpec], *, limit: int | float | None, num_fewshot: int | None,
                seed: int, batch_size: int, device: str, gen_kwargs: str | None = None,
                max_length: int | None = None, apply_chat_template: bool = False,
                fewshot_as_multiturn: bool = False) -> dict:
    """``lm_eval.simple_evaluate`` on an ``HFLM`` of ``model_path``; its full result dict. With
    ``apply_chat_template`` every request's context goes through the tokenizer's chat template
    (the question as a user turn, the answer as the assistant's), few-shot examples as separate
    turns when ``fewshot_as_multiturn`` (else all in the one user turn)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    sandbox_templates()

    kwargs: dict[str, Any] = {"pretrained": model_path, "batch_size": batch_size, "device": device}
    if max_length:
        kwargs["max_length"] = max_length
    lm = HFLM(**kwargs)
    # only registry names need lm-eval's task index (a scan of thousands of YAML files)
    manager = TaskManager(include_defaults=any(s.config is None for s in specs))
    try:
        return lm_eval.simple_evaluate(
            model=lm, tasks=lm_eval_tasks(specs), task_manager=manager, limit=limit, num_fewshot=num_fewshot, log_samples=True,
            gen_kwargs=gen_kwargs or None, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed, apply_chat_template=apply_chat_template,
            fewshot_as_multiturn=apply_chat_template and fewshot_as_multiturn)
    finally:
        del lm


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None  # lm-eval writes "N/A" for a stderr it did not compute
    return None if math.isnan(f) else f


def result_rows(label: str, out: dict) -> list[dict]:
    """(model, task, metric, value, stderr, n) rows of one ``simple_evaluate`` result; ``metric`` is
    lm-eval's own key (``exact_match,strict-match``: metric, then filter)."""
    rows = []
    n_samples = out.get("n-samples", {})
    for task, res in sorted(out.get("results", {}).items()):
        n = (n_samples.get(task) or {}).get("effective")
        for key, value in res.items():
            if key in ("alias", "name", "sample_len", "samples") or "_stderr" in key:
                continue
            value = _num(value)
            if value is None:
                continue
            metric, _, filt = key.partition(",")
            rows.append({"model": label, "task": task, "metric": key, "value": value,
                         "stderr": _num(res.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")),
                         "n": n})
    return rows


def sample_rows(label: str, out: dict) -> list[dict]:
    """Per-sample records: the prompt, the target, the model's (filtered) answer, its metrics."""
    import json

    rows = []
    for task, samples in sorted((out.get("samples") or {}).items()):
        for s in samples:
            args = s.get("arguments") or [[""]]
            first = args[0] if isinstance(args, (list, tuple)) and args else args
            prompt = first[0] if isinstance(first, (list, tuple)) and first else str(first)
            rows.append({"model": label, "task": task, "doc_id": int(s.get("doc_id", -1)),
                         "filter": str(s.get("filter", "")), "prompt": str(prompt),
                         "target": json.dumps(s.get("target"), default=str, ensure_ascii=False),
                         "response": json.dumps(s.get("filtered_resps"), default=str, ensure_ascii=False),
                         "metrics": json.dumps({m: s.get(m) for m in s.get("metrics", [])}, default=str)})
    return rows


__all__ = ["TaskSpec", "resolve_tasks", "load_task_file", "task_code_problem", "sandbox_templates", "lm_eval_tasks", "run_harness", "result_rows",
           "sample_rows"]
