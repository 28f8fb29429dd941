"""Real English prose available on every Python install: standard-library docstrings.

``stdlib_prose()`` walks ``sys.stdlib_module_names`` in sorted order, parses each public
module's source file (never importing it), takes the docstrings of the module and of the
classes, functions and methods it defines, splits them into paragraphs, strips
reStructuredText markup and keeps only paragraphs that read like prose (no code, no lists,
no tables). The result depends only on the Python build, so it is identical across runs and
processes on one installation.
"""
from __future__ import annotations

import ast
import functools
import inspect
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

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


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _docs_of(path: Path) -> list[tuple[str, str]]:
    """Docstrings of a module file and of its public classes, functions and methods, read from
    the source with ``ast``: importing would make the text depend on what the calling process
    has already imported or patched (a flow run imports Prefect, torch, ...)."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return []
    out: list[tuple[str, str]] = []
    doc = ast.get_docstring(tree, clean=False)
    if doc:
        out.append(("", doc))
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))}
    for name in sorted(defs):
        if name.startswith("_"):
            continue
        node = defs[name]
        doc = ast.get_docstring(node, clean=False)
        if doc:
            out.append((name, doc))
        if isinstance(node, ast.ClassDef):
            methods = {m.name: m for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))}
            for meth in sorted(methods):
                if not meth.startswith("_"):
                    mdoc = ast.get_docstring(methods[meth], clean=False)
                    if mdoc:
                        out.append((f"{name}.{meth}", mdoc))
    return out


def _module_files() -> list[tuple[str, Path]]:
    """Public standard-library modules written in Python and the direct submodules of its
    packages, sorted by name, found on disk without importing anything."""
    root = _stdlib_dir()
    out: list[tuple[str, Path]] = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP_MODULES:
            continue
        if (root / f"{name}.py").is_file():
            out.append((name, root / f"{name}.py"))
        elif (root / name / "__init__.py").is_file():
            out.append((name, root / name / "__init__.py"))
            if name not in _SKIP_PACKAGES:
                for sub in sorted((root / name).glob("*.py")):
                    m = sub.stem
                    if not m.startswith("_") and "test" not in m and "win" not in m:
                        out.append((f"{name}.{m}", sub))
    return out


@functools.lru_cache(maxsize=1)
def stdlib_prose() -> tuple[Passage, ...]:
    """All prose paragraphs of the standard library's docstrings, in a fixed order, deduplicated."""
    seen: set[str] = set()
    out: list[Passage] = []
    for name, path in _module_files():
        for obj, doc in _docs_of(path):
            for para in _paragraphs(doc):
                if para not in seen:
                    seen.add(para)
                    out.append(Passage(name, obj, para))
    return tuple(out)
