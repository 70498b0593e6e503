#!/usr/bin/env bash
# Every figure in the README, in one command (`make figures`). CPU parts always run; GPU parts run
# when CUDA is present (the published GPU figures came from one H100 or one H200, as the README marks each).
# Results land in results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export PY
if $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  bash benchmarks/reference_runs.sh shakespeare                    # 1. shakespeare preset, 2-minute budget
  bash benchmarks/reference_runs.sh small                          # 2. the `small` fp32 baselines
  PTQ_BASELINE=runs/small-shakespeare/best bash benchmarks/qat_gpu_runs.sh   # 2-3. PTQ sweep + QAT ablation
  SPLIT=chunks bash benchmarks/qat_gpu_runs.sh                     # 3. the ablation on the chunk split
  RES=results/qat_b64 BATCH=64 MAX_TIME=290 bash benchmarks/qat_gpu_runs.sh   # 3. the batch-64 ablation
  DATASETS=tinystories SWEEP=1 BATCH=64 MAX_TIME=420 RES=results/qat_b64 bash benchmarks/qat_gpu_runs.sh  # 3. lr sweep
  for sweep in transition transition2; do   # 3. 16-to-1.58-bit training on TinyStories
    SWEEP=$sweep BATCH=64 MAX_TIME=400 RES=results/qat_b64 bash benchmarks/qat_gpu_runs.sh
  done
  $PY benchmarks/qat_step_time.py --preset small                   # 3. QAT step-time slowdown
  $PY benchmarks/qat_step_time.py --preset shakespeare
  $PY benchmarks/gptq_layer.py                                     # 2. GPTQ on a 4096 x 4096 layer
  $PY benchmarks/train_throughput.py --out results/train_throughput_h100.json
  OUT=results bash benchmarks/gpu_inference.sh                     # 4. CUDA kernel tests, GEMV table, decode
  $PY benchmarks/decode.py --device cuda --sizes tiny small shakespeare gpt2-small gpt2-xl 7b \
    --new-tokens 64 --repeats 3 --json results/decode_cuda_graph_only.json   # 4. without --compile
fi
bash benchmarks/cpu_budget.sh                                      # 1. tiny preset vs nanoGPT on CPU
$PY benchmarks/train_throughput.py --presets tiny small shakespeare --steps 12 --out results/train_throughput_cpu.json
$PY benchmarks/train_throughput.py --presets tiny --cpu-batch 24 --steps 120 --cpu-compile --dropout 0 0.1 \
  --out results/train_throughput_cpu_dropout.json                  # 1. why the 5-minute recipe is eager, no dropout
$PY benchmarks/decode.py --device cpu                              # 4. CPU decode kernels
$PY benchmarks/gptq_layer.py --device cpu --json results/gptq_layer_cpu.json   # 2. (results/gptq_layer.json: the GPU's)
$PY benchmarks/decode.py --device cpu --sizes tiny small shakespeare --json results/decode_cpu_presets.json  # 4.
