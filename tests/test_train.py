"""End-to-end: training, resuming after SIGKILL, DDP on CPU with gloo, and the CLI's errors."""

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from nanogptq.checkpoint import load_checkpoint, read_meta
from nanogptq.cli import build_parser
from nanogptq.train import MULTICAST_OFF, TrainConfig, init_distributed, lr_at, train

TINY = ["--preset", "tiny", "--batch-size", "8", "--eval-batches", "2", "--no-progress"]


def cli(*args, check=True, timeout=240, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "nanogptq.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-2000:])
    return proc


def val_losses(run: Path) -> list[float]:
    return [json.loads(line)["val_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    assert lr_at(0, cfg) < lr_at(9, cfg) < lr_at(10, cfg) + 1e-12
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    assert lr_at(55, cfg) == pytest.approx(5.5e-4)


def test_time_schedule_decays_by_the_clock_when_steps_lag():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100, max_time=60.0, time_schedule=True)
    assert lr_at(20, cfg, elapsed=30.0) == pytest.approx(5.5e-4)  # half the time gone, a tenth of the steps
    assert lr_at(20, cfg, elapsed=60.0) == pytest.approx(1e-4)
    assert lr_at(55, cfg, elapsed=1.0) == pytest.approx(5.5e-4)  # steps ahead of the clock: steps rule
    assert lr_at(20, TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100, max_time=60.0), 60.0) > 9e-4
    with pytest.raises(ValueError, match="--time-schedule needs --max-time"):
        TrainConfig(time_schedule=True).validate()


def test_training_lowers_loss_and_writes_checkpoints(tmp_path, text_file):
    cfg = TrainConfig(dataset=f"file:{text_file}", out_dir=str(tmp_path / "run"), max_steps=60, batch_size=8,
                      eval_interval=20, eval_batches=2, lr=3e-3, warmup_steps=5, progress=False)
    run = train(cfg)
    losses = val_losses(run)
    assert len(losses) == 3 and losses[-1] < losses[0] and losses[-1] < 1.0  # untrained: ln(30) = 3.4
    ck = load_checkpoint(run / "best")
    assert ck.meta["metrics"]["best_val_loss"] == pytest.approx(min(losses))
    assert ck.meta["data"]["dataset"] == f"file:{text_file}"
    assert ck.meta["data"]["text_sha256"] == hashlib.sha256(text_file.read_bytes()).hexdigest()
    # a new run in the same folder: refused unless --overwrite, and then it logs only itself
    cfg.max_steps = 20
    with pytest.raises(ValueError, match="already holds a run: continue it with --resume, or replace it"):
        train(cfg)
    assert len(val_losses(run)) == 3
    cfg.overwrite = True
    train(cfg)
    assert len(val_losses(run)) == 1


def test_a_relative_text_path_is_stored_absolute(tmp_path, text_file, monkeypatch):
    from nanogptq.checkpoint import checkpoint_data

    monkeypatch.chdir(text_file.parent)
    run = train(TrainConfig(dataset=f"file:{text_file.name}", out_dir=str(tmp_path / "run"), max_steps=2,
                            batch_size=4, eval_interval=2, eval_batches=1, progress=False))
    ck = load_checkpoint(run / "best")
    assert ck.meta["data"]["dataset"] == f"file:{text_file.resolve()}"
    monkeypatch.chdir(tmp_path / "run")  # eval, compare and the demo read the text from wherever they run
    assert len(checkpoint_data(ck).val) > 0


def small_run(tmp_path, text_file, **kw) -> TrainConfig:
    return TrainConfig(dataset=f"file:{text_file}", out_dir=str(tmp_path / "run"), batch_size=8, eval_interval=10,
                       eval_batches=2, lr=3e-3, warmup_steps=5, progress=False, **kw)


def test_train_config_reads_back_strictly():
    cfg = TrainConfig(lr=1e-3, max_time=60.0, qat_config="x.json")
    saved = cfg.to_dict()
    assert saved["version"] == TrainConfig.VERSION and TrainConfig.from_dict(saved) == cfg
    del saved["version"]  # written before configs had a version: read as version 1
    assert TrainConfig.from_dict(saved) == cfg
    with pytest.raises(ValueError, match=r"^run/last: unknown key 'learning_rate' \(known: .*\blr\b"):
        TrainConfig.from_dict({**saved, "learning_rate": 0.1}, source="run/last")
    with pytest.raises(ValueError, match="version 2; this nanogptq reads TrainConfig version 1 or older"):
        TrainConfig.from_dict({**saved, "version": 2})
    # a resumed fine-tuning run saves resume and init_from together: its state reads back, though as flags
    # validate() refuses the pair
    resumed = TrainConfig.from_dict({**saved, "resume": True, "init_from": "base/best"})
    with pytest.raises(ValueError, match="--resume and --init-from exclude each other"):
        resumed.validate()


def test_resume_refuses_a_saved_config_with_an_unknown_key(tmp_path, text_file):
    run = train(small_run(tmp_path, text_file, max_steps=10))
    config = run / "last" / "config.json"
    meta = json.loads(config.read_text())
    meta["train"]["learning_rate"] = 0.1  # a hand edit with a typo: dropping it would resume with lr unchanged
    config.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=re.escape(f"{config}, \"train\" entry: unknown key 'learning_rate'")):
        train(TrainConfig(out_dir=str(run), resume=True, max_steps=20, progress=False),
              explicit={"out_dir", "resume", "max_steps"})
    assert read_meta(run / "last")["metrics"]["step"] == 10


def test_resume_keeps_the_runs_settings_and_takes_the_flags_given(tmp_path, text_file):
    run = train(small_run(tmp_path, text_file, max_steps=10))
    # as `nanogptq train --resume --out-dir RUN --max-steps 20` parses: the flags given are the explicit ones
    resumed = TrainConfig(out_dir=str(run), resume=True, max_steps=20, progress=False)
    train(resumed, explicit={"out_dir", "resume", "max_steps"})
    meta = read_meta(run / "last")
    assert meta["metrics"]["step"] == 20
    assert meta["train"]["max_steps"] == 20 and meta["train"]["lr"] == 3e-3 and meta["train"]["batch_size"] == 8
    assert meta["train"]["dataset"] == f"file:{text_file}"  # not the default, which the flags left out
    with pytest.raises(ValueError, match="--preset small differs from the resumed run's tiny"):
        train(TrainConfig(out_dir=str(run), resume=True, preset="small"), explicit={"out_dir", "resume", "preset"})


def test_interrupt_saves_the_steps_done_and_resume_continues(tmp_path, text_file, monkeypatch, capsys):
    import nanogptq.train as train_module

    real, calls = train_module.get_batch, []

    def get_batch(*args, **kw):  # steps 1-10 (calls 1-10), the evaluation at 10 (11, 12), steps 11-13
        calls.append(1)
        if len(calls) == 16:  # Ctrl-C during step 14
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(train_module, "get_batch", get_batch)
    cfg = small_run(tmp_path, text_file, max_steps=30)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert "interrupted at step 13" in capsys.readouterr().err
    run = Path(cfg.out_dir)
    assert read_meta(run / "last")["metrics"]["step"] == 13
    assert read_meta(run / "best")["metrics"]["step"] == 10  # evaluated checkpoints only
    monkeypatch.setattr(train_module, "get_batch", real)
    train(TrainConfig(out_dir=str(run), resume=True, progress=False), explicit={"out_dir", "resume"})
    assert read_meta(run / "last")["metrics"]["step"] == 30
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [10, 20, 30]


def test_a_diverged_run_stops_with_an_error_and_saves_nothing(tmp_path, text_file, monkeypatch):
    import nanogptq.train as train_module

    real = train_module.build_model

    def build_nan_model(cfg, data):
        model = real(cfg, data)
        model.transformer.ln_f.weight.data.fill_(float("nan"))
        return model

    monkeypatch.setattr(train_module, "build_model", build_nan_model)
    cfg = small_run(tmp_path, text_file, max_steps=20)
    with pytest.raises(ValueError, match="loss became nan at step 1: the run diverged .*; nothing was saved"):
        train(cfg)
    assert not (Path(cfg.out_dir) / "last").exists()


def test_a_text_too_short_for_the_context_fails_before_training(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("the cat sat on the mat. " * 40)  # 960 characters: a validation split under 128 tokens
    with pytest.raises(ValueError, match="validation split holds .* tokens, too few for the model's context of "
                                         r"128: use a longer text \(or a larger --val-fraction\)"):
        train(TrainConfig(dataset=f"file:{path}", out_dir=str(tmp_path / "r"), progress=False))
    assert not (tmp_path / "r" / "last").exists()


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path, text_file):
    run = tmp_path / "run"
    args = ["train", *TINY, "--dataset", f"file:{text_file}", "--out-dir", run, "--max-steps", 150,
            "--eval-interval", 5]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nanogptq.cli", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # kill once a few checkpoints have been written: the kill may land in the middle of a save
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    time.sleep(0.13)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_killed = read_meta(run / "last")["metrics"]["step"]
    assert 0 < step_killed < 150
    cli("train", "--resume", "--out-dir", run, "--max-steps", 150, "--no-progress")
    last = load_checkpoint(run / "last")
    assert last.meta["metrics"]["step"] == 150
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 150 and steps == sorted(steps)
    assert not any(p.name.endswith((".tmp", ".old")) for p in run.iterdir())


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path, text_file):
    run = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "nanogptq.cli", "train", *TINY,
         "--dataset", f"file:{text_file}", "--out-dir", str(run), "--max-steps", "60", "--eval-interval", "20",
         "--lr", "3e-3", "--device", "cpu", "--batch-size", "4", "--grad-accum", "2"],  # DDP no_sync
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = val_losses(run)
    assert len(losses) == 3  # one writer: rank 1 would have doubled every line
    assert losses[-1] < losses[0] and losses[-1] < 1.0  # untrained: ln(30) = 3.4
    assert sorted(p.name for p in run.iterdir()) == ["best", "last", "metrics.jsonl"]
    assert load_checkpoint(run / "last").meta["metrics"]["step"] == 60


def test_joining_a_process_group_turns_nvlink_multicast_off(monkeypatch):
    """Under torchrun the process sets NCCL's and PyTorch's multicast switches off before the group starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name in MULTICAST_OFF:
        monkeypatch.delenv(name, raising=False)
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    info, device = init_distributed("cpu")
    try:
        assert (info.rank, info.world_size, device) == (0, 1, "cpu")
        assert {name: os.environ.get(name) for name in MULTICAST_OFF} == MULTICAST_OFF
    finally:
        dist.destroy_process_group()


def test_every_multi_gpu_launcher_keeps_nvlink_multicast_off():
    """A script that starts torchrun builds its environment with the three switches set: a shell script names
    them, a Python one takes nanogptq.train.MULTICAST_OFF into the environment it passes."""
    root = Path(__file__).parent.parent
    launchers = [p for p in [root / "Makefile", *sorted((root / "benchmarks").iterdir())]
                 if p.is_file() and "torchrun" in p.read_text()]
    assert launchers  # benchmarks/ddp_scaling.py starts torchrun
    for path in launchers:
        text = path.read_text()
        if path.suffix == ".py":
            assert "**MULTICAST_OFF" in text, f"{path.name} starts torchrun without MULTICAST_OFF in its env"
        else:
            missing = [name for name in MULTICAST_OFF if name not in text]
            assert not missing, f"{path.name} starts torchrun without {missing}"


def test_ddp_ranks_stop_together_on_the_clock(tmp_path, text_file):
    """--max-time with DDP: the ranks share one clock, so they stop at the same step instead of one rank
    waiting forever in the next all-reduce."""
    run = tmp_path / "ddp-time"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "nanogptq.cli", "train", *TINY,
         "--dataset", f"file:{text_file}", "--out-dir", str(run), "--max-steps", "100000", "--eval-interval",
         "1000", "--max-time", "3", "--time-schedule", "--warmup-steps", "0", "--device", "cpu"],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = load_checkpoint(run / "last").meta["metrics"]
    assert 0 < meta["step"] < 100000 and meta["elapsed_s"] >= 3
    assert meta["lr"] < 5e-4  # peak 2e-3: the clock had decayed the learning rate nearly to --min-lr 2e-4


@pytest.mark.parametrize("args,message", [
    (["train", "--max-steps", "-5"], "--max-steps must be positive"),
    (["train", "--preset", "huge"], "unknown preset 'huge'"),
    (["train", "--dataset", "wikipedia"], "unknown dataset 'wikipedia'"),
    (["sample", "no/such/ckpt"], "no such checkpoint folder"),
    (["train", "--device", "tpu"], "unknown --device 'tpu'"),
    (["train", "--lr", "inf"], "--lr must be a finite non-negative number"),
    (["train", "--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
])
def test_cli_errors_are_one_line(args, message, tmp_path):
    # in an empty folder: the default --out-dir (runs/tiny-shakespeare) may exist where `make run` ran
    proc = cli(*args, check=False, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_bad_text_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9 ol\xe9".encode("latin-1"))
    for path, message in ((empty, "empty"), (binary, "UTF-8")):
        proc = cli("train", "--dataset", f"file:{path}", "--out-dir", tmp_path / "r", check=False, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["train", "sample", "eval", "quantize", "pack", "compare", "demo"])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: nanogptq {command}" in capsys.readouterr().out


def test_qat_fine_tune_from_fp32_checkpoint(tmp_path, text_file):
    base = dict(dataset=f"file:{text_file}", batch_size=8, eval_interval=20, eval_batches=2, lr=3e-3,
                warmup_steps=5, progress=False)
    fp = train(TrainConfig(out_dir=str(tmp_path / "fp"), max_steps=40, **base))
    fp_loss = val_losses(fp)[-1]
    qat_config = str(Path(__file__).parents[1] / "configs/qat/weights_only.json")
    qat = train(TrainConfig(out_dir=str(tmp_path / "qat"), max_steps=20, init_from=str(fp / "best"),
                            qat_config=qat_config, lr_schedule="bitnet", **base))
    ck = load_checkpoint(qat / "last")
    assert ck.meta["qat"] is not None and ck.meta["train"]["init_from"] == str(fp / "best")
    assert ck.meta["train"]["preset"] == "tiny"
    # the fine-tuned model keeps its shape: another --preset is an error, not a silently wrong record
    with pytest.raises(ValueError, match="--preset small differs from --init-from .*'s preset tiny"):
        train(TrainConfig(out_dir=str(tmp_path / "qat2"), max_steps=2, init_from=str(fp / "best"), preset="small",
                          **base), explicit={"out_dir", "max_steps", "init_from", "preset"})
    # starting from trained weights, QAT is far from a fresh start (ln(vocab) = 3.4) after 20 steps
    assert val_losses(qat)[-1] < fp_loss + 0.5


def test_init_from_a_missing_checkpoint_is_one_line(tmp_path, text_file):
    proc = cli("train", "--dataset", f"file:{text_file}", "--out-dir", tmp_path / "r", "--init-from",
               tmp_path / "missing", check=False, timeout=60)
    assert proc.returncode == 2 and "no such checkpoint folder" in proc.stderr
