"""Benchmark: training tokens/sec of our loop vs Hugging Face ``Trainer``, same model, data, batch, seq length.

    .venv/bin/python bench/pretrain.py                                  # CPU, tiny preset
    .venv/bin/python bench/pretrain.py --device cuda --preset 124M --seq-len 1024 --batch-size 16

Both trainers get a model built by ``tasks.train.models.build_model`` from the same seed, the same
sequence of windows (two readers with one seed), AdamW with the same hyper-parameters, warmup +
cosine, gradient clipping 1.0, and bf16 autocast on GPU. Throughput is measured between the end of
step ``--warmup`` and the end of the last step (wall clock, everything the loop does in between),
runs alternate ours/HF ``--repeats`` times and the best runs are compared (medians printed too). On GPU our loop's MFU (from
the peak-FLOPs table) is printed too. The corpus is real text: ``../shared/data/quality/c4-demo.jsonl``
when present, else Python's standard-library docstrings; a byte-level BPE tokenizer is trained on it.
"""
from __future__ import annotations

import argparse
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

    from tasks.train.data import ArrayTokenReader, open_reader, tokenize_texts

    if args.tokens:
        spec = {"kind": "tokens", "datasets": args.tokens.split(",")}
        return lambda split: open_reader(spec, args.seq_len, split=split, seed=args.seed)
    texts, _ = corpus()
    ids = tokenize_texts(texts, tok_dir)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    return lambda split: ArrayTokenReader(ids, args.seq_len, tokenizer_path=str(tok_dir), vocab_size=len(tok),
                                          eos_id=tok.eos_token_id, split=split, seed=args.seed)


def run_ours(args, make_reader, work: Path) -> dict:
    from tasks.train.config import TrainConfig
    from tasks.train.loop import train

    cfg = TrainConfig(objective="clm", preset=args.preset, model=json.loads(args.model), seq_len=args.seq_len,
                      batch_size=args.batch_size, max_steps=args.steps, lr=args.lr, warmup_steps=args.warmup_lr,
                      eval_every=10 ** 9, eval_batches=1, save_every=10 ** 9, log_every=10 ** 9, seed=args.seed,
                      device=args.device, compile=args.compile, unigram_max_tokens=1000)
    ck = work / "ours"
    shutil.rmtree(ck, ignore_errors=True)
    res = train(cfg, make_reader("train"), make_reader("val"), ck, progress=False, log=lambda m: None)
    rows = [r for r in res["history"] if r.get("loss") is not None]
    t0, t1 = rows[args.warmup - 1]["time"], rows[-1]["time"]
    tokens = (rows[-1]["tokens"] - rows[args.warmup - 1]["tokens"])
    mfus = [r["mfu"] for r in rows[args.warmup:] if r.get("mfu") is not None]
    return {"tokens_per_sec": tokens / (t1 - t0), "loss_end": rows[-1]["loss"], "params": res["params"],
            "mfu": statistics.median(mfus) if mfus else None}


def run_hf(args, make_reader, work: Path) -> dict:
    import numpy as np
    import torch
    from transformers import AutoTokenizer, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from tasks.train.models import build_model, padded_vocab
    from tasks.train.objectives import special_ids

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
    dt = times[-1] - times[args.warmup - 1]
    return {"tokens_per_sec": (args.steps - args.warmup) * args.batch_size * args.seq_len / dt}


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
    args = ap.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    try:
        texts, source = corpus()
        tok_dir = train_tokenizer(texts, args.vocab, work / "tok") if not args.tokens else None
        make_reader = make_readers(args, tok_dir)
        dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
        print(f"bench/pretrain: preset {args.preset}, seq_len {args.seq_len}, batch {args.batch_size}, "
              f"{args.steps} steps (timed after {args.warmup}), device {dev}, corpus {args.tokens or source}")
        ours, hf = [], []
        for r in range(args.repeats):
            ours.append(run_ours(args, make_reader, work))
            print(f"  run {r}: ours {ours[-1]['tokens_per_sec']:,.0f} tok/s"
                  + (f", MFU {ours[-1]['mfu'] * 100:.1f}%" if ours[-1]["mfu"] is not None else ""), flush=True)
            if not args.no_hf:
                hf.append(run_hf(args, make_reader, work))
                print(f"  run {r}: HF Trainer {hf[-1]['tokens_per_sec']:,.0f} tok/s", flush=True)
        # best of N (as timeit does: other load on the machine only ever slows a run down) and median
        o_best, o_med = max(x["tokens_per_sec"] for x in ours), statistics.median(x["tokens_per_sec"] for x in ours)
        print(f"params: {ours[0]['params'] / 1e6:.2f}M")
        print(f"ours:       {o_best:,.0f} tokens/sec best of {len(ours)} (median {o_med:,.0f})")
        mfus = [x["mfu"] for x in ours if x["mfu"] is not None]
        if mfus:
            print(f"ours MFU:   {max(mfus) * 100:.1f}% best (median {statistics.median(mfus) * 100:.1f}%)")
        if hf:
            h_best, h_med = max(x["tokens_per_sec"] for x in hf), statistics.median(x["tokens_per_sec"] for x in hf)
            print(f"HF Trainer: {h_best:,.0f} tokens/sec best of {len(hf)} (median {h_med:,.0f})")
            print(f"ratio ours/HF: {o_best / h_best:.2f}x (best of {len(ours)}; medians {o_med / h_med:.2f}x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
