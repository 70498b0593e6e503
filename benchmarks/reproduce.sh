#!/usr/bin/env bash
# The figures of docs/results.md in one command (`make figures`): the CPU ones always, the GPU ones where
# CUDA is present (docs/results.md names the GPU of each published figure). Files land in results/<area>/,
# named by the device they ran on.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export PY
if $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  GPU=$($PY -c 'import sys; sys.path.insert(0, "benchmarks"); import common; print(common.device_tag("cuda"))')
  bash benchmarks/reference_runs.sh shakespeare             # train: the `shakespeare` preset in 2 minutes
  bash benchmarks/reference_runs.sh small                   # the `small` fp32 baselines the PTQ sweep quantizes
  bash benchmarks/reference_runs.sh bpe                     # `small` with the BPE: the GGUF benchmark's
  $PY benchmarks/train_throughput.py                        # train: throughput, this GPU and its host's CPU
  $PY benchmarks/ptq_sweep.py runs/small-shakespeare/best --device cuda   # ptq: the sweep
  $PY benchmarks/gptq_layer.py                              # ptq: GPTQ on a 4096 x 4096 layer
  $PY benchmarks/gptq_scale.py                              # ptq: GPTQ of a GPT-2-XL shape, end to end
  SEED=2 bash benchmarks/reference_runs.sh small            # a second training run of each `small` baseline
  bash benchmarks/ptq_small.sh                              # ptq: the `small` figures and the Pareto plot
  BATCH=64 MAX_TIME=290 bash benchmarks/qat_gpu_runs.sh     # qat: the ablation on both corpora (13 runs at once)
  # qat: TinyStories to the full 5,000 steps with the lr sweep (replaces the TinyStories file above), and the
  # best 2-bit GPTQ of its fp32 model
  DATASETS=tinystories SWEEP=1 BATCH=64 MAX_TIME=420 bash benchmarks/qat_gpu_runs.sh
  for sweep in transition transition2; do                   # qat: 16-to-1.58-bit training on TinyStories
    SWEEP=$sweep BATCH=64 MAX_TIME=400 bash benchmarks/qat_gpu_runs.sh
  done
  $PY benchmarks/qat_step_time.py --preset small            # qat: training-step time
  $PY benchmarks/qat_step_time.py --preset shakespeare
  bash benchmarks/gpu_inference.sh                          # gpu: tests, linears, attention, decode, profile
  $PY benchmarks/decode.py --device cuda --compile --new-tokens 64 --repeats 3 --act-dtype fp16 --sizes 7b \
    --variants bf16 int8 int4 --json "results/gpu/prefill_7b_$GPU.json"   # gpu: prefill
fi
bash benchmarks/cpu_budget.sh                                          # train: `tiny` vs nanoGPT on the CPU
bash benchmarks/main_job.sh                                            # train + ptq: the main job, 3.5 minutes
$PY benchmarks/train_throughput.py --presets tiny small shakespeare --steps 12 --out results/train/throughput_cpu.json
$PY benchmarks/train_throughput.py --presets tiny --cpu-batch 24 --steps 120 --cpu-compile --dropout 0 0.1 \
  --out results/train/throughput_dropout_cpu.json                      # train: why the 5-minute recipe is eager
$PY benchmarks/gptq_layer.py --device cpu                              # ptq: results/ptq/gptq_layer_cpu.json
if [ -d runs/small-bpe/best ] && [ -d runs/shakespeare-gpu/best ]; then  # ptq: in llama.cpp (the GPU's checkpoints)
  $PY benchmarks/gguf_llamacpp.py runs/small-bpe/best runs/shakespeare-gpu/best  # results/gguf/
  # ptq: the default, act-order and budgets on the BPE `small`, and their Pareto plot (results/ptq/*_cpu.*)
  $PY benchmarks/ptq_small.py runs/small-bpe/best --device cpu --bits 2 3 4 --budgets 2.5 3.0 4.3
  $PY benchmarks/ptq_small.py --plot results/ptq/small_small_bpe_cpu.json --device cpu
fi
$PY benchmarks/decode.py --device cpu                                  # cpu: results/cpu/decode_gpt2small_cpu.json
$PY benchmarks/decode.py --device cpu --sizes tiny small shakespeare --json results/cpu/decode_presets_cpu.json
$PY benchmarks/decode.py --device cpu --compile --sizes tiny small --json results/cpu/decode_presets_compiled_cpu.json
