"""The two generators of the ``synth`` stage, behind one call: ``generate(requests) -> replies``.

- :class:`LocalGenerator`: a model the flows accept (a refinery training dataset, a Hugging Face
  folder, a hub id; resolved by :mod:`refinery.tasks.modelref`), sampled by the rollout engine
  (:func:`refinery.tasks.rollout.sample`: batched, KV cache). Token counts are exact: the prompt's
  ids and the completion's ids.
- :class:`EndpointGenerator`: any OpenAI-compatible server (``base_url``: OpenAI, vLLM, llama.cpp,
  ``refinery serve``), ``/chat/completions`` or ``/completions``, over the standard library's HTTP
  client (no SDK to install). The key comes from the environment only (:data:`KEY_ENVS`, first set
  wins; none: no ``Authorization`` header), never from a parameter, and is never logged. Token
  counts are the server's ``usage``; a server that sends none is counted by estimate
  (:func:`estimate_tokens`).

Errors, by what another attempt can change:

- transient (connection refused or reset, timeouts, HTTP 408/409/429/5xx, a reply that is not the
  expected JSON): retried with exponential backoff and jitter (``Retry-After`` honoured, capped);
  once ``retries`` more attempts failed, :class:`TransientExhausted` is raised, so the shard fails
  and is **not** recorded: the runtime retries it, and a rerun redoes it. A transient error never
  becomes a cached result.
- about this request only (HTTP 400/413/422, e.g. a document over the context): the reply carries
  ``error`` and the stage records the document in its failures table; but when every request of
  a call (two or more) is refused, the setup is wrong, not the documents, and
  :class:`EndpointRefused` is raised instead.
- about every request (HTTP 401/403/404: a wrong key, a wrong model name or URL):
  :class:`EndpointRefused` at once (``permanent``: the runtime does not retry it), since every
  document would fail the same way.

Concurrency: at most ``concurrency`` requests in flight per endpoint in one process (a semaphore
shared by every shard that process runs, so shards on a thread pool do not multiply it).
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import math
import os
import random
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

from refinery.tasks.synth.prompts import PLAIN_STOP, Messages, render_plain

KEY_ENVS = ("REFINERY_SYNTH_API_KEY", "OPENAI_API_KEY")
TRANSIENT_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 521, 522, 524, 529})
FATAL_STATUS = frozenset({401, 403, 404})
BACKOFF_CAP_S = 30.0
CHARS_PER_TOKEN = 3   # estimate for servers without usage: below English BPE's ~4, so it over-counts


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation: chat messages and the sampling settings (temperature 0: greedy)."""

    messages: Messages
    temperature: float
    seed: int
    max_new_tokens: int


@dataclasses.dataclass
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    error: str | None = None   # a failure of this request alone (the document's failure record)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class TransientExhausted(RuntimeError):
    """The endpoint kept failing transiently after every retry: the shard fails unrecorded."""

    permanent = False


class EndpointRefused(RuntimeError):
    """The endpoint refuses every request (key, model or URL): no retry, no per-document records."""

    permanent = True


def estimate_tokens(text: str) -> int:
    """Tokens of ``text`` when the server does not say: one per :data:`CHARS_PER_TOKEN` characters."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def api_key() -> str | None:
    """The endpoint key from the environment (:data:`KEY_ENVS`, first set wins), or None."""
    for name in KEY_ENVS:
        if os.environ.get(name):
            return os.environ[name]
    return None


# --------------------------------------------------------------------------- local model
_MODELS: dict[tuple[str, str], Any] = {}
_MODELS_LOCK = threading.Lock()


def _loaded(model: str, device: str):
    """The model and tokenizer, loaded once per process (shards on threads share them)."""
    from refinery.tasks.eval.generate import load_model

    with _MODELS_LOCK:
        if (model, device) not in _MODELS:
            _MODELS[(model, device)] = load_model(model, device)
        return _MODELS[(model, device)]


class LocalGenerator:
    """The rollout engine on a local model; prompts through the chat template when the tokenizer
    has one, else :func:`render_plain` with a stop at the next ``USER:`` turn."""

    def __init__(self, model: str, device: str = "auto", batch_size: int = 8):
        self.lm = _loaded(model, device)
        self.tok = self.lm.tokenizer
        self.batch_size = batch_size
        self.chat = bool(getattr(self.tok, "chat_template", None))
        cfg = self.lm.model.config
        self.context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    def prompt_ids(self, messages: Messages) -> list[int]:
        from refinery.tasks.eval.generate import prompt_ids

        if self.chat:
            enc = self.tok.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                               add_generation_prompt=True, tokenize=True)
            return list(enc["input_ids"] if hasattr(enc, "keys") else enc)
        return prompt_ids(self.tok, render_plain(messages), chat=False)

    def count(self, messages: Messages) -> int:
        return len(self.prompt_ids(messages))

    def overflow(self, messages: Messages, max_new_tokens: int) -> int:
        """Prompt tokens beyond what the model's context leaves after ``max_new_tokens`` (0: fits)."""
        if not self.context:
            return 0
        return max(0, self.count(messages) + max_new_tokens - self.context)

    def shorten(self, text: str, tokens: int) -> str:
        """``text`` without its last ``tokens`` tokens (a document cut to fit the context)."""
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return self.tok.decode(ids[:max(0, len(ids) - tokens)], skip_special_tokens=True)

    def generate(self, requests: Sequence[Request]) -> list[Reply]:
        """Replies in order: requests with the same settings go to the rollout engine together."""
        from refinery.tasks.rollout import SamplingParams, sample

        replies: list[Reply | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.temperature, r.seed, r.max_new_tokens), []).append(i)
        for (temperature, seed, max_new), idx in groups.items():
            ids = [self.prompt_ids(requests[i].messages) for i in idx]
            params = SamplingParams(max_new_tokens=max_new, temperature=temperature, seed=seed,
                                    stop=() if self.chat else PLAIN_STOP, batch_size=self.batch_size)
            out = sample(self.lm.model, self.tok, ids, params)
            for i, prompt, c in zip(idx, ids, out.completions):
                replies[i] = Reply(c.text.strip(), len(prompt), len(c.ids),
                                   "length" if c.finish_reason == "length" else "stop")
        return [r for r in replies if r is not None]


# --------------------------------------------------------------------------- OpenAI-compatible endpoint
_SEMAPHORES: dict[tuple[str, int], threading.BoundedSemaphore] = {}
_SEM_LOCK = threading.Lock()


def _semaphore(base_url: str, n: int) -> threading.BoundedSemaphore:
    with _SEM_LOCK:
        return _SEMAPHORES.setdefault((base_url, n), threading.BoundedSemaphore(n))


class _Transient(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(headers: Any) -> float | None:
    try:
        return float(headers.get("Retry-After")) if headers and headers.get("Retry-After") else None
    except (TypeError, ValueError):
        return None


def _error_message(body: bytes) -> str:
    """The ``error.message`` of an OpenAI-style error body, else its first characters."""
    try:
        msg = json.loads(body)["error"]["message"]
        return str(msg)[:300]
    except (ValueError, KeyError, TypeError):
        return body[:300].decode("utf-8", "replace")


class EndpointGenerator:
    """An OpenAI-compatible server: ``api`` ``chat`` (``/chat/completions``, the messages) or
    ``completions`` (``/completions``, :func:`render_plain`'s transcript with its stop)."""

    def __init__(self, base_url: str, model: str, api: str = "chat", concurrency: int = 4, retries: int = 4,
                 backoff: float = 1.0, timeout: float = 120.0):
        self.base_url, self.model, self.api = base_url.rstrip("/"), model, api
        self.concurrency, self.retries, self.backoff, self.timeout = max(1, concurrency), retries, backoff, timeout
        self.sem = _semaphore(self.base_url, self.concurrency)
        self.key = api_key()
        self.attempts = self.retried = 0
        self._lock = threading.Lock()

    def count(self, messages: Messages) -> int:
        return estimate_tokens("".join(c for _, c in messages))

    def overflow(self, messages: Messages, max_new_tokens: int) -> int:
        return 0   # the server knows its context: a prompt over it is that document's 400

    def _body(self, r: Request) -> tuple[str, dict]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": r.max_new_tokens, "temperature": r.temperature,
                                "seed": r.seed}
        if self.api == "chat":
            body["messages"] = [{"role": role, "content": c} for role, c in r.messages]
            return "/chat/completions", body
        body.update(prompt=render_plain(r.messages), stop=list(PLAIN_STOP))
        return "/completions", body

    def _post(self, path: str, body: dict) -> dict:
        """One attempt: the parsed reply; :class:`_Transient`, :class:`EndpointRefused`, or
        ``ValueError`` (this request refused)."""
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(), headers=headers,
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            msg = f"HTTP {e.code}: {_error_message(e.read())}"
            if e.code in FATAL_STATUS:
                raise EndpointRefused(f"{self.base_url}{path} refused the request ({msg}); check base_url, model "
                                      f"and the key in ${' or $'.join(KEY_ENVS)}") from None
            if e.code in TRANSIENT_STATUS or e.code >= 500:
                raise _Transient(msg, _retry_after(e.headers)) from None
            raise ValueError(msg) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            raise _Transient(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None
        try:
            reply = json.loads(raw)
            reply["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Transient("the reply is not an OpenAI completion object") from None
        return reply

    def _one(self, r: Request) -> Reply:
        path, body = self._body(r)
        prompt_est = self.count(r.messages)
        for attempt in range(self.retries + 1):
            with self._lock:
                self.attempts += 1
                self.retried += attempt > 0
            try:
                with self.sem:
                    reply = self._post(path, body)
            except ValueError as e:
                return Reply("", prompt_est, 0, "error", error=f"refused: {e}")
            except _Transient as e:
                if attempt == self.retries:
                    raise TransientExhausted(f"{self.base_url}{path}: still failing after {self.retries + 1} "
                                             f"attempts: {e}") from None
                delay = min(BACKOFF_CAP_S, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
                time.sleep(min(BACKOFF_CAP_S, max(delay, e.retry_after or 0.0)))
                continue
            choice = reply["choices"][0]
            text = (choice.get("message") or {}).get("content") if self.api == "chat" else choice.get("text")
            text = (text or "").strip()
            usage = reply.get("usage") or {}
            return Reply(text, int(usage.get("prompt_tokens") or prompt_est),
                         int(usage.get("completion_tokens") or estimate_tokens(text)),
                         "length" if choice.get("finish_reason") == "length" else "stop")
        raise AssertionError("unreachable")

    def generate(self, requests: Sequence[Request]) -> list[Reply]:
        """Replies in order, ``concurrency`` requests at a time (across this process's shards)."""
        if not requests:
            return []
        with cf.ThreadPoolExecutor(min(self.concurrency, len(requests)), thread_name_prefix="synth") as pool:
            futures = [pool.submit(self._one, r) for r in requests]
            try:
                replies = [f.result() for f in futures]
            except BaseException:   # the shard fails: the requests not started yet are not sent
                for f in futures:
                    f.cancel()
                raise
        if len(replies) > 1 and all(r.error for r in replies):
            # every request refused alike is the setup (a model without a chat template, a bad
            # parameter), not the documents: fail unrecorded rather than cache a table of refusals
            raise EndpointRefused(f"{self.base_url}: every one of {len(replies)} requests was refused "
                                  f"({replies[0].error}); check base_url, model and api")
        return replies


__all__ = ["Request", "Reply", "LocalGenerator", "EndpointGenerator", "TransientExhausted", "EndpointRefused",
           "KEY_ENVS", "api_key", "estimate_tokens"]
