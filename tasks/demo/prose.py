"""Real English prose available on every Python install: standard-library docstrings.

``stdlib_prose()`` walks ``sys.stdlib_module_names`` in sorted order, imports each public
module (warnings and stdout silenced, failures skipped), takes the docstrings of the module
and of the classes, functions and methods it defines, splits them into paragraphs, strips
reStructuredText markup and keeps only paragraphs that read like prose (no code, no lists,
no tables). The result depends only on the Python build, so it is identical across runs and
processes on one installation.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import io
import pkgutil
import re
import sys
import warnings
from dataclasses import dataclass

# Modules with side effects on import (browser, printing, GUI, readline terminal codes),
# deprecated shims that fight with setuptools, or platform-only modules.
_SKIP_MODULES = frozenset({
    "antigravity", "this", "idlelib", "turtle", "turtledemo", "tkinter", "readline", "rlcompleter", "lib2to3",
    "distutils", "ensurepip", "msilib", "winreg", "winsound", "nt", "msvcrt", "pydoc_data",
    "xxsubtype", "xxlimited", "xxlimited_35", "sre_compile", "sre_constants", "sre_parse",
})
# Packages whose submodules are not worth importing (hundreds of codecs, test suites, GUI).
_SKIP_PACKAGES = frozenset({"encodings", "test", "ctypes", "curses", "ensurepip", "venv"})

_ROLE = re.compile(r":[\w.:-]+:`~?([^`<]*?)(?:\s*<[^`]*>)?`")   # :func:`name`, :class:`~x.y`
_LITERAL = re.compile(r"`{1,2}([^`]+)`{1,2}_?")                # ``code``, `text`, `link`_
_CALL = re.compile(r"(\w)\(\)")                                 # name() -> name
_BAD_CHARS = re.compile(r"[{}\[\]<>=|\\#@$%^~*_/]")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*$")


@dataclass(frozen=True)
class Passage:
    module: str        # e.g. "json"
    obj: str           # qualified name inside the module, "" for the module itself
    text: str          # one prose paragraph, whitespace-normalised

    @property
    def topic(self) -> str:
        return f"{self.module}.{self.obj}" if self.obj else self.module


def _clean(block: str) -> str | None:
    lines = block.split("\n")
    if any(l[:1] in (" ", "\t") for l in lines):
        return None                                   # indented: code, literal block, definition list
    first = lines[0]
    if not first[:1].isupper() or re.match(r"\d+[.)] ", first):
        return None                                   # lists, doctests, directives, tables
    if any(l.rstrip().endswith("::") for l in lines) or (len(lines) > 1 and set(lines[1].strip()) <= set("=-~^*+#")):
        return None                                   # "Example::" and underlined headings
    text = " ".join(l.strip() for l in lines)
    if text[-1] != "." or text.endswith("..") or "http" in text:
        return None
    if ":`" in text:
        text = _ROLE.sub(r"\1", text)
    if "`" in text:
        text = _LITERAL.sub(r"\1", text)
    if "()" in text:
        text = _CALL.sub(r"\1", text)
    words = text.split()
    text = " ".join(words)
    if not 6 <= len(words) <= 180 or _BAD_CHARS.search(text):
        return None
    plain = sum(1 for w in words if _WORD.match(w.strip(".,;:!?()\"'")))
    if plain < 0.85 * len(words) or text.count("(") > 1 + len(words) // 20:
        return None
    return text


def _paragraphs(doc: str) -> list[str]:
    doc = inspect.cleandoc(doc)
    out = []
    for block in re.split(r"\n[ \t]*\n", doc):
        block = block.strip("\n").rstrip()
        if block and block[0].isupper() and block[-1] == ".":      # cheap pre-check, most blocks fail here
            cleaned = _clean(block)
            if cleaned:
                out.append(cleaned)
    return out


def _import(name: str):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except BaseException:   # noqa: BLE001 - any failure (ImportError, SystemExit, ...) skips it
            return None


def _docs_of(mod) -> list[tuple[str, str]]:
    name = mod.__name__
    out: list[tuple[str, str]] = []
    if isinstance(mod.__doc__, str):
        out.append(("", mod.__doc__))
    for attr in sorted(vars(mod)):
        if attr.startswith("_"):
            continue
        obj = vars(mod)[attr]
        if not (inspect.isclass(obj) or inspect.isroutine(obj)) or getattr(obj, "__module__", None) != name:
            continue
        doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
        if isinstance(doc, str):
            out.append((attr, doc))
        if inspect.isclass(obj):
            for meth in sorted(vars(obj)):
                if meth.startswith("_"):
                    continue
                member = vars(obj)[meth]
                member = getattr(member, "__func__", member)
                mdoc = getattr(member, "__doc__", None) if inspect.isroutine(member) else None
                if isinstance(mdoc, str):
                    out.append((f"{attr}.{meth}", mdoc))
    return out


def _module_names() -> list[str]:
    """Public standard-library modules and the direct submodules of its packages, sorted."""
    names: list[str] = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP_MODULES:
            continue
        names.append(name)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations and name not in _SKIP_PACKAGES:
            subs = pkgutil.iter_modules(list(spec.submodule_search_locations))
            names.extend(f"{name}.{m.name}" for m in sorted(subs, key=lambda m: m.name)
                         if not m.name.startswith("_") and "test" not in m.name and "win" not in m.name)
    return names


@functools.lru_cache(maxsize=1)
def stdlib_prose() -> tuple[Passage, ...]:
    """All prose paragraphs of the standard library's docstrings, in a fixed order, deduplicated."""
    seen: set[str] = set()
    out: list[Passage] = []
    for name in _module_names():
        mod = _import(name)
        if mod is None:
            continue
        for obj, doc in _docs_of(mod):
            for para in _paragraphs(doc):
                if para not in seen:
                    seen.add(para)
                    out.append(Passage(name, obj, para))
    return tuple(out)
