"""SFT data: read instruction files, check every record, render chat templates, mask prompts, pack.

Formats (detected per record with ``fmt="auto"``):

- **Alpaca**: ``{"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}``
- **ShareGPT**: ``{"conversations": [{"from": "human"|"gpt"|"system"|"function_call"|"observation",
  "value": str}, ...], "system"?, "tools"?}``
- **OpenAI messages**: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str |
  [{"type": "text", "text": str}, ...]}, ...]}``
- **self-instruct**: ``{"instruction", "instances": [{"input", "output"}, ...]}`` (one example per
  instance)

The data is any location :mod:`refinery.tasks.records` reads (JSON, JSONL, gzipped, Parquet, Arrow,
a dataset folder, an fsspec URL), streaming: JSON arrays numbered from 1, JSONL by line, tables by
row. A bad record is counted by reason and listed with its number; reading goes on.
:func:`read_split_encode` reads, splits and encodes without holding the data in memory: training
examples wait on disk, encoded (:class:`EncodedStore`), and batches are built when they are drawn
(:class:`Batches`).

Every example becomes a list of ``{"role", "content"}`` messages. It is rendered with the
tokenizer's chat template, or :data:`DEFAULT_CHAT_TEMPLATE` when the tokenizer has none, and the
loss covers only the assistant turns: every other token gets the label ``-100``. The assistant
spans are found by rendering the conversation prefix by prefix (``messages[:i]`` with the
generation prompt, then ``messages[:i+1]``), so any template that renders prefixes as prefixes
works; the character spans are mapped to tokens with the fast tokenizer's offsets.

Heavy imports (torch) happen inside functions.
"""
from __future__ import annotations

import json
import os
import random
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, MutableSequence, Sequence

IGNORE = -100
MAX_LISTED_BAD = 50

# The project's default chat template, for tokenizers without one. Plain-text headers (no new
# special tokens, so any vocabulary can express it); each assistant turn ends with EOS, so the
# model learns to stop; separators sit *before* headers so an assistant span is exactly its
# content plus EOS.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for m in messages %}"
    "{% if not loop.first %}\n\n{% endif %}"
    "{% if m['role'] == 'system' %}### System:\n{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}### User:\n{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}### Assistant:\n{{ m['content'] }}{{ eos_token if eos_token else '' }}"
    "{% else %}### Tool:\n{{ m['content'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}\n\n{% endif %}### Assistant:\n{% endif %}"
)

_SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "model": "assistant", "function_call": "assistant",
    "system": "system",
    "observation": "tool", "tool": "tool", "function": "tool",
}
_OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                 "tool": "tool", "function": "tool"}


class BadRecord(ValueError):
    """A record that cannot become an example; the message is the reason (counted by its first words)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Example:
    messages: list[dict]
    record: int  # 1-based record number (line number for JSONL)


@dataclass
class ReadReport:
    path: str
    records: int = 0
    examples: int = 0
    bad: int = 0
    bad_by_reason: Counter = field(default_factory=Counter)
    bad_records: list[dict] = field(default_factory=list)  # the first MAX_LISTED_BAD: {record, reason}
    formats: Counter = field(default_factory=Counter)

    def add_bad(self, record: int, err: BadRecord) -> None:
        self.bad += 1
        self.bad_by_reason[err.reason] += 1
        if len(self.bad_records) < MAX_LISTED_BAD:
            self.bad_records.append({"record": record, "reason": str(err)})

    def as_dict(self) -> dict:
        return {"path": self.path, "records": self.records, "examples": self.examples, "bad": self.bad,
                "bad_by_reason": dict(sorted(self.bad_by_reason.items())), "bad_records": self.bad_records,
                "formats": dict(sorted(self.formats.items()))}


# --------------------------------------------------------------------------- reading
def iter_raw_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(record number, parsed JSON or BadRecord)`` of a data location, streaming: any file or
    folder :func:`refinery.tasks.records.iter_records` reads (a line that is not JSON is an
    ``invalid_json`` BadRecord)."""
    from refinery.tasks.records import InvalidRecord, iter_records

    for n, rec in iter_records(path):
        yield n, (BadRecord("invalid_json", rec.message) if isinstance(rec, InvalidRecord) else rec)


def _text(value: Any, what: str, required: bool = True) -> str:
    if value is None:
        if required:
            raise BadRecord(f"missing_{what}")
        return ""
    if isinstance(value, list):  # OpenAI content parts
        parts = []
        for part in value:
            if isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
            else:
                raise BadRecord(f"bad_{what}", "non-text content part")
        value = "".join(parts)
    if not isinstance(value, str):
        raise BadRecord(f"bad_{what}", f"expected a string, got {type(value).__name__}")
    if required and not value.strip():
        raise BadRecord(f"empty_{what}")
    return value


def detect_format(rec: dict) -> str:
    if "messages" in rec:
        return "openai"
    if "conversations" in rec:
        return "sharegpt"
    if "instances" in rec and "instruction" in rec:
        return "self_instruct"
    if "instruction" in rec or "output" in rec:
        return "alpaca"
    raise BadRecord("unknown_format", f"keys {sorted(rec)[:6]}")


def _finish(messages: list[dict]) -> list[dict]:
    """Drop trailing non-assistant turns; demand at least one non-empty assistant turn."""
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadRecord("no_assistant_turn")
    if not any(m["role"] == "user" for m in messages):
        raise BadRecord("no_user_turn")
    return messages


def alpaca_messages(rec: dict) -> list[dict]:
    instruction = _text(rec.get("instruction"), "instruction")
    inp = _text(rec.get("input"), "input", required=False)
    output = _text(rec.get("output"), "output")
    msgs = []
    system = _text(rec.get("system"), "system", required=False)
    if system.strip():
        msgs.append({"role": "system", "content": system})
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise BadRecord("bad_history", "expected a list of [query, response] pairs")
    for turn in history:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise BadRecord("bad_history", "expected [query, response] pairs")
        msgs.append({"role": "user", "content": _text(turn[0], "history")})
        msgs.append({"role": "assistant", "content": _text(turn[1], "history")})
    user = instruction + ("\n\n" + inp if inp.strip() else "")
    msgs.append({"role": "user", "content": user})
    msgs.append({"role": "assistant", "content": output})
    return _finish(msgs)


def sharegpt_messages(rec: dict) -> list[dict]:
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise BadRecord("bad_conversations", "expected a non-empty list")
    msgs = []
    system = _text(rec.get("system"), "system", required=False)
    tools = rec.get("tools")
    if tools:
        tools_text = tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)
        system = (system + "\n\n" if system.strip() else "") + "Available tools:\n" + tools_text
    if system.strip():
        msgs.append({"role": "system", "content": system})
    for turn in conv:
        if not isinstance(turn, dict):
            raise BadRecord("bad_turn", "expected an object with 'from' and 'value'")
        role = _SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise BadRecord("unknown_role", repr(turn.get("from")))
        content = _text(turn.get("value"), "value", required=role == "assistant")
        if role == "system" and msgs and msgs[0]["role"] == "system":
            msgs[0]["content"] += "\n\n" + content
        else:
            msgs.append({"role": role, "content": content})
    return _finish(msgs)


def openai_messages(rec: dict) -> list[dict]:
    raw = rec.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BadRecord("bad_messages", "expected a non-empty list")
    msgs = []
    for m in raw:
        if not isinstance(m, dict):
            raise BadRecord("bad_message", "expected an object with 'role' and 'content'")
        role = _OPENAI_ROLES.get(str(m.get("role", "")).lower())
        if role is None:
            raise BadRecord("unknown_role", repr(m.get("role")))
        content = m.get("content")
        if content is None and m.get("tool_calls"):
            content = json.dumps(m["tool_calls"], ensure_ascii=False, sort_keys=True)
        msgs.append({"role": role, "content": _text(content, "content", required=role == "assistant")})
    return _finish(msgs)


def self_instruct_messages(rec: dict) -> list[list[dict]]:
    instruction = _text(rec.get("instruction"), "instruction")
    instances = rec.get("instances")
    if not isinstance(instances, list) or not instances:
        raise BadRecord("bad_instances", "expected a non-empty list")
    out = []
    for inst in instances:
        if not isinstance(inst, dict):
            raise BadRecord("bad_instances", "expected objects with input and output")
        out.append(alpaca_messages({"instruction": instruction, "input": inst.get("input"),
                                    "output": inst.get("output")}))
    return out


def record_to_examples(rec: Any, fmt: str = "auto") -> tuple[str, list[list[dict]]]:
    """The format and the message lists of one raw record (raises :class:`BadRecord`)."""
    if isinstance(rec, BadRecord):
        raise rec
    if not isinstance(rec, dict):
        raise BadRecord("not_an_object", type(rec).__name__)
    kind = detect_format(rec) if fmt == "auto" else fmt
    if kind == "alpaca":
        return kind, [alpaca_messages(rec)]
    if kind == "sharegpt":
        return kind, [sharegpt_messages(rec)]
    if kind == "openai":
        return kind, [openai_messages(rec)]
    if kind == "self_instruct":
        return kind, self_instruct_messages(rec)
    raise ValueError(f"unknown data format {fmt!r}")


def iter_examples(path: str | Path, report: ReadReport, fmt: str = "auto", max_records: int | None = None,
                  log: Any = None, stop_at: int | None = None) -> Iterator[Example]:
    """The valid examples of a data location in order, streaming; ``report`` counts the records read
    and the bad ones (by number). Stops after ``max_records`` valid records, or past record
    ``stop_at``."""
    for n, rec in iter_raw_records(path):
        if max_records is not None and report.records - report.bad >= max_records:
            break
        if stop_at is not None and n > stop_at:
            break
        report.records += 1
        try:
            kind, convs = record_to_examples(rec, fmt)
        except BadRecord as e:
            report.add_bad(n, e)
            if log is not None and report.bad <= 10:
                log(f"{path}: record {n} skipped: {e}")
            continue
        report.formats[kind] += 1
        report.examples += len(convs)
        for c in convs:
            yield Example(c, n)
    if log is not None and report.bad > 10:
        log(f"{path}: {report.bad} bad records in all ({dict(report.bad_by_reason)})")


def read_examples(path: str | Path, fmt: str = "auto", max_records: int | None = None,
                  log: Any = None) -> tuple[list[Example], ReadReport]:
    """All valid examples of a data location, in memory, and a report of the bad records (by
    number). Training on a causal LM reads streaming instead (:func:`read_split_encode`)."""
    report = ReadReport(path=str(path))
    examples = list(iter_examples(path, report, fmt, max_records, log))
    return examples, report


def _shuffle_records(records: MutableSequence[int], val_fraction: float, seed: int, max_val: int | None) -> int:
    """Shuffle the record numbers in place (seeded) and return how many of the first go to validation."""
    random.Random(seed).shuffle(records)
    n_val = int(round(len(records) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(records) > 1:
        n_val = 1
    if max_val is not None:
        n_val = min(n_val, max_val)
    return n_val


def split_examples(examples: Sequence[Example], val_fraction: float, seed: int,
                   max_val: int | None = None) -> tuple[list[Example], list[Example]]:
    """Deterministic shuffle, then the first share goes to validation (whole records stay together)."""
    records = sorted({e.record for e in examples})
    n_val = _shuffle_records(records, val_fraction, seed, max_val)
    val_records = set(records[:n_val])
    order = {r: i for i, r in enumerate(records)}
    train = sorted((e for e in examples if e.record not in val_records), key=lambda e: order[e.record])
    val = sorted((e for e in examples if e.record in val_records), key=lambda e: order[e.record])
    return train, val


# --------------------------------------------------------------------------- templates and masking
def ensure_chat_template(tokenizer) -> str:
    """Give the tokenizer the project default template when it has none; returns which one is used."""
    if getattr(tokenizer, "chat_template", None):
        return "tokenizer"
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return "default"


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (content + end token)."""
    full = render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            pre = render(tokenizer, messages[:i], add_generation_prompt=True) if i else None
        except Exception:  # some templates refuse an empty or odd prefix
            pre = None
        upto = render(tokenizer, messages[: i + 1])
        if pre is not None and upto.startswith(pre) and full.startswith(upto) and len(pre) >= cursor:
            start, end = len(pre), len(upto)
            # a template may append a separator after the turn's end token: keep it in the prompt
            stripped = full[start:end].rstrip("\n ")
            end = start + len(stripped) if stripped else end
        else:  # fallback: find the content itself after the previous turn
            start = full.find(m["content"], cursor)
            if start < 0:
                raise BadRecord("template_mismatch", "assistant text not found in the rendered conversation")
            end = start + len(m["content"])
        spans.append((start, end))
        cursor = end
    return full, spans


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    record: int
    truncated: bool = False

    @property
    def n_labels(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE)


def encode(tokenizer, messages: list[dict], seq_len: int, record: int = 0) -> Encoded:
    """Token ids and labels (prompt tokens = -100) of one conversation, cut to ``seq_len``."""
    full, spans = assistant_spans(tokenizer, messages)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [IGNORE] * len(ids)
        # a token is a response token when its last character lies in an assistant span (so a
        # SentencePiece "▁word" whose leading space belongs to the prompt still counts)
        j = 0
        for t, (s, e) in enumerate(enc["offset_mapping"]):
            if e <= s:
                continue
            while j < len(spans) and e - 1 >= spans[j][1]:
                j += 1
            if j < len(spans) and spans[j][0] <= e - 1 < spans[j][1]:
                labels[t] = ids[t]
    else:  # slow tokenizer: tokenize piece by piece at the span boundaries
        ids, labels, pos = [], [], 0
        for s, e in spans:
            for piece, train in ((full[pos:s], False), (full[s:e], True)):
                if piece:
                    p = tokenizer(piece, add_special_tokens=False)["input_ids"]
                    ids += p
                    labels += p if train else [IGNORE] * len(p)
            pos = e
        if full[pos:]:
            p = tokenizer(full[pos:], add_special_tokens=False)["input_ids"]
            ids += p
            labels += [IGNORE] * len(p)
    if labels:
        labels[0] = IGNORE  # nothing predicts the first token
    truncated = len(ids) > seq_len
    return Encoded(ids[:seq_len], labels[:seq_len], record, truncated)


def _encode_counted(tokenizer, ex: Example, seq_len: int, report: ReadReport | None,
                    counts: Counter) -> Encoded | None:
    """:func:`encode` of one example with the counts of :func:`encode_all`; None when it is dropped."""
    try:
        e = encode(tokenizer, ex.messages, seq_len, ex.record)
    except BadRecord as err:
        counts["template_error"] += 1
        if report is not None:
            report.add_bad(ex.record, err)
        return None
    except Exception as err:  # a template that raises on this conversation
        counts["template_error"] += 1
        if report is not None:
            report.add_bad(ex.record, BadRecord("template_error", str(err)[:200]))
        return None
    counts["truncated"] += int(e.truncated)
    n_labels = e.n_labels
    if n_labels == 0:
        counts["no_response_tokens"] += 1
        if report is not None:
            report.add_bad(ex.record, BadRecord("no_response_tokens", f"all response tokens beyond seq_len={seq_len}"))
        return None
    counts["examples"] += 1
    counts["tokens"] += len(e.input_ids)
    counts["label_tokens"] += n_labels
    return e


def encode_all(tokenizer, examples: Iterable[Example], seq_len: int, report: ReadReport | None = None,
               progress: bool = False) -> tuple[list[Encoded], dict]:
    """Encode examples; count truncations and drop examples left without any response token."""
    out: list[Encoded] = []
    counts: Counter[str] = Counter({"examples": 0, "tokens": 0, "label_tokens": 0})
    it: Iterable = examples
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(examples, desc="tokenize", unit="ex", leave=False)
    for ex in it:
        e = _encode_counted(tokenizer, ex, seq_len, report, counts)
        if e is not None:
            out.append(e)
    return out, dict(counts)


class EncodedStore(Sequence[Encoded]):
    """Encoded examples kept in an unlinked temporary file (token ids as uint32 and a one-byte
    label mask per token), read back one by one: memory holds only the offsets, lengths, record
    numbers and order (about 33 bytes an example), whatever the size of the data.

    ``append`` in any order, then :meth:`finish` with the order the sequence presents them in."""

    def __init__(self, folder: str | None = None):
        import tempfile
        import weakref

        fd, name = tempfile.mkstemp(prefix="refinery-sft-", suffix=".tokens", dir=folder)
        os.unlink(name)   # gone with the process, however it ends
        self._fd = fd
        self._close = weakref.finalize(self, os.close, fd)
        self._pending = bytearray()
        self._end = 0
        self.offsets, self.lengths = array("q"), array("q")
        self.records, self.truncated = array("q"), array("b")
        self.order: Any = None

    def append(self, e: Encoded) -> None:
        import numpy as np

        ids = np.asarray(e.input_ids, dtype=np.uint32)
        mask = np.asarray(e.labels, dtype=np.int64) != IGNORE
        self.offsets.append(self._end + len(self._pending))
        self.lengths.append(len(ids))
        self.records.append(e.record)
        self.truncated.append(int(e.truncated))
        self._pending += ids.tobytes() + mask.astype(np.uint8).tobytes()
        if len(self._pending) >= 1 << 20:
            self._flush()

    def _flush(self) -> None:
        view = memoryview(self._pending)
        while view:
            n = os.pwrite(self._fd, view, self._end)
            self._end += n
            view = view[n:]
        self._pending = bytearray()

    def finish(self, order: Any = None) -> "EncodedStore":
        """Write out what is pending; ``order`` (stored indices) is the order of the sequence."""
        import numpy as np

        self._flush()
        self.order = np.arange(len(self.offsets), dtype=np.int64) if order is None else np.asarray(order, np.int64)
        return self

    def __len__(self) -> int:
        return 0 if self.order is None else len(self.order)

    def length(self, i: int) -> int:
        return int(self.lengths[int(self.order[i])])

    def __getitem__(self, i):  # type: ignore[override]
        import numpy as np

        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(self.order[i])
        n = self.lengths[k]
        raw = os.pread(self._fd, 5 * n, self.offsets[k])
        ids = np.frombuffer(raw, dtype=np.uint32, count=n).astype(np.int64)
        mask = np.frombuffer(raw, dtype=np.uint8, offset=4 * n, count=n).astype(bool)
        labels = np.where(mask, ids, IGNORE)
        return Encoded(ids.tolist(), labels.tolist(), self.records[k], bool(self.truncated[k]))


@dataclass
class SFTSplit:
    """What :func:`read_split_encode` gives: the training examples encoded on disk, the validation
    ones in memory (at most ``max_val`` records), their counts, and the report of the data."""

    report: ReadReport
    train_items: Sequence[Encoded]
    val_items: list[Encoded]
    train_counts: dict
    val_counts: dict
    val_examples: list[Example]


def read_split_encode(tokenizer, path: str | Path, seq_len: int, *, fmt: str = "auto",
                      max_records: int | None = None, val_fraction: float = 0.1, seed: int = 0,
                      max_val: int | None = None, log: Any = None, progress: bool = False,
                      folder: str | None = None) -> SFTSplit:
    """Read, split and encode a data location without holding it in memory; the same examples,
    split, order and counts as :func:`read_examples`, :func:`split_examples` and :func:`encode_all`.

    Two streaming passes: the first checks every record and keeps only the numbers of the valid ones
    (8 bytes each), from which the seeded split is drawn exactly as :func:`split_examples` draws it;
    the second reads the records again, keeps the validation examples and encodes each training
    example into an :class:`EncodedStore` (``folder``: where its temporary file goes, default the
    system's), presented in the split's order."""
    import numpy as np

    report = ReadReport(path=str(path))
    records: array = array("q")
    for ex in iter_examples(path, report, fmt, max_records, log):
        if not records or records[-1] != ex.record:
            records.append(ex.record)
    store = EncodedStore(folder)
    if not records:
        return SFTSplit(report, store.finish(), [], {}, {}, [])
    shuffled = array("q", records)
    n_val = _shuffle_records(shuffled, val_fraction, seed, max_val)
    val_records = set(shuffled[:n_val])
    by_number = np.frombuffer(records, dtype=np.int64)            # ascending
    rank = np.empty(len(records), dtype=np.int64)                 # record (by position) -> shuffled rank
    rank[np.searchsorted(by_number, np.frombuffer(shuffled, dtype=np.int64))] = np.arange(len(records))
    del shuffled

    counts: Counter[str] = Counter({"examples": 0, "tokens": 0, "label_tokens": 0})
    val_ex: list[Example] = []
    again = iter_examples(path, ReadReport(path=str(path)), fmt, stop_at=records[-1])   # bad ones: counted already
    if progress:
        from tqdm.auto import tqdm

        again = tqdm(again, desc="tokenize", unit="ex", leave=False, total=report.examples)
    for ex in again:
        if ex.record in val_records:
            val_ex.append(ex)
            continue
        e = _encode_counted(tokenizer, ex, seq_len, report, counts)
        if e is not None:
            store.append(e)
    stored = np.frombuffer(store.records, dtype=np.int64) if len(store.records) else np.zeros(0, np.int64)
    store.finish(np.argsort(rank[np.searchsorted(by_number, stored)], kind="stable"))
    val_ex.sort(key=lambda e: int(rank[np.searchsorted(by_number, e.record)]))
    val_items, val_counts = encode_all(tokenizer, val_ex, seq_len, report)
    return SFTSplit(report, store, val_items, dict(counts), val_counts, val_ex)


# --------------------------------------------------------------------------- batches
@dataclass
class Batch:
    input_ids: Any          # LongTensor [B, L]
    labels: Any             # LongTensor [B, L]
    attention_mask: Any     # LongTensor [B, L] or None (packed rows)
    position_ids: Any       # LongTensor [B, L] or None (unpacked rows)
    n_tokens: int           # real (non-pad) tokens
    n_labels: int           # tokens in the loss (after the shift)

    def to(self, device) -> "Batch":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(mv(self.input_ids), mv(self.labels), mv(self.attention_mask), mv(self.position_ids),
                     self.n_tokens, self.n_labels)


def _shifted_labels(labels: list[int]) -> int:
    return sum(1 for x in labels[1:] if x != IGNORE)


def pad_batch(items: Sequence[Encoded], pad_id: int) -> Batch:
    """Right-padded rows with an attention mask."""
    import torch

    L = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), L), pad_id, dtype=torch.long)
    labels = torch.full((len(items), L), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), L), dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return Batch(ids, labels, mask, None, int(mask.sum()), sum(_shifted_labels(e.labels) for e in items))


@dataclass
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    n_examples: int


def pack(items: Sequence[Encoded], seq_len: int) -> list[PackedRow]:
    """Greedy in-order packing into rows of at most ``seq_len`` tokens. Position ids restart at 0 for
    every example, which is what keeps examples from attending to each other (the model builds a
    block-diagonal causal mask from them when no attention mask is given); the first token of each
    example is never a target, so no example predicts from another's tokens."""
    rows: list[PackedRow] = []
    cur = PackedRow([], [], [], 0)
    for e in items:
        n = len(e.input_ids)
        if cur.input_ids and len(cur.input_ids) + n > seq_len:
            rows.append(cur)
            cur = PackedRow([], [], [], 0)
        cur.input_ids += e.input_ids
        cur.labels += [IGNORE] + list(e.labels[1:])
        cur.position_ids += list(range(n))
        cur.n_examples += 1
    if cur.input_ids:
        rows.append(cur)
    return rows


def packed_batch(rows: Sequence[PackedRow], pad_id: int) -> Batch:
    """Packed rows padded to the longest; the padding is one more 'example' (positions from 0) whose
    labels are ignored. No attention mask: the position ids carry the example boundaries."""
    import torch

    L = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), L), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), L), dtype=torch.long)
    n_tokens = 0
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        pos[i, :n] = torch.tensor(r.position_ids)
        pos[i, n:] = torch.arange(L - n)
        n_tokens += n
    return Batch(ids, labels, None, pos, n_tokens, sum(_shifted_labels(r.labels) for r in rows))


class Batches(Sequence[Batch]):
    """An epoch's batches, built when indexed (so an epoch never sits in memory as tensors): batch
    ``k`` holds the items ``order[bounds[k]:bounds[k + 1]]``."""

    def __init__(self, items: Sequence[Encoded], order: Sequence[int], bounds: Sequence[int], pad_id: int,
                 packing: bool, seq_len: int):
        self.items, self.order, self.bounds = items, order, bounds
        self.pad_id, self.packing, self.seq_len = pad_id, packing, seq_len

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        chunk = [self.items[self.order[i]] for i in range(self.bounds[k], self.bounds[k + 1])]
        if self.packing:
            return packed_batch(pack(chunk, self.seq_len), self.pad_id)
        return pad_batch(chunk, self.pad_id)


def make_batches(items: Sequence[Encoded], batch_size: int, pad_id: int, packing: bool, seq_len: int,
                 seed: int | None = None) -> Batches:
    """One epoch of batches, shuffled by ``seed`` (None: in order), built as they are indexed.
    Packed: the rows are :func:`pack`'s over the whole shuffled epoch (found from the lengths alone),
    ``batch_size`` rows a batch. Memory: 8 bytes an item and a batch."""
    order = array("q", range(len(items)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    if packing:
        length = items.length if isinstance(items, EncodedStore) else (lambda i: len(items[i].input_ids))
        rows, used = array("q"), 0
        for pos, i in enumerate(order):   # the greedy rows of pack(), by their first item
            n = length(i)
            if not rows or used + n > seq_len:
                rows.append(pos)
                used = 0
            used += n
        bounds = rows[::batch_size]
    else:
        bounds = array("q", range(0, len(order), batch_size))
    bounds.append(len(order))
    return Batches(items, order, bounds, pad_id, packing, seq_len)


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """The conversation up to its last assistant turn, and that turn's text (for sample generations)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]
