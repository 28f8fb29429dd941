"""Prefect artifacts (tables, markdown, images) and the matching console output.

Every helper is a no-op outside a Prefect flow or task run, so stages stay plain Python.
"""
from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any, Sequence


def _key(key: str) -> str:
    # Prefect artifact keys: lowercase letters, numbers and dashes only.
    return re.sub(r"[^a-z0-9-]+", "-", key.lower()).strip("-")[:100] or "artifact"


def _in_run() -> bool:
    try:
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:  # pragma: no cover
        return False
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def table_artifact(key: str, rows: Sequence[dict], description: str | None = None) -> None:
    if not _in_run() or not rows:
        return
    from prefect.artifacts import create_table_artifact

    cols = list(dict.fromkeys(k for r in rows for k in r))
    clean = [{c: _cell(r.get(c)) for c in cols} for r in rows]
    create_table_artifact(key=_key(key), table=clean, description=description)


def markdown_artifact(key: str, markdown: str, description: str | None = None) -> None:
    if not _in_run():
        return
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key=_key(key), markdown=markdown, description=description)


def image_artifact(key: str, png_path: str | Path, description: str | None = None) -> None:
    """A PNG shown in the Prefect UI (as a markdown artifact with the image inlined)."""
    if not _in_run():
        return
    data = base64.b64encode(Path(png_path).read_bytes()).decode()
    markdown_artifact(key, f"![{_key(key)}](data:image/png;base64,{data})\n\n`{png_path}`", description)


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, (dict, list)):
        return str(v)
    return v


def format_table(rows: Sequence[dict], title: str | None = None) -> str:
    """A plain-text table for the console (the same rows as the artifact)."""
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[str(_cell(r.get(c, ""))) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [title] if title else []
    out += [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def markdown_table(rows: Sequence[dict]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(_cell(r.get(c, ""))) for c in cols) + " |" for r in rows]
    return "\n".join(out)
