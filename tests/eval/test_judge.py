"""Pairwise judging (refinery.tasks.eval.judge): the position-bias rule, the Wilson intervals, an
OpenAI-compatible judge (a scripted stub, and ``refinery serve``'s server on a tiny model, both on
127.0.0.1 in this process), a local judge, and the evaluate stage and flow parameters around them."""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from refinery_testlib import serving

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


# --------------------------------------------------------------------------- the rule and the numbers
def test_a_pair_counts_only_when_both_orders_agree():
    from refinery.tasks.eval.judge import outcome, parse_verdict

    # first ask: the candidate is A; second ask: the candidate is B
    assert outcome("A", "B") == "win" and outcome("B", "A") == "loss"
    for first, second in (("A", "A"), ("B", "B"), (None, "B"), ("A", None), (None, None)):
        assert outcome(first, second) == "tie", (first, second)
    for reply, want in (("A", "A"), (" B.", "B"), ("**A**", "A"), ("Answer B is better", "B"), ("verdict: A", "A"),
                        ("'B'", "B"), ("A\nbecause", "A"), ("(A)", "A")):
        assert parse_verdict(reply) == want, reply
    for reply in ("", "Both", "AB", "a", "Answer: neither", "Ab", "The answer is A", "A1"):
        assert parse_verdict(reply) is None, reply


def test_wilson_intervals_and_the_summary():
    from refinery.tasks.eval.judge import summarize, wilson

    # textbook values of the 95% Wilson score interval
    assert wilson(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    assert wilson(0, 0) == (0.0, 1.0)
    for k, n in ((3, 7), (40, 100), (1, 1000)):   # the interval of k/n mirrors that of (n-k)/n and holds k/n
        lo, hi = wilson(k, n)
        assert lo < k / n < hi and (1 - hi, 1 - lo) == pytest.approx(wilson(n - k, n))
        z = 1.959963984540054   # the bounds solve |p - p0| = z sqrt(p0 (1 - p0) / n)
        for p0 in (lo, hi):
            assert abs(k / n - p0) == pytest.approx(z * math.sqrt(p0 * (1 - p0) / n))
    s = summarize(["win", "tie", "tie", "loss", "win", "win"], invalid=3)
    assert (s["wins"], s["ties"], s["losses"], s["pairs"], s["invalid_verdicts"]) == (3, 2, 1, 6, 3)
    assert s["win_rate"] + s["tie_rate"] + s["loss_rate"] == pytest.approx(1.0)
    assert s["win_ci"] == list(wilson(3, 6))


class _Scripted:
    """A judge object answering each judge prompt with ``pick(answer_a, answer_b)``."""

    def __init__(self, pick):
        self.pick, self.asked = pick, []

    def replies(self, texts):
        self.asked += texts
        return [self.pick(_between(t, "[Answer A]\n", "\n\n[Answer B]"), _between(t, "[Answer B]\n", "\n\nReply"))
                for t in texts]


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def test_position_bias_cancels_and_a_fair_judge_decides():
    from refinery.tasks.eval.judge import judge_pairs

    prompts = ["p0 {braces} stay", "p1", "p2", "p3"]
    answers = {"base": ["meh", "meh", "same", "good too"],
               "cand": ["good", "good {x}", "same", "meh"]}
    always_a = _Scripted(lambda a, b: "A")
    records, summary = judge_pairs(prompts, answers, "base", always_a)
    assert summary["cand"]["ties"] == 4 and summary["cand"]["wins"] == summary["cand"]["losses"] == 0
    assert len(always_a.asked) == 6                      # identical answers (p2) are not asked
    assert "p0 {braces} stay" in always_a.asked[0] and "good {x}" in always_a.asked[2]
    fair = _Scripted(lambda a, b: "A" if "good" in a else "B")
    records, summary = judge_pairs(prompts, answers, "base", fair)
    assert [r["outcome"] for r in records] == ["win", "win", "tie", "loss"]
    assert records[0]["verdict_first"] == "A" and records[0]["verdict_second"] == "B"
    assert records[2]["reply_first"] is None and records[0]["answer"] == "good"
    assert summary["cand"]["win_rate"] == 0.5 and summary["cand"]["invalid_verdicts"] == 0
    garbage = _Scripted(lambda a, b: "hmm")
    _, summary = judge_pairs(prompts, answers, "base", garbage)
    assert summary["cand"]["ties"] == 4 and summary["cand"]["invalid_verdicts"] == 6
    with pytest.raises(ValueError, match="baseline"):
        judge_pairs(prompts, answers, "nope", fair)


def test_prompt_files(tmp_path):
    from refinery.tasks.eval.judge import read_prompts

    f = tmp_path / "p.jsonl"
    f.write_text("\n".join([json.dumps({"prompt": "one"}), "{not json", json.dumps({"question": "two"}),
                            json.dumps({"instruction": "three", "input": "ctx"}), json.dumps({"other": 1}),
                            json.dumps({"messages": [{"role": "user", "content": "four"},
                                                     {"role": "assistant", "content": "x"}]})]))
    prompts, counts = read_prompts(str(f))
    assert prompts == ["one", "two", "three\n\nctx", "four"] and counts == {"records": 6, "skipped": 2}
    t = tmp_path / "p.txt"
    t.write_text("first line\n\nsecond {x}\n")
    assert read_prompts(str(t))[0] == ["first line", "second {x}"]
    (tmp_path / "empty.jsonl").write_text(json.dumps({"other": 1}) + "\n")
    with pytest.raises(ValueError, match="no prompt"):
        read_prompts(str(tmp_path / "empty.jsonl"))


# --------------------------------------------------------------------------- an endpoint judge
@contextlib.contextmanager
def stub_judge(reply: str = "A", fail_first: int = 0, status: int = 503):
    """A scripted OpenAI-compatible judge on 127.0.0.1: every chat completion answers ``reply``
    (always position A by default), after ``fail_first`` answers of ``status``."""
    seen: dict = {"auth": [], "bodies": [], "failed": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send(200, {"object": "list", "data": [{"id": "stub-judge", "object": "model"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                seen["auth"].append(self.headers.get("Authorization"))
                fail = seen["failed"] < fail_first
                seen["failed"] += fail
                if not fail:
                    seen["bodies"].append(body)
            if fail:
                self._send(status, {"error": {"message": "busy"}})
                return
            self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                          "finish_reason": "stop"}]})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    finally:
        server.shutdown()
        server.server_close()


def test_an_endpoint_that_always_prefers_a_scores_only_ties(monkeypatch):
    from refinery.tasks.eval.judge import EndpointJudge, JudgeSpec, judge_pairs

    monkeypatch.setenv("REFINERY_JUDGE_API_KEY", "judge-s3cret")
    waits: list[float] = []
    with stub_judge("A", fail_first=3) as (url, seen):
        judge = EndpointJudge(JudgeSpec(judge=url, baseline="base", concurrency=3, retries=4, seed=5),
                              sleep=waits.append)
        records, summary = judge_pairs(["p0", "p1", "p2"], {"base": ["x", "y", "z"], "cand": ["u", "v", "w"]},
                                       "base", judge)
        judge.close()
    assert summary["cand"]["ties"] == 3 and summary["cand"]["win_rate"] == 0.0
    assert all(r["verdict_first"] == r["verdict_second"] == "A" for r in records)
    assert judge.model == "stub-judge" and judge.requests == 6 and judge.retried == 3
    assert len(waits) == 3 and set(waits) <= {0.5, 1.0, 2.0}   # a backoff after each 503
    assert set(seen["auth"]) == {"Bearer judge-s3cret"}
    body = seen["bodies"][0]
    assert body["model"] == "stub-judge" and body["temperature"] == 0 and body["seed"] == 5
    assert body["messages"][0]["role"] == "user" and "[Answer A]" in body["messages"][0]["content"]


def test_endpoint_errors_name_the_status_and_never_the_key(monkeypatch):
    from refinery.tasks.eval.judge import EndpointJudge, JudgeSpec, chat_url

    assert chat_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_url("https://api.x/v1/") == "https://api.x/v1/chat/completions"
    assert chat_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"
    monkeypatch.delenv("REFINERY_JUDGE_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-other")
    with stub_judge(fail_first=10, status=400) as (url, seen):
        judge = EndpointJudge(JudgeSpec(judge=url, model="m", baseline="b", retries=3), sleep=lambda s: None)
        with pytest.raises(ValueError, match="HTTP 400 after 1 tries") as e:
            judge.replies(["x"])
        assert "sk-other" not in str(e.value) and seen["auth"] == ["Bearer sk-other"]
    with stub_judge(fail_first=10, status=503) as (url, _):
        judge = EndpointJudge(JudgeSpec(judge=url, model="m", baseline="b", retries=2), sleep=lambda s: None)
        with pytest.raises(ValueError, match="HTTP 503 after 3 tries"):
            judge.replies(["x"])


# --------------------------------------------------------------------------- refinery serve as the judge
@pytest.fixture(scope="module")
def chat_model_dir(tiny_causal_lm_dir, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("judge_model") / "m"
    shutil.copytree(tiny_causal_lm_dir, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return out


@contextlib.contextmanager
def served(model_dir: Path):
    """``refinery serve``'s server for ``model_dir`` on 127.0.0.1 in a thread: its /v1 URL."""
    from refinery.tasks.eval.generate import load_model

    with serving(load_model(str(model_dir), "cpu"), "tiny-judge", max_concurrency=2) as (url, _):
        yield url


def test_refinery_serve_judges_as_the_same_model_does_locally(chat_model_dir, monkeypatch):
    """The served model's verdicts (its chat template, greedy) are the local judge's (the rollout engine)."""
    from refinery.tasks.eval.judge import OUTCOMES, EndpointJudge, JudgeSpec, LocalJudge, judge_pairs, parse_verdict

    for name in ("REFINERY_JUDGE_API_KEY", "OPENAI_API_KEY", "REFINERY_SERVE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    prompts = ["Name a river.", "What is 2 + 2?"]
    answers = {"base": ["The Nile.", "5"], "cand": ["The Rhine flows north.", "4"]}
    with served(chat_model_dir) as url:
        assert url.startswith("http://127.0.0.1:")
        remote = EndpointJudge(JudgeSpec(judge=url, baseline="base", max_tokens=6, concurrency=2))
        served_records, summary = judge_pairs(prompts, answers, "base", remote)
        remote.close()
    assert remote.model == "tiny-judge" and remote.requests == 4
    assert all(r["reply_first"] and r["reply_second"] for r in served_records)   # the tiny model said something
    assert summary["cand"]["pairs"] == 2 and {r["outcome"] for r in served_records} <= set(OUTCOMES)
    local = LocalJudge(JudgeSpec(judge=str(chat_model_dir), baseline="base", max_tokens=6), "cpu", batch_size=1)
    assert local.chat
    local_records, _ = judge_pairs(prompts, answers, "base", local)
    for s, lo in zip(served_records, local_records):
        assert (s["reply_first"], s["reply_second"]) == (lo["reply_first"], lo["reply_second"])
        assert s["verdict_first"] == parse_verdict(s["reply_first"]) and s["outcome"] == lo["outcome"]


# --------------------------------------------------------------------------- the evaluate stage and flow
def test_the_evaluate_stage_judges_its_models(tmp_path, tiny_causal_lm_dir, second_model_dir):
    import pyarrow.parquet as pq

    from refinery.tasks.eval.judge import JudgeSpec
    from refinery.tasks.eval.stage import EvalConfig, ModelSpec, evaluate, read_results

    with stub_judge("A") as (url, seen):
        cfg = EvalConfig(models=[ModelSpec(label="base", path=str(tiny_causal_lm_dir)),
                                 ModelSpec(label="other", path=str(second_model_dir))],
                         prompts=["Once upon a time", "The river"], max_new_tokens=4, device="cpu",
                         judge=JudgeSpec(judge=url, baseline="base", concurrency=2))
        ds = evaluate.run(tmp_path / "work", [], cfg)
    path = Path(ds.path)
    recs = pq.read_table(path / "samples" / "judgments.parquet").to_pylist()
    gens = {(g["model"], g["prompt"]): g["completion"]
            for g in pq.read_table(path / "samples" / "generations.parquet").to_pylist()}
    assert [r["prompt"] for r in recs] == cfg.prompts and all(r["model"] == "other" for r in recs)
    for r in recs:   # the judged answers are the generation samples; an always-A judge gives ties
        assert r["answer"] == gens[("other", r["prompt"])] and r["baseline_answer"] == gens[("base", r["prompt"])]
        assert r["outcome"] == "tie"
    rows = {(r["model"], r["task"], r["metric"]): r["value"] for r in read_results(ds)}
    assert rows[("other", "judge[vs=base]", "tie_rate")] == 1.0
    assert rows[("other", "judge[vs=base]", "win_rate")] == 0.0
    assert (path / "judge.png").stat().st_size > 1000
    stats = ds.manifest["stats"]["judge"]["other"]
    assert stats["pairs"] == 2 and stats["tie_ci"][0] < 1.0 == stats["tie_ci"][1]
    assert ds.manifest["judge"]["model"] == "stub-judge" and ds.manifest["judge"]["baseline"] == "base"
    assert ds.manifest["chat_template"]["applied"] == {"base": False, "other": False}
    asked = sum(r["answer"] != r["baseline_answer"] for r in recs)
    assert len(seen["bodies"]) == 2 * asked


def test_the_flow_parameters_of_judging(tmp_path, tiny_causal_lm_dir, second_model_dir):
    from refinery.flows.evaluate import EvaluateParams, stage_config

    f = tmp_path / "prompts.jsonl"
    f.write_text(json.dumps({"prompt": "Hi"}) + "\nnot json\n" + json.dumps({"question": "Why?"}) + "\n")
    p = EvaluateParams(input=str(tiny_causal_lm_dir), baseline=str(second_model_dir), judge=str(tiny_causal_lm_dir),
                       prompts=str(f), chat_template=True)   # --set chat_template=true arrives as a YAML bool
    refs, cfg = stage_config(p)
    assert refs == [str(second_model_dir), str(tiny_causal_lm_dir)] and cfg.prompts == ["Hi", "Why?"]
    assert cfg.judge.baseline == cfg.models[0].label == second_model_dir.name and cfg.chat_template == "true"
    assert cfg.judge.identity and cfg.judge.seed == p.seed
    with pytest.raises(ValueError, match="two in input"):
        stage_config(EvaluateParams(input=str(tiny_causal_lm_dir), judge="http://127.0.0.1:9/v1", prompts=str(f)))
    with pytest.raises(ValueError, match="credentials"):
        stage_config(EvaluateParams(input=f"{tiny_causal_lm_dir},{second_model_dir}", judge="http://k3y@example.com/v1",
                                    prompts=str(f)))
    plain = stage_config(EvaluateParams(input=str(tiny_causal_lm_dir), prompts="Tell me a story"))[1]
    assert plain.judge is None and plain.prompts == ["Tell me a story"]
    with pytest.raises(ValueError, match="no such file"):   # a mistyped file name is no prompt
        stage_config(EvaluateParams(input=str(tiny_causal_lm_dir), prompts=str(tmp_path / "promts.jsonl")))
