"""Every ``refinery`` command in README.md's shell blocks, checked on the demo's outputs.

The README is parsed (its fenced ``bash``/``sh`` blocks, continuation lines joined, comments
dropped) and every command whose program is ``refinery`` becomes a test case. The demo runs once per
module, cut down (40 pages, a few training steps, its evaluation of the three trained models on 4
held-out documents and one local GSM8K problem), under a workdir that the cases call ``W``; a
scratch folder holds what the examples name (``sft.json``, ``pairs.jsonl``, ``crawl/*.warc.gz``,
``configs/`` ...), made from the demo's own inputs. ``W/<stage>/<fp>`` becomes the demo's dataset of
that stage (a stage the demo does not write fails the case: README examples must name what exists),
``MODEL_DIR`` the demo's pretrained model.

How each command is checked:

- a usage line (``refinery run FLOW [-c FILE.yaml] ...``): its subcommand and every option it names
  must exist in the command's parser; ``refinery run FLOW --help`` runs for every flow;
- ``inspect``, ``verify``, ``flows``, ``plan``, ``generate``, ``export`` and ``--help`` run for real;
- ``card PATH``: runs; a model's card printed parses with ``huggingface_hub.ModelCard`` and its
  ``model-index`` holds the demo evaluation's ``results.parquet`` numbers for that model exactly;
- ``push PATH ...``: its options parse (``--help`` runs with them) and PATH gives an upload plan
  (verified files, nothing sent); the upload itself is tested against a mock hub in
  ``tests/export/test_model_card.py``;
- ``serve MODEL ...``: its options parse (``--help`` runs with them) and its model resolves to a
  complete model folder, as the server loads it; the server itself is tested in
  ``tests/eval/test_serve.py`` (a server started here would only wait for requests);
- ``run FLOW ...`` is validated with ``--print-config``: parameters, and the local paths checked
  as a run checks them (``refinery.flows.paths``); a model input that is a refinery dataset must
  also resolve to a complete model folder (``refinery.tasks.modelref``), as evaluate, finetune and
  align resolve it. (The training and evaluate flows themselves ran in the demo, on those same
  dataset folders: another run of each would cost minutes, not check more.)

A ``refinery`` subcommand that none of these covers fails its case, so a new command added to the
README needs a line here.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
REFINERY = str(Path(sys.executable).parent / "refinery")
SHELLS = ("bash", "sh", "shell", "console")
SEPARATORS = ("&&", "||", ";", "&", "|")
# the demo, cut down: every stage runs and publishes, in seconds rather than minutes
DEMO_SETS = ["pages=40", "tokenize.tokenizer.vocab_size=512",
             "pretrain.max_steps=2", "pretrain.eval_every=2", "pretrain.batch_size=4",
             "finetune.max_steps=1", "finetune.max_records=16", "finetune.max_val_examples=2",
             "finetune.num_samples=1", "finetune.sample_max_new_tokens=2",
             "align.dpo.max_steps=1", "align.max_pairs=12",
             # the demo's evaluation of the three models, on a tiny set
             "evaluate.max_docs=4", "evaluate.limit=1", "evaluate.prompts=[]", "evaluate.gen_kwargs=max_gen_toks=2",
             "evaluate.batch_size=4", "evaluate.max_length=128"]
PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z_]*|FILE\.yaml|a\.b=value|\.\.\.\]?)$")   # FLOW, PATH, TEXT, N ...


def readme_commands(text: str) -> list[tuple[int, list[str]]]:
    """(line number, argv after the program) of every ``refinery`` command in the shell blocks."""
    out = []
    for block in re.finditer(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", text, re.M | re.S):
        if block.group(1) not in SHELLS:
            continue
        first = text.count("\n", 0, block.start(2)) + 1
        lines = block.group(2).split("\n")
        i = 0
        while i < len(lines):
            start, line = first + i, lines[i]
            while line.endswith("\\") and i + 1 < len(lines):   # continuation lines
                i += 1
                line = line[:-1] + " " + lines[i]
            i += 1
            cmd: list[str] = []
            for tok in shlex.split(line, comments=True) + ["&&"]:
                if tok in SEPARATORS:
                    if cmd and Path(cmd[0]).name == "refinery":
                        out.append((start, cmd[1:]))
                    cmd = []
                else:
                    cmd.append(tok)
    return out


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


def _case_id(case: tuple[int, list[str]]) -> str:
    line, argv = case
    return f"L{line}-" + "-".join(a for a in argv[:2] if re.match(r"^[a-z]+$", a))


def test_the_readme_has_commands_and_names_every_subcommand():
    """The parse finds the README's commands, and its synopsis names every subcommand of the parser."""
    from refinery.flows.cli import build_parser

    assert len(COMMANDS) >= 15, COMMANDS
    named = {argv[0] for _, argv in COMMANDS if argv}
    missing = set(_subparsers(build_parser())) - named
    assert not missing, f"README.md's shell blocks show no `refinery {' / '.join(sorted(missing))}` command"


def test_the_parse_joins_continuations_and_drops_comments():
    text = ("```bash\n.venv/bin/refinery run a --set x=1 \\\n    --set 'y=[1, 2]'   # comment refinery flows\n"
            "make x && refinery flows\n```\n```python\nrefinery inspect X\n```\n")
    assert readme_commands(text) == [(2, ["run", "a", "--set", "x=1", "--set", "y=[1, 2]"]), (4, ["flows"])]


# --------------------------------------------------------------------------- the demo's outputs
@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """The cut-down demo's workdir, and a scratch folder holding what the README's examples name."""
    tmp = tmp_path_factory.mktemp("readme")
    work = tmp / "work"
    t0 = time.perf_counter()
    r = subprocess.run([REFINERY, "demo", "--workdir", str(work), "--json",
                        *[a for s in DEMO_SETS for a in ("--set", s)]],
                       capture_output=True, text=True, timeout=900, cwd=tmp,
                       env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "REFINERY_DEBUG": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    print(f"cut-down demo: {time.perf_counter() - t0:.1f} s")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    inputs = next((work / "demo-inputs").iterdir())
    run = tmp / "run"   # the examples' current folder
    run.mkdir()
    (run / "W").symlink_to(work)
    (run / "configs").symlink_to(ROOT / "configs")
    (run / "crawl").symlink_to(inputs)
    warc = tmp / "shared" / "data" / "warc"   # ../shared/data/warc of the examples' folder
    warc.parent.mkdir(parents=True)
    warc.symlink_to(inputs)
    for name in ("sft.json", "alpaca.json"):
        shutil.copy(inputs / "instructions.json", run / name)
    shutil.copy(inputs / "preferences.jsonl", run / "pairs.jsonl")
    from refinery.tasks.eval.problems import write_problems

    write_problems(run / "gsm8k-test.jsonl", seed=0)
    (run / "PATH").mkdir()
    shutil.copy(run / "gsm8k-test.jsonl", run / "PATH" / "gsm8k-test.jsonl")
    return {"work": work, "run": run, "outputs": out["outputs"], "counts": out["counts"]}


def dataset_of(work: Path, stage: str) -> str:
    """The fingerprint of the demo's published ``stage`` dataset."""
    folder = work / stage
    fps = sorted(p.name for p in folder.iterdir() if (p / "manifest.json").is_file()) if folder.is_dir() else []
    if len(fps) != 1:
        stages = sorted(p.name for p in work.iterdir() if p.is_dir() and not p.name.startswith("."))
        pytest.fail(f"README.md names W/{stage}/<fp>, but the demo wrote {len(fps)} {stage} datasets "
                    f"(the demo's stage folders: {', '.join(stages)})")
    return fps[0]


def concrete(argv: list[str], work: Path) -> list[str]:
    """The README's placeholders replaced by the demo's datasets."""
    def fill(arg: str) -> str:
        arg = re.sub(r"\bW/(\w+)/<fp>", lambda m: f"W/{m[1]}/{dataset_of(work, m[1])}", arg)
        return arg.replace("MODEL_DIR", f"W/pretrain/{dataset_of(work, 'pretrain')}")
    out = [fill(a) for a in argv]
    left = [a for a in out if re.search(r"<\w+>", a)]
    assert not left, f"placeholders this test does not know: {left}"
    return out


def _subparsers(parser) -> dict:
    import argparse

    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def is_usage(argv: list[str]) -> bool:
    return any("[" in a or "]" in a or PLACEHOLDER.match(a) for a in argv[1:])


@pytest.fixture
def cli(demo, monkeypatch, capsys):
    """``refinery ARGV`` in this process, in the examples' folder: (exit status, stdout, stderr)."""
    from refinery.flows.cli import main

    monkeypatch.chdir(demo["run"])
    for var in ("REFINERY_PROGRESS", "TQDM_DISABLE", "PREFECT_LOGGING_LEVEL"):   # the command sets them:
        was = os.environ.get(var)                                               # restored after the test
        monkeypatch.setenv(var, "-")
        if was is None:
            monkeypatch.delenv(var)
        else:
            monkeypatch.setenv(var, was)

    def call(argv: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
        out, err = capsys.readouterr()
        return rc, out, err

    return call


def check_usage(argv: list[str], cli) -> None:
    """A usage line: the subcommand exists and takes every option named; ``run FLOW --help`` runs."""
    from refinery.flows.cli import build_parser
    from refinery.flows.common import FLOWS

    subs = _subparsers(build_parser())
    assert argv[0] in subs, f"`refinery {argv[0]}`: no such subcommand (the parser has {sorted(subs)})"
    options = {o for a in subs[argv[0]]._actions for o in a.option_strings}
    named = {a.strip("[].") for a in argv[1:] if a.lstrip("[").startswith("-")}
    assert named <= options, f"`refinery {argv[0]}` takes no {sorted(named - options)} (it takes {sorted(options)})"
    if argv[:3] == ["run", "FLOW", "--help"]:
        for flow in FLOWS:
            rc, out, err = cli(["run", flow, "--help"])
            assert rc == 0 and f"flow {flow}:" in out, err


def check_run(argv: list[str], cli) -> None:
    """``run FLOW ...`` validated with --print-config: parameters, local paths, model inputs."""
    from refinery.tasks.modelref import dataset_manifest, resolve_model

    rc, out, err = cli([*argv, "--print-config", "--json"])
    assert rc == 0, err
    params = json.loads(out.strip().splitlines()[-1])
    if argv[1] in ("finetune", "align", "evaluate"):
        for ref in str(params["input"]).split(","):
            if dataset_manifest(ref) is not None:   # a refinery dataset: it must hold a loadable model
                assert (Path(resolve_model(ref)) / "config.json").is_file()


def check_serve(argv: list[str], cli) -> None:
    """``serve MODEL ...``: the options parse and the model resolves; nothing listens."""
    from refinery.tasks.modelref import resolve_model

    rc, out, err = cli([*argv, "--help"])
    assert rc == 0 and "--max-concurrency" in out, err
    assert (Path(resolve_model(argv[1])) / "config.json").is_file()


def check_card(argv: list[str], cli, work: Path) -> None:
    """``card PATH``: a model's card parses, its model-index equals the demo evaluation's numbers."""
    import math

    import pyarrow.parquet as pq
    from huggingface_hub import ModelCard

    rc, out, err = cli(argv)
    assert rc == 0 and out.strip(), err
    if "--out" in argv:
        return
    meta = ModelCard(out).data.to_dict()
    if "library_name" not in meta:
        return   # a dataset's card
    got = {(r["dataset"]["type"], m["name"]): m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]}
    manifest = json.loads((Path(argv[1]) / "manifest.json").read_text())   # relative to the examples' folder
    ev = work / "evaluate" / dataset_of(work, "evaluate")
    labels = {m["label"] for m in json.loads((ev / "manifest.json").read_text())["config"]["models"]
              if m.get("identity") == f"dataset:{manifest['stage']}:{manifest['fingerprint']}"}
    want = {(r["task"], r["metric"]): r["value"] for r in pq.read_table(ev / "results.parquet").to_pylist()
            if r["model"] in labels and isinstance(r["value"], float) and math.isfinite(r["value"])}
    assert labels and got == want, (got, want)


def check_push(argv: list[str], cli) -> None:
    """``push PATH ...``: the options parse and PATH gives an upload plan; nothing is sent."""
    from refinery.tasks.export.hub import upload_plan

    rc, out, err = cli([*argv, "--help"])
    assert rc == 0 and "--repo" in out, err
    repo_type, _, files, _ = upload_plan(argv[1])
    assert files and repo_type in ("model", "dataset")


@pytest.mark.slow   # the cut-down demo: about a minute of CPU, shared by every case of the module
@pytest.mark.parametrize("case", COMMANDS, ids=[_case_id(c) for c in COMMANDS])
def test_readme_command(case, demo, cli):
    line, argv = case
    where = f"README.md line {line}: refinery {' '.join(argv)}"
    if not argv:
        pytest.fail(f"{where}: no subcommand")
    if is_usage(argv):
        check_usage(argv, cli)
        return
    argv = concrete(argv, demo["work"])
    sub = argv[0]
    if sub in ("inspect", "verify", "flows", "plan", "generate", "export") or "--help" in argv or "-h" in argv:
        rc, out, err = cli(argv)
        assert rc == 0, f"{where}: exit {rc}\n{err[-2000:]}"
        assert out.strip() or sub == "generate", f"{where}: printed nothing"   # a tiny model may stop at once
    elif sub == "serve":
        check_serve(argv, cli)
    elif sub == "card":
        check_card(argv, cli, demo["work"])
    elif sub == "push":
        check_push(argv, cli)
    elif sub == "run":
        check_run(argv, cli)
    elif sub == "demo":
        rc, out, err = cli([*argv, "--print-config", "--json"])
        assert rc == 0 and json.loads(out.strip().splitlines()[-1])["pages"] >= 1, err
    else:
        pytest.fail(f"{where}: `refinery {sub}` is not covered by tests/flows/test_readme_commands.py: "
                    "say there how to check it")


@pytest.mark.slow
def test_every_model_of_the_demo_loads_from_its_dataset_folder(demo):
    """Every training dataset names its complete model with the manifest key ``model``, and the
    dataset folder itself resolves to it (README "Layout", ARCHITECTURE.md section 6)."""
    from refinery.tasks.modelref import resolve_model

    for stage in ("pretrain", "finetune", "dpo"):
        ds = demo["work"] / stage / dataset_of(demo["work"], stage)
        manifest = json.loads((ds / "manifest.json").read_text())
        folder = ds / manifest["model"]
        assert resolve_model(str(ds)) == str(folder if manifest["model"] != "." else ds), stage
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}, stage
    finetune = demo["work"] / "finetune" / dataset_of(demo["work"], "finetune")
    assert json.loads((finetune / "manifest.json").read_text())["adapter"] == "adapter"
    # every model the demo published carries a card the hub's parser reads, listed in its manifest
    from huggingface_hub import ModelCard, metadata_load

    for stage, card in (("pretrain", "README.md"), ("finetune", "merged/README.md"), ("finetune", "adapter/README.md"),
                        ("dpo", "model/README.md")):
        ds = demo["work"] / stage / dataset_of(demo["work"], stage)
        meta = metadata_load(ds / card)
        assert ModelCard.load(ds / card).data.to_dict() == meta, (stage, card)
        assert meta["pipeline_tag"] == "text-generation" and meta["license"] and meta["tags"], (stage, card)
        assert card in {f["path"] for f in json.loads((ds / "manifest.json").read_text())["files"]}
    # the demo's evaluation took the three dataset folders themselves and scored each model
    from refinery.tasks.store import Dataset

    evaluate = Dataset.open(demo["outputs"]["evaluate"])
    models = evaluate.manifest["config"]["models"]
    assert [Path(m["path"]).parent.name for m in models] == ["pretrain", "finetune", "dpo"], models
    assert demo["counts"]["evaluate"]["models"] == 3
