"""The ``synth`` stage (refinery.tasks.synth): synthetic records from curated-like documents (real C4
text from the shared data) on a tiny local model through the rollout engine, and through
OpenAI-compatible endpoints on 127.0.0.1: ``refinery serve`` in this process, and a stub that fails
on purpose. Its outputs are read by the finetune, align and tokenize readers in-process."""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refinery.tasks.store import Store, fingerprint
from refinery_testlib import read_exec_log, serving, shared_file

MODEL_ID = "tiny-chat"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
N_DOCS = 5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a machine shared by many processes, OpenMP's spinning threads make the
    tiny model's forwards 10-25x slower than one thread does."""
    import torch

    was = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(was)


@pytest.fixture(scope="module")
def texts(shared_data) -> list[str]:
    """The first C4 documents of the shared data (already filtered: curated-like text)."""
    path = shared_file(shared_data, "quality/c4-demo.jsonl")
    with open(path) as f:
        return [json.loads(line)["text"] for _, line in zip(range(N_DOCS), f)]


def make_docs(root, texts: list, parts: int = 2):
    """A complete documents dataset (ARCHITECTURE.md, section 4 columns) of ``texts`` plus one
    document without text, in ``parts`` parts."""
    texts = [*texts, ""]
    ids = [hashlib.sha1(t.encode()).hexdigest()[:16] for t in texts]
    store = Store(root)
    fp = fingerprint("docs", "1", {}, ids)
    b = store.builder("docs", fp)
    n = len(texts)
    for p in range(parts):
        lo, hi = p * n // parts, (p + 1) * n // parts
        b.write_table(f"part-{p:05d}.train.parquet", pa.table({
            "id": pa.array(ids[lo:hi], pa.string()), "text": pa.array(texts[lo:hi], pa.string()),
            "url": pa.array([f"https://example.org/{i}" for i in range(lo, hi)], pa.string()),
            "source": pa.array(["c4"] * (hi - lo)), "crawl_date": pa.array([None] * (hi - lo), pa.string()),
            "lang": pa.array(["en"] * (hi - lo)), "lang_score": pa.array([1.0] * (hi - lo)),
            "metadata": pa.array(["{}"] * (hi - lo))}))
    return b.publish(version="1", config={}, inputs=[], counts={"docs_out": n})


@pytest.fixture(scope="module")
def model_dir(tiny_causal_lm_dir, tmp_path_factory) -> Path:
    """The tiny random Llama with a chat template and a longer context (its rotary positions allow
    it), so a prompt holding a document fits."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("synth_model") / "m"
    shutil.copytree(tiny_causal_lm_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["max_position_embeddings"] = 1024
    (out / "config.json").write_text(json.dumps(cfg))
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return out


def cfg_of(**kw):
    from refinery.tasks.synth.stage import SynthConfig

    return SynthConfig(**{"max_new_tokens": 8, "max_doc_chars": 200, "docs_per_shard": 2, "device": "cpu",
                          "retry_backoff": 0.01, **kw})


def table(ds):
    return ds.read_table()


def failures(ds):
    files = [ds.file(f["path"]) for f in ds.manifest["files"] if f["path"].startswith("failures/")]
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


# --------------------------------------------------------------------------- local model (rollout engine)
def test_instructions_on_a_local_model_are_sft_records_deterministic_and_cached(tmp_path, texts, model_dir, exec_log):
    from refinery.tasks.finetune.data import read_examples
    from refinery.tasks.synth.stage import Synth

    docs = make_docs(tmp_path / "w", texts)
    cfg = cfg_of(model=str(model_dir), task="instructions")
    ds = Synth.run(tmp_path / "w", [docs], cfg)
    c = ds.counts
    assert c["docs_in"] == N_DOCS + 1 and c["docs_out"] + c["failed"] == c["docs_in"] and c["docs_out"] >= 3, c
    assert c["failed_by_reason"].get("no_text") == 1 and c["requests"] == 2 * N_DOCS
    assert c["tokens_spent"] == c["prompt_tokens"] + c["completion_tokens"] > 0
    rows = table(ds).to_pylist()
    source = {r["id"]: r for r in docs.read_table().to_pylist()}
    for r in rows:   # lineage: the document's id, source and url
        assert (r["source"], r["url"]) == (source[r["id"]]["source"], source[r["id"]]["url"])
        assert r["messages"] == [{"role": "user", "content": r["instruction"]},
                                 {"role": "assistant", "content": r["response"]}]
        assert json.loads(r["metadata"])["synth"]["task"] == "instructions"
    fail = failures(ds).to_pylist()
    assert [f["reason"] for f in fail if f["step"] == "input"] == ["no_text"]
    # the finetune reader takes the dataset folder as its data
    examples, report = read_examples(ds.path)
    assert len(examples) == c["docs_out"] and report.bad == 0 and report.formats == {"openai": c["docs_out"]}
    # deterministic on CPU: another workdir builds the same bytes
    again = Synth.run(tmp_path / "w2", [make_docs(tmp_path / "w2", texts)], cfg)
    assert again.fingerprint == ds.fingerprint
    assert [f["sha256"] for f in again.manifest["files"]] == [f["sha256"] for f in ds.manifest["files"]]
    # cached: a rerun does no work
    before = len(read_exec_log(exec_log))
    assert Synth.run(tmp_path / "w", [docs], cfg).cached
    assert len(read_exec_log(exec_log)) == before


def test_a_crashed_run_redoes_only_its_unfinished_shards(tmp_path, texts, model_dir, exec_log, monkeypatch):
    from refinery.tasks.runtime import ShardsFailed
    from refinery.tasks.synth import stage as synth_stage

    docs = make_docs(tmp_path / "w", texts)
    cfg = cfg_of(model=str(model_dir), task="rephrase", style="qa")
    real = synth_stage.read_docs

    def crash_on_the_last(path, file, lo, hi):
        if file.endswith("part-00001.train.parquet") and lo == 2:
            raise OSError("the machine went away")
        return real(path, file, lo, hi)

    monkeypatch.setattr(synth_stage, "read_docs", crash_on_the_last)
    with pytest.raises(ShardsFailed, match="the machine went away"):
        synth_stage.Synth.run(tmp_path / "w", [docs], cfg)
    done = [ln for ln in read_exec_log(exec_log) if ln.count(" ") == 2]
    monkeypatch.setattr(synth_stage, "read_docs", real)
    ds = synth_stage.Synth.run(tmp_path / "w", [docs], cfg)
    redone = [ln for ln in read_exec_log(exec_log) if ln.count(" ") == 2][len(done):]
    assert [ln.split()[-1] for ln in redone] == ["part-00001-00001"]   # only the shard that crashed
    # rephrased documents are documents: `text` with lineage, which tokenize reads
    t = table(ds)
    assert {"id", "text", "url", "source", "metadata"} <= set(t.column_names) and t.num_rows == ds.counts["docs_out"]
    assert json.loads(t.column("metadata")[0].as_py())["synth"]["style"] == "qa"
    from refinery.tasks.tokens.stage import Tokenize, TokenizeConfig
    from refinery.tasks.tokens.tokenizer import TokenizerConfig, tokenizer_stage

    tok = tokenizer_stage.run(tmp_path / "w", [], TokenizerConfig(path=str(model_dir)))
    tokens = Tokenize.run(tmp_path / "w", [ds, tok], TokenizeConfig())
    assert tokens.counts["docs_out"] == ds.counts["docs_out"] and tokens.counts["tokens"] > 0, tokens.counts


def test_preference_pairs_load_into_align_and_the_budget_holds(tmp_path, texts, model_dir):
    from refinery.tasks.align.data import load_pairs
    from refinery.tasks.synth.stage import Synth

    docs = make_docs(tmp_path / "w", texts)
    ds = Synth.run(tmp_path / "w", [docs], cfg_of(model=str(model_dir), task="preferences"))
    rows = table(ds).to_pylist()
    assert rows and all(r["chosen"] != r["rejected"] for r in rows)
    pairs, counts = load_pairs(ds.path)
    assert len(pairs) == ds.counts["docs_out"] and counts["skipped"] == {}
    assert [p.prompt[-1][1] for p in pairs] == [r["prompt"] for r in rows]
    # a budget for about half the work: some documents are skipped, the budget is never exceeded
    budget = ds.counts["tokens_spent"] * 6 // 10
    part = Synth.run(tmp_path / "w", [docs], cfg_of(model=str(model_dir), task="preferences", token_budget=budget,
                                                    docs_per_shard=3))
    c = part.counts
    assert c["skipped_budget"] > 0 and c["docs_out"] > 0 and c["tokens_spent"] <= budget, c
    assert c["docs_out"] + c["failed"] + c["skipped_budget"] == c["docs_in"]
    assert part.manifest["token_budget"]["limit"] == budget


# --------------------------------------------------------------------------- OpenAI-compatible endpoints
@contextlib.contextmanager
def refinery_serve(model_path: str):
    """``refinery serve`` for the model, in this process, on 127.0.0.1 (a free port): its /v1 URL."""
    from refinery.tasks.eval.generate import load_model

    with serving(load_model(model_path, "cpu"), MODEL_ID, max_concurrency=1) as (url, _):
        yield url


def test_against_refinery_serve_the_records_are_the_local_models(tmp_path, texts, model_dir, monkeypatch):
    """Greedy through the server gives the rollout engine's records, and the key
    from the environment reaches the server without landing in the dataset."""
    from refinery.tasks.serve import API_KEY_ENV
    from refinery.tasks.synth.stage import Synth

    monkeypatch.setenv(API_KEY_ENV, "serve-secret-key")
    monkeypatch.setenv("REFINERY_SYNTH_API_KEY", "serve-secret-key")
    docs = make_docs(tmp_path / "w", texts[:3], parts=1)
    with refinery_serve(str(model_dir)) as url:
        assert url.startswith("http://127.0.0.1:")
        remote = Synth.run(tmp_path / "w", [docs], cfg_of(model=MODEL_ID, base_url=url, concurrency=2))
    local = Synth.run(tmp_path / "w", [docs], cfg_of(model=str(model_dir)))
    cols = ["id", "instruction", "response"]
    assert table(remote).select(cols).to_pylist() == table(local).select(cols).to_pylist()
    assert remote.counts["prompt_tokens"] == local.counts["prompt_tokens"]   # the server's usage
    assert remote.manifest["generator"] == {"kind": "endpoint", "model": MODEL_ID, "base_url": url}
    published = "".join(p.read_text(errors="replace") for p in Path(remote.path).rglob("*") if p.is_file())
    assert "serve-secret-key" not in published


class Stub:
    """An OpenAI-compatible stub on 127.0.0.1: ``fail_first`` requests get 503, then every request
    is answered by ``answer(user text) -> (status, content)``; it keeps the headers it saw."""

    def __init__(self, answer, fail_first: int = 0, delay: float = 0.0):
        self.answer, self.fail_first, self.calls, self.auth = answer, fail_first, 0, set()
        self.delay, self.in_flight, self.most_in_flight, self.lock = delay, 0, 0, threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.calls += 1
                    n = stub.calls
                    stub.in_flight += 1
                    stub.most_in_flight = max(stub.most_in_flight, stub.in_flight)
                stub.auth.add(self.headers.get("Authorization"))
                try:
                    time.sleep(stub.delay)
                    self.answer(body, n)
                finally:
                    with stub.lock:
                        stub.in_flight -= 1

            def answer(self, body, n):
                if n <= stub.fail_first:
                    return self.reply(503, {"error": {"message": "overloaded"}})
                status, content = stub.answer(body["messages"][-1]["content"])
                if status != 200:
                    return self.reply(status, {"error": {"message": content}})
                self.reply(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                              "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": 7, "completion_tokens": 3}})

            def reply(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def echo(user: str) -> tuple[int, str]:
    return 200, "Q: " + hashlib.sha1(user.encode()).hexdigest()[:8]


def test_transient_errors_are_retried_and_never_cached(tmp_path, texts, monkeypatch):
    from refinery.tasks.runtime import ShardsFailed
    from refinery.tasks.synth.stage import Synth

    monkeypatch.delenv("REFINERY_SYNTH_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    docs = make_docs(tmp_path / "w", texts[:2], parts=1)
    with Stub(echo, fail_first=3) as stub:   # the first 3 attempts fail, the retries then succeed
        ds = Synth.run(tmp_path / "w", [docs], cfg_of(model="m", base_url=stub.url, concurrency=1))
    assert ds.counts["retries"] == 3 and ds.counts["docs_out"] == 2 and stub.calls == 3 + 2 * 2
    assert stub.auth == {"Bearer sk-from-the-environment"}
    # down for good: the shard fails after its retries and is not recorded, so a rerun redoes it
    cfg = cfg_of(model="m", base_url=stub.url, request_retries=1, task="rephrase")
    with Stub(echo, fail_first=10**6) as down:
        cfg = cfg.model_copy(update={"base_url": down.url})
        with pytest.raises(ShardsFailed, match="still failing after 2 attempts"):
            Synth.run(tmp_path / "w", [docs], cfg)
    assert Store(tmp_path / "w").builder("synth", Synth.fingerprint([docs], cfg)).shard_result("part-00000-00000") is None


def test_failures_are_recorded_per_document_and_a_refusal_stops_the_stage(tmp_path, texts):
    from refinery.tasks.runtime import ShardsFailed
    from refinery.tasks.synth.stage import Synth

    marker = texts[1][:40]

    def picky(user: str) -> tuple[int, str]:
        if marker in user:
            return 400, "this document is over the context"
        if texts[2][:40] in user:
            return 200, "   "
        return echo(user)

    docs = make_docs(tmp_path / "w", texts[:4], parts=1)
    with Stub(picky, delay=0.2) as stub:   # slow replies: the documents' requests overlap
        ds = Synth.run(tmp_path / "w", [docs], cfg_of(model="m", base_url=stub.url, task="rephrase", concurrency=2,
                                                      docs_per_shard=4))
    assert stub.most_in_flight == 2   # bounded concurrency: 4 requests, at most 2 at once
    c = ds.counts
    assert c["docs_out"] == 2 and c["failed_by_reason"] == {"refused": 1, "empty_output": 1, "no_text": 1}, c
    fail = {f["reason"]: f for f in failures(ds).to_pylist()}
    assert "over the context" in fail["refused"]["error"] and fail["refused"]["url"].startswith("https://example.org/")
    with Stub(lambda user: (401, "bad key")) as stub:
        with pytest.raises(ShardsFailed, match="refused the request"):
            Synth.run(tmp_path / "w", [docs], cfg_of(model="other", base_url=stub.url, task="rephrase"))
    # every request refused alike is the setup's fault: nothing recorded, so a fixed server is asked again
    cfg = cfg_of(model="no-template", base_url="http://127.0.0.1:1/v1", task="rephrase", docs_per_shard=4)
    with Stub(lambda user: (400, "this model's tokenizer has no chat template")) as stub:
        cfg = cfg.model_copy(update={"base_url": stub.url})
        with pytest.raises(ShardsFailed, match="every one of 4 requests was refused"):
            Synth.run(tmp_path / "w", [docs], cfg)
    assert Store(tmp_path / "w").builder("synth", Synth.fingerprint([docs], cfg)).shard_result("part-00000-00000") is None
