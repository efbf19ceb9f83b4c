#!/usr/bin/env bash
# GPU check of the ESD engine: esd_speed, overhead and train_scale's 7B figures on CUDA,
# under 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh
#
# Writes env.txt and esd_speed, overhead, train_scale .{txt,json} to $OUT when it is set, else to
# benchmarks/results/gpu/. Needs torch with CUDA, transformers and timm; the package is read
# from this checkout (PYTHONPATH), so nothing has to be installed. PYTHON picks the interpreter
# (default python3); TB_BENCH_DEVICE picks the GPU (default cuda).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
RESULTS=${OUT:-benchmarks/results/gpu}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TB_BENCH_DEVICE=${TB_BENCH_DEVICE:-cuda}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'available', torch.cuda.is_available())"
} 2>&1 | tee "$RESULTS/env.txt"

# Each step has its own time limit, so the whole check stays under 8 minutes.
# A failed or timed-out step is reported and the next one still runs (one device try is precious).
status=0
timeout 170 "$PYTHON" benchmarks/esd_speed.py --repeats 5 \
    --models resnet18 resnet34 vgg16 gpt2 llama mixtral \
    --json "$RESULTS/esd_speed.json" 2>&1 | tee "$RESULTS/esd_speed.txt" \
    || { echo "esd_speed failed or timed out (exit $?)"; status=1; }
timeout 110 "$PYTHON" benchmarks/overhead.py --steps 20 --repeats 5 \
    --lm-batch-size 8 --seq-len 512 \
    --json "$RESULTS/overhead.json" 2>&1 | tee "$RESULTS/overhead.txt" \
    || { echo "overhead failed or timed out (exit $?)"; status=1; }
# eigvalsh of one 4096 x 4096 Gram and the Gram rate on the GPU: what docs/performance.md's 7B
# table otherwise assumes (the 1.1B part runs on the CPU, as everywhere).
timeout 150 "$PYTHON" benchmarks/train_scale.py --device "$TB_BENCH_DEVICE" --repeats 3 \
    --check-blocks 0 --json "$RESULTS/train_scale.json" 2>&1 | tee "$RESULTS/train_scale.txt" \
    || { echo "train_scale failed or timed out (exit $?)"; status=1; }
echo "results in $RESULTS"
exit $status
