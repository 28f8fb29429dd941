#!/usr/bin/env bash
# Every GPU check of the training issues, as one script for a lent CUDA machine (the device tool);
# wheels for what its image lacks go in .whl/ (pydantic(+core, annotated-types, typing-inspection)
# and bitsandbytes, for its CPython).
#
#   bench/gpu.sh                 all sections (about 14 minutes on an H200)
#   bench/gpu.sh mfu finetune    some of them: profile | mfu | finetune | fsdp | qlora7b
#
# The device tool runs one command for at most 600 s: run `bench/gpu.sh profile finetune`,
# `bench/gpu.sh mfu` and `bench/gpu.sh fsdp qlora7b` as three calls there (each under 600 s at
# its checks' limits; 15 minutes of device time holds the three with little to spare). Results go to $OUT
# (one .txt/.json per check):
#   profile   124M preset, bf16, eager: the top 15 kernels by self CUDA time over 5 steps of our loop
#             (torch.profiler; $OUT/profile-124m.txt), the first thing to read before changing anything
#   mfu       124M preset, bf16, seq 1024: tokens/s and MFU, eager and torch.compile (batch 16, 64),
#             and torch.compile with the chunked linear + cross-entropy (loss_chunk_tokens 8192, batch
#             64), with the loop's fused AdamW; the target is >= 45% MFU
#   finetune  full / LoRA / QLoRA peak memory on the Llama-3.2-1B shape, beside the memory planner's
#             estimate (plan_mb, plan_err: the planner checked against torch.cuda.max_memory_allocated)
#   fsdp      the 1B preset (128k vocabulary) trained by our loop with strategy=fsdp (FSDP2 fully_shard,
#             bf16 mixed precision, a process group of one) beside strategy=auto (plain module):
#             peak memory and tokens/s
#   qlora7b   QLoRA on a Llama-2-7B-shaped model (random weights, real shapes) at sequence 2048,
#             batch 1, gradient checkpointing: peak memory and the planner's estimate
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
sections=${*:-profile mfu finetune fsdp qlora7b}
want() { [[ " $sections " == *" $1 "* ]]; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
status=0
check() {   # NAME SECONDS CMD...: run one check under a time limit, keep its tail, remember a failure
  local name=$1 secs=$2; shift 2
  echo "== $name" | tee "$OUT/$name.txt"
  timeout "$secs" "$@" 2>&1 | grep -v Warning | tail -30 | tee -a "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "!! $name exited $rc" | tee -a "$OUT/$name.txt"; status=1; }
}

common=(--device cuda --preset 124M --model '{"vocab_size": 50304}' --seq-len 1024 --batch-size 16 --steps 40
        --warmup 10 --repeats 1 --vocab 8192 --threads 0 --no-hf)
if want profile; then
  check pretrain-profile 150 python3 bench/pretrain.py "${common[@]}" --steps 20 --profile "$OUT/profile-124m.txt"
fi
if want mfu; then
  check pretrain-eager 100 python3 bench/pretrain.py "${common[@]}"
  check pretrain-compile 150 python3 bench/pretrain.py "${common[@]}" --compile
  check pretrain-compile-b64 150 python3 bench/pretrain.py "${common[@]}" --compile --batch-size 64 --steps 25
  check pretrain-compile-b64-chunked 150 python3 bench/pretrain.py "${common[@]}" --compile --batch-size 64 \
    --steps 25 --loss-chunk-tokens 8192
fi
if want finetune; then
  check finetune-1b 150 python3 bench/finetune.py --device cuda --preset 1b --json "$OUT/finetune-1b.json"
fi
if want fsdp; then
  big=(--device cuda --preset 1B --model '{"vocab_size": 128256}' --seq-len 1024 --batch-size 4 --steps 12
       --warmup 4 --repeats 1 --vocab 8192 --threads 0 --no-hf)
  check pretrain-1b-auto 150 python3 bench/pretrain.py "${big[@]}" --strategy auto
  check pretrain-1b-fsdp 150 python3 bench/pretrain.py "${big[@]}" --strategy fsdp
fi
if want qlora7b; then
  check qlora-7b 280 python3 bench/finetune.py --device cuda --preset 7b --methods qlora --seq-len 2048 \
    --batch-size 1 --steps 2 --json "$OUT/qlora-7b.json"
fi
exit $status
