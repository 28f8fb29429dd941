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


# --------------------------------------------------------------------------- curation chart
def drop_chart(counts: dict, path: str | Path, rules: Sequence[str] | None = None, max_languages: int = 15) -> dict:
    """A PNG of a filter stage's counts: documents kept and dropped per rule (left) and kept and
    dropped per language (right), each bar labelled with its count. ``rules`` orders the rules
    (the chain's order; others follow by name). Returns the numbers drawn, read back from the
    bars: ``{"rules": {"kept": n, RULE: dropped, ...}, "languages": {LANG: {"kept": n, "dropped": n}}}``;
    languages beyond ``max_languages`` (by documents in) share one ``other (N)`` bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_rule = {k: int(v) for k, v in (counts.get("dropped_by_rule") or {}).items() if v}
    order = list(rules or []) + ["input"]
    rule_names = sorted(by_rule, key=lambda r: (order.index(r) if r in order else len(order), r))
    rule_bars = [("kept", int(counts.get("docs_out", 0) or 0))] + [(r, by_rule[r]) for r in rule_names]
    langs = sorted((counts.get("by_language") or {}).items(), key=lambda kv: (-kv[1].get("docs_in", 0), kv[0]))
    lang_bars = [(lang, int(c.get("docs_out", 0)), int(c.get("docs_in", 0)) - int(c.get("docs_out", 0)))
                 for lang, c in langs[:max_languages]]
    rest = langs[max_languages:]
    if rest:
        out_ = sum(int(c.get("docs_out", 0)) for _, c in rest)
        lang_bars.append((f"other ({len(rest)})", out_, sum(int(c.get("docs_in", 0)) for _, c in rest) - out_))
    docs_in = int(counts.get("docs_in", 0) or 0)

    height = 1.2 + 0.32 * max(len(rule_bars), len(lang_bars), 2)
    fig, (ax_r, ax_l) = plt.subplots(1, 2, figsize=(11, height))
    kept_c, drop_c = "#4c9f50", "#d1495b"
    # rules: the kept bar first (top), then one bar per rule with the documents it dropped
    y = list(range(len(rule_bars)))
    bars_r = ax_r.barh(y, [n for _, n in rule_bars], color=[kept_c] + [drop_c] * (len(rule_bars) - 1))
    ax_r.bar_label(bars_r, labels=[f"{n:,}" + (f" ({100 * n / docs_in:.1f}%)" if docs_in else "") for _, n in rule_bars],
                   fontsize=7, padding=2)
    names = {"kept": "kept (passed every rule)", "input": "dropped at input (no text)"}
    ax_r.set_yticks(y, [names.get(r, f"dropped by {r}") for r, _ in rule_bars], fontsize=7)
    ax_r.invert_yaxis()
    ax_r.set_xlabel("documents", fontsize=8)
    ax_r.set_title(f"per rule ({docs_in:,} documents in)", fontsize=9)
    ax_r.margins(x=0.25)
    # languages: kept + dropped, stacked
    yl = list(range(len(lang_bars)))
    bars_k = ax_l.barh(yl, [k for _, k, _ in lang_bars], color=kept_c, label="kept")
    bars_d = ax_l.barh(yl, [d for _, _, d in lang_bars], left=[k for _, k, _ in lang_bars], color=drop_c,
                       label="dropped")
    ax_l.bar_label(bars_d, labels=[f"{k:,} kept / {d:,} dropped" for _, k, d in lang_bars], fontsize=7, padding=2)
    ax_l.set_yticks(yl, [lang for lang, _, _ in lang_bars], fontsize=7)
    ax_l.invert_yaxis()
    ax_l.set_xlabel("documents", fontsize=8)
    ax_l.set_title("per language", fontsize=9)
    ax_l.margins(x=0.35)
    if lang_bars:
        ax_l.legend(fontsize=7, loc="lower right")
    else:
        ax_l.text(0.5, 0.5, "no language counts", ha="center", va="center", transform=ax_l.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    # what was drawn, from the bars themselves
    return {"rules": {r: int(round(p.get_width())) for (r, _), p in zip(rule_bars, bars_r.patches)},
            "languages": {lang: {"kept": int(round(pk.get_width())), "dropped": int(round(pd.get_width()))}
                          for (lang, _, _), pk, pd in zip(lang_bars, bars_k.patches, bars_d.patches)}}
