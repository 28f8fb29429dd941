"""Benchmark: trainable-parameter share and memory of full fine-tuning vs LoRA vs QLoRA, same model.

    .venv/bin/python bench/finetune.py                          # CPU, 83M random-weight Llama
    python bench/finetune.py --device cuda --preset 1b          # GPU, Llama-3.2-1B shape (1.24B)

Baseline: full fine-tuning (float32 master weights, torch AdamW). Each method runs in its own
process through the stage's own code (``refinery.tasks.finetune.methods``: the same loading, 4-bit NF4 +
double quantization + ``prepare_model_for_kbit_training`` for QLoRA, PEFT wrapping, optimizer
choice, paged 8-bit AdamW for QLoRA on a GPU) and takes ``--steps`` optimizer steps on random
tokens. Gradient checkpointing is on for all three (it is QLoRA's default), so the comparison is
about weights, gradients and optimizer state.

Memory, per method:
- ``weights``: bytes of parameters and buffers as stored (4-bit weights as packed bytes);
- ``peak_train``: on CUDA ``torch.cuda.max_memory_allocated`` over the training steps; on CPU the
  peak resident set (VmHWM, reset after loading through /proc/self/clear_refs) minus the resident
  set before the model was loaded;
- ``peak_load``: the same over loading (QLoRA on CPU reads float32 weights and quantizes them).

Yardsticks: LoRA needs ~3x less training memory than full fine-tuning; QLoRA ~4x less weight
memory than 16-bit LoRA (8x less than float32).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/tokenize.py would shadow the stdlib module: never import from bench/
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

# name -> (hidden, layers, heads, kv_heads, ffn, vocab, tied)
PRESETS = {
    "80m": (768, 10, 12, 12, 2048, 8192, False),  # 83M parameters, 85% of them in linear layers
    "1b": (2048, 16, 32, 8, 8192, 128256, True),  # Llama-3.2-1B shape, 1.24B parameters
    "7b": (4096, 32, 32, 32, 11008, 32000, False),  # Llama-2-7B shape, 6.74B parameters (random weights)
}
METHODS = ("full", "lora", "qlora")


def make_model(preset: str, out: Path, dtype: str) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    hidden, layers, heads, kv, ffn, vocab, tied = PRESETS[preset]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                      tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    # initialised on the GPU when there is one (a 7B model's random init takes minutes on a CPU)
    with torch.device("cuda" if torch.cuda.is_available() and dtype != "float32" else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.save_pretrained(out)
    # a word-level tokenizer is enough: the bench feeds random token ids
    tok = Tokenizer(models.WordLevel({"<eos>": 0, "<pad>": 1, "<unk>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>").save_pretrained(out)
    return out


def _vmhwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args) -> dict:
    """One method in this process: load, wrap, train ``steps`` steps; print one JSON line."""
    import torch

    from refinery.tasks.finetune.config import FinetuneConfig
    from refinery.tasks.finetune.data import Batch
    from refinery.tasks.engine.optim import build_optimizer
    from refinery.tasks.finetune.methods import (load_base_model, memory_footprint, optimizer_kind, resolve_device,
                                                 resolve_dtypes, trainable_summary, wrap_model)
    from refinery.tasks.finetune.train import autocast_ctx, rss_mb, token_loss_sum

    torch.set_num_threads(max(1, args.threads))
    cfg = FinetuneConfig(model=args.model_dir, data="bench-random-tokens", method=args.worker, device=args.device,
                         grad_checkpointing=True, max_steps=args.steps, batch_size=args.batch_size,
                         seq_len=args.seq_len,
                         lora={"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0,
                               "target_modules": args.target_modules})
    device = resolve_device(cfg)
    compute, weights_dtype = resolve_dtypes(cfg, device)
    cuda = device.type == "cuda"
    from refinery.tasks.train.plan import plan_finetune

    plan_mb = plan_finetune(cfg).total / 2**20   # the memory planner's peak estimate, beside the measured one
    base_rss = rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_hwm()
    t0 = time.perf_counter()
    model = load_base_model(cfg, args.model_dir, device, compute, weights_dtype)
    model = wrap_model(cfg, model, args.model_dir)
    load_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
        peak_load = torch.cuda.max_memory_allocated() / 2**20
        after_load = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        peak_load = _vmhwm_mb() - base_rss
        after_load = rss_mb() - base_rss
        _reset_hwm()
    opt_name = optimizer_kind(cfg, device)
    opt = build_optimizer(model, cfg, device, lr=cfg.resolved_lr(), kind=opt_name)
    vocab = model.config.vocab_size if hasattr(model, "config") else 32000
    g = torch.Generator().manual_seed(0)
    model.train()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        ids = torch.randint(3, vocab, (args.batch_size, args.seq_len), generator=g)
        batch = Batch(ids, ids.clone(), torch.ones_like(ids), None, ids.numel(), ids.numel()).to(device)
        with autocast_ctx(device, compute):
            loss, n = token_loss_sum(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / args.steps
    if cuda:
        peak_train = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_train = max(_vmhwm_mb() - base_rss, after_load)
    opt_bytes = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                    if torch.is_tensor(v))
    fp = memory_footprint(model)
    return {"method": args.worker, **trainable_summary(model), "weights_mb": round(fp["weight_bytes"] / 2**20, 1),
            "optimizer_state_mb": round(opt_bytes / 2**20, 1), "optimizer": opt_name,
            "peak_load_mb": round(peak_load, 1), "after_load_mb": round(after_load, 1), "peak_train_mb": round(peak_train, 1),
            "load_s": round(load_s, 2), "step_s": round(step_s, 3), "device": device.type,
            "plan_mb": round(plan_mb, 1), "plan_err": round((plan_mb - max(peak_train, peak_load)) / max(peak_train, peak_load), 3),
            "compute_dtype": str(compute).replace("torch.", ""),
            "weights_dtype": str(weights_dtype).replace("torch.", "")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: 80m on cpu, 1b on cuda")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--target-modules", default="all-linear", help="LoRA targets (QLoRA paper: all linear layers)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of full,lora,qlora")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.preset = args.preset or ("1b" if args.device == "cuda" else "80m")
    args.batch_size = args.batch_size or (4 if args.device == "cuda" else 2)
    args.seq_len = args.seq_len or (512 if args.device == "cuda" else 128)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        t0 = time.perf_counter()
        model_dir = make_model(args.preset, Path(tmp) / "model", "bfloat16" if args.device == "cuda" else "float32")
        print(f"model {args.preset} written in {time.perf_counter() - t0:.1f}s: {model_dir}", file=sys.stderr)
        results = []
        for m in args.methods.split(","):
            cmd = [sys.executable, __file__, "--worker", m, "--model-dir", str(model_dir), "--device", args.device,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                   "--lora-r", str(args.lora_r), "--target-modules", args.target_modules,
                   "--threads", str(args.threads)]
            # fixed mmap threshold: freed large blocks go back to the OS, so RSS follows live memory
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
            if r.returncode != 0 or line is None:
                print(f"{m}: failed\n{r.stderr[-3000:]}", file=sys.stderr)
                results.append({"method": m, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"})
                continue
            results.append(json.loads(line[len("RESULT "):]))
            print(f"{m}: done", file=sys.stderr)

    cols = ["method", "trainable_params", "trainable_pct", "weights_mb", "optimizer_state_mb", "peak_load_mb",
            "after_load_mb", "peak_train_mb", "plan_mb", "plan_err", "step_s", "optimizer", "weights_dtype"]
    print(f"\nfine-tuning memory, preset {args.preset}, device {args.device}, batch {args.batch_size} x "
          f"{args.seq_len} tokens, LoRA r={args.lora_r} on {args.target_modules}, gradient checkpointing on")
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in results)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in results:
        print("  ".join(str(r.get(c, r.get("error", "") if c == "trainable_params" else "")).ljust(widths[c]) for c in cols))
    by = {r["method"]: r for r in results if "error" not in r}

    def ratio(a, b, key):
        if a in by and b in by and by[b].get(key):
            return round(by[a][key] / by[b][key], 2)
        return None

    ratios = {
        "peak_train full/lora (yardstick ~3x)": ratio("full", "lora", "peak_train_mb"),
        "peak_train full/qlora": ratio("full", "qlora", "peak_train_mb"),
        "peak_train lora/qlora": ratio("lora", "qlora", "peak_train_mb"),
        "weights lora/qlora (yardstick ~4x vs 16-bit, ~8x vs fp32)": ratio("lora", "qlora", "weights_mb"),
        "trainable % full/lora": ratio("full", "lora", "trainable_pct"),
    }
    print()
    for k, v in ratios.items():
        print(f"{k}: {v}x" if v is not None else f"{k}: n/a")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "ratios": ratios}, indent=2))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
