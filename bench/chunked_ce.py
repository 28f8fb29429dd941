"""Benchmark: peak memory and time of the chunked linear + cross-entropy (``loss_chunk_tokens``)
against the plain loss (baseline: ``F.cross_entropy`` on the full float32 logits of ``F.linear``).

    .venv/bin/python bench/chunked_ce.py                                   # CPU: 4096 tokens x 32k vocab x 768
    .venv/bin/python bench/chunked_ce.py --device cuda --tokens 16384 --vocab 128256 --hidden 2048 --dtype bfloat16

One measurement is one forward + backward of the loss alone (hidden states and the head's weight
are leaf tensors that require grad, as in training), after an untimed warm-up pass on a small
shape (kernels' code, thread pools; small so that the measured pass sets the process's peak). Every measurement runs in a fresh process, plain and chunked alternating pair by pair (the
order flips every repeat), so neither inherits the other's allocator state or always goes first.
Peak memory: CPU, the process's peak RSS (``ru_maxrss``) after the pass minus its RSS before, with
glibc serving blocks >= 1 MiB from mmap (a freed block leaves RSS; else the dynamic threshold
moves them into the heap); CUDA, ``torch.cuda.max_memory_allocated`` above the inputs. Both
variants' losses are printed (they must agree). Ratios: best times and per-pair medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/ holds scripts named like stdlib modules (tokenize.py): never import from it, import from the root
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))


def one(args) -> dict:
    """A child process: warm-up then one measured forward + backward of one variant."""
    import resource

    import torch
    import torch.nn.functional as F

    from refinery.tasks.train.chunked_ce import linear_cross_entropy

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    def inputs(tokens: int, vocab: int):
        g = torch.Generator().manual_seed(args.seed)
        hidden = torch.randn(tokens, args.hidden, generator=g).to(device, dtype).requires_grad_()
        weight = torch.randn(vocab, args.hidden, generator=g).mul_(args.hidden ** -0.5).to(device, dtype)
        return hidden, weight.requires_grad_(), torch.randint(0, vocab, (tokens,), generator=g).to(device)

    def step(hidden, weight, labels) -> float:
        if args.one == "plain":
            loss = F.cross_entropy(F.linear(hidden, weight).float(), labels)
        else:
            loss = linear_cross_entropy(hidden, weight, labels, args.chunk)
        loss.backward()
        return float(loss.detach())

    # warm-up on a small shape (the same kernels' code, thread pools, CUDA context), so that the
    # measured pass, not the warm-up, sets the process's peak
    step(*inputs(64, 512))
    hidden, weight, labels = inputs(args.tokens, args.vocab)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    rss_before, max_before = _rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    loss = step(hidden, weight, labels)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base
    else:   # the pass's own peak is visible only when it set a new process maximum
        peak = max_after - rss_before if max_after > max_before else -1
    return {"variant": args.one, "seconds": seconds, "peak_bytes": peak, "loss": loss}


def _rss() -> int:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def child(args, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--one", variant] + [f"--{k.replace('_', '-')}={v}" for k, v in (
        ("device", args.device), ("dtype", args.dtype), ("tokens", args.tokens), ("vocab", args.vocab),
        ("hidden", args.hidden), ("chunk", args.chunk), ("threads", args.threads), ("seed", args.seed))]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2 ** 20)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"{variant} run failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="hidden states and weight")
    ap.add_argument("--tokens", type=int, default=4096, help="rows of hidden states (micro-batch x seq_len)")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--chunk", type=int, default=1024, help="loss_chunk_tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--one", choices=["plain", "chunked"], help=argparse.SUPPRESS)   # child: one run, JSON out
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return 0

    print(f"bench/chunked_ce: {args.tokens} tokens x {args.vocab} vocab x {args.hidden} hidden, {args.dtype}, "
          f"chunk {args.chunk}, device {args.device}; one forward + backward per fresh process")
    runs: dict[str, list[dict]] = {"plain": [], "chunked": []}
    for r in range(args.repeats):
        order = ["plain", "chunked"] if r % 2 == 0 else ["chunked", "plain"]
        for variant in order:
            res = child(args, variant)
            runs[variant].append(res)
            print(f"  run {r}: {variant:8s} {res['seconds']:.3f} s, peak {res['peak_bytes'] / 2 ** 20:,.0f} MiB, "
                  f"loss {res['loss']:.6f}", flush=True)
    p, c = runs["plain"], runs["chunked"]
    mib = 2 ** 20
    logits = args.tokens * args.vocab * 4 / mib
    print(f"one float32 logits tensor: {logits:,.0f} MiB")
    for name, rs in runs.items():
        print(f"{name:8s} best {min(x['seconds'] for x in rs):.3f} s (median {statistics.median(x['seconds'] for x in rs):.3f} s), "
              f"peak {statistics.median(x['peak_bytes'] for x in rs) / mib:,.0f} MiB (median)")
    time_pairs = sorted(b["seconds"] / a["seconds"] for a, b in zip(p, c))
    mem_pairs = sorted(b["peak_bytes"] / a["peak_bytes"] for a, b in zip(p, c)
                       if a["peak_bytes"] > 0 and b["peak_bytes"] > 0)   # -1: the pass set no new peak
    print(f"ratio chunked/plain time: {min(x['seconds'] for x in c) / min(x['seconds'] for x in p):.2f}x best; "
          f"per-pair {', '.join(f'{x:.2f}' for x in time_pairs)} (median {statistics.median(time_pairs):.2f}x)")
    if mem_pairs:
        print(f"ratio chunked/plain peak memory: per-pair {', '.join(f'{x:.3f}' for x in mem_pairs)} "
              f"(median {statistics.median(mem_pairs):.3f}x)")
    print(f"largest loss difference: {max(abs(a['loss'] - b['loss']) for a, b in zip(p, c)):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
