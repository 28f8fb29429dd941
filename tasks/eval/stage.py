"""The ``evaluate`` stage: models (+ an optional documents dataset) -> a dataset of results.

    results.parquet              model, task, metric, value, stderr, n   (one row per number)
    samples/heldout.parquet      per model and document: id, source, lang, tokens, bytes, nll, bits_per_byte
    samples/tasks.parquet        per model and benchmark sample: prompt, target, response, metrics
    samples/generations.parquet  per model and prompt: the completion (and whether the chat template framed it)
    samples/judgments.parquet    pairwise judging (when a judge is given): per candidate and prompt, both
                                 answers, the judge's two replies and verdicts, the outcome (judge.py)
    chart.png                    one panel per (task, metric), a dot and a 95% interval per model
    judge.png                    pairwise judging: win, tie and loss rates with 95% Wilson intervals

Models are no datasets, so their identities (``refinery.tasks.modelref.model_identity``) are part
of the config, as are the benchmark tasks' YAML and data hashes (see harness.py): a new model or
an edited task file re-runs the stage; the same ones return the cached results.

Held-out rows: task ``heldout`` for all documents, ``heldout[source=S]`` and ``heldout[lang=L]``
per value of those columns when the documents have them. Benchmark rows: lm-eval's task names and
metric keys (``exact_match,strict-match``). Judging rows: task ``judge[vs=BASELINE]``, metrics
``win_rate``, ``tie_rate``, ``loss_rate`` (their intervals are in the manifest's ``stats.judge``).

Chat templates (``chat_template``): ``auto`` frames every prompt a model sees (lm-eval's requests,
the generation samples, so also the judged answers) with the model's chat template when its
tokenizer has one, as the model was fine-tuned to read them; ``true`` requires one (an error naming
the models without); ``false`` never uses one (the raw prompt, as for a base model). With the template,
few-shot examples are separate user/assistant turns unless ``fewshot_as_multiturn`` is false
(lm-eval's ``apply_chat_template`` and ``fewshot_as_multiturn``). The manifest records, per model,
whether the template was applied (``chat_template``).
"""
from __future__ import annotations

import gc
import math
import sys
import time
from typing import Literal

from pydantic import Field

from refinery.tasks.config import StrictModel
from refinery.tasks.eval.harness import TaskSpec
from refinery.tasks.eval.judge import JudgeSpec
from refinery.tasks.runtime import StageOutput, stage

DEFAULT_PROMPTS = ["The history of the city", "Once upon a time", "Question: What is 12 plus 7?\nAnswer:"]
RESULT_COLUMNS = ("model", "task", "metric", "value", "stderr", "n")


class ModelSpec(StrictModel):
    label: str = Field(description="Short unique name of the model in tables and charts.")
    path: str = Field(description="As given: a refinery dataset, an HF model folder or a hub id.")
    identity: str | None = Field(None, description="model_identity(path): what the fingerprint sees.")


class EvalConfig(StrictModel):
    models: list[ModelSpec] = Field(min_length=1, description="Models compared side by side.")
    tasks: list[TaskSpec] = Field(default_factory=list, description="Benchmarks (resolved by harness.resolve_tasks).")
    limit: int | None = Field(None, ge=1, description="At most this many samples per benchmark (lm-eval's limit).")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per prompt (None: the task's default).")
    seed: int = Field(1234, description="lm-eval's random, numpy, torch and few-shot seeds.")
    gen_kwargs: str | None = Field(None, description="lm-eval generation overrides, e.g. max_gen_toks=64.")
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(1024, ge=2, description="Context of held-out scoring (capped by the model's).")
    max_docs: int | None = Field(2000, ge=1, description="Score at most this many held-out documents (the first ones).")
    text_field: str = Field("text")
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), description="Generation sample prompts.")
    max_new_tokens: int = Field(48, ge=1)
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:N.")
    chat_template: Literal["auto", "true", "false"] = Field("auto", description="Frame prompts with the model's chat "
                                                            "template: auto (when it has one), true (required), false.")
    fewshot_as_multiturn: bool = Field(True, description="With the chat template: few-shot examples as separate turns.")
    judge: JudgeSpec | None = Field(None, description="Pairwise judging of the generation samples (judge.py).")


# --------------------------------------------------------------------------- held-out documents
def read_documents(ds, cfg: EvalConfig) -> dict[str, list]:
    """text (+ id, source, lang when present) of the first ``max_docs`` non-empty documents."""
    out: dict[str, list] = {"id": [], "text": [], "source": [], "lang": []}
    for table in ds.iter_tables():
        names = table.column_names
        if cfg.text_field not in names:
            raise ValueError(f"{ds.path}: no '{cfg.text_field}' column (columns: {names})")
        cols = {k: table.column(k).to_pylist() if k in names else [None] * table.num_rows
                for k in ("id", "source", "lang")}
        for i, t in enumerate(table.column(cfg.text_field).to_pylist()):
            if not t:
                continue
            out["text"].append(t)
            for k in ("id", "source", "lang"):
                v = cols[k][i]
                out[k].append(None if v is None else str(v))
            if cfg.max_docs and len(out["text"]) >= cfg.max_docs:
                return out
    return out


def heldout_rows(label: str, docs: dict[str, list], scores) -> list[dict]:
    """Result rows: all documents, then per source and per language (when the columns exist)."""
    from refinery.tasks.eval.perplexity import aggregate

    groups: list[tuple[str, list[int]]] = [("heldout", list(range(len(scores))))]
    for col in ("source", "lang"):
        values = sorted({v for v in docs[col] if v is not None})
        for v in values:
            groups.append((f"heldout[{col}={v}]", [i for i, x in enumerate(docs[col]) if x == v]))
    rows = []
    for task, idx in groups:
        agg = aggregate([scores[i] for i in idx])
        for metric in ("bits_per_byte", "perplexity"):
            rows.append({"model": label, "task": task, "metric": metric, "value": agg[metric], "stderr": None,
                         "n": agg["docs"]})
    return rows


def _heldout(lm, label: str, docs: dict[str, list], cfg: EvalConfig) -> tuple[list[dict], list[dict]]:
    from refinery.tasks.eval.perplexity import score_documents

    scores = score_documents(lm.model, lm.tokenizer, docs["text"], max_length=cfg.max_length,
                             batch_size=cfg.batch_size, device=lm.device)
    per_doc = [{"model": label, "id": docs["id"][i], "source": docs["source"][i], "lang": docs["lang"][i],
                "tokens": s.tokens, "bytes": s.bytes, "nll": s.nll, "bits_per_byte": s.bits_per_byte}
               for i, s in enumerate(scores)]
    return heldout_rows(label, docs, scores), per_doc


def use_chat_template(mode: str, tokenizer) -> bool:
    """Whether prompts go through the tokenizer's chat template: ``auto`` when it has one."""
    from refinery.tasks.eval.generate import has_chat_template

    return has_chat_template(tokenizer) if mode == "auto" else mode == "true"


def _require_templates(cfg: EvalConfig) -> None:
    """``chat_template: true``: fail before any model runs when a tokenizer has no template."""
    from transformers import AutoTokenizer

    from refinery.tasks.eval.generate import has_chat_template
    from refinery.tasks.modelref import resolve_model

    missing = [m.label for m in cfg.models if not has_chat_template(AutoTokenizer.from_pretrained(resolve_model(m.path)))]
    if missing:
        raise ValueError(f"chat_template=true, but the tokenizer of {', '.join(missing)} has no chat template "
                         "(chat_template=auto uses one only where there is one)")


def _generations(lm, label: str, cfg: EvalConfig, chat: bool) -> list[dict]:
    """The completion of every sample prompt: one batched, greedy rollout (the judged answers too)."""
    from refinery.tasks.eval.generate import generate_many

    texts = generate_many(lm, list(cfg.prompts), chat=chat, max_new_tokens=cfg.max_new_tokens,
                          batch_size=cfg.batch_size)
    return [{"model": label, "prompt": p, "chat": chat, "completion": t} for p, t in zip(cfg.prompts, texts)]


# --------------------------------------------------------------------------- outputs
def comparison_rows(results: list[dict], labels: list[str]) -> list[dict]:
    """One row per (task, metric), one column per model: the table artifact."""
    table: dict[tuple, dict] = {}
    for r in results:
        row = table.setdefault((r["task"], r["metric"]), {"task": r["task"], "metric": r["metric"]})
        row[r["model"]] = None if r["value"] is None else round(r["value"], 4)
    for row in table.values():
        for lab in labels:
            row.setdefault(lab, None)
    return list(table.values())


CI_Z = 1.96   # error bars: value +- 1.96 x stderr (a normal 95% interval)


def _number(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _labels_fmt(values: list[float]) -> str:
    """The shortest %g format (4 to 8 significant digits) that tells different values apart."""
    for digits in range(4, 9):
        fmt = f"%.{digits}g"
        if len({fmt % v for v in values}) == len(set(values)):
            return fmt
    return "%.8g"


def fitted_limits(lows: list[float], highs: list[float], pad: float = 0.12) -> tuple[float, float]:
    """y-limits fitted to the data (lowest interval end to highest, plus ``pad`` of the span on each
    side), never forced to include zero; one value gets a band of 5% of its size around it."""
    lo, hi = min(lows), max(highs)
    span = hi - lo
    if span <= 0:
        span = max(abs(hi) * 0.05, 1e-3)
        return lo - span, hi + span
    return lo - pad * span, hi + pad * span


def chart_panels(results: list[dict], labels: list[str], max_panels: int = 12) -> tuple[list[tuple], list[tuple]]:
    """(drawn, left out): the (task, metric) panels of the chart. Held-out rows per source/lang are
    not drawn (the table has them), nor judging rates (judge.png draws them); a panel whose values
    are all missing or zero is left out."""
    keys = list(dict.fromkeys((r["task"], r["metric"]) for r in results
                              if not r["task"].startswith(("heldout[", "judge["))))   # judging: judge.png
    drawn: list[tuple] = []
    empty: list[tuple] = []
    for key in keys:
        vals = [_number(r["value"]) for r in results if (r["task"], r["metric"]) == key and r["model"] in labels]
        (drawn if any(v for v in vals if v is not None) else empty).append(key)
    return drawn[:max_panels], empty


def bar_chart(results: list[dict], labels: list[str], path: str, max_panels: int = 12) -> list[dict]:
    """One panel per (task, metric) (held-out: overall only): a dot per model with its interval
    (value +- 1.96 x stderr where lm-eval gave a stderr), the y-axis fitted to the data, not to
    zero, so 2.1282 and 2.1277 look different. Panels with no values or only zeros are left out
    (named under the chart). Returns per drawn panel what was drawn, read back from its axes:
    task, metric, values, ylim, errorbars (whether intervals were drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    keys, empty = chart_panels(results, labels, max_panels)
    cols = max(1, min(3, len(keys)))
    rows = max(1, (len(keys) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    drawn: list[dict] = []
    for ax, (task, metric) in zip(axes.flat, keys):
        by_model = {r["model"]: r for r in results if (r["task"], r["metric"]) == (task, metric)}
        xs, ys, errs, names = [], [], [], []
        for i, lab in enumerate(labels):
            r = by_model.get(lab)
            v = _number(r["value"]) if r else None
            if r is None or v is None:
                continue
            se = _number(r.get("stderr"))
            xs.append(i)
            ys.append(v)
            errs.append(CI_Z * se if se else 0.0)
            names.append(lab)
        has_err = any(errs)
        for x, y, e in zip(xs, ys, errs):
            ax.errorbar([x], [y], yerr=[e] if e else None, fmt="o", color=f"C{x}", capsize=4, markersize=6)
        ax.set_ylim(*fitted_limits([y - e for y, e in zip(ys, errs)], [y + e for y, e in zip(ys, errs)]))
        fmt = _labels_fmt(ys)
        for x, y in zip(xs, ys):
            ax.annotate(fmt % y, (x, y), textcoords="offset points", xytext=(7, 0), va="center", fontsize=7)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlim(-0.6, len(labels) - 0.4)
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=7)
        ax.set_title(f"{task}\n{metric}", fontsize=8)
        ax.set_ylabel("value ± 1.96·stderr (95% interval)" if has_err else "value (no stderr; axis fitted to the data)",
                      fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        drawn.append({"task": task, "metric": metric, "values": dict(zip(names, ys)),
                      "ylim": tuple(float(v) for v in ax.get_ylim()),
                      "errorbars": any(isinstance(c, LineCollection) for c in ax.collections)})
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if not keys:
        axes.flat[0].text(0.5, 0.5, "no non-zero results to draw", ha="center", va="center")
    if empty:
        left_out = ", ".join(f"{t} {m}" for t, m in empty)
        fig.text(0.01, 0.005, f"not drawn (no values or all zero): {left_out}"[:300], fontsize=7, ha="left",
                 va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.04 if empty else 0, 1, 1))
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return drawn


def _write(b, rel: str, rows: list[dict], columns: tuple[str, ...] | None = None) -> None:
    import pyarrow as pa

    if not rows and columns is None:
        return
    cols = list(columns or rows[0].keys())
    b.write_table(rel, pa.table({c: [r.get(c) for r in rows] for c in cols}))


# --------------------------------------------------------------------------- the stage
@stage("evaluate", version="2")   # 2: chat templates applied (auto), pairwise judging
def evaluate(b, inputs, cfg: EvalConfig) -> StageOutput:
    """inputs = [] or [documents dataset] (held-out scoring); models and tasks in ``cfg``."""
    from refinery.tasks.eval.generate import load_model
    from refinery.tasks.eval.harness import result_rows, run_harness, sample_rows

    if len(inputs) > 1:
        raise ValueError("evaluate takes at most one input: a documents dataset")
    if not inputs and not cfg.tasks and not cfg.prompts:
        raise ValueError("evaluate has nothing to do: give a documents dataset, tasks or prompts")
    if cfg.judge is not None and not cfg.prompts:
        raise ValueError("judging compares the models' answers to the prompts: give prompts")
    if cfg.chat_template == "true":
        _require_templates(cfg)
    docs = read_documents(inputs[0], cfg) if inputs else None
    if docs is not None and not docs["text"]:
        raise ValueError(f"{inputs[0].path}: no non-empty documents to score")
    labels = [m.label for m in cfg.models]
    results, per_doc, per_sample, gens = [], [], [], []
    seconds: dict[str, float] = {}
    chat: dict[str, bool] = {}
    for m in cfg.models:
        t0 = time.perf_counter()
        lm = load_model(m.path, cfg.device)
        chat[m.label] = use_chat_template(cfg.chat_template, lm.tokenizer)
        if docs is not None:
            rows, recs = _heldout(lm, m.label, docs, cfg)
            results += rows
            per_doc += recs
        if cfg.prompts:
            gens += _generations(lm, m.label, cfg, chat[m.label])
        loaded_path, device = lm.path, lm.device
        del lm
        gc.collect()
        if cfg.tasks:   # lm-eval loads the model itself (HFLM); ours is freed first
            out = run_harness(loaded_path, cfg.tasks, limit=cfg.limit, num_fewshot=cfg.num_fewshot, seed=cfg.seed,
                              batch_size=cfg.batch_size, device=device, gen_kwargs=cfg.gen_kwargs,
                              apply_chat_template=chat[m.label],
                              fewshot_as_multiturn=chat[m.label] and cfg.fewshot_as_multiturn)
            results += result_rows(m.label, out)
            per_sample += sample_rows(m.label, out)
        seconds[m.label] = round(time.perf_counter() - t0, 3)
    judged = _judge(b, cfg, gens, labels) if cfg.judge is not None else None
    if judged:
        results += judged["rows"]
    _write(b, "results.parquet", results, RESULT_COLUMNS)
    _write(b, "samples/heldout.parquet", per_doc)
    _write(b, "samples/tasks.parquet", per_sample)
    _write(b, "samples/generations.parquet", gens)
    chart = f"{b.tmpdir()}/chart.png"
    bar_chart(results, labels, chart)
    b.put_file(chart, "chart.png")
    table = comparison_rows(results, labels)
    counts = {"models": len(cfg.models), "tasks": len(cfg.tasks), "results": len(results),
              "heldout_docs": len(docs["text"]) if docs else 0, "samples": len(per_sample),
              "generations": len(gens)}
    stats: dict = {"model_seconds": seconds, "table": table}
    extra: dict = {"models": [m.model_dump() for m in cfg.models], "results": "results.parquet",
                   "chart": "chart.png", "tasks": [t.name for t in cfg.tasks],
                   "chat_template": {"mode": cfg.chat_template, "applied": chat,
                                     "fewshot_as_multiturn": cfg.fewshot_as_multiturn}}
    if judged:
        counts["judged_pairs"] = sum(s["pairs"] for s in judged["summary"].values())
        counts["judge_invalid_verdicts"] = sum(s["invalid_verdicts"] for s in judged["summary"].values())
        stats["judge"] = judged["summary"]
        extra["judge"] = judged["about"]
    return StageOutput(counts=counts, stats=stats, extra=extra)


def _judge(b, cfg: EvalConfig, gens: list[dict], labels: list[str]) -> dict:
    """Pairwise judging of the generation samples (judge.py): judgments.parquet, judge.png, the rows."""
    from refinery.tasks.eval.judge import JUDGE_TEMPLATE, RECORD_COLUMNS, judge_chart, judge_pairs, make_judge, result_rows

    spec = cfg.judge
    assert spec is not None
    answers = {lab: [g["completion"] for g in gens if g["model"] == lab] for lab in labels}
    judge = make_judge(spec, cfg.device, cfg.batch_size)   # a local judge loads now: the models are freed
    try:
        t0 = time.perf_counter()
        records, summary = judge_pairs(cfg.prompts, answers, spec.baseline, judge)
        seconds = round(time.perf_counter() - t0, 3)
    finally:
        judge.close()
        gc.collect()
    _write(b, "samples/judgments.parquet", records, RECORD_COLUMNS)
    chart = f"{b.tmpdir()}/judge.png"
    judge_chart(summary, spec.baseline, judge.model, chart)
    b.put_file(chart, "judge.png")
    for cand, s in summary.items():
        print(f"evaluate: {cand} vs {spec.baseline}: win {s['win_rate']:.3f} tie {s['tie_rate']:.3f} "
              f"loss {s['loss_rate']:.3f} over {s['pairs']} prompts ({s['invalid_verdicts']} unreadable verdicts)",
              file=sys.stderr)
    about = {"judge": spec.judge, "model": judge.model, "baseline": spec.baseline, "template": JUDGE_TEMPLATE,
             "rule": "win: both orders prefer the model; loss: both prefer the baseline; else tie",
             "interval": "95% Wilson score", "records": "samples/judgments.parquet", "chart": "judge.png",
             "seconds": seconds, "requests": getattr(judge, "requests", None), "retries": getattr(judge, "retried", None)}
    return {"rows": result_rows(summary, spec.baseline), "summary": summary, "about": about}


def read_results(ds) -> list[dict]:
    """The rows of an evaluate dataset's results.parquet."""
    import pyarrow.parquet as pq

    with ds.fs.open(ds.file("results.parquet"), "rb") as f:
        return pq.read_table(f).to_pylist()


__all__ = ["evaluate", "EvalConfig", "ModelSpec", "read_results", "comparison_rows", "bar_chart", "chart_panels", "fitted_limits",
           "DEFAULT_PROMPTS"]
