#!/usr/bin/env bash
# The quantization figures on `small` (issue 30, point 5): two training runs of the same recipe on each of Tiny
# Shakespeare and TinyStories, each quantized and evaluated by benchmarks/ptq_small.py (the four at once: GPTQ
# on these sizes is kernel launches, so one GPU serves four processes), then one Pareto plot.
#   bash benchmarks/ptq_small.sh          # on the GPU machine; TRAIN=1 first trains the runs that are missing,
#                                         # all at once (benchmarks/reference_runs.sh small, SEED=2 small, and qat)
#   QAT="runs/qat/ternary ..."            # packed ternary checkpoints to put on the plot (default: the qat
#                                         # case's runs/qat-small-*/ternary that exist)
#   DEVICE=cpu ARGS=--quick RUNS_LIST="runs/tiny-shakespeare"   # a reduced run on the CPU
# Writes results/ptq/small_<run>_<device>.{json,md} per run and results/ptq/pareto_<device>.{png,md}.
set -euo pipefail
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the scripts import nanogptq without an install
RUNS=${RUNS:-runs}
DEVICE=${DEVICE:-cuda}
RUNS_LIST=${RUNS_LIST:-"$RUNS/small-shakespeare $RUNS/small-tinystories $RUNS/small-shakespeare-seed2 $RUNS/small-tinystories-seed2"}
if [ -n "${TRAIN:-}" ]; then
  [ -f "$RUNS/small-shakespeare/best/config.json" ] || RUNS=$RUNS PY=$PY bash benchmarks/reference_runs.sh small &
  [ -f "$RUNS/small-shakespeare-seed2/best/config.json" ] || SEED=2 RUNS=$RUNS PY=$PY bash benchmarks/reference_runs.sh small &
  [ -f "$RUNS/qat-small-shakespeare/ternary/config.json" ] || RUNS=$RUNS PY=$PY bash benchmarks/reference_runs.sh qat &
  wait
fi
QAT=${QAT:-$(ls -d "$RUNS"/qat-small-*/ternary 2>/dev/null | tr '\n' ' ')}
# four processes share the machine's cores: each gets a quarter instead of every core
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / 4 > 0 ? $(nproc) / 4 : 1 ))}
pids=() files=()
for r in $RUNS_LIST; do
  name=$(basename "$r" | tr - _)
  $PY benchmarks/ptq_small.py "$r/best" --device "$DEVICE" ${ARGS:-} > "$r-ptq_small.log" 2>&1 &
  pids+=($!)
  files+=("results/ptq/small_${name}_$($PY -c "import sys; sys.path.insert(0, 'benchmarks'); from common import device_tag; print(device_tag('$DEVICE'))").json")
done
for p in "${pids[@]}"; do wait "$p"; done
$PY benchmarks/ptq_small.py --plot "${files[@]}" --device "$DEVICE" ${QAT:+--qat $QAT}
