"""Reward functions for RL on verifiable rewards (GRPO): plain Python callables, named in the
config.

A reward function takes the prompts and completions of a batch (texts, one per completion) and
the prompt records' other columns as keyword arguments (for GSM8K: ``answer``), each a list
aligned with the completions, and returns one float per completion (None counts as 0)::

    def my_reward(prompts, completions, **columns) -> list[float]: ...

``reward_funcs`` names them: a built-in (below) or ``module:function`` (an importable module, e.g.
a file on ``PYTHONPATH``). Built-ins:

* ``exact_match``: 1 when the completion's final number equals the reference answer's number
  (GSM8K: the number after ``####``; in the completion: after its last ``####``, else its last
  number), compared numerically (``18``, ``18.0``, ``$18`` and ``1,018`` parse); else 0.
* ``format``: 1 when the completion ends its reasoning with ``#### <number>`` (GSM8K's format), else 0.
* ``number``: 1 when the completion contains a number at all (a weak format check), else 0.
* ``length``: shorter is better: ``1 - characters / 1000``, at least 0.

Light module: no torch.
"""
from __future__ import annotations

import importlib
import re
from typing import Any, Callable, Sequence

RewardFunc = Callable[..., Sequence[float | None]]

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_FINAL = re.compile(r"####\s*(-?\$?\d[\d,]*(?:\.\d+)?)")


def parse_number(text: str | None) -> float | None:
    """``"$1,018.50"`` -> 1018.5; None when ``text`` is not a number."""
    if text is None:
        return None
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(t)
    except ValueError:
        return None


def final_number(text: str) -> float | None:
    """The answer a text gives: the number after its last ``####``, else its last number."""
    marked = _FINAL.findall(text)
    if marked:
        return parse_number(marked[-1])
    found = _NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


def reference_number(answer: Any) -> float | None:
    """A reference answer's number: GSM8K's ``... #### 18``, or a bare number."""
    if isinstance(answer, (int, float)):
        return float(answer)
    return final_number(str(answer)) if answer is not None else None


def exact_match(prompts, completions, answer=None, **_) -> list[float]:
    if answer is None:
        raise ValueError("exact_match needs an 'answer' column in the prompt records (GSM8K: 'answer' ending in '#### N')")
    out = []
    for c, a in zip(completions, answer):
        got, want = final_number(c), reference_number(a)
        out.append(1.0 if got is not None and want is not None and abs(got - want) < 1e-6 else 0.0)
    return out


def format_reward(prompts, completions, **_) -> list[float]:
    return [1.0 if _FINAL.search(c) else 0.0 for c in completions]


def number(prompts, completions, **_) -> list[float]:
    return [1.0 if _NUMBER.search(c) else 0.0 for c in completions]


def length(prompts, completions, **_) -> list[float]:
    return [max(0.0, 1.0 - len(c) / 1000.0) for c in completions]


BUILTIN: dict[str, RewardFunc] = {"exact_match": exact_match, "format": format_reward, "number": number,
                                  "length": length}


def resolve_reward_func(name: str) -> RewardFunc:
    """A built-in by name, or ``module:function`` imported; a clear error for anything else."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ValueError(f"reward function {name!r}: a built-in ({', '.join(BUILTIN)}) or module:function")
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward function {name!r} cannot be imported: {e}") from e
    if not callable(fn):
        raise ValueError(f"reward function {name!r} is not callable")
    return fn


def function_identity(name: str) -> str:
    """What a reward function's results depend on, for the stage fingerprint: ``builtin:<name>``
    (the package version covers it), or the source file's sha256 of a ``module:function``."""
    import hashlib
    import inspect

    if name in BUILTIN:
        return f"builtin:{name}"
    fn = resolve_reward_func(name)
    try:
        source = inspect.getsource(inspect.getmodule(fn) or fn)
    except (OSError, TypeError):
        return f"unhashed:{name}"
    return "sha256:" + hashlib.sha256(source.encode()).hexdigest()[:16]


def score(funcs: dict[str, RewardFunc], weights: Sequence[float], prompts: list[str], completions: list[str],
          columns: dict[str, list]) -> tuple[list[float], dict[str, list[float]]]:
    """The weighted total reward of each completion and each function's own rewards."""
    parts: dict[str, list[float]] = {}
    for name, fn in funcs.items():
        vals = list(fn(prompts=prompts, completions=completions, **columns))
        if len(vals) != len(completions):
            raise ValueError(f"reward function {name} returned {len(vals)} values for {len(completions)} completions")
        parts[name] = [0.0 if v is None else float(v) for v in vals]
    total = [sum(w * parts[n][i] for n, w in zip(funcs, weights)) for i in range(len(completions))]
    return total, parts


__all__ = ["BUILTIN", "RewardFunc", "exact_match", "format_reward", "number", "length", "final_number",
           "reference_number", "parse_number", "resolve_reward_func", "function_identity", "score"]
