"""Flow-level caching: a rerun does no stage work in the same process, in a new process and after
the Prefect database is deleted; a config change reruns that stage and what follows, nothing before.
Executions are counted through REFINERY_EXEC_LOG, not timed."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from refinery_testlib import read_exec_log

ROOT = Path(__file__).resolve().parents[2]
REFINERY = str(Path(sys.executable).parent / "refinery")


@pytest.fixture
def docs_jsonl(tmp_path, shared_data) -> Path:
    """Real web documents (DCLM annotated sample) with two planted exact duplicates."""
    rows = [json.loads(l) for l in (shared_data / "quality" / "dclm-majority.jsonl").read_text().splitlines()[:120]]
    rows += rows[:2]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": r["text"], "url": f"https://example.org/{i}"}) + "\n"
                            for i, r in enumerate(rows)))
    return path


def run_cli(args, env, log: list | None = None) -> dict:
    r = subprocess.run([REFINERY, *args, "--json"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    if log is not None:
        log.append(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def summary_seconds(stderr: str) -> dict[str, str]:
    """stage -> the seconds column of the printed "== curate: stages" table."""
    lines = stderr[stderr.rindex("== curate: stages"):].splitlines()[1:]
    cols = lines[0].split()
    out = {}
    for line in lines[2:]:
        cells = line.split()
        if not cells or cells[0] not in ("ingest", "filter", "minhash", "lsh_bands", "dedup"):
            break
        out[cells[0]] = cells[-2]  # the column before the fingerprint
    assert cols[-2:] == ["seconds", "fingerprint"]
    return out


def stages_run(log: Path, since: int) -> list[str]:
    return sorted({line.split()[0] for line in read_exec_log(log)[since:]})


def test_rerun_new_process_and_wiped_prefect_db_do_no_work(tmp_path, docs_jsonl, exec_log):
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "REFINERY_EXEC_LOG": str(exec_log)}
    env = {k: v for k, v in env.items() if k not in ("PREFECT_API_URL",)}
    work = tmp_path / "work"
    args = ["run", "curate", "--set", f"input={docs_jsonl}", "--set", "source=dclm", "--workdir", str(work)]

    logs: list[str] = []
    first = run_cli(args, env, logs)
    assert set(first["outputs"]) >= {"ingest", "filter"}
    assert first["primary"] == first["outputs"]["dedup"] == list(first["outputs"].values())[-1]
    assert "cached" not in summary_seconds(logs[-1]).values()
    for stage, path in first["outputs"].items():
        assert (Path(path) / "manifest.json").exists(), stage
    n = len(read_exec_log(exec_log))
    assert stages_run(exec_log, 0) == sorted(first["outputs"])

    # a new process, with the Prefect database and result storage gone: the stages are found in the
    # workdir by fingerprint, and the summary says so (not the seconds their first build took)
    shutil.rmtree(home)
    again = run_cli(args, env, logs)
    assert again["outputs"] == first["outputs"]
    assert len(read_exec_log(exec_log)) == n
    assert set(summary_seconds(logs[-1]).values()) == {"cached"}

    # Change the last stage's config (which document of a cluster is kept): only it reruns.
    changed = run_cli(args + ["--set", "dedup.keep_rule=[id]"], env, logs)
    assert stages_run(exec_log, n) == ["dedup"]
    secs = summary_seconds(logs[-1])
    assert secs["ingest"] == secs["filter"] == "cached" and secs["dedup"] != "cached"
    assert changed["outputs"]["dedup"] != first["outputs"]["dedup"]
    for stage in ("ingest", "filter", "minhash"):
        assert changed["outputs"][stage] == first["outputs"][stage]

    # inspect --json prints the manifest
    r = subprocess.run([REFINERY, "inspect", "--json", first["outputs"]["ingest"]], capture_output=True, text=True, env=env)
    assert json.loads(r.stdout)["stage"] == "ingest"


def test_same_process_rerun_and_upstream_config_change(tmp_path, docs_jsonl, exec_log):
    from refinery.flows.curate import CurateParams, curate_flow

    p = CurateParams(input=str(docs_jsonl), workdir=str(tmp_path / "w"))
    first = curate_flow.run_params(p)
    n = len(read_exec_log(exec_log))
    assert curate_flow.run_params(p)["outputs"] == first["outputs"]
    assert len(read_exec_log(exec_log)) == n
    # A filter change reruns filter and everything after it, not ingest.
    p2 = p.model_copy(update={"filters": p.filters.model_copy(update={"write_exclusions": not p.filters.write_exclusions})})
    second = curate_flow.run_params(p2)
    rerun = stages_run(exec_log, n)
    assert "ingest" not in rerun and "filter" in rerun
    assert second["outputs"]["ingest"] == first["outputs"]["ingest"]
