"""``refinery inspect PATH``: what a dataset, a stage folder or a workdir holds, read from manifests.

- a dataset (``W/STAGE/FINGERPRINT``, it has a ``manifest.json``): its files and rows, counts,
  the schema of its main parts, its lineage (the inputs' manifests, followed recursively where
  reachable, and the raw files it was built from), and with ``--head N`` its first rows;
  ``--json`` prints the manifest itself;
- a stage folder (``W/dedup``): one line per fingerprint with its creation date and counts, plus
  unfinished builds (``.staging-*``);
- a workdir root: one line per stage with its number of datasets and the newest one.

Reads through fsspec, so URLs (``s3://bucket/refinery/dedup``) work too. No Prefect.
"""
from __future__ import annotations

import dataclasses
import json
import textwrap
from typing import Any

MANIFEST = "manifest.json"
STAGING = ".staging-"


class InspectError(Exception):
    """PATH is none of the things inspect knows."""


@dataclasses.dataclass
class Entry:
    """One child folder of a stage folder."""

    name: str
    manifest: dict | None       # None: no (readable) manifest
    staging: bool = False


# --------------------------------------------------------------------------- listing
def _fs(path: str):
    import fsspec

    fs, fs_path = fsspec.core.url_to_fs(path)
    return fs, fs_path.rstrip("/") or "/"


def _read_json(fs, path: str) -> dict | None:
    try:
        with fs.open(path, "rb") as f:
            data = json.loads(f.read())
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _subdirs(fs, path: str) -> list[str]:
    try:
        infos = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(i["name"].rstrip("/") for i in infos if i.get("type") == "directory")


def _stage_entries(fs, path: str) -> list[Entry]:
    out = []
    for d in _subdirs(fs, path):
        name = d.rsplit("/", 1)[-1]
        if name.startswith(STAGING):
            out.append(Entry(name.removeprefix(STAGING), None, staging=True))
        elif not name.startswith("."):
            m = _read_json(fs, f"{d}/{MANIFEST}")
            if m is not None or fs.exists(f"{d}/{MANIFEST}"):
                out.append(Entry(name, m))
    return out


# --------------------------------------------------------------------------- formatting helpers
def _flat(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _num(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:,}" if isinstance(v, int) else f"{v:,.4g}"


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def summary_line(m: dict) -> str:
    """What one dataset holds, in one line: documents in -> out, tokens, steps, rows, seconds."""
    c, s = m.get("counts", {}), m.get("stats", {})
    parts = []
    if "docs_in" in c and "docs_out" in c:
        parts.append(f"docs {_num(c['docs_in'])} -> {_num(c['docs_out'])}")
    elif "docs_in" in c or "docs_out" in c:
        parts.append(f"docs {_num(c.get('docs_in', c.get('docs_out')))}")
    for key in ("tokens", "steps", "examples", "pairs", "params"):
        if isinstance(c.get(key), (int, float)):
            parts.append(f"{key} {_num(c[key])}")
    files = [f for f in m.get("files", []) if f.get("rows") is not None and _is_part(f["path"])]
    if not parts and files:
        parts.append(f"rows {_num(sum(f['rows'] for f in files))}")
    if not parts:
        parts.append(f"{len(m.get('files', []))} files")
    if isinstance(s.get("seconds"), (int, float)):
        parts.append(f"{s['seconds']:.1f} s")
    return ", ".join(parts)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _is_part(rel: str) -> bool:
    return rel.rsplit("/", 1)[-1].startswith("part-")


# --------------------------------------------------------------------------- dataset
def _schema(ds) -> list[str]:
    """``name: type`` of the columns of the first main part (Parquet or Arrow IPC)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not ds.files:
        return []
    path = ds.files[0]
    with ds.fs.open(ds.fs._strip_protocol(path), "rb") as f:
        if path.endswith(".arrow"):
            schema = pa.ipc.open_file(f).schema
        else:
            schema = pq.read_schema(f)
    return [f"{field.name}: {field.type}" for field in schema]


def _head(ds, n: int, width: int = 100) -> list[str]:
    """The first ``n`` rows of the main parts, one block per row, long values cut."""
    import pyarrow as pa

    rows: list[dict] = []
    for path in ds.files:
        if len(rows) >= n:
            break
        with ds.fs.open(ds.fs._strip_protocol(path), "rb") as f:
            if path.endswith(".arrow"):
                reader = pa.ipc.open_file(f)
                table = reader.get_batch(0).slice(0, n - len(rows)) if reader.num_record_batches else None
            else:
                import pyarrow.parquet as pq

                pf = pq.ParquetFile(f)
                table = next(pf.iter_batches(batch_size=n - len(rows)), None)
            if table is not None:
                rows += table.to_pylist()
    out = []
    for i, row in enumerate(rows[:n]):
        out.append(f"  [{i}]")
        for k, v in row.items():
            text = " ".join(str(v).split())
            if isinstance(v, (list, tuple)) and len(v) > 16:
                text = f"[{', '.join(map(str, v[:16]))}, ...] ({len(v)} items)"
            elif len(text) > width:
                text = textwrap.shorten(text, width, placeholder=f" ... ({len(str(v)):,} chars)")
            out.append(f"    {k}: {text}")
    return out


def _raw_inputs(m: dict) -> list[str]:
    """Files a dataset was built from that are not datasets (crawl files, instruction files, models)."""
    cfg = m.get("config", {})
    out = [i["path"] for i in cfg.get("inputs", []) if isinstance(i, dict) and isinstance(i.get("path"), str)]
    for key in ("model", "data", "path"):
        if isinstance(cfg.get(key), str) and cfg[key]:
            out.append(f"{key}={cfg[key]}")
    return out


def _lineage(m: dict, depth: int = 0, seen: set | None = None, limit: int = 30) -> list[str]:
    """The dataset and its inputs, recursively through their manifests, as an indented tree."""
    from refinery.tasks.store import Dataset, DatasetNotFound

    seen = set() if seen is None else seen
    pad = "  " * (depth + 1)
    out = [f"{pad}{m.get('stage')}/{m.get('fingerprint')}  ({summary_line(m)})"]
    if m.get("fingerprint") in seen:   # a diamond (dedup reads filter directly and via minhash)
        out[0] = f"{pad}{m.get('stage')}/{m.get('fingerprint')}  (see above)"
        return out
    if depth >= limit:
        return out
    seen.add(m.get("fingerprint"))
    for raw in _raw_inputs(m):
        out.append(f"{pad}  <- raw {raw}")
    for ref in m.get("inputs", []):
        try:
            parent = Dataset.open(ref["path"]).manifest
        except (DatasetNotFound, OSError, KeyError):
            out.append(f"{pad}  <- {ref.get('stage')}/{ref.get('fingerprint')}  (not reachable: {ref.get('path')})")
            continue
        sub = _lineage(parent, depth + 1, seen, limit)
        sub[0] = sub[0][:len(pad) + 2] + "<- " + sub[0][len(pad) + 2:]
        out += sub
    return out


def describe_dataset(ds, head: int = 0) -> str:
    m = ds.manifest
    files = m.get("files", [])
    parts = [f for f in files if _is_part(f["path"]) and f.get("rows") is not None]
    others = [f for f in files if f not in parts]
    lines = [f"dataset  {ds.path}",
             f"stage    {m.get('stage')}  fingerprint {m.get('fingerprint')}  ({m.get('code_version', '?')})",
             f"created  {m.get('created_at', '?')}",
             f"parts    {_plural(len(parts), 'part')}, {_num(sum(f['rows'] for f in parts))} rows, "
             f"{_bytes(sum(f.get('bytes') or 0 for f in parts))}"
             + (f"; {len(others)} other files ({_bytes(sum(f.get('bytes') or 0 for f in others))})" if others else "")]
    counts = _flat(m.get("counts", {}))
    if counts:
        lines.append("counts")
        lines += [f"  {k}: {_num(v)}" for k, v in counts]
    schema = _schema(ds)
    if schema:
        lines.append(f"schema   ({parts[0]['path'] if parts else ''})")
        lines += [f"  {s}" for s in schema]
    elif others:
        tops = sorted({f["path"].split("/", 1)[0] for f in others})
        lines.append("contents " + ", ".join(tops[:20]) + (" ..." if len(tops) > 20 else ""))
    lines.append("lineage")
    lines += _lineage(m)
    if head > 0:
        lines.append(f"head     (first {head} rows)")
        lines += _head(ds, head) or ["  (no rows)"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- stage folder, workdir
def describe_stage(path: str, entries: list[Entry]) -> str:
    done = sorted(((e.name, e.manifest) for e in entries if e.manifest), key=lambda d: d[1].get("created_at", ""))
    lines = [f"stage folder  {path}  ({_plural(len(done), 'dataset')})"]
    for name, m in done:
        lines.append(f"  {name}  {m.get('created_at', '?')}  {summary_line(m)}")
    for e in entries:
        if e.staging:
            lines.append(f"  {e.name}  (unfinished: building now, or a crashed run a rerun resumes)")
        elif e.manifest is None:
            lines.append(f"  {e.name}  (unreadable manifest)")
    return "\n".join(lines)


def describe_root(path: str, stages: dict[str, list[Entry]]) -> str:
    lines = [f"workdir  {path}  ({_plural(len(stages), 'stage')})"]
    for name, entries in stages.items():
        done = [(e.name, e.manifest) for e in entries if e.manifest]
        newest = max(done, key=lambda d: d[1].get("created_at", ""), default=None)
        unfinished = sum(e.staging for e in entries)
        line = f"  {name:<12} {_plural(len(done), 'dataset')}"
        if unfinished:
            line += f", {unfinished} unfinished"
        if newest is not None:
            line += f"; newest {newest[0]} {newest[1].get('created_at', '?')}: {summary_line(newest[1])}"
        lines.append(line)
    return "\n".join(lines)


def inspect_path(path: str, head: int = 0, as_json: bool = False) -> str:
    """The text ``refinery inspect PATH`` prints; InspectError when PATH is none of the three."""
    from refinery.tasks.store import Dataset, DatasetNotFound

    fs, fs_path = _fs(path)
    if fs.exists(f"{fs_path}/{MANIFEST}"):
        try:
            ds = Dataset.open(path)
        except DatasetNotFound as e:
            raise InspectError(str(e)) from None
        return json.dumps(ds.manifest, indent=2, ensure_ascii=False) if as_json else describe_dataset(ds, head)
    if as_json or head:
        raise InspectError(f"{path}: no {MANIFEST}, so not a dataset (--json and --head need one)")
    entries = _stage_entries(fs, fs_path)
    if entries:
        return describe_stage(path, entries)
    stages = {d.rsplit("/", 1)[-1]: ents for d in _subdirs(fs, fs_path)
              if not d.rsplit("/", 1)[-1].startswith(".") and (ents := _stage_entries(fs, d))}
    if stages:
        return describe_root(path, stages)
    what = "does not exist" if not fs.exists(fs_path) else f"has no {MANIFEST} and no datasets below it"
    raise InspectError(f"{path} {what}: not a dataset (a folder with {MANIFEST}), a stage folder "
                       f"(WORKDIR/STAGE holding FINGERPRINT/{MANIFEST}) or a workdir (WORKDIR/STAGE/...)")


__all__ = ["inspect_path", "InspectError", "summary_line"]
