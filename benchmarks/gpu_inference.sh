#!/usr/bin/env bash
# Issue 6 on one GPU: the CUDA kernel tests, the linears-only kernel table, the decode-attention table and
# the decode benchmark, in three parts that each fit the device tool's 10 minutes:
#   bash benchmarks/gpu_inference.sh 1; bash benchmarks/gpu_inference.sh 2; bash benchmarks/gpu_inference.sh 3
# OUT=DIR puts the JSON files there instead.
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-results}
PART=${1:-all}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DECODE="$PY benchmarks/decode.py --device cuda --compile --new-tokens 64 --repeats 3"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
# result files are named by the GPU (h100, h200, ...); "interleaved" is the Triton GEMV's current kernel (the
# files without it came from the first one)
GPU=$($PY -c 'import torch; print(torch.cuda.get_device_name().split()[1].lower())' 2>/dev/null || echo gpu)
if [ "$PART" = all ] || [ "$PART" = 1 ]; then
  timeout 330 $PY -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider --tb=short 2>&1 | tail -25
  timeout 150 $PY benchmarks/gemv.py --variants bf16 triton-int8 triton-int8-bytes triton-int4-g128 \
    triton-int4-g128-halves stock-int4-g128 --json "$OUT/gemv_interleaved_$GPU.json"
  timeout 120 $PY benchmarks/decode_attention.py --json "$OUT/decode_attention_$GPU.json"
fi
if [ "$PART" = all ] || [ "$PART" = 2 ]; then
  timeout 230 $DECODE --sizes 7b --variants bf16 int8 int4 stock-int4 --json "$OUT/decode_cuda_7b_interleaved_$GPU.json" | grep -v '^{'
  timeout 150 $DECODE --sizes gpt2-xl --variants bf16 int8 int4 w8a8 stock-int4 --json "$OUT/decode_cuda_xl_interleaved_$GPU.json" \
    | grep -v '^{'
  timeout 100 $DECODE --sizes small --variants fp32 bf16 int8 int4 w8a8 --json "$OUT/decode_cuda_small_interleaved_$GPU.json" \
    | grep -v '^{'
fi
if [ "$PART" = all ] || [ "$PART" = 3 ]; then
  timeout 80 $DECODE --sizes 7b --variants w8a8 --json "$OUT/decode_cuda_7b_w8a8_$GPU.json" | grep -v '^{'
  # the same 7 B steps with PyTorch's attention instead of the split-cache kernel
  timeout 120 $DECODE --sizes 7b --variants bf16 int8 --sdpa --json "$OUT/decode_cuda_7b_sdpa_$GPU.json" | grep -v '^{'
fi
