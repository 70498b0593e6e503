"""What every benchmark shares: argument helpers, timing, device names, the result file and the table.

A result file is one JSON object: the command that made it, the commit it ran at, the device, then the
benchmark's own keys and its rows. Files go to results/<area>/<what>_<device tag>.json, e.g.
results/gpu/decode_7b_h200.json. The benchmarks run as scripts (`python benchmarks/NAME.py`), so this
module is imported as `common`, from the scripts' own folder.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository
RESULTS = Path("results")  # relative to where the benchmark runs (the repository root, as the scripts run them)
# datasheet HBM peaks, bytes/s, by a word of the device name (the roofline's denominator)
HBM_PEAKS = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


# ---- arguments


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose --help prints the benchmark's docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """--device, by default the GPU where there is one."""
    p.add_argument("--device", default=default or default_device(), help="cpu or cuda (default: %(default)s)")


def add_output(p: argparse.ArgumentParser, flag: str = "--json", where: str = "results/<area>/...") -> None:
    """The result file's flag (default None: the benchmark names it by what it measures and the device)."""
    p.add_argument(flag, default=None, help=f"the result file (default: {where})")


# ---- devices


def as_device(device: torch.device | str | None = None) -> torch.device:
    return torch.device(device if device is not None else default_device())


def device_name(device: torch.device | str | None = None) -> str:
    """What a result file records: the GPU's name ("NVIDIA H200"), or "cpu (N cores)"."""
    device = as_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def device_tag(device: torch.device | str | None = None) -> str:
    """A result file's name for the device: "h200" for "NVIDIA H200", "h100", "cpu"."""
    device = as_device(device)
    if device.type != "cuda":
        return device.type
    words = torch.cuda.get_device_name(device).split()
    return words[1].lower() if len(words) > 1 else "gpu"


def result_path(area: str, what: str, device: torch.device | str | None = None, suffix: str = ".json") -> Path:
    """results/<area>/<what>_<device tag><suffix>."""
    return RESULTS / area / f"{what}_{device_tag(device)}{suffix}"


def hbm_peak() -> float:
    """The GPU's memory-bandwidth peak: $NANOGPTQ_HBM_GBS if set, else by name, else the H100's."""
    if os.environ.get("NANOGPTQ_HBM_GBS"):
        return float(os.environ["NANOGPTQ_HBM_GBS"]) * 1e9
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((peak for key, peak in HBM_PEAKS.items() if key in name), HBM_PEAKS["H100"])


# ---- timing


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device | str, warmup: int = 1) -> float:
    """Median wall-clock seconds of fn() over `repeats` runs after `warmup` untimed ones (synchronized)."""
    return statistics.median(run_seconds(fn, repeats, device, warmup))


def run_seconds(fn: Callable[[], object], repeats: int, device: torch.device | str, warmup: int = 1) -> list[float]:
    """Each timed run's wall-clock seconds, after `warmup` untimed runs."""
    times = []
    for r in range(warmup + repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    return times


@torch.inference_mode()
def graph_seconds(fn: Callable[[torch.Tensor], object], x: torch.Tensor, calls: int, repeats: int) -> float:
    """Median seconds per call of fn(x) on the GPU, from a CUDA graph of `calls` calls replayed `repeats` times
    (launch overhead excluded, as in a decoded model replayed from a graph)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: autotuning, lazy initialisation
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn(x)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


# ---- the result file


@functools.cache
def git_commit() -> str:
    """$NANOGPTQ_COMMIT if set, else the repository's HEAD commit, or "unknown" (no git, or not a checkout).
    The variable is for copies of a working tree whose .git is not the tree's own (a lent GPU machine's copy
    reports the commit it was first made from): set it where the tree is, `NANOGPTQ_COMMIT=$(git rev-parse HEAD)`."""
    if os.environ.get("NANOGPTQ_COMMIT"):
        return os.environ["NANOGPTQ_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def command_line() -> str:
    """The command that runs this benchmark again: python and sys.argv, quoted for the shell."""
    return shlex.join(["python", *sys.argv])


def write_result(
    path: str | Path, rows: list | None, device: torch.device | str | None = None, command: str | None = None, **info
) -> Path:
    """Write {command, commit, device, **info, rows} to `path` (folders made as needed; no "rows" key where
    rows is None). `device`: a device (its name is recorded) or the name itself. $NANOGPTQ_RUN_BY, which the
    shell scripts set to their own command line, is kept as "run_by"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    is_spec = not isinstance(device, str) or device.split(":")[0] in ("cpu", "cuda")
    name = device_name(device) if is_spec else device
    record = {"command": command or command_line(), "commit": git_commit(), "device": name}
    if os.environ.get("NANOGPTQ_RUN_BY"):
        record["run_by"] = os.environ["NANOGPTQ_RUN_BY"]
    record.update(info)
    if rows is not None:
        record["rows"] = rows
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


# ---- the printed table


def fmt(x, spec: str = "") -> str:
    """A table cell: "-" for None or NaN, a string as it is, else format(x, spec)."""
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return x if isinstance(x, str) else format(x, spec)


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str | Callable[[dict], object], str]]) -> str:
    """A Markdown table: one (header, row key or function of the row, format spec) per column."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [fmt(get(r) if callable(get) else r.get(get), spec) for _, get, spec in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str | Callable[[dict], object], str]]) -> str:
    text = table(rows, columns)
    print(text, flush=True)
    return text
