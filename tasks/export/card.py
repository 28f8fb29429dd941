"""Model cards that carry a model's whole lineage, read from the manifests.

Every model a training stage publishes (pretrain's dataset folder, finetune's ``merged/`` and
``adapter/``, align's ``model/``; a full fine-tune's dataset folder) gets a ``README.md`` that
``huggingface_hub.ModelCard`` parses: ``base_model``, ``datasets``, ``license``, ``library_name``,
``tags``, ``pipeline_tag``, ``language`` and, when evaluations exist, a ``model-index``. Its body is
the provenance, found by walking the lineage from the model's manifest through every input's
manifest (``inputs`` and the model references in ``config``: the starting model of a fine-tune, an
align stage's policy): the crawl sources, each curation stage's documents in and out with its top
drop reasons, decontamination, the tokenizer, every training stage of the model chain, the training
method and the config that matters, the loss curve and the evaluation table.

Two moments write a card:

* **publish** (:func:`with_model_cards`, the decorator under each training stage's ``@stage``): the
  card goes into the dataset as a file like any other, so the manifest lists it and ``refinery
  verify`` checks it. It is built from what the manifest will hold (config, inputs, counts, extra
  keys) and the inputs' manifests, never from a path or a clock, so two builds of one fingerprint
  write the same bytes. No evaluation exists yet for a model being built, so it has no model-index.
* **later** (:func:`card_for`, ``refinery card PATH``, ``refinery push``): the same card from the
  published manifest plus the evaluate datasets of the same workdir that scored this model
  (matched by ``model_identity``, ``dataset:STAGE:FINGERPRINT``), their numbers exactly. A
  published dataset never changes (its fingerprint names its bytes, its manifest pins the card's
  sha256), so the regenerated card goes to stdout, to ``--out`` or into an upload, never over the
  published one.

Paths: a card names datasets by ``STAGE/FINGERPRINT`` and raw files by their name; ``base_model`` is
a hub id as given or the base model folder relative to the model folder (``../../../pretrain/FP``),
so ``from_pretrained(join(model_folder, base_model))`` loads it and nothing names the workdir.
"""
from __future__ import annotations

import functools
import json
import math
import os
import posixpath
import re
from typing import Any, Callable, Sequence

from refinery.tasks.card import DEFAULT_LICENSE, card_languages   # one default, one rule for both kinds of card

CARD = "README.md"
MODEL_KEYS = ("model", "merged")   # the manifest keys naming a complete model (refinery.tasks.modelref)
# config keys naming a model that a training stage started from (a dataset folder, a folder or a hub id)
BASE_KEYS = ("model", "policy", "base_model", "init_from")
LINEAGE_KEYS = BASE_KEYS + ("reference_model", "reward_model")
IDENTITY_KEY = re.compile(r"(^|_)(id|identity|identities|sha256)$")   # computed fingerprint inputs, not settings
FINGERPRINT = re.compile(r"[0-9a-f]{16}")   # a dataset folder's name
ABS_PATH = re.compile(r"(?<![\w.])/(?:[^\s|,;:'\"]+/)*[^\s|,;:'\"/]+")
HIGHLIGHTS = ("objective", "preset", "method", "loss_type", "kind", "max_steps", "epochs", "batch_size", "grad_accum",
              "seq_len", "max_len", "lr", "scheduler", "warmup_ratio", "weight_decay", "beta", "lora.r", "lora.alpha",
              "train.beta", "train.loss_type", "train.lr", "train.max_steps", "train.batch_size", "train.lora.enabled",
              "packing", "dtype", "seed")
MAX_SOURCES = 12
CURVE_ROWS = 12


# --------------------------------------------------------------------------- reading manifests
def _manifest_of(path: str) -> dict | None:
    """The manifest of the refinery dataset at ``path`` (local or fsspec URL), else None."""
    from refinery.tasks.modelref import dataset_manifest

    try:
        return dataset_manifest(path)
    except (ValueError, OSError):
        return None


def _key(m: dict, k: str) -> Any:
    """A manifest key as the store writes it (top level) or as a stage returned it (``extra``)."""
    extra = m.get("extra")
    return m.get(k, extra.get(k) if isinstance(extra, dict) else None)


def _parents(m: dict) -> list[str]:
    """Paths of what a dataset was made from: its input datasets, then the models its config names."""
    out = [i["path"] for i in m.get("inputs", []) if isinstance(i, dict) and isinstance(i.get("path"), str)]
    cfg = m.get("config")
    if isinstance(cfg, dict):
        out += [cfg[k] for k in LINEAGE_KEYS if isinstance(cfg.get(k), str) and cfg[k]]
    return out


def locate(ref: str, root: str | None) -> str:
    """Where a dataset reference recorded as ``.../STAGE/FINGERPRINT`` is now: in the workdir ``root``
    of the dataset being described when that holds it (one fingerprint, one dataset: a workdir that
    was moved or copied still finds its own lineage), else the reference as recorded."""
    if root and "://" not in ref:
        parts = ref.rstrip("/").split("/")
        if len(parts) >= 2:
            here = posixpath.join(root, parts[-2], parts[-1])
            m = _manifest_of(here)
            if m is not None and (m.get("stage"), m.get("fingerprint")) == (parts[-2], parts[-1]):
                return here
    return ref


def lineage(manifest: dict, root: str | None = None, max_depth: int = 40) -> list[dict]:
    """Every dataset upstream of ``manifest`` (not itself), each once, parents before children; each
    manifest gains ``_path`` (where it was found, see :func:`locate`). Unreachable references are skipped."""
    seen: set[tuple] = {(manifest.get("stage"), manifest.get("fingerprint"))}
    order: list[dict] = []

    def visit(m: dict, depth: int) -> None:
        if depth > max_depth:
            return
        for path in _parents(m):
            path = locate(path, root)
            parent = _manifest_of(path)
            if parent is None:
                continue
            key = (parent.get("stage"), parent.get("fingerprint"))
            if key in seen:
                continue
            seen.add(key)
            visit(parent, depth + 1)
            order.append({**parent, "_path": path})

    visit(manifest, 0)
    return order


def is_model(m: dict) -> bool:
    """A training dataset: it names a model or an adapter (ARCHITECTURE.md section 6)."""
    return any(isinstance(_key(m, k), str) for k in (*MODEL_KEYS, "adapter"))


def model_folders(m: dict) -> list[tuple[str, str]]:
    """``(folder, kind)`` of every model the dataset holds, relative to it (``"."``: the dataset
    itself), ``kind`` "model" (complete) or "adapter" (PEFT)."""
    out: list[tuple[str, str]] = []
    for k in MODEL_KEYS:
        v = _key(m, k)
        if isinstance(v, str) and v and posixpath.normpath(v) not in [f for f, _ in out]:
            out.append((posixpath.normpath(v), "model"))
    adapter = _key(m, "adapter")
    if isinstance(adapter, str) and adapter:
        out.append((posixpath.normpath(adapter), "adapter"))
    return out


def _name(m: dict) -> str:
    return f"{m.get('stage')}/{m.get('fingerprint')}"


# --------------------------------------------------------------------------- paths made portable
def _local(path: str) -> str | None:
    """The absolute local path of ``path``, or None for a URL."""
    if "://" in path and not path.startswith("file://"):
        return None
    return os.path.abspath(path.removeprefix("file://"))


def _model_folder_of(ref: str) -> str:
    """The complete model folder a reference names: the ``model`` folder of a refinery dataset (its
    manifest read, nothing loaded), else the reference itself."""
    m = _manifest_of(ref)
    if m is not None:
        for folder, kind in model_folders(m):
            if kind == "model":
                return ref if folder == "." else posixpath.join(ref.rstrip("/"), folder)
    return ref


def portable_ref(ref: str, from_folder: str, root: str | None = None) -> str:
    """A model reference as a card or adapter config records it: a hub id as given, a local folder
    (a refinery dataset: its model folder, found in the workdir ``root`` first, see :func:`locate`)
    relative to ``from_folder`` (the folder that records it), a URL as given (a remote store has no
    relative path to a local one)."""
    here = _local(from_folder)
    if not (ref.startswith((".", "/", "~", "file://")) or os.path.exists(ref)):
        return ref   # a hub id
    target = _local(_model_folder_of(locate(os.path.expanduser(ref), root)))
    if here is None or target is None:
        return ref
    return os.path.relpath(target, here)


def card_base(ref: str, model_dir: str, root: str | None) -> tuple[str | None, str]:
    """The base model as a card records it: (``base_model`` for the metadata, the name its text
    uses). A hub id as given; a model in the card's own workdir ``root`` relative to the model folder
    (still true when the workdir moves); any other local model by name only, ``STAGE/FINGERPRINT``
    of a refinery dataset or the folder's name, and not in the metadata: a path out of the workdir
    would tie the card's bytes to where the two happen to live (one fingerprint, one card)."""
    if not (ref.startswith((".", "/", "~", "file://")) or os.path.exists(ref)):
        return ref, ref
    located = locate(os.path.expanduser(ref), root)
    target = _local(_model_folder_of(located))
    here = _local(model_dir)
    if root and target and here and (target + os.sep).startswith(root.rstrip(os.sep) + os.sep):
        rel = os.path.relpath(target, here)
        return rel, rel
    m = _manifest_of(located)
    name = _name(m) if m else posixpath.basename((target or ref).rstrip("/"))
    return None, f"{name} (a local model outside this workdir)"


def _portable_text(value: str, root: str | None = None) -> str:
    """A config string without absolute paths or URLs: a dataset (``.../STAGE/FINGERPRINT``) by
    ``STAGE/FINGERPRINT``, any other file by its name, so the text is the same wherever the workdir
    is (``root``, kept for callers that know it, is not needed)."""
    def short(p: str) -> str:
        parts = p.rstrip("/").split("/")
        if len(parts) >= 2 and FINGERPRINT.fullmatch(parts[-1]):
            return "/".join(parts[-2:])
        return parts[-1]
    value = re.sub(r"\w+://\S+", lambda m: short(m.group(0)), value)
    return ABS_PATH.sub(lambda m: short(m.group(0)), value)


# --------------------------------------------------------------------------- formatting
def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower() if isinstance(v, bool) else "-"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _flat(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in sorted(d.items()):
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _config_rows(cfg: dict, root: str | None) -> list[tuple[str, str]]:
    """The config's settings, flattened, without unset values and computed identities, paths portable."""
    rows = []
    for k, v in _flat(cfg):
        if v is None or v == [] or v == {} or IDENTITY_KEY.search(k.rsplit(".", 1)[-1]):
            continue
        if isinstance(v, list):
            v = ", ".join(_portable_text(x, root) if isinstance(x, str) else json.dumps(x, sort_keys=True) for x in v)
        elif isinstance(v, str):
            v = _portable_text(v, root)
        rows.append((k, _fmt(v)))
    return rows


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |",
            *["| " + " | ".join(r) + " |" for r in rows]]


# --------------------------------------------------------------------------- what the lineage tells
def drop_reasons(counts: dict) -> dict[str, int]:
    """A stage's drops by reason from its counts (``dropped_by_reason``, else a ``dropped`` table;
    record errors and held-out documents too), largest first."""
    out: dict[str, int] = {}
    by = counts.get("dropped_by_reason") if isinstance(counts.get("dropped_by_reason"), dict) else counts.get("dropped")
    for table in (by, counts.get("record_errors")):
        if isinstance(table, dict):
            for k, v in table.items():
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    out[str(k)] = out.get(str(k), 0) + v
    if isinstance(counts.get("held_out"), int) and counts["held_out"] > 0:
        out["held out for evaluation"] = counts["held_out"]
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def languages(chain: list[dict]) -> list[str]:
    """Languages that reached the training data: a stage's ``by_language`` counts with documents out."""
    return sorted({lang for m in chain for lang in card_languages(m.get("counts", {}))})


def _sources_section(chain: list[dict], root: str | None) -> list[str]:
    """The raw inputs: crawl files of the ingest stages (by source), and the files other stages read."""
    lines: list[str] = []
    for m in chain:
        cfg = m.get("config", {})
        inputs = [i for i in cfg.get("inputs", []) if isinstance(i, dict) and isinstance(i.get("path"), str)]
        if inputs:
            by_source: dict[str, list[str]] = {}
            for i in inputs:
                by_source.setdefault(str(i.get("source") or "-"), []).append(_portable_text(i["path"], root))
            c = m.get("counts", {})
            lines.append(f"- `{_name(m)}`: {len(inputs)} file(s), {_fmt(c.get('docs_in'))} documents read, "
                         f"{_fmt(c.get('docs_out'))} kept")
            for source, files in sorted(by_source.items()):
                more = f" and {len(files) - MAX_SOURCES} more" if len(files) > MAX_SOURCES else ""
                lines.append(f"  - source `{source}`: " + ", ".join(f"`{f}`" for f in files[:MAX_SOURCES]) + more)
        for key in ("data", "path"):
            v = cfg.get(key)
            if isinstance(v, str) and v and _manifest_of(v) is None:
                lines.append(f"- `{_name(m)}` read `{_portable_text(v, root)}` ({key})")
    return lines


def _documents_section(chain: list[dict]) -> list[str]:
    rows = []
    for m in chain:
        c = m.get("counts", {})
        if not ("docs_in" in c and "docs_out" in c) or is_model(m):   # side stages (minhash) count only what they read
            continue
        reasons = drop_reasons(c)
        top = ", ".join(f"{k} {v:,}" for k, v in list(reasons.items())[:3]) or "-"
        rows.append([f"`{m.get('stage')}`", f"`{m.get('fingerprint')}`", _fmt(c.get("docs_in")), _fmt(c.get("docs_out")), top])
    return _table(["stage", "dataset", "documents in", "documents out", "top drop reasons"], rows) if rows else []


def _decontam_section(chain: list[dict]) -> list[str]:
    found = [m for m in chain if m.get("stage") == "decontaminate"]
    if not found:
        return ["No decontamination stage in this model's lineage: its training documents were not checked "
                "against benchmark texts."]
    lines = []
    for m in found:
        c = m.get("counts", {})
        names = _key(m, "benchmarks") or sorted(c.get("by_benchmark", {}))
        lines.append(f"- `{_name(m)}` (policy `{_key(m, 'policy') or '-'}`, {_key(m, 'n') or '-'}-grams) against "
                     + ", ".join(f"`{n}`" for n in names) + f": {_fmt(c.get('dropped'))} documents removed, "
                     f"{_fmt(c.get('modified'))} modified, of {_fmt(c.get('docs_in'))}")
        by = c.get("by_benchmark", {})
        lines += [f"  - `{n}`: {_fmt(by.get(n, 0))} documents" for n in names]
    return lines


def _tokenizer_section(chain: list[dict]) -> list[str]:
    lines = []
    for m in chain:
        tok = _key(m, "tokenizer")
        if m.get("stage") == "tokenize" and isinstance(tok, dict):
            c = m.get("counts", {})
            lines.append(f"- token dataset `{_name(m)}`: {_fmt(c.get('tokens'))} tokens of {_fmt(c.get('docs_out'))} "
                         f"documents, vocabulary {_fmt(_key(m, 'vocab_size'))} ({_key(m, 'dtype')}), tokenizer "
                         f"`{tok.get('fingerprint') or '-'}` (sha256 `{str(tok.get('sha256', '-'))[:16]}`)")
        elif m.get("stage") == "tokenizer":
            cfg = m.get("config", {})
            how = "trained" if not cfg.get("path") else "from a given tokenizer"
            lines.append(f"- tokenizer `{_name(m)}`: byte-level BPE {how}, vocabulary {_fmt(m.get('counts', {}).get('vocab_size'))}"
                         f", trained on {_fmt(m.get('counts', {}).get('train_docs'))} documents")
    return lines


def _model_chain(chain: list[dict], manifest: dict) -> list[list[str]]:
    rows = []
    for m in [*[x for x in chain if is_model(x)], manifest]:
        cfg, c = m.get("config", {}), m.get("counts", {})
        method = _key(m, "method") or cfg.get("objective") or m.get("stage")
        figures = ", ".join(f"{k} {_fmt(c[k])}" for k in ("steps", "tokens", "train_tokens", "examples", "pairs", "params")
                            if isinstance(c.get(k), int))
        rows.append([f"`{m.get('stage')}`", f"`{m.get('fingerprint')}`", f"`{method}`", figures or "-"])
    return rows


# --------------------------------------------------------------------------- this model
def _read_json(read: Callable[[str], bytes | None], rel: str) -> dict:
    data = read(rel)
    try:
        out = json.loads(data) if data else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return out if isinstance(out, dict) else {}


def pipeline_tag(model_config: dict, manifest: dict) -> str:
    """What the model does, from its architecture (masked LM, text-to-text, classifier, causal LM)."""
    arch = " ".join(model_config.get("architectures") or [])
    if "MaskedLM" in arch or manifest.get("config", {}).get("objective") == "mlm":
        return "fill-mask"
    if "SequenceClassification" in arch or _key(manifest, "task") == "classification":
        return "text-classification"
    if model_config.get("is_encoder_decoder"):
        return "text2text-generation"
    return "text-generation"


def _curve(read: Callable[[str], bytes | None], folder: str) -> tuple[list[str], list[str]]:
    """The loss curve's table (train and validation loss by step, about CURVE_ROWS rows) and the chart
    files of the model's ``metrics/`` folder (the dataset's when the model folder has none)."""
    from refinery.tasks.train.metrics import METRICS_DIR

    for base in dict.fromkeys([folder, "."]):
        rel = posixpath.normpath(posixpath.join(base, METRICS_DIR, "metrics.jsonl"))
        data = read(rel)
        if data is None:
            continue
        by_step: dict[int, dict] = {}
        for line in data.decode("utf-8", "replace").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue   # a damaged line: the curve is a summary, the file keeps everything
            if isinstance(r, dict) and isinstance(r.get("step"), int):
                row = by_step.setdefault(r["step"], {})
                for k in ("loss", "val_loss"):
                    if isinstance(r.get(k), (int, float)):
                        row[k] = r[k]
        steps = sorted(s for s, r in by_step.items() if r)
        every = max(1, math.ceil(len(steps) / CURVE_ROWS))
        keep = [s for i, s in enumerate(steps) if i % every == 0 or i == len(steps) - 1]
        table = _table(["step", "train loss", "validation loss"],
                       [[str(s), _fmt(by_step[s].get("loss")), _fmt(by_step[s].get("val_loss"))] for s in keep])
        charts = [posixpath.relpath(posixpath.join(base, METRICS_DIR, png), folder) for png in ("loss.png", "curves.png")
                  if read(posixpath.normpath(posixpath.join(base, METRICS_DIR, png))) is not None]
        return (table if keep else []), charts
    return [], []


def _training_section(manifest: dict, root: str | None, model_config: dict) -> list[str]:
    cfg = manifest.get("config", {}) if isinstance(manifest.get("config"), dict) else {}
    rows = dict(_config_rows(cfg, root))
    lines = [f"- stage `{manifest.get('stage')}`, method `{_key(manifest, 'method') or cfg.get('objective') or manifest.get('stage')}`"]
    counts = manifest.get("counts", {})
    figures = [f"{k} {_fmt(v)}" for k, v in sorted(counts.items()) if isinstance(v, int) and not isinstance(v, bool)]
    if figures:
        lines.append("- counts: " + ", ".join(figures))
    for k in ("val_loss_start", "val_loss_end", "best_step", "best_val_loss"):
        if isinstance(_key(manifest, k), (int, float)):
            lines.append(f"- {k}: {_fmt(_key(manifest, k))}")
    metrics = _key(manifest, "metrics")
    if isinstance(metrics, dict):
        lines += [f"- {k}: {_fmt(v)}" for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]
    arch = {k: model_config[k] for k in ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                                         "vocab_size", "max_position_embeddings") if k in model_config}
    if arch:
        lines.append("- architecture: " + ", ".join(f"{k} {_fmt(v)}" for k, v in arch.items()))
    picked = [(k, rows[k]) for k in HIGHLIGHTS if k in rows]
    if picked:
        lines += ["", *_table(["setting", "value"], [[f"`{k}`", v] for k, v in picked])]
    if rows:
        lines += ["", "<details><summary>Every setting of the stage's config</summary>", "",
                  *_table(["setting", "value"], [[f"`{k}`", v] for k, v in rows.items()]), "", "</details>"]
    return lines


# --------------------------------------------------------------------------- evaluations
def find_evaluations(dataset_path: str) -> list[str]:
    """The evaluate datasets of the same workdir (``<root>/evaluate/<fp>``) that scored the dataset
    at ``dataset_path`` (its ``model_identity``, ``dataset:STAGE:FP``, or the same path), sorted."""
    import fsspec

    m = _manifest_of(dataset_path)
    if m is None:
        return []
    want = f"dataset:{m.get('stage')}:{m.get('fingerprint')}"
    fs, p = fsspec.core.url_to_fs(dataset_path)
    root = posixpath.dirname(posixpath.dirname(p.rstrip("/")))
    try:
        folders = sorted(fs.ls(posixpath.join(root, "evaluate"), detail=False))
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for folder in folders:
        if posixpath.basename(folder.rstrip("/")).startswith("."):
            continue
        url = folder if "://" not in dataset_path else fs.unstrip_protocol(folder)
        em = _manifest_of(url)
        if em is None or em.get("stage") != "evaluate":
            continue
        models = em.get("config", {}).get("models", [])
        if any(isinstance(s, dict) and (s.get("identity") == want or s.get("path") == dataset_path) for s in models):
            out.append(url)
    return out


def evaluation_rows(eval_path: str, dataset_path: str, manifest: dict) -> tuple[str, list[dict]]:
    """(evaluate dataset name, its result rows for this model) from ``results.parquet``."""
    import pyarrow.parquet as pq

    from refinery.tasks.store import Dataset

    ds = Dataset.open(eval_path)
    want = f"dataset:{manifest.get('stage')}:{manifest.get('fingerprint')}"
    labels = {s["label"] for s in ds.config.get("models", [])
              if isinstance(s, dict) and (s.get("identity") == want or s.get("path") == dataset_path)}
    results = ds.manifest.get("results", "results.parquet")
    with ds.fs.open(ds.fs._strip_protocol(ds.file(results)), "rb") as f:
        rows = pq.read_table(f).to_pylist()
    return _name(ds.manifest), [r for r in rows if r.get("model") in labels]


def _eval_results(evaluations: Sequence[tuple[str, list[dict]]]) -> list:
    """huggingface_hub EvalResults (the model-index): every finite number, exactly as evaluated."""
    from huggingface_hub import EvalResult

    out = []
    for name, rows in evaluations:
        for r in rows:
            v = r.get("value")
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                continue
            metric = str(r["metric"])
            out.append(EvalResult(task_type="text-generation", dataset_type=str(r["task"]), dataset_name=str(r["task"]),
                                  dataset_config=name, metric_type=metric.split(",", 1)[0], metric_name=metric,
                                  metric_value=v))
    return out


def _eval_section(evaluations: Sequence[tuple[str, list[dict]]]) -> list[str]:
    if not any(rows for _, rows in evaluations):
        return ["No evaluation of this model yet: run the evaluate flow on it, then `refinery card` on this "
                "folder writes this card with the results (and the `model-index`)."]
    lines = []
    for name, rows in evaluations:
        lines += [f"From `{name}`:", "",
                  *_table(["task", "metric", "value", "stderr", "n"],
                          [[f"`{r['task']}`", f"`{r['metric']}`", _fmt(r.get("value")), _fmt(r.get("stderr")), _fmt(r.get("n"))]
                           for r in rows]), ""]
    return lines


# --------------------------------------------------------------------------- the card
def model_card_text(manifest: dict, folder: str, kind: str, *, dataset_path: str,
                    read: Callable[[str], bytes | None], evaluations: Sequence[tuple[str, list[dict]]] = (),
                    license: str = DEFAULT_LICENSE) -> str:
    """The card of the model in ``folder`` (relative to the dataset, ``kind`` "model" or "adapter")
    of the training dataset described by ``manifest`` (published, or about to be: see
    :func:`with_model_cards`), located at ``dataset_path``; ``read(rel)`` gives a file of the
    dataset (None when absent); ``evaluations`` are (evaluate dataset name, result rows)."""
    from huggingface_hub import ModelCardData

    fs_dataset = dataset_path.rstrip("/")
    root = _local(posixpath.dirname(posixpath.dirname(fs_dataset)))
    model_dir = posixpath.normpath(posixpath.join(fs_dataset, folder))
    chain = lineage(manifest, root)
    cfg = manifest.get("config", {}) if isinstance(manifest.get("config"), dict) else {}
    base_ref = next((cfg[k] for k in BASE_KEYS if isinstance(cfg.get(k), str) and cfg[k]), None)
    base_meta, base = card_base(base_ref, model_dir, root) if base_ref else (None, None)
    model_config = _read_json(read, posixpath.normpath(posixpath.join(folder, "config.json")))
    peft: dict = {}
    if kind == "adapter":
        peft = _read_json(read, posixpath.normpath(posixpath.join(folder, "adapter_config.json")))
        if not model_config:   # the architecture is the base's
            complete = next((f for f, k in model_folders(manifest) if k == "model"), None)
            model_config = _read_json(read, posixpath.join(complete, "config.json")) if complete else {}
    trained_on = [_name(m) for m in chain if m.get("stage") == "tokenize"]
    data = cfg.get("data")
    if isinstance(data, str) and data:
        dm = _manifest_of(locate(data, root))
        trained_on.append(_name(dm) if dm else _portable_text(data, root).rsplit("/", 1)[-1])
    method = _key(manifest, "method") or cfg.get("objective")
    peft_type = str(peft.get("peft_type", "")).lower() or None   # lora, ia3, ... (adapters only)
    tags = list(dict.fromkeys(t for t in ["refinery", str(manifest.get("stage")), method and str(method),
                                          "peft" if kind == "adapter" else None, peft_type] if t))
    name = f"{manifest.get('stage')}-{manifest.get('fingerprint')}" + ("-adapter" if kind == "adapter" else "")
    results = _eval_results(evaluations) if kind == "model" else []
    data_yaml = ModelCardData(
        base_model=base_meta, datasets=list(dict.fromkeys(trained_on)) or None, license=license,
        library_name="peft" if kind == "adapter" else "transformers", tags=tags,
        pipeline_tag=pipeline_tag(model_config, manifest), language=languages(chain) or None,
        model_name=name if results else None, eval_results=results or None,
    ).to_yaml()

    where = "this dataset folder" if folder == "." else f"`{folder}/` of dataset"
    load = (f'`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "<this folder>")`, '
            f"the base being `{base}`" + (" (relative to this folder)" if base_meta and base_meta.startswith(".") else "")
            if kind == "adapter"
            else '`AutoModelForCausalLM.from_pretrained("<this folder>")` (or the class its config names)')
    parts = [f"# `{manifest.get('stage')}` {'adapter' if kind == 'adapter' else 'model'} `{manifest.get('fingerprint')}`", "",
             f"Trained by the refinery `{manifest.get('stage')}` stage; "
             f"{where} `{_name(manifest)}`. Load it with {load}. Base model: "
             + (f"`{base}`." if base else "none (trained from scratch)."), "",
             "Everything below is read from the manifests of this dataset and of every dataset it was made from "
             "(`refinery inspect` shows the same lineage).", ""]
    sections = [
        ("Model lineage", _table(["stage", "dataset", "method", "figures"], _model_chain(chain, manifest))),
        ("Sources", _sources_section([*chain, manifest], root) or ["No raw sources recorded."]),
        ("Documents by stage", _documents_section(chain) or ["No document curation stage in this lineage."]),
        ("Decontamination", _decontam_section(chain)),
        ("Tokenizer", _tokenizer_section(chain) or ["The base model's tokenizer (no tokenize stage in this lineage)."]),
        ("Training", _training_section(manifest, root, model_config)),
    ]
    table, charts = _curve(read, folder)
    sections.append(("Loss curve", [*table, *([""] if table and charts else []), *[f"![{c}]({c})" for c in charts]]
                     or ["No metrics recorded."]))
    sections.append(("Evaluation", _eval_section(evaluations if kind == "model" else [])
                     if kind == "model" else ["The evaluations of this adapter's merged model are on that model's card."]))
    for title, body in sections:
        parts += [f"## {title}", "", *body, ""]
    return "---\n" + data_yaml.strip() + "\n---\n\n" + "\n".join(parts)


# --------------------------------------------------------------------------- publish time
def write_model_cards(b, inputs: list, cfg: Any, out: Any) -> Any:
    """Write the card of every model of the dataset ``b`` is building (``out``: the stage's
    StageOutput, whose extra keys name the model folders) into it, as files of the dataset."""
    from refinery.tasks.runtime import config_dict

    records = b.records()
    manifest = {"stage": b.stage, "fingerprint": b.fingerprint, "config": config_dict(cfg),
                "inputs": [d.ref() for d in inputs], "counts": dict(out.counts), "files": records,
                **{k: v for k, v in out.extra.items() if k not in ("stage", "fingerprint", "config", "inputs", "counts")}}
    listed = {r["path"] for r in records}

    def read(rel: str) -> bytes | None:
        rel = posixpath.normpath(rel)
        if rel not in listed:
            return None
        with b.fs.open(f"{b.dir}/{rel}", "rb") as f:
            return f.read()

    final = b.store.dataset_path(b.stage, b.fingerprint)
    for folder, kind in model_folders(manifest):
        text = model_card_text(manifest, folder, kind, dataset_path=final, read=read)
        b.write_bytes(posixpath.normpath(posixpath.join(folder, CARD)), text.encode())
    return out


def with_model_cards(fn: Callable) -> Callable:
    """Decorator for a training stage's body (under ``@stage``): after it trained and saved its
    models, their cards are written into the dataset before it is published."""
    @functools.wraps(fn)
    def body(b, inputs, cfg):
        return write_model_cards(b, inputs, cfg, fn(b, inputs, cfg))
    return body


# --------------------------------------------------------------------------- later: refinery card
def card_for(path: str, *, license: str = DEFAULT_LICENSE, evaluations: list[str] | None = None) -> str:
    """The card of ``path``: a training dataset (the card of its complete model, else its adapter),
    a model folder inside one (``W/finetune/FP/adapter``), or any other dataset (its dataset card).
    ``evaluations``: evaluate datasets to report (None: every one of the workdir that scored it)."""
    from refinery.tasks.card import CARD as DATASET_CARD, card_text
    from refinery.tasks.store import Dataset

    dataset_path, folder = split_model_path(path)
    ds = Dataset.open(dataset_path)
    m = ds.manifest
    if not is_model(m):
        return card_text(stage=m["stage"], fingerprint=m["fingerprint"], code_version=m.get("code_version", ""),
                         inputs=m.get("inputs", []), counts=m.get("counts", {}),
                         records=[r for r in m.get("files", []) if r["path"] != DATASET_CARD], license=license)
    folders = dict(model_folders(m))
    if folder is None:
        folder = next((f for f, k in folders.items() if k == "model"), next(iter(folders)))
    if folder not in folders:
        raise ValueError(f"{path}: {folder}/ is not a model folder of {ds.path} (its models: "
                         f"{', '.join(f + '/' for f in folders)})")
    listed = {r["path"] for r in m.get("files", [])}

    def read(rel: str) -> bytes | None:
        rel = posixpath.normpath(rel)
        if rel not in listed:
            return None
        with ds.fs.open(ds.fs._strip_protocol(ds.file(rel)), "rb") as f:
            return f.read()

    found = find_evaluations(ds.path) if evaluations is None else list(evaluations)
    evals = [evaluation_rows(e, ds.path, m) for e in found]
    return model_card_text(m, folder, folders[folder], dataset_path=ds.path, read=read, evaluations=evals,
                           license=license)


def split_model_path(path: str) -> tuple[str, str | None]:
    """(dataset folder, model folder inside it or None) of a path that is either."""
    p = path.rstrip("/")
    if _manifest_of(p) is not None:
        return p, None
    head, tail = p.rsplit("/", 1) if "/" in p else ("", p)
    if head and _manifest_of(head) is not None:
        return head, tail
    raise ValueError(f"{path}: neither a refinery dataset (a folder with manifest.json) nor a model folder "
                     "directly inside one")


__all__ = ["CARD", "DEFAULT_LICENSE", "lineage", "model_folders", "portable_ref", "model_card_text",
           "write_model_cards", "with_model_cards", "card_for", "split_model_path", "find_evaluations", "evaluation_rows",
           "drop_reasons", "pipeline_tag"]
