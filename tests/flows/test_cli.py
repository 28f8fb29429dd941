import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refinery.flows.cli import build_params, deep_merge, main, parse_set

REFINERY = str(Path(sys.executable).parent / "refinery")


def test_parse_set_types_and_nesting():
    assert parse_set(["a.b=1", "a.c=x,y", "d=true", "e=0.5", "f=[1, 2]", "g="]) == {
        "a": {"b": 1, "c": "x,y"}, "d": True, "e": 0.5, "f": [1, 2], "g": ""}
    assert parse_set(["input=data/*.warc.gz"]) == {"input": "data/*.warc.gz"}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_set(["nokey"])


def test_deep_merge():
    assert deep_merge({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}, "d": 1}


def test_help_is_instant():
    t0 = time.perf_counter()
    r = subprocess.run([REFINERY, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "demo" in r.stdout and "inspect" in r.stdout
    assert time.perf_counter() - t0 < 5  # no torch/prefect/peft import at start-up


def test_unknown_flow_and_bad_params(tmp_path):
    with pytest.raises(SystemExit, match="unknown flow"):
        main(["run", "nope"])
    from refinery.flows.curate import curate_flow

    with pytest.raises(SystemExit, match="invalid parameters"):
        build_params(curate_flow, None, ["no_such_field=1"], None)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("input: a.jsonl\nfilters:\n  write_exclusions: true\n")
    p = build_params(curate_flow, str(cfg), ["source=books"], str(tmp_path / "w"))
    assert (p.input, p.source, p.workdir, p.filters.write_exclusions) == ("a.jsonl", "books", str(tmp_path / "w"), True)


def test_inspect_missing_dataset(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


# --------------------------------------------------------------------------- help that answers
def test_run_flow_help_lists_dotted_nested_parameters(capsys):
    from refinery.tasks.dedup.stage import DedupConfig

    assert main(["run", "curate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "flow curate: Ingest crawl files" in out
    assert f"  dedup.bands: int, default {DedupConfig().bands}\n" in out
    assert "  input: str, default \"\"" in out and "Required unless ingest.inputs is set" in out
    assert "  ingest.inputs[].path: str, required" in out
    assert "  filters.c4.min_num_sentences: int, default 5" in out
    assert main(["run", "align", "--help"]) == 0
    out = capsys.readouterr().out
    assert "  ppo.kl_coef: float, default " in out and "  input: str, required" in out
    assert main(["run", "finetune", "--help"]) == 0
    assert "  lora.r: int, default " in capsys.readouterr().out


def test_help_names_every_field_of_the_model():
    from pydantic import BaseModel, Field

    from refinery.flows.helptext import REQUIRED, params, params_help

    class Inner(BaseModel):
        k: int = Field(3, description="The k.")

    class Item(BaseModel):
        path: str

    class Outer(BaseModel):
        a: str = Field(description="Needed.")
        inner: Inner = Field(default_factory=lambda: Inner(k=7), description="Nested.")
        maybe: Inner | None = None
        items: list[Item] = []

    got = {p.name: p for p in params(Outer)}
    assert list(got) == ["a", "inner", "inner.k", "maybe", "maybe.k", "items", "items[].path"]
    assert got["a"].default is REQUIRED and got["inner.k"].default == 7 and got["maybe.k"].default == 3
    assert got["inner"].section and not got["inner.k"].section
    text = params_help(Outer)
    assert "  inner.k: int, default 7\n      The k." in text and "  a: str, required\n      Needed." in text


def test_did_you_mean_for_keys_and_flows():
    from refinery.flows.align import align_flow
    from refinery.flows.pretrain import pretrain_flow

    with pytest.raises(SystemExit, match=r"unknown parameter 'lerning_rate': did you mean 'lr'\?"):
        build_params(pretrain_flow, None, ["lerning_rate=1e-3", "input=x"], None)
    with pytest.raises(SystemExit, match=r"unknown parameter 'ppo.kl_coeff': did you mean 'ppo.kl_coef'"):
        build_params(align_flow, None, ["ppo.kl_coeff=0.5", "input=m", "data=d"], None)
    # a trainer knob given flat on align points at the chosen method's section first
    with pytest.raises(SystemExit, match=r"unknown parameter 'max_steps': did you mean 'grpo.max_steps'"):
        build_params(align_flow, None, ["max_steps=10", "method=grpo", "input=m", "data=d"], None)
    with pytest.raises(SystemExit, match=r"unknown flow 'curat'; did you mean 'curate'\?"):
        main(["run", "curat"])
    with pytest.raises(SystemExit, match=r"method: Input should be 'ppo', 'dpo', .* \(got 'dop'\); did you mean 'dpo'\?"):
        build_params(align_flow, None, ["method=dop", "input=m", "data=d"], None)


def test_yaml_keys_and_sections_get_the_same_messages(tmp_path):
    from refinery.flows.curate import curate_flow

    cfg = tmp_path / "c.yaml"
    cfg.write_text("input: a.jsonl\ndedupp:\n  bands: 4\nfilters:\n  c4:\n    min_num_sentence: 3\n")
    with pytest.raises(SystemExit) as e:
        build_params(curate_flow, str(cfg), [], None)
    msg = str(e.value)
    assert "unknown parameter 'dedupp': did you mean 'dedup'?" in msg
    assert "unknown parameter 'filters.c4.min_num_sentence': did you mean 'filters.c4.min_num_sentences'" in msg
    with pytest.raises(SystemExit, match="'dedup' is a section"):
        build_params(curate_flow, None, ["input=a", "dedup=3"], None)


def test_required_input_fails_before_any_server(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    for flow, example in (("curate", "input=crawl/*.warc.gz"), ("tokenize", "input=refinery-work/dedup/FINGERPRINT")):
        r = subprocess.run([REFINERY, "run", flow, "--workdir", str(tmp_path / "w")], capture_output=True,
                           text=True, env=env, timeout=120)
        assert r.returncode != 0
        assert "missing required parameter 'input'" in r.stderr and f"--set {example}" in r.stderr, r.stderr
        assert "server" not in r.stderr.lower() and "Traceback" not in r.stderr
    assert not list((tmp_path / "prefect-home").glob("*.db"))  # no Prefect server started (its database)


# --------------------------------------------------------------------------- --json, workdir
def test_json_keeps_stage_order_and_names_the_primary_output(capsys):
    from types import SimpleNamespace

    from refinery.flows.cli import emit
    from refinery.flows.common import result

    stages = {name: SimpleNamespace(path=f"/w/{name}/fp", counts={"docs_out": i})
              for i, name in enumerate(["ingest", "filter", "minhash", "dedup"])}
    out = result(stages)
    assert out["primary"] == "/w/dedup/fp"
    assert result(stages, primary="/w/filter/fp")["primary"] == "/w/filter/fp"
    emit(out, as_json=True)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith('{"primary": "/w/dedup/fp", "outputs": {"ingest": ')
    assert list(json.loads(line)["outputs"]) == ["ingest", "filter", "minhash", "dedup"]
    # a flow that builds its own dict (no result()) still gets its primary: the last output
    emit({"outputs": {"finetune_adapter": "/w/f/a", "finetune": "/w/f"}, "counts": {}}, as_json=True)
    assert json.loads(capsys.readouterr().out)["primary"] == "/w/f"


def test_workdir_flag_then_config_then_env_then_default(tmp_path, monkeypatch):
    from refinery.flows.curate import curate_flow

    monkeypatch.delenv("REFINERY_WORKDIR", raising=False)
    assert build_params(curate_flow, None, ["input=a"], None).workdir == "refinery-work"
    monkeypatch.setenv("REFINERY_WORKDIR", str(tmp_path / "env"))
    assert build_params(curate_flow, None, ["input=a"], None).workdir == str(tmp_path / "env")
    assert build_params(curate_flow, None, ["input=a", "workdir=/set"], None).workdir == "/set"
    assert build_params(curate_flow, None, ["input=a"], str(tmp_path / "flag")).workdir == str(tmp_path / "flag")


def test_flows_lists_each_flow_with_its_docstring_line(capsys):
    import inspect

    from refinery.flows.common import FLOW_SUMMARIES, FLOWS
    from refinery.flows.cli import load_flow

    assert main(["flows"]) == 0
    out = capsys.readouterr().out
    for name in FLOWS:
        first = " ".join(inspect.getdoc(load_flow(name).fn).split("\n\n")[0].split())
        assert FLOW_SUMMARIES.get(name, first) == first, name
        assert f"  {name:<10} {first}" in out


# --------------------------------------------------------------------------- inspect
@pytest.fixture
def toy_workdir(tmp_path):
    from toy_stages import DoubleConfig, Toy, ToyConfig, double

    work = tmp_path / "w"
    toy = Toy.run(work, [], ToyConfig(shards=2, rows=3))
    dbl = double.run(work, [toy], DoubleConfig())
    (work / "toy" / ".staging-0123456789abcdef").mkdir()  # an unfinished build
    return work, toy, dbl


def test_inspect_dataset_schema_counts_lineage_head(toy_workdir, capsys):
    work, toy, dbl = toy_workdir
    assert main(["inspect", dbl.path, "--head", "2"]) == 0
    out = capsys.readouterr().out
    assert f"stage    double  fingerprint {dbl.fingerprint}" in out
    assert "parts    1 part, 6 rows" in out and "  docs_out: 6" in out
    assert "schema   (part-00000.parquet)\n  x: int64" in out
    assert f"lineage\n  double/{dbl.fingerprint}  (docs 6 -> 6" in out and f"    <- toy/{toy.fingerprint}  (docs 6" in out
    assert "head     (first 2 rows)\n  [0]\n    x: 0\n  [1]\n    x: 0" in out
    assert main(["inspect", "--json", dbl.path]) == 0
    assert json.loads(capsys.readouterr().out) == dbl.manifest


def test_inspect_stage_folder_and_workdir(toy_workdir, capsys):
    work, toy, dbl = toy_workdir
    assert main(["inspect", str(work / "toy")]) == 0
    out = capsys.readouterr().out
    assert "(1 dataset)" in out and f"  {toy.fingerprint}  {toy.manifest['created_at']}  docs 6" in out
    assert "0123456789abcdef  (unfinished" in out
    assert main(["inspect", str(work)]) == 0
    out = capsys.readouterr().out
    assert "(2 stages)" in out and "  double       1 dataset; newest" in out and "  toy          1 dataset, 1 unfinished" in out


def test_inspect_refuses_other_paths(toy_workdir, tmp_path, capsys):
    work, toy, dbl = toy_workdir
    (tmp_path / "file.txt").write_text("x")
    for path in (tmp_path / "file.txt", tmp_path / "missing", work / "toy" / ".staging-0123456789abcdef"):
        assert main(["inspect", str(path)]) == 2
        assert "not a dataset" in capsys.readouterr().err
    assert main(["inspect", "--head", "1", str(work)]) == 2
