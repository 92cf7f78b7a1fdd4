"""`--variant fp16` (diffusers' --variant): a model folder's or hub id's `*.fp16.safetensors` weights are read, by
every command that loads the base model of a run; a prior set records the variant."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dreamlora.cli import app

runner = CliRunner()


def said(output: str) -> str:
    return re.sub(r"[\s│╭╮╰╯─]+", " ", output)


@pytest.fixture
def variant_models(tmp_path: Path, tiny_dir: Path) -> dict[str, Path]:
    """The tiny model with fp16-variant weights beside its own ("both"), and with them alone ("only")."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    both, only = tmp_path / "both", tmp_path / "only"
    shutil.copytree(tiny_dir, both)
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        cls.from_pretrained(both / sub, dtype=torch.float16).save_pretrained(both / sub, variant="fp16")
    shutil.copytree(both, only)
    for plain in only.glob("*/*.safetensors"):
        if plain.name.count(".") == 1:
            plain.unlink()
    return {"both": both, "only": only}


def test_variant_weights_are_read_by_prior_train_generate_and_export(
    tmp_path: Path, instance_dir: Path, variant_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    only = str(variant_models["only"])
    prior = ["prior", "--class", "dog", "-n", "2", "--steps", "2"]
    # A folder of fp16 files alone: without --variant the message says which to pass; a variant it lacks, likewise.
    for extra, message in (([], "its weights are fp16-variant files only"), (["--variant", "bf16"], "it has no bf16-variant weights")):
        failed = runner.invoke(app, [*prior, "--model", only, *extra])
        assert failed.exit_code == 2 and message in said(failed.output) and "--variant" in said(failed.output) and "Traceback" not in failed.output, failed.output
    assert not (tmp_path / "priors" / "dog").exists() or not list((tmp_path / "priors" / "dog").glob("*.png"))
    made = runner.invoke(app, [*prior, "--model", only, "--variant", "fp16"])
    assert made.exit_code == 0, made.output
    assert json.loads((tmp_path / "priors" / "dog" / "manifest.json").read_text())["variant"] == "fp16"
    # A set drawn from the fp16 files is not topped up from the full-precision ones of the same model.
    both = str(variant_models["both"])
    plain = runner.invoke(app, [*prior, "--model", both, "--out", "priors/both"])
    assert plain.exit_code == 0, plain.output
    refused = runner.invoke(app, ["prior", "--class", "dog", "-n", "3", "--steps", "2", "--model", both, "--variant", "fp16", "--out", "priors/both"])
    assert refused.exit_code == 2 and "variant: '' -> 'fp16'" in said(refused.output), refused.output

    train = ["train", "--model", only, "--variant", "fp16", "--instance", str(instance_dir), "--max-steps", "2",
             "--set", "adapter.init=nonzero", "--set", "train.num_samples=0"]  # fmt: skip
    trained = runner.invoke(app, [*train, "--class-dir", "priors/dog", "--out", "runs/v"])
    assert trained.exit_code == 0 and "prior set in" not in trained.output, trained.output
    assert tomllib.loads((tmp_path / "runs" / "v" / "config.toml").read_text())["model"]["variant"] == "fp16"
    warned = runner.invoke(app, [*train, "--class-dir", "priors/both", "--max-steps", "1", "--out", "runs/w"])
    assert warned.exit_code == 0 and "the plain weights files (training: fp16)" in said(warned.output), warned.output

    # generate --lora RUN and export load the run's base model the way it was trained: its fp16 files.
    drawn = runner.invoke(app, ["generate", "-p", "a photo of sks dog", "-n", "1", "--steps", "2", "--lora", "runs/v", "--out", "drawn"])
    assert drawn.exit_code == 0 and "(fp16 weights)" in said(drawn.output) and list((tmp_path / "drawn").glob("*seed-0.png")), drawn.output
    exported = runner.invoke(app, ["export", "runs/v", "--format", "a1111", "--out", "v.safetensors"])
    assert exported.exit_code == 0 and "passed" in exported.output, exported.output
    folder = runner.invoke(app, ["export", "runs/v", "--format", "diffusers", "--out", "lora"])
    assert folder.exit_code == 0 and "passed" in folder.output, folder.output
    assert 'from_pretrained("only", variant="fp16", torch_dtype=torch.float16)' in (tmp_path / "lora" / "README.md").read_text()  # the card's code
    merged = runner.invoke(app, ["export", "runs/v", "--format", "merged", "--out", "merged"])
    assert merged.exit_code == 0 and "passed" in merged.output, merged.output

    bad = runner.invoke(app, [*prior, "--model", only, "--variant", "fp16/x"])
    assert bad.exit_code == 2 and "model.variant is a weights-file infix" in said(bad.output), bad.output
