#!/usr/bin/env bash
# The GPU check: roberta-base on CUDA with allocator and NVML numbers, in well under 8 minutes
# on one GPU, plus the tests that need a GPU. Runs from a plain checkout (no install, no
# network): the machine must already have torch, transformers, typer, rich and nvidia-ml-py.
#
#   scripts/gpu_check.sh OUT_DIR        # writes OUT_DIR/profile-roberta-base-cuda*.json and a log
set -euo pipefail
out=${1:-results}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))
PY
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || true
profile() { python3 -m randbp_cli profile --model roberta-base --device cuda --warmup 2 --steps 10 "$@"; }
profile --rho 0.5 --rho 0.2 --rho 0.1 --sketch gaussian --sketch countsketch -b 8 -b 32 --seq-len 128 \
  -o "$out/profile-roberta-base-cuda.json"
profile --rho 0.5 --rho 0.1 --sketch gaussian --sketch countsketch -b 8 --seq-len 512 \
  -o "$out/profile-roberta-base-cuda-seq512.json"
python3 -m pytest -q tests -m gpu 2>&1 | tail -n 5
