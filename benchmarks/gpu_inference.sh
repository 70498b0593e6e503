#!/usr/bin/env bash
# Issue 6 on one GPU: the CUDA kernel tests, the linears-only kernel table, the decode-attention table and
# the decode benchmark, in four parts that each fit the device tool's 10 minutes, and a fifth, the tensor-core
# GEMV timed with its parts taken out (benchmarks/gemv_breakdown.py):
#   bash benchmarks/gpu_inference.sh 1; ... bash benchmarks/gpu_inference.sh 5
# OUT=DIR puts the JSON files there instead.
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-results}
PART=${1:-all}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DECODE="$PY benchmarks/decode.py --device cuda --compile --new-tokens 64 --repeats 3"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
# result files are named by the GPU (h100, h200, ...). "early4": the tensor-core GEMV's warp 0 loading its
# epilogue's vectors before the warps' reduction in blocks of every size; "early" files came from before that,
# with those loads early in blocks of 1-2 row tiles only; "attnpdl" files came from before that, with the decode
# attention writing the cache itself and launched as a programmatic dependent (attention_triton.py); "fold"
# files came from before that, with the blocks' LayerNorms and residual adds inside
# the tensor-core GEMVs (quant.fuse_blocks; unfused-int4 without), "xs" files came from before that, with
# the tensor-core GEMV's tuner also choosing
# whether x is staged in shared memory, "tiles" files came from before that, with the tuner choosing
# row tiles per block and the activations' load path, "fused" files came from before that, with the decode
# attention's merge inside its kernel, "pdl" files from before that, with the kernels launched as programmatic dependents (sm_90),
# otherwise as "mma". "mma": 4 bits on the tensor-core GEMV (cuda_gemv.py),
# 8 bits on the Triton GEMV, quantized models on fp16 activations (the float baseline stays bf16); "even" /
# "fp16act" files came from before the tensor-core GEMV (4 bits on Triton), "interleaved" ones from the
# Triton GEMV's previous version on bf16 activations, the files without either from the first kernel
GPU=$($PY -c 'import torch; print(torch.cuda.get_device_name().split()[1].lower())' 2>/dev/null || echo gpu)
if [ "$PART" = all ] || [ "$PART" = 1 ]; then
  timeout 450 $PY -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider --tb=short 2>&1 | tail -25
  timeout 200 $PY benchmarks/gemv.py --variants bf16 fp16 triton-int8-fp16 triton-int4-g128-fp16 \
    mma-int4-g128-fp16 read-int4-g128-fp16 --json "$OUT/gemv_all_$GPU.json"
  timeout 120 $PY benchmarks/decode_attention.py --json "$OUT/decode_attention_$GPU.json"
fi
if [ "$PART" = all ] || [ "$PART" = 2 ]; then
  # int4: the tensor-core GEMV (auto), the blocks fused; unfused-int4: the same model without fuse_blocks;
  # triton-int4: on the Triton GEMV; all in the same run (nopdl-int4, compiled without programmatic dependent
  # launch, is left out to fit the device time; results/decode_cuda_7b_tiles_h200.json has it)
  timeout 220 $DECODE --act-dtype fp16 --sizes 7b --variants bf16 int8 int4 unfused-int4 triton-int4 \
    --json "$OUT/decode_cuda_7b_early4_$GPU.json" | grep -v '^{'
  timeout 150 $DECODE --act-dtype fp16 --sizes gpt2-xl --variants bf16 int8 int4 unfused-int4 triton-int4 \
    --json "$OUT/decode_cuda_xl_early4_$GPU.json" | grep -v '^{'
  timeout 100 $DECODE --act-dtype fp16 --sizes small --variants fp32 bf16 int8 int4 unfused-int4 w8a8 \
    --json "$OUT/decode_cuda_small_early4_$GPU.json" | grep -v '^{'
fi
if [ "$PART" = all ] || [ "$PART" = 3 ]; then
  # PyTorch's own int4 (tinygemm needs bf16 activations) and W8A8, and the 7 B steps on PyTorch's attention
  timeout 150 $DECODE --sizes 7b --variants stock-int4 w8a8 --json "$OUT/decode_cuda_7b_stock_$GPU.json" | grep -v '^{'
  timeout 120 $DECODE --sizes 7b --variants bf16 int8 --sdpa --json "$OUT/decode_cuda_7b_sdpa_$GPU.json" | grep -v '^{'
fi
if [ "$PART" = all ] || [ "$PART" = 4 ]; then
  # trained tiny checkpoints, made as `make run STEPS=300 RUN=runs/gpu-demo` makes them, run as `sample` loads
  # them: the auto activation dtype (fp16 quantized, bf16 float) against fp32
  R=runs/gpu-demo
  if [ ! -f $R/gptq-int4/config.json ]; then
    $PY -m nanogptq.cli train --preset tiny --dataset shakespeare --split tail --out-dir $R --max-steps 300 \
      --batch-size 16 --lr 3e-3 --min-lr 3e-4 --warmup-steps 50 --eval-interval 100 --eval-batches 10
    $PY -m nanogptq.cli quantize $R/best --method rtn --bits 8 --group-size -1 --out $R/rtn-int8
    $PY -m nanogptq.cli quantize $R/best --method gptq --bits 4 --group-size 64 --act-order --out $R/gptq-int4
  fi
  for dtype in auto fp32; do
    timeout 100 $DECODE --sizes --ckpt $R/best $R/rtn-int8 $R/gptq-int4 --ckpt-dtype $dtype \
      --json "$OUT/decode_cuda_ckpt_${dtype}_$GPU.json" | grep -v '^{'
  done
fi
if [ "$PART" = all ] || [ "$PART" = 5 ]; then
  timeout 240 $PY benchmarks/gemv_breakdown.py --json "$OUT/gemv_breakdown_early4_$GPU.json"
fi
