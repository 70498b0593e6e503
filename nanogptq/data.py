"""Text datasets, tokenizers, a seeded train/val split, cached token arrays and batching.

Datasets are named `shakespeare`, `tinystories` or `file:PATH`. A named dataset is looked up in a data
dir (the `data_dir` argument, else `$NANOGPTQ_DATA_DIR`), else in the user cache (`$NANOGPTQ_CACHE_DIR`
or `~/.cache/nanogptq`), else downloaded into that cache. Every file is checked against its known
size, and against its sha256 where one is known (not for the TinyStories download, a stand-in for a
subset that has no public address), before it is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

EOT = "<|endoftext|>"
CHUNK_CHARS = 64 * 1024  # unit of the train/val split
FORMAT_VERSION = 1  # bump when the token cache layout or encoding changes


class DataError(ValueError):
    """A dataset, text or tokenizer problem, with a one-line message meant for the user."""


# ----------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class DatasetSource:
    """One file of a named dataset, relative to a data dir or the cache."""

    name: str
    relpath: str
    url: str | None  # None: no public download of exactly this file
    sha256: str | None  # None: no verified hash known, only the size is checked
    size: int


# Per dataset, the files it may come from, in order of preference. TinyStories: the project's
# 6.5 MB subset (see ../shared/data/tinystories/SOURCE.md) has no public URL, so a download fetches
# the official V2 validation file instead. We have no verified sha256 for that file, so only its
# byte size is checked, and it is a different (larger) text than the subset: results differ.
DATASETS: dict[str, tuple[DatasetSource, ...]] = {
    "shakespeare": (
        DatasetSource(
            "shakespeare",
            "tinyshakespeare/input.txt",
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            1_115_394,
        ),
    ),
    "tinystories": (
        DatasetSource(
            "tinystories",
            "tinystories/tinystories_subset.txt",
            None,
            "a64ec9f184c6cbd6dffd67015bf8b5fe9b97a81e3ae724d7c352f7284d706132",
            6_484_689,
        ),
        DatasetSource(
            "tinystories",
            "tinystories/TinyStoriesV2-GPT4-valid.txt",
            "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-valid.txt",
            None,
            22_502_601,
        ),
    ),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("NANOGPTQ_CACHE_DIR") or Path.home() / ".cache" / "nanogptq")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _check_file(path: Path, size: int | None, sha256: str | None) -> str | None:
    """Return why `path` is not the expected file, or None if it is."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"{path} has {actual:,} bytes, expected {size:,}"
    if sha256 is not None and (digest := _sha256_file(path)) != sha256:
        return f"{path} has sha256 {digest}, expected {sha256}"
    return None


def download(url: str, dest: str | Path, sha256: str | None = None, size: int | None = None) -> Path:
    """Download `url` to `dest`, checking size and sha256 before it appears under its final name."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:
            total = getattr(r, "length", None) or size  # only HTTP responses have a length
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=None)
            with bar:
                while block := r.read(1 << 16):
                    f.write(block)
                    bar.update(len(block))
        problem = _check_file(tmp, size, sha256)
        if problem:
            raise DataError(f"download of {url} is corrupt: {problem.replace(str(tmp), 'file')}")
        os.replace(tmp, dest)  # atomic: a reader never sees a partial file under `dest`
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # URLError and HTTPError are OSErrors
            raise DataError(f"download of {url} failed: {e}") from e
        raise
    return dest


def file_dataset_path(name: str) -> Path | None:
    """The path a `file:PATH` dataset names (~ expanded); None for a named dataset."""
    return Path(name[len("file:") :]).expanduser() if name.startswith("file:") else None


def resolve_text_path(
    name: str,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    urls: dict[str, str] | None = None,
) -> Path:
    """Find (or download) the text file of dataset `name`. `urls` overrides download URLs by name."""
    if (path := file_dataset_path(name)) is not None:
        if path.is_dir():  # "file:" alone is the working folder
            raise DataError(f"dataset {name!r} names a folder, not a text file: use file:PATH/TO/TEXT.txt")
        if not path.is_file():
            raise DataError(f"missing file: {path} (from dataset {name!r})")
        return path
    if name not in DATASETS:
        valid = ", ".join([*DATASETS, "file:PATH"])
        raise DataError(f"unknown dataset {name!r}; valid: {valid}")
    sources = DATASETS[name]

    data_dir = data_dir or os.environ.get("NANOGPTQ_DATA_DIR")
    if data_dir:
        # a data dir the user named is authoritative: no silent fallback to another copy of the text
        for src in sources:
            path = Path(data_dir) / src.relpath
            if path.is_file():
                if problem := _check_file(path, src.size, src.sha256):
                    raise DataError(f"dataset {name!r}: {problem}")
                return path
        wanted = " or ".join(str(Path(data_dir) / s.relpath) for s in sources)
        raise DataError(f"missing file: dataset {name!r} needs {wanted}")

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    for src in sources:
        path = cache / src.relpath
        if path.is_file() and _check_file(path, src.size, src.sha256) is None:
            return path
    src = next(s for s in sources if s.url)
    url = (urls or {}).get(name, src.url)
    return download(url, cache / src.relpath, sha256=src.sha256, size=src.size)


def load_text(
    name: str,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    urls: dict[str, str] | None = None,
) -> str:
    path = resolve_text_path(name, data_dir, cache_dir, urls)
    raw = path.read_bytes()
    if not raw:
        raise DataError(f"empty text file: {path}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text: invalid byte 0x{raw[e.start]:02x} at offset {e.start}"
        ) from e


# ----------------------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
    kind: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def to_dict(self) -> dict: ...


class CharTokenizer:
    kind = "char"

    def __init__(self, chars: str):
        if not chars or list(chars) != sorted(set(chars)):
            raise DataError("a char vocabulary must be non-empty, sorted and without repeats")
        self.chars = chars
        self.vocab_size = len(chars)
        # ids are positions in the sorted vocabulary, so a binary search over code points encodes
        self._codes = np.array([ord(c) for c in chars], dtype=np.uint32)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def unknown_chars(self, text: str) -> list[str]:
        return sorted(set(text) - set(self.chars))

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        ids = np.searchsorted(self._codes, codes)
        if not np.array_equal(self._codes[np.minimum(ids, self.vocab_size - 1)], codes):
            unknown = self.unknown_chars(text)
            shown = ", ".join(repr(c) for c in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
            raise DataError(f"{len(unknown)} character(s) not in the vocabulary: {shown}")
        return ids

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: list[int]) -> str:
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise DataError(f"token id out of range for a vocabulary of {self.vocab_size}")
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


class ByteTokenizer:
    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # a model can emit half of a multi-byte character; show that as U+FFFD rather than fail
        return bytes(ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": self.kind}


# Byte-level BPE never lets a pre-token span "\n" after a non-space character, so cutting the text
# just before such a newline gives the same tokens as encoding it whole, and lets the library
# count and encode the pieces in parallel (about 3x faster on TinyStories).
_SAFE_CUT = re.compile(r"(?<=\S)\n")


def _bpe_pieces(text: str, target: int = 1 << 16) -> list[str]:
    pieces, start = [], 0
    while start < len(text):
        m = _SAFE_CUT.search(text, start + target) if start + target < len(text) else None
        end = m.start() if m else len(text)
        pieces.append(text[start:end])
        start = end
    return pieces


class BPETokenizer:
    kind = "bpe"

    def __init__(self, tok: HFTokenizer):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        if vocab_size < 257:
            raise DataError(f"bpe vocab_size must be at least 257 (256 bytes + {EOT}), got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        # no prefix space: decode(encode(text)) must give back exactly the text
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[EOT],
            show_progress=False,
        )
        tok.train_from_iterator(_bpe_pieces(text), trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return [i for enc in self._tok.encode_batch(_bpe_pieces(text)) for i in enc.ids]

    def encode_array(self, text: str, dtype: type = np.uint32) -> np.ndarray:
        """encode() as an array, a piece at a time: a long text never becomes one Python list of ints."""
        arrays = [np.array(enc.ids, dtype=dtype) for enc in self._tok.encode_batch(_bpe_pieces(text))]
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "json": self._tok.to_str()}


class PretrainedTokenizer(BPETokenizer):
    """A pretrained model's own tokenizer (GPT-2's tokenizer.json, say), through the `tokenizers` library.

    Its JSON runs to megabytes, so a checkpoint keeps it as a file beside config.json (FILE), which the
    config's tokenizer entry names with its sha256: `files()` is what a checkpoint writes with it."""

    kind = "pretrained"
    FILE = "tokenizer.json"

    def __init__(self, json_text: str):
        try:
            tok = HFTokenizer.from_str(json_text)
        except Exception as e:  # the library raises its own exception type for a malformed file
            raise DataError(f"not a tokenizers-library tokenizer.json ({str(e).splitlines()[0][:120]})") from None
        super().__init__(tok)
        self.json_text = json_text
        self.sha256 = hashlib.sha256(json_text.encode("utf-8")).hexdigest()

    @classmethod
    def from_file(cls, path: str | Path, sha256: str | None = None) -> PretrainedTokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: missing (the tokenizer file its config names)")
        tok = cls(path.read_text(encoding="utf-8"))
        if sha256 is not None and tok.sha256 != sha256:
            raise DataError(f"{path}: sha256 {tok.sha256[:12]}..., its config names {sha256[:12]}... (file replaced?)")
        return tok

    def files(self) -> dict[str, str]:
        return {self.FILE: self.json_text}

    def to_dict(self) -> dict:
        return {"kind": self.kind, "file": self.FILE, "sha256": self.sha256}


def tokenizer_files(tok: Tokenizer) -> dict[str, str]:
    """The files (name -> text) a checkpoint keeps beside config.json for its tokenizer: none but a
    pretrained tokenizer's."""
    return tok.files() if isinstance(tok, PretrainedTokenizer) else {}


def tokenizer_from_dict(d: dict, folder: str | Path | None = None) -> Tokenizer:
    """The tokenizer a config entry describes; `folder` holds the file a pretrained tokenizer's entry names."""
    kind = d.get("kind")
    if kind == "char":
        return CharTokenizer(d["chars"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer(HFTokenizer.from_str(d["json"]))
    if kind == "pretrained":
        if folder is None or Path(d["file"]).name != d["file"]:  # a bare name: never a path out of the folder
            raise DataError(f"a pretrained tokenizer's file {d['file']!r} must be a name in the checkpoint folder")
        return PretrainedTokenizer.from_file(Path(folder) / d["file"], d.get("sha256"))
    raise DataError(f"unknown tokenizer kind {kind!r}; valid: char, byte, bpe, pretrained")


def build_tokenizer(kind: str, train_text: str, vocab_size: int = 512) -> Tokenizer:
    if not train_text:
        raise DataError("cannot build a tokenizer from empty text")
    if kind == "char":
        return CharTokenizer.from_text(train_text)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(train_text, vocab_size)
    raise DataError(f"unknown tokenizer kind {kind!r}; valid: char, byte, bpe")


# ----------------------------------------------------------------------------- split and cache


SPLITS = ("chunks", "tail")


def split_text(text: str, val_fraction: float = 0.1, seed: int = 1337, split: str = "chunks") -> tuple[str, str]:
    """Split `text` into (train, val), fixed by `seed`.

    `split="tail"` is nanoGPT's split instead: the last val_fraction of the characters is validation
    (use it to compare losses with nanoGPT's published ones; the seed is then unused).

    The text is cut into contiguous chunks of CHUNK_CHARS (64 KiB) characters, the last one shorter.
    `random.Random(seed)` shuffles the chunk numbers; chunks are moved to validation in that order
    for as long as each brings the validation size closer to val_fraction of the characters: so
    validation gets at least one chunk and never all, and is otherwise within half a chunk of target.
    Each split joins its chunks in their original order. Texts shorter than two chunks fall back
    to the last val_fraction of the characters (at least one) as validation. Unlike "the last 10%",
    the validation text is spread over the whole corpus, and a seed always gives the same split.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if len(text) < 2:
        raise DataError(f"text of {len(text)} characters is too short to split")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    chunks = [text[i : i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS)]
    if len(chunks) < 2 or split == "tail":
        cut = len(text) - min(len(text) - 1, max(1, round(len(text) * val_fraction)))
        return text[:cut], text[cut:]
    target, size, val_ids = val_fraction * len(text), 0, set()
    for i in random.Random(seed).sample(range(len(chunks)), len(chunks) - 1):
        if val_ids and abs(size + len(chunks[i]) - target) >= abs(size - target):
            break
        val_ids.add(i)
        size += len(chunks[i])
    train = "".join(c for i, c in enumerate(chunks) if i not in val_ids)
    val = "".join(c for i, c in enumerate(chunks) if i in val_ids)
    return train, val


@dataclass
class TokenData:
    train: np.ndarray  # 1-D memmap of token ids, uint16 (or uint32 for vocabularies over 65,536)
    val: np.ndarray
    tokenizer: Tokenizer
    text_sha256: str = ""  # of the whole text: a checkpoint records it, so a changed text is caught


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached(folder: Path, tokenizer: Tokenizer | None = None) -> TokenData | None:
    """The cached token arrays, with `tokenizer` if given (a pretrained one is not rebuilt from its entry)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta["format"] != FORMAT_VERSION:
            return None
        arrays = []
        for split in ("train", "val"):
            path, n = folder / f"{split}.bin", meta[f"{split}_len"]
            if path.stat().st_size != n * np.dtype(meta["dtype"]).itemsize:
                return None
            arrays.append(np.memmap(path, dtype=meta["dtype"], mode="r", shape=(n,)))
        tok = tokenizer or tokenizer_from_dict(meta["tokenizer"])
        return TokenData(arrays[0], arrays[1], tok, meta["text_sha256"])
    except (OSError, ValueError, KeyError):
        return None  # absent, partial or stale cache: rebuild it


def _encode_array(tok: Tokenizer, text: str, dtype: type) -> np.ndarray:
    if isinstance(tok, (BPETokenizer, CharTokenizer)):
        return tok.encode_array(text).astype(dtype, copy=False)
    return np.array(tok.encode(text), dtype=dtype)


def prepare_data(
    dataset: str,
    tokenizer: str | Tokenizer = "char",
    vocab_size: int = 512,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 1337,
    split: str = "chunks",
) -> TokenData:
    """Load, split, tokenize and cache a dataset. `tokenizer` names a kind to train on the train split only,
    or is a ready tokenizer (a pretrained model's) that encodes the text as it is."""
    given = None if isinstance(tokenizer, str) else tokenizer
    key_fields = {
        # hashed from the file (the text's UTF-8, which load_text checks), so a cached dataset's text is never
        # read into memory, and a new one's only once
        "text_sha256": _sha256_file(resolve_text_path(dataset, data_dir, cache_dir)),
        # a ready tokenizer is keyed by its whole entry (a pretrained one's names its file's sha256)
        "tokenizer": tokenizer if given is None else given.to_dict(),
        "vocab_size": vocab_size if tokenizer == "bpe" else None,  # char and byte ignore it
        "val_fraction": val_fraction,
        "seed": seed,
        "split": split,
        "format": FORMAT_VERSION,
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:24]
    folder = (Path(cache_dir) if cache_dir else default_cache_dir()) / "tokens" / key
    if cached := _load_cached(folder, given):
        return cached

    text = load_text(dataset, data_dir, cache_dir)
    train_text, val_text = split_text(text, val_fraction, seed, split)
    del text  # the two splits hold it now: a long text is not kept twice while it is tokenized
    tok = given or build_tokenizer(tokenizer, train_text, vocab_size)
    if isinstance(tok, CharTokenizer) and (unknown := tok.unknown_chars(val_text)):
        shown = ", ".join(repr(c) for c in unknown[:10])
        raise DataError(f"validation text has characters never seen in training ({shown}); use byte or bpe")
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    train, val = (_encode_array(tok, t, dtype) for t in (train_text, val_text))
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / "train.bin", train.tobytes())
    _atomic_write(folder / "val.bin", val.tobytes())
    meta = {
        **key_fields,
        "dtype": np.dtype(dtype).name,
        "train_len": len(train),
        "val_len": len(val),
        "tokenizer": tok.to_dict(),
    }
    _atomic_write(folder / "meta.json", json.dumps(meta).encode())  # last: marks the cache complete
    return _load_cached(folder, given) or TokenData(train, val, tok, key_fields["text_sha256"])


# ----------------------------------------------------------------------------- batching


def get_batch(
    data: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: x = data[i : i+T], y = data[i+1 : i+T+1], as (B, T) int64 tensors."""
    if len(data) <= block_size:
        raise DataError(f"{len(data)} tokens are too few for block_size {block_size}")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    offsets = starts[:, None] + torch.arange(block_size + 1)
    windows = torch.from_numpy(data[offsets.numpy()].astype(np.int64))
    x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def val_windows(
    data: np.ndarray, block_size: int, device: str = "cpu"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping (1, T) windows over all of `data`, the last one shorter, so that every token
    after the first is predicted exactly once: len(data) - 1 targets in total."""
    for start in range(0, len(data) - 1, block_size):
        end = min(start + block_size, len(data) - 1)
        x = torch.from_numpy(data[start:end].astype(np.int64))[None]
        y = torch.from_numpy(data[start + 1 : end + 1].astype(np.int64))[None]
        yield x.to(device), y.to(device)
