"""Ingest: WARC/WET/ARC crawl archives and JSONL/Parquet dumps -> documents (text, url, source, lang).

Public API::

    from refinery.tasks.ingest import Ingest, IngestConfig, InputSpec, run_ingest
    ds = Ingest.run(store, inputs=[], cfg=IngestConfig(inputs=[InputSpec(path="crawl/*.warc.gz", source="cc")]))
    ds = Ingest.call(root, [], cfg, runner=...)        # from a flow (one Prefect task per file)

Modules: ``warc`` (archive records), ``dumps`` (JSONL/Parquet rows), ``extract`` (charset + main
text), ``langid`` (offline language id), ``sources`` (paths, globs, URLs, format sniffing), ``stage``.
Heavy libraries (fastwarc, resiliparse, trafilatura, pyarrow, language models) load lazily.
"""
from refinery.tasks.ingest.langid import LangIdConfig
from refinery.tasks.ingest.stage import (DOC_COLUMNS, Ingest, IngestConfig, IngestError, InputSpec, doc_id, docs_table,
                                ingest_file, ingest_report_rows, iter_documents, resolve_inputs, run_ingest)

__all__ = ["Ingest", "IngestConfig", "InputSpec", "LangIdConfig", "IngestError", "run_ingest", "iter_documents", "ingest_report_rows",
           "ingest_file", "resolve_inputs", "doc_id", "docs_table", "DOC_COLUMNS"]
