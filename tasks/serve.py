"""``refinery serve MODEL``: an OpenAI-compatible HTTP server for any model the flows accept (a
refinery training dataset, a Hugging Face folder, a hub id), so the official ``openai`` client, a
judge or the synthetic-data stage can call it.

Endpoints: ``GET /v1/models``, ``POST /v1/completions`` (a prompt string), ``POST
/v1/chat/completions`` (messages through the tokenizer's chat template); both ``stream``
(server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``; ``stream_options:
{"include_usage": true}`` adds a last chunk with the usage). Responses carry ``usage``
(``prompt_tokens``, ``completion_tokens``, ``total_tokens``) and ``finish_reason`` (``stop``: end of
sequence or a stop string; ``length``: ``max_tokens`` reached).

Parameters: ``model``, ``max_tokens`` (chat: also ``max_completion_tokens``), ``temperature``
(OpenAI's default 1.0; 0 is greedy), ``top_p``, ``stop`` (a string or up to 4), ``n`` (1 only),
``seed``, ``stream``, ``stream_options``, ``user`` (ignored). Any other field is refused with a 400
naming it, unless it is null or OpenAI's neutral value (``frequency_penalty: 0``, ``logprobs:
false`` ...), so a client's defaults pass and nothing asked for is silently dropped. Errors have
OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.

Safety: it listens on 127.0.0.1 unless told another address (with a warning). When the environment
variable ``REFINERY_SERVE_API_KEY`` is set (never a command-line argument: it would show in ``ps``),
every request must carry ``Authorization: Bearer <key>``, else 401.

Concurrency: at most ``max_concurrency`` generations run at once (an asyncio semaphore; each runs
in a worker thread, so the event loop keeps answering); up to ``max_queue`` more requests wait for
a slot, and a request beyond that gets 429 at once (``rate_limit_exceeded``). A ``seed`` makes
sampling repeatable when one generation runs at a time (torch's global generator is shared).
A client that disconnects mid-stream stops its generation at the next token; SIGINT/SIGTERM stop
every generation at its next token and the server after at most ``GRACEFUL_S`` seconds.

Generation is one function, :func:`generate_text`: the rollout engine (:mod:`refinery.tasks.rollout`,
KV cache) on one request, a streamer callback per token, and the engine's ``stop_when`` hook asked
after every token (a stop string seen, or the request cancelled: a closed stream, shutdown).
"""
# no `from __future__ import annotations`: FastAPI resolves the handlers' annotations (Request, defined in
# create_app) at definition time

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import os
import threading
import time
import uuid
from typing import Any, Callable

API_KEY_ENV = "REFINERY_SERVE_API_KEY"
DEFAULT_PORT = 8000
DEFAULT_MAX_TOKENS = 256
GRACEFUL_S = 3
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "n", "seed", "stream", "stream_options", "user"}
COMPLETION_FIELDS = COMMON | {"prompt"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens"}
# fields this server does not implement, accepted only at the value that means "off"
NEUTRAL: dict[str, tuple] = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False,),
                             "echo": (False,), "best_of": (1,), "parallel_tool_calls": (False,),
                             "suffix": ("",), "logit_bias": ({},), "store": (False,)}


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------- requests
@dataclasses.dataclass
class GenParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = dataclasses.field(default_factory=list)
    seed: int | None = None


@dataclasses.dataclass
class GenResult:
    text: str
    completion_tokens: int
    finish_reason: str   # "stop" or "length"


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo < v if lo_open else lo <= v) or v > hi:
        raise ApiError(400, f"{key}: expected a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}", param=key)
    return float(v)


def check_fields(body: Any, allowed: set[str]) -> dict:
    """``body`` as a dict whose every field this server implements (or sets to its neutral value)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for key, value in body.items():
        if key in allowed or value is None or value in NEUTRAL.get(key, ()):
            continue
        raise ApiError(400, f"unsupported parameter: {key!r} (this server implements: {', '.join(sorted(allowed))})",
                       param=key, code="unsupported_parameter")
    n = body.get("n")
    if n is not None and n != 1:
        raise ApiError(400, f"n: only n=1 is supported, got {n!r}", param="n", code="unsupported_parameter")
    if body.get("stream") not in (None, True, False):
        raise ApiError(400, "stream: expected true or false", param="stream")
    return body


def gen_params(body: dict, prompt_len: int, context: int | None, default_max: int, keys=("max_tokens",)) -> GenParams:
    """The generation settings of a request, checked (a 400 names the field)."""
    key = next((k for k in keys if body.get(k) is not None), keys[0])
    mt = body.get(key)
    room = context - prompt_len if context else None
    if room is not None and room < 1:
        raise ApiError(400, f"the prompt has {prompt_len} tokens: the model's context is {context}",
                       code="context_length_exceeded")
    if mt is None:
        mt = min(default_max, room) if room is not None else default_max
    elif isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
        raise ApiError(400, f"{key}: expected a positive integer, got {mt!r}", param=key)
    elif room is not None and mt > room:
        raise ApiError(400, f"{key}: {mt} tokens after a {prompt_len}-token prompt exceed the model's context of "
                       f"{context}", param=key, code="context_length_exceeded")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is None:
        stop = []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop: expected a non-empty string or a list of up to 4", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"seed: expected an integer, got {seed!r}", param="seed")
    return GenParams(max_tokens=mt, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                     top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), stop=stop, seed=seed)


def chat_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages: expected a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}]: expected a role of system, user or assistant", param="messages")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise ApiError(400, f"messages[{i}]: unsupported field(s) {sorted(extra)}", param="messages")
        content = m.get("content")
        if isinstance(content, list):   # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content: expected a string", param="messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


# --------------------------------------------------------------------------- generation
def _held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` could begin a stop string (not sent yet)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def generate_text(lm, ids: list[int], params: GenParams, on_text: Callable[[str], None] | None = None,
                  cancel: threading.Event | None = None) -> GenResult:
    """The completion of the token ids ``ids`` by the rollout engine (:func:`refinery.tasks.rollout.sample`,
    KV cache); ``on_text`` gets each piece of text as it is final (the pieces concatenate to
    ``GenResult.text``); ``cancel`` set, or a stop string in the text, stops it at the next token.
    Blocking: the server runs it in a worker thread."""
    from transformers.generation.streamers import BaseStreamer

    from refinery.tasks.rollout import SamplingParams, sample

    tok = lm.tokenizer
    cancel = cancel or threading.Event()
    state: dict[str, Any] = {"ids": [], "text": "", "sent": 0, "stopped": False, "prompt_seen": False}

    def emit(upto: int) -> None:
        piece = state["text"][state["sent"]:upto]
        state["sent"] = upto
        if piece and on_text is not None:
            on_text(piece)

    class Streamer(BaseStreamer):
        def put(self, value):
            if not state["prompt_seen"]:   # the engine passes the prompt first
                state["prompt_seen"] = True
                return
            if state["stopped"]:
                return
            state["ids"].extend(int(t) for t in value.reshape(-1).tolist())
            text = tok.decode(state["ids"], skip_special_tokens=True)
            if not text.startswith(state["text"][:state["sent"]]):   # the decode changed what was sent: keep it
                return
            state["text"] = text
            hits = [i for i in (text.find(s, max(0, state["sent"] - len(s))) for s in params.stop) if i >= 0]
            if hits:
                state["text"] = text[:min(hits)]
                state["stopped"] = True
                emit(len(state["text"]))
                return
            # held back: what may begin a stop string, and a trailing replacement character (the
            # rest of its bytes may come with the next token)
            emit(min(len(text) - _held_back(text, params.stop), len(text.rstrip("\ufffd"))))

        def end(self):
            pass

    sampling = SamplingParams(max_new_tokens=params.max_tokens, temperature=max(params.temperature, 0.0),
                              top_p=params.top_p if params.temperature > 0 else 1.0, seed=params.seed, batch_size=1)
    sample(lm.model, tok, [ids], sampling, streamer=Streamer(), stop_when=lambda: state["stopped"] or cancel.is_set())
    if not state["stopped"]:   # the end: whatever was held back (as the whole completion decodes)
        final = tok.decode(state["ids"], skip_special_tokens=True)
        state["text"] = final if final.startswith(state["text"][:state["sent"]]) else state["text"]
        emit(len(state["text"]))
    eos = lm.model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    ended = bool(state["ids"]) and state["ids"][-1] in eos_ids
    n = len(state["ids"])
    reason = "length" if n >= params.max_tokens and not ended and not state["stopped"] else "stop"
    return GenResult(state["text"][:state["sent"]], n, reason)


# --------------------------------------------------------------------------- the server
class ServedModel:
    """The loaded model, the concurrency bound and the generations in flight."""

    def __init__(self, lm, model_id: str, max_concurrency: int = 1, max_queue: int = 32,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS):
        self.lm, self.model_id = lm, model_id
        self.max_concurrency, self.max_queue = max(1, max_concurrency), max(0, max_queue)
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        self._sem: asyncio.Semaphore | None = None
        self._waiting = 0
        self._cancels: set[threading.Event] = set()
        self._tasks: set[asyncio.Task] = set()
        cfg = lm.model.config
        self.context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    def stop_all(self) -> None:
        """Every generation in flight stops at its next token (shutdown)."""
        for c in list(self._cancels):
            c.set()

    def start(self, ids: list[int], params: GenParams, on_text=None) -> tuple[asyncio.Task, threading.Event]:
        """Queue a generation: a task (it holds a slot until the worker thread is done, whatever
        happens to the request) and its cancel event. 429 when the queue is full."""
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_concurrency)
        if self._sem.locked() and self._waiting >= self.max_queue:
            raise ApiError(429, f"the server is busy: {self.max_concurrency} generation(s) running and "
                           f"{self._waiting} waiting (--max-queue); retry later", type="rate_limit_exceeded",
                           code="rate_limit_exceeded")
        cancel = threading.Event()
        sem = self._sem

        async def run() -> GenResult:
            self._waiting += 1
            try:
                await sem.acquire()
            finally:
                self._waiting -= 1
            self._cancels.add(cancel)
            try:
                return await asyncio.to_thread(generate_text, self.lm, ids, params, on_text, cancel)
            finally:
                self._cancels.discard(cancel)
                sem.release()

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task, cancel


def _auth_ok(header: str | None, key: str) -> bool:
    given = (header or "").removeprefix("Bearer ").strip() if (header or "").startswith("Bearer ") else ""
    return bool(given) and hmac.compare_digest(given.encode(), key.encode())


def create_app(engine: ServedModel, api_key: str | None = None):
    """The FastAPI app; ``api_key`` (default: ``$REFINERY_SERVE_API_KEY``, empty means none)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV, "")
    app = FastAPI(title="refinery serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    tok = engine.lm.tokenizer

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request, e: Exception):   # a failed generation: the error in OpenAI's shape
        return JSONResponse(ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error").body(),
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        return JSONResponse(ApiError(400, str(e)).body(), status_code=400)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if key and not _auth_ok(request.headers.get("authorization"), key):
            err = ApiError(401, f"missing or incorrect API key: send Authorization: Bearer <the key in ${API_KEY_ENV}>",
                           code="invalid_api_key")
            return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    async def body_of(request: Request, allowed: set[str]) -> dict:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        body = check_fields(body, allowed)
        if body.get("model") not in (engine.model_id, engine.lm.path):
            raise ApiError(404, f"the model {body.get('model')!r} does not exist: this server serves "
                           f"{engine.model_id!r}", param="model", code="model_not_found")
        return body

    def model_card() -> dict:
        return {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "refinery"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in (engine.model_id, engine.lm.path):
            raise ApiError(404, f"the model {model_id!r} does not exist", code="model_not_found")
        return model_card()

    async def answer(body: dict, ids: list[int], params: GenParams, chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def usage(res: GenResult) -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": res.completion_tokens,
                    "total_tokens": len(ids) + res.completion_tokens}

        def choice(text: str | None, reason: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            if delta:
                return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                        "finish_reason": reason}
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": reason}

        if not body.get("stream"):
            task, cancel = engine.start(ids, params)
            res = await asyncio.shield(task)
            return {"id": rid, "object": obj, "created": created, "model": engine.model_id,
                    "choices": [choice(res.text, res.finish_reason, False)], "usage": usage(res)}

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        task, cancel = engine.start(ids, params, on_text=lambda s: loop.call_soon_threadsafe(queue.put_nowait, s))
        task.add_done_callback(lambda t: queue.put_nowait(None))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def sse(choices: list, **extra) -> str:
            return "data: " + json.dumps({"id": rid, "object": chunk_obj, "created": created, "model": engine.model_id,
                                          "choices": choices, **extra}) + "\n\n"

        async def events():
            try:
                if chat:
                    yield sse([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}])
                while (piece := await queue.get()) is not None:
                    yield sse([choice(piece, None, True)])
                if task.exception() is not None:
                    err = ApiError(500, f"generation failed: {type(task.exception()).__name__}: {task.exception()}",
                                   type="server_error")
                    yield "data: " + json.dumps(err.body()) + "\n\n"
                    return
                res = task.result()
                yield sse([choice(None if chat else "", res.finish_reason, True)])
                if include_usage:
                    yield sse([], usage=usage(res))
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()   # the client went away (or we are done): the generation stops at its next token

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        from refinery.tasks.eval.generate import prompt_ids

        body = await body_of(request, COMPLETION_FIELDS)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt: expected one string (token-id and batched prompts are not supported)",
                           param="prompt")
        ids = prompt_ids(tok, prompt, chat=False)
        params = gen_params(body, len(ids), engine.context, engine.default_max_tokens)
        return await answer(body, ids, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request, CHAT_FIELDS)
        msgs = chat_messages(body)
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions with a prompt")
        enc = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
        params = gen_params(body, len(ids), engine.context, engine.default_max_tokens,
                            keys=("max_completion_tokens", "max_tokens"))
        return await answer(body, ids, params, chat=True)

    return app


# --------------------------------------------------------------------------- running it
def is_local(host: str) -> bool:
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str = "127.0.0.1", port: int = DEFAULT_PORT):
    """A listening socket on ``host:port`` (port 0: a free one), bound before the URL is printed."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def make_server(engine: ServedModel, log_level: str = "info", api_key: str | None = None):
    """A uvicorn server for ``engine``; a signal stops every generation at once, then the server."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.stop_all()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(create_app(engine, api_key), log_level=log_level, timeout_graceful_shutdown=GRACEFUL_S,
                            lifespan="off")
    return Server(config)


def url_of(sock) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


__all__ = ["API_KEY_ENV", "ApiError", "ServedModel", "GenParams", "GenResult", "bind", "create_app", "generate_text",
           "is_local", "make_server", "url_of"]
