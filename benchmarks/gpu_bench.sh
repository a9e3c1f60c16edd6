#!/usr/bin/env bash
# GPU benchmark of BENCHMARKS.md: llava-1.5-7b (and qwen2.5-vl-7b) architecture, fp16, seeded
# random weights, batch 1, budget 128: eager reference (torch) vs the export's static-shape
# modules replayed as CUDA graphs (torch-static). Usage: benchmarks/gpu_bench.sh OUTDIR
# Needs torch with CUDA and transformers>=5.17,<6 beside this package (pip install -e . or PYTHONPATH).
set -u
out=${1:-bench-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
common=(--random-weights --device cuda --dtype fp16 --budget 128 --methods none,fastv,pdrop,reroute
        --backends torch,torch-static --repeats 10 --warmup 2 --decode-tokens 16)
timeout "${LLAVA_TIMEOUT:-300}" python3 -m reroute_export bench --model llava-1.5-7b "${common[@]}" \
    --json "$out/llava-1.5-7b.json" --markdown "$out/llava-1.5-7b.md" 2>&1 | tee "$out/llava-1.5-7b.log"
timeout "${QWEN_TIMEOUT:-200}" python3 -m reroute_export bench --model qwen2.5-vl-7b "${common[@]}" \
    --json "$out/qwen2.5-vl-7b.json" --markdown "$out/qwen2.5-vl-7b.md" 2>&1 | tee "$out/qwen2.5-vl-7b.log"
