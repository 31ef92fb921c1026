#!/usr/bin/env bash
# One GPU session's figures in one go (issue 15): the base pretraining step (lxm and transformers; fp32 and bf16
# autocast; lxm also in its bf16 modes and under torch.compile), the whole optimizer step's parts with eager and
# fused optimizers, the loader next to the trainer at the achieved step rate, and extraction at batch 1/4/8 in fp32
# and bf16. Every lxm step mode runs twice (issue 28): on the plain path, the default on CUDA (LXM_CPU_KERNELS=0), and
# with lxm's CPU kernels forced on (LXM_CPU_KERNELS=1), so the first run shows which is faster on the GPU; the
# compiled rows run the plain path. Installs nothing beyond the project. Prints one table and writes OUT/gpu.json.
#
#   bash benchmarks/gpu.sh [--out DIR]            # on a CUDA machine (never run on one yet; estimated 8-12 minutes
#                                                 # on one H200, up from 6-8 before the lxm step modes doubled)
#   bash benchmarks/gpu.sh --smoke [--out DIR]    # CPU, toy sizes: checks the script runs (a bench-tier test does)
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
out=benchmarks/gpu-results
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) smoke=1 ;;
        --out) out="$2"; shift ;;
        *) echo "usage: bash benchmarks/gpu.sh [--smoke] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$out"
py=${PYTHON:-python3}

if [ "$smoke" = 1 ]; then
    device=cpu
    step_args=(--configs tiny --rounds 1 --iters 2 --warmup 1 --bf16 on)  # every mode, whatever the CPU
    loader_args=(--smoke)
    extract_args=(--detector tiny --batch-sizes 4)
    parts_args=(--config tiny --steps 1)
else
    device=cuda
    "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: CUDA is not available (use --smoke on CPU)')"
    "$py" -c "import torch; print('#', torch.cuda.get_device_name(), 'torch', torch.__version__)"
    step_args=(--configs base --rounds 1 --iters 20 --warmup 5 --compile)
    loader_args=(--model base --precision bf16 --steps 300 --workers 0,1,2,4 --trainer-workers 4)
    extract_args=(--batch-sizes 1,4,8)
    parts_args=(--config base --precision bf16 --steps 6)
fi

echo "== model step (${device})"
"$py" benchmarks/model_step.py --device "$device" "${step_args[@]}" --json "$out/model_step.json"
echo "== the whole optimizer step, eager and fused optimizers (${device})"
"$py" benchmarks/train_step_parts.py --device "$device" "${parts_args[@]}" --json "$out/train_step_parts.json"
echo "== loader and trainer (${device})"
"$py" benchmarks/pretrain_throughput.py --device "$device" "${loader_args[@]}" --json "$out/trainer.json"
echo "== extraction (${device})"
"$py" benchmarks/extract_throughput.py --device "$device" "${extract_args[@]}" --json "$out/extract_fp32.json"
"$py" benchmarks/extract_throughput.py --device "$device" "${extract_args[@]}" --bf16 --json "$out/extract_bf16.json"
"$py" benchmarks/gpu_report.py "$out"
