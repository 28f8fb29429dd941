"""The ``synth`` stage: synthetic data from curated documents, by a local model or an
OpenAI-compatible endpoint (ARCHITECTURE.md, section 6: models leave through the rollout engine).

Tasks (the prompts: :mod:`refinery.tasks.synth.prompts`), one output row per document at most:

- ``rephrase`` (``style`` wikipedia or qa, as in WRAP): ``text`` is the rephrased document, a
  documents dataset that ``tokenize`` takes as it takes curated documents;
- ``instructions``: ``messages`` (OpenAI chat: the instruction as the user turn, the answer as the
  assistant's), plus ``instruction`` and ``response``: SFT records ``finetune`` reads (``data=`` this
  dataset's folder);
- ``preferences``: ``prompt``, ``chosen`` (the answer written with the document in view) and
  ``rejected`` (the answer to the instruction alone, sampled at ``rejected_temperature``): pairs
  ``align`` reads.

Every row keeps the document's ``id``, ``source`` and ``url`` (lineage) and a ``metadata`` JSON with
the task, the generator, the tokens spent and the finish reasons. A document that yields no row
for a reason of its own (no text, an empty or identical output, a request the endpoint refused)
is a row of the ``failures/`` side table (``id``, ``source``, ``url``, ``step``, ``reason``,
``error``), counted by reason in the manifest (``failed``, ``failed_by_reason``).

Shards: ``docs_per_shard`` documents of one input part each, in input order (``max_docs`` cuts the
plan). The runtime records each finished shard, so a rerun after a crash redoes only the shards
that had not finished: the resume granularity is one shard (``docs_per_shard`` documents; lower it
for costly generators). A shard whose endpoint kept failing transiently fails unrecorded (see
:mod:`refinery.tasks.synth.generators`) and is retried by the runtime, then by the next run.

Token budget (``token_budget``): prompt plus completion tokens of every request (local: the
tokenizer's ids; endpoint: the server's ``usage``, estimated at one token per three characters when
it sends none; retried attempts that got no reply cost nothing). It is split over the shards in
proportion to their documents, so it holds whatever the task runner runs at once, and the result
does not depend on which shard ran first. Within a shard, each step's requests are admitted in
document order while the worst case (prompt tokens plus ``max_new_tokens``; at the first step of
instructions and preferences also a bound on the document's later requests) fits in what is left
of the shard's share; from the first document that does not fit, the step's remaining documents
are counted as ``skipped_budget`` and not generated. With a local model the budget is therefore
never exceeded; with an endpoint, only by the estimate's error on prompt lengths.

Determinism: greedy (``temperature`` 0) output is the same on every run on CPU; sampled requests
are seeded from ``seed``, the shard and the step (the rollout engine's seeded generator; the
endpoint's ``seed`` field, which servers honour to different degrees).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Literal

from pydantic import Field, model_validator

from refinery.tasks.config import StrictModel, check_url
from refinery.tasks.runtime import ShardedStage, StageOutput, stage, sum_counts
from refinery.tasks.synth import prompts
from refinery.tasks.synth.generators import EndpointGenerator, LocalGenerator, Reply, Request

FAILURES_DIR = "failures"
TEXT_COLUMNS = ("id", "text", "url", "source")


class SynthConfig(StrictModel):
    """The ``synth`` stage's settings (also the synth flow's parameters, beside ``input``)."""

    model: str = Field(description="The generator: a model folder, a refinery training dataset (pretrain, finetune, "
                                   "align outputs) or a hub id, sampled locally by the rollout engine; with base_url, "
                                   "the model name the endpoint serves.")
    task: Literal["rephrase", "instructions", "preferences"] = Field(
        "instructions", description="rephrase: each document rewritten in `style` (a `text` column, for tokenize); "
                                    "instructions: instruction/response pairs from each document (SFT records for "
                                    "finetune); preferences: prompt/chosen/rejected pairs (for align).")
    style: Literal["wikipedia", "qa"] = Field("wikipedia", description="rephrase only: wikipedia (diverse, "
                                              "high-quality English as on Wikipedia) or qa (Question:/Answer: "
                                              "turns), WRAP's prompts (Maini et al. 2024).")
    base_url: str = Field("", description="An OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (refinery "
                                          "serve, vLLM, OpenAI); empty: the local model. The key comes from "
                                          "$REFINERY_SYNTH_API_KEY, else $OPENAI_API_KEY, never from a parameter.")
    api: Literal["chat", "completions"] = Field("chat", description="Endpoint API: chat (/chat/completions, the "
                                                "messages) or completions (/completions, a USER:/ASSISTANT: "
                                                "transcript).")
    max_new_tokens: int = Field(256, ge=1, description="Tokens generated at most per request.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature of every request but the "
                                                                "rejected replies; 0 is greedy.")
    rejected_temperature: float = Field(1.0, ge=0.0, le=2.0, description="preferences only: temperature of the "
                                        "rejected reply (written without the document).")
    include_document: bool = Field(False, description="instructions only: the user turn holds the document "
                                   "before the instruction (reading comprehension) instead of the instruction alone.")
    max_doc_chars: int = Field(4000, ge=1, description="A document is cut to this many characters in a prompt "
                               "(a local model's further to fit its context).")
    max_docs: int | None = Field(None, ge=1, description="Use at most this many documents (the first, in input "
                                 "order).")
    docs_per_shard: int = Field(32, ge=1, description="Documents per shard: the unit of parallelism and of resume "
                                "after a crash.")
    token_budget: int | None = Field(None, ge=1, description="Prompt + completion tokens the run may spend, split "
                                     "over the shards by their documents; documents beyond a shard's share are "
                                     "skipped and counted (skipped_budget).")
    concurrency: int = Field(4, ge=1, description="Endpoint: requests in flight at most, per worker process.")
    request_retries: int = Field(4, ge=0, description="Endpoint: further attempts of a request that failed "
                                 "transiently (connection, timeout, 429, 5xx), with exponential backoff.")
    retry_backoff: float = Field(1.0, ge=0.0, description="Endpoint: seconds before the first retry (doubled "
                                 "each time, jittered, capped at 30 s; a Retry-After header is honoured).")
    request_timeout: float = Field(120.0, gt=0, description="Endpoint: seconds to wait for one reply.")
    batch_size: int = Field(8, ge=1, description="Local model: sequences per rollout batch.")
    device: str = Field("auto", description="Local model: auto (cuda when available), cpu, cuda or cuda:N.")
    seed: int = Field(0, description="Seed of sampled requests (with the shard and the step).")
    max_failed_shards: int = Field(0, ge=0, description="Shards that may fail (e.g. an endpoint down past its "
                                   "retries) before the stage does; the failed ones are listed in the manifest.")

    @model_validator(mode="after")
    def _check(self) -> "SynthConfig":
        if self.base_url:
            check_url(self.base_url, "base_url")
            if not self.base_url.startswith(("http://", "https://")):
                raise ValueError("base_url: expected an http:// or https:// URL")
        return self


# --------------------------------------------------------------------------- generation, per document
class Budget:
    """One shard's share of the token budget (None: unlimited); see the module docstring. Within a
    step, documents are admitted in order until the first that does not fit: the later ones are
    skipped too, so which documents a budget keeps is a prefix, whatever their sizes."""

    def __init__(self, share: int | None):
        self.share, self.spent, self.reserved, self.exhausted = share, 0, 0, False

    def admit(self, cost: int) -> bool:
        if self.share is None:
            return True
        if self.exhausted or self.spent + self.reserved + cost > self.share:
            self.exhausted = True
            return False
        self.reserved += cost
        return True

    def settle(self, spent: int) -> None:
        """The step's requests are done: what they spent replaces what was reserved, and the next
        step admits its documents afresh (in order, until one does not fit)."""
        self.spent += spent
        self.reserved, self.exhausted = 0, False


class Shard:
    """The documents of one shard through the task's steps: rows, failures and counts."""

    def __init__(self, docs: list[dict], cfg: SynthConfig, gen: Any, budget: Budget, seed: int):
        self.cfg, self.gen, self.budget, self.seed = cfg, gen, budget, seed
        self.alive: list[dict] = []
        self.failures: list[dict] = []
        self.counts: dict[str, Any] = {"docs_in": len(docs), "docs_out": 0, "failed": 0, "failed_by_reason": {},
                                       "skipped_budget": 0, "requests": 0, "retries": 0, "prompt_tokens": 0,
                                       "completion_tokens": 0}
        for d in docs:
            if not isinstance(d.get("text"), str) or not d["text"].strip():
                self.fail(d, "input", "no_text", "the document has no text")
            else:
                d["tokens"], d["finish"] = 0, {}
                self.alive.append(d)

    def fail(self, doc: dict, step: str, reason: str, error: str) -> None:
        self.failures.append({"id": doc["id"], "source": doc.get("source"), "url": doc.get("url"), "step": step,
                              "reason": reason, "error": error[:1000]})
        self.counts["failed"] += 1
        self.counts["failed_by_reason"][reason] = self.counts["failed_by_reason"].get(reason, 0) + 1

    def fit(self, doc: dict, build) -> Any:
        """``build(document text)`` with the text cut to ``max_doc_chars`` and, for a local model, to
        what its context leaves after ``max_new_tokens``; None when even an empty document does not fit."""
        text = doc["text"][:self.cfg.max_doc_chars]
        for _ in range(4):
            messages = build(text)
            over = self.gen.overflow(messages, self.cfg.max_new_tokens)
            if over <= 0:
                return messages
            if not text:
                return None
            text = self.gen.shorten(text, over + 1)
        return None

    def step(self, name: str, asks: list[tuple[str, Any, float]], later: int = 0) -> None:
        """One round of requests for every live document: ``asks`` are (key, build(doc, text) ->
        messages, temperature); each reply's text lands in ``doc[key]``. A document whose request
        does not fit the budget or the context, or whose reply is empty, leaves the live set.
        ``later``: requests each document still makes after this step; its admission also
        reserves their worst case (a later prompt holds at most this one plus ``max_new_tokens``
        of an earlier reply), so a document is rarely admitted only to be cut off half done."""
        admitted, requests = [], []
        seed = int(hashlib.sha256(f"{self.seed}:{name}".encode()).hexdigest()[:8], 16)
        for doc in self.alive:
            built = []
            for key, build, temperature in asks:
                messages = self.fit(doc, lambda text, b=build, d=doc: b(d, text))
                if messages is None:
                    break
                built.append((key, Request(messages, temperature, seed, self.cfg.max_new_tokens)))
            if len(built) < len(asks):
                self.fail(doc, name, "document_too_long", "the prompt does not fit the model's context")
                continue
            sizes = [self.gen.count(r.messages) for _, r in built]
            m = self.cfg.max_new_tokens
            cost = sum(sizes) + len(built) * m + later * (max(sizes) + 2 * m)
            if not self.budget.admit(cost):
                self.counts["skipped_budget"] += 1
                continue
            admitted.append((doc, built))
            requests += [r for _, r in built]
        replies = self.gen.generate(requests) if requests else []
        self.budget.settle(sum(r.tokens for r in replies))
        self.counts["requests"] += len(replies)
        self.counts["retries"] = getattr(self.gen, "retried", 0)   # the shard's generator's, so far
        self.counts["prompt_tokens"] += sum(r.prompt_tokens for r in replies)
        self.counts["completion_tokens"] += sum(r.completion_tokens for r in replies)
        it = iter(replies)
        self.alive = []
        for doc, built in admitted:
            got: list[tuple[str, Reply]] = [(key, next(it)) for key, _ in built]
            doc["tokens"] += sum(r.tokens for _, r in got)
            bad = next(((k, r) for k, r in got if r.error or not r.text), None)
            if bad is not None:
                k, r = bad
                self.fail(doc, name, "refused" if r.error else f"empty_{k}", r.error or f"the {k} came back empty")
                continue
            for k, r in got:
                doc[k] = r.text
                doc["finish"][k] = r.finish_reason
            self.alive.append(doc)


def run_task(shard: Shard, cfg: SynthConfig) -> list[dict]:
    """The task's steps on a shard's live documents; the finished documents."""
    greedy = cfg.temperature
    if cfg.task == "rephrase":
        shard.step("rephrase", [("output", lambda d, t: prompts.rephrase(cfg.style, t), greedy)])
        return shard.alive
    shard.step("instruction", [("instruction", lambda d, t: prompts.instruction(t), greedy)],
               later=1 if cfg.task == "instructions" else 2)
    if cfg.task == "instructions":
        shard.step("response", [("response", lambda d, t: prompts.grounded_answer(t, d["instruction"]), greedy)])
        return shard.alive
    shard.step("answers", [("chosen", lambda d, t: prompts.grounded_answer(t, d["instruction"]), greedy),
                           ("rejected", lambda d, t: prompts.ungrounded_answer(d["instruction"]),
                            cfg.rejected_temperature)])
    done = []
    for d in shard.alive:
        if d["chosen"] == d["rejected"]:
            shard.fail(d, "answers", "identical_replies", "chosen and rejected are the same text")
        else:
            done.append(d)
    return done


# --------------------------------------------------------------------------- tables
def _metadata(doc: dict, cfg: SynthConfig) -> str:
    meta = {"synth": {"task": cfg.task, "style": cfg.style if cfg.task == "rephrase" else None,
                      "generator": generator_name(cfg), "tokens": doc["tokens"], "finish": doc["finish"],
                      "prompts_version": prompts.PROMPTS_VERSION}}
    return json.dumps(meta, ensure_ascii=False, sort_keys=True)


def rows_table(docs: list[dict], cfg: SynthConfig):
    """The output rows of finished documents, in the task's schema (module docstring)."""
    import pyarrow as pa

    base = {"id": pa.array([d["id"] for d in docs], pa.string()),
            "source": pa.array([d.get("source") for d in docs], pa.string()),
            "url": pa.array([d.get("url") for d in docs], pa.string())}
    meta = pa.array([_metadata(d, cfg) for d in docs], pa.string())
    if cfg.task == "rephrase":
        return pa.table({**base, "text": pa.array([d["output"] for d in docs], pa.string()), "metadata": meta})
    if cfg.task == "instructions":
        msg_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
        users = [(d["text"][:cfg.max_doc_chars] + "\n\n" + d["instruction"]) if cfg.include_document
                 else d["instruction"] for d in docs]
        messages = [[{"role": "user", "content": u}, {"role": "assistant", "content": d["response"]}]
                    for u, d in zip(users, docs)]
        return pa.table({**base, "messages": pa.array(messages, msg_type),
                         "instruction": pa.array([d["instruction"] for d in docs], pa.string()),
                         "response": pa.array([d["response"] for d in docs], pa.string()), "metadata": meta})
    return pa.table({**base, "prompt": pa.array([d["instruction"] for d in docs], pa.string()),
                     "chosen": pa.array([d["chosen"] for d in docs], pa.string()),
                     "rejected": pa.array([d["rejected"] for d in docs], pa.string()), "metadata": meta})


def failures_table(failures: list[dict]):
    import pyarrow as pa

    return pa.table({k: pa.array([f[k] for f in failures], pa.string())
                     for k in ("id", "source", "url", "step", "reason", "error")})


def read_docs(path: str, file: str, lo: int, hi: int) -> list[dict]:
    """Rows ``lo:hi`` of one input part (the columns a row keeps), as dicts; a missing ``id`` is
    made from the part and the row number, so lineage never points nowhere."""
    import pyarrow.parquet as pq

    from refinery.tasks.store import Dataset

    ds = Dataset.open(path)
    with ds.fs.open(file, "rb") as f:
        pf = pq.ParquetFile(f)
        cols = [c for c in TEXT_COLUMNS if c in pf.schema_arrow.names]
        if "text" not in cols:
            raise ValueError(f"synth: {file} has no `text` column (columns: {pf.schema_arrow.names})")
        table = pf.read(columns=cols).slice(lo, hi - lo)
    rows = table.to_pylist()
    for i, r in enumerate(rows):
        r["id"] = str(r["id"]) if r.get("id") is not None else f"{os.path.basename(file)}:{lo + i}"
    return rows


def generator_name(cfg: SynthConfig) -> str:
    return f"{cfg.base_url} {cfg.model}" if cfg.base_url else f"local {cfg.model}"


def make_generator(cfg: SynthConfig):
    if cfg.base_url:
        return EndpointGenerator(cfg.base_url, cfg.model, cfg.api, cfg.concurrency, cfg.request_retries,
                                 cfg.retry_backoff, cfg.request_timeout)
    return LocalGenerator(cfg.model, cfg.device, cfg.batch_size)


# --------------------------------------------------------------------------- the stage
@stage("synth", version=f"1.p{prompts.PROMPTS_VERSION}", sharded=True)
class Synth(ShardedStage):
    """inputs = [documents]; one shard per ``docs_per_shard`` documents of an input part."""

    shard_unit = "document shard"

    @staticmethod
    def identity(cfg: SynthConfig) -> list[str]:
        """A local model's identity (its dataset's fingerprint, or its files), so a retrained model
        regenerates; an endpoint is identified by base_url and model, both in the config."""
        if cfg.base_url:
            return []
        from refinery.tasks.modelref import model_identity

        return [f"model:{model_identity(cfg.model)}"]

    @staticmethod
    def plan(inputs, cfg: SynthConfig) -> list[dict]:
        if len(inputs) != 1:
            raise ValueError("synth takes one documents dataset")
        docs = inputs[0]
        rows = {docs.file(f["path"]): f.get("rows") or 0 for f in docs.manifest.get("files", [])}
        slices, left = [], cfg.max_docs
        for p, file in enumerate(f for f in docs.files if f.endswith(".parquet")):
            n = rows.get(file, 0) if left is None else min(rows.get(file, 0), left)
            for s, lo in enumerate(range(0, n, cfg.docs_per_shard)):
                slices.append((p, s, file, lo, min(n, lo + cfg.docs_per_shard)))
            if left is not None:
                left -= n
                if left <= 0:
                    break
        total = sum(hi - lo for *_, lo, hi in slices)
        if not total:
            raise ValueError(f"synth: {docs.path} holds no documents")
        return [{"name": f"part-{p:05d}-{s:05d}", "part": p, "slice": s, "dataset": docs.path, "file": file,
                 "lo": lo, "hi": hi,
                 "budget": None if cfg.token_budget is None else cfg.token_budget * (hi - lo) // total}
                for p, s, file, lo, hi in slices]

    @staticmethod
    def shard(b, item: dict, cfg: SynthConfig) -> dict:
        from refinery.tasks.card import part_name

        docs = read_docs(item["dataset"], item["file"], item["lo"], item["hi"])
        t0 = time.perf_counter()
        shard = Shard(docs, cfg, make_generator(cfg) if docs else None, Budget(item["budget"]),
                      seed=int(hashlib.sha256(f"{cfg.seed}:{item['name']}".encode()).hexdigest()[:8], 16))
        done = run_task(shard, cfg) if shard.alive else []
        seconds = time.perf_counter() - t0
        shard.counts["docs_out"] = len(done)
        if done:
            b.write_table(part_name(item["part"], item["slice"]), rows_table(done, cfg))
        if shard.failures:
            b.write_table(f"{FAILURES_DIR}/failures-{item['part']:05d}-{item['slice']:05d}.parquet",
                          failures_table(shard.failures))
        return {"counts": shard.counts, "seconds": seconds}

    @staticmethod
    def reduce(b, results: list[dict], cfg: SynthConfig, inputs) -> StageOutput:
        counts = sum_counts([r["counts"] for r in results])
        for k in ("docs_in", "docs_out", "failed", "skipped_budget", "requests", "retries", "prompt_tokens",
                  "completion_tokens"):
            counts.setdefault(k, 0)
        counts.setdefault("failed_by_reason", {})
        counts["tokens_spent"] = counts["prompt_tokens"] + counts["completion_tokens"]
        seconds = sum(r.get("seconds", 0.0) for r in results)
        if counts["docs_out"] == 0:
            raise ValueError(f"synth: no document produced a record ({counts['failed']} failed: "
                             f"{counts['failed_by_reason']}, {counts['skipped_budget']} skipped by the budget); "
                             f"see the failures table under {b.path(FAILURES_DIR)}")
        return StageOutput(
            counts=counts,
            stats={"generate_seconds": round(seconds, 3),
                   "completion_tokens_per_s": round(counts["completion_tokens"] / seconds, 1) if seconds else None},
            extra={"task": cfg.task, "style": cfg.style if cfg.task == "rephrase" else None,
                   "generator": {"kind": "endpoint" if cfg.base_url else "local", "model": cfg.model,
                                 "base_url": cfg.base_url or None},
                   "prompts_version": prompts.PROMPTS_VERSION,
                   "token_budget": {"limit": cfg.token_budget, "spent": counts["tokens_spent"],
                                    "counted": "prompt + completion tokens per request (local: token ids; "
                                               "endpoint: the server's usage, else chars/3); split over shards "
                                               "by documents"}})


__all__ = ["SynthConfig", "Synth", "Shard", "Budget", "run_task", "rows_table", "failures_table", "read_docs",
           "make_generator", "FAILURES_DIR"]
