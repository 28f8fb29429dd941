#!/usr/bin/env bash
# The GPU checks, as run on a lent GPU machine (the device tool), wheels for what its image lacks in .whl/:
#   pydantic(+core, annotated-types, typing-inspection) and bitsandbytes, for CPython 3.12.
# Prints: 124M pretrain tokens/s and MFU (eager and torch.compile at batch 16, compiled at batch 64), and full/LoRA/QLoRA memory on a 1B model.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
common=(--device cuda --preset 124M --model '{"vocab_size": 50304}' --seq-len 1024 --batch-size 16 --steps 40 --warmup 10 --repeats 1 --vocab 8192 --threads 0 --no-hf)
timeout 200 python3 bench/pretrain.py "${common[@]}" 2>&1 | grep -v Warning | tail -25 | tee "$OUT/pretrain.txt"
timeout 200 python3 bench/pretrain.py "${common[@]}" --compile 2>&1 | grep -v Warning | tail -25 | tee "$OUT/pretrain-compile.txt"
timeout 200 python3 bench/pretrain.py "${common[@]}" --compile --batch-size 64 --steps 25 2>&1 | grep -v Warning | tail -25 | tee "$OUT/pretrain-compile-b64.txt"
timeout 200 python3 bench/finetune.py --device cuda --preset 1b --json "$OUT/finetune.json" 2>&1 | tail -30 | tee "$OUT/finetune.txt"
