#!/usr/bin/env bash
# One GPU session's figures in one go (issue 15): the base pretraining step (lxm and transformers; fp32 and bf16
# autocast; lxm also in its bf16 modes and under torch.compile), the whole optimizer step's parts with eager and
# fused optimizers, the loader next to the trainer at the achieved step rate, and extraction at batch 1 and 8 in fp32
# and bf16 (96 images: a steady rate), the visual backends side by side (butd, grid, a ViT-B/16), and a DDP run of the trainer on 2 GPUs where there are two (nccl; 2 gloo
# processes on CPU in --smoke). Every lxm step mode runs twice (issue 28): on the plain path, the default on CUDA (LXM_CPU_KERNELS=0), and
# with lxm's CPU kernels forced on (LXM_CPU_KERNELS=1), so the first run shows which is faster on the GPU; the
# compiled rows run the plain path. Installs nothing beyond the project and needs nothing beside it: what ../shared
# would give (BERT's vocabulary, the fixture photos) has stand-ins (benchmarks/inputs.py). Each step has a time limit
# and a failed step does not stop the others; the report shows whatever JSON the steps wrote, and the exit status
# says whether every step ran. Prints the machine (torch, CUDA, cuDNN, NCCL, nvidia-smi), one table, OUT/gpu.json.
#
#   bash benchmarks/gpu.sh [--out DIR]            # on a CUDA machine (never run on one yet; each step has a time
#                                                 # limit: 7.75 minutes at most, plus start-up)
#   bash benchmarks/gpu.sh --smoke [--out DIR]    # CPU, toy sizes: checks the script runs (a bench-tier test does)
set -uo pipefail  # no -e: a failed or timed-out step is reported, the next one runs, the table shows what exists
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
failed=()

# one step: a name, its time limit in seconds, the command; its exit status is noted, never fatal
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        failed+=("$name (exit $rc$([ $rc -eq 124 ] && echo ", over ${limit} s"))")
        echo "!! $name failed with exit $rc after $((SECONDS - t0)) s; going on" >&2
    fi
}

# preflight, in the first seconds: the machine, and what is missing (benchmarks/inputs.py stands in for ../shared)
"$py" - <<'PY'
import os, subprocess, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
import inputs
import torch
print("# torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version(),
      "NCCL", ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
      "GPUs", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"# cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
print("# shared inputs:", "present" if inputs.BERT_VOCAB.is_file() else "absent: a synthetic vocabulary",
      "/", "fixture images" if inputs.FIXTURE_IMAGES.is_dir() else "generated images", f"({inputs.SHARED})")
PY
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv,noheader | sed 's/^/# nvidia-smi: /'

if [ "$smoke" = 1 ]; then
    device=cpu
    limits=(600 600 600 600 600 600)  # model step, optimizer step, trainer, each extraction, DDP, backbones
    step_args=(--configs tiny --rounds 1 --iters 2 --warmup 1 --bf16 on)  # every mode, whatever the CPU
    loader_args=(--smoke)
    extract_args=(--detector tiny --batch-sizes 4)
    backbone_args=(--backbones butd,grid,timm:test_vit --detector tiny --batch-sizes 2 --images 4)
    parts_args=(--config tiny --steps 1)
else
    device=cuda
    limits=(165 60 70 45 40 40)  # 7.75 minutes at most in all (8 with start-up), whatever a step does
    "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: CUDA is not available (use --smoke on CPU)')" || exit 1
    step_args=(--configs base --rounds 1 --iters 20 --warmup 5 --compile)
    loader_args=(--model base --precision bf16 --steps 300 --workers 0,1,2,4 --trainer-workers 4)
    extract_args=(--batch-sizes 1,8 --images 96)  # 12 batches of 8 after the first: a steady rate
    backbone_args=(--backbones butd,grid,timm:vit_base_patch16_224 --batch-sizes 8 --images 96)  # issue 31, fp32
    parts_args=(--config base --precision bf16 --steps 6)
fi

step "model step (${device})" "${limits[0]}" \
    "$py" benchmarks/model_step.py --device "$device" "${step_args[@]}" --json "$out/model_step.json"
step "the whole optimizer step, eager and fused optimizers (${device})" "${limits[1]}" \
    "$py" benchmarks/train_step_parts.py --device "$device" "${parts_args[@]}" --json "$out/train_step_parts.json"
step "loader and trainer (${device})" "${limits[2]}" \
    "$py" benchmarks/pretrain_throughput.py --device "$device" "${loader_args[@]}" --json "$out/trainer.json"
# DDP through the real trainer (nccl, cuda:LOCAL_RANK): where two GPUs are visible; the smoke run uses 2 gloo CPU
# processes so the path is exercised without one
gpus=$("$py" -c "import torch; print(torch.cuda.device_count())" 2> /dev/null || echo 0)
if [ "$smoke" = 1 ]; then
    step "DDP trainer, 2 processes (gloo, cpu)" "${limits[4]}" \
        "$py" -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/ddp_step.py --smoke \
        --json "$out/ddp.json"
elif [ "$gpus" -ge 2 ]; then
    step "DDP trainer, 2 GPUs (nccl)" "${limits[4]}" \
        "$py" -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/ddp_step.py --device cuda \
        --model base --precision bf16 --batch 64 --steps 60 --json "$out/ddp.json"
else
    echo "== DDP trainer: skipped ($gpus GPU visible; it needs 2)"
fi
step "extraction fp32 (${device})" "${limits[3]}" \
    "$py" benchmarks/extract_throughput.py --device "$device" "${extract_args[@]}" --json "$out/extract_fp32.json"
step "extraction bf16 (${device})" "${limits[3]}" \
    "$py" benchmarks/extract_throughput.py --device "$device" "${extract_args[@]}" --bf16 --json "$out/extract_bf16.json"
step "extraction backends side by side (${device})" "${limits[5]}" \
    "$py" benchmarks/extract_throughput.py --device "$device" "${backbone_args[@]}" --json "$out/extract_backbones.json"
"$py" benchmarks/gpu_report.py "$out"
if [ ${#failed[@]} -gt 0 ]; then
    printf 'gpu.sh: failed steps: %s\n' "$(IFS='; '; echo "${failed[*]}")" >&2
    exit 1
fi
