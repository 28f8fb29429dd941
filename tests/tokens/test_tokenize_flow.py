"""Acceptance of the tokenize flow through the CLI: `refinery run tokenize --set input=DOCS --json`
writes Arrow files plain pyarrow opens, whose token sum is the manifest's total, and a manifest that
names a tokenizer folder AutoTokenizer loads."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from refinery.flows.tokenize import TokenizeParams
from refinery_testlib import read_exec_log
from tests.tokens.conftest import make_docs



def test_params_model():
    p = TokenizeParams.model_validate({"input": "d", "tokenizer": {"vocab_size": 512}, "tokenize": {"dtype": "uint32"}})
    assert p.tokenizer.vocab_size == 512 and p.tokenizer.path is None and p.tokenize.dtype == "uint32"
    assert p.tokenizer.sentinels == 100


def test_cli_run_tokenize(tmp_path, prose_texts, exec_log, capsys, monkeypatch):
    """The CLI's own code path (``refinery.flows.cli.main``, in this process, so the Prefect database is the
    already-migrated one), then the flow again from Python: served from the cache."""
    from transformers import AutoTokenizer

    from refinery.flows.cli import main
    from refinery.flows.tokenize import tokenize_flow

    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    docs = make_docs(tmp_path / "in", prose_texts, parts=2)
    work = tmp_path / "work"
    assert main(["run", "tokenize", "--set", f"input={docs.path}", "--set", "tokenizer.vocab_size=400",
                 "--set", "tokenize.max_tokens_per_file=5000", "--workdir", str(work), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["outputs"]) == {"tokenizer", "holdout", "tokenize"}   # holdout: the held-out documents
    tok_path = Path(out["outputs"]["tokenize"])
    manifest = json.loads((tok_path / "manifest.json").read_text())
    # 1. plain pyarrow opens every Arrow file; 2. their tokens add up to the manifest's total
    total = 0
    arrow_files = sorted(tok_path.glob("*.arrow"))
    assert len(arrow_files) == len(manifest["token_files"]) > 1
    for f in arrow_files:
        with pa.memory_map(str(f)) as m:
            total += ipc.open_file(m).read_all().num_rows
    assert total == manifest["total_tokens"] == out["counts"]["tokenize"]["tokens"] > 0
    # 3. the manifest names a tokenizer folder that AutoTokenizer loads
    tok = AutoTokenizer.from_pretrained(manifest["tokenizer"]["path"])
    assert tok.eos_token_id == manifest["eos_id"] and len(tok) == manifest["vocab_size"] == 400
    assert manifest["tokenizer"]["path"] == out["outputs"]["tokenizer"]
    log = read_exec_log(exec_log)
    assert sorted({line.split()[0] for line in log}) == ["holdout", "tokenize", "tokenizer"]

    again = tokenize_flow.run_params(TokenizeParams(input=docs.path, workdir=str(work),
                                                    tokenizer={"vocab_size": 400},
                                                    tokenize={"max_tokens_per_file": 5000}))
    assert list(again["outputs"]) == ["holdout", "tokenizer", "tokenize"]  # the token dataset is the primary (last) output
    assert again["outputs"] == out["outputs"] and read_exec_log(exec_log) == log  # cached: nothing ran
