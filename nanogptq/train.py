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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from nanogptq.checkpoint import load_checkpoint, load_resume_state, read_meta, save_checkpoint
from nanogptq.config import StrictConfig
from nanogptq.data import TokenData, file_dataset_path, get_batch, prepare_data
from nanogptq.model import GPT, PRESETS, preset_config
from nanogptq.quant.qat import apply_qat, load_qat_config, qat_strength, set_qat_strength


@dataclass
class TrainConfig(StrictConfig):
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
        # Not StrictConfig's, which would call validate(): validate() checks the flags of one invocation, and
        # train() calls it first. A config read back from a checkpoint is a run's state, which it may refuse as
        # flags (a resumed fine-tuning run saves resume=True beside init_from). from_dict still refuses unknown
        # keys and a newer version.
        # The text's path is stored absolute, so that eval, compare and the demo find it from any folder.
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
    last = Path(cfg.out_dir) / "last"
    saved = TrainConfig.from_dict(read_meta(last)["train"], source=f"{last / 'config.json'}, \"train\" entry")
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


# NVLink multicast (NVLS) stays off: on hosts whose GPUs are shared, using it can put the GPUs out of service.
# NCCL and PyTorch's symmetric memory read these when the process group starts, so they are set just before.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def init_distributed(device: str) -> tuple[DistInfo, str]:
    """Join the torchrun process group if launched by torchrun; NCCL on GPUs, gloo on CPU."""
    if "RANK" not in os.environ:
        return DistInfo(), device
    os.environ.update(MULTICAST_OFF)
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
        apply_qat(model, load_qat_config(cfg.qat_config))
    return model


def check_splits_fit(data: TokenData, block_size: int) -> None:
    """Refuse, before any step, a split too short for one batch window (block_size + 1 tokens)."""
    for split, tokens in (("training", data.train), ("validation", data.val)):
        if len(tokens) <= block_size:
            raise ValueError(f"the {split} split holds {len(tokens)} tokens, too few for the model's context of "
                             f"{block_size}: use a longer text (or a "
                             f"{'smaller' if split == 'training' else 'larger'} --val-fraction)")


def settle_config(cfg: TrainConfig, explicit: set[str] | None) -> TrainConfig:
    """The settings the run trains with: the flags checked, the saved ones on resume (`resumed_config`), the
    --init-from checkpoint's preset for a fine-tuning run. Refuses a new run over an old one without --overwrite."""
    cfg.validate()
    out = Path(cfg.out_dir)
    if cfg.resume:
        cfg = resumed_config(cfg, explicit)
    elif not cfg.overwrite and any((out / name).exists() for name in ("last", "best")):
        raise ValueError(f"{out} already holds a run: continue it with --resume, or replace it with --overwrite")
    if cfg.init_from and not cfg.resume:
        # a fine-tuned model keeps the shape it was trained with: the run records its preset, not --preset's
        init_train = read_meta(cfg.init_from).get("train")
        init_preset = cfg.preset if init_train is None else TrainConfig.from_dict(
            init_train, source=f"{Path(cfg.init_from) / 'config.json'}, \"train\" entry").preset
        if "preset" in given_fields(cfg, explicit) and cfg.preset != init_preset:
            raise ValueError(f"--preset {cfg.preset} differs from --init-from {cfg.init_from}'s preset "
                             f"{init_preset}: a fine-tuned model keeps its shape")
        cfg.preset = init_preset
    return cfg


@dataclass
class RunState:
    """Where a run stands. The loop's parts advance it; `last/` saves step, best_val and elapsed for --resume."""

    step: int = 0
    best_val: float = math.inf
    elapsed: float = 0.0  # seconds trained over the whole run, resumes included: --max-time counts them all
    saved_step: int = 0  # the step that last/ holds
    strength: float | None = None  # the QAT quantizers' strength while a schedule moves it; None: no schedule
    train_loss: float = math.nan
    val_loss: float = math.nan  # the latest evaluation's, shown in the bar
    tokens_per_s: float = 0.0


@dataclass
class Run:
    """One process's part of a training run, built by `start_run`."""

    cfg: TrainConfig
    out: Path
    dist: DistInfo
    device: str
    data: TokenData
    raw_model: GPT  # the module evaluated and saved
    model: torch.nn.Module  # the one stepped: raw_model, compiled and/or wrapped in DDP
    optimizer: torch.optim.AdamW
    batch_gen: torch.Generator  # draws the training batches; saved per rank, so a resumed run draws the same ones
    autocast: contextlib.AbstractContextManager
    meta: dict  # config.json's entries, the metrics aside
    state: RunState

    @property
    def block_size(self) -> int:
        return self.raw_model.config.block_size


def restore_state(last: Path, model: GPT, optimizer: torch.optim.Optimizer, batch_gen: torch.Generator,
                  rank: int) -> RunState:
    """Load the weights, optimizer and random state saved in `last`; returns where the run stood."""
    resume = load_resume_state(last)
    ckpt = load_checkpoint(last)
    model.load_state_dict(ckpt.model.state_dict())
    optimizer.load_state_dict(resume["optimizer"])
    # resumed on more processes than saved it, the extra ranks take the last saved state
    _set_rng_state(resume["rng"][min(rank, len(resume["rng"]) - 1)], batch_gen)
    return RunState(step=int(resume["step"]), best_val=float(resume["best_val"]),
                    elapsed=float(resume.get("elapsed_s", 0.0)),
                    val_loss=ckpt.meta.get("metrics", {}).get("val_loss") or math.nan)


def run_meta(cfg: TrainConfig, model: GPT, data: TokenData) -> dict:
    """The config.json entries of the run's checkpoints; each save adds its metrics."""
    return {
        "model": model.config.to_dict(),
        "tokenizer": data.tokenizer.to_dict(),
        "data": {"dataset": cfg.dataset, "tokenizer": cfg.tokenizer, "vocab_size": cfg.vocab_size,
                 "val_fraction": cfg.val_fraction, "seed": cfg.split_seed, "split": cfg.split,
                 "text_sha256": data.text_sha256},
        "train": cfg.to_dict(),
        "quantization": None,
        "qat": getattr(model, "qat_config", None),
        "num_params": model.num_params(non_embedding=False),
    }


def start_run(cfg: TrainConfig) -> Run:
    """Join the process group (under torchrun), then build the data, model, optimizer and state, restored from
    `last/` on resume. The order is fixed: the seeds come before the model's initial weights."""
    dist_info, device = init_distributed(pick_device(cfg.device))
    torch.manual_seed(cfg.seed + dist_info.rank)
    data = prepare_data(cfg.dataset, cfg.tokenizer, cfg.vocab_size, data_dir=cfg.data_dir,
                        val_fraction=cfg.val_fraction, seed=cfg.split_seed, split=cfg.split)
    raw_model = build_model(cfg, data).to(device)
    check_splits_fit(data, raw_model.config.block_size)
    is_cuda = device.startswith("cuda")
    optimizer = make_optimizer(raw_model, cfg, fused=is_cuda)
    batch_gen = torch.Generator().manual_seed(cfg.seed + 1000 * dist_info.rank)
    out = Path(cfg.out_dir)
    state = restore_state(out / "last", raw_model, optimizer, batch_gen, dist_info.rank) if cfg.resume else RunState()
    state.saved_step = state.step
    if cfg.qat_config and (cfg.qat_start or cfg.qat_ramp):
        state.strength = qat_strength(state.step, cfg.max_steps, cfg.qat_start, cfg.qat_ramp)
        set_qat_strength(raw_model, state.strength)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if dist_info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist_info.local_rank] if is_cuda else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if is_cuda else contextlib.nullcontext()
    return Run(cfg, out, dist_info, device, data, raw_model, model, optimizer, batch_gen, autocast,
               run_meta(cfg, raw_model, data), state)


def follow_qat_schedule(run: Run) -> None:
    """Give the QAT quantizers this step's strength, when --qat-start / --qat-ramp schedule it."""
    state = run.state
    if state.strength is None:
        return
    strength = qat_strength(state.step, run.cfg.max_steps, run.cfg.qat_start, run.cfg.qat_ramp)
    if strength != state.strength:  # most steps leave it as it was: no walk over the model's modules
        state.strength = strength
        set_qat_strength(run.raw_model, strength)


def set_step_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if i == 0:  # the decayed group (make_optimizer); the other keeps none
            group["weight_decay"] = weight_decay


def train_step(run: Run) -> float:
    """One optimizer step over grad_accum micro-batches, gradients clipped; returns this rank's loss."""
    cfg, model = run.cfg, run.model
    loss_sum = 0.0
    for micro in range(cfg.grad_accum):
        x, y = get_batch(run.data.train, cfg.batch_size, run.block_size, run.batch_gen, run.device)
        # under DDP the gradients are all-reduced once, in the last micro-batch's backward
        sync = run.dist.world_size == 1 or micro == cfg.grad_accum - 1
        with contextlib.nullcontext() if sync else model.no_sync():
            with run.autocast:
                _, loss = model(x, y)
                loss = loss / cfg.grad_accum
            loss.backward()
        loss_sum += loss.item()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum


def average_over_ranks(run: Run, loss: float, elapsed: float) -> tuple[float, float]:
    """The loss and the clock, averaged over the ranks. The clock too: every rank then takes the same
    time-scheduled learning rate and stops at the same step under --max-time (a rank stopping alone would hang
    the others in their next all-reduce)."""
    if run.dist.world_size == 1:
        return loss, elapsed
    t = torch.tensor([loss, elapsed], device=run.device, dtype=torch.float64)
    dist.all_reduce(t)  # a sum: gloo has no average
    loss, elapsed = (t / run.dist.world_size).tolist()
    return loss, elapsed


def stop_if_diverged(run: Run) -> None:
    state = run.state
    if math.isfinite(state.train_loss):
        return
    kept = f"{run.out / 'last'} keeps step {state.saved_step}, the last one saved" if state.saved_step else \
        "nothing was saved"
    raise ValueError(f"the training loss became {state.train_loss} at step {state.step}: the run diverged (try a "
                     f"lower --lr); {kept}")


def save_run(run: Run, name: str, metrics: dict) -> None:
    """Write checkpoint `name` with the state --resume needs. Every rank calls it (their random states are
    gathered); rank 0 writes."""
    state = run.state
    state.saved_step = state.step
    rng = [_rng_state(run.batch_gen)]
    if run.dist.world_size > 1:
        rng = [None] * run.dist.world_size
        dist.all_gather_object(rng, _rng_state(run.batch_gen))
    if not run.dist.is_main:
        return
    resume = {"optimizer": run.optimizer.state_dict(), "step": state.step, "best_val": state.best_val, "rng": rng,
              "elapsed_s": metrics["elapsed_s"]}
    save_checkpoint(run.out / name, run.raw_model, {**run.meta, "metrics": metrics}, resume_state=resume)


def evaluate_and_save(run: Run, lr: float, log: TextIO | None) -> None:
    """Validation loss; `best/` when it is the lowest yet, `last/` always, and a line in metrics.jsonl."""
    cfg, state = run.cfg, run.state
    state.val_loss = estimate_loss(run.raw_model, run.data.val, cfg, run.block_size, run.device, run.autocast)
    record = {"step": state.step, "train_loss": state.train_loss, "val_loss": state.val_loss, "lr": lr,
              "tokens_per_s": state.tokens_per_s, "elapsed_s": round(state.elapsed, 2)}
    if state.strength is not None:
        record["qat_strength"] = state.strength
    # a model not yet fully quantized is not a QAT result: it never becomes the best checkpoint
    if state.val_loss < state.best_val and state.strength in (None, 1.0):
        state.best_val = state.val_loss
        save_run(run, "best", {**record, "best_val_loss": state.best_val})
    save_run(run, "last", {**record, "best_val_loss": state.best_val})
    if log:
        log.write(json.dumps(record) + "\n")
        log.flush()
        if not cfg.progress:  # no bar: a line per evaluation, so a log shows the run's course
            print(f"step {state.step}: train loss {state.train_loss:.4f}, val loss {state.val_loss:.4f}, "
                  f"{state.tokens_per_s:,.0f} tokens/s", file=sys.stderr, flush=True)


def save_interrupted(run: Run) -> None:
    """On Ctrl-C, keep the steps since the last save: --resume continues from there. One process only: under
    DDP the ranks are not at a point where they could gather their states together."""
    state = run.state
    if run.dist.world_size == 1 and state.step > state.saved_step:
        save_run(run, "last", {"step": state.step, "train_loss": state.train_loss, "val_loss": None,
                               "lr": lr_at(state.step, run.cfg, state.elapsed), "tokens_per_s": state.tokens_per_s,
                               "elapsed_s": round(state.elapsed, 2),
                               "best_val_loss": state.best_val if math.isfinite(state.best_val) else None})
    if run.dist.is_main and (run.out / "last").exists():
        print(f"\ninterrupted at step {state.step}: {run.out / 'last'} holds step {state.saved_step}; continue "
              "with --resume", file=sys.stderr)


def open_metrics_log(run: Run) -> TextIO | None:
    """metrics.jsonl, on rank 0 only. A resumed run continues its log; a new run in an old folder starts its
    own (it replaces the checkpoints too)."""
    if not run.dist.is_main:
        return None
    run.out.mkdir(parents=True, exist_ok=True)
    return open(run.out / "metrics.jsonl", "a" if run.cfg.resume else "w")


def train_loop(run: Run) -> None:
    """Step until max_steps or max_time, evaluating and saving every eval_interval steps and at the end."""
    cfg, state = run.cfg, run.state
    log = open_metrics_log(run)
    tokens_per_step = cfg.batch_size * run.block_size * cfg.grad_accum * run.dist.world_size
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not (cfg.progress and run.dist.is_main),
               desc="train", dynamic_ncols=True)
    start, elapsed_before = time.time(), state.elapsed
    t_last = time.time()
    run.model.train()
    try:
        while state.step < cfg.max_steps:
            lr = lr_at(state.step, cfg, state.elapsed)
            follow_qat_schedule(run)
            set_step_hyperparameters(run.optimizer, lr, weight_decay_at(state.step, cfg))
            loss = train_step(run)
            state.step += 1
            state.train_loss, state.elapsed = average_over_ranks(run, loss, elapsed_before + time.time() - start)
            stop_if_diverged(run)
            now = time.time()
            state.tokens_per_s, t_last = tokens_per_step / max(now - t_last, 1e-9), now
            bar.update(1)
            bar.set_postfix(loss=f"{state.train_loss:.3f}", lr=f"{lr:.2e}", val=f"{state.val_loss:.3f}",
                            tok_s=f"{state.tokens_per_s:,.0f}")
            out_of_time = cfg.max_time is not None and state.elapsed >= cfg.max_time
            if state.step % cfg.eval_interval == 0 or state.step == cfg.max_steps or out_of_time:
                evaluate_and_save(run, lr, log)
                t_last = time.time()  # keep evaluation time out of tokens/s
            if out_of_time:
                break
    except KeyboardInterrupt:
        save_interrupted(run)
        raise
    finally:
        bar.close()
        if log:
            log.close()


def train(cfg: TrainConfig, explicit: set[str] | None = None) -> Path:
    """Train (or resume) a run; returns the run folder. Only rank 0 writes files. On resume, `explicit` names
    the settings given again, which override the saved ones (`resumed_config`)."""
    run = start_run(settle_config(cfg, explicit))
    train_loop(run)
    if run.dist.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return run.out
