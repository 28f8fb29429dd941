"""SFT data: read instruction files, check every record, render chat templates, mask prompts, pack.

Formats (detected per record with ``fmt="auto"``):

- **Alpaca**: ``{"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}``
- **ShareGPT**: ``{"conversations": [{"from": "human"|"gpt"|"system"|"function_call"|"observation",
  "value": str}, ...], "system"?, "tools"?}``
- **OpenAI messages**: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str |
  [{"type": "text", "text": str}, ...]}, ...]}``
- **self-instruct**: ``{"instruction", "instances": [{"input", "output"}, ...]}`` (one example per
  instance)

A file is a JSON array (records numbered from 1) or JSONL (records numbered by line). A bad record
is counted by reason and listed with its number; reading goes on.

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
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

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
def iter_raw_records(path: str | Path) -> Iterable[tuple[int, Any]]:
    """``(record number, parsed JSON or BadRecord)`` for a JSON array or a JSONL file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: instruction file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable instruction file: {e}") from e
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
        for i, rec in enumerate(data, 1):
            yield i, rec
        return
    if stripped.startswith("{") and p.suffix == ".json":
        try:  # a single JSON object holding a list under "data" / "examples"
            data = json.loads(text)
            for key in ("data", "examples", "records"):
                if isinstance(data.get(key), list):
                    for i, rec in enumerate(data[key], 1):
                        yield i, rec
                    return
        except json.JSONDecodeError:
            pass  # fall through: JSONL with a .json name
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            yield n, BadRecord("invalid_json", e.msg)


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


def read_examples(path: str | Path, fmt: str = "auto", max_records: int | None = None,
                  log: Any = None) -> tuple[list[Example], ReadReport]:
    """All valid examples of an instruction file, and a report of the bad records (by number)."""
    report = ReadReport(path=str(path))
    examples: list[Example] = []
    for n, rec in iter_raw_records(path):
        if max_records is not None and report.records - report.bad >= max_records:
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
        examples.extend(Example(c, n) for c in convs)
    report.examples = len(examples)
    if log is not None and report.bad > 10:
        log(f"{path}: {report.bad} bad records in all ({dict(report.bad_by_reason)})")
    return examples, report


def split_examples(examples: Sequence[Example], val_fraction: float, seed: int,
                   max_val: int | None = None) -> tuple[list[Example], list[Example]]:
    """Deterministic shuffle, then the first share goes to validation (whole records stay together)."""
    records = sorted({e.record for e in examples})
    rng = random.Random(seed)
    rng.shuffle(records)
    n_val = int(round(len(records) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(records) > 1:
        n_val = 1
    if max_val is not None:
        n_val = min(n_val, max_val)
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
        return sum(1 for x in self.labels if x != IGNORE)


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


def encode_all(tokenizer, examples: Sequence[Example], seq_len: int, report: ReadReport | None = None,
               progress: bool = False) -> tuple[list[Encoded], dict]:
    """Encode examples; count truncations and drop examples left without any response token."""
    out: list[Encoded] = []
    counts: Counter[str] = Counter()
    it: Iterable = examples
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(examples, desc="tokenize", unit="ex", leave=False)
    for ex in it:
        try:
            e = encode(tokenizer, ex.messages, seq_len, ex.record)
        except BadRecord as err:
            counts["template_error"] += 1
            if report is not None:
                report.add_bad(ex.record, err)
            continue
        except Exception as err:  # a template that raises on this conversation
            counts["template_error"] += 1
            if report is not None:
                report.add_bad(ex.record, BadRecord("template_error", str(err)[:200]))
            continue
        counts["truncated"] += int(e.truncated)
        if e.n_labels == 0:
            counts["no_response_tokens"] += 1
            if report is not None:
                report.add_bad(ex.record, BadRecord("no_response_tokens", f"all response tokens beyond seq_len={seq_len}"))
            continue
        out.append(e)
    counts["examples"] = len(out)
    counts["tokens"] = sum(len(e.input_ids) for e in out)
    counts["label_tokens"] = sum(e.n_labels for e in out)
    return out, dict(counts)


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


def make_batches(items: Sequence[Encoded], batch_size: int, pad_id: int, packing: bool, seq_len: int,
                 seed: int | None = None) -> list[Batch]:
    """One epoch of batches, shuffled by ``seed`` (None: in order)."""
    order = list(range(len(items)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    ordered = [items[i] for i in order]
    if packing:
        rows = pack(ordered, seq_len)
        return [packed_batch(rows[i:i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]
    return [pad_batch(ordered[i:i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)]


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """The conversation up to its last assistant turn, and that turn's text (for sample generations)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]
