"""Checkpoint folders: `model.safetensors` + `config.json` (+ `resume.pt` for training state).

`config.json` says everything needed to rebuild the model: format version, model config, tokenizer,
training config, metrics and `quantization` (null for float weights, else the quantizer's settings).
Nothing is unpickled: weights come from safetensors, and resume state is read with weights_only=True.

A folder is written whole into `NAME.tmp`, then swapped in with renames, so a process killed at any
moment leaves either the old checkpoint or the new one (`NAME.old` is picked up if the kill fell
between the two renames).

A checkpoint loads as the stored model, in fp32: quantized layers are the stored QuantLinear / TernaryLinear
on their exact reference path. Making it run fast (backends, fusion, the activation dtype) is the runtime's
job: runtime.load.prepare_for_inference.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from nanogptq.data import TokenData, Tokenizer, file_dataset_path, prepare_data, tokenizer_from_dict
from nanogptq.model import GPT, GPTConfig
from nanogptq.quant.qat import QATConfig, apply_qat
from nanogptq.quant.quantize import prepare_quantized_model

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
RESUME = "resume.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or of another format version."""


@dataclass
class Checkpoint:
    model: GPT
    tokenizer: Tokenizer
    meta: dict
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    def size_bytes(self) -> int:
        return (self.path / WEIGHTS).stat().st_size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def check_output(path: str | Path, source: str | Path | None = None) -> None:
    """Refuse to write a checkpoint where it would destroy something else: over a file or a non-empty folder
    that is not a checkpoint (a run folder, say), or, for a checkpoint made from a `source` (quantize,
    pack, import-hf), over that source or over any checkpoint that training wrote; one made the same way is replaced."""
    path = Path(path)
    if path.is_file() or (path.is_dir() and any(path.iterdir()) and not (path / CONFIG).exists()):
        raise CheckpointError(f"{path}: exists and is not a nanogptq checkpoint; refusing to replace it")
    if source is None:
        return
    if path.resolve() == _existing(Path(source)).resolve():
        raise CheckpointError(f"{path}: the output would replace its own source checkpoint; choose another --out")
    if (path / CONFIG).exists() and ((path / RESUME).exists() or "parent" not in read_meta(path)):
        raise CheckpointError(f"{path}: holds a trained checkpoint, not one made by quantize, pack or import-hf; "
                              "refusing to replace it; choose another --out")


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict, resume_state: dict | None = None,
                    files: dict[str, str] | None = None) -> Path:
    """Write model weights, `meta` (merged into config.json), optional resume state and text `files` (name ->
    content: a pretrained tokenizer's, data.tokenizer_files) atomically, replacing a checkpoint at `path`
    (never anything else: check_output)."""
    path = Path(path)
    files = files or {}
    named = (meta.get("tokenizer") or {}).get("file")
    if named is not None and named not in files:  # a folder whose config names a file it lacks would not load
        raise CheckpointError(f"{path}: the tokenizer entry names {named!r}, which was not given to write")
    check_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    raw = model.module if hasattr(model, "module") else model  # DDP
    raw = getattr(raw, "_orig_mod", raw)  # torch.compile
    save_model(raw, str(tmp / WEIGHTS))
    with open(tmp / WEIGHTS, "rb+") as f:
        os.fsync(f.fileno())
    if resume_state is not None:
        with open(tmp / RESUME, "wb") as f:
            torch.save(resume_state, f)
            f.flush()
            os.fsync(f.fileno())
    for name, text in files.items():
        if Path(name).name != name or name in (WEIGHTS, CONFIG, RESUME):
            raise CheckpointError(f"{name!r}: not a file name a checkpoint can hold beside its weights")
        with open(tmp / name, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    _write_json(tmp / CONFIG, {"format_version": FORMAT_VERSION, **meta})
    # safetensors writes its file private (0600); give it the permissions the umask gives config.json
    os.chmod(tmp / WEIGHTS, (tmp / CONFIG).stat().st_mode & 0o777)
    return swap_in(tmp, path)


def swap_in(tmp: Path, path: Path) -> Path:
    """Put the finished folder `tmp` (PATH.tmp) in place of `path` with renames: a kill at any moment leaves
    the old folder or the new one (PATH.old between the two renames, which readers pick up)."""
    old = path.with_name(path.name + ".old")
    _fsync_dir(tmp)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


def update_meta(path: str | Path, meta: dict) -> None:
    """Replace a checkpoint's config.json (e.g. to record metrics) atomically: temp file, fsync, rename."""
    path = Path(path)
    tmp = path / (CONFIG + ".tmp")
    _write_json(tmp, meta)
    os.replace(tmp, path / CONFIG)
    _fsync_dir(path)


def _existing(path: Path) -> Path:
    """The checkpoint folder, or the previous one if a kill fell between the swap's two renames."""
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():
        return old
    return path


def read_meta(path: str | Path) -> dict:
    path = _existing(Path(path))
    cfg = path / CONFIG
    if path.is_file():
        raise CheckpointError(f"{path}: a file; name the checkpoint folder that holds it ({path.parent})")
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not cfg.exists():
        raise CheckpointError(f"{cfg}: missing (not a nanogptq checkpoint?)")
    try:
        meta = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg}: corrupt or truncated JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{cfg}: not a nanogptq config (a JSON object is expected)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{cfg}: format version {version!r}, this nanogptq reads version {FORMAT_VERSION}")
    for key in ("model", "tokenizer"):
        if not isinstance(meta.get(key), dict):
            raise CheckpointError(f"{cfg}: the {key!r} entry is missing or not a JSON object")
    return meta


def is_quantized(meta: dict) -> bool:
    """Whether the checkpoint's linears hold quantized codes: post-training (RTN, GPTQ) or an exported
    ternary model (both have a "quantization" entry). A QAT training checkpoint (a "qat" entry, float weights
    made ternary in every forward) counts as float: it trained on bf16 activations on CUDA, and runs so."""
    return bool(meta.get("quantization"))


def build_model(meta: dict) -> GPT:
    """An empty model shaped like the checkpoint, with stored quantized modules where it has them."""
    model = GPT(GPTConfig.from_dict(meta["model"], source="model config"))
    if meta.get("quantization"):
        prepare_quantized_model(model, meta["quantization"])
    elif meta.get("qat"):
        apply_qat(model, QATConfig.from_dict(meta["qat"], source="checkpoint qat entry"))
    return model


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """A checkpoint folder as the stored model on `device`, in eval mode."""
    path = _existing(Path(path))
    meta = read_meta(path)
    weights = path / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{weights}: missing")
    try:
        model = build_model(meta)
        tokenizer = tokenizer_from_dict(meta["tokenizer"], folder=path)
    except (TypeError, KeyError, ValueError) as e:  # a hand-edited config.json: a wrong type, a missing field
        raise CheckpointError(f"{path / CONFIG}: invalid model or tokenizer entry ({type(e).__name__}: {e})") from None
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device="cpu")
    except (SafetensorError, OSError, RuntimeError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        sizes = [line.strip() for line in lines if "size mismatch" in line]
        if sizes:  # the file is whole, its shapes are not the ones config.json describes
            raise CheckpointError(f"{weights}: tensor shapes do not match config.json ({sizes[0]})") from None
        raise CheckpointError(f"{weights}: unreadable or truncated ({lines[0]})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{weights}: tensors do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.to(device).eval()
    return Checkpoint(model=model, tokenizer=tokenizer, meta=meta, path=path)


def _dataset_key(name: str) -> str:
    """A dataset name with a file: path made absolute, as training records it."""
    path = file_dataset_path(name)
    return name if path is None else f"file:{path.resolve()}"


def checkpoint_data(ckpt: Checkpoint, data_dir: str | None = None, dataset: str | None = None) -> TokenData:
    """The dataset the checkpoint was trained on, split and tokenized as it was. The tokenizer is rebuilt from
    the text, so a text that changed since (other characters, say) is an error, not shifted token ids.

    A checkpoint without training data (an imported one) takes `dataset` instead: that text, split as
    training splits it, encoded by the checkpoint's own tokenizer. A trained checkpoint keeps its own data."""
    spec = ckpt.meta.get("data")
    if not isinstance(spec, dict) or "dataset" not in spec:
        if dataset is not None:
            return prepare_data(dataset, ckpt.tokenizer, data_dir=data_dir)
        raise CheckpointError(f"{ckpt.path / CONFIG}: no 'data' entry saying which dataset it was trained on; "
                              "name a text to use with --dataset (shakespeare, tinystories or file:PATH)")
    if dataset is not None and _dataset_key(dataset) != _dataset_key(spec["dataset"]):
        raise CheckpointError(f"{ckpt.path}: trained on {spec['dataset']!r}, and evaluated and calibrated on that; "
                              "--dataset is for checkpoints without training data (imported ones)")
    spec = dict(spec)
    trained_sha256 = spec.pop("text_sha256", None)  # absent from checkpoints of earlier versions
    try:
        data = prepare_data(**spec, data_dir=data_dir)
    except TypeError as e:  # an unknown or missing key in a hand-edited entry
        raise CheckpointError(f"{ckpt.path / CONFIG}: invalid 'data' entry ({e})") from None
    if trained_sha256 and data.text_sha256 != trained_sha256:
        raise CheckpointError(f"{ckpt.path}: the text of dataset {spec['dataset']!r} is not the one this checkpoint "
                              f"was trained on (sha256 {data.text_sha256[:12]}..., trained on "
                              f"{trained_sha256[:12]}...): its split would differ")
    if data.tokenizer.to_dict() != ckpt.tokenizer.to_dict():
        raise CheckpointError(f"{ckpt.path}: dataset {spec['dataset']!r} no longer gives the "
                              "tokenizer this checkpoint was trained with (has its text changed?)")
    return data


def short_names(paths: list[str | Path]) -> list[str]:
    """A name per checkpoint folder for tables and pickers: the folder's name, or run/name where two clash."""
    paths = [Path(p) for p in paths]
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def load_resume_state(path: str | Path) -> dict:
    file = _existing(Path(path)) / RESUME
    if not file.exists():
        raise CheckpointError(f"{file}: missing (the checkpoint has no training state to resume)")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad file; all mean the same to a user
        raise CheckpointError(f"{file}: unreadable ({type(e).__name__})") from None
