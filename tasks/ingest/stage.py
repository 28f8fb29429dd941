"""The ingest stage: crawl archives and dumps -> documents (ARCHITECTURE.md, section 4) with text and language.

Sharded: ``plan`` makes one shard per resolved input file (sorted, so names and order are stable),
``shard`` reads one file, extracts main text, identifies the language and writes its Parquet parts
(``part-<file#>-<k>.train.parquet``, ``rows_per_part`` rows each; a file with no documents writes
none), ``reduce`` adds the counts up.

Bad input: a corrupt or truncated record is counted (``counts.record_errors[reason]``) and skipped,
the rest of the file is read; a record over ``max_record_bytes`` (a JSONL line: its bytes) is skipped
unread (``dropped.too_large``). A JSONL line that is not UTF-8 is decoded with the charset detected
for it (``counts.decoded_as[charset]``) or, when none fits, with U+FFFD replacement characters
(``counts.decode_errors``). A file that cannot be read (missing, not an archive, broken compression,
cut short, or rows but no usable text column) does not stop the other files, but its shard is never
recorded as finished: transient I/O errors are retried with backoff first (``sources.with_retries``),
the failure is logged with the file's name, and once every other file is done the stage fails naming
each failed file, unless ``max_failed_files`` tolerates them; tolerated failures are listed in the
manifest (``file_errors``, ``counts.files_failed``). A rerun redoes only the failed files.

Raw files are not datasets, so :meth:`Ingest.identity` feeds ``path|size|mtime-or-etag`` of every
resolved file into the fingerprint: touching an input re-runs ingest.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import Counter
from typing import Any, Iterator, Literal

from pydantic import Field, field_validator, model_validator
from refinery.tasks.config import StrictModel

from refinery.tasks.ingest.langid import LangIdConfig
from refinery.tasks.runtime import ShardedStage, StageOutput, stage

STAGE_VERSION = "4"  # 2: failed files never recorded as finished, rows numbered from 1, record size cap;
# 3: parts named part-<file#>-<k>.train.parquet (they load with Hugging Face datasets), no empty part;
# 4: archives cut short fail as files, non-UTF-8 JSONL lines decoded with their detected charset


class InputSpec(StrictModel):

    path: str = Field(description="file, glob (local or fsspec) or URL (http(s)://, s3://, file://, memory://); "
                                  "no credentials (user:password@, token@) in it")
    source: str = Field(description="source name stored in every document, e.g. cc-main-2024-22, books, code")
    format: Literal["auto", "warc", "wet", "arc", "jsonl", "parquet"] = Field(
        "auto", description="auto = detect from the content (magic bytes)")
    text_field: str = Field("text", description="JSONL/Parquet: the field holding the document text")
    id_field: str | None = Field("id", description="JSONL/Parquet: field with a stable record id (else url, else row)")
    url_field: str | None = Field("url", description="JSONL/Parquet: field with the URL, if any")
    date_field: str | None = Field(None, description="JSONL/Parquet: field with a date/timestamp, if any")

    @model_validator(mode="before")
    @classmethod
    def _no_password(cls, data: Any) -> Any:
        # Model-level, so the error's input is the whole spec (error reports quote scalars only).
        from refinery.tasks.ingest.sources import check_url

        if isinstance(data, dict) and isinstance(data.get("path"), str):
            check_url(data["path"], "ingest input path")
        return data


class IngestConfig(StrictModel):

    inputs: list[InputSpec] = Field(default_factory=list, description="input files and their source names")
    extractor: Literal["resiliparse", "trafilatura"] = Field(
        "resiliparse", description="main-text extractor for HTML (see tasks/ingest/extract.py for the choice)")
    min_text_chars: int = Field(0, ge=0, description="drop documents with fewer characters (empty ones always)")
    max_html_bytes: int = Field(5_000_000, ge=1024, description="drop HTML payloads larger than this")
    max_record_bytes: int = Field(5_000_000, ge=1024, description=(
        "skip any record (HTML, plain text, WET, ARC; decoded HTTP body; a JSONL line; Parquet text) larger "
        "than this without holding it in memory; counted as dropped.too_large"))
    max_failed_files: int = Field(0, ge=0, description=(
        "input files that may fail (after retries) with the stage still published, listing them; "
        "0: any failed file fails the stage once the other files are done"))
    rows_per_part: int = Field(10_000, ge=1, description="rows per Parquet part")
    keep_plain_text: bool = Field(True, description="keep text/plain WARC responses (HTML and WET always)")
    langid: LangIdConfig = Field(default_factory=LangIdConfig)
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for remote inputs (e.g. endpoint_url); credentials "
                                          "are refused here: use AWS_* environment variables or a Prefect block")
    max_error_samples: int = Field(5, ge=0, description="record error messages kept per file in the manifest")
    repair_text: Literal["off", "ftfy"] = Field(
        "off", description="ftfy: repair mojibake and broken escapes in the extracted text (counted as repaired)")
    unicode_form: Literal["none", "NFC", "NFKC"] = Field(
        "none", description="Unicode normal form applied after repair (counted as repaired when it changes text)")


    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, v: dict) -> dict:
        from refinery.tasks.ingest.sources import check_storage_options

        return check_storage_options(v, "ingest.storage_options")


class IngestError(RuntimeError):
    """No input file could be read."""


class IngestFileError(RuntimeError):
    """One input file could not be read (after retries for transient errors); names the file."""


SCHEMA_REASONS = frozenset({"missing_text_field", "bad_text_field"})


def _schema():
    import pyarrow as pa

    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("crawl_date", pa.timestamp("us", tz="UTC")),
        pa.field("lang", pa.string(), nullable=False),
        pa.field("lang_score", pa.float64(), nullable=False),
        pa.field("metadata", pa.string(), nullable=False),
    ])


DOC_COLUMNS = ("id", "text", "url", "source", "crawl_date", "lang", "lang_score", "metadata")


def doc_id(source: str, key: str) -> str:
    """Stable document id: hash of source and record id / URL."""
    return hashlib.blake2b(f"{source}\x00{key}".encode(), digest_size=16).hexdigest()


def docs_table(rows: list[dict]):
    import pyarrow as pa

    schema = _schema()
    return pa.Table.from_arrays([pa.array([r[c] for r in rows], type=schema.field(c).type) for c in DOC_COLUMNS],
                                schema=schema)


# --------------------------------------------------------------------------- one file -> documents
def resolve_inputs(cfg: IngestConfig) -> list[dict]:
    """One item per input file: ``{name, path, source, format, ...}``; sorted within each input spec."""
    from refinery.tasks.ingest.sources import resolve_paths

    items: list[dict] = []
    for spec in cfg.inputs:
        for path in resolve_paths(spec.path, cfg.storage_options):
            i = len(items)
            h = hashlib.sha1(path.encode()).hexdigest()[:8]
            items.append({"name": f"{i:05d}-{h}", "index": i, "path": path, **spec.model_dump(exclude={"path"})})
    return items


@dataclasses.dataclass
class _FileReader:
    """One input file being read: what turns its records into documents (config, extractor,
    language ID) and the shard's counters, which live in ``stats`` so that the caller keeps what
    was counted even when the file fails half-way."""
    item: dict
    cfg: IngestConfig
    stats: dict
    extract: Any
    lid: Any

    @classmethod
    def open(cls, item: dict, cfg: IngestConfig, stats: dict) -> "_FileReader":
        from refinery.tasks.ingest.extract import get_extractor
        from refinery.tasks.ingest.langid import LanguageIdentifier

        # an item from a plan has every InputSpec field; a hand-made one gets the defaults
        item = {**InputSpec(path=item["path"], source=item["source"]).model_dump(), **item}
        for key, empty in (("dropped", Counter), ("record_errors", Counter), ("error_samples", list),
                           ("decoded_as", Counter)):
            stats.setdefault(key, empty())
        stats.setdefault("docs_in", 0)
        stats.setdefault("decode_errors", 0)
        return cls(item, cfg, stats, get_extractor(cfg.extractor), LanguageIdentifier(cfg.langid))

    @property
    def path(self) -> str:
        return self.item["path"]

    def drop(self, reason: str) -> None:
        self.stats["dropped"][reason] += 1

    def sample(self, message: str) -> None:
        if len(self.stats["error_samples"]) < self.cfg.max_error_samples:
            self.stats["error_samples"].append(message)

    def skipped(self, e) -> None:
        """A record the reader skipped: one over the size cap or an HTTP error counts as read and
        dropped; a corrupt or truncated one as a record error (counted, sampled). The file goes on."""
        if e.reason in ("http_status", "too_large"):
            self.stats["docs_in"] += 1
            self.drop(e.reason)
            return
        self.stats["record_errors"][e.reason] += 1
        self.sample(f"@{e.offset}: {e.message}")

    def decoded(self, how: str | None) -> None:
        """A dump line that was not UTF-8: decoded as ``how`` (a charset), or with replacement
        characters (``dumps.REPLACED``)."""
        from refinery.tasks.ingest.dumps import REPLACED

        if how == REPLACED:
            self.stats["decode_errors"] += 1
        elif how is not None:
            self.stats["decoded_as"][how] += 1

    def document(self, text: str, key: str, rec, meta: dict) -> dict | None:
        """The document of a record's text, or None when the text is empty, too short or too
        large (counted). One step for dump rows and crawl records, so both get the same checks."""
        cfg = self.cfg
        if len(text) > cfg.max_record_bytes:  # dump rows: archive records are capped before decoding
            self.drop("too_large")
            return None
        from refinery.tasks.ingest.extract import normalize_text

        if cfg.repair_text != "off" or cfg.unicode_form != "none":
            from refinery.tasks.ingest.repair import repair_text

            fixed = repair_text(text, cfg.repair_text, cfg.unicode_form)
            if fixed != text:
                self.stats["repaired"] = self.stats.get("repaired", 0) + 1
                text = fixed
        text = normalize_text(text)
        if not text:
            self.drop("empty_text")
            return None
        if len(text) < cfg.min_text_chars:
            self.drop("too_short")
            return None
        lang, score = self.lid.identify(text)
        source = self.item["source"]
        return {"id": doc_id(source, key), "text": text, "url": rec.url, "source": source,
                "crawl_date": rec.date, "lang": lang, "lang_score": score,
                "metadata": json.dumps(meta, sort_keys=True, ensure_ascii=False)}


def _detect_format(r: _FileReader, raw) -> tuple[str, str | None]:
    """``(format, compression)`` from the content; a configured format must agree with it (a
    .warc.gz that is really JSONL is an error, not a silent re-interpretation)."""
    from refinery.tasks.ingest.sources import UnknownFormat, sniff

    fmt, comp = sniff(raw, r.path)
    want = r.item.get("format", "auto")
    family = {"wet": "warc", "warc": "warc"}.get(want, want)
    if want != "auto" and family != fmt:
        raise UnknownFormat(f"{r.path}: configured as {want} but the content is {fmt}")
    r.stats["format"] = want if want != "auto" else fmt
    return fmt, comp


def _dump_documents(r: _FileReader, raw, fmt: str, comp: str | None) -> Iterator[dict]:
    """JSONL or Parquet rows: the text is already there (no extraction); the id is the row's id
    field, else its URL, else file and row, so it is stable across runs."""
    from refinery.tasks.ingest import dumps
    from refinery.tasks.ingest.sources import UnknownFormat

    item = r.item
    kw = dict(text_field=item["text_field"], id_field=item["id_field"],
              url_field=item["url_field"], date_field=item["date_field"])
    if fmt == "parquet":
        records = dumps.iter_parquet(raw, **kw)
    else:
        stream = raw
        if comp:
            from fsspec.compression import compr

            if comp not in compr or compr[comp] is None:
                raise UnknownFormat(f"{r.path}: {comp}-compressed JSONL needs the {comp} codec installed")
            stream = compr[comp](raw, mode="rb")
        records = dumps.iter_jsonl(stream, **kw, max_line_bytes=r.cfg.max_record_bytes)
    base = os.path.basename(r.path)
    for rec in records:
        if isinstance(rec, dumps.DumpError):
            r.skipped(rec)
            continue
        r.stats["docs_in"] += 1
        r.decoded(rec.decoded)
        meta = {"file": r.path, "row": rec.offset, "format": fmt}
        if rec.decoded:
            meta["decoded"] = rec.decoded   # not UTF-8: the charset it was decoded with, or "replaced"
        if rec.fields:
            meta["fields"] = rec.fields
        doc = r.document(rec.text, rec.record_id or rec.url or f"{base}:{rec.offset}", rec, meta)
        if doc is not None:
            yield doc


def _record_text(r: _FileReader, rec) -> tuple[str, str | None, str | None] | None:
    """``(text, charset, how the charset was found)`` of one archive record, or None when it is
    dropped (counted): oversized HTML, an extractor failure (one bad page must not stop the
    file) or a payload that is neither HTML nor wanted plain text."""
    from refinery.tasks.ingest.extract import decode_html, decode_text

    if rec.kind == "html":
        if len(rec.payload) > r.cfg.max_html_bytes:
            r.drop("too_large")
            return None
        html, charset, how = decode_html(rec.payload, rec.http_charset)
        try:
            return r.extract(html), charset, how
        except Exception as e:  # noqa: BLE001 - one bad page must not stop the file
            r.drop("extract_error")
            r.sample(f"@{rec.offset}: extractor failed: {e}")
            return None
    if rec.kind == "text" and (rec.record_type == "conversion" or r.cfg.keep_plain_text):
        return decode_text(rec.payload, rec.http_charset or "utf-8"), rec.http_charset, None
    r.drop("not_html")
    return None


def _archive_documents(r: _FileReader, raw, fmt: str) -> Iterator[dict]:
    """WARC/WET/ARC records: main text extracted from HTML (WET and plain text as they are).
    HTTP errors and oversized records count as read and dropped; damaged records as errors."""
    from refinery.tasks.ingest import warc

    cfg = r.cfg
    if fmt == "arc":
        records = warc.iter_arc(raw, max_record_bytes=cfg.max_record_bytes)
    else:
        want = r.item.get("format", "auto")
        types = {"warc": ("response",), "wet": ("conversion",)}.get(want, ("response", "conversion"))
        records = warc.iter_warc(raw, record_types=types, max_record_bytes=cfg.max_record_bytes)
    for rec in records:
        if isinstance(rec, warc.RecordError):
            r.skipped(rec)
            continue
        r.stats["docs_in"] += 1
        got = _record_text(r, rec)
        if got is None:
            continue
        text, charset, how = got
        meta = {"file": r.path, "offset": rec.offset, "record_type": rec.record_type,
                "content_type": rec.content_type, "charset": charset, "charset_from": how,
                "http_status": rec.http_status, "extractor": cfg.extractor if rec.kind == "html" else None}
        if rec.record_id:
            meta["record_id"] = rec.record_id
        doc = r.document(text, rec.record_id or rec.url or f"{os.path.basename(r.path)}@{rec.offset}", rec,
                         {k: v for k, v in meta.items() if v is not None})
        if doc is not None:
            yield doc


def iter_documents(item: dict, cfg: IngestConfig, stats: dict) -> Iterator[dict]:
    """Documents of one input file (dicts with the schema's columns); counts go into ``stats``.

    ``stats`` gets ``docs_in``, ``dropped[reason]``, ``record_errors[reason]``, ``error_samples``,
    ``decoded_as[charset]``, ``decode_errors``, ``format``. File-level problems raise (the shard turns them into a file error). Phases: open
    the file, detect its format, then read it as a dump (:func:`_dump_documents`) or an archive
    (:func:`_archive_documents`); both hand each text to :meth:`_FileReader.document`.
    """
    from refinery.tasks.ingest.sources import open_binary

    r = _FileReader.open(item, cfg, stats)
    with open_binary(r.path, cfg.storage_options) as raw:
        fmt, comp = _detect_format(r, raw)
        if fmt in ("jsonl", "parquet"):
            yield from _dump_documents(r, raw, fmt, comp)
        else:
            yield from _archive_documents(r, raw, fmt)


def ingest_file(item: dict, cfg: IngestConfig, write_part) -> dict:
    """Read one file and hand its documents to ``write_part(k, table)`` in ``rows_per_part`` chunks.

    Returns the shard's JSON-able result (counts, per-reason drops, record errors). A file that
    cannot be read raises (``Ingest.shard`` retries transient errors and names the file); so does
    one whose rows all lack a usable text field (a schema problem, not a few bad records).
    """
    from tqdm.auto import tqdm
    from refinery.tasks.progress import bar_disabled

    t0 = time.perf_counter()
    stats: dict = {}
    buf: list[dict] = []
    parts: list[str] = []
    docs_out = 0
    langs: Counter = Counter()

    def flush():  # a part per rows_per_part documents; no part when there are none
        if buf:
            parts.append(write_part(len(parts), docs_table(buf)))
            buf.clear()

    bar = tqdm(iter_documents(item, cfg, stats), desc=os.path.basename(item["path"])[:30], unit="doc",
               leave=False, disable=bar_disabled(), mininterval=2.0)
    for doc in bar:
        buf.append(doc)
        docs_out += 1
        langs[doc["lang"]] += 1
        if len(buf) >= cfg.rows_per_part:
            flush()
    flush()
    rec_err = stats.get("record_errors", {})
    if docs_out == 0 and stats.get("docs_in", 0) == 0 and rec_err and set(rec_err) <= SCHEMA_REASONS:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(rec_err.items()))
        raise IngestFileError(f"{item['path']}: {sum(rec_err.values())} rows read, none has a text field "
                              f"{item.get('text_field', 'text')!r} holding a string ({reasons}); "
                              "check the input's text_field")
    return {
        "file": item["path"], "source": item["source"], "format": stats.get("format"),
        "files": 1, "files_failed": 0, "error": None,
        "docs_in": stats.get("docs_in", 0), "docs_out": docs_out, "repaired": stats.get("repaired", 0),
        "dropped": dict(sorted(stats.get("dropped", {}).items())),
        "record_errors": dict(sorted(stats.get("record_errors", {}).items())),
        "decoded_as": dict(sorted(stats.get("decoded_as", {}).items())),
        "decode_errors": stats.get("decode_errors", 0),
        "error_samples": stats.get("error_samples", []),
        "langs": dict(sorted(langs.items())), "parts": parts,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _read_with_retries(b, item: dict, cfg: IngestConfig, write_part, written: list[str]) -> dict:
    """:func:`ingest_file` with transient I/O errors retried (backoff); a failed attempt's parts are
    discarded so a partial file never reaches the manifest. The final error names the file."""
    from refinery.tasks.ingest.sources import with_retries

    def forget() -> None:
        for name in written:
            b.discard(name)
        written.clear()

    try:
        return with_retries(lambda: ingest_file(item, cfg, write_part), item["path"], cleanup=forget)
    except Exception as e:
        forget()
        if isinstance(e, IngestFileError):
            raise
        msg = str(e)
        where = "" if item["path"] in msg else f"{item['path']}: "
        raise IngestFileError(f"{where}{type(e).__name__}: {msg}"[:2000]) from e


# --------------------------------------------------------------------------- the stage
@stage("ingest", version=STAGE_VERSION, sharded=True)
class Ingest(ShardedStage):
    """Crawl archives (WARC/WET/ARC) and dumps (JSONL/Parquet) -> documents with text and language."""

    shard_unit = "input file"   # one shard per file: failures are reported as files

    @staticmethod
    def identity(cfg: IngestConfig) -> list[str]:
        from refinery.tasks.ingest.sources import identity

        return [identity(it["path"], cfg.storage_options) for it in resolve_inputs(cfg)]

    @staticmethod
    def plan(inputs, cfg: IngestConfig) -> list[dict]:
        items = resolve_inputs(cfg)
        if not items:
            raise ValueError("ingest: no inputs configured (IngestConfig.inputs is empty)")
        return items

    @staticmethod
    def shard(b, item: dict, cfg: IngestConfig) -> dict:
        written: list[str] = []

        def write_part(k: int, table) -> str:
            from refinery.tasks.card import part_name

            name = part_name(item["index"], k)
            b.write_table(name, table)
            written.append(name)
            return name

        return _read_with_retries(b, item, cfg, write_part, written)

    @staticmethod
    def max_failed(cfg: IngestConfig) -> int:
        return cfg.max_failed_files

    @staticmethod
    def failed(item: dict, error: str) -> dict:
        """The result reduce sees for a file that failed (when ``max_failed_files`` tolerates it)."""
        return {"file": item["path"], "source": item["source"], "format": None, "files": 1, "files_failed": 1,
                "error": error, "docs_in": 0, "docs_out": 0, "dropped": {}, "record_errors": {},
                "decoded_as": {}, "decode_errors": 0, "error_samples": [], "langs": {}, "parts": [], "seconds": 0.0}

    @staticmethod
    def reduce(b, results: list[dict], cfg: IngestConfig, inputs) -> StageOutput:
        failed = [{"file": r["file"], "error": r["error"]} for r in results if r.get("error")]
        if results and len(failed) == len(results):
            raise IngestError("ingest: no input file could be read:\n" +
                              "\n".join(f"  {f['error']}" for f in failed))
        dropped: Counter = Counter()
        rec_err: Counter = Counter()
        decoded_as: Counter = Counter()
        langs: Counter = Counter()
        sources: Counter = Counter()
        for r in results:
            dropped.update(r["dropped"])
            rec_err.update(r["record_errors"])
            decoded_as.update(r.get("decoded_as", {}))
            langs.update(r["langs"])
            sources[r["source"]] += r["docs_out"]
        # no documents at all: no parts either (a zero-row part would trip readers that infer schemas)
        docs_out = sum(r["docs_out"] for r in results)
        counts = {
            "files": len(results), "files_failed": len(failed),
            "docs_in": sum(r["docs_in"] for r in results), "docs_out": docs_out,
            "repaired": sum(r.get("repaired", 0) for r in results),
            "dropped": dict(sorted(dropped.items())), "record_errors": dict(sorted(rec_err.items())),
            "record_errors_total": sum(rec_err.values()),
            "decoded_as": dict(sorted(decoded_as.items())),
            "decode_errors": sum(r.get("decode_errors", 0) for r in results),
        }
        per_file = [{k: r.get(k) for k in ("file", "source", "format", "docs_in", "docs_out", "dropped",
                                           "record_errors", "decoded_as", "decode_errors", "error",
                                           "error_samples", "seconds")}
                    for r in results]
        stats = {"langs": dict(langs.most_common()), "sources": dict(sorted(sources.items())),
                 "per_file": per_file}   # shard_seconds: the runtime's, which times every shard
        return StageOutput(counts=counts, stats=stats, extra={"file_errors": failed})


def ingest_report_rows(ds) -> list[dict]:
    """One row per input file of an ingest dataset (for a flow's table artifact): counts and errors."""
    rows = []
    for f in ds.manifest.get("stats", {}).get("per_file", []):
        rows.append({"file": f["file"], "source": f["source"], "format": f.get("format") or "",
                     "docs_in": f["docs_in"], "docs_out": f["docs_out"],
                     "dropped": ", ".join(f"{k}={v}" for k, v in (f.get("dropped") or {}).items()),
                     "record_errors": ", ".join(f"{k}={v}" for k, v in (f.get("record_errors") or {}).items()),
                     "error": f.get("error") or ""})
    return rows


def run_ingest(store, cfg: IngestConfig, map_fn=None):
    """Plain-Python entry point: the ingested documents dataset (cached by fingerprint)."""
    return Ingest.run(store, inputs=[], cfg=cfg, map_fn=map_fn)
