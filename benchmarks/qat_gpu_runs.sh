#!/usr/bin/env bash
# The QAT ablation and the PTQ sweep on one GPU, all runs at once (small models leave the GPU idle most of
# the time, so concurrent processes finish the set faster than one after another; the step count reached
# within MAX_TIME depends on how many runs share the GPU).
#   NANOGPTQ_DATA_DIR=... BATCH=64 MAX_TIME=290 bash benchmarks/qat_gpu_runs.sh
# The `small` preset, 5,000 steps at batch $BATCH (64). Tiny Shakespeare validates on nanoGPT's split (the last
# 10% of the text) unless SPLIT=chunks; TinyStories on the seeded-chunk split. Each run's best and final
# checkpoints are evaluated on the whole validation split, and QAT runs exported to packed ternary weights and
# evaluated again (benchmarks/summarize_runs.py), into $RES (results/qat) as ablation_shakespeare_<gpu>.json
# (ablation_shakespeare_chunks_<gpu>.json with SPLIT=chunks) and ablation_tinystories_<gpu>.json, with the best
# 2-bit GPTQ of the TinyStories fp32 model in results/ptq/sweep_2bit_small_tinystories_<gpu>.*.
# DATASETS=tinystories (or shakespeare) runs one of the two. With PTQ_BASELINE set, the PTQ sweep of that
# checkpoint runs alongside (results/ptq/sweep_<run>_<gpu>.*). With SWEEP=1, TinyStories also trains
# weights-only at other peak learning rates and weight decays, and fp32 at the BitNet lr (is a gap the lr's?).
# With SWEEP=transition (or transition2), TinyStories trains only fp32 and 16-to-1.58-bit runs (--qat-start:
# float first, then ternary, in the same 5,000 steps), into $RES/transition_tinystories_<gpu>.json (transition2,
# per-channel scales without the input norm: transition_channel_tinystories_<gpu>.json).
set -uo pipefail
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the scripts import nanogptq without an install
# this command line, with the settings it ran with, recorded in each result file beside the summary's own
NANOGPTQ_RUN_BY="bash benchmarks/qat_gpu_runs.sh"
for v in PTQ_BASELINE MAX_TIME BATCH SPLIT SWEEP DATASETS; do
  [ -n "${!v:-}" ] && NANOGPTQ_RUN_BY="$v=${!v} $NANOGPTQ_RUN_BY"
done
export NANOGPTQ_RUN_BY
GPU=$($PY -c 'import sys; sys.path.insert(0, "benchmarks"); import common; print(common.device_tag("cuda"))' \
  2>/dev/null || echo gpu)
R=${RUNS:-runs/qat}
STEPS=${STEPS:-5000}
SPLIT=${SPLIT:-tail}
RES=${RES:-results/qat}
common="--preset small --batch-size ${BATCH:-64} --max-steps $STEPS --warmup-steps 100 --eval-interval 500 --eval-batches 20
        --compile --no-progress --max-time ${MAX_TIME:-280}"
fp="--lr 1e-3 --min-lr 1e-4"
bitnet="--lr 3e-3 --min-lr 3e-4 --lr-schedule bitnet"
train() {  # dataset name flags...
  local ds=$1 name=$2; shift 2
  # TinyStories keeps the seeded-chunk split: the subset's last 10% has characters its first 90% lacks
  local split=chunks; [ $ds = shakespeare ] && split=$SPLIT
  $PY -m nanogptq.cli train --overwrite --dataset $ds --split $split --out-dir $R/$ds/$name $common "$@" > $R/$ds-$name.log 2>&1
}
mkdir -p $R $RES
if [ -n "${PTQ_BASELINE:-}" ]; then
  timeout ${SWEEP_TIME:-300} $PY benchmarks/ptq_sweep.py "$PTQ_BASELINE" --device cuda > $R/ptq_sweep.log 2>&1 &
fi
sweep() {  # OUTPUT_NAME "run_name flags..." ...: TinyStories runs at once, then their summary
  local out=$1 spec name runs=(); shift
  for spec in "$@"; do
    name=${spec%% *}
    # shellcheck disable=SC2086  # the flags split into words
    train tinystories $name ${spec#* } &
    runs+=("$R/tinystories/$name")
  done
  wait
  $PY benchmarks/summarize_runs.py "${runs[@]}" --device cuda --out "$RES/${out}_$GPU.json" 2>&1 | tail -14
}
wo="--qat-config configs/qat/weights_only.json"
woc="--qat-config configs/qat/weights_only_channel.json"
wocn="--qat-config configs/qat/weights_only_channel_nonorm.json"
if [ "${SWEEP:-}" = transition ]; then
  sweep transition_tinystories "fp32 $fp" "weights_only_bitnet $bitnet $wo" "weights_only_channel $bitnet $woc" \
    "wo_start0.5 $bitnet $wo --qat-start 0.5" "wo_start0.75 $bitnet $wo --qat-start 0.75" \
    "woc_start0.5 $bitnet $woc --qat-start 0.5" "woc_start0.75 $bitnet $woc --qat-start 0.75" \
    "wo_start0.5_lr5e-3 $wo --lr 5e-3 --min-lr 5e-4 --lr-schedule bitnet --qat-start 0.5" \
    "wo_nonorm_start0.5 $bitnet --qat-config configs/qat/weights_only_nonorm.json --qat-start 0.5" \
    "all_act8_start0.5 $bitnet --qat-config configs/qat/all_act8.json --qat-start 0.5" \
    "fp32_lr3e-3 --lr 3e-3 --min-lr 3e-4"
  exit 0
fi
if [ "${SWEEP:-}" = transition2 ]; then  # per-channel scales, no input norm, where and how to switch
  sweep transition_channel_tinystories "fp32 $fp" \
    "wocn_start0.5 $bitnet $wocn --qat-start 0.5" "wocn_start0.4 $bitnet $wocn --qat-start 0.4" \
    "wocn_start0.6 $bitnet $wocn --qat-start 0.6" "wocn_start0.5_ramp0.1 $bitnet $wocn --qat-start 0.5 --qat-ramp 0.1" \
    "wocn_start0.5_lr4e-3 $wocn --lr 4e-3 --min-lr 4e-4 --lr-schedule bitnet --qat-start 0.5" \
    "wocn_start0.5_wd $wocn --lr 3e-3 --min-lr 3e-4 --qat-start 0.5" \
    "wocn_start0.5_minlr1e-4 $wocn --lr 3e-3 --min-lr 1e-4 --lr-schedule bitnet --qat-start 0.5" \
    "wocn_start0.5_restart $bitnet $wocn --qat-start 0.5 --qat-restart" \
    "woc_start0.5_restart $bitnet $woc --qat-start 0.5 --qat-restart" \
    "wocn_start0.5_restart_lr2e-3 $wocn --lr 2e-3 --min-lr 2e-4 --lr-schedule bitnet --qat-start 0.5 --qat-restart"
  exit 0
fi
for ds in ${DATASETS:-shakespeare tinystories}; do
  train $ds fp32 $fp &
  train $ds weights_only_bitnet $bitnet --qat-config configs/qat/weights_only.json &
  train $ds weights_attn_act $bitnet --qat-config configs/qat/weights_attn_act.json &
  train $ds all_act8 $bitnet --qat-config configs/qat/all_act8.json &
  train $ds extreme $bitnet --qat-config configs/qat/extreme.json &
  train $ds extreme_absmean $bitnet --qat-config configs/qat/extreme_absmean.json &
done
has() { [[ " ${DATASETS:-shakespeare tinystories} " == *" $1 "* ]]; }
has shakespeare && train shakespeare weights_only_fp_lr $fp --qat-config configs/qat/weights_only.json &
sweep=()
if [ -n "${SWEEP:-}" ]; then
  train tinystories fp32_lr3e-3 --lr 3e-3 --min-lr 3e-4 &
  train tinystories wo_lr6e-3 $wo --lr-schedule bitnet --lr 6e-3 --min-lr 6e-4 &
  train tinystories wo_lr1e-2 $wo --lr-schedule bitnet --lr 1e-2 --min-lr 1e-3 &
  train tinystories wo_lr6e-3_wd0 $wo --lr-schedule bitnet --lr 6e-3 --min-lr 6e-4 --weight-decay 0 &
  train tinystories wo_lr3e-3_cosine $wo --lr 3e-3 --min-lr 3e-4 &
  sweep=($R/tinystories/{fp32_lr3e-3,wo_lr6e-3,wo_lr1e-2,wo_lr6e-3_wd0,wo_lr3e-3_cosine})
fi
wait
has shakespeare && $PY benchmarks/summarize_runs.py \
  $R/shakespeare/{fp32,weights_only_fp_lr,weights_only_bitnet,weights_attn_act,all_act8,extreme,extreme_absmean} \
  --device cuda --out "$RES/ablation_shakespeare$([ "$SPLIT" = tail ] || echo "_$SPLIT")_$GPU.json" 2>&1 | tail -10
has tinystories || exit 0
$PY benchmarks/summarize_runs.py $R/tinystories/{fp32,weights_only_bitnet,weights_attn_act,all_act8,extreme,extreme_absmean} \
  "${sweep[@]}" \
  --device cuda --out "$RES/ablation_tinystories_$GPU.json" 2>&1 | tail -14
# the best 2-bit GPTQ of the TinyStories fp32 model, to set against ternary QAT
$PY benchmarks/ptq_sweep.py $R/tinystories/fp32/best --bits 2 --device cuda \
  --out "results/ptq/sweep_2bit_small_tinystories_$GPU" 2>&1 | tail -14
