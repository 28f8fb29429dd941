"""Instruction and preference data derived from curated documents, for the demo's finetune and align.

``make_instructions(docs, out_path, seed=0, n=400)`` writes an Alpaca-format JSON list of
``{"instruction", "input", "output"}``; ``make_preferences(docs, out_path, seed=0, n=300)`` writes
HH-RLHF JSONL lines ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``.

Every example is computed from the document text itself, so a model can learn it:

- ``summarize``: a passage of several sentences -> its lead sentence,
- ``title``: the opening of an article -> its title (the document's ``title`` field or first line),
- ``continue``: two or three consecutive sentences -> the next sentence,
- ``topic``: a passage -> the words it uses most (stop words excluded),
- ``keywords``: a passage -> its five most frequent content words,
- ``write``: a title -> the article's first paragraph.

Rejected responses are plausibly worse: the same kind of answer taken from an unrelated document,
the right answer cut off mid-way, a repetitive loop of its first words, or an evasive non-answer.

Both functions are deterministic: documents are put in a canonical order (by URL, then text hash)
and duplicates dropped before a seeded RNG picks the examples, so the input order does not matter.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

from refinery.tasks.demo.crawl import _write_if_changed

TASKS = ("summarize", "title", "continue", "topic", "keywords", "write")
REJECTION_KINDS = ("unrelated", "truncated", "repetitive", "evasive")

INSTRUCTIONS = {
    "summarize": "Summarize the following passage in one sentence.",
    "title": "Give this passage a title.",
    "continue": "Continue the text with the next sentence.",
    "topic": "What topic does this text discuss?",
    "keywords": "List the five most important keywords of this passage, separated by commas.",
    "write": "Write a short paragraph about the following topic.",
}
EVASIVE = ["I am not sure what you mean.", "Sorry, I cannot help with that.", "That is a good question.",
           "It depends.", "I don't know."]

MIN_WORDS = 30          # documents shorter than this are skipped
MAX_INPUT_WORDS = 90    # passages given as input are cut at a sentence boundary near this length

_STOP = frozenset("""
a about above after again against all also an and any are as at be because been before being below between
both but by can could did do does doing down during each either else every few for from further had has have
having he her here hers him his how however i if in into is it its itself just may me might more most must my
no nor not now of off on once one only or other otherwise our out over own same she should since so some such
than that the their them then there these they this those through thus to too under until up upon us very
was way we were what when where whether which while who whom why will with within without would yet you your
used use uses using return returns returned given given new default object value values true false none
""".split())
_SENT_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])|(?<=[。！？])")
_WORD = re.compile(r"[^\W\d_][\w'-]*[^\W_]|[^\W\d_]{2,}")


# --------------------------------------------------------------------------- text helpers
def split_sentences(text: str) -> list[str]:
    """Sentences of one paragraph (a light rule-based splitter: terminal punctuation + capital)."""
    return [s.strip() for s in _SENT_END.split(" ".join(text.split())) if s and s.strip()]


def _is_prose_line(line: str) -> bool:
    return len(line.split()) >= 10 and line.rstrip()[-1:] in ".!?。！？\"'"


def _is_title_line(line: str) -> bool:
    """A heading-like first line: short, capitalised, no sentence end, no menu or byline marks."""
    words = line.split()
    return (2 <= len(words) <= 14 and line[0].isalnum() and line.rstrip()[-1:] not in ".!?:;,。！？"
            and not any(c in line for c in "|·©»›@") and not line.startswith(("By ", "Posted ", "Published ")))


def _structure(doc: dict) -> dict | None:
    """Title, prose paragraphs and sentences of one document, or None when it is too short."""
    text = doc.get("text")
    if not isinstance(text, str) or len(text.split()) < MIN_WORDS:
        return None
    lines = [" ".join(l.split()) for l in text.splitlines()]
    lines = [l for l in lines if l]
    title = doc.get("title")
    title = title if isinstance(title, str) and title.strip() else None
    if title is None:
        title = next((l for l in lines[:3] if _is_title_line(l)), None)
    paras = [l for l in lines if _is_prose_line(l)]
    if not paras:
        return None
    sents = [split_sentences(p) for p in paras]
    return {"title": title.strip() if title else None, "paras": paras, "sents": sents,
            "url": doc.get("url") or "", "all_sents": [s for ss in sents for s in ss]}


def _clip(sentences: list[str], max_words: int = MAX_INPUT_WORDS) -> str:
    out: list[str] = []
    words = 0
    for s in sentences:
        n = len(s.split())
        if out and words + n > max_words:
            break
        out.append(s)
        words += n
    return " ".join(out)


def keywords(text: str, k: int = 5) -> list[str]:
    """The ``k`` most frequent content words of ``text`` (ties: first occurrence first)."""
    words = [w.lower() for w in _WORD.findall(text)]
    words = [w for w in words if len(w) > 3 and w not in _STOP]
    counts = Counter(words)
    first: dict[str, int] = {}
    for i, w in enumerate(words):
        first.setdefault(w, i)
    return sorted(counts, key=lambda w: (-counts[w], first[w]))[:k]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# --------------------------------------------------------------------------- examples
def _example(task: str, d: dict, rng: random.Random) -> dict | None:
    """One example of ``task`` for the structured document ``d`` (None if it does not apply)."""
    paras, sents = d["paras"], d["sents"]
    if task == "summarize":
        cands = [i for i, ss in enumerate(sents) if len(ss) >= 3]
        if not cands:
            return None
        ss = sents[rng.choice(cands)]
        return {"instruction": INSTRUCTIONS[task], "input": _clip(ss), "output": ss[0]}
    if task == "title":
        if not d["title"]:
            return None
        return {"instruction": INSTRUCTIONS[task], "input": _clip(d["all_sents"]), "output": d["title"]}
    if task == "continue":
        allv = d["all_sents"]
        if len(allv) < 3:
            return None
        k = rng.choice([2, 3]) if len(allv) >= 4 else 2
        start = rng.randrange(0, len(allv) - k)
        return {"instruction": INSTRUCTIONS[task], "input": " ".join(allv[start:start + k]),
                "output": allv[start + k]}
    if task == "topic":
        i = rng.randrange(len(paras))
        passage = _clip(sents[i])
        kw = keywords(passage, 3)
        if len(kw) < 2:
            return None
        return {"instruction": INSTRUCTIONS[task], "input": passage,
                "output": f"The text discusses {_join(kw)}."}
    if task == "keywords":
        passage = _clip(d["all_sents"])
        kw = keywords(passage, 5)
        if len(kw) < 5:
            return None
        return {"instruction": INSTRUCTIONS[task], "input": passage, "output": ", ".join(kw)}
    if task == "write":
        if not d["title"] or len(paras[0].split()) < 15:
            return None
        return {"instruction": INSTRUCTIONS[task], "input": d["title"], "output": _clip(sents[0], 120)}
    raise ValueError(f"unknown task {task!r}")


def _canonical_docs(docs: Iterable[dict]) -> list[dict]:
    seen: set[str] = set()
    keyed = []
    for doc in docs:
        d = _structure(doc)
        if d is None:
            continue
        h = hashlib.sha1(doc["text"].encode("utf-8")).hexdigest()
        if h in seen:
            continue
        seen.add(h)
        keyed.append(((d["url"], h), d))
    keyed.sort(key=lambda kv: kv[0])
    return [d for _, d in keyed]


def instruction_examples(docs: Iterable[dict], *, seed: int = 0, n: int = 400,
                         tasks: tuple[str, ...] = TASKS) -> list[dict]:
    """Up to ``n`` Alpaca examples (``instruction``, ``input``, ``output``, plus ``task``), balanced over tasks."""
    return [dict(e) for e, _, _ in _pick(_canonical_docs(docs), seed, n, tasks, "instructions")]


def _pick(docs: list[dict], seed: int, n: int, tasks: tuple[str, ...], purpose: str):
    """(example, task, doc index) triples: round-robin over tasks, documents in a seeded order."""
    rng = random.Random(f"refinery-demo-{purpose}/{seed}")
    per_task: dict[str, list] = {}
    for task in tasks:
        order = list(range(len(docs)))
        rng.shuffle(order)
        cands = []
        for i in order:
            ex = _example(task, docs[i], rng)
            if ex is not None and ex["output"].strip() and ex["output"] != ex["input"]:
                cands.append(({**ex, "task": task}, task, i))
        per_task[task] = cands
    out: list[tuple[dict, str, int]] = []
    pos = {t: 0 for t in tasks}
    while len(out) < n and any(pos[t] < len(per_task[t]) for t in tasks):
        for t in tasks:
            if len(out) >= n:
                break
            if pos[t] < len(per_task[t]):
                out.append(per_task[t][pos[t]])
                pos[t] += 1
    rng.shuffle(out)
    return out


# --------------------------------------------------------------------------- preferences
def _reject(kind: str, ex: dict, task: str, doc_i: int, docs: list[dict], rng: random.Random) -> tuple[str, str]:
    """A worse answer than ``ex["output"]`` and the kind of rejection actually used."""
    good = ex["output"]
    words = good.split()
    if kind == "truncated" and len(words) >= 4:
        cut = max(1, min(len(words) - 2, len(words) * rng.randrange(30, 60) // 100))
        return " ".join(words[:cut]), kind
    if kind == "repetitive" and len(words) >= 2:
        head = " ".join(words[: min(4, len(words))]).rstrip(".,;:")
        return " ".join([head] * rng.randrange(3, 6)), kind
    if kind == "evasive":
        return rng.choice(EVASIVE), kind
    # unrelated (also the fallback): the same kind of answer taken from another document
    for _ in range(20):
        j = rng.randrange(len(docs))
        if j == doc_i or len(docs) == 1:
            continue
        other = _example(task, docs[j], rng)
        if other is not None and other["output"] != good:
            return other["output"], "unrelated"
        s = docs[j]["all_sents"]
        if s:
            cand = rng.choice(s)
            if cand != good:
                return cand, "unrelated"
    return rng.choice(EVASIVE), "evasive"


def hh_transcript(prompt: str, answer: str) -> str:
    return f"\n\nHuman: {prompt}\n\nAssistant: {answer}"


def preference_pairs(docs: Iterable[dict], *, seed: int = 0, n: int = 300,
                     tasks: tuple[str, ...] = TASKS) -> list[dict]:
    """Up to ``n`` HH-RLHF records ``{"chosen", "rejected"}`` (plus ``task`` and ``rejection``)."""
    canon = _canonical_docs(docs)
    rng = random.Random(f"refinery-demo-preferences-reject/{seed}")
    out = []
    for k, (ex, task, i) in enumerate(_pick(canon, seed, n, tasks, "preferences")):
        bad, kind = _reject(REJECTION_KINDS[k % len(REJECTION_KINDS)], ex, task, i, canon, rng)
        if bad.strip() == ex["output"].strip():
            continue
        prompt = ex["instruction"] + ("\n\n" + ex["input"] if ex["input"] else "")
        out.append({"chosen": hh_transcript(prompt, ex["output"]), "rejected": hh_transcript(prompt, bad),
                    "task": task, "rejection": kind})
    return out


def make_instructions(docs: Iterable[dict], out_path: str | Path, *, seed: int = 0, n: int = 400) -> Path:
    """Write up to ``n`` Alpaca examples built from ``docs`` (dicts with ``text``, ``url``) as a JSON list.

    Raises ValueError when no document yields an example.
    """
    examples = [{k: e[k] for k in ("instruction", "input", "output")}
                for e in instruction_examples(docs, seed=seed, n=n)]
    if not examples:
        raise ValueError("no instruction examples: every document is too short or has no prose")
    path = Path(out_path)
    _write_if_changed(path, (json.dumps(examples, ensure_ascii=False, indent=1) + "\n").encode("utf-8"))
    return path


def make_preferences(docs: Iterable[dict], out_path: str | Path, *, seed: int = 0, n: int = 300) -> Path:
    """Write up to ``n`` HH-RLHF preference pairs built from ``docs`` as JSONL (``chosen``, ``rejected``).

    Raises ValueError when no document yields a pair.
    """
    pairs = preference_pairs(docs, seed=seed, n=n)
    if not pairs:
        raise ValueError("no preference pairs: every document is too short or has no prose")
    path = Path(out_path)
    lines = [json.dumps({"chosen": p["chosen"], "rejected": p["rejected"]}, ensure_ascii=False) for p in pairs]
    _write_if_changed(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path
