"""Classification fine-tuning of encoders (the masked-LM model ``pretrain --set objective=mlm``
makes, or any Hugging Face encoder) through the ``finetune`` stage, chosen from the model's config.

Data: JSON / JSONL records with ``text`` (or ``sentence``) and ``label`` (a class name or number);
the classes are the sorted distinct labels. The model is the encoder with a sequence-classification
head (``AutoModelForSequenceClassification``: the new ``classifier`` layer trains at ``head_lr``,
the pretrained weights at ``lr``, through the shared ``param_groups``); ``method`` full or lora
(LoRA on the attention projections, the head trained in full). Validation: loss and accuracy.

Training runs on the engine (refinery.tasks.engine, :class:`ClassifyMethod`): gradient
accumulation, the schedule, early stopping on the validation loss (``load_best``: the best weights
back), metrics (``metrics/`` in the output, as SFT's), checkpoints and resume, and several
processes (``devices``, through refinery.tasks.finetune.worker).

Output dataset: the classifier at its top (lora: merged), with ``id2label`` in its config; the
manifest's stats hold accuracy and loss before and after.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from refinery.tasks.engine.trainer import Method, Micro

HEAD_PREFIXES = ("classifier", "score")


@dataclass
class Labelled:
    text: str
    label: int
    record: int


def read_labelled(path: str, max_records: int | None = None) -> tuple[list[Labelled], list[str], int]:
    """(examples, class names, bad records): records without text or label are counted as bad."""
    from refinery.tasks.finetune.data import iter_raw_records

    raw, bad = [], 0
    for n, rec in iter_raw_records(path):
        text = rec.get("text", rec.get("sentence")) if isinstance(rec, dict) else None
        label = rec.get("label") if isinstance(rec, dict) else None
        if not isinstance(text, str) or not text.strip() or label is None or isinstance(label, (dict, list)):
            bad += 1
            continue
        raw.append((text, str(label), n))
        if max_records and len(raw) >= max_records:
            break
    classes = sorted({lab for _, lab, _ in raw})
    if len(classes) < 2:
        raise ValueError(f"{path}: classification needs records with 'text' and 'label' and at least 2 classes "
                         f"(found {len(raw)} usable records, {len(classes)} classes, {bad} bad)")
    index = {c: i for i, c in enumerate(classes)}
    return [Labelled(t, index[lab], n) for t, lab, n in raw], classes, bad


def _chunks(n: int, batch_size: int, seed: int | None) -> list[list[int]]:
    """Indices ``0..n-1`` in batches of ``batch_size``, shuffled by ``seed`` (None: in order)."""
    order = list(range(n))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return [order[i: i + batch_size] for i in range(0, n, batch_size)]


def _encode(tok, chunk: list[Labelled], seq_len: int) -> dict:
    import torch

    enc = tok([e.text for e in chunk], truncation=True, max_length=seq_len, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([e.label for e in chunk])}


def evaluate(model, tok, items, cfg, seq_len: int, device) -> dict:
    import torch
    import torch.nn.functional as F

    was = model.training
    model.eval()
    loss, right, n = 0.0, 0, 0
    with torch.no_grad():
        for idx in _chunks(len(items), cfg.batch_size, None):
            b = {k: v.to(device) for k, v in _encode(tok, [items[j] for j in idx], seq_len).items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            loss += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
            right += int((logits.argmax(-1) == b["labels"]).sum())
            n += len(b["labels"])
    model.train(was)
    return {"loss": loss / max(n, 1), "accuracy": right / max(n, 1)}


def _pooling(source: str, tok) -> dict:
    """ModernBERT pools the first token ("cls"); a tokenizer that puts no CLS token first (the
    tokenizer stage's BPE) would pool an ordinary word, so mean pooling is used instead."""
    from transformers import AutoConfig

    if getattr(AutoConfig.from_pretrained(source), "model_type", "") != "modernbert":
        return {}
    first = tok("a")["input_ids"][:1]
    return {} if tok.cls_token_id is not None and first == [tok.cls_token_id] else {"classifier_pooling": "mean"}


def _model(cfg, source: str, classes: list[str], device, tok):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=len(classes), id2label=dict(enumerate(classes)),
        label2id={c: i for i, c in enumerate(classes)}, **_pooling(source, tok)).to(device)
    if cfg.method == "full":
        return model
    if cfg.method != "lora":
        raise ValueError(f"method={cfg.method}: classification fine-tuning takes method full or lora")
    from peft import LoraConfig, TaskType, get_peft_model

    from refinery.tasks.finetune.methods import attention_targets

    targets = cfg.lora.target_modules if cfg.lora.target_modules is not None else attention_targets(model)
    pc = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                    target_modules=targets, modules_to_save=[p for p in HEAD_PREFIXES
                                                             if any(n.startswith(p) for n, _ in model.named_modules())])
    return get_peft_model(model, pc)


def split(items: list[Labelled], cfg) -> tuple[list[Labelled], list[Labelled]]:
    """(train, validation): a seeded shuffle, ``val_fraction`` of it (at least one text) held out."""
    order = list(range(len(items)))
    random.Random(cfg.seed).shuffle(order)
    n_val = max(1, min(cfg.max_val_examples, int(round(len(items) * cfg.val_fraction))))
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


class ClassifyMethod(Method):
    """Classification on the engine: the cross-entropy of one micro-batch of texts.

    Each step draws the global window of ``grad_accum * world`` micro-batches from the seeded
    per-epoch order (its position is checkpointed); this process takes ``window[rank::world]``. A
    micro-batch's loss is its summed cross-entropy over the texts of the whole window, times the
    world size, so accumulation and processes equal one bigger batch. Validation: loss (early
    stopping's metric) and accuracy."""

    head_prefixes = HEAD_PREFIXES
    show = ("loss", "accuracy")

    def __init__(self, cfg, model, tok, train: list[Labelled], val: list[Labelled], seq_len: int, device):
        from refinery.tasks.finetune.train import BatchStream

        if not train:
            raise ValueError("classification: no training texts left after the validation split")
        self.desc = f"finetune[classify/{cfg.method}]"
        self.cfg, self.model, self.tok, self.train, self.val = cfg, model, tok, train, val
        self.seq_len, self.device = seq_len, device
        self.stream = BatchStream(lambda epoch: _chunks(len(train), cfg.batch_size, cfg.seed * 1000 + epoch))
        self.window: Any = None
        self.n_window = 0

    def micro_step(self, micro: int) -> Micro:
        import torch.nn.functional as F

        from refinery.tasks.finetune.train import Window

        par = self.engine.par
        if micro == 0:
            self.window = Window(self.stream, self.accum(), par.rank, par.world)
            self.n_window = sum(len(c) for c in self.window.all)
        b = {k: v.to(self.device) for k, v in _encode(self.tok, [self.train[j] for j in self.window.mine[micro]],
                                                        self.seq_len).items()}
        logits = self.engine.train_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        loss = F.cross_entropy(logits, b["labels"], reduction="sum") / max(self.n_window, 1) * par.world
        accuracy = float((logits.detach().argmax(-1) == b["labels"]).float().mean())
        return Micro(loss, {"tokens": int(b["attention_mask"].sum()), "accuracy": accuracy}, weight=1.0)

    def after_step(self, figures: dict) -> None:
        figures["epoch"] = self.window.epoch

    def validate(self) -> dict | None:
        return evaluate(self.model, self.tok, self.val, self.cfg, self.seq_len, self.device)

    def stateful(self) -> dict[str, Any]:
        return {"data": self.stream}


def train_classifier(cfg, model, tok, train: list[Labelled], val: list[Labelled], seq_len: int, device, *,
                     ckpt_dir=None, metrics_dir=None, log: Callable[[str], Any] = print, progress: bool = False,
                     stop_after: int | None = None, title: str | None = None):
    """Train ``model`` in place on the engine (accumulation, schedule, early stopping on the
    validation loss and ``load_best``, metrics, checkpoints and resume in ``ckpt_dir``); returns
    ``(engine, result)``."""
    from refinery.tasks.engine.optim import build_optimizer
    from refinery.tasks.engine.trainer import Engine

    method = ClassifyMethod(cfg, model, tok, train, val, seq_len, device)
    engine = Engine(method, cfg, total=cfg.max_steps, device=device, ckpt_dir=ckpt_dir, metrics_dir=metrics_dir,
                    log=log, progress=progress, stop_after=stop_after, keep_best=cfg.load_best,
                    restore_best=cfg.load_best,
                    optimizer=lambda m: build_optimizer(m, cfg, device, lr=cfg.resolved_lr(), head_prefixes=HEAD_PREFIXES),
                    title=title or f"finetune classify {cfg.method}")
    return engine, engine.fit()


def summary(result) -> dict:
    """The run's figures for the stage (JSON-serialisable: a multi-process run's rank 0 writes them)."""
    train = result.train_rows()
    return {"status": result.status, "steps": result.steps,
            "epochs": int(train[-1].get("epoch", 0)) + 1 if train else 0,
            "val_history": [{"step": r["step"], **{k[4:]: v for k, v in r.items() if k.startswith("val_")}}
                            for r in result.val_rows() if r["step"] > 0],
            "train_loss_first": train[0]["loss"] if train else None,
            "train_loss_last": train[-1]["loss"] if train else None,
            "best_val_loss": result.stopper.best, "best_step": result.stopper.best_step,
            "stopped_early": result.status == "early_stopped", "restored_best": result.restored_step is not None,
            "train_tokens": result.tokens, "train_seconds": round(result.seconds, 3),
            "resumed_from": result.resumed_from}


def _data(cfg, source: str):
    """(texts, classes, bad records, train, validation, tokenizer): the same in the stage and every worker."""
    from refinery.tasks.finetune.methods import load_tokenizer

    items, classes, bad = read_labelled(cfg.data, cfg.max_records)
    train, val = split(items, cfg)
    return items, classes, bad, train, val, load_tokenizer(cfg, source)


def train_worker(cfg, local_rank: int, ckpt_dir, metrics_dir, log, title: str):
    """One process of a multi-process classification run (refinery.tasks.finetune.worker)."""
    from refinery.tasks.finetune.methods import resolve_model_source
    from refinery.tasks.train.common import pick_device, seed_everything

    source = resolve_model_source(cfg.model)
    _, classes, _, train, val, tok = _data(cfg, source)
    device = pick_device(cfg.device, local_rank)
    seed_everything(cfg.seed)
    model = _model(cfg, source, classes, device, tok)
    engine, result = train_classifier(cfg, model, tok, train, val, cfg.seq_len, device, ckpt_dir=ckpt_dir,
                                      metrics_dir=metrics_dir, log=log, title=title)
    return engine, result, summary(result)


def run(b, cfg, source: str, log: Callable[[str], Any], memory_plan: dict | None, ckpt_dir=None):
    """The whole stage for an encoder: data, model, training on the engine (checkpoints and the live
    metrics in ``ckpt_dir``: a rerun resumes), the classifier and its metrics out."""
    from refinery.tasks.runtime import StageOutput
    from refinery.tasks.train.common import PeakMemory, pick_device, seed_everything
    from refinery.tasks.train.metrics import METRICS_DIR, publish_metrics

    items, classes, bad, train, val, tok = _data(cfg, source)
    seq_len = cfg.seq_len
    device = pick_device(cfg.device)
    metrics_dir = Path(ckpt_dir) / METRICS_DIR if ckpt_dir is not None else None
    log(f"finetune[classify/{cfg.method}]: {len(train)} train / {len(val)} validation texts, {len(classes)} classes")
    with PeakMemory(device) as mem:
        seed_everything(cfg.seed)
        model = _model(cfg, source, classes, device, tok)
        before = evaluate(model, tok, val, cfg, seq_len, device)
        if cfg.launches():   # worker processes train; their weights come back into this model
            from refinery.tasks.finetune.processes import train_on_processes

            if ckpt_dir is None:
                raise ValueError("several processes need a checkpoint folder")
            run_ = train_on_processes(cfg, model, Path(ckpt_dir), metrics_dir, log, task="classify")
        else:
            engine, result = train_classifier(cfg, model, tok, train, val, seq_len, device, ckpt_dir=ckpt_dir,
                                              metrics_dir=metrics_dir, log=log, progress=True)
            result.raise_if_interrupted(ckpt_dir)   # never publish a half-trained classifier
            run_ = summary(result)
            del engine
        after = evaluate(model, tok, val, cfg, seq_len, device)
        memory = mem.stats()
    out = os.path.join(b.tmpdir(), "model")
    final = model.merge_and_unload() if cfg.method == "lora" else model
    final.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    b.put_dir(out, "")
    if metrics_dir is not None and metrics_dir.is_dir():
        publish_metrics(b, metrics_dir)
    log(f"finetune[classify/{cfg.method}]: accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, "
        f"loss {before['loss']:.4f} -> {after['loss']:.4f}")
    return StageOutput(
        counts={"records": len(items) + bad, "bad_records": bad, "examples": len(items), "train_examples": len(train),
                "val_examples": len(val), "steps": run_["steps"]},
        stats={"task": "classification", "classes": classes, "val_loss_before": before["loss"],
               "val_loss_after": after["loss"], "accuracy_before": before["accuracy"],
               "accuracy_after": after["accuracy"], "val_history": run_["val_history"],
               "train_loss_first": run_["train_loss_first"], "train_loss_last": run_["train_loss_last"],
               "best_val_loss": run_["best_val_loss"], "best_step": run_["best_step"],
               "stopped_early": run_["stopped_early"], "restored_best": run_["restored_best"],
               "train_tokens": run_["train_tokens"], "train_seconds": run_["train_seconds"],
               "resumed_from": run_.get("resumed_from"),
               "lr": cfg.resolved_lr(), "head_lr": cfg.head_lr if cfg.head_lr is not None else cfg.resolved_lr(),
               **memory},
        extra={"method": cfg.method, "task": "classification", "base_model": source, "model": ".",
               "classes": classes, "memory_plan": memory_plan, "epochs": run_["epochs"]},
    )


__all__ = ["read_labelled", "evaluate", "run", "split", "ClassifyMethod", "train_classifier", "HEAD_PREFIXES", "Labelled"]
