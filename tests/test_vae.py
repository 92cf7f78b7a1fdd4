"""`--vae` (a replacement VAE, e.g. madebyollin/sdxl-vae-fp16-fix): class images, training latents, samples,
`generate` and merged exports all use it; a prior set records it and is never topped up without it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from dreamlora.cli import app

runner = CliRunner()


def said(output: str) -> str:
    return re.sub(r"[\s│╭╮╰╯─]+", " ", output)


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.fixture
def other_vae(tmp_path: Path, tiny_dir: Path) -> Path:
    """The tiny model's VAE with every weight moved a little: it encodes and decodes differently."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_dir / "vae")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in vae.parameters():
            param.add_(0.2 * param.abs().mean() * torch.randn(param.shape, generator=generator))
    vae.save_pretrained(tmp_path / "my-vae")
    return tmp_path / "my-vae"


def test_a_replacement_vae_goes_from_class_images_to_training_generate_and_the_merged_export(
    tmp_path: Path, instance_dir: Path, other_vae: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    prior = ["prior", "--model", "tiny", "--class", "dog", "-n", "2", "--steps", "2"]
    # Class images are decoded by the VAE given: another set than the model's own VAE draws at the same seeds.
    made = runner.invoke(app, [*prior, "--vae", str(other_vae)])
    assert made.exit_code == 0, made.output
    manifest = json.loads((tmp_path / "priors" / "dog" / "manifest.json").read_text())
    assert manifest["vae"].startswith("my-vae:") and str(tmp_path) not in json.dumps(manifest)  # its name and fingerprint, no path
    plain = runner.invoke(app, [*prior, "--out", "priors/plain"])
    assert plain.exit_code == 0, plain.output
    assert json.loads((tmp_path / "priors" / "plain" / "manifest.json").read_text())["vae"] == ""
    assert np.abs(_pixels(tmp_path / "priors" / "dog" / "00000.png") - _pixels(tmp_path / "priors" / "plain" / "00000.png")).max() > 10
    # A top-up without it (or with another VAE) would mix two sets: refused, naming the VAE, nothing written.
    for extra in ([], ["--vae", str(tiny_dir)]):  # a model folder's vae/ is a VAE too
        refused = runner.invoke(app, [*prior[:-4], "-n", "3", "--steps", "2", *extra])
        assert refused.exit_code == 2 and "vae: " in said(refused.output) and "Traceback" not in refused.output, refused.output
    assert sorted(p.name for p in (tmp_path / "priors" / "dog").glob("*.png")) == ["00000.png", "00001.png"]

    trained = runner.invoke(app, ["train", "--model", "tiny", "--vae", str(other_vae), "--instance", str(instance_dir), "--class-dir", "priors/dog",
                                  "--max-steps", "2", "--set", "adapter.init=nonzero", "--set", "train.num_samples=0", "--out", "runs/v"])  # fmt: skip
    assert trained.exit_code == 0 and "prior set in" not in trained.output, trained.output
    # A set drawn with another VAE (or model) is used as given, with a warning that says what differs.
    other = ["train", "--model", "tiny", "--instance", str(instance_dir), "--max-steps", "1", "--set", "train.num_samples=0"]
    warned = runner.invoke(app, [*other, "--class-dir", "priors/plain", "--vae", str(other_vae), "--out", "runs/w1"])
    assert warned.exit_code == 0 and "drawn with the model's own VAE (training: VAE 'my-vae')" in said(warned.output), warned.output
    warned = runner.invoke(app, [*other, "--class-dir", "priors/dog", "--out", "runs/w2"])
    assert warned.exit_code == 0 and "drawn with VAE 'my-vae' (training: the model's own VAE)" in said(warned.output), warned.output
    warned = runner.invoke(app, [*other, "--class-dir", "priors/plain", "--model", str(tiny_dir), "--out", "runs/w3"])
    assert warned.exit_code == 0 and f"drawn with the model 'tiny' (training: '{tiny_dir.name}')" in said(warned.output), warned.output

    # generate --lora RUN, without --model, draws on the model the run trained on: its VAE included.
    draw = ["generate", "-p", "a photo of sks dog", "-n", "1", "--steps", "2", "--lora", "runs/v"]
    for out, extra in (("implicit", []), ("explicit", ["--model", "tiny", "--vae", str(other_vae)]), ("own-vae", ["--model", "tiny"])):
        drawn = runner.invoke(app, [*draw, "--out", out, *extra])
        assert drawn.exit_code == 0, drawn.output
    image = {out: _pixels(next((tmp_path / out).glob("*seed-0.png"))) for out in ("implicit", "explicit", "own-vae")}
    assert np.array_equal(image["implicit"], image["explicit"]) and np.abs(image["implicit"] - image["own-vae"]).max() > 10

    # A merged model holds the VAE the run trained with (and says so); the LoRA file records its name, as kohya's.
    merged = runner.invoke(app, ["export", "runs/v", "--format", "merged", "--dtype", "fp32", "--out", "merged"])
    assert merged.exit_code == 0 and "passed" in merged.output, merged.output
    assert "holds the VAE the run trained and sampled with (my-vae)" in said(merged.output)
    written = load_file(str(tmp_path / "merged" / "vae" / "diffusion_pytorch_model.safetensors"))
    wanted = load_file(str(other_vae / "diffusion_pytorch_model.safetensors"))
    assert written.keys() == wanted.keys() and all(torch.equal(written[k], wanted[k].float()) for k in wanted)
    a1111 = runner.invoke(app, ["export", "runs/v", "--format", "a1111", "--out", "v.safetensors"])
    assert a1111.exit_code == 0 and "passed" in a1111.output, a1111.output
    with safe_open(str(tmp_path / "v.safetensors"), framework="pt") as handle:
        assert handle.metadata()["ss_vae_name"] == "my-vae"


def test_a_vae_that_is_not_there_is_one_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vae.safetensors").write_bytes(b"not a folder")
    (tmp_path / "empty").mkdir()
    for ref, message in (
        ("./nope", "--vae folder './nope' does not exist"),
        ("vae.safetensors", "is a single file; pass a diffusers VAE folder"),
        ("empty", "has no config.json"),
    ):
        result = runner.invoke(app, ["prior", "--model", "tiny", "--class", "dog", "-n", "1", "--steps", "2", "--vae", ref])
        assert result.exit_code == 2 and message in said(result.output) and "Traceback" not in result.output, result.output
    assert not (tmp_path / "priors").exists() or not any((tmp_path / "priors").rglob("*.png"))
