#!/usr/bin/env bash
# The `tiny` preset on Tiny Shakespeare (nanoGPT's tail split) within wall-clock budgets on this CPU,
# for the side-by-side with nanoGPT's CPU "baby" config. --time-schedule decays the learning rate by the
# clock as well as by steps, so the cosine ends at the budget on a slower machine instead of being cut off.
#   bash benchmarks/cpu_budget.sh            # 2-minute and 5-minute runs, then full-split evaluation,
#                                            # all recorded in results/train/budget_tiny_cpu.json (OUT=FILE)
set -euo pipefail
PY=${PY:-python}
common="--preset tiny --dataset shakespeare --split tail --warmup-steps 50 --eval-batches 10 --device cpu"
$PY -m nanogptq.cli train $common --overwrite --out-dir runs/cpu-2min --batch-size 16 --lr 4e-3 --min-lr 4e-4 --eval-interval 100 \
  --max-steps 1200 --max-time 120 --time-schedule
# 5 minutes: a larger batch, a higher peak, and weight decay 0.6 (by 5 minutes the model overfits: train loss
# ~1.4 against val ~1.6; dropout 0.1 costs 30-44% of the CPU throughput); eager, as torch.compile gains ~1%
# on this CPU's steps and its compilation counts against the budget (benchmarks/train_throughput.py)
$PY -m nanogptq.cli train $common --overwrite --out-dir runs/cpu-5min --batch-size 24 --lr 4e-3 --min-lr 2e-4 --eval-interval 200 \
  --weight-decay 0.6 --max-steps 2400 --max-time 300 --time-schedule
for r in cpu-2min cpu-5min; do
  echo "== $r"; tail -n 1 runs/$r/metrics.jsonl
  $PY -m nanogptq.cli eval runs/$r/best --no-save | tee runs/$r/eval.json
done
# the record: each run's log and its best checkpoint's whole-split evaluation
OUT=${OUT:-results/train/budget_tiny_cpu.json} $PY - <<'PYEOF'
import json, os, platform, sys
sys.path.insert(0, "benchmarks")
from common import write_result
runs = {r: {"log": [json.loads(line) for line in open(f"runs/{r}/metrics.jsonl")],
            "best_whole_split": json.load(open(f"runs/{r}/eval.json"))} for r in ("cpu-2min", "cpu-5min")}
write_result(os.environ["OUT"], None, "cpu", command="bash benchmarks/cpu_budget.sh",
             cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), runs=runs)
print("wrote", os.environ["OUT"])
PYEOF
