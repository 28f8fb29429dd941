"""Rollout throughput: the rollout engine (``refinery.tasks.rollout.sample``) against Hugging Face
``model.generate`` one prompt at a time and against one batched (left-padded) ``generate`` call.

Same model, same prompts (seeded random token ids of mixed lengths), same number of new tokens for
every sequence (EOS is switched off in all three so none stops early), greedy unless
``--temperature`` is given; the three run in alternating order over ``--repeats`` rounds after one
warm-up round. Prints each run's tokens/s, the medians and the ratios (median of the per-round
ratios). Greedy: also checks that the engine's completions equal the batched ``generate``'s.

    .venv/bin/python bench/rollout.py                       # a small Llama from config, random weights
    .venv/bin/python bench/rollout.py --model W/pretrain/<fp> # a model the flows wrote (e.g. the demo's)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/tokenize.py would shadow the standard library's tokenize: drop this folder from the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))


class _IdsTokenizer:
    """Enough of a tokenizer for the engine on a random model: ids decode to numbers."""
    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _model(args):
    import torch

    if args.model:
        from refinery.tasks.eval.generate import load_model

        lm = load_model(args.model, "cpu")
        return lm.model, lm.tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 4,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64 or 1,
                      num_key_value_heads=args.hidden // 64 or 1, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).eval(), _IdsTokenizer()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a refinery dataset or HF folder (default: a random Llama from config)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=96)
    ap.add_argument("--new", type=int, default=32, help="new tokens per sequence")
    ap.add_argument("--batch-size", type=int, default=32, help="the engine's batch (bucket) size")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: one core, less noise)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args(argv)

    import torch

    from refinery.tasks.rollout import SamplingParams, sample

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    model, tok = _model(args)
    model.generation_config.eos_token_id = None       # every sequence runs --new tokens in all three
    pad = 0 if getattr(tok, "pad_token_id", None) is None else tok.pad_token_id
    model.generation_config.pad_token_id = pad
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(args.min_len, args.max_len + 1, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]
    sampling = args.temperature > 0
    gen_kw: dict = dict(max_new_tokens=args.new, do_sample=sampling, pad_token_id=pad)   # EOS off: fixed lengths
    if sampling:
        gen_kw.update(temperature=args.temperature, top_p=1.0, top_k=0)
    else:
        gen_kw.update(temperature=None, top_p=None, top_k=None)
    params = SamplingParams(max_new_tokens=args.new, temperature=args.temperature, seed=0, eos_ids=(),
                            batch_size=args.batch_size)

    def one_at_a_time():
        n = 0
        with torch.inference_mode():
            for p in prompts:
                ids = torch.tensor([p])
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen_kw)
                n += out.shape[1] - ids.shape[1]
        return n, None

    def batched():
        W = max(lens)
        ids = torch.full((len(prompts), W), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, W - len(p):] = torch.tensor(p)
            mask[r, W - len(p):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, **gen_kw)
        return (out.shape[1] - W) * len(prompts), out[:, W:].tolist()

    def engine():
        res = sample(model, tok, prompts, params)
        return res.tokens, [c.ids for c in res.completions]

    runs = {"generate, one prompt at a time": one_at_a_time, "generate, one batched call": batched,
            "rollout engine": engine}
    names = list(runs)
    print(f"model: {args.model or f'random Llama {args.layers}x{args.hidden}, vocab {vocab}'}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; {args.prompts} prompts of "
          f"{min(lens)}-{max(lens)} tokens, {args.new} new tokens each, engine batch {args.batch_size}, "
          f"{'temperature ' + str(args.temperature) if sampling else 'greedy'}, {args.threads} thread(s)")
    rates: dict[str, list[float]] = {n: [] for n in names}
    outs: dict[str, object] = {}
    for rnd in range(args.repeats + 1):             # round 0: warm-up, not counted
        order = names if rnd % 2 == 0 else names[::-1]
        for n in order:
            t0 = time.perf_counter()
            tokens, comp = runs[n]()
            dt = time.perf_counter() - t0
            outs[n] = comp
            if rnd:
                rates[n].append(tokens / dt)
                print(f"  round {rnd}: {n:32s} {tokens:6d} tokens {dt:7.2f} s {tokens / dt:9.1f} tok/s", flush=True)
    if not sampling:
        same = outs["rollout engine"] == outs["generate, one batched call"]
        print(f"greedy completions equal to the batched generate's: {same}")
    print("\n| | tokens/s (median) |\n|---|---|")
    for n in names:
        print(f"| {n} | {statistics.median(rates[n]):,.1f} |")
    eng = rates["rollout engine"]
    for n in names[:2]:
        ratios = [a / b for a, b in zip(eng, rates[n])]
        print(f"engine / {n}: {statistics.median(ratios):.2f}x median of rounds "
              f"({min(ratios):.2f}-{max(ratios):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
