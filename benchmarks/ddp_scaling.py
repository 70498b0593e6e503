"""Training on several GPUs through torchrun (DDP over NCCL) against one GPU, at the same global batch.

For each mode (float, and ternary QAT with configs/qat/weights_only.json) it trains the `shakespeare` preset
on 1 GPU and on N, with the global batch held fixed (--batch-size divided among the ranks), and reports:
- tokens/s between the second log line and the last (compilation and start-up left out) and the scaling
  N-GPU tokens/s / (N x 1-GPU tokens/s);
- the validation loss at the last step of the N-GPU run against two 1-GPU runs of different seeds (their
  difference is the run-to-run noise);
- a resume check: the N-GPU run stopped halfway by --max-steps and continued with --resume on the same N
  reaches the same step and saves one checkpoint.

    python benchmarks/ddp_scaling.py --gpus 2 [--steps 600] [--modes float qat]

The launcher's environment keeps NVLink multicast off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1): on hosts whose GPUs are shared, using it can put the GPUs out of service.
Writes results/train/ddp_scaling_<gpu>.json.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from common import add_output, parser, print_table, result_path, write_result

from nanogptq.model import PRESETS
from nanogptq.train import MULTICAST_OFF

MODES = {"float": [], "qat": ["--qat-config", "configs/qat/weights_only.json"]}
ENV = {**os.environ, **MULTICAST_OFF, "OMP_NUM_THREADS": "4"}


def train(args, out_dir: Path, nproc: int, mode: str, seed: int, resume: bool = False,
          stop_at: float | None = None) -> list[dict]:
    """One torchrun run; returns its metrics.jsonl lines."""
    steps, batch = args.steps, args.batch_size
    device = ["--compile"] if args.device == "cuda" else ["--device", "cpu", "--no-compile"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "nanogptq.cli", "train", "--preset", args.preset, "--dataset", "shakespeare", "--split", "tail",
           "--out-dir", str(out_dir), "--batch-size", str(batch // nproc), "--lr", "1e-3", "--min-lr", "1e-4",
           "--warmup-steps", "100", "--max-steps", str(steps), "--eval-interval", str(steps // 6),
           "--eval-batches", "20", "--seed", str(seed), "--no-progress", *device, *MODES[mode]]
    if stop_at is not None:  # a run cut short: the wall clock stands in for an interruption
        cmd += ["--max-time", f"{stop_at:.1f}"]
    # a resumed run keeps its saved settings, the cut run's clock among them, unless given again
    cmd += ["--resume", "--max-time", "1e9"] if resume else ["--overwrite"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"torchrun failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def tokens_per_s(log: list[dict], batch: int, block: int) -> float:
    """Tokens per second between the second log line and the last: start-up and compilation left out."""
    first, last = log[1], log[-1]
    return (last["step"] - first["step"]) * batch * block / (last["elapsed_s"] - first["elapsed_s"])


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--gpus", type=int, default=2, help="N: the GPUs of the multi-GPU runs")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64, help="the global batch, divided among the ranks")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--runs", type=Path, default=Path("runs/ddp"))
    p.add_argument("--preset", default="shakespeare", choices=list(PRESETS))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: gloo processes, to try the script")
    add_output(p)
    args = p.parse_args()
    block = PRESETS[args.preset]["block_size"]
    rows = []
    for mode in args.modes:
        one = [train(args, args.runs / f"{mode}-1gpu-seed{s}", 1, mode, s) for s in (1, 2)]
        many = train(args, args.runs / f"{mode}-{args.gpus}gpu", args.gpus, mode, 1)
        resumed_dir = args.runs / f"{mode}-{args.gpus}gpu-resumed"
        cut = train(args, resumed_dir, args.gpus, mode, 1, stop_at=many[-1]["elapsed_s"] / 2)
        resumed = train(args, resumed_dir, args.gpus, mode, 1, resume=True)
        one_tps = tokens_per_s(one[0], args.batch_size, block)
        many_tps = tokens_per_s(many, args.batch_size, block)
        rows.append({
            "mode": mode, "gpus": args.gpus, "steps": args.steps, "global_batch": args.batch_size,
            "tokens_per_s_1gpu": one_tps, f"tokens_per_s_{args.gpus}gpu": many_tps,
            "scaling": many_tps / (args.gpus * one_tps),
            "val_loss_1gpu_seeds": [log[-1]["val_loss"] for log in one], "val_loss_ngpu": many[-1]["val_loss"],
            "resume_cut_at_step": cut[-1]["step"], "resume_final_step": resumed[-1]["step"],
            "val_loss_resumed": resumed[-1]["val_loss"],
            "checkpoints": sorted(p.name for p in resumed_dir.iterdir()),
        })
    n = args.gpus
    print_table(rows, [("mode", "mode", ""), ("1 GPU tok/s", "tokens_per_s_1gpu", ",.0f"),
                       (f"{n} GPU tok/s", f"tokens_per_s_{n}gpu", ",.0f"), ("scaling", "scaling", ".2f"),
                       ("val 1 GPU (2 seeds)", lambda r: " / ".join(f"{v:.4f}" for v in r["val_loss_1gpu_seeds"]), ""),
                       (f"val {args.gpus} GPU", "val_loss_ngpu", ".4f"), ("val resumed", "val_loss_resumed", ".4f")])
    out = args.json or result_path("train", "ddp_scaling", args.device)
    print("wrote", write_result(out, rows, args.device, env=MULTICAST_OFF))


if __name__ == "__main__":
    main()
