"""Variants of a curate config: named sets of dotted overrides merged over a base config.

    variants:
      no_dedup: {dedup.exact: false, dedup.near: false}
      strict: {filters.gopher_quality.min_stop_words: 3}

An override key may be dotted (``dedup.exact``) or nested (``{dedup: {exact: false}}``, what
``--set variants.no_dedup.dedup.exact=false`` gives); both expand to the same nested mapping, which
is deep-merged over the base config (a list value replaces the base's list). Plain functions over
dicts: the flow validates the merged configs against the curate params model.
"""
from __future__ import annotations

import re
from typing import Any

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def expand(overrides: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``{"a.b": 1, "c": {"d.e": 2}}`` -> ``{"a": {"b": 1}, "c": {"d": {"e": 2}}}``.

    Two spellings of one key (``a.b`` and ``{a: {b: ...}}``) merge; the same leaf set twice
    with different values is an error, naming the key."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = [p for p in str(key).split(".")]
        if any(not p for p in parts):
            raise ValueError(f"{where}{key!r}: empty part in a dotted key")
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"{where}{'.'.join(parts[:i + 1])} is set to a value and used as a section")
            node = nxt
        leaf = parts[-1]
        value = expand(value, f"{where}{key}.") if isinstance(value, dict) else value
        node[leaf] = _join(node[leaf], value, f"{where}{key}") if leaf in node else value
    return out


def _join(a: Any, b: Any, where: str) -> Any:
    """Two spellings of one key: mappings join; a leaf set twice must agree."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = _join(out[k], v, f"{where}.{k}") if k in out else v
        return out
    if a != b:
        raise ValueError(f"{where}: set twice, to {a!r} and {b!r}")
    return a


def merge(base: dict[str, Any], over: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``over`` deep-merged over ``base`` (mappings merge, anything else replaces)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v, f"{where}{k}.")
        else:
            out[k] = v
    return out


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of :func:`expand`: dotted leaf keys (for tables: what a variant changes)."""
    out: dict[str, Any] = {}
    for k, v in nested.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_name(name: str, base_name: str) -> None:
    if not NAME_RE.match(name):
        raise ValueError(f"variant name {name!r}: use letters, digits, '_', '-' or '.' (at most 64)")
    if name == base_name:
        raise ValueError(f"variant name {name!r} is the base's name (base_name); the base needs no overrides")


def variant_configs(base: dict[str, Any], variants: dict[str, dict[str, Any]], base_name: str,
                    forbidden: frozenset[str] | set[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """``{base_name: base, name: base + overrides, ...}`` in the given order (base first).

    ``forbidden``: top-level keys a variant may not override (what the flow supplies, e.g. the
    input and workdir, which must be the same for every variant)."""
    out = {base_name: base}
    for name, overrides in variants.items():
        check_name(name, base_name)
        if not isinstance(overrides, dict):
            raise ValueError(f"variants.{name}: expected a mapping of overrides (e.g. {{dedup.near: false}}), "
                             f"got {overrides!r}")
        nested = expand(overrides, f"variants.{name}.")
        clash = sorted(set(nested) & forbidden)
        if clash:
            raise ValueError(f"variants.{name}: {', '.join(clash)} is the same for every variant "
                             f"(set it once, outside the variants)")
        out[name] = merge(base, nested)
    return out


__all__ = ["expand", "merge", "flatten", "variant_configs", "check_name"]
