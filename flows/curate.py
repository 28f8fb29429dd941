"""curate: crawl files and dumps -> documents -> filtered -> deduplicated (-> mixed) (composition only)."""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from refinery.flows.common import FlowParams, emit_completed, refinery_flow, report_stages, result
from refinery.tasks.decontam.stage import DecontamConfig, decontam_stages
from refinery.tasks.dedup.paragraphs import ParagraphDedupConfig, paragraph_stages
from refinery.tasks.dedup.stage import DedupConfig, dedup_stages
from refinery.tasks.filters.stage import Filter, FilterConfig, language_rows, table_rows
from refinery.tasks.ingest.stage import Ingest, IngestConfig, InputSpec, ingest_report_rows
from refinery.tasks.mix.stage import MixConfig, mix_stages
from refinery.tasks.quality.stage import QualityConfig, quality_stages
from refinery.tasks.report import table_artifact


class CurateParams(FlowParams):
    flow_name: ClassVar[str] = "curate"

    input: str = Field("", description="Crawl files to ingest: a path, a glob (DIR/*.warc.gz) or an fsspec URL (s3://, https://); several separated by commas. WARC, WET, ARC, JSONL and Parquet are recognised by content. Required unless ingest.inputs is set.",
                       examples=["crawl/*.warc.gz"])
    source: str = Field("web", description="Source name stored on every document from `input` (e.g. cc-main-2024-22, books, code).")
    text_field: str = Field("text", description="Field holding the text in JSONL/Parquet dumps.")
    ingest: IngestConfig = Field(default_factory=IngestConfig, description="Ingest and extraction settings; ingest.inputs adds more tagged inputs (books, code, ...).")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="Quality and content filters, in order.")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="Model-based quality classifier after filter: runs when quality.model is set (fasttext: quality.path to a .bin, or trained from quality.positive and quality.negative; hf: a model folder or hub id).")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Exact and MinHash near-duplicate removal.")
    paragraphs: ParagraphDedupConfig = Field(default_factory=ParagraphDedupConfig, description="Paragraph (line) dedup across documents after document dedup, bounded by a Bloom filter: runs when paragraphs.enabled is true.")
    decontaminate: DecontamConfig = Field(default_factory=DecontamConfig, description="Benchmark decontamination after dedup: runs when decontaminate.sources lists benchmarks (JSONL files, lm-eval task YAMLs or names).")
    mix: MixConfig = Field(default_factory=MixConfig, description="Per-source mixture and FineWeb-2 rehydration after dedup (and decontaminate): runs when mix.weights (e.g. {web: 0.7, code: 0.3}), mix.tokens or mix.rehydrate=fineweb2 is set; tokens are estimated (mix.measure).")

    @model_validator(mode="after")
    def _needs_input(self):
        # Checked with the parameters, so `refinery run curate` without input fails before any
        # Prefect server starts.
        if not self.input.replace(",", " ").strip() and not self.ingest.inputs:
            raise ValueError("curate needs an input: missing required parameter 'input'\n"
                             "    for example: refinery run curate --set input=crawl/*.warc.gz "
                             "(or tagged inputs: --set 'ingest.inputs=[{path: books.jsonl, source: books}]')")
        return self


def ingest_config(p: CurateParams) -> IngestConfig:
    inputs = list(p.ingest.inputs)
    for path in (s.strip() for s in p.input.split(",")):
        if path:
            inputs.append(InputSpec(path=path, source=p.source, text_field=p.text_field))
    if not inputs:
        raise ValueError("curate needs an input: --set input=PATH_OR_GLOB (or ingest.inputs)")
    return p.ingest.model_copy(update={"inputs": inputs})


@refinery_flow("curate", CurateParams)
def curate_flow(p: CurateParams) -> dict:
    """Ingest crawl files and dumps, extract main text, identify language, filter, deduplicate (and, when configured, mix)."""
    from refinery.tasks.runtime import make_runner

    stages = {}
    with make_runner(p.task_runner) as runner:
        stages["ingest"] = Ingest.call(p.workdir, [], ingest_config(p), runner=runner)
        stages["filter"] = Filter.call(p.workdir, [stages["ingest"]], p.filters, runner=runner)
        stages.update(quality_stages(p.workdir, stages["filter"], p.quality, runner=runner))
        stages.update(dedup_stages(p.workdir, stages[list(stages)[-1]], p.dedup, runner=runner))
        stages.update(paragraph_stages(p.workdir, stages[list(stages)[-1]], p.paragraphs, runner=runner))
        stages.update(decontam_stages(p.workdir, stages[list(stages)[-1]], p.decontaminate, runner=runner))
        stages.update(mix_stages(p.workdir, stages[list(stages)[-1]], stages["dedup"], p.mix, runner=runner))
    report_stages("curate", stages)
    table_artifact("curate-ingest-files", ingest_report_rows(stages["ingest"]),
                   description="Per input file: documents read, skipped records and errors")
    table_artifact("curate-filter-rules", table_rows(stages["filter"].counts, p.filters.rules),
                   description="Documents dropped per filter rule and reason")
    table_artifact("curate-filter-languages", language_rows(stages["filter"].counts),
                   description="Per language: documents kept, thresholds used (config / table / fallback), top drops")
    if "decontaminate" in stages:
        table_artifact("curate-decontaminate", stages["decontaminate"].manifest.get("stats", {}).get("table", []),
                       description="Documents sharing an n-gram with each benchmark")
    if "mix" in stages:
        table_artifact("curate-mix", stages["mix"].manifest.get("stats", {}).get("table", []),
                       description="Per source: documents and tokens before and after the mix, target and shares")
    out = result(stages, primary=stages[list(stages)[-1]].path)  # the last dedup (decontaminate, mix) step's documents
    emit_completed("curate", out, primary=out["primary"])
    return out
