"""The ``refinery`` command: ``demo``, ``run FLOW``, ``inspect PATH``, ``flows``.

Heavy imports (Prefect, torch, the stages) happen only inside the subcommands, so ``refinery
--help`` answers at once.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any


def _defaults_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    # A loaded machine can take longer than the default 20 s to start the ephemeral server.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def parse_set(items: list[str]) -> dict:
    """``["a.b=1", "c=x,y"]`` -> ``{"a": {"b": 1}, "c": "x,y"}``; values are parsed as YAML scalars."""
    import yaml

    out: dict = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"refinery: --set {item!r}: expected KEY=VALUE (for example input=data/*.warc.gz)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict,)) or value is None and raw not in ("null", "~", "None"):
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SystemExit(f"refinery: --set {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_flow(name: str):
    from refinery.flows.common import FLOWS

    if name not in FLOWS:
        raise SystemExit(f"refinery: unknown flow {name!r}; flows: {', '.join(sorted(FLOWS))}")
    module, attr = FLOWS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def build_params(flow, config_file: str | None, sets: list[str], workdir: str | None):
    import yaml
    from pydantic import ValidationError

    data: dict[str, Any] = {}
    if config_file:
        try:
            data = yaml.safe_load(Path(config_file).read_text()) or {}
        except OSError as e:
            raise SystemExit(f"refinery: cannot read config {config_file}: {e.strerror}")
        if not isinstance(data, dict):
            raise SystemExit(f"refinery: {config_file}: expected a mapping of parameters")
    data = deep_merge(data, parse_set(sets))
    if workdir:
        data["workdir"] = workdir
    try:
        return flow.params_cls.model_validate(data)
    except ValidationError as e:
        raise SystemExit(f"refinery: invalid parameters for flow {flow.name!r}:\n{e}")


def cmd_run(args) -> int:
    _defaults_env()
    flow = load_flow(args.flow)
    params = build_params(flow, args.config, args.set or [], args.workdir)
    out = flow.run_params(params)
    emit(out, args.json)
    return 0


def cmd_demo(args) -> int:
    _defaults_env()
    flow = load_flow("demo")
    params = build_params(flow, args.config, args.set or [], args.workdir)
    out = flow.run_params(params)
    emit(out, args.json)
    return 0


def emit(out: dict, as_json: bool) -> None:
    sys.stderr.flush()
    if as_json:
        print(json.dumps(out, sort_keys=True, default=str))
    else:
        for stage, path in out.get("outputs", {}).items():
            print(f"{stage:>12}: {path}")
    sys.stdout.flush()


def cmd_inspect(args) -> int:
    from refinery.tasks.store import Dataset, DatasetNotFound

    try:
        ds = Dataset.open(args.path)
    except DatasetNotFound as e:
        print(f"refinery: {e}", file=sys.stderr)
        return 2
    print(json.dumps(ds.manifest, indent=2, sort_keys=True, ensure_ascii=False))
    return 0


def cmd_verify(args) -> int:
    """Check every file of a dataset against its manifest (existence, size, sha256)."""
    from refinery.tasks.store import Dataset, DatasetCorrupt, DatasetNotFound

    try:
        ds = Dataset.open(args.path, check=False)   # verify() reports size problems itself, all of them
    except DatasetCorrupt as e:                      # unreadable manifest, path outside the folder
        print(f"BAD {e}")
        return 1
    except DatasetNotFound as e:
        print(f"refinery: {e}", file=sys.stderr)
        return 2
    problems = ds.verify()
    for p in problems:
        print(f"BAD {p}")
    files = ds.manifest["files"]
    if problems:
        print(f"refinery: {ds.path}: {len(problems)} of {len(files)} files damaged", file=sys.stderr)
        return 1
    rows = sum(f.get("rows") or 0 for f in files)
    print(f"OK {ds.path}: {len(files)} files, {sum(f.get('bytes') or 0 for f in files)} bytes, "
          f"{rows} rows, sha256 checked")
    return 0


def cmd_flows(args) -> int:
    from refinery.flows.common import FLOWS

    for name in FLOWS:
        print(name)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="refinery", description="Raw web crawls to a trained language model, as Prefect flows.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("-c", "--config", help="YAML file of flow parameters")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a parameter (dotted keys for nested ones); repeatable")
        p.add_argument("--workdir", help="root folder or URL for all datasets (default ./refinery-work)")
        p.add_argument("--json", action="store_true", help="print one JSON object (outputs, counts) as the last stdout line")

    p = sub.add_parser("demo", help="run the whole pipeline on a generated demo crawl (no server, no network, no GPU)")
    common(p)
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("run", help="run one flow: curate, tokenize, pretrain, finetune, align, pipeline")
    p.add_argument("flow")
    common(p)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("inspect", help="print a dataset's manifest as JSON")
    p.add_argument("path")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("verify", help="check a dataset's files against its manifest (sizes and sha256); exit 1 names damaged files")
    p.add_argument("path", help="a dataset folder or URL (WORKDIR/STAGE/FINGERPRINT)")
    p.set_defaults(fn=cmd_verify)
    p = sub.add_parser("flows", help="list the flows")
    p.set_defaults(fn=cmd_flows)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
