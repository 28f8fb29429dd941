"""Held-out language modelling: bits per byte and perplexity of a causal LM on documents.

Every token of a document's text is scored given all the tokens before it (up to the model's
context), starting from the tokenizer's BOS token (EOS when there is no BOS), so every byte of the
text is predicted once. Long documents are scored in rolling windows: each window predicts up to
``stride`` new tokens with the preceding tokens as context, up to ``max_length`` in all.

    bits per byte = sum NLL (nats) / (ln 2 * UTF-8 bytes of the texts)   tokenizer-independent
    perplexity    = exp(sum NLL / scored tokens)                          per token of this tokenizer

The trailing EOS that training appends to each document is not scored: it is no byte of the text.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

LN2 = math.log(2.0)


@dataclasses.dataclass
class DocScore:
    """One document's score: summed negative log-likelihood (nats) over its tokens and bytes."""
    nll: float
    tokens: int
    bytes: int

    @property
    def bits_per_byte(self) -> float | None:
        return self.nll / (LN2 * self.bytes) if self.bytes else None


@dataclasses.dataclass
class _Window:
    doc: int               # index of the document it belongs to
    ids: list[int]         # model input
    targets: list[int]     # the next tokens of the last len(targets) input positions


def windows(ids: Sequence[int], start_id: int, max_length: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """Rolling windows over ``[start_id] + ids``: (input ids, scored next tokens of the last inputs);
    every token of ``ids`` is a target exactly once, with as much preceding context as fits."""
    seq = [start_id, *ids]
    n = len(ids)
    out, start = [], 1            # seq[start:end] are the targets of this window
    while start <= n:
        end = min(n + 1, start + (max_length if start == 1 else stride))
        lo = max(0, end - 1 - max_length)
        out.append((seq[lo:end - 1], seq[start:end]))   # inputs seq[lo:end-1] predict seq[lo+1:end]
        start = end
    return out


def model_max_length(model, cap: int) -> int:
    """The smaller of ``cap`` and the model's position limit (when its config names one)."""
    conf = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(conf, key, None)
        if isinstance(v, int) and v > 0:
            return min(cap, v)
    return cap


def start_token(tokenizer) -> int:
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start a document with")
    return int(tid)


def score_documents(model, tokenizer, texts: Iterable[str], *, max_length: int = 1024, stride: int | None = None,
                    batch_size: int = 8, device: str = "cpu") -> list[DocScore]:
    """Score each text (see the module docstring); windows of several documents share a batch."""
    import torch

    max_length = model_max_length(model, max_length)
    stride = stride or max(1, max_length // 2)
    if not 0 < stride <= max_length:
        raise ValueError(f"stride {stride} must be in 1..max_length ({max_length})")
    first = start_token(tokenizer)
    texts = list(texts)
    scores = [DocScore(0.0, 0, len(t.encode("utf-8"))) for t in texts]
    wins: list[_Window] = []
    for i, t in enumerate(texts):
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        scores[i].tokens = len(ids)
        wins += [_Window(i, w, tg) for w, tg in windows(ids, first, max_length, stride)]
    wins.sort(key=lambda w: len(w.ids))      # similar lengths share a batch: less padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else first
    model.eval()
    with torch.inference_mode():
        for b in range(0, len(wins), batch_size):
            batch = wins[b:b + batch_size]
            width = max(len(w.ids) for w in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, w in enumerate(batch):       # right padding: positions stay those of the text
                ids[r, :len(w.ids)] = torch.tensor(w.ids)
                mask[r, :len(w.ids)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for r, w in enumerate(batch):
                n, k = len(w.ids), len(w.targets)
                logp = torch.log_softmax(logits[r, n - k:n].float(), dim=-1)
                tg = torch.tensor(w.targets, device=logp.device)
                scores[w.doc].nll -= float(logp.gather(1, tg[:, None]).sum().item())
    return scores


def aggregate(scores: Sequence[DocScore]) -> dict:
    """Totals of several documents: bits per byte, perplexity per token, NLL, tokens, bytes, docs."""
    nll = sum(s.nll for s in scores)
    tokens = sum(s.tokens for s in scores)
    nbytes = sum(s.bytes for s in scores)
    return {"bits_per_byte": nll / (LN2 * nbytes) if nbytes else None,
            "perplexity": math.exp(nll / tokens) if tokens else None,
            "nll": nll, "tokens": tokens, "bytes": nbytes, "docs": len(scores)}


__all__ = ["DocScore", "windows", "score_documents", "aggregate", "model_max_length", "start_token", "LN2"]
