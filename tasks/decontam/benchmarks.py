"""The texts of the benchmarks to keep out of the training data.

A source is a data file (``.jsonl``, ``.jsonl.gz`` or ``.json``: a list of objects) whose
``fields`` are read (default: every string field, and strings inside lists, such as answer
choices), a task YAML file in lm-eval's format (see refinery.tasks.eval.harness), or the name of
a task lm-eval knows. For an lm-eval task every document of its test split (else validation
split) gives its prompt (``doc_to_text``), its target and its answer choices. Each text is matched
on its own: n-grams never span two fields.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")


def source_name(source: str) -> str:
    """The benchmark's name: a file's stem (``gsm8k-test``), a task file's task, or the task name."""
    from refinery.tasks.eval.harness import is_task_file, load_task_file

    if source.endswith(FILE_SUFFIXES):
        name = Path(source).name
        for suf in FILE_SUFFIXES:
            if name.endswith(suf):
                return name[: -len(suf)]
    if is_task_file(source):
        return load_task_file(source).name
    return source


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _records(path: str) -> Iterator[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if path.endswith((".json", ".json.gz")):
                data = json.load(f)
                yield from (data if isinstance(data, list) else [data])
                return
            for k, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}: line {k} is not JSON: {e}") from e
    except OSError as e:
        raise ValueError(f"benchmark file {path}: {e.strerror or e}") from e


def file_texts(path: str, fields: list[str]) -> list[str]:
    out: list[str] = []
    for rec in _records(path):
        if not isinstance(rec, dict):
            continue
        keys = fields or list(rec)
        for k in keys:
            out.extend(s for s in _strings(rec.get(k)) if s.strip())
    return out


def _leaf_tasks(d: Any) -> Iterator[Any]:
    if isinstance(d, dict):
        for v in d.values():
            yield from _leaf_tasks(v)
    elif d is not None:
        yield d


def task_texts(source: str) -> list[str]:
    """Prompts, targets and choices of an lm-eval task (a registered name or a task YAML)."""
    from lm_eval.tasks import TaskManager

    from refinery.tasks.eval.harness import is_task_file, load_task_file

    local = is_task_file(source)
    spec: Any = load_task_file(source).config if local else source
    # a local task needs no scan of lm-eval's task registry (thousands of YAML files, ~20 s)
    out: list[str] = []
    for task in _leaf_tasks(TaskManager(include_defaults=not local).load([spec])["tasks"]):
        docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
        for doc in docs or []:
            out.extend(s for s in _strings(task.doc_to_text(doc)) if s.strip())
            target = task.doc_to_target(doc)
            choices = task.doc_to_choice(doc) if task.OUTPUT_TYPE == "multiple_choice" else None
            if isinstance(target, int) and choices:
                target = choices[target] if 0 <= target < len(choices) else None
            out.extend(s for s in _strings(target) if s.strip())
            out.extend(s for s in _strings(choices) if s.strip())
    return out


def benchmark_texts(source: str, fields: list[str]) -> list[str]:
    if source.endswith(FILE_SUFFIXES):
        if not os.path.isfile(source):
            raise ValueError(f"decontaminate.sources: {source}: no such file")
        return file_texts(source, fields)
    return task_texts(source)


def texts_digest(named_texts: list[tuple[str, list[str]]]) -> str:
    """SHA-256 over every benchmark's name and texts: the index's identity."""
    h = hashlib.sha256()
    for name, texts in named_texts:
        h.update(f"{name}\0{len(texts)}\0".encode())
        for t in texts:
            h.update(t.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
    return h.hexdigest()


__all__ = ["benchmark_texts", "source_name", "texts_digest", "file_texts", "task_texts"]
