#!/usr/bin/env bash
# Issue 6 on one GPU: the CUDA kernel tests, the linears-only kernel table, and the decode benchmark.
#   bash benchmarks/gpu_inference.sh            # results/*.json
# OUT=DIR puts the JSON files there instead. Each step has a time limit (the device tool allows 10 minutes).
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
timeout 150 $PY -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider --tb=line 2>&1 | tail -25
timeout 80 $PY benchmarks/gemv.py --json "$OUT/gemv_h100.json"
timeout 230 $PY benchmarks/decode.py --device cuda --compile --sizes 7b gpt2-xl --new-tokens 64 --repeats 3 \
  --variants bf16 int8 int4 w8a8 stock-int4 --json "$OUT/decode_cuda_7b_xl.json" 2>&1 | grep -v '^{'
timeout 100 $PY benchmarks/decode.py --device cuda --compile --sizes small --new-tokens 64 --repeats 3 \
  --variants fp32 bf16 int8 int4 w8a8 --json "$OUT/decode_cuda_small.json" 2>&1 | grep -v '^{'
