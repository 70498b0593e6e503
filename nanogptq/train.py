"""The training loop: AdamW, warm-up + cosine schedule, clipping, accumulation, DDP, resume.

Run on one process (`nanogptq train ...`) or several (`torchrun --nproc_per_node N -m nanogptq.cli train ...`).
A run folder holds `last/` and `best/` checkpoints and `metrics.jsonl`; `--resume` continues from `last/`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from nanogptq.checkpoint import load_checkpoint, load_resume_state, read_meta, save_checkpoint
from nanogptq.data import TokenData, file_dataset_path, get_batch, prepare_data
from nanogptq.model import GPT, PRESETS, preset_config


@dataclass
class TrainConfig:
    out_dir: str = "runs/tiny-shakespeare"
    dataset: str = "shakespeare"
    tokenizer: str = "char"
    vocab_size: int = 512  # bpe only
    data_dir: str | None = None
    val_fraction: float = 0.1
    split_seed: int = 1337
    split: str = "chunks"  # or "tail": nanoGPT's split, the last val_fraction of the text
    preset: str = "tiny"
    dropout: float | None = None  # None: the preset's
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 2000
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # "cosine", or "bitnet": cosine with weight decay dropped halfway
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_batches: int = 20
    seed: int = 1337
    device: str = "auto"
    compile: bool = False
    resume: bool = False
    overwrite: bool = False  # a new run may replace the checkpoints of an old one in out_dir
    init_from: str | None = None
    qat_config: str | None = None
    qat_start: float = 0.0  # fraction of max_steps trained in float before the QAT quantizers switch on
    qat_ramp: float = 0.0  # then the fraction over which their strength rises linearly from 0 to 1
    qat_restart: bool = False  # the float phase's cosine ends at the switch; warm-up + cosine begin anew there
    max_time: float | None = None  # seconds; stop (and save) when the wall-clock budget is spent
    time_schedule: bool = False  # with max_time: the cosine also follows the clock (see lr_at)
    progress: bool = True

    def __post_init__(self) -> None:
        # stored absolute, so that eval, compare and the demo find the text from any folder
        if (path := file_dataset_path(self.dataset)) is not None:
            self.dataset = f"file:{path.absolute()}"

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite non-negative number, got {value}")
        if self.warmup_steps < 0 or self.lr == 0:
            raise ValueError("--warmup-steps must be non-negative and --lr positive")
        if self.max_time is not None and not self.max_time > 0:
            raise ValueError(f"--max-time must be a positive number of seconds, got {self.max_time}")
        if self.lr_schedule not in ("cosine", "bitnet"):
            raise ValueError(f"unknown --lr-schedule {self.lr_schedule!r}; choose cosine or bitnet")
        if self.time_schedule and not self.max_time:
            raise ValueError("--time-schedule needs --max-time")
        if (self.qat_start or self.qat_ramp) and not self.qat_config:
            raise ValueError("--qat-start and --qat-ramp need --qat-config")
        if not (0 <= self.qat_start and 0 <= self.qat_ramp and self.qat_start + self.qat_ramp < 1):
            raise ValueError("--qat-start and --qat-ramp must be non-negative fractions of the run with "
                             f"qat-start + qat-ramp < 1, got {self.qat_start} and {self.qat_ramp}")
        if self.qat_restart and not self.qat_start:
            raise ValueError("--qat-restart needs --qat-start (the step where the schedule restarts)")
        if self.resume and self.init_from:
            raise ValueError("--resume and --init-from exclude each other")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# what a run's saved weights and data depend on: a resumed run keeps them
RUN_FIELDS = ("dataset", "tokenizer", "vocab_size", "val_fraction", "split_seed", "split", "preset", "init_from",
              "qat_config", "qat_start", "qat_ramp", "qat_restart")
SESSION_FIELDS = ("device", "data_dir", "progress", "compile")  # this invocation's, resumed or not


def given_fields(cfg: TrainConfig, explicit: set[str] | None) -> set[str]:
    """The settings the user gave: `explicit` (the flags parsed), or without it those differing from the defaults."""
    return explicit if explicit is not None else {f.name for f in fields(cfg) if getattr(cfg, f.name) != f.default}


def resumed_config(cfg: TrainConfig, explicit: set[str] | None = None) -> TrainConfig:
    """The run's saved settings (out_dir/last), with those the user gave again (given_fields) overriding them,
    e.g. a larger max_steps to extend the run, and this session's device, data folder and progress bar. The
    data and model settings cannot change."""
    saved = TrainConfig.from_dict(read_meta(Path(cfg.out_dir) / "last")["train"])
    for name in sorted(given_fields(cfg, explicit) | set(SESSION_FIELDS)):
        value = getattr(cfg, name)
        if name in RUN_FIELDS and value != getattr(saved, name):
            raise ValueError(f"--{name.replace('_', '-')} {value} differs from the resumed run's "
                             f"{getattr(saved, name)}: a resumed run keeps its data and model settings")
        setattr(saved, name, value)
    saved.resume, saved.overwrite, saved.out_dir = True, False, cfg.out_dir
    return saved


def lr_at(step: int, cfg: TrainConfig, elapsed: float = 0.0) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr at max_steps.

    With time_schedule and max_time, the decay is at whichever is further along, steps or the clock
    (elapsed / max_time): a machine too slow to reach max_steps in its budget still ends at min_lr.
    With qat_restart the run is two such schedules, [0, switch) in float and [switch, max_steps) quantized,
    as if the QAT phase were a fine-tuning run of its own (the --init-from workflow in one run).
    """
    begin, end = 0, cfg.max_steps
    if cfg.qat_restart:
        switch = round(cfg.qat_start * cfg.max_steps)
        begin, end = (0, switch) if step < switch else (switch, cfg.max_steps)
    step -= begin
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, end - begin - cfg.warmup_steps))
    if cfg.time_schedule and cfg.max_time:
        progress = max(progress, min(1.0, elapsed / cfg.max_time))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def weight_decay_at(step: int, cfg: TrainConfig) -> float:
    # BitNet b1.58 training advice: no weight decay in the second half of training
    if cfg.lr_schedule == "bitnet" and step >= cfg.max_steps // 2:
        return 0.0
    return cfg.weight_decay


def make_optimizer(model: GPT, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # matrices and embeddings; not norms or biases
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(name).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available here")
    return name


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[DistInfo, str]:
    """Join the torchrun process group if launched by torchrun; NCCL on GPUs, gloo on CPU."""
    if "RANK" not in os.environ:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)
    if device.startswith("cuda"):
        device = f"cuda:{info.local_rank}"
        torch.cuda.set_device(device)
    return info, device


@torch.no_grad()
def estimate_loss(model: GPT, data: np.ndarray, cfg: TrainConfig, block_size: int, device: str, autocast) -> float:
    """Mean loss on a fixed set of batches (the same windows at every evaluation)."""
    model.eval()
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(cfg.eval_batches):
        x, y = get_batch(data, cfg.batch_size, block_size, gen, device)
        with autocast:
            _, loss = model(x, y)
        losses.append(loss.item())
    model.train()
    return float(np.mean(losses))


def _rng_state(gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "batch": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["batch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def build_model(cfg: TrainConfig, data: TokenData) -> GPT:
    overrides = {} if cfg.dropout is None else {"dropout": cfg.dropout}
    if cfg.init_from:
        ckpt = load_checkpoint(cfg.init_from)
        if ckpt.meta.get("quantization"):
            raise ValueError(f"--init-from {cfg.init_from}: a quantized checkpoint cannot be trained further")
        if ckpt.tokenizer.to_dict() != data.tokenizer.to_dict():
            raise ValueError(f"--init-from {cfg.init_from}: its tokenizer differs from this run's data")
        model = ckpt.model
        if cfg.dropout is not None:
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = cfg.dropout
    else:
        model = GPT(preset_config(cfg.preset, data.tokenizer.vocab_size, **overrides))
    if cfg.qat_config:
        from nanogptq.quant.qat import apply_qat, load_qat_config

        apply_qat(model, load_qat_config(cfg.qat_config))
    return model


def train(cfg: TrainConfig, explicit: set[str] | None = None) -> Path:
    """Train (or resume) a run; returns the run folder. Only rank 0 writes files. On resume, `explicit` names
    the settings given again, which override the saved ones (`resumed_config`)."""
    cfg.validate()
    out = Path(cfg.out_dir)
    if cfg.resume:
        cfg = resumed_config(cfg, explicit)
    elif not cfg.overwrite and any((out / name).exists() for name in ("last", "best")):
        raise ValueError(f"{out} already holds a run: continue it with --resume, or replace it with --overwrite")
    if cfg.init_from and not cfg.resume:
        # a fine-tuned model keeps the shape it was trained with: the run records its preset, not --preset's
        init_preset = read_meta(cfg.init_from).get("train", {}).get("preset", cfg.preset)
        if "preset" in given_fields(cfg, explicit) and cfg.preset != init_preset:
            raise ValueError(f"--preset {cfg.preset} differs from --init-from {cfg.init_from}'s preset "
                             f"{init_preset}: a fine-tuned model keeps its shape")
        cfg.preset = init_preset
    device = pick_device(cfg.device)
    dist_info, device = init_distributed(device)

    torch.manual_seed(cfg.seed + dist_info.rank)
    data = prepare_data(cfg.dataset, cfg.tokenizer, cfg.vocab_size, data_dir=cfg.data_dir,
                        val_fraction=cfg.val_fraction, seed=cfg.split_seed, split=cfg.split)
    model = build_model(cfg, data).to(device)
    for split, tokens in (("training", data.train), ("validation", data.val)):
        if len(tokens) <= model.config.block_size:  # a batch window is block_size + 1 tokens
            raise ValueError(f"the {split} split holds {len(tokens)} tokens, too few for the model's context of "
                             f"{model.config.block_size}: use a longer text (or a "
                             f"{'smaller' if split == 'training' else 'larger'} --val-fraction)")
    is_cuda = device.startswith("cuda")
    optimizer = make_optimizer(model, cfg, fused=is_cuda)
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * dist_info.rank)
    step, best_val, elapsed_before, resumed_val = 0, float("inf"), 0.0, None
    if cfg.resume:
        state = load_resume_state(out / "last")
        resumed = load_checkpoint(out / "last")
        model.load_state_dict(resumed.model.state_dict())
        resumed_val = resumed.meta.get("metrics", {}).get("val_loss")  # shown in the bar until an evaluation
        optimizer.load_state_dict(state["optimizer"])
        step, best_val = int(state["step"]), float(state["best_val"])
        elapsed_before = float(state.get("elapsed_s", 0.0))  # --max-time counts the whole run
        _set_rng_state(state["rng"][min(dist_info.rank, len(state["rng"]) - 1)], gen)

    # 16-to-1.58-bit: lambda of the QAT quantizers follows the step (None: always fully quantized)
    strength = None
    if cfg.qat_config and (cfg.qat_start or cfg.qat_ramp):
        from nanogptq.quant.qat import qat_strength, set_qat_strength

        strength = qat_strength(step, cfg.max_steps, cfg.qat_start, cfg.qat_ramp)
        set_qat_strength(model, strength)

    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if dist_info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist_info.local_rank] if is_cuda else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if is_cuda else contextlib.nullcontext()
    block_size = raw_model.config.block_size
    meta = {
        "model": raw_model.config.to_dict(),
        "tokenizer": data.tokenizer.to_dict(),
        "data": {"dataset": cfg.dataset, "tokenizer": cfg.tokenizer, "vocab_size": cfg.vocab_size,
                 "val_fraction": cfg.val_fraction, "seed": cfg.split_seed, "split": cfg.split,
                 "text_sha256": data.text_sha256},
        "train": asdict(cfg),
        "quantization": None,
        "qat": getattr(raw_model, "qat_config", None),
        "num_params": raw_model.num_params(non_embedding=False),
    }

    saved_step = step

    def save(name: str, metrics: dict) -> None:
        nonlocal saved_step
        saved_step = step
        rng = [_rng_state(gen)]
        if dist_info.world_size > 1:
            rng = [None] * dist_info.world_size
            dist.all_gather_object(rng, _rng_state(gen))
        if not dist_info.is_main:
            return
        resume = {"optimizer": optimizer.state_dict(), "step": step, "best_val": best_val, "rng": rng,
                  "elapsed_s": metrics["elapsed_s"]}
        save_checkpoint(out / name, raw_model, {**meta, "metrics": metrics}, resume_state=resume)

    log_file = None
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        # a resumed run continues its log; a new run in an old folder starts its own (it replaces the checkpoints too)
        log_file = open(out / "metrics.jsonl", "a" if cfg.resume else "w")
    tokens_per_step = cfg.batch_size * block_size * cfg.grad_accum * dist_info.world_size
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (cfg.progress and dist_info.is_main),
               desc="train", dynamic_ncols=True)
    start = time.time()
    last_val, train_loss, t_last, tok_s = resumed_val or float("nan"), float("nan"), time.time(), 0.0
    model.train()
    elapsed = elapsed_before
    try:
        while step < cfg.max_steps:
            lr = lr_at(step, cfg, elapsed)
            if strength is not None:
                s = qat_strength(step, cfg.max_steps, cfg.qat_start, cfg.qat_ramp)
                if s != strength:
                    strength = s
                    set_qat_strength(raw_model, strength)
            for i, group in enumerate(optimizer.param_groups):
                group["lr"] = lr
                if i == 0:
                    group["weight_decay"] = weight_decay_at(step, cfg)
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                x, y = get_batch(data.train, cfg.batch_size, block_size, gen, device)
                sync = dist_info.world_size == 1 or micro == cfg.grad_accum - 1
                ctx = contextlib.nullcontext() if sync else model.no_sync()
                with ctx, autocast:
                    _, loss = model(x, y)
                    loss = loss / cfg.grad_accum
                with ctx:
                    loss.backward()
                loss_sum += loss.item()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = elapsed_before + time.time() - start
            if dist_info.world_size > 1:
                # the clock is averaged with the loss: every rank then takes the same time-scheduled learning
                # rate and stops at the same step under --max-time (a rank stopping alone would hang the others)
                t = torch.tensor([loss_sum, elapsed], device=device, dtype=torch.float64)
                dist.all_reduce(t)  # a sum: gloo has no average
                loss_sum, elapsed = (t / dist_info.world_size).tolist()
            train_loss = loss_sum
            if not math.isfinite(train_loss):
                kept = f"{out / 'last'} keeps step {saved_step}, the last one saved" if saved_step else \
                    "nothing was saved"
                raise ValueError(f"the training loss became {train_loss} at step {step}: the run diverged (try a "
                                 f"lower --lr); {kept}")
            now = time.time()
            tok_s = tokens_per_step / max(now - t_last, 1e-9)
            t_last = now
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", val=f"{last_val:.3f}", tok_s=f"{tok_s:,.0f}")

            out_of_time = cfg.max_time is not None and elapsed >= cfg.max_time
            if step % cfg.eval_interval == 0 or step == cfg.max_steps or out_of_time:
                last_val = estimate_loss(raw_model, data.val, cfg, block_size, device, autocast)
                record = {"step": step, "train_loss": train_loss, "val_loss": last_val, "lr": lr,
                          "tokens_per_s": tok_s, "elapsed_s": round(elapsed, 2)}
                if strength is not None:
                    record["qat_strength"] = strength
                # a model not yet fully quantized is not a QAT result: it never becomes the best checkpoint
                if last_val < best_val and strength in (None, 1.0):
                    best_val = last_val
                    save("best", {**record, "best_val_loss": best_val})
                save("last", {**record, "best_val_loss": best_val})
                if log_file:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                    if not cfg.progress:  # no bar: a line per evaluation, so a log shows the run's course
                        print(f"step {step}: train loss {train_loss:.4f}, val loss {last_val:.4f}, "
                              f"{tok_s:,.0f} tokens/s", file=sys.stderr, flush=True)
                t_last = time.time()  # keep evaluation time out of tokens/s
            if out_of_time:
                break
    except KeyboardInterrupt:
        # keep the steps since the last save: --resume continues from here (one process only: under DDP the
        # ranks are not at a point where they could gather their states together)
        if dist_info.world_size == 1 and step > saved_step:
            save("last", {"step": step, "train_loss": train_loss, "val_loss": None, "lr": lr_at(step, cfg, elapsed),
                          "tokens_per_s": tok_s, "elapsed_s": round(elapsed, 2),
                          "best_val_loss": best_val if math.isfinite(best_val) else None})
        if dist_info.is_main and (out / "last").exists():
            print(f"\ninterrupted at step {step}: {out / 'last'} holds step {saved_step}; continue with --resume",
                  file=sys.stderr)
        raise
    finally:
        bar.close()
        if log_file:
            log_file.close()
    if dist_info.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out
