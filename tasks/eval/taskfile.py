"""Task files for the ``lm_eval`` command line: a copy of a local task YAML that runs from any folder.

lm-eval 0.4 resolves nothing in a task file against the file's own folder except ``include`` and
``!function`` (both refused here: a task file holds data and templates, never code); the
``dataset_kwargs.data_files`` it hands to ``datasets.load_dataset`` are read from the working
directory. So ``configs/eval/mc_local.yaml`` (``data_files: mc_local.jsonl``) works under
``lm_eval --tasks FILE`` only when run from ``configs/eval/``. Refinery's own loader
(:func:`refinery.tasks.eval.harness.load_task_file`) reads those paths from the YAML's folder; this
module writes what it loaded (checked for code, data paths resolved and absolute, ``data_files``
overrides applied) as a task YAML of its own, which ``lm_eval --tasks`` runs from any folder:

    python -m refinery.tasks.eval.taskfile configs/eval/mc_local.yaml --out /tmp/tasks
    lm_eval --model hf --model_args pretrained=MODEL --tasks /tmp/tasks/mc_local.yaml

The copy names its data by absolute path: it is for this machine (write it again after moving the
data); the shipped file stays the portable original.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from refinery.tasks.eval.harness import load_task_file


def write_task_file(path: str | Path, out_dir: str | Path, data_files: dict[str, str] | None = None) -> Path:
    """Write ``out_dir/<task>.yaml``: the task file at ``path`` with every data path absolute."""
    import yaml

    spec = load_task_file(str(path), data_files)
    if spec.config is None:   # pragma: no cover (load_task_file always returns a config)
        raise ValueError(f"task file {path}: nothing loaded")
    out = Path(out_dir).expanduser() / f"{spec.name}.yaml"
    if out.resolve() == Path(path).expanduser().resolve():
        raise ValueError(f"task file {path}: the copy would replace the original; give another --out folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Written by refinery from {Path(path).expanduser().resolve()}: its data paths made absolute,\n"
              "# so `lm_eval --tasks THIS_FILE` runs from any folder on this machine.\n")
    out.write_text(header + yaml.safe_dump(spec.config, sort_keys=False, allow_unicode=True, width=1000))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m refinery.tasks.eval.taskfile",
                                 description="Write local lm-eval task files with absolute data paths, for the lm_eval CLI.")
    ap.add_argument("tasks", nargs="+", help="task YAML files (lm-eval's format, as the evaluate flow takes them)")
    ap.add_argument("--out", required=True, help="folder the copies are written to (as <task>.yaml)")
    ap.add_argument("--data-files", action="append", default=[], metavar="TASK=PATH",
                    help="the data file of TASK (replaces the task file's own), as evaluate's data_files.TASK")
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.data_files:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            ap.error(f"--data-files takes TASK=PATH, got {item!r}")
        overrides[name] = value
    try:
        written = [write_task_file(t, args.out, overrides) for t in args.tasks]
    except ValueError as e:
        print(f"refinery taskfile: {e}", file=sys.stderr)
        return 2
    for w in written:
        print(w)
    print(f"run: lm_eval --model hf --model_args pretrained=MODEL --tasks {','.join(str(w) for w in written)}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":   # pragma: no cover
    sys.exit(main())
