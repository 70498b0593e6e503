import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def data_dir() -> str | None:
    """The local datasets folder: $NANOGPTQ_DATA_DIR, else ../shared/data beside the project."""
    env = os.environ.get("NANOGPTQ_DATA_DIR")
    if env:
        return env
    return str(SHARED_DATA) if (SHARED_DATA / "tinyshakespeare" / "input.txt").exists() else None


@pytest.fixture
def shakespeare_dir() -> str:
    d = data_dir()
    if d is None:
        pytest.skip("Tiny Shakespeare not found: set NANOGPTQ_DATA_DIR")
    return d


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # token caches go to a per-session temp folder, never to the user's ~/.cache
    monkeypatch.setenv("NANOGPTQ_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def text_file(tmp_path) -> Path:
    """A small synthetic corpus with structure a model can learn in a few steps."""
    lines = []
    for i in range(400):
        lines.append(f"the cat {i % 7} sat on the mat {i % 5}. a dog ran to the {['park', 'sea', 'hill'][i % 3]}.")
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path
