#!/usr/bin/env bash
# The GPU check: roberta-base on CUDA with allocator and NVML numbers, checkpointing beside the
# randomized layers, a multi-process (one per visible GPU) synthetic fine-tune under torchrun,
# and the tests that need a GPU — a few minutes on one H200-class GPU, well under 8.
# Runs from a plain checkout, no install and no network: the machine must already have torch,
# transformers, typer, rich and nvidia-ml-py; the fine-tune also needs `datasets` (if it is
# missing, carry its wheels — see the device tool's README — or that step is skipped, saying so).
#
#   scripts/gpu_check.sh OUT_DIR        # writes OUT_DIR/*.json and prints a summary
set -uo pipefail
out=${1:-results}
mkdir -p "$out" || exit 1
out=$(cd "$out" && pwd) || exit 1
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
failed=()
# Each step runs even when an earlier one failed (a GPU lease is short); the exit status says which failed.
step() { local name=$1; shift; echo "== $name"; local t0=$SECONDS; "$@"; local rc=$?
         echo "== $name: exit $rc in $((SECONDS - t0)) s"; [ "$rc" -eq 0 ] || failed+=("$name"); }
python3 - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("torch", torch.__version__, "on", torch.cuda.device_count(), "x", torch.cuda.get_device_name(0))
PY
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || true
profile() { python3 -m randbp_cli profile --model roberta-base --device cuda --warmup 2 --steps 10 "$@"; }
step profile-seq128 profile --rho 0.5 --rho 0.2 --rho 0.1 --sketch gaussian --sketch countsketch -b 8 -b 32 \
  --seq-len 128 -o "$out/profile-roberta-base-cuda.json"
step profile-seq512 profile --rho 0.5 --rho 0.1 --sketch gaussian --sketch countsketch -b 8 --seq-len 512 \
  -o "$out/profile-roberta-base-cuda-seq512.json"
step methods profile --rho 0.1 --sketch countsketch --sketch crs --sketch srht --method randomized \
  --method checkpoint --method checkpoint+randomized -b 32 --seq-len 128 -o "$out/methods-roberta-base-cuda.json"
if python3 -c "import datasets" 2>/dev/null; then
  ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
  step finetune-ddp python3 -m torch.distributed.run --nproc-per-node "$ngpu" --standalone -m randbp_cli finetune \
    --task synthetic --rho 0.5 --compare --sketch countsketch -b 16 --device cuda \
    -o "$out/finetune-synthetic-ddp-cuda.json"
else
  echo "skipped the torchrun fine-tune: the package 'datasets' is not installed here"
fi
# A short real-task run when GLUE MRPC is at hand: GLUE_DIR (GLUE's TSV layout) or the datasets cache.
# The model is roberta-base from the Hub cache when it is there (pretrained), else random-init (said in the report).
if probe=$(python3 - 2>&1 <<'PY'
import os
from randbp_cli.loaders import load_glue_dir, load_glue_hub
from randbp_cli.tasks import get_task
spec = get_task("mrpc")
load_glue_dir(os.environ["GLUE_DIR"], spec) if os.environ.get("GLUE_DIR") else load_glue_hub(spec, offline=True)
PY
); then
  step finetune-mrpc python3 -m randbp_cli finetune --task mrpc --model roberta-base --compare --rho 0.1 \
    --sketch countsketch --max-steps 600 --device cuda ${GLUE_DIR:+--data-dir "$GLUE_DIR"} \
    -o "$out/finetune-mrpc-cuda.json"
else
  echo "skipped the MRPC fine-tune: $(printf '%s\n' "$probe" | tail -n 1)"
  echo "  (set GLUE_DIR to GLUE's files, or fill the datasets cache)"
fi
step gpu-tests python3 -m pytest -q -p no:cacheprovider -m gpu tests
if [ ${#failed[@]} -gt 0 ]; then echo "failed: ${failed[*]}"; exit 1; fi
echo "all GPU checks passed"
