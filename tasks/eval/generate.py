"""Loading a model the flows accept and generating text with it (the ``evaluate`` stage's samples
and ``refinery generate``), through the rollout engine (``refinery.tasks.rollout``).

Greedy decoding at temperature 0 (deterministic); sampling with ``temperature`` > 0 and ``top_p``,
seeded. With ``chat`` the prompt is one user turn through the tokenizer's chat template (an error
when the tokenizer has none), so chat-tuned models see the format they were trained on.
"""
from __future__ import annotations

import dataclasses
from typing import Any


def pick_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass
class LoadedModel:
    path: str            # the HF folder (or hub id) actually loaded
    model: Any
    tokenizer: Any
    device: str


def load_model(ref: str, device: str = "auto") -> LoadedModel:
    """A causal LM and its tokenizer from a refinery dataset, an HF folder or a hub id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refinery.tasks.modelref import resolve_model

    path = resolve_model(ref)
    device = pick_device(device)
    dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(device)  # type: ignore[arg-type]  # transformers types .to through a wrapper mypy misreads
    model.eval()
    return LoadedModel(path, model, tokenizer, device)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        if not has_chat_template(tokenizer):
            raise ValueError("--chat: this model's tokenizer has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return ([start] if start is not None else []) + list(ids)


def generate(lm: LoadedModel, prompt: str, *, chat: bool = False, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, streamer: Any = None) -> str:
    """The completion of ``prompt`` (without the prompt); ``streamer`` receives tokens as they come.
    Sampled by the rollout engine (``refinery.tasks.rollout``): greedy at temperature 0, equal to
    ``model.generate``'s greedy output; otherwise from a generator seeded with ``seed``."""
    return generate_many(lm, [prompt], chat=chat, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_p=top_p, seed=seed, streamer=streamer)[0]


def generate_many(lm: LoadedModel, prompts: list[str], *, chat: bool = False, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stop: tuple[str, ...] = (),
                  batch_size: int = 32, streamer: Any = None) -> list[str]:
    """The completions of ``prompts``, in order: one batched rollout (prompts bucketed by length, left
    padded, KV cache, each stopping on EOS or a ``stop`` string)."""
    from refinery.tasks.rollout import SamplingParams, sample

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            stop=tuple(stop), batch_size=batch_size)
    ids = [prompt_ids(lm.tokenizer, p, chat) for p in prompts]
    return sample(lm.model, lm.tokenizer, ids, params, streamer=streamer).texts


def stream_completion(model: str, prompt: str, *, chat: bool = False, max_new_tokens: int = 128,
                      temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, device: str = "auto",
                      out=None) -> str:
    """``refinery generate``: print the completion of ``prompt`` to ``out`` as it is generated."""
    import sys

    from transformers import TextStreamer

    out = out or sys.stdout
    lm = load_model(model, device)

    class _To(TextStreamer):   # TextStreamer prints to stdout; ``out`` may be another stream
        def on_finalized_text(self, text: str, stream_end: bool = False):
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    streamer = _To(lm.tokenizer, skip_prompt=True, skip_special_tokens=True)
    return generate(lm, prompt, chat=chat, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    seed=seed, streamer=streamer)


__all__ = ["LoadedModel", "load_model", "generate", "generate_many", "stream_completion", "prompt_ids", "has_chat_template",
           "pick_device"]
