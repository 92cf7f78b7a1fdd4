"""`--clip-skip`: prompts read from the text encoder's Nth layer from the end (A1111's "Clip skip", kohya's --clip_skip),
the same in class images, training, exported metadata and `generate`."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dreamlora.cli import app
from dreamlora.config import ModelConfig
from dreamlora.errors import ConfigError
from dreamlora.lora import read_safetensors
from dreamlora.models import apply_clip_skip, load_components, load_model, tokenize

runner = CliRunner()


def _flat(output: str) -> str:
    return " ".join(output.split())


def test_clip_skip_is_the_layer_from_the_end_through_the_final_layer_norm() -> None:
    full = load_components("tiny")
    ids = tokenize(full.tokenizer, ["a photo of sks dog", "a photo of cat"])
    with torch.no_grad():
        hidden = full.text_encoder(ids, output_hidden_states=True).hidden_states
        expected = {skip: full.text_encoder.final_layer_norm(hidden[-skip]) for skip in (2, 3)}
        last = full.text_encoder(ids)[0]
    for skip in (2, 3):
        skipped = load_model(ModelConfig(name="tiny", clip_skip=skip))
        assert skipped.clip_skip == skip and len(skipped.text_encoder.encoder.layers) == 3 - (skip - 1)
        with torch.no_grad():
            got = skipped.text_encoder(ids)[0]
        torch.testing.assert_close(got, expected[skip], rtol=0, atol=1e-6)
        assert (got - last).abs().max() > 1e-3  # another layer's states, not the last one's
        apply_clip_skip(skipped, skip)  # the same value again changes nothing
        assert len(skipped.text_encoder.encoder.layers) == 3 - (skip - 1)
    with pytest.raises(ConfigError, match="more than this model's text encoder has layers"):
        load_model(ModelConfig(name="tiny", clip_skip=4))
    with pytest.raises(ConfigError, match="SDXL models already read"):
        load_model(ModelConfig(name="tiny-sdxl", clip_skip=2))
    with pytest.raises(ConfigError, match=r"model.clip_skip must be in 1..12"):
        ModelConfig(name="tiny", clip_skip=0)


def test_clip_skip_from_class_images_to_training_export_and_generate(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    prior = ["prior", "--model", "tiny", "--class", "dog", "-n", "2", "--steps", "2"]
    drawn = runner.invoke(app, [*prior, "--clip-skip", "2"])
    assert drawn.exit_code == 0, drawn.output
    assert json.loads((tmp_path / "priors" / "dog" / "manifest.json").read_text())["clip_skip"] == 2
    other = runner.invoke(app, [*prior, "-n", "3"])  # topping the set up with the last layer would mix two sets
    assert other.exit_code == 2 and "clip_skip: 2 -> 1" in _flat(other.output) and "Traceback" not in other.output
    assert len(list((tmp_path / "priors" / "dog").glob("*.png"))) == 2

    train = ["train", "--model", "tiny", "--instance", str(instance_dir), "--class", "dog", "--num-class-images", "2", "--max-steps", "2",
             "--set", "adapter.init=nonzero", "--set", "adapter.alpha=8", "--set", "train.num_samples=0"]
    trained = runner.invoke(app, [*train, "--clip-skip", "2", "--out", "runs/skip2"])
    assert trained.exit_code == 0, trained.output
    assert "drawn with clip skip" not in trained.output
    run = tmp_path / "runs" / "skip2"
    assert json.loads((run / "run.json").read_text())["clip_skip"] == 2
    tensors, _ = read_safetensors(run / "lora" / "pytorch_lora_weights.safetensors")
    layers = {int(k.split("layers.")[1].split(".")[0]) for k in tensors if k.startswith("text_encoder.")}
    assert layers == {0, 1}  # the last of the three layers is never read, so it carries no LoRA

    exported = runner.invoke(app, ["export", str(run), "--format", "a1111", "--out", "skip2.safetensors"])
    assert exported.exit_code == 0, exported.output
    _, metadata = read_safetensors(tmp_path / "skip2.safetensors")
    assert metadata["ss_clip_skip"] == "2"
    inspected = runner.invoke(app, ["inspect", str(run)])
    assert inspected.exit_code == 0 and "run clip_skip" in inspected.output and "run prediction_type" in inspected.output

    generate = ["generate", "-p", "a photo of sks dog", "-n", "1", "--steps", "2"]
    from_run = runner.invoke(app, [*generate, "--lora", str(run), "--out", "from-run"])
    assert from_run.exit_code == 0, from_run.output
    assert f"clip skip 2, as run {run} was trained with" in _flat(from_run.output)
    from_file = runner.invoke(app, [*generate, "--model", "tiny", "--lora", "skip2.safetensors", "--out", "from-file"])
    assert from_file.exit_code == 0 and "clip skip 2, as LoRA skip2.safetensors was trained with" in _flat(from_file.output)
    chosen = runner.invoke(app, [*generate, "--model", "tiny", "--lora", "skip2.safetensors", "--clip-skip", "1", "--out", "chosen"])
    assert chosen.exit_code == 0 and "clip skip 2" not in _flat(chosen.output)

    plain = runner.invoke(app, [*train, "--out", "runs/plain"])  # the last layer, on a set drawn at clip skip 2
    assert plain.exit_code == 0, plain.output
    assert "drawn with clip skip 2 but training reads prompts with clip skip 1" in _flat(plain.output)
    mixed = runner.invoke(app, [*generate, "--lora", str(run), "--lora", "runs/plain", "--out", "mixed"])
    assert mixed.exit_code == 2 and "different clip skips: 1 (run runs/plain), 2 (run" in _flat(mixed.output)
    assert not (tmp_path / "mixed").exists()
    sdxl = runner.invoke(app, [*prior, "--model", "tiny-sdxl", "--clip-skip", "2", "--out", "priors/xl"])
    assert sdxl.exit_code == 2 and "SDXL models already read" in _flat(sdxl.output) and "Traceback" not in sdxl.output
