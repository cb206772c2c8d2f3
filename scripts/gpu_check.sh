#!/usr/bin/env bash
# The GPU check: every measurement this project needs a GPU for, in one call.
#   1. the fused-kernel tests and every other GPU test (pytest -m gpu);
#   2. benchmarks/layer_overhead.py: kernels per layer step, host µs, time × exact (fp32 and bf16);
#   3. roberta-base, exact vs the default sketch at ρ = 0.5 / 0.2 / 0.1, eager, at the host-bound sizes
#      (fp32 32×128, bf16 128×128, fp32 8×512) and the GPU-bound ones (fp32 32×512, bf16 128×512);
#   4. the same host-bound sizes under --compile (CUDA graphs, the same mode for exact and randomized);
#   5. the savers and checkpointing beside them (SDPA attention: fp32 32×128, bf16 128×128);
#   6. the decoder savers (swiglu, lm-head) with LoRA in bf16, beside randomized and checkpointing;
#   7. the synthetic fine-tune under torchrun, one process per visible GPU.
# Runs from a plain checkout, no install and no network: the machine must already have torch (with
# triton), transformers, typer, rich and nvidia-ml-py; the fine-tune also needs `datasets`.
# Each step runs even when an earlier one failed (a GPU lease is short); the exit status says which failed.
#
#   scripts/gpu_check.sh OUT_DIR [QUICK]     # writes OUT_DIR/*.json and OUT_DIR/gpu-check.log
#   QUICK=1 runs a seconds-long version of every step (what the CPU dry run does with --device cpu)
set -uo pipefail
out=${1:-results}
quick=${2:-${QUICK:-0}}
mkdir -p "$out" || exit 1
out=$(cd "$out" && pwd) || exit 1
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
device=${DEVICE:-cuda}
exec > >(tee -a "$out/gpu-check.log") 2>&1
failed=()
step() { local name=$1; shift; echo "== $name: $*"; local t0=$SECONDS; "$@"; local rc=$?
         echo "== $name: exit $rc in $((SECONDS - t0)) s"; [ "$rc" -eq 0 ] || failed+=("$name"); }
git rev-parse HEAD 2>/dev/null | sed 's/^/commit /'
if [ "$device" = cuda ]; then
  python3 - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("torch", torch.__version__, "on", torch.cuda.device_count(), "x", torch.cuda.get_device_name(0))
import triton; print("triton", triton.__version__)
PY
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || true
fi

if [ "$quick" = 1 ]; then  # the dry run: tiny model, one step, the same commands
  model=roberta-tiny; steps=(--steps 1 --warmup 0); sizes128=(-b 2); big=2; seq=16; seqlong=32
  decoder=llama-tiny; decoder_seq=32
  tokens=(256 --repeats 1 --iterations 1 --host-iterations 2)
  finetune_extra=(--max-steps 4 --max-train-samples 64 --max-eval-samples 32)
else
  finetune_extra=()
  model=roberta-base; steps=(--steps 20 --warmup 3); sizes128=(-b 32); big=128; seq=128; seqlong=512
  decoder=smollm2-135m; decoder_seq=2048
  tokens=(1024 4096 16384)
fi
profile() { python3 -m randbp_cli profile --model "$model" --device "$device" "${steps[@]}" "$@"; }
rhos=(--rho 0.5 --rho 0.2 --rho 0.1)

[ "$device" = cuda ] && step gpu-tests python3 -m pytest -q -p no:cacheprovider -m gpu tests
step layer-overhead-fp32 python3 benchmarks/layer_overhead.py --device "$device" --tokens "${tokens[@]}" \
  -o "$out/layer-overhead-$device.json"
step layer-overhead-bf16 python3 benchmarks/layer_overhead.py --device "$device" --dtype bfloat16 \
  --tokens "${tokens[@]}" -o "$out/layer-overhead-$device-bf16.json"
# host-bound sizes, eager then compiled (the time ratios side by side in each file)
step fp32-128 profile "${rhos[@]}" "${sizes128[@]}" --seq-len "$seq" -o "$out/profile-roberta-base-$device.json"
step bf16-128 profile "${rhos[@]}" -b "$big" --seq-len "$seq" --dtype bfloat16 \
  -o "$out/profile-roberta-base-$device-bf16.json"
step fp32-512 profile "${rhos[@]}" -b 8 --seq-len "$seqlong" -o "$out/profile-roberta-base-$device-seq512.json"
step fp32-128-compiled profile --rho 0.5 --rho 0.1 "${sizes128[@]}" --seq-len "$seq" --compile \
  -o "$out/profile-roberta-base-$device-compiled.json"
step bf16-128-compiled profile --rho 0.5 --rho 0.1 -b "$big" --seq-len "$seq" --dtype bfloat16 --compile \
  -o "$out/profile-roberta-base-$device-bf16-compiled.json"
step fp32-512-compiled profile --rho 0.5 --rho 0.1 -b 8 --seq-len "$seqlong" --compile \
  -o "$out/profile-roberta-base-$device-seq512-compiled.json"
# GPU-bound sizes, eager
step fp32-32x512 profile --rho 0.1 "${sizes128[@]}" --seq-len "$seqlong" -o "$out/profile-roberta-base-$device-32x512.json"
step bf16-128x512 profile --rho 0.1 -b "$big" --seq-len "$seqlong" --dtype bfloat16 \
  -o "$out/profile-roberta-base-$device-bf16-128x512.json"
# savers and checkpointing beside them (every method plain and with the savers)
step methods-fp32 profile --rho 0.1 --method randomized --method checkpoint --saver dropout --saver gelu:2 \
  "${sizes128[@]}" --seq-len "$seq" -o "$out/methods-roberta-base-$device.json"
step methods-bf16 profile --rho 0.1 --method randomized --method checkpoint --saver dropout --saver gelu:2 \
  -b "$big" --seq-len "$seq" --dtype bfloat16 -o "$out/methods-roberta-base-$device-bf16.json"
# decoder savers (issue 24): LoRA r 16, bf16, every method plain and with swiglu + lm-head
step decoder-savers-bf16 python3 -m randbp_cli profile --model "$decoder" --device "$device" "${steps[@]}" \
  --lora 16 --rho 0.1 --method randomized --method checkpoint --saver swiglu --saver lm-head -b 1 \
  --seq-len "$decoder_seq" --dtype bfloat16 -o "$out/decoder-savers-$decoder-$device-bf16.json"
if python3 -c "import datasets" 2>/dev/null; then
  ngpu=$([ "$device" = cuda ] && python3 -c "import torch; print(torch.cuda.device_count())" || echo 1)
  step finetune-ddp python3 -m torch.distributed.run --nproc-per-node "$ngpu" --standalone -m randbp_cli finetune \
    --task synthetic --rho 0.5 --compare -b 16 --device "$device" "${finetune_extra[@]}" \
    -o "$out/finetune-synthetic-ddp-$device.json"
else
  echo "skipped the torchrun fine-tune: the package 'datasets' is not installed here"
fi
if [ ${#failed[@]} -gt 0 ]; then echo "failed: ${failed[*]}"; exit 1; fi
echo "all GPU checks passed"
