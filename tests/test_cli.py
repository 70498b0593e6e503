"""The command line speaks to users: what the tool does, its version."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nanogptq.cli import build_parser, main, quant_config
from nanogptq.quant.config import QuantConfig


def test_help_says_what_the_tool_does(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "train a small GPT" in out and "quantization" in out
    assert "argument parsing only" not in out
    for command in ("train", "sample", "eval", "quantize", "pack", "compare", "demo"):
        assert command in out


def test_version_answers(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("nanogptq ") and out.split()[1][0].isdigit(), out


def test_every_command_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert p.format_help().strip(), name


def test_the_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "nanogptq", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("nanogptq ")


def test_quantize_preset_takes_the_flags_not_given():
    parse = build_parser().parse_args
    default = quant_config(parse(["quantize", "ck", "--out", "q"]))
    assert default == QuantConfig.preset("quality")  # GPTQ's default setting, --asym's default included
    assert default.fallback and quant_config(parse(["quantize", "ck", "--out", "q", "--symmetric"])).act_order
    plain = quant_config(parse(["quantize", "ck", "--out", "q", "--preset", "plain"]))
    assert plain == QuantConfig()  # the dataclass defaults
    rtn = quant_config(parse(["quantize", "ck", "--out", "q", "--method", "rtn"]))
    assert rtn == QuantConfig(method="rtn")  # round to nearest has none of quality's options
    assert quant_config(parse(["quantize", "ck", "--out", "q", "--target-bpw", "2.5"])).target_bpw == 2.5
    quality = quant_config(parse(["quantize", "ck", "--out", "q", "--preset", "quality", "--bits", "3",
                                  "--no-rotate", "--asym"]))
    assert (quality.method, quality.act_order, quality.clip_search, quality.rotate) == ("gptq", True, True, False)
    assert quality.bits == 3 and not quality.symmetric
    with pytest.raises(SystemExit):
        parse(["quantize", "ck", "--out", "q", "--preset", "best"])
