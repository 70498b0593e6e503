#!/usr/bin/env bash
# Issue 6 on one GPU: the CUDA kernel tests, the linears-only kernel table, and the decode benchmark.
#   bash benchmarks/gpu_inference.sh            # results/*.json
# OUT=DIR puts the JSON files and logs there instead.
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
timeout 200 $PY -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider 2>&1 | tail -15
timeout 100 $PY benchmarks/gemv.py --json "$OUT/gemv_h100.json"
timeout 260 $PY benchmarks/decode.py --device cuda --sizes 7b gpt2-xl gpt2-small --new-tokens 64 --repeats 3 \
  --json "$OUT/decode_cuda.json" 2>&1 | grep -v '^{'
timeout 120 $PY benchmarks/decode.py --device cuda --sizes tiny small shakespeare --new-tokens 64 --repeats 3 \
  --json "$OUT/decode_cuda_presets.json" 2>&1 | grep -v '^{'
