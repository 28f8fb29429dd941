"""The ``refinery`` command: ``demo``, ``run FLOW``, ``inspect PATH``, ``flows``, ``export MODEL``, ``serve MODEL``,
``card PATH``, ``push PATH``.

Heavy imports (Prefect, torch, the stages) happen only inside the subcommands, so ``refinery
--help`` answers at once; ``refinery run FLOW --help`` imports that one flow module (its params
model) and starts nothing. Parameters are validated before any Prefect server starts.

Adding a subcommand: ``p = sub.add_parser(NAME, help=...)``, its arguments, ``p.set_defaults(fn=cmd_NAME)``
in :func:`build_parser`, and ``def cmd_NAME(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_WORKDIR = "refinery-work"


def _defaults_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    from refinery.flows.console import quiet_third_party

    quiet_third_party()
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
        from refinery.flows.helptext import suggest

        close = suggest(name, list(FLOWS))
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise SystemExit(f"refinery: unknown flow {name!r}; {hint}flows: {', '.join(FLOWS)} (see `refinery flows`)")
    module, attr = FLOWS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def resolve_workdir(flag: str | None, data: dict) -> str | None:
    """The storage root: ``--workdir`` > ``workdir`` from ``--set`` or ``-c`` > ``$REFINERY_WORKDIR``
    (as the deployments read it) > the params model's default (``./refinery-work``)."""
    if flag:
        return flag
    if data.get("workdir"):
        return data["workdir"]
    return os.environ.get("REFINERY_WORKDIR") or None


def raw_params(config_file: str | None, sets: list[str], workdir: str | None,
               defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """``-c`` YAML + ``--set`` + ``--workdir`` over ``defaults``, as a dict (not validated yet)."""
    import yaml

    data: dict[str, Any] = {}
    if config_file:
        try:
            data = yaml.safe_load(Path(config_file).read_text()) or {}
        except OSError as e:
            raise SystemExit(f"refinery: cannot read config {config_file}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise SystemExit(f"refinery: {config_file} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise SystemExit(f"refinery: {config_file}: expected a mapping of parameters")
    data = deep_merge(deep_merge(dict(defaults or {}), data), parse_set(sets))
    wd = resolve_workdir(workdir, data)
    if wd:
        data["workdir"] = wd
    return data


def build_params(flow, config_file: str | None, sets: list[str], workdir: str | None,
                 defaults: dict[str, Any] | None = None, check_paths: bool = False):
    """Validate ``-c`` YAML + ``--set`` + ``--workdir`` (over ``defaults``) into the flow's params
    model; a mistake is a SystemExit naming the dotted key (with "did you mean") before anything runs.
    ``check_paths``: local inputs must exist (refinery.flows.paths)."""
    from pydantic import ValidationError

    from refinery.flows.helptext import explain

    data = raw_params(config_file, sets, workdir, defaults)
    try:
        return flow.params_cls.model_validate(data, context={"check_paths": check_paths})
    except ValidationError as e:
        raise SystemExit(f"refinery: invalid parameters for flow {flow.name!r}:\n{explain(flow.name, flow.params_cls, e, data)}\n"
                         f"(all parameters: refinery run {flow.name} --help)") from None


def with_primary(out: dict) -> dict:
    """``out`` with its ``primary`` key (the dataset the next flow takes as input) first; flows
    built without :func:`refinery.flows.common.result` get the last output."""
    if "primary" in out or not out.get("outputs"):
        return out
    return {"primary": list(out["outputs"].values())[-1], **out}


def strict_json(value: Any) -> Any:
    """``value`` with NaN and infinities as None (strict JSON has no NaN), tuples as lists,
    anything else that JSON lacks as its string."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [strict_json(v) for v in value]
    if hasattr(value, "item") and callable(value.item):   # numpy / torch scalars
        try:
            return strict_json(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def dumps(value: Any, **kw) -> str:
    """Strict JSON: no NaN or Infinity (see :func:`strict_json`)."""
    return json.dumps(strict_json(value), allow_nan=False, **kw)


def emit(out: dict, as_json: bool) -> None:
    """Print a flow's result: ``stage: path`` lines, or one JSON object (keys in stage order, no
    sorting, so the primary output stays last in ``outputs``; strict JSON: NaN is null) as the
    last stdout line."""
    out = with_primary(out)
    sys.stderr.flush()
    if as_json:
        print(dumps(out))
    else:
        for stage, path in out.get("outputs", {}).items():
            print(f"{stage:>12}: {path}")
        if out.get("primary"):
            print(f"{'primary':>12}: {out['primary']}")
    sys.stdout.flush()


def _run_flow(name: str, args) -> int:
    _defaults_env()
    from refinery.flows.console import install_log_filters, set_progress

    set_progress(getattr(args, "progress", "auto"), quiet=getattr(args, "quiet", False))
    if getattr(args, "quiet", False):
        os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    if name not in ("demo",):
        # local inputs first, before the flow module (Prefect, the stages) is imported; --print-config
        # too: a configuration it prints is one that would start
        _preflight(name, args)
    flow = load_flow(name)  # imports Prefect; starts nothing
    install_log_filters()
    if getattr(args, "quiet", False):
        import logging

        for logger in ("prefect", "refinery"):
            logging.getLogger(logger).setLevel(logging.WARNING)
    # Validation first: a bad parameter must fail before Prefect starts a server (flow.run_params).
    params = build_params(flow, args.config, args.set or [], args.workdir, check_paths=True)
    if getattr(args, "print_config", False):
        print_config(params, args.json)
        return 0
    from refinery.flows.server import start_temporary_server

    start_temporary_server()   # guarded: it ends with this process, however that ends
    install_log_filters()
    out = flow.run_params(params)
    emit(out, args.json)
    return 0


def _dotted(data: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in data.items():
        out += _dotted(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return out


def _preflight(name: str, args) -> None:
    """Check the run's local paths before the flow is imported (refinery.flows.paths). When the run
    also sets other parameters, a mistake among them (a typo, a bad value) is reported first: the
    flow's model is imported to validate them, and the path error follows if they are fine."""
    from refinery.flows.paths import PATH_FIELDS, PathProblem, preflight

    data = raw_params(args.config, args.set or [], args.workdir)
    try:
        preflight(name, data)
    except PathProblem:
        if set(_dotted(data)) <= set(PATH_FIELDS.get(name, {})) | {"workdir", "task_runner"}:
            raise
        build_params(load_flow(name), args.config, args.set or [], args.workdir)
        raise


def print_config(params, as_json: bool) -> None:
    """The resolved parameters of a run (defaults filled in), as YAML or with --json as JSON."""
    data = strict_json(params.model_dump(mode="json"))
    if as_json:
        print(dumps(data))
        return
    import yaml

    print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())


def flow_help(parser: argparse.ArgumentParser, name: str) -> str:
    from refinery.flows.helptext import params_help

    flow = load_flow(name)
    return (f"{parser.format_help()}\nflow {name}: {flow_summary(name)}\n\n"
            f"parameters (--set NAME=VALUE, or the same names nested in a -c YAML file):\n"
            f"{params_help(flow.params_cls)}\n")


def cmd_run(args) -> int:
    if args.help:
        print(flow_help(args.parser, args.flow) if args.flow else args.parser.format_help() + _flow_list())
        return 0
    if not args.flow:
        raise SystemExit(f"refinery run: which flow?{_flow_list()}")
    return _run_flow(args.flow, args)


def cmd_demo(args) -> int:
    if args.help:
        print(flow_help(args.parser, "demo"))
        return 0
    return _run_flow("demo", args)


def cmd_inspect(args) -> int:
    from refinery.flows.inspection import InspectError, inspect_path

    try:
        print(inspect_path(args.path, head=args.head, as_json=args.json))
    except InspectError as e:
        print(f"refinery: {e}", file=sys.stderr)
        return 2
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


def cmd_plan(args) -> int:
    """Print a training flow's memory estimate per device without training (exit 1: it does not fit)."""
    _defaults_env()
    flow = load_flow(args.flow)
    # the training data is not read by the plan: finetune and align need not name it here
    unread = {"data": "(not read by refinery plan)"} if "data" in flow.params_cls.model_fields else {}
    params = build_params(flow, args.config, args.set or [], args.workdir, defaults=unread, check_paths=False)
    if not hasattr(params, "memory_plan"):
        print(f"refinery plan: no memory plan for flow {args.flow!r}: it takes pretrain, finetune or align",
              file=sys.stderr)
        return 2
    try:
        plan = params.memory_plan()
    except (ValueError, OSError) as e:
        print(f"refinery plan: {e}", file=sys.stderr)
        return 2
    print(dumps(plan.to_dict()) if args.json else plan.table())
    if plan.fits is False:
        print("what to change:\n  - " + "\n  - ".join(plan.advice()), file=sys.stderr)
        return 1
    return 0


def flow_summary(name: str) -> str:
    """The first line of the flow's docstring; known ones without importing the flow."""
    from refinery.flows.common import FLOW_SUMMARIES

    if name in FLOW_SUMMARIES:
        return FLOW_SUMMARIES[name]
    import inspect

    flow = load_flow(name)
    return " ".join((inspect.getdoc(getattr(flow, "fn", flow)) or "").split("\n\n")[0].split())


def _flow_list() -> str:
    from refinery.flows.common import FLOWS

    return "\nflows:\n" + "\n".join(f"  {n:<10} {flow_summary(n)}" for n in FLOWS)


def cmd_flows(args) -> int:
    print(_flow_list().removeprefix("\nflows:\n"))
    return 0


def cmd_generate(args) -> int:
    """Stream a model's completion of ``--prompt`` to stdout (refinery.tasks.eval.generate)."""
    _defaults_env()
    from refinery.tasks.eval.generate import stream_completion

    try:
        stream_completion(args.model, args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed, device=args.device)
    except (ValueError, OSError) as e:   # no such model, no chat template, unreadable files
        print(f"refinery generate: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_export(args) -> int:
    """Write a model as one GGUF file for llama.cpp (refinery.tasks.export.gguf)."""
    _defaults_env()
    from refinery.tasks.export.gguf import ExportError, export_gguf

    try:
        res = export_gguf(args.model, args.out, quant=args.quant)
    except (ExportError, ValueError, OSError) as e:   # an architecture or tokenizer it cannot export, no such model
        print(f"refinery export: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(dumps(res.to_dict()))
    else:
        types = ", ".join(f"{n} {k}" for k, n in sorted(res.tensor_types.items()))
        print(f"{res.path}: {res.architecture}, {args.quant}, {res.tensors} tensors ({types}), {res.vocab} tokens"
              f"{', chat template' if res.chat_template else ''}, {res.bytes:,} bytes")
        for note in res.notes:
            print(f"  note: {note}")
    return 0


def _inside_dataset(path: str) -> str | None:
    """The refinery dataset folder that ``path`` (a file to write) lies in, or None."""
    p = Path(path).resolve().parent
    for folder in (p, *p.parents):
        if (folder / "manifest.json").is_file():
            return str(folder)
    return None


def cmd_card(args) -> int:
    """Print (or write to --out) the card of a dataset or model folder (refinery.tasks.export.card)."""
    from refinery.tasks.export.card import card_for
    from refinery.tasks.store import DatasetNotFound

    try:
        text = card_for(args.path, license=args.license, evaluations=args.evaluation or None)
    except (DatasetNotFound, ValueError, OSError) as e:
        print(f"refinery card: {e}", file=sys.stderr)
        return 2
    if not args.out:
        sys.stdout.write(text)
        return 0
    held = _inside_dataset(args.out)
    if held is not None:   # its manifest pins every file's sha256: a card written there breaks verify
        print(f"refinery card: {args.out} is inside the published dataset {held}, which never changes; "
              "write the card elsewhere (refinery push uploads the regenerated card)", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"refinery card: wrote {args.out} ({len(text.encode()):,} bytes)")
    return 0


def cmd_push(args) -> int:
    """Upload a model or dataset folder to a Hugging Face Hub repository (refinery.tasks.export.hub)."""
    _defaults_env()
    from refinery.tasks.export.hub import PushError, push
    from refinery.tasks.store import DatasetNotFound

    try:
        res = push(args.path, args.repo, private=args.private, revision=args.revision, license=args.license,
                   base_model=args.base_model)
    except (PushError, DatasetNotFound, ValueError, OSError) as e:   # no token, damaged or no dataset, hub refused
        print(f"refinery push: {e}", file=sys.stderr)
        return 2
    print(dumps(res) if args.json else
          f"refinery push: {res['files']} files to {res['repo_type']} {res['repo']}@{res['revision']} ({res['url']})")
    return 0


def cmd_serve(args) -> int:
    """An OpenAI-compatible server for a model on 127.0.0.1 (refinery.tasks.serve) until SIGINT/SIGTERM."""
    _defaults_env()
    from refinery.tasks.eval.generate import load_model
    from refinery.tasks.serve import API_KEY_ENV, ServedModel, bind, is_local, make_server, url_of

    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise SystemExit("refinery serve: --max-concurrency must be at least 1")
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        print(f"refinery serve: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    try:
        lm = load_model(args.model, args.device)
    except (ValueError, OSError) as e:   # no such model, unreadable files
        sock.close()
        print(f"refinery serve: {e}", file=sys.stderr)
        return 2
    concurrency = args.max_concurrency or (1 if lm.device == "cpu" else 4)
    engine = ServedModel(lm, args.model, max_concurrency=concurrency, max_queue=args.max_queue,
                    default_max_tokens=args.max_tokens)
    if not is_local(args.host):
        print(f"refinery serve: warning: listening on {args.host}, reachable from other machines"
              f"{'' if os.environ.get(API_KEY_ENV) else f'; set {API_KEY_ENV} to require a key'}", file=sys.stderr)
    print(f"refinery serve: {args.model} on {lm.device} at {url_of(sock)} (OpenAI API: /models, /completions, "
          f"/chat/completions; {concurrency} at a time; "
          f"{'API key required' if os.environ.get(API_KEY_ENV) else 'no API key'}); Ctrl-C stops it", flush=True)
    try:
        make_server(engine, log_level=args.log_level).run(sockets=[sock])
    except KeyboardInterrupt as e:   # the signal uvicorn re-raises once it has stopped (SIGTERM: Terminated)
        import signal

        signum = getattr(e, "signum", signal.SIGINT)
        print(f"refinery serve: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    return 0


def _flow_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-h", "--help", action="store_true", help="show this help with the flow's parameters")
    p.add_argument("-c", "--config", help="YAML file of flow parameters")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a parameter (dotted keys for nested ones); repeatable")
    p.add_argument("--workdir", help=f"root folder or URL for all datasets (default: $REFINERY_WORKDIR, else ./{DEFAULT_WORKDIR})")
    p.add_argument("--json", action="store_true", help="print one JSON object (primary, outputs, counts) as the last stdout line (strict JSON: NaN is null)")
    p.add_argument("--print-config", action="store_true", help="print the resolved parameters (YAML; --json: JSON) and run nothing; "
                   "parameters and local paths are checked as for a run")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings, errors and the result on the console; no progress bars")
    p.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                   help="progress bars: auto (only when stderr is a terminal), always or never")
    _debug_option(p)


def _debug_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show full tracebacks of failures (also: REFINERY_DEBUG=1)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="refinery", description="Raw web crawls to a trained language model, as Prefect flows.",
                                 epilog="Exit status: 0 done, 1 failed (a short message says what and what to do), 2 usage "
                                        "error, 130/143 stopped by SIGINT/SIGTERM. --debug or REFINERY_DEBUG=1 shows tracebacks.")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks of failures (also: REFINERY_DEBUG=1)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("demo", add_help=False, help="run the whole pipeline on a generated demo crawl (no server, no network, no GPU)")
    _flow_options(p)
    p.set_defaults(fn=cmd_demo, parser=p)

    p = sub.add_parser("run", add_help=False, help="run one flow: curate, tokenize, pretrain, finetune, align, pipeline",
                       usage="refinery run FLOW [-h] [-c CONFIG] [--set KEY=VALUE] [--workdir WORKDIR] [--json] "
                             "[--print-config] [--quiet] [--progress {auto,always,never}] [--debug]")
    p.add_argument("flow", nargs="?", help="the flow (refinery flows lists them); FLOW --help lists its parameters")
    _flow_options(p)
    p.set_defaults(fn=cmd_run, parser=p)

    p = sub.add_parser("inspect", help="a dataset's schema, counts, lineage and rows; a stage folder's fingerprints; a workdir's stages")
    p.add_argument("path", help="a dataset (WORKDIR/STAGE/FINGERPRINT), a stage folder (WORKDIR/STAGE) or a workdir")
    p.add_argument("--head", type=int, default=0, metavar="N", help="also print the first N rows of a dataset")
    p.add_argument("--json", action="store_true", help="print the dataset's manifest as JSON")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("verify", help="check a dataset's files against its manifest (sizes and sha256); exit 1 names damaged files")
    p.add_argument("path", help="a dataset folder or URL (WORKDIR/STAGE/FINGERPRINT)")
    p.set_defaults(fn=cmd_verify)

    p = sub.add_parser("generate", help="print a model's completion of a prompt, streaming (any model the flows accept)")
    p.add_argument("model", help="a refinery dataset (pretrain/finetune/align output), a Hugging Face model folder or a hub id")
    p.add_argument("--prompt", required=True, help="the text to complete")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user turn through the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    _debug_option(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("export", help="write a model as one GGUF file for llama.cpp, tokenizer and chat template included")
    p.add_argument("model", help="a refinery dataset (pretrain/finetune/align output), a Hugging Face model folder or a hub id")
    p.add_argument("--format", default="gguf", choices=("gguf",), help="the file format (gguf)")
    p.add_argument("--quant", default="f16", choices=("f16", "q8_0", "q4_k_m"),
                   help="f16 (default), q8_0, or q4_k_m (needs llama-cpp-python: llama.cpp's quantizer)")
    p.add_argument("--out", metavar="PATH", help="the output file or folder (default ./NAME.QUANT.gguf)")
    p.add_argument("--json", action="store_true", help="print what was written as one JSON object")
    _debug_option(p)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("card", help="a dataset's or model's card (README.md) with its whole lineage and the evaluations "
                                    "found since it was published: printed, or written to --out")
    p.add_argument("path", help="a refinery dataset, or a model folder inside one (W/finetune/FP/adapter)")
    p.add_argument("--out", metavar="FILE", help="write the card here (outside the published dataset) instead of printing it")
    p.add_argument("--license", default="other", help="the card's license (default other: the crawl's licensing is yours to state)")
    p.add_argument("--evaluation", action="append", metavar="PATH",
                   help="an evaluate dataset to report (repeatable; default every one in the same workdir that scored it)")
    p.set_defaults(fn=cmd_card)

    p = sub.add_parser("push", help="upload a model (or dataset) folder with its regenerated card to a Hugging Face Hub "
                                    "repository (token from HF_TOKEN)")
    p.add_argument("path", help="a refinery dataset (a training dataset: its model), or a model folder inside one")
    p.add_argument("--repo", required=True, metavar="ORG/NAME", help="the hub repository (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", metavar="BRANCH", help="the branch to commit to (created when missing; default main)")
    p.add_argument("--license", default="other", help="the card's license (default other)")
    p.add_argument("--base-model", metavar="HUB_ID", help="the hub id of the base model when it is a local refinery "
                   "model you pushed (the hub takes only hub ids as base_model; without it a relative base leaves "
                   "the uploaded card's metadata and stays in its text)")
    p.add_argument("--json", action="store_true", help="print what was pushed as one JSON object")
    _debug_option(p)
    p.set_defaults(fn=cmd_push)

    p = sub.add_parser("serve", help="an OpenAI-compatible server for a model (/v1/models, /v1/completions, "
                                     "/v1/chat/completions, streaming) on 127.0.0.1")
    p.add_argument("model", help="a refinery dataset (pretrain/finetune/align output), a Hugging Face model folder or a hub id")
    p.add_argument("--port", type=int, default=8000, help="the port (default 8000; 0 picks a free one, printed)")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (default 127.0.0.1; another one is reachable from other machines: "
                        "set REFINERY_SERVE_API_KEY)")
    p.add_argument("--max-concurrency", type=int, default=None, metavar="N",
                   help="generations at once (default 1 on CPU, 4 on a GPU); more requests wait")
    p.add_argument("--max-queue", type=int, default=32, metavar="N",
                   help="requests waiting for a slot at most; beyond that 429 (default 32)")
    p.add_argument("--max-tokens", type=int, default=256, metavar="N",
                   help="max_tokens of a request that names none (default 256, within the model's context)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="the server's log (info: one line per request)")
    _debug_option(p)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("plan", help="a training flow's memory estimate per device (parameters, gradients, optimizer, activations) without training")
    p.add_argument("flow", help="pretrain, finetune or align")
    p.add_argument("-c", "--config", help="YAML file of flow parameters")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a flow parameter, as for run; repeatable")
    p.add_argument("--workdir", help="root folder or URL for all datasets")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    _debug_option(p)
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("flows", help="list the flows")
    p.set_defaults(fn=cmd_flows)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Parse, run, and turn an expected failure into a short message (exit 1), a signal into a
    prompt exit (143 SIGTERM, 130 SIGINT); --debug / REFINERY_DEBUG=1 lets tracebacks through."""
    from refinery.flows.console import SignalWatch, Terminated, debug_enabled, error_block

    args = build_parser().parse_args(argv)
    if getattr(args, "debug", False):
        os.environ["REFINERY_DEBUG"] = "1"
    watch = SignalWatch().install()
    command = args.cmd + (f" {args.flow}" if getattr(args, "flow", None) and args.cmd in ("run", "plan") else "")
    try:
        return args.fn(args)
    except SystemExit as e:
        if isinstance(e.code, str):   # a usage error (bad parameter, unknown flow): its message, exit 2
            print(e.code, file=sys.stderr)
            raise UsageExit(e.code) from None
        raise
    except (KeyboardInterrupt, Terminated) as e:
        return _stopped(watch, e, argv is None)
    except BaseException as e:
        if type(e).__name__ == "TerminationSignal":   # Prefect's SIGTERM bridge, outside its flow run
            return _stopped(watch, e, argv is None)
        block = None if debug_enabled() else error_block(command, e)
        if block is None:
            raise
        if watch.received is not None:   # a signal ended the run (e.g. training checkpointed and stopped)
            print(block.splitlines()[0], file=sys.stderr)
            return _stopped(watch, e, argv is None)
        sys.stdout.flush()
        print(block, file=sys.stderr)
        return 1


class UsageExit(SystemExit):
    """A usage error already printed: exit status 2, as argparse's own; ``str()`` is the message."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2


def _stopped(watch, e: BaseException, leave: bool = False) -> int:
    """A signal ended the command: one line, the server stopped; ``leave`` (the real command, not
    a caller of :func:`main`): exit now, without waiting for worker threads still in a shard."""
    import signal

    signum = watch.received or getattr(e, "signum", None) or (signal.SIGINT if isinstance(e, KeyboardInterrupt)
                                                               and type(e).__name__ == "KeyboardInterrupt"
                                                               else signal.SIGTERM)
    watch.received = signum
    from refinery.flows.console import debug_enabled

    if debug_enabled():
        import traceback

        traceback.print_exception(e)
    print(f"refinery: stopped by {signal.Signals(signum).name}; rerun the same command to resume "
          "(finished stages and checkpoints are kept)", file=sys.stderr)
    if "refinery.flows.server" in sys.modules and not leave:   # leaving: the guard stops it (Prefect's log
        from refinery.flows.server import stop_temporary_server   # worker may still be sending to it)

        stop_temporary_server()
    sys.stdout.flush()
    sys.stderr.flush()
    if leave:
        os._exit(watch.exit_code())
    return watch.exit_code()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
