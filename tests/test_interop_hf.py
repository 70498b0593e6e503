"""import-hf and export-hf against transformers' own GPT2LMHeadModel: a tiny random GPT-2 with a byte-level
BPE trained here, and checkpoints nanogptq trains for a few steps. Nothing downloads."""

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from nanogptq.app import generate_all, load_variants  # noqa: E402
from nanogptq.checkpoint import load_checkpoint  # noqa: E402
from nanogptq.cli import main  # noqa: E402
from nanogptq.train import TrainConfig, train  # noqa: E402

TOLERANCE = 1e-4


def run_cli(*args) -> None:
    main([str(a) for a in args])


def cli_error(capsys, *args) -> str:
    """The one-line error a bad input gets, exit status 2."""
    capsys.readouterr()  # what earlier calls printed
    with pytest.raises(SystemExit) as e:
        run_cli(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.fixture
def hf_gpt2(tmp_path, text_file) -> tuple[Path, "transformers.GPT2LMHeadModel", Tokenizer]:
    """A random GPT2LMHeadModel (2 layers, 64 wide, tanh GELU) and a 300-token byte-level BPE, saved as a Hub
    repository is: config.json, model.safetensors, tokenizer.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text_file.read_text()], trainer=trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"],
        show_progress=False))
    eot = tok.token_to_id("<|endoftext|>")
    config = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=64, n_layer=2,
                                     n_head=4, layer_norm_epsilon=1e-5, bos_token_id=eot, eos_token_id=eot)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # larger than the init's weights, biases and norms, so that a mix-up shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path / "hf-gpt2"
    model.save_pretrained(folder, safe_serialization=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder, model, tok


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(ids).logits


@torch.no_grad()
def nanogptq_logits(ckpt_path: Path, ids: torch.Tensor) -> torch.Tensor:
    return load_checkpoint(ckpt_path).model(ids)[0]


def test_import_hf_logits_equal_transformers(tmp_path, hf_gpt2, text_file):
    folder, model, tok = hf_gpt2
    run_cli("import-hf", folder, "--out", tmp_path / "ck")
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.model.config.activation == "gelu_tanh" and ck.model.config.bias
    assert ck.model.config.vocab_size == tok.get_vocab_size()  # unpadded
    # the tokenizer is the pretrained one, kept beside config.json (not inside it) and read back
    assert ck.meta["tokenizer"]["kind"] == "pretrained" and (tmp_path / "ck" / "tokenizer.json").is_file()
    text = text_file.read_text()[:400]
    assert ck.tokenizer.encode(text) == tok.encode(text).ids
    ids = torch.tensor([tok.encode(text).ids[:64]])
    with torch.no_grad():
        expected = model(ids).logits
    assert (ck.model(ids)[0] - expected).abs().max().item() <= TOLERANCE


def test_imported_checkpoint_evaluates_quantizes_compares_and_samples(tmp_path, hf_gpt2, text_file, capsys):
    folder, _, _ = hf_gpt2
    ck, dataset = tmp_path / "ck", f"file:{text_file}"
    run_cli("import-hf", folder, "--out", ck)
    capsys.readouterr()
    # no training data: evaluation needs --dataset, and says so in one line
    assert "--dataset" in cli_error(capsys, "eval", ck, "--device", "cpu")
    run_cli("eval", ck, "--device", "cpu", "--dataset", dataset)
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == dataset and result["val_tokens"] > 100 and result["val_ppl"] > 1
    assert load_checkpoint(ck).meta["metrics"]["val_ppl"] == result["val_ppl"]
    # GPTQ calibrates on the text's train split; RTN needs no data
    assert "--dataset" in cli_error(capsys, "quantize", ck, "--method", "gptq", "--out", tmp_path / "q")
    run_cli("quantize", ck, "--method", "gptq", "--bits", "4", "--group-size", "32", "--calib-samples", "8",
            "--dataset", dataset, "--device", "cpu", "--out", tmp_path / "gptq4")
    run_cli("quantize", ck, "--method", "rtn", "--bits", "8", "--device", "cpu", "--out", tmp_path / "rtn8")
    gptq = load_checkpoint(tmp_path / "gptq4")  # the tokenizer file travelled with it
    assert gptq.meta["calibration"] == {"dataset": dataset} and gptq.tokenizer.to_dict() == \
        load_checkpoint(ck).tokenizer.to_dict()
    capsys.readouterr()
    run_cli("compare", ck, tmp_path / "gptq4", tmp_path / "rtn8", "--dataset", dataset, "--device", "cpu",
            "--out", tmp_path / "report")
    rows = json.loads((tmp_path / "report" / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["fp32", "gptq", "rtn"]
    assert rows[0]["val_ppl"] == pytest.approx(result["val_ppl"])
    assert rows[2]["val_ppl"] == pytest.approx(rows[0]["val_ppl"], rel=0.02)  # 8 bits per channel: close
    capsys.readouterr()
    run_cli("sample", tmp_path / "gptq4", "--prompt", "the cat", "--max-new-tokens", "8", "--device", "cpu")
    assert capsys.readouterr().out.startswith("the cat")
    # the demo's path: every variant loads and streams, none fails
    variants = load_variants([ck, tmp_path / "gptq4"], "cpu")
    last = list(generate_all(variants, [v.key for v in variants], "the cat", 6, 0.8, 40, 1337))[-1]
    assert last[0].startswith("**Done:** 2 variant(s)") and "Failed" not in last[0]
    assert all(text.startswith("the cat") and len(text) > len("the cat") for text in last[1:3])


@pytest.mark.parametrize("tokenizer", ["char", "byte", "bpe"])
def test_export_hf_of_a_trained_checkpoint(tmp_path, text_file, tokenizer, capsys):
    # nanogptq's own models: exact GELU, no biases, char/byte/bpe tokenizers
    run = train(TrainConfig(dataset=f"file:{text_file}", tokenizer=tokenizer, vocab_size=300,
                            out_dir=str(tmp_path / "run"), max_steps=3, batch_size=4, eval_interval=3,
                            eval_batches=1, progress=False))
    ck = load_checkpoint(run / "last")
    assert ck.model.config.activation == "gelu" and not ck.model.config.bias
    run_cli("export-hf", run / "last", "--out", tmp_path / "hf")
    err = capsys.readouterr().err
    assert "'gelu'" in err and "zeros" in err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["activation_function"] == "gelu"
    text = text_file.read_text()[:300]
    ids = torch.tensor([ck.tokenizer.encode(text)[:128]])
    assert (hf_logits(tmp_path / "hf", ids) - nanogptq_logits(run / "last", ids)).abs().max().item() <= TOLERANCE
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")  # gives nanogptq's ids
    assert hf_tok(text)["input_ids"] == ck.tokenizer.encode(text)
    assert hf_tok.decode(ck.tokenizer.encode(text)) == text


def test_export_hf_of_imported_and_quantized_checkpoints(tmp_path, hf_gpt2, text_file, capsys):
    folder, model, tok = hf_gpt2
    run_cli("import-hf", folder, "--out", tmp_path / "ck")
    run_cli("quantize", tmp_path / "ck", "--method", "gptq", "--bits", "4", "--group-size", "32", "--act-order",
            "--calib-samples", "8", "--dataset", f"file:{text_file}", "--device", "cpu", "--out", tmp_path / "q4")
    ids = torch.tensor([tok.encode(text_file.read_text()[:400]).ids[:64]])
    run_cli("export-hf", tmp_path / "ck", "--out", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["activation_function"] == "gelu_new" and config["vocab_size"] == tok.get_vocab_size()
    exported = hf_logits(tmp_path / "hf", ids)
    assert (exported - nanogptq_logits(tmp_path / "ck", ids)).abs().max().item() <= TOLERANCE
    with torch.no_grad():
        assert (exported - model(ids).logits).abs().max().item() <= TOLERANCE  # the round trip
    capsys.readouterr()
    run_cli("export-hf", tmp_path / "q4", "--out", tmp_path / "hf-q4")
    assert "dequantized" in capsys.readouterr().err  # the command says what it wrote
    quantized = nanogptq_logits(tmp_path / "q4", ids)  # the stored model's exact reference path
    assert (hf_logits(tmp_path / "hf-q4", ids) - quantized).abs().max().item() <= TOLERANCE
    assert (quantized - exported).abs().max().item() > 10 * TOLERANCE  # 4 bits did change the model
    # a second export into the same folder needs --overwrite; a checkpoint folder is never replaced
    assert "--overwrite" in cli_error(capsys, "export-hf", tmp_path / "q4", "--out", tmp_path / "hf-q4")
    run_cli("export-hf", tmp_path / "q4", "--out", tmp_path / "hf-q4", "--overwrite")
    assert "not a transformers GPT-2 folder" in cli_error(capsys, "export-hf", tmp_path / "q4", "--out",
                                                          tmp_path / "ck", "--overwrite")


def test_import_hf_bad_inputs_are_one_line_errors(tmp_path, hf_gpt2, capsys):
    folder, _, _ = hf_gpt2
    # weights as a pickle only: refused, never unpickled
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((folder / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    (pickled / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
    assert "pytorch_model.bin" in cli_error(capsys, "import-hf", pickled, "--out", tmp_path / "a")
    # another architecture is named
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    assert "LlamaForCausalLM" in cli_error(capsys, "import-hf", llama, "--out", tmp_path / "a")
    # no tokenizer.json
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((folder / name).read_bytes())
    assert "tokenizer.json" in cli_error(capsys, "import-hf", bare, "--out", tmp_path / "a")
    # an --out that holds something else
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "not a nanogptq checkpoint" in cli_error(capsys, "import-hf", folder, "--out", other)
    assert (other / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "a").exists()  # nothing written by the refused imports
    # a path that is neither a folder nor a Hub id
    assert "no such folder" in cli_error(capsys, "import-hf", tmp_path / "missing", "--out", tmp_path / "a")


def test_import_hf_from_a_hub_id_fetches_three_files(tmp_path, hf_gpt2, monkeypatch, capsys):
    # the Hub itself is not reached in tests: snapshot_download stands in, handing back the local folder
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.errors import LocalEntryNotFoundError
    folder, _, _ = hf_gpt2
    asked = []

    def fake_download(repo_id, allow_patterns):
        asked.append((repo_id, sorted(allow_patterns)))
        if repo_id != "someone/tiny-gpt2":
            raise LocalEntryNotFoundError("no such repository, and no cached copy")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    run_cli("import-hf", "someone/tiny-gpt2", "--out", tmp_path / "ck")
    assert asked == [("someone/tiny-gpt2", ["config.json", "model.safetensors", "tokenizer.json"])]
    assert load_checkpoint(tmp_path / "ck").meta["imported"]["source"] == "hf:someone/tiny-gpt2"
    assert "not fetched from the Hub" in cli_error(capsys, "import-hf", "nobody/nothing", "--out", tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_trained_checkpoint_keeps_its_own_data(tmp_path, text_file, capsys):
    run = train(TrainConfig(dataset=f"file:{text_file}", out_dir=str(tmp_path / "run"), max_steps=2, batch_size=4,
                            eval_interval=2, eval_batches=1, progress=False))
    other = tmp_path / "other.txt"
    other.write_text(text_file.read_text()[::-1])
    assert "--dataset is for checkpoints without training data" in cli_error(
        capsys, "eval", run / "last", "--device", "cpu", "--dataset", f"file:{other}")
    run_cli("eval", run / "last", "--device", "cpu", "--dataset", f"file:{text_file}", "--no-save")  # its own: fine


def test_the_commands_are_named_for_what_they_do(capsys):
    from nanogptq.cli import build_parser
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert {"import-hf", "export-hf", "pack"} <= set(commands) and "export" not in commands  # pack packs
    for command in ("import-hf", "export-hf"):
        with pytest.raises(SystemExit) as e:
            run_cli(command, "--help")
        assert e.value.code == 0 and f"usage: nanogptq {command}" in capsys.readouterr().out
