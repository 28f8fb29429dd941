"""The ``quality`` stage: score every document with a model classifier, keep by threshold or top fraction.

Two kinds of model:

* ``fasttext`` (the DCLM recipe): a ``.bin`` given by ``path``, or trained by the cached
  ``quality_model`` stage from ``positive`` and ``negative`` documents (files or documents datasets;
  see :mod:`refinery.tasks.quality.fasttext_train`). The score is the probability of the positive label.
* ``hf``: a Hugging Face sequence-classification model by folder or hub id (FineWeb-Edu style); a
  one-output head is a regression score (FineWeb-Edu: 0-5, keep >= 3), otherwise the probability of the
  label ``positive_label``. Batched, on CPU or GPU.

Every kept document carries ``quality_score`` (and the model's name) in its ``metadata`` JSON; the dropped
ones go to ``excluded/`` with their score. ``top_fraction`` keeps the best-scored fraction of each
input part (parts are large random slices of a crawl, so this approximates the global fraction without
a second pass). The manifest holds a score histogram with fixed bin edges (summed over shards).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from functools import lru_cache
from typing import Any, Iterator, Literal

from pydantic import Field, field_validator, model_validator

from refinery.tasks.config import StrictModel
from refinery.tasks.runtime import ShardedStage, StageOutput, stage, sum_counts

EXCLUDED_DIR = "excluded"
MODEL_FILE = "model/quality.bin"


class FastTextTrainConfig(StrictModel):
    dim: int = Field(64, ge=2, description="embedding size (DCLM: 256 on 400k documents; smaller for small sets)")
    epoch: int = Field(20, ge=1, description="passes over the training documents")
    lr: float = Field(0.5, gt=0, description="initial learning rate, decays linearly to 0")
    word_ngrams: int = Field(2, ge=1, description="DCLM: word bigrams")
    min_count: int = Field(1, ge=1, description="words seen fewer times are left out of the vocabulary")
    bucket: int = Field(200_000, ge=1, description="hash buckets for word n-grams (fastText default 2,000,000)")
    max_docs: int = Field(50_000, ge=1, description="at most this many documents per class (random, seeded)")
    balance: bool = Field(True, description="sample the larger class down to the smaller one's size")
    seed: int = 0


class QualityConfig(StrictModel):
    model: Literal["fasttext", "hf"] | None = Field(None, description="classifier kind; null = no quality stage")
    path: str | None = Field(None, description="fastText .bin file, or Hugging Face model folder / hub id; for "
                                               "fasttext, null = train from positive/negative")
    positive: list[str] = Field(default_factory=list, description="high-quality documents to train on: JSON/JSONL/"
                                                                  "parquet/text files or documents datasets")
    negative: list[str] = Field(default_factory=list, description="low-quality (e.g. random crawl) documents to "
                                                                  "train on, same formats")
    text_field: str = Field("text", description="field holding the text in training files (records without it: "
                                                "their string fields joined)")
    train: FastTextTrainConfig = Field(default_factory=FastTextTrainConfig)
    keep: Literal["threshold", "top_fraction", "all"] = Field("threshold", description="threshold: score >= "
                                                              "threshold; top_fraction: best fraction of each part; "
                                                              "all: score only")
    threshold: float = Field(0.5, description="fasttext: probability of the positive class; hf regression: the "
                                              "score (FineWeb-Edu keeps >= 3)")
    top_fraction: float = Field(0.5, gt=0, le=1)
    positive_label: str = Field("hq", description="fasttext: positive label name; hf: label name (or index) "
                                                  "whose probability is the score")
    batch_size: int = Field(32, ge=1, description="hf: documents per forward pass")
    max_length: int = Field(512, ge=8, description="hf: tokens per document (truncated)")
    device: str = Field("auto", description="hf: 'auto' (cuda when available), 'cpu', 'cuda', ...")
    histogram_range: tuple[float, float] | None = Field(None, description="score histogram range; null = (0, 1) "
                                                                          "for probabilities, (0, 5) for a "
                                                                          "regression head")
    histogram_bins: int = Field(20, ge=1, le=1000)

    @field_validator("positive", "negative", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        # `--set quality.positive=a.json,b.jsonl` on the command line
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> "QualityConfig":
        if self.model == "hf" and not self.path:
            raise ValueError("quality.model=hf needs quality.path (a model folder or hub id)")
        if self.model == "fasttext" and not self.path and not (self.positive and self.negative):
            raise ValueError("quality.model=fasttext needs quality.path (a .bin) or both quality.positive and "
                             "quality.negative to train one")
        return self


# --------------------------------------------------------------------------- training data
def _strings(v: Any) -> Iterator[str]:
    if isinstance(v, str):
        if v.strip():
            yield v
    elif isinstance(v, dict):
        for x in v.values():
            yield from _strings(x)
    elif isinstance(v, list):
        for x in v:
            yield from _strings(x)


def _record_text(rec: Any, field: str) -> str:
    if isinstance(rec, dict) and isinstance(rec.get(field), str):
        return rec[field]
    return "\n\n".join(_strings(rec))


def read_texts(path: str, field: str = "text") -> list[str]:
    """Texts of a documents dataset (folder with a manifest), a parquet, JSON (a list), JSONL or text file
    (one document per line); gzip-compressed files are read transparently."""
    import gzip

    if os.path.isdir(path):
        from refinery.tasks.store import Dataset

        ds = Dataset.open(path)
        return [t for tab in ds.iter_tables() for t in tab.column(field).to_pylist() if isinstance(t, str)]
    if not os.path.exists(path):
        raise FileNotFoundError(f"quality training file {path} does not exist")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return [t for t in pq.read_table(path, columns=[field]).column(field).to_pylist() if isinstance(t, str)]
    opener = gzip.open if path.endswith(".gz") else open
    name = path[:-3] if path.endswith(".gz") else path
    with opener(path, "rt", encoding="utf-8") as f:
        if name.endswith(".json"):
            data = json.load(f)
            rows = data if isinstance(data, list) else [data]
            return [t for t in (_record_text(r, field) for r in rows) if t]
        if name.endswith(".jsonl"):
            out = []
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{i + 1}: not JSON: {e}") from e
                    t = _record_text(rec, field)
                    if t:
                        out.append(t)
            return out
        return [ln.rstrip("\n") for ln in f if ln.strip()]


def _digest_paths(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode() + b"\0")
        files = [os.path.join(d, f) for d, _, fs in os.walk(p) for f in sorted(fs)] if os.path.isdir(p) else [p]
        for fp in sorted(files):
            with open(fp, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
    return h.hexdigest()


class TrainSetConfig(StrictModel):
    positive: list[str]
    negative: list[str]
    text_field: str
    positive_label: str
    train: FastTextTrainConfig
    files_sha256: str = Field(description="SHA-256 of the training files: the model's identity")


def train_config(cfg: QualityConfig) -> TrainSetConfig:
    pos = [os.path.abspath(p) for p in cfg.positive]
    neg = [os.path.abspath(p) for p in cfg.negative]
    return TrainSetConfig(positive=pos, negative=neg, text_field=cfg.text_field, positive_label=cfg.positive_label,
                          train=cfg.train, files_sha256=_digest_paths(pos + neg))


def _sample(texts: list[str], n: int, rng: random.Random) -> list[str]:
    return texts if len(texts) <= n else rng.sample(texts, n)


@stage("quality_model", version="1")
def quality_model(b, inputs, cfg: TrainSetConfig) -> StageOutput:
    """A fastText classifier trained on the configured positive and negative documents (no inputs)."""
    from refinery.tasks.quality.fasttext_train import TrainParams, prepare, train

    t0 = time.perf_counter()
    if _digest_paths(cfg.positive + cfg.negative) != cfg.files_sha256:
        raise ValueError("quality: the training files changed while the stage was being planned; run again")
    rng = random.Random(cfg.train.seed)
    pos = [prepare(t) for p in cfg.positive for t in read_texts(p, cfg.text_field)]
    neg = [prepare(t) for p in cfg.negative for t in read_texts(p, cfg.text_field)]
    pos, neg = [t for t in pos if t], [t for t in neg if t]
    if not pos or not neg:
        raise ValueError(f"quality: training needs documents of both classes (positive {len(pos)}, negative {len(neg)})")
    n_pos = n_neg = cfg.train.max_docs
    if cfg.train.balance:
        n_pos = n_neg = min(len(pos), len(neg), cfg.train.max_docs)
    pos, neg = _sample(pos, n_pos, rng), _sample(neg, n_neg, rng)
    neg_label = "lq" if cfg.positive_label != "lq" else "other"
    t = cfg.train
    model = train(pos + neg, [cfg.positive_label] * len(pos) + [neg_label] * len(neg),
                  TrainParams(dim=t.dim, epoch=t.epoch, lr=t.lr, word_ngrams=t.word_ngrams, min_count=t.min_count,
                              bucket=t.bucket, seed=t.seed))
    b.write_bytes(MODEL_FILE, model.to_bytes())
    return StageOutput(counts={"positive": len(pos), "negative": len(neg), "vocabulary": len(model.words)},
                       stats={"train_seconds": round(time.perf_counter() - t0, 3)},
                       extra={"model": MODEL_FILE, "labels": model.labels})


# --------------------------------------------------------------------------- scorers
class FastTextScorer:
    def __init__(self, path: str, positive_label: str):
        import fasttext   # fasttext-predict (C++ inference)

        try:
            self.model = fasttext.load_model(path)
        except Exception as e:
            raise ValueError(f"quality: cannot load fastText model {path}: {e}") from e
        self.label = "__label__" + positive_label
        labels = list(self.model.predict("probe", k=-1)[0])   # the predict-only wheel has no .labels
        if self.label not in labels:
            raise ValueError(f"quality: model {path} has no label {self.label} (labels: {sorted(labels)})")

    def score(self, texts: list[str]) -> list[float]:
        from refinery.tasks.quality.fasttext_train import prepare

        # the C++ predict per line: [(probability, label), ...]; the wrapper's list form mixes up its
        # return values in fasttext-predict 0.9.2.4
        predict, label = self.model.f.predict, self.label
        out = []
        for t in texts:
            pairs = predict(prepare(t) + "\n", -1, 0.0, "replace")
            out.append(next((float(p) for p, lab in pairs if lab == label), 0.0))
        return out


class HFScorer:
    """Sequence classification, batched: regression head -> its output; else P(positive_label)."""

    def __init__(self, name: str, positive_label: str, batch_size: int, max_length: int, device: str):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.tok = AutoTokenizer.from_pretrained(name)
        self.model = AutoModelForSequenceClassification.from_pretrained(name).to(self.device).eval()
        self.batch_size, self.max_length = batch_size, max_length
        n = self.model.config.num_labels
        self.regression = n == 1
        if not self.regression:
            l2i = {str(k): int(v) for k, v in (self.model.config.label2id or {}).items()}
            if positive_label in l2i:
                self.index = l2i[positive_label]
            elif positive_label.isdigit() and int(positive_label) < n:
                self.index = int(positive_label)
            else:
                raise ValueError(f"quality: model {name} has no label {positive_label!r} (labels: {sorted(l2i)})")

    def score(self, texts: list[str]) -> list[float]:
        torch = self.torch
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tok(texts[i:i + self.batch_size], truncation=True, max_length=self.max_length,
                             padding=True, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                logits = self.model(**batch).logits.float()
            if self.regression:
                out.extend(logits[:, 0].tolist())
            else:
                out.extend(torch.softmax(logits, dim=-1)[:, self.index].tolist())
        return out


def _local(path: str) -> str:
    """A local copy of a model file in a remote store (fastText reads only local files)."""
    if "://" not in path or path.startswith("file://"):
        return path.removeprefix("file://")
    import tempfile

    import fsspec

    local = os.path.join(tempfile.mkdtemp(prefix="refinery-quality-"), os.path.basename(path))
    with fsspec.open(path, "rb") as src, open(local, "wb") as dst:
        for block in iter(lambda: src.read(1 << 20), b""):
            dst.write(block)
    return local


@lru_cache(maxsize=2)
def _scorer(kind: str, path: str, positive_label: str, batch_size: int, max_length: int, device: str):
    if kind == "fasttext":
        return FastTextScorer(_local(path), positive_label)
    return HFScorer(path, positive_label, batch_size, max_length, device)


def model_location(cfg: QualityConfig, model_ds=None) -> str:
    if model_ds is not None:
        return model_ds.file(model_ds.manifest["model"])
    if cfg.path is None:
        raise ValueError("quality: no model path and no trained model dataset")
    return cfg.path


# --------------------------------------------------------------------------- scoring a table
def histogram(scores: list[float], lo: float, hi: float, bins: int) -> dict[str, int]:
    """Counts per fixed bin ``[lo + i w, lo + (i+1) w)``, values outside clipped into the end bins."""
    width = (hi - lo) / bins
    out = {f"{lo + i * width:.3g}..{lo + (i + 1) * width:.3g}": 0 for i in range(bins)}
    keys = list(out)
    for s in scores:
        if math.isnan(s):
            continue
        i = min(bins - 1, max(0, int((s - lo) // width)))
        out[keys[i]] += 1
    return out


def keep_mask(scores: list[float], cfg: QualityConfig) -> list[bool]:
    if cfg.keep == "all":
        return [True] * len(scores)
    if cfg.keep == "threshold":
        return [s >= cfg.threshold for s in scores]
    n_keep = math.ceil(cfg.top_fraction * len(scores))
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    chosen = set(order[:n_keep])
    return [i in chosen for i in range(len(scores))]


def _with_score(meta: str | None, score: float, model: str, int_score: bool = False) -> str:
    try:
        d = json.loads(meta) if meta else {}
    except json.JSONDecodeError:
        d = {"metadata": meta}
    if not isinstance(d, dict):
        d = {"metadata": d}
    d["quality_score"] = round(score, 6)
    if int_score:   # FineWeb-Edu: int(round(max(0, min(score, 5))))
        d["quality_int_score"] = int(round(max(0.0, min(score, 5.0))))
    d["quality_model"] = model
    return json.dumps(d, ensure_ascii=False)


def hist_range(cfg: QualityConfig, scorer) -> tuple[float, float]:
    if cfg.histogram_range is not None:
        return cfg.histogram_range
    return (0.0, 5.0) if getattr(scorer, "regression", False) else (0.0, 1.0)


def score_table(table, cfg: QualityConfig, scorer, model_name: str):
    """(kept table with the score in metadata, exclusions table, counts) for one table of documents."""
    import pyarrow as pa

    n = table.num_rows
    texts = table.column("text").to_pylist()
    ok = [i for i, t in enumerate(texts) if isinstance(t, str)]
    scores = [float("nan")] * n
    for i, s in zip(ok, scorer.score([texts[i] for i in ok]) if ok else []):
        scores[i] = s
    valid = [scores[i] for i in ok]
    mask_ok = keep_mask(valid, cfg)
    keep = [False] * n
    for i, m in zip(ok, mask_ok):
        keep[i] = m
    cols = set(table.column_names)
    metas = table.column("metadata").to_pylist() if "metadata" in cols else [None] * n
    regression = bool(getattr(scorer, "regression", False))
    new_meta = [_with_score(metas[i], scores[i], model_name, regression) for i in range(n) if keep[i]]
    kept = table.filter(pa.array(keep, type=pa.bool_()))
    if "metadata" in cols:
        idx = kept.column_names.index("metadata")
        kept = kept.set_column(idx, kept.schema.field(idx), pa.array(new_meta, type=pa.string()))
    else:
        kept = kept.append_column("metadata", pa.array(new_meta, type=pa.string()))
    ids = table.column("id").to_pylist() if "id" in cols else [str(i) for i in range(n)]
    urls = table.column("url").to_pylist() if "url" in cols else [None] * n
    drop = [i for i in range(n) if not keep[i]]
    excluded = pa.table({"id": pa.array([ids[i] for i in drop], pa.string()),
                         "url": pa.array([urls[i] for i in drop], pa.string()),
                         "reason": pa.array(["quality:corrupt" if i not in set(ok) else f"quality:{cfg.keep}"
                                             for i in drop], pa.string()),
                         "value": pa.array([None if math.isnan(scores[i]) else scores[i] for i in drop],
                                           pa.float64())})
    lo, hi = hist_range(cfg, scorer)
    counts = {"docs_in": n, "docs_out": sum(keep), "dropped": n - sum(keep), "corrupt": n - len(ok),
              "score_histogram": histogram(valid, lo, hi, cfg.histogram_bins),
              "score_sum": float(sum(valid)), "scored": len(valid)}
    return kept, excluded, counts


@stage("quality", version="1", sharded=True)
class Quality(ShardedStage):
    """inputs = [documents] or [documents, quality_model dataset]; one shard per input parquet part."""

    @staticmethod
    def identity(cfg: QualityConfig) -> list[str]:
        """A local model file or folder is part of the identity (editing it re-runs the stage)."""
        if cfg.path and os.path.exists(cfg.path):
            return ["model:" + _digest_paths([os.path.abspath(cfg.path)])[:16]]
        return []

    @staticmethod
    def plan(inputs, cfg: QualityConfig) -> list[dict]:
        if not inputs or len(inputs) > 2:
            raise ValueError("quality takes a documents dataset, and optionally a quality_model dataset")
        docs = inputs[0]
        model_ds = inputs[1] if len(inputs) == 2 else None
        if model_ds is not None and model_ds.stage != "quality_model":
            raise ValueError(f"quality: second input must be a quality_model dataset, not {model_ds.stage}")
        where = model_location(cfg, model_ds)
        return [{"name": f"part-{i:05d}", "index": i, "dataset": docs.path, "file": path, "model": where}
                for i, path in enumerate(p for p in docs.files if p.endswith(".parquet"))]

    @staticmethod
    def shard(b, item: dict, cfg: QualityConfig) -> dict:
        from refinery.tasks.card import part_name
        from refinery.tasks.store import Dataset

        assert cfg.model is not None
        scorer = _scorer(cfg.model, item["model"], cfg.positive_label, cfg.batch_size, cfg.max_length, cfg.device)
        try:
            table = next(Dataset.open(item["dataset"]).iter_tables(files=[item["file"]]))
        except Exception as e:
            raise RuntimeError(f"quality: cannot read input part {item['file']}: {e}") from e
        t0 = time.perf_counter()
        kept, excluded, counts = score_table(table, cfg, scorer, f"{cfg.model}:{os.path.basename(item['model'])}")
        seconds = time.perf_counter() - t0
        if kept.num_rows:
            b.write_table(part_name(item["index"]), kept)
        if excluded.num_rows:
            b.write_table(f"{EXCLUDED_DIR}/excluded-{item['index']:05d}.parquet", excluded)
        return {"counts": counts, "seconds": seconds}

    @staticmethod
    def reduce(b, results: list[dict], cfg: QualityConfig, inputs) -> StageOutput:
        counts = sum_counts([r["counts"] for r in results])
        for k in ("docs_in", "docs_out", "dropped", "corrupt", "scored"):
            counts.setdefault(k, 0)
        mean = counts.pop("score_sum", 0.0) / counts["scored"] if counts["scored"] else None
        seconds = sum(r.get("seconds", 0.0) for r in results)
        return StageOutput(counts=counts,
                           stats={"score_seconds": round(seconds, 3), "mean_score": mean,
                                  "docs_per_sec": round(counts["docs_in"] / seconds, 1) if seconds else None},
                           extra={"model": cfg.model, "keep": cfg.keep,
                                  "threshold": cfg.threshold if cfg.keep == "threshold" else None,
                                  "top_fraction": cfg.top_fraction if cfg.keep == "top_fraction" else None})


def quality_stages(workdir: str, docs, cfg: QualityConfig, runner: Any = None) -> dict:
    """The trained model (when one is trained) and the scored documents; ``{}`` when quality.model is null."""
    if cfg.model is None:
        return {}
    out: dict = {}
    inputs = [docs]
    if cfg.model == "fasttext" and not cfg.path:
        out["quality_model"] = quality_model.call(workdir, [], train_config(cfg), runner=runner)
        inputs.append(out["quality_model"])
    out["quality"] = Quality.call(workdir, inputs, cfg, runner=runner)
    return out


def run_quality(store, docs, cfg: QualityConfig, map_fn=None) -> dict:
    """Plain Python (tests, benches): the model (trained when needed) and the scored documents."""
    out: dict = {}
    inputs = [docs]
    if cfg.model == "fasttext" and not cfg.path:
        out["quality_model"] = quality_model.run(store, [], train_config(cfg))
        inputs.append(out["quality_model"])
    out["quality"] = Quality.run(store, inputs, cfg, map_fn=map_fn)
    return out


__all__ = ["QualityConfig", "FastTextTrainConfig", "Quality", "quality_model", "quality_stages", "run_quality",
           "read_texts", "score_table", "histogram", "keep_mask", "FastTextScorer", "HFScorer", "train_config"]
