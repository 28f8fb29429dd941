"""Classification fine-tuning of encoders (the masked-LM model ``pretrain --set objective=mlm``
makes, or any Hugging Face encoder) through the ``finetune`` stage, chosen from the model's config.

Data: JSON / JSONL records with ``text`` (or ``sentence``) and ``label`` (a class name or number);
the classes are the sorted distinct labels. The model is the encoder with a sequence-classification
head (``AutoModelForSequenceClassification``: the new ``classifier`` layer trains at ``head_lr``,
the pretrained weights at ``lr``, through the shared ``param_groups``); ``method`` full or lora
(LoRA on the attention projections, the head trained in full). Validation: loss and accuracy.

Output dataset: the classifier at its top (lora: merged), with ``id2label`` in its config; the
manifest's stats hold accuracy and loss before and after.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Callable

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


def _batches(tok, items: list[Labelled], batch_size: int, seq_len: int, seed: int | None):
    import torch

    order = list(range(len(items)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        chunk = [items[j] for j in order[i: i + batch_size]]
        enc = tok([e.text for e in chunk], truncation=True, max_length=seq_len, padding=True, return_tensors="pt")
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
               "labels": torch.tensor([e.label for e in chunk])}


def evaluate(model, tok, items, cfg, seq_len: int, device) -> dict:
    import torch
    import torch.nn.functional as F

    was = model.training
    model.eval()
    loss, right, n = 0.0, 0, 0
    with torch.no_grad():
        for b in _batches(tok, items, cfg.batch_size, seq_len, None):
            b = {k: v.to(device) for k, v in b.items()}
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


def run(b, cfg, source: str, log: Callable[[str], Any], memory_plan: dict | None):
    """The whole stage for an encoder: data, model, training with validation, the classifier out."""
    import torch

    from refinery.tasks.finetune.methods import load_tokenizer, lr_lambda
    from refinery.tasks.runtime import StageOutput
    from refinery.tasks.train.common import PeakMemory, param_groups, pick_device, seed_everything

    items, classes, bad = read_labelled(cfg.data, cfg.max_records)
    rng = random.Random(cfg.seed)
    order = list(range(len(items)))
    rng.shuffle(order)
    n_val = max(1, min(cfg.max_val_examples, int(round(len(items) * cfg.val_fraction))))
    val = [items[i] for i in order[:n_val]]
    train = [items[i] for i in order[n_val:]]
    tok = load_tokenizer(cfg, source)
    seq_len = cfg.seq_len
    device = pick_device(cfg.device)
    log(f"finetune[classify/{cfg.method}]: {len(train)} train / {len(val)} validation texts, {len(classes)} classes")
    with PeakMemory(device) as mem:
        seed_everything(cfg.seed)
        model = _model(cfg, source, classes, device, tok)
        before = evaluate(model, tok, val, cfg, seq_len, device)
        groups = param_groups(model, cfg.resolved_lr(), cfg.head_lr, HEAD_PREFIXES, cfg.weight_decay)
        opt = torch.optim.AdamW(groups, lr=cfg.resolved_lr(), betas=(0.9, 0.999))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
        losses, history, step, epoch = [], [], 0, 0
        model.train()
        while step < cfg.max_steps:
            for batch in _batches(tok, train, cfg.batch_size, seq_len, cfg.seed * 1000 + epoch):
                batch = {k: v.to(device) for k, v in batch.items()}
                loss = torch.nn.functional.cross_entropy(
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float(),
                    batch["labels"])
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                losses.append(float(loss.detach()))
                if step % cfg.resolved_eval_every() == 0 or step == cfg.max_steps:
                    history.append({"step": step, **evaluate(model, tok, val, cfg, seq_len, device)})
                if step >= cfg.max_steps:
                    break
            epoch += 1
        after = evaluate(model, tok, val, cfg, seq_len, device)
        memory = mem.stats()
    out = os.path.join(b.tmpdir(), "model")
    final = model.merge_and_unload() if cfg.method == "lora" else model
    final.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    b.put_dir(out, "")
    log(f"finetune[classify/{cfg.method}]: accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, "
        f"loss {before['loss']:.4f} -> {after['loss']:.4f}")
    return StageOutput(
        counts={"records": len(items) + bad, "bad_records": bad, "examples": len(items), "train_examples": len(train),
                "val_examples": len(val), "steps": step},
        stats={"task": "classification", "classes": classes, "val_loss_before": before["loss"],
               "val_loss_after": after["loss"], "accuracy_before": before["accuracy"],
               "accuracy_after": after["accuracy"], "val_history": history,
               "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
               "lr": cfg.resolved_lr(), "head_lr": cfg.head_lr if cfg.head_lr is not None else cfg.resolved_lr(),
               **memory},
        extra={"method": cfg.method, "task": "classification", "base_model": source, "model": ".",
               "classes": classes, "memory_plan": memory_plan, "epochs": epoch},
    )


__all__ = ["read_labelled", "evaluate", "run", "HEAD_PREFIXES", "Labelled"]
