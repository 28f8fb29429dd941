"""Grade-school arithmetic word problems in GSM8K's format, generated from a seed, so the demo
(which has no network and no benchmark files) can run the local GSM8K task (configs/eval/
gsm8k_local.yaml) end to end. They are easy, but a tiny model trained for minutes still scores
about zero: the point is the plumbing, not the score."""
from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas"]
THINGS = ["apples", "books", "marbles", "pencils", "stickers", "shells", "cookies", "stamps"]


def problem(rng: random.Random) -> dict:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b, c = rng.randint(3, 40), rng.randint(2, 30), rng.randint(2, 5)
    kind = rng.randrange(3)
    if kind == 0:
        q = f"{name} has {a} {thing} and buys {b} more. How many {thing} does {name} have now?"
        ans = a + b
        steps = f"{name} has {a} + {b} = <<{a}+{b}={ans}>>{ans} {thing}."
    elif kind == 1:
        a = a + b
        q = f"{name} had {a} {thing} and gave {b} of them away. How many {thing} are left?"
        ans = a - b
        steps = f"{name} has {a} - {b} = <<{a}-{b}={ans}>>{ans} {thing} left."
    else:
        q = f"{name} fills {c} boxes with {b} {thing} each. How many {thing} are in the boxes?"
        ans = b * c
        steps = f"The boxes hold {c} * {b} = <<{c}*{b}={ans}>>{ans} {thing}."
    return {"question": q, "answer": f"{steps}\n#### {ans}"}


def write_problems(path: str | Path, n: int = 20, seed: int = 0) -> Path:
    """``n`` problems as JSONL (``{question, answer}``), the same for the same seed."""
    rng = random.Random(f"refinery-arithmetic/{seed}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(problem(rng)) + "\n" for _ in range(n))
    if not path.exists() or path.read_text() != text:   # unchanged file: unchanged task fingerprint
        path.write_text(text)
    return path


__all__ = ["write_problems", "problem"]
