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
