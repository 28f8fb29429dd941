"""The command line's failures and signals: short messages, fast pre-flight checks, strict JSON,
--print-config, and SIGTERM ending a run promptly (README: "When something goes wrong")."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refinery.flows.cli import dumps, emit, main, strict_json

REFINERY = str(Path(sys.executable).parent / "refinery")
ENV = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "REFINERY_DEBUG": ""}


def _run(args, cwd, timeout=120):
    t0 = time.perf_counter()
    r = subprocess.run([REFINERY, *args], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=timeout)
    return r, time.perf_counter() - t0


@pytest.mark.parametrize("case", ["curate-glob", "finetune-input", "finetune-data", "align-data"])
def test_missing_input_fails_fast_with_a_short_message(tmp_path, case):
    data = tmp_path / "sft.json"
    data.write_text("[]")
    args, param = {
        "curate-glob": (["run", "curate", "--set", f"input={tmp_path}/crawl/*.warc.gz"], "input"),
        "finetune-input": (["run", "finetune", "--set", "input=./no-such-model", "--set", f"data={data}"], "input"),
        "finetune-data": (["run", "finetune", "--set", "input=sshleifer/tiny-gpt2", "--set", "data=missing-sft.json"], "data"),
        "align-data": (["run", "align", "--set", "input=org/model", "--set", "data=./missing-pairs.jsonl"], "data"),
    }[case]
    r, seconds = _run([*args, "--workdir", str(tmp_path / "w")], cwd=tmp_path)
    print(f"{case}: {seconds:.2f} s, {len(r.stderr.splitlines())} stderr lines:\n{r.stderr}")
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 6, r.stderr
    assert re.search(rf"\b{param}\b", lines[0]) and "Traceback" not in r.stderr
    assert "what to do" in r.stderr
    assert seconds < 10          # under 2 s on an idle machine; generous for a loaded one
    assert not (tmp_path / "w").exists()   # nothing started


def test_debug_shows_the_traceback(tmp_path):
    r, _ = _run(["run", "curate", "--set", f"input={tmp_path}/none/*.warc.gz", "--debug"], cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" in r.stderr and "PathProblem" in r.stderr


def test_usage_error_exits_2(tmp_path):
    (tmp_path / "x.warc.gz").write_bytes(b"")
    r, _ = _run(["run", "curate", "--set", "input=x.warc.gz", "--set", "dedupe.bands=3"], cwd=tmp_path)
    assert r.returncode == 2 and "did you mean" in r.stderr and "Traceback" not in r.stderr


def test_hub_ids_and_urls_are_not_checked_locally():
    from refinery.flows.paths import PathProblem, looks_local, preflight

    assert not looks_local("gpt2") and not looks_local("sshleifer/tiny-gpt2")
    assert looks_local("./model") and looks_local("/models/x") and looks_local("~/m") and looks_local("w/pretrain/abc")
    preflight("finetune", {"input": "org/name", "data": "s3://bucket/sft.json"})
    preflight("curate", {"input": "s3://bucket/crawl/*.warc.gz,https://example.org/a.warc.gz"})
    with pytest.raises(PathProblem, match="init_from"):
        preflight("pretrain", {"input": "s3://b/t", "init_from": "/no/such/model"})
    with pytest.raises(PathProblem, match=r"pretrain\.init_from"):
        preflight("pipeline", {"input": "s3://b/*.warc.gz", "data": "s3://b/sft.json",
                               "pretrain": {"init_from": "./nope"}})


def test_params_model_checks_paths_when_asked(tmp_path):
    from pydantic import ValidationError

    from refinery.flows.finetune import FinetuneParams

    FinetuneParams(input="./missing", data="missing.json")   # Python callers: as before
    with pytest.raises(ValidationError, match="no such file: missing.json"):
        FinetuneParams.model_validate({"input": "org/m", "data": "missing.json"}, context={"check_paths": True})


def test_json_output_is_strict(capsys):
    out = {"outputs": {"pretrain": "/w/pretrain/fp"}, "counts": {"pretrain": {"loss": float("nan"),
                                                                              "best": float("inf"), "steps": 3}}}
    emit(out, as_json=True)
    line = capsys.readouterr().out.strip().splitlines()[-1]

    def refuse(c):
        raise ValueError(c)

    parsed = json.loads(line, parse_constant=refuse)
    assert parsed["counts"]["pretrain"] == {"loss": None, "best": None, "steps": 3}
    assert parsed["primary"] == "/w/pretrain/fp"
    assert strict_json((1.0, float("-inf"))) == [1.0, None]
    assert "NaN" not in dumps({"x": [float("nan")]})


def test_tidy_rows_format_numbers_and_leave_out_empty_columns():
    from refinery.flows.common import tidy_rows

    rows = tidy_rows([{"steps": 300, "tokens_per_sec": 1066.9422, "mfu": None, "val": 4.93127, "note": ""}])
    assert rows == [{"steps": 300, "tokens_per_sec": "1067", "val": "4.931"}]


def test_help_shows_none_where_none_is_allowed(capsys):
    assert main(["run", "finetune", "--help"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  lr: float \| None", out, re.M), out


def test_print_config_prints_resolved_parameters_without_running(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sft.json").write_text("[]")
    assert main(["run", "finetune", "--set", "input=org/model", "--set", "data=sft.json", "--set", "method=ia3",
                 "--workdir", str(tmp_path / "w"), "--print-config", "--json"]) == 0
    cfg = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cfg["input"] == "org/model" and cfg["method"] == "ia3" and cfg["lr"] == 3e-3 and cfg["lora"]["r"] == 8
    assert not (tmp_path / "w").exists()
    (tmp_path / "crawl").mkdir()
    (tmp_path / "crawl" / "a.warc.gz").write_bytes(b"")
    r, seconds = _run(["run", "curate", "--set", "input=crawl/*.warc.gz", "--print-config"], cwd=tmp_path)
    import yaml

    data = yaml.safe_load(r.stdout)
    assert r.returncode == 0 and data["input"] == "crawl/*.warc.gz" and "dedup" in data, r.stderr
    print(f"--print-config: {seconds:.2f} s")


@pytest.mark.parametrize("case", ["curate-glob", "finetune-input", "finetune-data", "evaluate-data"])
def test_print_config_checks_local_paths_as_a_run_does(tmp_path, capsys, monkeypatch, case):
    """--print-config prints a configuration that would start: a wrong local path fails there with
    the run's message and exit status, and nothing is printed on stdout."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sft.json").write_text("[]")
    args, param, message = {
        "curate-glob": (["run", "curate", "--set", "input=crawl/*.warc.gz"], "input", "matches no file"),
        "finetune-input": (["run", "finetune", "--set", "input=./no-such-model", "--set", "data=sft.json"], "input",
                           "no such model folder"),
        "finetune-data": (["run", "finetune", "--set", "input=org/model", "--set", "data=missing.json"], "data",
                          "no such file"),
        "evaluate-data": (["run", "evaluate", "--set", "input=org/model", "--set", "data=W/holdout/abc"], "data",
                          "no such dataset"),
    }[case]
    assert main([*args, "--print-config"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"refinery run {args[1]}: {param}: ") and message in err, err
    assert main([*args, "--print-config", "--json"]) == 1   # JSON or YAML, the same check
    assert capsys.readouterr().out == ""


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
def test_sigterm_ends_a_run_promptly_without_traceback(tmp_path):
    from refinery.tasks.demo.crawl import make_demo_crawl

    make_demo_crawl(tmp_path / "crawl", n_pages=1500, n_files=8)
    p = subprocess.Popen([REFINERY, "run", "curate", "--set", f"input={tmp_path}/crawl/*.warc.gz",
                          "--workdir", str(tmp_path / "w")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV, start_new_session=True)
    lines, port = [], None
    assert p.stderr is not None
    for line in p.stderr:   # until the flow run has begun
        lines.append(line)
        m = re.search(r"temporary server on http://127\.0\.0\.1:(\d+)", line)
        port = int(m.group(1)) if m else port
        if "Beginning flow run" in line:
            break
    time.sleep(1.0)
    t0 = time.perf_counter()
    os.killpg(p.pid, signal.SIGTERM)    # the whole process group, as `timeout -s TERM` does
    try:
        _, rest = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    seconds = time.perf_counter() - t0
    stderr = "".join(lines) + rest
    print(f"exit {p.returncode} {seconds:.2f} s after SIGTERM:\n{stderr[-2000:]}")
    if p.returncode == 0:
        pytest.skip("the run finished before the signal")
    assert p.returncode == 143 and seconds < 10
    assert "Traceback" not in stderr and "ConnectError" not in stderr
    assert "stopped by SIGTERM" in stderr
    if port:   # the temporary server went with the command
        deadline = time.monotonic() + 15
        while not _free(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _free(port)
