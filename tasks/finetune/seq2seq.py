"""Text-to-text fine-tuning of encoder-decoder models (T5 style, e.g. the span-corruption models
``pretrain --set objective=span`` makes) through the same ``finetune`` stage.

The model's config decides (:func:`model_kind`): an encoder-decoder gets the source text (every turn
before the last answer: instruction and input) on the encoder and the answer as the decoder's
labels, no chat template, loss over every label token; a causal LM keeps the chat path. Masked-LM
encoders (classification) are refused with a clear message: they need labelled classes, which the
instruction formats do not carry.

    kind = model_kind(source)                        causal | seq2seq | encoder
    items, counts = encode_all(tok, examples, seq_len, report)
    batches = make_batches(items, batch_size, pad_id, seed)
    samples = generate_samples(model, tok, examples, device, max_new_tokens)
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from refinery.tasks.finetune.data import IGNORE, Batch, prompt_and_reference


def model_kind(source: str) -> str:
    """causal (decoder LMs), seq2seq (encoder-decoder), encoder (masked-LM encoders)."""
    p = Path(source) / "config.json"
    if p.is_file():
        conf = json.loads(p.read_text())
    else:   # a hub id: its cached config
        from transformers import AutoConfig

        conf = AutoConfig.from_pretrained(source).to_dict()
    from refinery.tasks.train.init_from import init_objective

    return {"clm": "causal", "span": "seq2seq", "mlm": "encoder"}[init_objective(conf)]


@dataclass
class S2SEncoded:
    input_ids: list[int]     # the source, then EOS
    labels: list[int]        # the answer, then EOS
    record: int
    truncated: bool = False

    @property
    def n_labels(self) -> int:
        return len(self.labels)


def source_and_target(messages: list[dict]) -> tuple[str, str]:
    """The encoder's text (the turns before the last answer, contents joined) and the answer."""
    before, answer = prompt_and_reference(messages)
    return "\n\n".join(m["content"] for m in before if m.get("content")), answer


def _ids(tok, text: str, limit: int) -> tuple[list[int], bool]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    cut = len(ids) > limit - 1
    return list(ids[: limit - 1]) + [tok.eos_token_id], cut


def encode_all(tok, examples: Sequence, seq_len: int, report=None, progress: bool = False):
    """Source and answer ids of each example (each cut to ``seq_len`` with its EOS)."""
    out: list = []
    counts: Counter[str] = Counter()
    for ex in examples:
        src, tgt = source_and_target(ex.messages)
        s, cut_s = _ids(tok, src, seq_len)
        t, cut_t = _ids(tok, tgt, seq_len)
        if cut_s or cut_t:
            counts["truncated"] += 1
        out.append(S2SEncoded(s, t, ex.record, cut_s or cut_t))
    counts["examples"] = len(out)
    counts["tokens"] = sum(len(e.input_ids) + len(e.labels) for e in out)
    counts["label_tokens"] = sum(e.n_labels for e in out)
    return out, dict(counts)


def pad_batch(items: Sequence[S2SEncoded], pad_id: int) -> Batch:
    import torch

    ls, lt = max(len(e.input_ids) for e in items), max(len(e.labels) for e in items)
    ids = torch.full((len(items), ls), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), ls), dtype=torch.long)
    labels = torch.full((len(items), lt), IGNORE, dtype=torch.long)
    for i, e in enumerate(items):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return Batch(ids, labels, mask, None, int(mask.sum()) + sum(len(e.labels) for e in items),
                 sum(e.n_labels for e in items))


def make_batches(items: Sequence[S2SEncoded], batch_size: int, pad_id: int, seed: int | None = None) -> list[Batch]:
    order = list(range(len(items)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    ordered = [items[i] for i in order]
    return [pad_batch(ordered[i: i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)]


def loss_sum(model, batch: Batch):
    """Cross-entropy summed over the answer tokens (the model shifts labels into decoder inputs)."""
    import torch.nn.functional as F

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                   use_cache=False).logits.float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    return loss, int((batch.labels != IGNORE).sum())


def generate_samples(model, tok, examples: Sequence, device, max_new_tokens: int,
                     max_prompt_tokens: int | None = None) -> list[dict]:
    """Greedy answers to held-out sources."""
    import torch

    was_training = model.training
    model.eval()
    out = []
    for ex in examples:
        src, reference = source_and_target(ex.messages)
        ids, _ = _ids(tok, src, max_prompt_tokens or 10 ** 9)
        ids_t = torch.tensor([ids], device=device)
        with torch.no_grad():
            gen = model.generate(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out.append({"record": ex.record, "instruction": src[:500], "reference": reference[:500],
                    "generation": tok.decode(gen[0], skip_special_tokens=True)})
    model.train(was_training)
    return out


def is_encoder_decoder(model) -> bool:
    """Whether ``model`` (or the module inside its DDP wrapper) is an encoder-decoder."""
    from refinery.tasks.train.distributed import unwrap

    return bool(getattr(getattr(unwrap(model), "config", None), "is_encoder_decoder", False))


__all__ = ["model_kind", "S2SEncoded", "encode_all", "make_batches", "loss_sum", "generate_samples",
           "source_and_target", "is_encoder_decoder"]
