"""`--max-token-length 150|225` (kohya's): long captions read in windows of 75 tokens, encoded one by one and joined."""

import copy
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dreamlora.cli import app
from dreamlora.lora import read_safetensors
from dreamlora.models import encode_prompts, load_components, tokenize, tokenize_all

runner = CliRunner()
LONG = "sks dog " + "sitting on a red sofa in a sunny living room " * 3  # 143 characters: the tiny tokenizer reads one token each


def test_windows_hold_the_prompt_in_order() -> None:
    tokenizer = load_components("tiny").tokenizer
    full = tokenizer(LONG).input_ids  # BOS, 143 tokens, EOS
    ids = tokenize(tokenizer, [LONG, "a photo of sks dog"], 150)
    assert ids.shape == (2, 154)
    first, second = ids[0, :77].tolist(), ids[0, 77:].tolist()
    assert first[0] == second[0] == tokenizer.bos_token_id and first[-1] == second[-1] == tokenizer.eos_token_id
    assert first[1:76] + second[1:76][: len(full) - 76] == full[1:-1] + [tokenizer.eos_token_id]  # content, then EOS, then padding
    assert torch.equal(tokenize(tokenizer, ["a photo"], 75), tokenize(tokenizer, ["a photo"]))  # 75: one window, as before
    small = copy.deepcopy(tokenizer)
    small.model_max_length = 32  # the toy model's window
    assert tokenize(small, [LONG], 75).shape == (1, 32)  # the default is the tokenizer's own window, whatever its size
    assert tokenize(small, [LONG], 150).shape == (1, 5 * 32)  # windows of 30 tokens
    # A tokenizer whose pad is not EOS (SD 2.x, SDXL's second): a window cut mid-prompt ends in EOS, an empty one reads BOS EOS PAD.
    padded = copy.deepcopy(tokenizer)
    padded.pad_token = padded.convert_ids_to_tokens(2)
    ids = tokenize(padded, [LONG, "a photo"], 225)
    windows = ids.reshape(2, 3, 77)
    assert windows[0, 0, -1] == padded.eos_token_id and windows[0, 0, -2] not in (padded.eos_token_id, padded.pad_token_id)
    assert windows[1, 2, :3].tolist() == [padded.bos_token_id, padded.eos_token_id, padded.pad_token_id]


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_windows_are_encoded_alone_and_joined(model: str) -> None:
    components = load_components(model)
    with torch.no_grad():
        joined = encode_prompts(components, tokenize_all(components, [LONG, "a photo of sks dog"], 150))
        windows = [encode_prompts(components, [ids.reshape(2, 2, 77)[:, w] for ids in tokenize_all(components, [LONG, "a photo of sks dog"], 150)]) for w in (0, 1)]
        short = encode_prompts(components, tokenize_all(components, ["a photo of sks dog"]))
    assert joined.context.shape[:2] == (2, 152)  # BOS, 2 x 75, EOS
    assert torch.allclose(joined.context[:, :76], windows[0].context[:, :76], atol=1e-5)  # (batched differently: equal up to rounding)
    assert torch.allclose(joined.context[:, 76:151], windows[1].context[:, 1:76], atol=1e-5)
    assert torch.allclose(joined.context[:, 151], windows[1].context[:, 76], atol=1e-5)
    assert torch.allclose(joined.context[1:, :76], short.context[:, :76], atol=1e-6)  # a short prompt reads as before in its first window
    if joined.pooled is not None:  # SDXL: the pooled prompt is the first window's, as kohya's
        assert torch.allclose(joined.pooled, windows[0].pooled, atol=1e-5) and not torch.allclose(joined.pooled, windows[1].pooled, atol=1e-3)


def test_training_reads_long_captions_whole_and_records_it(tmp_path: Path, instance_dir: Path) -> None:
    (instance_dir / "photo1.txt").write_text(LONG)
    args = ["train", "--model", "tiny", "--instance", str(instance_dir), "--max-steps", "2", "--resolution", "32", "--set", "train.num_samples=0", "--set", "train.log_every=1"]
    cut = runner.invoke(app, [*args, "--out", str(tmp_path / "cut")])
    assert cut.exit_code == 0 and "--max-token-length" in " ".join(cut.output.split()), cut.output
    whole = runner.invoke(app, [*args, "--max-token-length", "150", "--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    assert "are cut there" not in " ".join(whole.output.split())
    losses = [json.loads(line)["loss"] for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < v < float("inf") for v in losses)
    exported = runner.invoke(app, ["export", str(tmp_path / "whole"), "--format", "a1111", "--out", str(tmp_path / "w.safetensors"), "--no-verify"])
    assert exported.exit_code == 0, exported.output
    assert read_safetensors(tmp_path / "w.safetensors")[1]["ss_max_token_length"] == "150"
    bad = runner.invoke(app, [*args, "--max-token-length", "100", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "75, 150 or 225" in " ".join(bad.output.replace("│", " ").split())


def test_the_warning_names_what_tokenize_cuts_for_any_window() -> None:
    from dreamlora.train import warn_long_prompts

    small = copy.deepcopy(load_components("tiny").tokenizer)
    small.model_max_length = 32  # the toy model's window: its default reads 32 tokens, not 77
    forty = "x" * 40  # 42 tokens with BOS and EOS
    assert warn_long_prompts(small, [forty], 75) == [forty] and warn_long_prompts(small, [forty], 150) == []
    assert tokenize(small, [forty], 75).shape == (1, 32)
