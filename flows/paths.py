"""Local paths of a flow's parameters, checked before anything starts.

A run whose input does not exist should fail in a second with the parameter's name, not after a
Prefect server started, torch loaded and a stage planned its shards. Each flow's parameter model
names its path fields (``FlowParams.path_fields``: dotted name -> kind); the CLI checks them on
the raw parameters before it imports the flow (:func:`preflight`, standard library only), and the
model checks them again when validated with ``context={"check_paths": True}``.

Only what is local is checked: URLs (``s3://``, ``https://``, ``hf://`` ...) are left to the
stage, and a model may be a hub id (``org/name``, ``gpt2``), which is not a path. A model value is
taken for a path when it starts with ``/``, ``.`` or ``~``, has more than one ``/``, or its first
folder exists here.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Any

# kinds: "glob" (curate's crawl files: paths, globs, comma-separated), "datasets" (dataset folders,
# comma-separated), "file" (training data: one file or a dataset folder), "model" (a model folder, refinery dataset or hub id),
# "models" (comma-separated models), "tasks" (lm-eval task names or task YAML files)
PATH_FIELDS: dict[str, dict[str, str]] = {
    "curate": {"input": "glob"},
    "tokenize": {"input": "datasets", "tokenizer.path": "model"},
    "pretrain": {"input": "datasets", "init_from": "model"},
    "finetune": {"input": "model", "data": "file", "tokenizer": "model"},
    "align": {"input": "model", "data": "file", "reward_model": "model"},
    "evaluate": {"input": "models", "data": "datasets", "tasks": "tasks", "baseline": "model", "judge": "model"},
    "pipeline": {"input": "glob", "data": "file", "preferences": "file"},
    "ablate": {"input": "glob"},
    "synth": {"input": "datasets"},   # a local model is checked by the flow (with base_url it is a served name)
    "demo": {},
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class PathProblem(ValueError):
    """A local path parameter that does not exist or cannot be read; ``param`` is its dotted name."""

    def __init__(self, param: str, message: str, hint: str = ""):
        self.param, self.message, self.hint = param, message, hint
        super().__init__(f"{param}: {message}" + (f"; {hint}" if hint else ""))


def is_remote(value: str) -> bool:
    return "://" in value


def looks_local(value: str) -> bool:
    """Whether a model reference is meant as a local path rather than a hub id."""
    if value.startswith(("/", ".", "~")) or value.count("/") > 1 or os.sep != "/" and os.sep in value:
        return True
    if not _HUB_ID.match(value):
        return True
    head = value.split("/", 1)[0]
    return "/" in value and os.path.isdir(head)


def _expand(value: str) -> str:
    return os.path.expanduser(value)


def _readable(param: str, path: str, what: str) -> None:
    if not os.access(path, os.R_OK):
        raise PathProblem(param, f"{what} {path} is not readable (permission denied)",
                          "check the file's permissions")


def check_glob(param: str, value: str) -> None:
    """Crawl files: each comma-separated local path must be a readable file, each glob must match one."""
    for part in (s.strip() for s in value.split(",")):
        if not part or is_remote(part):
            continue
        path = _expand(part)
        if glob.has_magic(path):
            found = [p for p in glob.glob(path, recursive=True) if not os.path.isdir(p)]
            if not found:
                raise PathProblem(param, f"the glob {part} matches no file",
                                  "check the folder and the pattern (quote it in the shell: --set 'input=DIR/*.warc.gz')")
            continue
        if os.path.isdir(path):
            raise PathProblem(param, f"{part} is a folder, not a file",
                              f"name its files: --set 'input={part.rstrip('/')}/*'")
        if not os.path.exists(path):
            raise PathProblem(param, f"no such file: {part}", "check the path (relative paths start at the current folder)")
        _readable(param, path, "file")


def check_file(param: str, value: str) -> None:
    """Training data: a local file or a dataset folder (what :mod:`refinery.tasks.records` reads) must
    exist and be readable; what a folder holds is the stage's to check."""
    if not value or is_remote(value) or value.startswith("<"):   # <...>: the pipeline's placeholders
        return
    path = _expand(value)
    if not os.path.exists(path):
        raise PathProblem(param, f"no such file: {value}", "check the path (relative paths start at the current folder)")
    _readable(param, path, "file")


def check_dataset(param: str, value: str) -> None:
    """Dataset folders (comma-separated): each local one must exist."""
    for part in (s.strip() for s in value.split(",")):
        if not part or is_remote(part) or part.startswith("<"):
            continue
        path = _expand(part)
        if not os.path.exists(path):
            raise PathProblem(param, f"no such dataset: {part}",
                              "give a dataset folder WORKDIR/STAGE/FINGERPRINT (refinery inspect WORKDIR lists them)")
        _readable(param, path, "dataset")


def check_model(param: str, value: str) -> None:
    """A model: a local path (see :func:`looks_local`) must exist; a hub id is not checked here."""
    for part in (s.strip() for s in value.split(",")):
        if not part or is_remote(part) or part.startswith("<"):
            continue
        path = _expand(part)
        if os.path.exists(path):
            _readable(param, path, "model folder")
            if os.path.isdir(path) and not (os.path.isfile(os.path.join(path, "config.json"))
                                            or os.path.isfile(os.path.join(path, "manifest.json"))
                                            or os.path.isfile(os.path.join(path, "tokenizer.json"))
                                            or os.path.isfile(os.path.join(path, "tokenizer_config.json"))
                                            or os.path.isfile(os.path.join(path, "adapter_config.json"))):
                raise PathProblem(param, f"{part} holds no model (no config.json, and no manifest.json of a refinery dataset)",
                                  "give a Hugging Face model folder, a refinery model dataset or a hub id")
            if "tokenizer" not in param:   # a tokenizer may come from a tokenizer dataset
                _check_model_dataset(param, part, path)
            continue
        if looks_local(part):
            raise PathProblem(param, f"no such model folder: {part}",
                              "give a Hugging Face model folder, a refinery model dataset (e.g. WORKDIR/pretrain/FINGERPRINT) "
                              "or a hub id such as org/name")


def _check_model_dataset(param: str, part: str, path: str) -> None:
    """A refinery dataset given as a model must hold one: its manifest's ``model`` key (every
    training dataset writes it; ``merged`` in older ones), or a config.json where older datasets
    kept it (refinery.tasks.modelref resolves and checks it when the stage opens it)."""
    import json

    try:
        with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return   # not a dataset, or a damaged one: the stage says which
    if not isinstance(manifest, dict):
        return
    if any(manifest.get(k) for k in ("model", "merged")) or any(
            os.path.isfile(os.path.join(path, sub, "config.json")) for sub in (".", "model", "merged")):
        return
    stage = manifest.get("stage", "?")
    if manifest.get("adapter"):
        raise PathProblem(param, f"{part} (a {stage} dataset, method {manifest.get('method')}) holds only a PEFT "
                                 "adapter, no complete model",
                          "that method cannot be merged into its base; fine-tune with lora, qlora, ia3 or full, or "
                          "load the adapter with peft")
    raise PathProblem(param, f"{part} is a {stage} dataset, not a model",
                      "give a training dataset (WORKDIR/pretrain/FINGERPRINT, finetune, dpo ...), a Hugging Face "
                      "model folder or a hub id")


def check_tasks(param: str, value: Any) -> None:
    """lm-eval tasks: entries that name a YAML file must exist (names of registered tasks are not paths)."""
    items = [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value or [])
    for item in items:
        if not isinstance(item, str) or not item or is_remote(item):
            continue
        if item.endswith((".yaml", ".yml")) or "/" in item:
            if not os.path.exists(_expand(item)):
                raise PathProblem(param, f"no such task file: {item}",
                                  "give a task YAML file in lm-eval's format (e.g. configs/eval/gsm8k_local.yaml) or a task name")


CHECKS = {"glob": check_glob, "file": check_file, "datasets": check_dataset, "model": check_model,
          "models": check_model, "tasks": check_tasks}


def _get(data: Any, dotted: str) -> Any:
    node = data
    for key in dotted.split("."):
        if isinstance(node, dict):
            node = node.get(key)
        else:
            node = getattr(node, key, None)
        if node is None:
            return None
    return node


def check_fields(fields: dict[str, str], data: Any) -> None:
    """Check each path field of ``data`` (a dict of raw parameters or a model); PathProblem on the first bad one."""
    for dotted, kind in fields.items():
        value = _get(data, dotted)
        if kind == "tasks" and isinstance(value, (list, tuple)):
            CHECKS[kind](dotted, value)
        elif isinstance(value, str) and value:
            CHECKS[kind](dotted, value)


def preflight(flow: str, data: dict) -> None:
    """The CLI's check of a flow's raw parameters before it imports the flow (standard library only)."""
    check_fields(PATH_FIELDS.get(flow, {}), data)
    if flow == "curate":   # tagged inputs: ingest.inputs=[{path: ..., source: ...}]
        for i, spec in enumerate(_get(data, "ingest.inputs") or []):
            if isinstance(spec, dict) and isinstance(spec.get("path"), str):
                check_glob(f"ingest.inputs[{i}].path", spec["path"])
    if flow in ("pipeline", "demo"):   # sections typed by the flows' own models
        for section in ("pretrain", "finetune", "tokenize", "align", "evaluate"):
            sub = data.get(section)
            if isinstance(sub, dict):
                own = {k: v for k, v in PATH_FIELDS[section].items() if k not in ("input", "data")}
                try:
                    check_fields(own, sub)
                except PathProblem as e:
                    raise PathProblem(f"{section}.{e.param}", e.message, e.hint) from None


__all__ = ["PATH_FIELDS", "PathProblem", "check_fields", "preflight", "looks_local"]
