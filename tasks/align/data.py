"""Preference pairs: reading the common file formats into one shape, splitting, rendering to text.

Formats (detected per record, so a file may mix them):

* **HH-RLHF** ``{"chosen": TRANSCRIPT, "rejected": TRANSCRIPT}`` where a transcript is
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``; the prompt is everything up to the last
  ``Assistant:`` turn and must be the same in both (else the record is skipped as
  ``prompt_mismatch``).
* **ShareGPT** (LLaMA-Factory) ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}...],
  "chosen": {"from": "gpt", "value"}, "rejected": {...}}`` (``messages`` with ``role``/``content``
  works too).
* **Explicit prompt** (TRL) ``{"prompt": str | messages, "chosen": str | messages,
  "rejected": str | messages}``.

Data: any location :mod:`refinery.tasks.records` reads, streaming: ``.json`` (a list, or an object
with a ``data``/``train`` list), ``.jsonl``, either gzipped, Parquet, Arrow, a dataset folder
(``save_to_disk``, a refinery dataset, data files), local or an fsspec URL. A record that cannot
be understood is counted by reason and skipped (an empty prompt, chosen, rejected or completion is
such a record); a file that cannot be read raises an error naming it. The loaders take a ``min_valid_fraction`` (the stages pass :data:`MIN_VALID_FRACTION` unless
configured otherwise): a file where fewer of the records read are usable raises
:class:`TooManyBadRecords` with the counts, rather than training on the few that are left.
Light module: no torch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
from collections import Counter
from typing import Any, Callable, Iterable, TypeVar

ROLE_ALIASES = {
    "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "system": "system",
}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """A prompt (chat messages, the last one from the user) and two candidate assistant replies."""

    prompt: tuple  # tuple of (role, content) pairs; hashable and JSON-able via messages()
    chosen: str
    rejected: str

    def messages(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.prompt]

    def key(self) -> str:
        """A stable id of the pair (used for deterministic splits)."""
        payload = json.dumps([list(self.prompt), self.chosen, self.rejected], ensure_ascii=False)
        return hashlib.sha1(payload.encode()).hexdigest()


class BadRecord(ValueError):
    """A record that is not a preference pair; ``reason`` names the counter it goes to."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# A file that is mostly bad records is the wrong file or a broken export: training on the rest
# would succeed on a sliver of the data. Half is far below any real file's share (HH-RLHF: 98%).
MIN_VALID_FRACTION = 0.5


class TooManyBadRecords(ValueError):
    """Fewer of a file's records are usable than the configured minimum share."""


# --------------------------------------------------------------------------- parsing records
def parse_hh(transcript: str) -> list[tuple[str, str]]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[("user", "a"), ("assistant", "b")]``."""
    if not isinstance(transcript, str):
        raise BadRecord("not_text", type(transcript).__name__)
    parts = _HH_TURN.split(transcript)
    if len(parts) < 3:
        raise BadRecord("no_turns", "no '\\n\\nHuman:'/'\\n\\nAssistant:' turns")
    turns = []
    for speaker, text in zip(parts[1::2], parts[2::2]):
        turns.append(("user" if speaker == "Human" else "assistant", text.strip()))
    return turns


def _message(m: Any) -> tuple[str, str]:
    if isinstance(m, str):
        return ("assistant", m)
    if not isinstance(m, dict):
        raise BadRecord("bad_message", type(m).__name__)
    role = m.get("role", m.get("from"))
    content = m.get("content", m.get("value"))
    if not isinstance(role, str) or not isinstance(content, str):
        raise BadRecord("bad_message", "needs role/from and content/value strings")
    return (ROLE_ALIASES.get(role.lower(), role.lower()), content)


def _messages(ms: Any) -> list[tuple[str, str]]:
    if isinstance(ms, str):
        return [("user", ms)]
    if isinstance(ms, dict):
        return [_message(ms)]
    if not isinstance(ms, list) or not ms:
        raise BadRecord("bad_messages", "expected a non-empty list of messages")
    return [_message(m) for m in ms]


def _reply(x: Any) -> str:
    """The assistant reply of a ``chosen``/``rejected`` field: a string, a message, or messages."""
    if isinstance(x, str):
        return x
    msgs = _messages(x) if not isinstance(x, dict) else [_message(x)]
    if msgs[-1][0] != "assistant":
        raise BadRecord("reply_not_assistant", msgs[-1][0])
    return msgs[-1][1]


def parse_record(rec: Any) -> PreferencePair:
    """One raw record of any supported format -> PreferencePair (raises BadRecord)."""
    if not isinstance(rec, dict):
        raise BadRecord("not_object", type(rec).__name__)
    if "chosen" not in rec or "rejected" not in rec:
        raise BadRecord("missing_field", "needs 'chosen' and 'rejected'")
    conv = rec.get("conversations", rec.get("messages"))
    if conv is not None:  # ShareGPT
        prompt = _messages(conv)
        chosen, rejected = _reply(rec["chosen"]), _reply(rec["rejected"])
    elif "prompt" in rec:  # explicit prompt (TRL style)
        prompt = _messages(rec["prompt"])
        chosen, rejected = _reply(rec["chosen"]), _reply(rec["rejected"])
    elif isinstance(rec["chosen"], str) and isinstance(rec["rejected"], str):  # HH-RLHF transcripts
        c, r = parse_hh(rec["chosen"]), parse_hh(rec["rejected"])
        if c[-1][0] != "assistant" or r[-1][0] != "assistant":
            raise BadRecord("reply_not_assistant", "transcript does not end with an Assistant turn")
        if c[:-1] != r[:-1]:
            raise BadRecord("prompt_mismatch", "chosen and rejected transcripts have different prompts")
        prompt, chosen, rejected = c[:-1], c[-1][1], r[-1][1]
    elif isinstance(rec["chosen"], list) and isinstance(rec["rejected"], list):  # full conversations
        c, r = _messages(rec["chosen"]), _messages(rec["rejected"])
        if c[:-1] != r[:-1]:
            raise BadRecord("prompt_mismatch", "chosen and rejected conversations have different prompts")
        prompt, chosen, rejected = c[:-1], _reply(c), _reply(r)
    else:
        raise BadRecord("unknown_format", "no conversations/messages/prompt and not HH transcripts")
    if prompt and prompt[-1][0] == "assistant":
        raise BadRecord("prompt_ends_with_assistant")
    _check_prompt(prompt)
    if not chosen.strip() or not rejected.strip():
        raise BadRecord("empty_reply")
    if chosen == rejected:
        raise BadRecord("identical_replies")
    return PreferencePair(tuple(prompt), chosen, rejected)


def _check_prompt(prompt: list[tuple[str, str]]) -> None:
    """The turn a reply answers (the prompt's last) must say something: a blank one is
    ``empty_prompt`` (``{"prompt": ""}``, ``Human:`` with nothing after it)."""
    if not prompt or not str(prompt[-1][1]).strip():
        raise BadRecord("empty_prompt")


# --------------------------------------------------------------------------- reading files
_T = TypeVar("_T")


def _load(path: str | os.PathLike, parse: Callable[[Any], _T], limit: int | None,
          min_valid_fraction: float | None = None) -> tuple[list[_T], int, dict]:
    """The records of a data location (any :func:`refinery.tasks.records.iter_records` reads,
    streaming) that ``parse`` accepts (the first ``limit`` of them when given), how many records
    were read (unparseable JSON lines included), and the skip reasons counted.
    Raises :class:`TooManyBadRecords` when the accepted share is below ``min_valid_fraction``."""
    from refinery.tasks.records import InvalidRecord, iter_records

    counts: Counter = Counter()
    out: list[_T] = []
    n = 0
    for _, rec in iter_records(path):
        n += 1
        if isinstance(rec, InvalidRecord):
            counts["bad_json"] += 1
            continue
        try:
            out.append(parse(rec))
        except BadRecord as e:
            counts[e.reason] += 1
        if limit is not None and len(out) >= limit:
            break
    skipped = dict(sorted(counts.items()))
    if min_valid_fraction is not None:
        check_valid_fraction(path, n, len(out), skipped, min_valid_fraction)
    return out, n, skipped


def check_valid_fraction(path: str | os.PathLike, read: int, valid: int, skipped: dict,
                         min_fraction: float = MIN_VALID_FRACTION) -> None:
    """Raise :class:`TooManyBadRecords` naming the counts when fewer than ``min_fraction`` of the
    ``read`` records are ``valid``. An empty file is left to the caller (it has its own message)."""
    if read and valid < min_fraction * read:
        reasons = ", ".join(f"{k}={v}" for k, v in skipped.items())
        raise TooManyBadRecords(
            f"{os.fspath(path)}: only {valid} of the {read} records read are usable ({read - valid} bad: {reasons}), "
            f"below the minimum share of {min_fraction:g} (min_valid_fraction); fix the file, or lower "
            "min_valid_fraction if that many bad records is expected")


def load_pairs(path: str | os.PathLike, max_pairs: int | None = None,
               min_valid_fraction: float | None = None) -> tuple[list[PreferencePair], dict]:
    """All valid pairs of a file (the first ``max_pairs`` valid ones when given) and counts
    ``{"records", "pairs", "skipped": {reason: n}}``; see :func:`check_valid_fraction`."""
    pairs, n, skipped = _load(path, parse_record, max_pairs, min_valid_fraction)
    return pairs, {"records": n, "pairs": len(pairs), "skipped": skipped}


def split_pairs(pairs: list[_T], eval_fraction: float, seed: int,
                eval_max: int | None = None) -> tuple[list[_T], list[_T]]:
    """Deterministic train / held-out split (a seeded shuffle); at least one of each when possible.
    Any records: pairs, prompt records (GRPO), labelled examples (KTO)."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(len(pairs) * eval_fraction)) if eval_fraction > 0 else 0
    if eval_fraction > 0 and len(pairs) >= 2:
        n_eval = min(max(n_eval, 1), len(pairs) - 1)
    if eval_max is not None:
        n_eval = min(n_eval, eval_max)
    ev = [pairs[i] for i in order[:n_eval]]
    tr = [pairs[i] for i in order[n_eval:]]
    return tr, ev


# --------------------------------------------------------------------------- rendering
_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}


def render_prompt(messages: Iterable[tuple[str, str]], tokenizer=None) -> str:
    """The prompt text a model continues: the tokenizer's chat template when it has one, else the
    HH-RLHF transcript style ``"\\n\\nHuman: ...\\n\\nAssistant:"``."""
    messages = list(messages)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                             tokenize=False, add_generation_prompt=True)
    out = []
    for role, content in messages:
        out.append(f"\n\n{_NAMES.get(role, role.capitalize())}: {content.strip()}")
    return "".join(out) + "\n\nAssistant:"


def render_reply(text: str, tokenizer=None) -> str:
    """A reply as appended to :func:`render_prompt` (a leading space in the transcript style)."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return text
    return " " + text.strip()


def file_identity(path: str | os.PathLike) -> str:
    """Identity of a data location for fingerprints (:func:`refinery.tasks.records.identity`: a file's
    is the runtime's one rule for raw inputs). Raises FileNotFoundError naming a missing one."""
    from refinery.tasks.records import identity

    return identity(path, required=True)


# --------------------------------------------------------------------------- prompts (RL on verifiable rewards)
@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """A prompt (chat messages, the last from the user) and the record's other columns (for GSM8K:
    ``answer``), which reward functions receive as keyword arguments."""

    prompt: tuple
    columns: tuple = ()   # (name, value) pairs, hashable

    def column_dict(self) -> dict:
        return dict(self.columns)

    def key(self) -> str:
        payload = json.dumps([list(self.prompt), list(self.columns)], ensure_ascii=False, default=str)
        return hashlib.sha1(payload.encode()).hexdigest()


def parse_prompt_record(rec: Any) -> PromptRecord:
    """``{"question", ...}`` (GSM8K), ``{"prompt": str | messages, ...}`` or ``{"messages": [...]}``
    (up to the last user turn); every other key is a column."""
    if not isinstance(rec, dict):
        raise BadRecord("not_an_object")
    rest = dict(rec)
    if isinstance(rest.get("question"), str):
        prompt = [("user", rest.pop("question"))]
    elif "prompt" in rest:
        p = rest.pop("prompt")
        prompt = [("user", p)] if isinstance(p, str) else _messages(p)
    elif "messages" in rest or "conversations" in rest:
        msgs = _messages(rest.pop("messages", None) or rest.pop("conversations"))
        while msgs and msgs[-1][0] == "assistant":
            msgs.pop()
        prompt = msgs
    else:
        raise BadRecord("no_prompt", "needs question, prompt or messages")
    if not prompt or prompt[-1][0] != "user" or not str(prompt[-1][1]).strip():
        raise BadRecord("empty_prompt")
    return PromptRecord(tuple(prompt), tuple(sorted((k, v) for k, v in rest.items() if isinstance(k, str))))


def load_prompts(path: str | os.PathLike, max_prompts: int | None = None,
                 min_valid_fraction: float | None = None) -> tuple[list[PromptRecord], dict]:
    """The prompt records of a data location and counts like :func:`load_pairs`."""
    out, n, skipped = _load(path, parse_prompt_record, max_prompts, min_valid_fraction)
    return out, {"records": n, "prompts": len(out), "skipped": skipped}


# --------------------------------------------------------------------------- unpaired examples (KTO)
@dataclasses.dataclass(frozen=True)
class UnpairedExample:
    """A prompt, one reply, and whether the reply is desirable (thumbs up) or not."""

    prompt: tuple
    completion: str
    label: bool

    def key(self) -> str:
        payload = json.dumps([list(self.prompt), self.completion, self.label], ensure_ascii=False)
        return hashlib.sha1(payload.encode()).hexdigest()


def _label(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "good", "bad", "desirable", "undesirable"):
        return v.strip().lower() in ("true", "1", "good", "desirable")
    raise BadRecord("bad_label", repr(v)[:40])


def parse_unpaired(rec: Any) -> UnpairedExample:
    """``{"messages": [... user, assistant], "label": bool}`` (LLaMA-Factory's KTO format) or
    ``{"prompt", "completion", "label"}`` (TRL's unpaired format)."""
    if not isinstance(rec, dict):
        raise BadRecord("not_an_object")
    if "label" not in rec and "kto_tag" not in rec:
        raise BadRecord("no_label")
    label = _label(rec.get("label", rec.get("kto_tag")))
    if "completion" in rec:
        prompt = _messages(rec.get("prompt"))
        completion = _reply(rec["completion"])
    else:
        msgs = _messages(rec.get("messages") or rec.get("conversations"))
        if len(msgs) < 2 or msgs[-1][0] != "assistant":
            raise BadRecord("no_reply", "the last message must be the assistant's")
        prompt, completion = msgs[:-1], msgs[-1][1]
    if not prompt or prompt[-1][0] != "user":
        raise BadRecord("prompt_not_from_user")
    _check_prompt(prompt)
    if not str(completion).strip():
        raise BadRecord("empty_reply")
    return UnpairedExample(tuple(prompt), str(completion), label)


def load_unpaired(path: str | os.PathLike, max_examples: int | None = None,
                  min_valid_fraction: float | None = None) -> tuple[list[UnpairedExample], dict]:
    """The labelled examples of a file and counts ``{"records", "examples", "desirable", "skipped"}``."""
    out, n, skipped = _load(path, parse_unpaired, max_examples, min_valid_fraction)
    return out, {"records": n, "examples": len(out), "desirable": sum(e.label for e in out), "skipped": skipped}
