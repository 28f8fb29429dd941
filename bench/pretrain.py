"""Benchmark: training tokens/sec of our loop vs Hugging Face ``Trainer``, same model, data, batch, seq length.

    .venv/bin/python bench/pretrain.py                                  # CPU, tiny preset
    .venv/bin/python bench/pretrain.py --device cuda --preset 124M --seq-len 1024 --batch-size 16

Both trainers get a model built by ``refinery.tasks.train.models.build_model`` from the same seed, the same
sequence of windows (two readers with one seed), AdamW with the same hyper-parameters, warmup +
cosine, gradient clipping 1.0, and bf16 autocast on GPU. Each trainer's clock is read at the end of
every step (everything the loop does counts); throughput is given two ways: over the whole span from
the end of step ``--warmup`` to the last step, and from the median step (robust to bursts of other
load on a shared machine). Runs alternate ours/HF ``--repeats`` times; best runs, median runs and
the per-pair ratios are printed. On GPU our loop's MFU (from the peak-FLOPs table) is printed too.
The corpus is real text: ``../shared/data/quality/c4-demo.jsonl``
when present, else Python's standard-library docstrings; a byte-level BPE tokenizer is trained on it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/ holds scripts named like stdlib modules (tokenize.py): never import from it, import from the root
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))


def corpus() -> tuple[list[str], str]:
    path = ROOT / ".." / "shared" / "data" / "quality" / "c4-demo.jsonl"
    if path.exists():
        return [json.loads(x)["text"] for x in path.read_text().splitlines() if x.strip()], "c4-demo.jsonl"
    import argparse as a, collections, email, inspect, json as j, textwrap  # noqa: E401

    texts = []
    for mod in (j, collections, email, a, textwrap, inspect):
        for name in sorted(dir(mod)):
            doc = getattr(getattr(mod, name, None), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 80:
                texts.append(" ".join(doc.split()))
    return texts * 20, "stdlib docstrings"


def train_tokenizer(texts: list[str], vocab: int, out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>").save_pretrained(out)
    return out


def make_readers(args, tok_dir: Path):
    from transformers import AutoTokenizer

    from refinery.tasks.train.data import ArrayTokenReader, open_reader, tokenize_texts

    if args.tokens:
        spec = {"kind": "tokens", "datasets": args.tokens.split(",")}
        return lambda split: open_reader(spec, args.seq_len, split=split, seed=args.seed)
    texts, _ = corpus()
    ids = tokenize_texts(texts, tok_dir)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    return lambda split: ArrayTokenReader(ids, args.seq_len, tokenizer_path=str(tok_dir), vocab_size=len(tok),
                                          eos_id=tok.eos_token_id, split=split, seed=args.seed)


def run_ours(args, make_reader, work: Path) -> dict:
    from refinery.tasks.train.config import TrainConfig
    from refinery.tasks.train.loop import train

    cfg = TrainConfig(objective="clm", preset=args.preset, model=json.loads(args.model), seq_len=args.seq_len,
                      batch_size=args.batch_size, max_steps=args.steps, lr=args.lr, warmup_steps=args.warmup_lr,
                      eval_every=10 ** 9, eval_batches=1, checkpoint_every=10 ** 9, log_every=10 ** 9, seed=args.seed,
                      device=args.device, compile=args.compile, unigram_max_tokens=1000, strategy=args.strategy,
                      grad_checkpointing=args.grad_checkpointing or None, loss_chunk_tokens=args.loss_chunk_tokens)
    if args.strategy == "fsdp":   # FSDP on this one device: a process group of one (as torchrun would make)
        import os
        import socket

        from refinery.tasks.train import distributed as dist

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init(force=True)
    ck = work / "ours"
    shutil.rmtree(ck, ignore_errors=True)
    with profiled(args):
        res = train(cfg, make_reader("train"), make_reader("val"), ck, progress=False, log=lambda m: None)
    rows = [r for r in res["history"] if r.get("loss") is not None]
    mfus = [r["mfu"] for r in rows[args.warmup:] if r.get("mfu") is not None]
    step_tokens = rows[-1]["tokens"] - rows[-2]["tokens"]
    return {**rates([r["seconds"] for r in rows[args.warmup - 1:]], step_tokens),
            "loss_end": rows[-1]["loss"], "params": res["params"], "mfu": statistics.median(mfus) if mfus else None,
            "peak_memory_mb": res.get("peak_memory_mb"), "strategy": res.get("strategy")}


@contextlib.contextmanager
def profiled(args):
    """With ``--profile FILE``: torch.profiler over 5 training steps of our loop after ``--warmup``
    (the engine's own steps: every step of ``tasks.engine.trainer.Engine._train_step`` advances the
    profiler's schedule), and the top kernels by self device time (CPU: self CPU time) written to FILE."""
    if not args.profile:
        yield
        return
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from refinery.tasks.engine.trainer import Engine

    cuda = args.device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    step = Engine._train_step
    with profile(activities=acts, schedule=schedule(wait=max(args.warmup - 2, 0), warmup=2, active=5, repeat=1)) as prof:
        def stepped(engine, st):
            out = step(engine, st)
            if cuda:
                torch.cuda.synchronize()
            prof.step()
            return out

        Engine._train_step = stepped  # type: ignore[method-assign]
        try:
            yield
        finally:
            Engine._train_step = step  # type: ignore[method-assign]
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=70)
    Path(args.profile).write_text(table)
    print(table, file=sys.stderr)


def rates(times: list[float], step_tokens: int) -> dict:
    """Tokens/s from the end-of-step clock readings: over the whole timed span (``tokens_per_sec``)
    and from the median step (``median_step``: what a step costs when nothing else on the machine
    interferes; timeit's reasoning, robust to a shared box's bursts)."""
    steps = [b - a for a, b in zip(times, times[1:])]
    return {"tokens_per_sec": len(steps) * step_tokens / (times[-1] - times[0]),
            "median_step": step_tokens / statistics.median(steps)}


def run_hf(args, make_reader, work: Path) -> dict:
    import numpy as np
    import torch
    from transformers import AutoTokenizer, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from refinery.tasks.train.models import build_model, padded_vocab
    from refinery.tasks.train.objectives import special_ids

    reader = make_reader("train")
    tok = AutoTokenizer.from_pretrained(str(reader.tokenizer_path))
    windows = np.concatenate([reader.next_batch(args.batch_size) for _ in range(args.steps)])

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return len(windows)

        def __getitem__(self, i):
            x = torch.from_numpy(windows[i, :-1])
            return {"input_ids": x, "labels": x}   # the model shifts labels: the same L-token forward as ours

    torch.manual_seed(args.seed)
    model = build_model("clm", args.preset, padded_vocab(max(reader.vocab_size, len(tok))), args.seq_len,
                        special_ids(tok), json.loads(args.model))
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    targs = TrainingArguments(
        output_dir=str(work / "hf"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, warmup_steps=args.warmup_lr, lr_scheduler_type="cosine", weight_decay=0.1,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, logging_steps=10 ** 6, save_strategy="no",
        report_to=[], dataloader_num_workers=0, seed=args.seed, disable_tqdm=True,
        bf16=args.device.startswith("cuda"), use_cpu=args.device == "cpu", torch_compile=args.compile)
    trainer = Trainer(model=model, args=targs, train_dataset=Windows(), callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)   # its end-of-training print is not part of the measurement
    # Trainer shuffles with its sampler; keep the window order of our loop (same data, same order)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(range(len(windows)))
    trainer.train()
    return rates(times[args.warmup - 1:], args.batch_size * args.seq_len)


def child_run(who: str, work: Path) -> dict:
    import subprocess

    out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", who, "--work", str(work)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    ap.add_argument("--preset", default="tiny", help="tiny, 25M, 124M, 350M, 1B")
    ap.add_argument("--model", default="{}", help="JSON overrides of the preset's HF config")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="steps excluded from the timing")
    ap.add_argument("--warmup-lr", type=int, default=5, help="LR warmup steps (both trainers)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary trained on the corpus")
    ap.add_argument("--tokens", default=None, help="token dataset path(s) instead of the built-in corpus")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-hf", action="store_true", help="only our loop (e.g. a GPU MFU measurement)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default; 1 is steadiest on a shared box)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategy", choices=["auto", "ddp", "fsdp"], default="auto",
                    help="fsdp: our loop under FSDP2 fully_shard in a process group of one (peak memory vs ddp/auto)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing in our loop")
    ap.add_argument("--loss-chunk-tokens", type=int, default=0, help="our loop's chunked linear + cross-entropy (0: off)")
    ap.add_argument("--profile", help="write the top kernels of 5 profiled steps of our loop to this file")
    ap.add_argument("--one", choices=["ours", "hf"], help=argparse.SUPPRESS)   # child: one run, JSON out
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:   # a child process: one run of one trainer, its numbers as JSON on the last line
        work = Path(args.work)
        make_reader = make_readers(args, None if args.tokens else work / "tok")
        print(json.dumps((run_ours if args.one == "ours" else run_hf)(args, make_reader, work)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    try:
        texts, source = corpus()
        if not args.tokens:   # the child runs read it from work/tok
            train_tokenizer(texts, args.vocab, work / "tok")
        dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
        print(f"bench/pretrain: preset {args.preset}, seq_len {args.seq_len}, batch {args.batch_size}, "
              f"{args.steps} steps (timed after {args.warmup}), device {dev}, corpus {args.tokens or source}")
        ours, hf = [], []
        for r in range(args.repeats):
            # Each run in a fresh process, the order alternating pair by pair: neither trainer
            # inherits the other's allocator state or always runs first.
            order = ["ours"] + ([] if args.no_hf else ["hf"])
            for who in (order if r % 2 == 0 else order[::-1]):
                res = child_run(who, work)
                (ours if who == "ours" else hf).append(res)
                print(f"  run {r}: {'ours' if who == 'ours' else 'HF Trainer'} {res['tokens_per_sec']:,.0f} tok/s "
                      f"(median step {res['median_step']:,.0f})"
                      + (f", MFU {res['mfu'] * 100:.1f}%" if res.get("mfu") is not None else "")
                      + (f", peak {res['peak_memory_mb']:,.0f} MiB ({res.get('strategy')})"
                         if who == "ours" and res.get("peak_memory_mb") else ""), flush=True)
        print(f"params: {ours[0]['params'] / 1e6:.2f}M")
        mfus = [x["mfu"] for x in ours if x["mfu"] is not None]
        if mfus:
            print(f"ours MFU:   {max(mfus) * 100:.1f}% best (median {statistics.median(mfus) * 100:.1f}%)")
        # Runs alternate ours/HF; for each measure: the best run of each (other load only ever slows
        # a run down), the median run of each, and the median of the per-pair ratios.
        for key, what in (("median_step", "median step"), ("tokens_per_sec", "whole timed span")):
            o = [x[key] for x in ours]
            print(f"ours ({what}):       {max(o):,.0f} tokens/sec best of {len(o)} (median {statistics.median(o):,.0f})")
            if hf:
                h = [x[key] for x in hf]
                pairs = sorted(a / b for a, b in zip(o, h))
                print(f"HF Trainer ({what}): {max(h):,.0f} tokens/sec best of {len(h)} (median {statistics.median(h):,.0f})")
                print(f"ratio ours/HF ({what}): {max(o) / max(h):.2f}x best of {len(o)}; medians "
                      f"{statistics.median(o) / statistics.median(h):.2f}x; per-pair ratios "
                      f"{', '.join(f'{x:.2f}' for x in pairs)} (median {statistics.median(pairs):.2f}x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
