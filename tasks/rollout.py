"""One rollout engine: batched sampling from a causal LM with a KV cache (``refinery generate``,
evaluation's samples and judge, the synth stage, and PPO, GRPO, RLOO and online DPO on one process
or DDP, through :func:`refinery.tasks.align.ppo.sample_replies`; under FSDP the trainers keep
``generate`` with ``synced_gpus``, where every process must make the same forwards).

``sample(model, tokenizer, prompts, params)`` takes prompts as token ids and returns, in the
prompts' order, each completion's ids, text, finish reason (``eos``, ``stop`` or ``length``) and,
if asked, the log-probability of every sampled token. How:

- prompts are bucketed by length (sorted, then cut into batches of ``batch_size``), so a batch
  carries little padding; each batch is left-padded, with position ids counted from the first real
  token (as Hugging Face ``generate`` does), so a padded prompt decodes as it would alone;
- the prefill computes the prompts' KV cache and only the last position's logits
  (``logits_to_keep=1``); prompts of a batch whose lengths differ by more than ``prefill_slack`` are
  prefilled in separate chunks (padding costs prefill compute) whose caches are then left-padded and
  stacked into the batch's cache; then a step loop feeds one token per sequence
  (``model(..., past_key_values=cache, use_cache=True)``); no logits processors, stopping criteria or
  output bookkeeping beyond what the step needs, which is most of ``generate``'s cost on small models;
- each sequence stops on its own, on an EOS id or a stop string (found in the decoded tail of its
  completion; the returned text ends before the stop string, the ids keep the token that
  completed it); finished sequences leave the batch (their rows are dropped from the cache and the
  mask) once at least ``drop_fraction`` of it has finished, so the remaining steps compute only live
  rows;
- greedy when ``temperature`` is 0 (or ``greedy``): the argmax, equal to ``generate``'s greedy
  output; otherwise temperature, then top-k, then top-p (nucleus) filtering and one multinomial
  draw, from ``generator`` (a ``torch.Generator``), else one seeded from ``seed``, else the global
  generator (what a caller that seeds the global generators per rollout wants). Same inputs, same
  settings, same seed: the same completions on CPU. Log-probabilities are those of the tokens under
  the temperature-scaled distribution before top-k/top-p (what PPO's ratio uses), of the raw
  distribution when greedy;
- ``merge_lora``: a PEFT LoRA model is merged for the sampling and unmerged after (fewer matmuls
  per step; the base weights come back up to float rounding, so off by default).

The result carries the tokens generated, the seconds spent and the tokens/s, for the per-step
logging of rollout throughput, and gives the completions as right-padded tensors (``padded``) for
a trainer's log-prob passes (GRPO and RLOO sample through it). The module imports torch only inside its functions.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Iterator, Sequence


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0: no top-k
    greedy: bool = False              # the argmax whatever the temperature
    seed: int | None = None           # seeds a private generator; None: the global one (or ``generator``)
    stop: tuple[str, ...] = ()        # stop strings
    eos_ids: tuple[int, ...] | None = None   # None: the model's generation config, else the tokenizer's EOS
    logprobs: bool = False
    batch_size: int = 32              # sequences per batch (a bucket of similar prompt lengths)
    drop_fraction: float = 0.25       # drop finished rows once this share of the batch has finished
    prefill_slack: float = 0.25       # prefill in chunks whose padding wastes at most this share of a row
    merge_lora: bool = False
    suppress_ids: tuple[int, ...] | None = None   # never sampled; None: the generation config's suppress_tokens

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature <= 0


@dataclasses.dataclass
class Completion:
    ids: list[int]
    text: str
    finish_reason: str                # "eos", "stop" or "length"
    logprobs: list[float] | None = None


@dataclasses.dataclass
class RolloutResult:
    completions: list[Completion]
    tokens: int                       # tokens generated (every completion's ids)
    seconds: float
    batches: int
    forwards: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]

    def padded(self, pad_id: int, device: Any = None):
        """The completions as one right-padded id tensor (N, T), ``pad_id`` after each one's end,
        and its mask (1 on every generated token, the EOS or stop token included): what a trainer's
        log-prob pass over prompt + completion takes. T is the longest completion (0 if none)."""
        import torch

        width = max((len(c.ids) for c in self.completions), default=0)
        ids = torch.full((len(self.completions), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(self.completions), width), dtype=torch.long)
        for r, c in enumerate(self.completions):
            ids[r, :len(c.ids)] = torch.tensor(c.ids, dtype=torch.long)
            mask[r, :len(c.ids)] = 1
        return ids.to(device), mask.to(device)

    def stats(self) -> dict:
        return {"rollout_tokens": self.tokens, "rollout_seconds": self.seconds,
                "rollout_tokens_per_s": self.tokens_per_s, "rollout_batches": self.batches,
                "rollout_forwards": self.forwards}


def buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of the prompts grouped into batches of at most ``batch_size`` similar lengths
    (sorted by length, longest first; ties keep the input order)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), max(1, batch_size))]


def resolve_eos(model, tokenizer, eos_ids: Sequence[int] | None) -> tuple[int, ...]:
    if eos_ids is not None:
        return tuple(eos_ids)
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen is None:
        gen = getattr(tokenizer, "eos_token_id", None)
    if gen is None:
        return ()
    return tuple(gen) if isinstance(gen, (list, tuple)) else (int(gen),)


def _pad_id(model, tokenizer) -> int:
    for v in (getattr(tokenizer, "pad_token_id", None),
              getattr(getattr(model, "generation_config", None), "pad_token_id", None),
              getattr(tokenizer, "eos_token_id", None)):
        if isinstance(v, int):
            return v
    return 0


@contextlib.contextmanager
def merged_lora(model, enabled: bool) -> Iterator[None]:
    """A PEFT LoRA model merged into its base weights for the block, unmerged after."""
    if not enabled or not hasattr(model, "merge_adapter") or not getattr(model, "peft_config", None):
        yield
        return
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()


def resolve_suppressed(model, suppress_ids: Sequence[int] | None) -> tuple[int, ...]:
    """Token ids never sampled: ``suppress_ids``, else the model's generation config's
    ``suppress_tokens`` (the one logits processor of a generation config the engine applies, as
    ``generate`` would; refinery's own models set none)."""
    if suppress_ids is not None:
        return tuple(suppress_ids)
    return tuple(getattr(getattr(model, "generation_config", None), "suppress_tokens", None) or ())


def _pick(logits, params: SamplingParams, generator, suppress=None):
    """Next tokens [B] and their log-probabilities [B] (or None) from last-position ``logits`` [B, V]
    (``suppress``: a tensor of token ids set to -inf first)."""
    import torch

    logits = logits.float()
    if suppress is not None:
        logits = logits.index_fill(1, suppress, float("-inf"))
    if params.is_greedy:
        nxt = logits.argmax(-1)
        lp = torch.log_softmax(logits, -1).gather(1, nxt[:, None])[:, 0] if params.logprobs else None
        return nxt, lp
    logits = logits / params.temperature
    full = logits
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        srt, idx = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(srt, -1)
        before = probs.cumsum(-1) - probs            # mass of the tokens ranked above each one
        srt = srt.masked_fill(before > params.top_p, float("-inf"))   # the first token always stays
        logits = torch.full_like(logits, float("-inf")).scatter(1, idx, srt)
    probs = torch.softmax(logits, -1)
    nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
    lp = torch.log_softmax(full, -1).gather(1, nxt[:, None])[:, 0] if params.logprobs else None
    return nxt, lp


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


def _left_pad(prompts: list[list[int]], pad_id: int, device):
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _chunks(lengths: Sequence[int], slack: float) -> list[list[int]]:
    """Rows (sorted longest first) cut where padding a row to its chunk's longest would waste more
    than ``slack`` of that length."""
    out: list[list[int]] = []
    for r, n in enumerate(lengths):
        if out and n >= (1 - slack) * lengths[out[-1][0]]:
            out[-1].append(r)
        else:
            out.append([r])
    return out


def _prefill(model, prompts, ids, mask, pad_id, device, kv: str, keep_last: bool, slack: float):
    """The last position's logits [B, V] and the KV cache of the left-padded batch ``ids``. Prompts of
    very different lengths are prefilled in chunks of similar lengths (little padding computed) whose
    caches are then left-padded to the batch's width and stacked: the padded positions are masked, so
    decoding sees the cache one prefill of the whole batch would have made."""
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    def run(c_ids, c_mask):
        cache = DynamicCache()
        pos = (c_mask.cumsum(-1) - 1).clamp_(min=0)
        extra = {"logits_to_keep": 1} if keep_last else {}
        out = model(input_ids=c_ids, attention_mask=c_mask, position_ids=pos, use_cache=True, **{kv: cache}, **extra)
        return out.logits[:, -1], cache

    lengths = [len(p) for p in prompts]
    chunks = _chunks(lengths, slack) if lengths == sorted(lengths, reverse=True) else [list(range(len(prompts)))]
    if len(chunks) == 1:
        logits, cache = run(ids, mask)
        return logits, cache, 1
    parts = [run(*_left_pad([prompts[r] for r in rows], pad_id, device)) for rows in chunks]
    if not all(type(layer) is DynamicLayer for _, c in parts for layer in c.layers):
        logits, cache = run(ids, mask)   # sliding-window or other layers: one prefill of the whole batch
        return logits, cache, 1 + len(parts)
    width = ids.shape[1]
    merged = DynamicCache()
    for i in range(len(parts[0][1].layers)):
        ks, vs = [], []
        for _, c in parts:
            k, v = c.layers[i].keys, c.layers[i].values
            padk = width - k.shape[-2]
            ks.append(torch.nn.functional.pad(k, (0, 0, padk, 0)))
            vs.append(torch.nn.functional.pad(v, (0, 0, padk, 0)))
        merged.update(torch.cat(ks), torch.cat(vs), i)
    return torch.cat([lg for lg, _ in parts]), merged, len(parts)


def _run_batch(model, tokenizer, prompts: list[list[int]], params: SamplingParams, eos: tuple[int, ...],
               pad_id: int, generator, device, streamer,
               stop_when=None) -> tuple[list[tuple[list[int], list[float], str]], int]:
    """Completions of one batch (ids, logprobs, finish reason) and the forwards it took;
    ``stop_when()`` true ends every live sequence after the current token (reason ``stop``)."""
    import torch

    B = len(prompts)
    ids, mask = _left_pad(prompts, pad_id, device)
    kv, keep_last = _forward_kwargs(model)
    if streamer is not None:
        streamer.put(ids.cpu())
    logits, cache, forwards = _prefill(model, prompts, ids, mask, pad_id, device, kv, keep_last,
                                       params.prefill_slack)
    next_pos = mask.sum(-1, keepdim=True)      # position ids count real tokens only (as generate's do)
    out_ids: list[list[int]] = [[] for _ in range(B)]
    out_lp: list[list[float]] = [[] for _ in range(B)]
    reason = ["length"] * B
    live = list(range(B))                      # batch row -> sequence
    done = [False] * B
    eos_t = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
    banned = resolve_suppressed(model, params.suppress_ids)
    suppress = torch.tensor(banned, dtype=torch.long, device=device) if banned else None
    stop = tuple(s for s in params.stop if s)
    tail = max((len(s) for s in stop), default=0) + 4   # tokens of the tail decoded per check (>= 1 char each)
    for step in range(params.max_new_tokens):
        nxt, lp = _pick(logits, params, generator, suppress)
        if streamer is not None:
            streamer.put(nxt.cpu())
        hit_eos = torch.isin(nxt, eos_t).tolist() if eos_t is not None else [False] * len(live)
        toks = nxt.tolist()
        lps = lp.tolist() if lp is not None else None
        for r, s in enumerate(live):
            if done[s]:          # finished earlier, not dropped yet: its further tokens are ignored
                continue
            out_ids[s].append(toks[r])
            if lps is not None:
                out_lp[s].append(lps[r])
            if hit_eos[r]:
                reason[s], done[s] = "eos", True
            elif stop and any(x in tokenizer.decode(out_ids[s][-tail:], skip_special_tokens=True) for x in stop):
                reason[s], done[s] = "stop", True
        if stop_when is not None and stop_when():   # the caller's own end (a server's cancel, its stop string)
            for s in live:
                if not done[s]:
                    reason[s], done[s] = "stop", True
        finished = sum(done[s] for s in live)
        if finished == len(live) or step == params.max_new_tokens - 1:
            break
        if finished and finished >= params.drop_fraction * len(live):
            keep = [r for r in range(len(live)) if not done[live[r]]]
            keep_t = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(keep_t)
            mask, next_pos, nxt = mask[keep_t], next_pos[keep_t], nxt[keep_t]
            live = [live[r] for r in keep]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], 1)
        logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                       **{kv: cache}).logits[:, -1]
        forwards += 1
        next_pos = next_pos + 1
    if streamer is not None:
        streamer.end()
    return [(out_ids[s], out_lp[s], reason[s]) for s in range(B)], forwards


def sample(model, tokenizer, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None, *,
           generator: Any = None, streamer: Any = None, stop_when: Any = None) -> RolloutResult:
    """Completions of ``prompts`` (token ids, in order); see the module docstring.
    ``streamer`` (one prompt only): a Hugging Face streamer fed the prompt, then each new token.
    ``stop_when``: a callable asked after every token; true ends the live sequences there (finish
    reason ``stop``): a server's cancelled request, or a stop rule the caller applies itself."""
    import torch

    params = params or SamplingParams()
    if streamer is not None and len(prompts) != 1:
        raise ValueError("a streamer takes exactly one prompt")
    if not params.is_greedy and generator is None and params.seed is not None:
        generator = torch.Generator(device=_device(model)).manual_seed(params.seed)
    eos = resolve_eos(model, tokenizer, params.eos_ids)
    pad_id = _pad_id(model, tokenizer)
    device = _device(model)
    lists = [list(map(int, p)) for p in prompts]
    if any(not p for p in lists):
        raise ValueError("an empty prompt: give at least one token (e.g. BOS)")
    results: list[Completion | None] = [None] * len(lists)
    tokens = forwards = 0
    groups = buckets([len(p) for p in lists], params.batch_size) if params.max_new_tokens > 0 else []
    t0 = time.perf_counter()
    with torch.inference_mode(), merged_lora(model, params.merge_lora):
        for group in groups:
            outs, n = _run_batch(model, tokenizer, [lists[i] for i in group], params, eos, pad_id, generator,
                                 device, streamer, stop_when)
            forwards += n
            for i, (ids, lps, reason) in zip(group, outs):
                text, cut = _cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), params.stop)
                if cut and reason == "length":
                    reason = "stop"
                results[i] = Completion(ids, text, reason, lps if params.logprobs else None)
                tokens += len(ids)
    seconds = time.perf_counter() - t0
    done = [r if r is not None else Completion([], "", "length", [] if params.logprobs else None) for r in results]
    return RolloutResult(done, tokens, seconds, len(groups), forwards)


def _forward_kwargs(model) -> tuple[str, bool]:
    """What the model's forward calls the KV cache (``cache`` in recent transformers, else
    ``past_key_values``) and whether it takes ``logits_to_keep`` (a PEFT wrapper passes keywords
    through to its base model)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values", False
    kv = "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"
    return kv, "logits_to_keep" in params


def _device(model):
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        import torch

        return torch.device("cpu")


__all__ = ["SamplingParams", "Completion", "RolloutResult", "sample", "buckets", "merged_lora", "resolve_eos"]
