"""Flow parameters as the user types them: dotted names, help text and error messages.

Everything here is generated from a flow's pydantic params model (``flow.params_cls``), so the
help cannot drift from the code: ``refinery run FLOW --help`` lists every field, nested configs
with dotted names (``dedup.bands``, ``ppo.kl_coef``), and a ``ValidationError`` is rewritten into
messages that name the dotted key and suggest the closest valid one ("did you mean").

Pydantic only: no Prefect, so help and errors come before any server starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import re
import textwrap
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

REQUIRED = object()  # the default of a field that has none


@dataclasses.dataclass
class Param:
    """One settable name of a params model, as ``--set NAME=VALUE`` takes it."""

    name: str                 # dotted: "dedup.bands"; list items: "ingest.inputs[].path"
    type: str                 # "int", "str | None", "ppo|dpo"
    default: Any              # REQUIRED when the field has no default
    description: str
    section: bool = False     # a nested config (its fields follow with this prefix)
    examples: list | None = None
    choices: dict | None = None   # a Literal's values with one line each (Field(json_schema_extra={"choices": ...}))


# --------------------------------------------------------------------------- model walking
def _unwrap(ann: Any) -> Any:
    """``Annotated[X, ...]`` -> X."""
    while typing.get_origin(ann) is typing.Annotated:
        ann = typing.get_args(ann)[0]
    return ann


def _union_args(ann: Any) -> tuple | None:
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return typing.get_args(ann)
    return None


def sub_model(ann: Any) -> type[BaseModel] | None:
    """The model a field nests (``Model`` or ``Model | None``), else None."""
    ann = _unwrap(ann)
    args = _union_args(ann)
    if args is not None:
        models = [a for a in args if a is not type(None)]
        return sub_model(models[0]) if len(models) == 1 else None
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def item_model(ann: Any) -> type[BaseModel] | None:
    """The model of a ``list[Model]`` field's items, else None."""
    ann = _unwrap(ann)
    args = _union_args(ann)
    if args is not None:
        lists = [a for a in args if a is not type(None)]
        return item_model(lists[0]) if len(lists) == 1 else None
    if typing.get_origin(ann) in (list, tuple) and typing.get_args(ann):
        return sub_model(typing.get_args(ann)[0])
    return None


def type_name(ann: Any) -> str:
    ann = _unwrap(ann)
    if ann is type(None):
        return "None"
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return "|".join(str(a.value if isinstance(a, enum.Enum) else a) for a in typing.get_args(ann))
    args = _union_args(ann)
    if args is not None:
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(type_name(a) for a in typing.get_args(ann))
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return "|".join(str(m.value) for m in ann)
    return getattr(ann, "__name__", str(ann).replace("typing.", ""))


def _field_default(field, parent_default: Any, name: str) -> Any:
    # A nested field's default is the parent's default object's value (a flow may ship a tuned
    # default config); top-level fields and list items use the field's own default.
    if parent_default is not None and hasattr(parent_default, name):
        return getattr(parent_default, name)
    if field.is_required():
        return REQUIRED
    return field.get_default(call_default_factory=True)


def params(model: type[BaseModel], prefix: str = "", parent_default: Any = None) -> list[Param]:
    """Every settable name of ``model`` in declaration order, nested configs expanded."""
    out: list[Param] = []
    for name, field in model.model_fields.items():
        dotted = prefix + name
        default = _field_default(field, parent_default, name)
        desc = " ".join((field.description or "").split())
        sub, items = sub_model(field.annotation), item_model(field.annotation)
        if sub is not None:
            out.append(Param(dotted, sub.__name__, default, desc, section=True))
            out += params(sub, dotted + ".", default if isinstance(default, sub) else None)
        elif items is not None:
            out.append(Param(dotted, f"list[{items.__name__}]", default, desc, section=True))
            out += params(items, dotted + "[].")
        else:
            kind = type_name(field.annotation)
            if default is None and "None" not in kind.split(" | "):   # None accepted (e.g. finetune's lr: the method's)
                kind += " | None"
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            choices = extra.get("choices")
            out.append(Param(dotted, kind, default, desc, examples=field.examples,
                             choices=dict(choices) if isinstance(choices, dict) else None))
    return out


def dotted_names(model: type[BaseModel]) -> list[str]:
    return [p.name for p in params(model)]


def model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model that holds the fields at ``loc`` (a pydantic error location), or None."""
    for part in loc:
        if isinstance(part, int):       # a list index: stay on the item model
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        nxt = sub_model(field.annotation) or item_model(field.annotation)
        if nxt is None:
            return None
        model = nxt
    return model


# --------------------------------------------------------------------------- help text
def show_value(v: Any) -> str:
    """A value as one would type it after ``--set KEY=`` (YAML scalars)."""
    if v is REQUIRED:
        return "(required)"
    if isinstance(v, enum.Enum):
        v = v.value
    if isinstance(v, BaseModel):
        return "{...}"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v if v and v.strip() == v and v[0] not in "[{'\"" else json.dumps(v)
    try:
        return json.dumps(v, default=str)
    except (TypeError, ValueError):
        return str(v)


def params_help(model: type[BaseModel], width: int = 100) -> str:
    """The parameter section of ``refinery run FLOW --help``."""
    lines = []
    for p in params(model):
        if p.section:
            lines.append(f"  {p.name}.*  ({p.type})  {p.description}".rstrip())
            continue
        default = "required" if p.default is REQUIRED else f"default {show_value(p.default)}"
        lines.append(f"  {p.name}: {p.type}, {default}")
        if p.description:
            lines += textwrap.wrap(p.description, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
        for value, what in (p.choices or {}).items():   # one line per choice
            lines += textwrap.wrap(f"{value}: {' '.join(str(what).split())}", width, initial_indent=" " * 8,
                                   subsequent_indent=" " * 10)
    return "\n".join(lines)


def example_value(p: Param) -> str:
    if p.examples:
        return show_value(p.examples[0])
    return {"int": "1", "float": "0.5", "bool": "true"}.get(p.type, "VALUE")


# --------------------------------------------------------------------------- errors
def loc_name(loc: tuple, pattern: bool = False) -> str:
    """``("ingest", "inputs", 0, "path")`` -> ``ingest.inputs[0].path`` (``inputs[].path`` as a pattern)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += "[]" if pattern else f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


# Long spellings of our short names, as other tools write them: a key close to one of these
# suggests our name (``--set learning_rate=...`` -> ``lr``).
SPELLED_OUT = {
    "lr": ["learning_rate"],
    "grad_accum": ["gradient_accumulation_steps", "gradient_accumulation"],
    "seq_len": ["sequence_length", "max_seq_length", "max_length", "block_size"],
    "max_steps": ["steps", "num_steps", "train_steps"],
    "early_stopping_patience": ["patience"],
    "eval_every": ["eval_steps", "eval_interval"],
    "warmup_steps": ["warmup", "num_warmup_steps"],
    "val_fraction": ["validation_fraction", "eval_fraction"],
    "kl_coef": ["kl_coefficient", "init_kl_coef"],
    "batch_size": ["per_device_train_batch_size", "train_batch_size"],
    "dtype": ["precision", "torch_dtype"],
    "r": ["rank", "lora_rank"],
}


def suggest(word: str, choices: list[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(word, choices, n=n, cutoff=0.6)


def _close_names(key: str, names: list[str]) -> list[str]:
    """``names`` close to ``key``, directly or through a spelled-out form of their last part."""
    spelled = {}
    for name in names:
        head, _, last = name.rpartition(".")
        for long in SPELLED_OUT.get(last, []):
            spelled[f"{head}.{long}" if head else long] = name
    hits = suggest(key, names + list(spelled), n=6)
    return list(dict.fromkeys(spelled.get(h, h) for h in hits))


def _did_you_mean(model: type[BaseModel], loc: tuple, sections: bool) -> list[str]:
    """Close valid names for an unknown key: siblings at its level first, then any dotted name
    (``lora_r`` -> ``lora.r``). Only sections when the value is a mapping, only leaves otherwise."""
    prefix, key = loc_name(loc[:-1]), str(loc[-1])
    kinds = {p.name: p.section for p in params(model) if "[]" not in p.name}
    fits = [n for n, sec in kinds.items() if sec == sections]
    level = model_at(model, loc[:-1])
    out: list[str] = []
    if level is not None:
        full = {s: f"{prefix}.{s}" if prefix else s for s in level.model_fields}
        bare = [s for s, f in full.items() if f in fits or "[" in prefix]  # list items: no kinds
        out += [full[s] for s in _close_names(key, bare)]
    out += _close_names(loc_name(loc), fits)
    return list(dict.fromkeys(out))[:3]


def _method_section(model: type[BaseModel], data: dict | None) -> str | None:
    """The section named after the chosen ``method`` (align: ``dpo``, ``grpo`` ...), if the model has one."""
    method = (data or {}).get("method")
    return method if isinstance(method, str) and method in model.model_fields else None


def _one_error(flow: str, model: type[BaseModel], err: dict, section: str | None = None) -> str:
    loc = tuple(err.get("loc", ()))
    name = loc_name(loc)
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        close = _did_you_mean(model, loc, sections=isinstance(err.get("input"), dict))
        if section and len(loc) == 1 and f"{section}.{loc[0]}" in dotted_names(model):
            close = list(dict.fromkeys([f"{section}.{loc[0]}", *close]))[:3]
        if close:
            return f"unknown parameter {name!r}: did you mean {' or '.join(repr(c) for c in close)}?"
        level = model_at(model, loc[:-1])
        valid = ", ".join(level.model_fields) if level is not None else ""
        return f"unknown parameter {name!r}" + (f"; valid here: {valid}" if valid else "")
    if kind == "missing":
        by_name = {p.name: p for p in params(model)}
        p = by_name.get(loc_name(loc, pattern=True))
        desc = f" ({p.description})" if p and p.description else ""
        if any(isinstance(x, int) for x in loc):  # a list item's field: --set cannot address it alone
            return f"missing required parameter {name!r}{desc}"
        example = example_value(p) if p else "VALUE"
        return (f"missing required parameter {name!r}{desc}\n"
                f"    for example: refinery run {flow} --set {name}={example}")
    if kind in ("model_type", "model_attributes_type", "dict_type") and sub_model_at(model, loc):
        return f"{name!r} is a section, not a value: set its fields, e.g. --set {name}.FIELD=VALUE " \
               f"(see refinery run {flow} --help)"
    where = f"{name}: " if name else ""
    got = err.get("input")
    shown = "" if isinstance(got, (dict, BaseModel)) or got is None else f" (got {_short(got)})"
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    if kind in ("literal_error", "enum") and isinstance(got, str):   # a mistyped choice
        close = suggest(got, re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", ""))), n=1)
        if close:
            shown += f"; did you mean {close[0]!r}?"
    return f"{where}{msg}{shown}"


def sub_model_at(model: type[BaseModel], loc: tuple) -> bool:
    level = model_at(model, loc[:-1]) if loc else None
    if level is None or isinstance(loc[-1], int):
        return False
    field = level.model_fields.get(loc[-1])
    return field is not None and sub_model(field.annotation) is not None


def _short(v: Any, limit: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def explain(flow: str, model: type[BaseModel], error: ValidationError, data: dict | None = None) -> str:
    """A ValidationError as one line per problem, dotted names, suggestions and examples. With the
    parameters given (``data``), a top-level key that belongs in the chosen method's section
    (``max_steps`` on align with ``method=grpo``) points there first."""
    lines = [_one_error(flow, model, dict(e), _method_section(model, data)) for e in error.errors()]
    return "\n".join(f"  - {line}" for line in dict.fromkeys(lines))


__all__ = ["Param", "params", "params_help", "dotted_names", "explain", "suggest", "model_at", "REQUIRED"]
