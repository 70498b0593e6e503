#!/usr/bin/env bash
# The GPU reference runs: the `shakespeare` preset against nanoGPT's 2-minute figure, and the `small` fp32
# baselines that the PTQ sweep quantizes.
#   bash benchmarks/reference_runs.sh shakespeare   # `shakespeare` preset, 2-minute budget; its log and best
#                                                   # checkpoint's config: results/train/budget_shakespeare_<gpu>.json
#   bash benchmarks/reference_runs.sh small         # `small` fp32 baselines, Tiny Shakespeare + TinyStories
#   bash benchmarks/reference_runs.sh bpe           # `small` with the 512-token BPE on Tiny Shakespeare, the
#                                                   # GGUF benchmark's (benchmarks/gguf_llamacpp.py) second checkpoint
#   SEED=2 bash benchmarks/reference_runs.sh small  # a second training run of each (runs/small-*-seed2)
#   bash benchmarks/reference_runs.sh qat           # `small` with BitNet b1.58 ternary weights on both corpora (the
#                                                   # fp32 runs' split), packed: runs/qat-small-<data>/ternary
# Runs go to $RUNS (default runs/); NANOGPTQ_DATA_DIR must point at the datasets.
set -euo pipefail
RUNS=${RUNS:-runs}
PY=${PY:-python3}
case "${1:-}" in
  shakespeare)
    # nanoGPT's shakespeare-char recipe (batch 64, context 256, lr 1e-3, dropout 0.2) on its split (the
    # last 10% of the text is the validation set), stopped at 120 s. Our model overfits after ~1,500 steps
    # at this batch, so the cosine schedule ends at 2,500 steps.
    R="$RUNS/shakespeare-gpu"
    $PY -m nanogptq.cli train --overwrite --preset shakespeare --dataset shakespeare --split tail --out-dir "$R" \
      --batch-size 64 --lr 1e-3 --min-lr 1e-4 --warmup-steps 100 --max-steps "${STEPS:-2500}" --eval-interval 250 \
      --eval-batches 20 --compile --max-time "${MAX_TIME:-120}" --no-progress
    $PY -m nanogptq.cli eval "$R/best"  # the whole split; stored in the checkpoint's config.json
    R="$R" $PY - <<'PYEOF'
import json, os, sys
sys.path.insert(0, "benchmarks")
from common import result_path, write_result
run = os.environ["R"]
out = os.environ.get("OUT") or result_path("train", "budget_shakespeare", "cuda")
log = [json.loads(line) for line in open(f"{run}/metrics.jsonl") if line.strip()]
write_result(out, None, "cuda", command="bash benchmarks/reference_runs.sh shakespeare", log=log,
             best_checkpoint_config=json.load(open(f"{run}/best/config.json")))
print("wrote", out)
PYEOF
    ;;
  small)
    # the `small` preset (6 x 192) for 5,000 steps on each corpus, both at once on the one GPU; SEED=N makes a
    # second run of the same recipe (training seed N, folders small-<data>-seedN)
    SUFFIX=${SEED:+-seed$SEED}
    for ds in shakespeare tinystories; do
      $PY -m nanogptq.cli train --overwrite --preset small --dataset $ds --out-dir "$RUNS/small-$ds$SUFFIX" \
        --batch-size 64 --lr 1e-3 --min-lr 1e-4 --warmup-steps 100 --max-steps 5000 --eval-interval 250 \
        --eval-batches 20 --compile --no-progress ${SEED:+--seed $SEED} > "$RUNS/small-$ds$SUFFIX.log" 2>&1 &
    done
    wait
    for ds in shakespeare tinystories; do $PY -m nanogptq.cli eval "$RUNS/small-$ds$SUFFIX/best"; done
    ;;
  bpe)
    # the `small` case's recipe with the BPE tokenizer (512 tokens, trained on the training split)
    $PY -m nanogptq.cli train --overwrite --preset small --tokenizer bpe --dataset shakespeare --out-dir "$RUNS/small-bpe" \
      --batch-size 64 --lr 1e-3 --min-lr 1e-4 --warmup-steps 100 --max-steps 5000 --eval-interval 250 --eval-batches 20 \
      --compile --no-progress > "$RUNS/small-bpe.log" 2>&1
    $PY -m nanogptq.cli eval "$RUNS/small-bpe/best"
    ;;
  qat)
    # the `small` case's schedule length and data, ternary weights-only at BitNet's learning rate (the recipe of
    # results/qat/), then packed to 1.6 bits/weight; both corpora at once
    for ds in shakespeare tinystories; do
      $PY -m nanogptq.cli train --overwrite --preset small --dataset $ds --out-dir "$RUNS/qat-small-$ds" \
        --qat-config configs/qat/weights_only.json --lr 3e-3 --min-lr 3e-4 --lr-schedule bitnet --batch-size 64 \
        --warmup-steps 100 --max-steps 5000 --eval-interval 250 --eval-batches 20 --compile --no-progress \
        > "$RUNS/qat-small-$ds.log" 2>&1 &
    done
    wait
    for ds in shakespeare tinystories; do
      $PY -m nanogptq.cli pack "$RUNS/qat-small-$ds/best" --out "$RUNS/qat-small-$ds/ternary"
    done
    ;;
  *) echo "usage: $0 shakespeare|small|bpe|qat" >&2; exit 2 ;;
esac
