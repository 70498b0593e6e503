#!/usr/bin/env bash
# The main job's figures (`make run` without the demo): train `tiny` with make run's recipe, evaluate it on
# the whole validation split, make the five variants and compare them.
#   bash benchmarks/main_job.sh                   # make run's 3.5-minute budget (runs/main-job, time_budget)
#   TIME=0 RUN=runs/recipe-1300 bash benchmarks/main_job.sh   # the recipe at a fixed 1,300 steps, no clock
# A finished training run in $RUN, and variants already made there, are kept (a stopped job resumes).
# Writes results/train/main_job_<name>_cpu.json: the training log, the whole-split evaluation, compare's rows.
set -euo pipefail
PY=${PY:-python3}
RUN=${RUN:-runs/main-job}
STEPS=${STEPS:-1300}
TIME=${TIME:-210}
NAME=${NAME:-$([ "$TIME" != 0 ] && echo time_budget || echo "recipe_$STEPS")}  # the result file's name
NOTE=${NOTE:-}  # how the machine was (shared or quiet), kept in the result file
clock=""
[ "$TIME" != 0 ] && clock="--max-time $TIME --time-schedule"
if [ ! -f "$RUN/best/config.json" ]; then
  # shellcheck disable=SC2086
  $PY -m nanogptq.cli train --preset tiny --dataset shakespeare --split tail --out-dir "$RUN" --overwrite \
    --max-steps "$STEPS" $clock --batch-size 24 --lr 4e-3 --min-lr 2e-4 --weight-decay 0.6 --warmup-steps 50 \
    --eval-interval 200 --eval-batches 10 --device cpu --no-progress
fi
$PY -m nanogptq.cli eval "$RUN/best" --device cpu --no-save > "$RUN/eval.json"
Q="$PY -m nanogptq.cli quantize $RUN/best --device cpu"
[ -f "$RUN/rtn-int8/config.json" ] || $Q --method rtn --bits 8 --group-size -1 --out "$RUN/rtn-int8"
[ -f "$RUN/gptq-int8/config.json" ] || $Q --method gptq --bits 8 --group-size -1 --out "$RUN/gptq-int8"
[ -f "$RUN/rtn-int3/config.json" ] || $Q --method rtn --bits 3 --group-size 64 --out "$RUN/rtn-int3"
[ -f "$RUN/gptq-int3/config.json" ] || $Q --method gptq --bits 3 --group-size 64 --out "$RUN/gptq-int3"
[ -f "$RUN/gptq-bpw2.5/config.json" ] || $Q --method gptq --target-bpw 2.5 --out "$RUN/gptq-bpw2.5"
$PY -m nanogptq.cli compare "$RUN"/{best,rtn-int8,gptq-int8,rtn-int3,gptq-int3,gptq-bpw2.5} --out "$RUN/report" \
  --device cpu
RUN=$RUN NAME=$NAME TIME=$TIME STEPS=$STEPS NOTE=$NOTE $PY - <<'PYEOF'
import json, os, sys
sys.path.insert(0, "benchmarks")
from common import write_result
run = os.environ["RUN"]
log = [json.loads(line) for line in open(f"{run}/metrics.jsonl") if line.strip()]
out = f"results/train/main_job_{os.environ['NAME']}_cpu.json"
write_result(out, json.load(open(f"{run}/report/compare.json")), "cpu",
             command=f"TIME={os.environ['TIME']} STEPS={os.environ['STEPS']} RUN={run} bash benchmarks/main_job.sh",
             note=os.environ["NOTE"],
             log=log, best_whole_split=json.load(open(f"{run}/eval.json")),
             choices={v: {k: json.load(open(f"{run}/{v}/config.json")).get(k) for k in
                          ("quant_selection", "bits_per_weight")} for v in ("gptq-int8", "gptq-int3", "gptq-bpw2.5")},
             plan=json.load(open(f"{run}/gptq-bpw2.5/config.json"))["quantization"]["plan"])
print("wrote", out)
PYEOF
