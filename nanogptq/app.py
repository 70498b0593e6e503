"""Web demo: the same prompt and seed through every variant (fp32, RTN, GPTQ, ...), side by side.

    nanogptq demo                      # the main job's checkpoints under runs/tiny-shakespeare/
    nanogptq demo runs/a/best runs/a/gptq-int4 --report results

Every checkpoint is loaded once at start. Each variant streams its text into its own column, with its
own time to first token and tokens/s under it; only each variant's own compute time is counted, so
interleaving the variants token by token (so all columns fill together) does not skew the numbers.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nanogptq.checkpoint import CONFIG, Checkpoint, short_names
from nanogptq.evaluate import describe, report_folder
from nanogptq.sample import (
    Generation,
    SampleSettings,
    encode_prompt,
    engine_name,
    load_for_generation,
    stream_text,
)

if TYPE_CHECKING:
    import gradio as gr

log = logging.getLogger(__name__)

DEFAULT_RUN = Path("runs/tiny-shakespeare")
MAX_DEMO_TOKENS = 1000  # one user's request holds the queue for everyone: keep it to seconds, not minutes

INTRO = """\
The same small GPT, stored different ways. **fp32** is the trained baseline. **RTN** (round-to-nearest)
rounds every weight to the nearest point of an int8 or int4 grid on its own. **GPTQ** rounds the weights
one column at a time and nudges the not-yet-rounded ones to cancel the error, using statistics of real
inputs, so it stays closer to the baseline at the same bit width. **QAT** trains the model with ternary
weights from the start.

Every column samples with the **same seed**, so where the texts differ, the difference comes from
quantization. Under each column: **first token** is the time to read the prompt and sample one token;
**speed** is tokens per second after that; **total** is the whole generation. Only each variant's own
compute time is counted. **Bits/weight** is the average storage per weight of the quantized layers,
scales and zero points included (32 for fp32). **Perplexity** is on the validation split, as written by
`nanogptq eval` or `nanogptq compare` (lower is better). **KL to baseline** (mean KL divergence of the
next-token distribution from the baseline's) and **top-1 agreement** (how often both rank the same token
first), over the whole validation split, come from the `nanogptq compare` report when there is one.
"""


@dataclass
class Variant:
    key: str  # unique short name, the value the variant picker sends
    ckpt: Checkpoint
    method: str
    bits_per_weight: float | None
    against_baseline: dict | None = None  # the compare report's row for this checkpoint, when it has one

    @property
    def label(self) -> str:
        return f"{self.key} ({self.method})"


def default_checkpoints(run_dir: str | Path = DEFAULT_RUN) -> list[Path]:
    """`best` and every other checkpoint folder of the main run (not `last`, a mid-training copy)."""
    run_dir = Path(run_dir)
    found = []
    if run_dir.is_dir():
        for p in sorted(run_dir.iterdir()):
            half_written = p.name.endswith((".tmp", ".old"))  # a save in progress, or the copy it replaced
            if p.is_dir() and (p / CONFIG).exists() and p.name != "last" and not half_written:
                found.append(p)
    if not found:
        raise FileNotFoundError(f"no checkpoints in {run_dir}/: run `make run` first, or name the folders")
    return sorted(found, key=lambda p: p.name != "best")  # stable: the baseline first, the rest by name


def _method(described: dict) -> str:
    bits = described["bits"]  # 1.58 for ternary: no "int" for that one
    return f"{described['method']} int{bits}" if isinstance(bits, int) and bits < 32 else described["method"]


def load_variants(paths: list[Path], device: str, compile: bool = False, dtype: str = "auto") -> list[Variant]:
    """Every checkpoint as `sample` loads it; `dtype` (auto, fp32, bf16, fp16) is resolved per checkpoint, so
    on CUDA "auto" runs the quantized variants on fp16 activations and the float ones on bf16."""
    variants: list[Variant] = []
    for path, key in zip(paths, short_names(paths), strict=True):  # runs/a/best, runs/b/best
        ckpt = load_for_generation(path, device, dtype=dtype, compile=compile)
        described = describe(ckpt)
        variants.append(Variant(key, ckpt, _method(described), described["bits_per_weight"]))
    return variants


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def static_stats(v: Variant) -> str:
    """What is known before generating: size, bits per weight, and perplexity if it was evaluated."""
    ppl = (v.ckpt.meta.get("metrics") or {}).get("val_ppl")
    ppl_text = f"{ppl:.3f}" if isinstance(ppl, (int, float)) else "not evaluated"
    bpw = "?" if v.bits_per_weight is None else f"{v.bits_per_weight:.2f}"
    if v.ckpt.meta.get("qat"):
        bpw = f"1.58 ternary (stored as {bpw})"
    size = _size(v.ckpt.size_bytes())
    text = f"**size on disk** {size} · **bits/weight** {bpw}  \n**val perplexity** {ppl_text}"
    row = v.against_baseline or {}
    if isinstance(row.get("kl_mean"), (int, float)) and isinstance(row.get("top1_agreement"), (int, float)):
        text += (f"  \n**KL to baseline** {row['kl_mean']:.2e} · "
                 f"**top-1 agreement** {100 * row['top1_agreement']:.2f}%")
    return text


def attach_report(variants: list[Variant], report_dir: Path) -> None:
    """Give each variant its row of the compare report (compare.json), matched by checkpoint folder; a
    missing or unreadable report leaves the rows out (the page says there is no report)."""
    try:
        rows = json.loads((report_dir / "compare.json").read_text())
        by_path = {Path(r["path"]).resolve(): r for r in rows if isinstance(r, dict) and "path" in r}
    except (OSError, ValueError, TypeError):
        return
    for v in variants:
        v.against_baseline = by_path.get(Path(v.ckpt.path).resolve())


def run_stats(gen: Generation, done: bool) -> str:
    state = "" if done else " · *generating…*"
    return (f"**first token** {gen.ttft_s * 1000:.1f} ms · **speed** {gen.tokens_per_s:.0f} tok/s  \n"
            f"**total** {gen.total_s:.2f} s ({gen.new_tokens} tokens) · **engine** {gen.engine}{state}")


def parse_settings(max_new_tokens, temperature, top_k, seed) -> SampleSettings:
    """Settings from the form; ValueError with a message for the page when something is off."""
    values = {"max new tokens": max_new_tokens, "temperature": temperature, "top-k": top_k, "seed": seed}
    for name, value in values.items():
        if value is None or value == "":
            raise ValueError(f"{name} is empty: please fill it in")
    try:
        numbers = int(max_new_tokens), float(temperature), int(top_k), int(seed)
    except (TypeError, ValueError, OverflowError):
        raise ValueError("settings must be finite numbers") from None
    settings = SampleSettings(*numbers[:3], None, numbers[3])  # its validate() explains an out-of-range value
    if settings.max_new_tokens > MAX_DEMO_TOKENS:
        raise ValueError(f"this demo generates at most {MAX_DEMO_TOKENS} new tokens per request, "
                         f"got {settings.max_new_tokens}")
    return settings


class TimedStream:
    """One variant's token stream, timed by its own compute only.

    `stream_text` measures wall-clock since it started, which would include the time spent streaming
    to the browser and running the other variants; here only the time inside next() is added up.
    """

    def __init__(self, ckpt: Checkpoint, prompt: str, settings: SampleSettings):
        self.it = stream_text(ckpt, prompt, settings)
        self.gen: Generation | None = None
        self.own_s = 0.0
        self.done = False

    def step(self) -> None:
        t0 = time.perf_counter()
        try:
            gen = next(self.it)
        except StopIteration:
            self.done = True
            return
        finally:
            self.own_s += time.perf_counter() - t0
        if gen.new_tokens == 1:
            gen.ttft_s = self.own_s
        gen.total_s = self.own_s
        self.gen = gen


def generate_all(variants: list[Variant], selected: list[str] | None, prompt: str | None, max_new_tokens,
                 temperature, top_k, seed) -> Iterator[list]:
    """Yield [status, text per variant..., stats per variant...] as the selected variants generate."""
    n = len(variants)
    texts = [""] * n
    stats = [static_stats(v) for v in variants]

    def frame(status: str) -> list:
        return [status, *texts, *stats]

    chosen = [i for i, v in enumerate(variants) if v.key in (selected or [])]
    if not chosen:
        yield frame("**No variant selected:** tick at least one under **Variants**.")
        return
    try:
        settings = parse_settings(max_new_tokens, temperature, top_k, seed)
    except ValueError as e:
        yield frame(f"**Can't generate:** {e}")
        return
    prompt = prompt or ""
    notes: list[str] = []
    streams: dict[int, TimedStream] = {}
    for i in chosen:
        ids, why = encode_prompt(variants[i].ckpt, prompt)
        notes += [w for w in why if w not in notes]  # variants of one run share a tokenizer: say it once
        texts[i] = variants[i].ckpt.tokenizer.decode(ids)  # the prompt as the model sees it
        streams[i] = TimedStream(variants[i].ckpt, prompt, settings)
    prompts = list(texts)
    info = "".join(f" **Note:** {w}." for w in notes)
    yield frame(f"Generating with {len(chosen)} variant(s), seed {settings.seed}…{info}")

    errors: list[str] = []
    # round-robin, one token per variant per step, so every column fills at the same pace
    while any(not s.done for s in streams.values()):
        for i, s in streams.items():
            if s.done:
                continue
            try:
                s.step()
            except Exception as e:  # a broken variant must not take the page down with a stack trace
                log.exception("generation failed for %s", variants[i].key)
                s.done = True
                errors.append(f"{variants[i].key}: {type(e).__name__}: {e}")
                continue
            if s.gen is not None:
                texts[i] = prompts[i] + s.gen.text
                stats[i] = run_stats(s.gen, s.done) + "  \n" + static_stats(variants[i])
        yield frame(f"Generating with {len(chosen)} variant(s), seed {settings.seed}…{info}")
    for i, s in streams.items():
        if s.gen is not None:
            stats[i] = run_stats(s.gen, True) + "  \n" + static_stats(variants[i])
    fails = "".join(f" **Failed:** {e}." for e in errors)
    yield frame(f"**Done:** {len(chosen)} variant(s), seed {settings.seed}.{info}{fails}")


def _gradio():
    """Gradio, imported only by the demo (it is slow to import, and no other command needs it). No internet
    on the machines this runs on, and a demo has no business phoning home anyway: analytics are off, set
    before gradio is imported because gradio reads it early."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio

    return gradio


def report_section(report_dir: Path) -> None:
    gr = _gradio()
    """The compare table and plot, as `nanogptq compare` left them."""
    table, plot = report_dir / "compare.md", report_dir / "compare.png"
    gr.Markdown("### Comparison on the validation split")
    if table.exists():
        gr.Markdown(table.read_text(), elem_id="report-table")
    if plot.exists():
        gr.Image(str(plot), label="perplexity vs bits per weight", interactive=False, height=420,
                 elem_id="report-plot")
    if not table.exists() and not plot.exists():
        gr.Markdown(f"No report in `{report_dir}/` yet: run `nanogptq compare` to fill this.",
                    elem_id="report-empty")


def build_app(ckpt_paths: list[str] | None = None, report_dir: str | Path | None = None,
              device: str = "cpu", compile: bool = False, dtype: str = "auto") -> gr.Blocks:
    gr = _gradio()
    """The demo page. `report_dir`: the `compare` report to show (default: report_folder's)."""
    paths = [Path(p) for p in ckpt_paths] if ckpt_paths else default_checkpoints()
    report_dir = report_folder(paths, report_dir)
    variants = load_variants(paths, device, compile, dtype)
    attach_report(variants, report_dir)
    if not ckpt_paths:  # the main job's outputs: widest first, so the page reads baseline -> smallest
        variants.sort(key=lambda v: -(v.bits_per_weight or 0))
    n = len(variants)

    with gr.Blocks(title="nanogptq: quantized GPTs side by side") as demo:
        gr.Markdown("## nanogptq: one prompt, every variant")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3, value="ROMEO:", elem_id="prompt")
                keys = [v.key for v in variants]
                picked = gr.CheckboxGroup([(v.label, v.key) for v in variants], value=keys, label="Variants",
                                          elem_id="variants")
            with gr.Column(scale=2):
                with gr.Row():
                    # plain numbers, not sliders: sliders reject out-of-range values with a bare error,
                    # while SampleSettings.validate explains what range is allowed
                    max_new = gr.Number(200, label="max new tokens", precision=0, elem_id="max-new-tokens")
                    temperature = gr.Number(0.8, label="temperature (0 = greedy)", step=0.1,
                                            elem_id="temperature")
                with gr.Row():
                    top_k = gr.Number(40, label="top-k (0 = off)", precision=0, elem_id="top-k")
                    seed = gr.Number(1337, label="seed (same for all)", precision=0, elem_id="seed")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown("Pick variants, type a prompt and press **Generate**.", elem_id="status")

        columns, outs, stats = [], [], []
        with gr.Row(equal_height=False):
            for i, v in enumerate(variants):
                with gr.Column(min_width=240) as col:
                    gr.Markdown(f"#### {v.key} · `{v.method}`")
                    outs.append(gr.Textbox(label="text", lines=12, max_lines=24, interactive=False,
                                           elem_id=f"out-{i}"))
                    stats.append(gr.Markdown(static_stats(v), elem_id=f"stats-{i}"))
                columns.append(col)

        with gr.Accordion("What am I looking at", open=True):
            gr.Markdown(INTRO)
        report_section(report_dir)

        picked.change(lambda sel: [gr.Column(visible=v.key in (sel or [])) for v in variants],
                      inputs=picked, outputs=columns, api_name=False,
                      concurrency_limit=None)  # showing a column must not wait behind a generation
        # named parameters: they are the API's (gradio_client's keyword arguments)
        def on_generate(selected, prompt, max_new_tokens, temperature, top_k, seed) -> Iterator[list]:
            yield from generate_all(variants, selected, prompt, max_new_tokens, temperature, top_k, seed)

        button.click(on_generate,
                     inputs=[picked, prompt, max_new, temperature, top_k, seed],
                     outputs=[status, *outs, *stats], api_name="generate")
    log.info("demo: %d variant(s) on %s (%s)", n, device,
             ", ".join(f"{v.key} on {engine_name(v.ckpt)}" for v in variants))
    return demo


def launch(ckpt_paths: list[str] | None = None, host: str = "127.0.0.1", port: int = 7860,
           report_dir: str | Path | None = None, device: str = "cpu", block: bool = True,
           compile: bool = False, dtype: str = "auto") -> gr.Blocks:
    """Build and serve the demo; block=False returns the running app (call .close() when done). `dtype`:
    the activation dtype, as `nanogptq demo --dtype` (resolve_dtype's names)."""
    report_dir = report_folder([Path(p) for p in ckpt_paths] if ckpt_paths else default_checkpoints(), report_dir)
    demo = build_app(ckpt_paths, report_dir=report_dir, device=device, compile=compile, dtype=dtype)
    # one generation at a time: the models keep a KV cache per module, and CPUs are busy enough;
    # further users wait in the queue (Gradio shows their position) instead of failing
    demo.queue(default_concurrency_limit=1, max_size=32)
    try:
        demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=False,
                    allowed_paths=[str(Path(report_dir).resolve())])
    except OSError as e:
        if "port" not in str(e).lower():
            raise
        raise OSError(f"port {port} on {host} is in use or not allowed; choose another with --port") from None
    return demo

