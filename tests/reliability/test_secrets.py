"""Secrets stay secret: credentials come from the environment; a curate run reading from S3 (a
local moto server) with secret AWS_* variables set leaves no trace of them in the workdir
(manifests, dataset cards, Parquet parts, .prefect-results), in Prefect's database and home, or in
what the run printed; a config that carries a credential is refused without echoing it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REFINERY = str(Path(sys.executable).parent / "refinery")


def _files_holding(folder: Path, needles: list[bytes]) -> list[str]:
    """Every file under ``folder`` whose bytes contain one of ``needles`` (raw and as hex)."""
    hits = []
    for p in folder.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            if any(n in data or n.hex().encode() in data for n in needles):
                hits.append(str(p.relative_to(folder)))
    return hits


@pytest.fixture
def s3_docs(shared_data):
    """A moto S3 server with one bucket holding a small JSONL dump; yields its endpoint URL."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        import s3fs

        fs = s3fs.S3FileSystem(key="x", secret="x", client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("corpus")
        rows = [json.loads(line) for line in
                (shared_data / "quality" / "dclm-majority.jsonl").read_text().splitlines()[:40]]
        fs.pipe("corpus/docs.jsonl", "".join(json.dumps({"text": r["text"], "url": f"https://e.org/{i}"}) + "\n"
                                             for i, r in enumerate(rows)).encode())
        yield endpoint
    finally:
        server.stop()


def test_the_search_finds_a_planted_secret(tmp_path):
    """Control for the searches below: raw and hex-encoded copies are found."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.json").write_text('{"k": "plain-needle"}')
    (tmp_path / "y.bin").write_bytes(b"..." + b"hex-needle".hex().encode())
    assert sorted(_files_holding(tmp_path, [b"plain-needle", b"hex-needle"])) == ["a/x.json", "y.bin"]


@pytest.mark.slow
def test_no_secret_in_workdir_database_or_output(s3_docs, tmp_path):
    key_id = "AKIA" + uuid.uuid4().hex[:16].upper()
    secret = "s3cr3t-" + uuid.uuid4().hex
    token = "t0k3n-" + uuid.uuid4().hex
    home, work = tmp_path / "prefect-home", tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL",)}
    env.update(PREFECT_HOME=str(home), AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret,
               AWS_SESSION_TOKEN=token, AWS_DEFAULT_REGION="us-east-1", PREFECT_LOGGING_LEVEL="DEBUG")
    args = [REFINERY, "run", "curate", "--set", "input=s3://corpus/docs.jsonl", "--set", "source=s3",
            "--set", f"ingest.storage_options.client_kwargs.endpoint_url={s3_docs}", "--workdir", str(work),
            "--json"]
    r = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    ingest = Path(out["outputs"]["ingest"])
    manifest = json.loads((ingest / "manifest.json").read_text())
    assert manifest["counts"]["docs_out"] == 40          # the credentials worked
    assert (work / ".prefect-results").is_dir() and any((work / ".prefect-results").iterdir())
    needles = [key_id.encode(), secret.encode(), token.encode()]
    assert _files_holding(work, needles) == []
    assert _files_holding(home, needles) == []            # Prefect's database: parameters, logs, results
    for stream in (r.stdout, r.stderr):
        assert key_id not in stream and secret not in stream and token not in stream
    # fingerprints do not depend on credentials: other keys, same datasets, no work
    env2 = {**env, "AWS_SECRET_ACCESS_KEY": secret + "-rotated", "REFINERY_EXEC_LOG": str(tmp_path / "exec.log")}
    r2 = subprocess.run(args, env=env2, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-4000:]
    assert json.loads(r2.stdout.strip().splitlines()[-1])["outputs"] == out["outputs"]
    assert not (tmp_path / "exec.log").exists()


@pytest.mark.parametrize("setting", ["ingest.storage_options.secret", "ingest.storage_options.key",
                                     "ingest.storage_options.client_kwargs.aws_session_token"])
def test_a_credential_in_the_config_is_refused_without_echoing_it(tmp_path, setting):
    value = "hush-" + uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL",)}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    r = subprocess.run([REFINERY, "run", "curate", "--set", "input=s3://b/x.jsonl", "--set", f"{setting}={value}",
                        "--workdir", str(tmp_path / "w")], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    assert "look(s) like credentials" in r.stderr and "AWS_" in r.stderr
    assert value not in r.stderr and value not in r.stdout
    assert not (tmp_path / "home").exists() or not _files_holding(tmp_path / "home", [value.encode()])


@pytest.mark.parametrize("flow,sets", [
    ("curate", ["input=https://alice:{pw}@crawl.example/x.warc.gz"]),
    ("curate", ["input=data/a.jsonl", "workdir=s3://bob:{pw}@bucket/refinery"]),
    ("finetune", ["input=m", "data=https://carol:{pw}@files.example/sft.json"]),
    ("curate", ["input=https://{pw}@crawl.example/x.warc.gz"]),          # a bare token, no password
    ("finetune", ["input=m", "data=s3://{pw}@bucket/sft.json"]),
])
def test_a_password_in_any_flow_parameter_is_refused_before_anything_runs(flow, sets):
    """Every flow's parameters (FlowParams) refuse URLs with credentials (user:password@, or a bare
    token@) in any field, nested sections included, at validation: before a server starts or
    Prefect stores the parameters."""
    from refinery.flows.cli import build_params, load_flow

    pw = "hush-" + uuid.uuid4().hex
    with pytest.raises(SystemExit) as e:
        build_params(load_flow(flow), None, [s.format(pw=pw) for s in sets], None)
    assert "carries credentials" in str(e.value) and pw not in str(e.value)
