#!/usr/bin/env bash
# The GPU inference figures on one GPU, in parts that each fit in 10 minutes:
#   1  the CUDA kernel tests (their log), the 7 B linears alone (gemv.py), one step's attention alone
#   2  the decode table: the 7 B shape, GPT-2-XL and the `small` preset, float against quantized
#   3  PyTorch's own int4 (tinygemm) and W8A8 at 7 B, and the 7 B steps on PyTorch's attention
#   4  trained tiny checkpoints, loaded as `nanogptq sample` loads them
#   5  where the 7 B int4 step's time goes (--profile), and decode after a 16-token prompt against 512
#   bash benchmarks/gpu_inference.sh 2       # one part; no argument: all five
# Files: results/gpu/<what>_<gpu>.json, the GPU named by the second word of its name (h100, h200, ...);
# OUT=DIR writes them there instead.
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-results/gpu}
PART=${1:-all}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export NANOGPTQ_RUN_BY="bash benchmarks/gpu_inference.sh${1:+ $1}"  # recorded in each result file
DECODE="$PY benchmarks/decode.py --device cuda --compile --new-tokens 64 --repeats 3"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
GPU=$($PY -c 'import sys; sys.path.insert(0, "benchmarks"); import common; print(common.device_tag("cuda"))' \
  2>/dev/null || echo gpu)
part() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }
if part 1; then
  log="$OUT/cuda_tests_$GPU.txt"
  {
    echo "# command: $PY -m pytest -v -m gpu tests/"
    echo "# commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "# device: $($PY -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null)"
    timeout 450 $PY -m pytest -v -m gpu tests/ -p no:cacheprovider --tb=short
  } > "$log" 2>&1
  tail -25 "$log"
  timeout 200 $PY benchmarks/gemv.py --variants bf16 fp16 triton-int8-fp16 triton-int4-g128-fp16 \
    mma-int4-g128-fp16 read-int4-g128-fp16 --json "$OUT/gemv_7b_$GPU.json"
  timeout 120 $PY benchmarks/decode_attention.py --cache 584 2048 --json "$OUT/decode_attention_7b_$GPU.json"
fi
if part 2; then
  # int4: the tensor-core GEMV (auto), the blocks fused; unfused-int4: the same model without fused blocks;
  # triton-int4: on the Triton GEMV; all in the same run. The quantized models run on fp16 activations.
  timeout 220 $DECODE --act-dtype fp16 --sizes 7b --variants bf16 int8 int4 unfused-int4 triton-int4 \
    --json "$OUT/decode_7b_$GPU.json" | grep -v '^{'
  timeout 150 $DECODE --act-dtype fp16 --sizes gpt2-xl --variants bf16 int8 int4 unfused-int4 triton-int4 \
    --json "$OUT/decode_gpt2xl_$GPU.json" | grep -v '^{'
  timeout 100 $DECODE --act-dtype fp16 --sizes small --variants fp32 bf16 int8 int4 unfused-int4 w8a8 \
    --json "$OUT/decode_small_$GPU.json" | grep -v '^{'
fi
if part 3; then
  # PyTorch's own int4 (tinygemm needs bf16 activations) and W8A8, and the 7 B steps on PyTorch's attention
  timeout 150 $DECODE --sizes 7b --variants stock-int4 w8a8 --json "$OUT/decode_7b_stock_$GPU.json" | grep -v '^{'
  timeout 120 $DECODE --sizes 7b --variants bf16 int8 --sdpa --json "$OUT/decode_7b_sdpa_$GPU.json" | grep -v '^{'
fi
if part 4; then
  # trained tiny checkpoints, made as `make run STEPS=300 RUN=runs/gpu-demo` makes them, run as `sample` loads
  # them: the auto activation dtype (fp16 quantized, bf16 float) against fp32
  R=runs/gpu-demo
  if [ ! -f $R/gptq-int4/config.json ]; then
    $PY -m nanogptq.cli train --preset tiny --dataset shakespeare --split tail --out-dir $R --max-steps 300 \
      --batch-size 16 --lr 3e-3 --min-lr 3e-4 --warmup-steps 50 --eval-interval 100 --eval-batches 10
    $PY -m nanogptq.cli quantize $R/best --method rtn --bits 8 --group-size -1 --out $R/rtn-int8
    $PY -m nanogptq.cli quantize $R/best --method gptq --bits 4 --group-size 64 --act-order --out $R/gptq-int4
  fi
  timeout 100 $DECODE --sizes --ckpt $R/best $R/rtn-int8 $R/gptq-int4 --ckpt-dtype auto \
    --json "$OUT/decode_checkpoints_$GPU.json" | grep -v '^{'
  timeout 100 $DECODE --sizes --ckpt $R/best $R/rtn-int8 $R/gptq-int4 --ckpt-dtype fp32 \
    --json "$OUT/decode_checkpoints_fp32_$GPU.json" | grep -v '^{'
fi
if part 5; then
  # the profile: each kernel's time past every kernel that started before it (kernels overlap under PDL)
  timeout 150 $PY benchmarks/decode.py --device cuda --compile --act-dtype fp16 --sizes 7b --variants int4 \
    --new-tokens 32 --repeats 2 --profile 3 --json "$OUT/profile_7b_int4_$GPU.json" | grep -v '^{'
  # a 16-token prompt and 200 timed tokens (the shape of gpt-fast's benchmark) against the usual 512 + 64
  timeout 200 $PY benchmarks/decode.py --device cuda --compile --repeats 3 --act-dtype fp16 --sizes 7b \
    --variants bf16 int4 --prompt-len 16 --new-tokens 200 --json "$OUT/decode_7b_prompt16_$GPU.json" | grep -v '^{'
  timeout 200 $DECODE --act-dtype fp16 --sizes 7b --variants bf16 int4 \
    --json "$OUT/decode_7b_prompt512_$GPU.json" | grep -v '^{'
fi
