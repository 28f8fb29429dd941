"""``refinery serve`` (refinery.tasks.serve): the OpenAI-compatible server, called with the official
``openai`` client. Servers run in this process (uvicorn in a thread, 127.0.0.1, a free port) on a
tiny random Llama with a chat template; one case starts the real command and stops it with SIGTERM."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from refinery_testlib import serving

openai = pytest.importorskip("openai")

REFINERY = str(Path(sys.executable).parent / "refinery")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MODEL_ID = "tiny-chat"
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three rivers."}]


@pytest.fixture(scope="module")
def model_dir(tiny_causal_lm_dir, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("serve_model") / "m"
    shutil.copytree(tiny_causal_lm_dir, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    # a random model picks byte tokens that are no text alone: its generation config suppresses them
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(out)
    gen.suppress_tokens = [i for i in range(len(tok)) if "\ufffd" in tok.decode([i])]
    gen.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lm(model_dir):
    from refinery.tasks.eval.generate import load_model

    return load_model(str(model_dir), "cpu")


def running(lm, **engine_kw):
    return serving(lm, MODEL_ID, **engine_kw)


@pytest.fixture(scope="module")
def served(lm):
    with running(lm, max_concurrency=1, max_queue=0) as (url, sock):
        yield url, sock


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0], api_key="unused", max_retries=0, timeout=60)


def _post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_the_loopback_address(served, client):
    url, sock = served
    assert sock.getsockname()[0] == "127.0.0.1" and url.startswith("http://127.0.0.1:")
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    from refinery.flows.cli import build_parser

    args = build_parser().parse_args(["serve", "M"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)


def test_completion_and_its_stream(client, lm):
    import torch

    from refinery.tasks.eval.generate import prompt_ids

    r = client.completions.create(model=MODEL_ID, prompt="The river", max_tokens=8, temperature=0)
    text = r.choices[0].text
    ids = torch.tensor([prompt_ids(lm.tokenizer, "The river", chat=False)])   # BOS + the prompt
    out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert text == lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)   # HF's greedy text
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(lm.tokenizer("The river")["input_ids"]) + 1   # BOS
    chunks = list(client.completions.create(model=MODEL_ID, prompt="The river", max_tokens=8, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_streaming_matches_the_greedy_answer(client, lm):
    r = client.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and text
    ids = lm.tokenizer.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == len(ids) + 12
    stream = client.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1, "streamed in one piece"
    assert "".join(pieces) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    # sampling with a seed repeats; max_completion_tokens is the newer name of max_tokens
    a, b = (client.chat.completions.create(model=MODEL_ID, messages=MSGS, max_completion_tokens=6, temperature=1.0,
                                           top_p=0.9, seed=3).choices[0].message.content for _ in range(2))
    assert a == b


def test_stop_strings_cut_the_text_streamed_or_not(client):
    full = client.completions.create(model=MODEL_ID, prompt="Rivers", max_tokens=24, temperature=0).choices[0].text
    stop = next((full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip() and full[i:i + 2] not in full[:i + 1]),
                None)
    if stop is None:
        pytest.skip(f"the tiny model's text has no usable stop string: {full!r}")
    want = full[:full.index(stop)]
    r = client.completions.create(model=MODEL_ID, prompt="Rivers", max_tokens=24, temperature=0, stop=[stop, "\x00zz"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL_ID, prompt="Rivers", max_tokens=24, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want


def test_unsupported_parameters_are_refused_by_name(client, served):
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=2, logprobs=True)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.completions.create(model=MODEL_ID, prompt="x", max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=2,
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        client.chat.completions.create(model="gpt-4", messages=MSGS, max_tokens=2)
    # neutral values of unimplemented fields pass
    client.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=2, frequency_penalty=0, presence_penalty=0)
    status, body = _post(served[0] + "/completions", {"model": MODEL_ID, "prompt": "x", "best_of": 3})
    assert status == 400 and body["error"]["param"] == "best_of" and "best_of" in body["error"]["message"]
    status, body = _post(served[0] + "/completions", {"model": MODEL_ID, "prompt": "x", "max_tokens": 10_000})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, body = _post(served[0] + "/chat/completions", {"model": MODEL_ID, "messages": [{"role": "tool"}]})
    assert status == 400 and body["error"]["param"] == "messages"


def test_busy_server_answers_429_and_a_closed_stream_frees_its_slot(client):
    stream = client.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=200, temperature=0, stream=True)
    next(iter(stream))   # generating now: the one slot is taken, the queue (0) is full
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=MODEL_ID, prompt="x", max_tokens=2)
    stream.close()       # the client goes away: its generation stops at the next token
    deadline = time.monotonic() + 20
    while True:
        try:
            client.completions.create(model=MODEL_ID, prompt="x", max_tokens=2)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the closed stream kept its slot"
            time.sleep(0.05)


def test_the_api_key_from_the_environment(lm, monkeypatch):
    from refinery.tasks.serve import API_KEY_ENV

    monkeypatch.setenv(API_KEY_ENV, "s3cret-key")
    with running(lm) as (url, _):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        status, body = _post(url + "/completions", {"model": MODEL_ID, "prompt": "x", "max_tokens": 1})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        ok = openai.OpenAI(base_url=url, api_key="s3cret-key", max_retries=0)
        assert [m.id for m in ok.models.list()] == [MODEL_ID]
        assert ok.completions.create(model=MODEL_ID, prompt="x", max_tokens=1).usage.completion_tokens == 1


def test_the_command_prints_its_url_and_stops_on_sigterm(model_dir, tmp_path):
    env = {**os.environ, "REFINERY_DEBUG": ""}
    env.pop("REFINERY_SERVE_API_KEY", None)
    p = subprocess.Popen([REFINERY, "serve", str(model_dir), "--port", "0", "--device", "cpu", "--log-level", "warning"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        line = p.stdout.readline()
        assert "http://127.0.0.1:" in line, (line, p.stderr.read() if p.poll() is not None else "")
        url = line.split(" at ", 1)[1].split()[0]
        c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        stream = c.chat.completions.create(model=str(model_dir), messages=MSGS, max_tokens=3, temperature=0,
                                           stream=True)
        assert sum(1 for _ in stream) >= 2
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 143
        assert "refinery serve: stopped by SIGTERM" in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
