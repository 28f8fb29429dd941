"""The three pretraining objectives: turn a batch of token windows into model inputs and a loss.

Every objective receives the reader's windows, int64 ``(B, seq_len + 1)``, and a
``torch.Generator`` for its random choices (seeded from the step, so a resumed run draws the
same masks as an uninterrupted one).

* :class:`CausalLM`   next-token prediction: inputs ``w[:, :-1]``, targets ``w[:, 1:]``.
* :class:`MaskedLM`   BERT masking (Devlin et al. 2019, section 3.1): 15% of the (non-special)
  tokens are selected; of those 80% become the mask token, 10% a random token, 10% stay.
* :class:`SpanCorruption`  T5 (Raffel et al. 2020, section 3.1.4): noise density 0.15, mean
  span length 3; each noise span becomes one sentinel ``<extra_id_N>`` in the encoder input and
  the target is ``<extra_id_0> span0 <extra_id_1> span1 ... EOS``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in fp32 over labels != -100."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE)


# ----------------------------------------------------------------------------- masked LM
def mask_tokens(ids: torch.Tensor, *, mask_id: int, vocab_size: int, special_ids: Sequence[int],
                generator: torch.Generator, probability: float = 0.15, mask_ratio: float = 0.8,
                random_ratio: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of ``ids`` (any shape). Returns ``(inputs, labels)``; labels are -100 where not selected.

    Special tokens (EOS, pad, mask, sentinels) are never selected and never drawn as random tokens.
    """
    special = torch.zeros(max(vocab_size, int(ids.max()) + 1), dtype=torch.bool)
    special[[s for s in special_ids if s is not None and 0 <= s < special.numel()]] = True
    eligible = ~special[ids]
    selected = (torch.rand(ids.shape, generator=generator) < probability) & eligible
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE))
    roll = torch.rand(ids.shape, generator=generator)
    to_mask = selected & (roll < mask_ratio)
    to_random = selected & (roll >= mask_ratio) & (roll < mask_ratio + random_ratio)
    allowed = torch.nonzero(~special[:vocab_size]).squeeze(1)
    random_tokens = allowed[torch.randint(len(allowed), ids.shape, generator=generator)]
    inputs = ids.clone()
    inputs[to_mask] = mask_id
    inputs[to_random] = random_tokens[to_random]
    return inputs, labels


# ----------------------------------------------------------------------------- span corruption
def span_lengths(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a sequence of ``length`` tokens, as in T5's random_spans_noise_mask."""
    num_noise = int(round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(int(round(num_noise / mean_span_length)), 1)
    return num_noise, num_spans


def _segment(num_items: int, num_segments: int, generator: torch.Generator) -> torch.Tensor:
    """Random partition of ``num_items`` into ``num_segments`` non-empty parts (lengths)."""
    cuts = torch.randperm(num_items - 1, generator=generator)[: num_segments - 1] + 1
    bounds = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([num_items])])
    return bounds.diff()


def noise_mask(length: int, noise_density: float, mean_span_length: float, generator: torch.Generator) -> torch.Tensor:
    """Boolean (length,) mask of noise tokens: spans alternate non-noise, noise, ..., starting with non-noise."""
    num_noise, num_spans = span_lengths(length, noise_density, mean_span_length)
    num_spans = min(num_spans, num_noise, length - num_noise)
    noise = _segment(num_noise, num_spans, generator)
    keep = _segment(length - num_noise, num_spans, generator)
    lengths = torch.stack([keep, noise], 1).reshape(-1)
    flags = torch.tensor([False, True]).repeat(num_spans)
    return torch.repeat_interleave(flags, lengths)


def corrupt_spans(ids: torch.Tensor, *, sentinel_ids: Sequence[int], eos_id: int, generator: torch.Generator,
                  noise_density: float = 0.15, mean_span_length: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 span corruption of a batch ``(B, L)``. Returns ``(encoder_inputs, labels)``, both fixed-length
    over the batch (every row has the same number of noise tokens and spans), each ending with EOS."""
    rows_in, rows_out = [], []
    for row in ids:
        mask = noise_mask(len(row), noise_density, mean_span_length, generator)
        starts = mask & ~torch.cat([torch.tensor([False]), mask[:-1]])   # first token of each noise span
        span_idx = torch.cumsum(starts.long(), 0) - 1
        if int(starts.sum()) > len(sentinel_ids):
            raise ValueError(f"span corruption needs {int(starts.sum())} sentinel tokens, the tokenizer has "
                             f"{len(sentinel_ids)} (<extra_id_N>)")
        sent = torch.as_tensor(list(sentinel_ids), dtype=row.dtype)
        # encoder: non-noise tokens, one sentinel in place of each noise span
        enc = torch.where(starts, sent[span_idx.clamp(min=0)], row)[~mask | starts]
        # decoder target: sentinel then the span's tokens, for every span
        dec_tokens = torch.stack([sent[span_idx.clamp(min=0)], row], 1)  # (L, 2)
        take = torch.stack([starts, mask], 1)
        dec = dec_tokens[take]
        eos = torch.tensor([eos_id], dtype=row.dtype)
        rows_in.append(torch.cat([enc, eos]))
        rows_out.append(torch.cat([dec, eos]))
    return torch.stack(rows_in), torch.stack(rows_out)


def sentinel_token_ids(tokenizer, needed: int | None = None) -> list[int]:
    """Ids of ``<extra_id_0>``, ``<extra_id_1>``, ... from the tokenizer (T5 convention)."""
    vocab = tokenizer.get_vocab()
    ids: list[int] = []
    while f"<extra_id_{len(ids)}>" in vocab:
        ids.append(vocab[f"<extra_id_{len(ids)}>"])
    if not ids or (needed is not None and len(ids) < needed):
        raise ValueError(f"the tokenizer has {len(ids)} sentinel tokens <extra_id_N>, span corruption needs "
                         f"{needed or 1}: train the tokenizer with sentinel tokens")
    return ids


# ----------------------------------------------------------------------------- objectives
class CausalLM:
    """Next-token prediction. ``loss_chunk_tokens`` > 0 computes the loss without the full logits
    (:func:`refinery.tasks.train.chunked_ce.causal_lm_loss`: the model's forward skips its head, the
    head's weight meets the hidden states that many tokens at a time); the first such loss also
    checks, on the last position, that the model's own logits are that projection."""

    name = "clm"

    def __init__(self, loss_chunk_tokens: int = 0):
        if loss_chunk_tokens < 0:
            raise ValueError(f"loss_chunk_tokens must be 0 (off) or positive, got {loss_chunk_tokens}")
        self.loss_chunk_tokens = loss_chunk_tokens
        self._head_checked = False

    def prepare(self, windows: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        return {"input_ids": windows[:, :-1], "labels": windows[:, 1:]}

    def loss(self, model, batch: dict) -> torch.Tensor:
        if self.loss_chunk_tokens:
            return self._chunked_loss(model, batch)
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        return cross_entropy(logits, batch["labels"])

    def _chunked_loss(self, model, batch: dict) -> torch.Tensor:
        from refinery.tasks.train.chunked_ce import causal_lm_loss, check_supported

        check = not self._head_checked
        if check:
            check_supported(model)
        # labels are already shifted by prepare: labels[:, t] follows input_ids[:, t]
        loss = causal_lm_loss(model, batch["input_ids"], batch["labels"], self.loss_chunk_tokens, check_head=check)
        self._head_checked = True
        return loss

    def tokens(self, batch: dict) -> int:
        return int(batch["input_ids"].numel())


class MaskedLM:
    name = "mlm"

    def __init__(self, mask_id: int, vocab_size: int, special_ids: Sequence[int], probability: float = 0.15):
        if mask_id is None:
            raise ValueError("masked LM needs a tokenizer with a mask token")
        self.mask_id, self.vocab_size, self.special_ids, self.probability = mask_id, vocab_size, list(special_ids), probability

    def prepare(self, windows: torch.Tensor, generator: torch.Generator) -> dict:
        inputs, labels = mask_tokens(windows[:, :-1], mask_id=self.mask_id, vocab_size=self.vocab_size,
                                     special_ids=self.special_ids, generator=generator, probability=self.probability)
        return {"input_ids": inputs, "labels": labels}

    def loss(self, model, batch: dict) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"]).logits
        return cross_entropy(logits, batch["labels"])

    def tokens(self, batch: dict) -> int:
        return int(batch["input_ids"].numel())


class SpanCorruption:
    name = "span"

    def __init__(self, sentinel_ids: Sequence[int], eos_id: int, pad_id: int, noise_density: float = 0.15,
                 mean_span_length: float = 3.0):
        self.sentinel_ids, self.eos_id, self.pad_id = list(sentinel_ids), eos_id, pad_id
        self.noise_density, self.mean_span_length = noise_density, mean_span_length

    def prepare(self, windows: torch.Tensor, generator: torch.Generator) -> dict:
        enc, labels = corrupt_spans(windows[:, :-1], sentinel_ids=self.sentinel_ids, eos_id=self.eos_id,
                                    generator=generator, noise_density=self.noise_density,
                                    mean_span_length=self.mean_span_length)
        start = torch.full((labels.size(0), 1), self.pad_id, dtype=labels.dtype)
        return {"input_ids": enc, "decoder_input_ids": torch.cat([start, labels[:, :-1]], 1), "labels": labels}

    def loss(self, model, batch: dict) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"], use_cache=False).logits
        return cross_entropy(logits, batch["labels"])

    def tokens(self, batch: dict) -> int:
        return int(batch["input_ids"].numel() + batch["labels"].numel())


def special_ids(tokenizer) -> dict[str, int | None]:
    eos = tokenizer.eos_token_id
    return {"eos": eos, "bos": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
            "pad": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
            "mask": tokenizer.mask_token_id}


def make_objective(name: str, tokenizer, vocab_size: int, seq_len: int, *, mlm_probability: float = 0.15,
                   noise_density: float = 0.15, mean_span_length: float = 3.0, loss_chunk_tokens: int = 0):
    sp = special_ids(tokenizer)
    if loss_chunk_tokens and name != "clm":
        raise ValueError(f"loss_chunk_tokens applies to the clm objective only, not {name!r}")
    if name == "clm":
        return CausalLM(loss_chunk_tokens)
    if name == "mlm":
        if sp["mask"] is None:
            raise ValueError("the mlm objective needs a tokenizer with a mask token")
        return MaskedLM(sp["mask"], vocab_size, tokenizer.all_special_ids, mlm_probability)
    if name == "span":
        _, spans = span_lengths(seq_len, noise_density, mean_span_length)
        if sp["eos"] is None or sp["pad"] is None:
            raise ValueError("the span objective needs a tokenizer with eos and pad tokens")
        return SpanCorruption(sentinel_token_ids(tokenizer, spans), sp["eos"], sp["pad"], noise_density, mean_span_length)
    raise ValueError(f"unknown objective {name!r}: use clm, mlm or span")


def example_lengths(objective, seq_len: int) -> tuple[int, int]:
    """(model input length, decoder length or 0) of one example of ``seq_len`` tokens, from the
    objective's own ``prepare`` (span corruption shortens the encoder input and adds a target)."""
    batch = objective.prepare(torch.full((1, seq_len + 1), 3, dtype=torch.long), step_generator(0, 0, 0))
    return batch["input_ids"].size(1), batch["labels"].size(1) if "decoder_input_ids" in batch else 0


def step_generator(seed: int, step: int, micro: int, stream: int = 0) -> torch.Generator:
    """A generator for one micro-batch: depends only on (seed, step, micro-step, stream), so resume is
    exact. Stream 0 is training, 1 validation."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, stream, step, micro]).generate_state(1)[0]))
    return g


__all__ = ["CausalLM", "MaskedLM", "SpanCorruption", "make_objective", "mask_tokens", "corrupt_spans", "noise_mask",
           "span_lengths", "example_lengths", "sentinel_token_ids", "special_ids", "step_generator", "cross_entropy", "IGNORE"]
