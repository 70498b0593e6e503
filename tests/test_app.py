"""The web demo, driven through its API (gradio_client) and in a real headless browser (Playwright)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no internet here

from nanogptq.app import build_app, default_checkpoints, launch  # noqa: E402
from nanogptq.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from nanogptq.data import CharTokenizer  # noqa: E402
from nanogptq.evaluate import describe, markdown_table, perplexity, plot, window_stats  # noqa: E402
from nanogptq.model import GPT, GPTConfig  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # on a busy 2-core machine two intra-op threads spin-wait on each other: 600 ms a step instead of 10
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def corpus() -> str:
    lines = [f"the cat {i % 7} sat on the mat {i % 5}. a dog ran to the {['park', 'sea', 'hill'][i % 3]}."
             for i in range(300)]
    return "\n".join(lines) + "\n"


def train_tiny(tokens: np.ndarray, cfg: GPTConfig, steps: int = 100) -> GPT:
    """A couple of seconds of training, so the screenshot shows words rather than noise."""
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.from_numpy(tokens.astype(np.int64))
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - cfg.block_size - 1, (16,), generator=gen)
        x = torch.stack([data[s : s + cfg.block_size] for s in starts])
        y = torch.stack([data[s + 1 : s + cfg.block_size + 1] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def add_quantized(run: Path, model: GPT, meta: dict, tokens: np.ndarray) -> list[str]:
    """RTN int8 and GPTQ int4 variants."""
    from nanogptq.quant import QuantConfig, quant_meta, quantize

    made = []
    variants = [("rtn-int8", QuantConfig(method="rtn", bits=8, group_size=-1), None),
                ("gptq-int4", QuantConfig(method="gptq", bits=4, group_size=16, calib_samples=8), tokens)]
    for name, config, calib in variants:
        qmodel = quantize(copy.deepcopy(model), config, calib, progress=False)
        ppl = perplexity(qmodel, tokens[-2000:], progress=False)["val_ppl"]
        save_checkpoint(run / name, qmodel, {**meta, "metrics": {"val_ppl": ppl},
                                             "quantization": quant_meta(qmodel, config)})
        made.append(name)
    return made


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder like the main job's: best (fp32), last, and quantized variants; plus a report."""
    text = corpus()
    tok = CharTokenizer.from_text(text)
    tokens = np.array(tok.encode(text), dtype=np.uint16)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)
    model = train_tiny(tokens[:-2000], cfg)
    meta = {"model": cfg.to_dict(), "tokenizer": tok.to_dict(), "data": {"dataset": "test"},
            "quantization": None}
    run = tmp_path_factory.mktemp("runs") / "tiny"
    ppl = perplexity(model, tokens[-2000:], progress=False)["val_ppl"]
    save_checkpoint(run / "best", model, {**meta, "metrics": {"val_ppl": ppl}})
    save_checkpoint(run / "last", model, {**meta, "metrics": {}})
    add_quantized(run, model, meta, tokens)
    return run


def write_report(run_dir: Path, out: Path) -> Path:
    """compare.md, compare.json and compare.png as `nanogptq compare` writes them, from the fixture's own
    numbers (KL and top-1 agreement measured on the fixture's tail of text)."""
    rows, base = [], None
    tokens = np.array(CharTokenizer.from_text(corpus()).encode(corpus()))[-600:]
    for path in default_checkpoints(run_dir):
        ckpt = load_checkpoint(path)
        base = base or ckpt
        metrics = {"val_ppl": ckpt.meta["metrics"]["val_ppl"], "size_bytes": ckpt.size_bytes(), "path": str(path)}
        metrics.update(window_stats(ckpt.model, tokens, progress=False, reference=base.model).summary())
        rows.append({**describe(ckpt), **metrics, "val_ppl": ckpt.meta["metrics"]["val_ppl"]})
    for row in rows:
        row["ppl_change_pct"] = 100.0 * (row["val_ppl"] / rows[0]["val_ppl"] - 1.0)
    (out / "compare.md").write_text(markdown_table(rows))
    (out / "compare.json").write_text(json.dumps(rows))
    plot(rows, out / "compare.png")
    return out


@pytest.fixture(scope="module")
def app(run_dir, tmp_path_factory):
    """The demo served on a free port with the run's default discovery; yields (url, variant count)."""
    report = write_report(run_dir, tmp_path_factory.mktemp("report"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    paths = [str(p) for p in default_checkpoints(run_dir)]
    demo = launch(paths, port=port, report_dir=report, block=False)
    yield f"http://127.0.0.1:{port}/", len(paths)
    demo.close()


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    return Client(app[0], verbose=False)


def ask(client, keys: list[str], prompt="the cat", max_new=24, temperature=0.8, top_k=40, seed=7) -> dict:
    """One /generate call: the status line, then the text and the stats of every column (selected or not)."""
    out = client.predict(selected=keys, prompt=prompt, max_new_tokens=max_new, temperature=temperature,
                         top_k=top_k, seed=seed, api_name="/generate")  # the API's names, as documented
    n = (len(out) - 1) // 2
    return {"status": out[0], "texts": list(out[1 : 1 + n]), "stats": list(out[1 + n :])}


def variant_keys(run_dir: Path) -> list[str]:
    return [p.name for p in default_checkpoints(run_dir)]


def test_default_checkpoints_skip_last_and_put_best_first(run_dir, tmp_path):
    keys = variant_keys(run_dir)
    assert keys[0] == "best" and "last" not in keys and len(keys) >= 2
    with pytest.raises(FileNotFoundError, match="make run"):
        default_checkpoints(tmp_path / "nothing-here")


def test_default_run_is_found_from_the_working_folder(run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="make run"):
        build_app([])
    (tmp_path / "runs").mkdir()
    shutil.copytree(run_dir, tmp_path / "runs" / "tiny-shakespeare")
    demo = build_app([])
    picker = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "variants")
    keys = [value for _, value in picker.choices]
    assert keys[0] == "best" and "last" not in keys and len(keys) == len(variant_keys(run_dir))
    demo.close()


def test_every_variant_generates_text_and_timings(client, run_dir):
    keys = variant_keys(run_dir)
    r = ask(client, keys)
    assert len(r["texts"]) == len(keys)
    assert r["status"].startswith("**Done:**"), r["status"]
    for key, text, stats in zip(keys, r["texts"], r["stats"], strict=True):
        assert text.startswith("the cat") and len(text) > len("the cat"), (key, text)
        for figure in ("first token", " ms", "tok/s", "total", "(24 tokens)", "size on disk", "bits/weight",
                       "perplexity", "KL to baseline", "top-1 agreement"):
            assert figure in stats, (key, stats)
        assert "not evaluated" not in stats  # every fixture variant has a val_ppl in its config.json


def test_text_streams_token_by_token(client, run_dir):
    job = client.submit([variant_keys(run_dir)[0]], "the cat", 12, 0.8, 40, 7, api_name="/generate")
    job.result(timeout=60)
    texts = [out[1] for out in job.outputs()]
    assert len(texts) >= 12 and len(set(texts)) >= 12  # one update per token, each longer than the last


def test_several_users_at_once_are_queued(app, run_dir):
    from gradio_client import Client

    keys = variant_keys(run_dir)
    jobs = [Client(app[0], verbose=False).submit(keys, "the cat", 16, 0.8, 40, seed, api_name="/generate")
            for seed in (1, 2, 3)]
    results = [job.result(timeout=120) for job in jobs]  # all three finish; none is dropped or crashed
    for result in results:
        assert result[0].startswith("**Done:**"), result[0]
        assert all(text.startswith("the cat") and len(text) > len("the cat") for text in result[1 : 1 + len(keys)])


def test_same_seed_same_text_and_only_selected_variants_run(client, run_dir):
    keys = variant_keys(run_dir)
    a = ask(client, [keys[0]], seed=3)
    b = ask(client, [keys[0]], seed=3)
    assert a["texts"][0] == b["texts"][0] and len(a["texts"][0]) > len("the cat")
    assert all(t == "" for t in a["texts"][1:])  # unselected columns stay empty (and hidden)


def test_empty_prompt_starts_from_newline(client, run_dir):
    r = ask(client, variant_keys(run_dir), prompt="")
    assert "empty prompt" in r["status"] and r["status"].startswith("**Done:**"), r["status"]
    assert all(t.startswith("\n") and len(t) > 1 for t in r["texts"])


def test_unseen_characters_are_dropped_and_named(client, run_dir):
    r = ask(client, variant_keys(run_dir), prompt="the cat Ω€")
    assert "dropped characters" in r["status"] and "Ω" in r["status"] and "€" in r["status"], r["status"]
    assert all(t.startswith("the cat ") and "Ω" not in t for t in r["texts"])


def test_long_prompt_is_cropped_to_the_context(client, run_dir):
    r = ask(client, [variant_keys(run_dir)[0]], prompt="the cat sat on the mat. " * 20)
    assert "cropped" in r["status"], r["status"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=9), "temperature must be between 0 and 5"),
    (dict(max_new=0), "max new tokens must be between"),
    (dict(max_new=5000), "at most 1000 new tokens"),
    (dict(top_k=-1), "top-k must be"),
    (dict(seed=None), "seed is empty"),
])
def test_out_of_range_settings_explain_themselves(client, run_dir, kwargs, message):
    r = ask(client, variant_keys(run_dir), **kwargs)
    assert r["status"].startswith("**Can't generate:**") and message in r["status"], r["status"]
    assert all(t == "" for t in r["texts"])


def test_a_busy_port_names_the_flag(app, run_dir):
    busy = int(app[0].rsplit(":", 1)[1].strip("/"))
    with pytest.raises(OSError, match=f"port {busy} on 127.0.0.1 is in use or not allowed; choose another with --port"):
        launch([str(run_dir / "best")], port=busy, block=False)


def test_no_variant_selected(client):
    r = ask(client, [])
    assert "No variant selected" in r["status"], r["status"]


@pytest.fixture(scope="module")
def browser_app(app):
    """The fixture app, or with NANOGPTQ_DEMO_RUN=runs/tiny-shakespeare the main job's real variants
    (and its compare report), which is how docs/demo.png is made."""
    run = os.environ.get("NANOGPTQ_DEMO_RUN")
    if not run:
        yield (*app, "the dog ran")
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    paths = [str(p) for p in default_checkpoints(Path(run))]
    demo = launch(paths, port=port, report_dir=Path(run) / "report", block=False)
    yield f"http://127.0.0.1:{port}/", len(paths), "ROMEO:"
    demo.close()


def test_browser_shows_every_variant(browser_app, tmp_path):
    """Type a prompt, press Generate, wait until every column has text and timings; keep a screenshot."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    url, n, prompt = browser_app
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.locator("#prompt textarea").fill(prompt)
            page.locator("#generate").click()
            expect(page.locator("#status")).to_contain_text("Done", timeout=120_000)
            starts_with_prompt = re.compile("^" + re.escape(prompt) + ".+", re.DOTALL)
            for i in range(n):
                expect(page.locator(f"#out-{i} textarea")).to_have_value(starts_with_prompt)
                expect(page.locator(f"#stats-{i}")).to_contain_text("tok/s")
            expect(page.locator("#report-plot img")).to_be_visible()
            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
            # unticking a variant hides its column
            page.locator("#variants label").nth(n - 1).click()
            expect(page.locator(f"#out-{n - 1}")).to_be_hidden()
            expect(page.locator("#out-0")).to_be_visible()
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("NANOGPTQ_SCREENSHOT"):
        target = Path(os.environ["NANOGPTQ_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target)
