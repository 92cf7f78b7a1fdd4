"""`--base-weights` (kohya's --base_weights): LoRAs fused into the base model before anything else, so a run trains on
top of them, and its class images, samples, `generate` and merged exports see the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dreamlora.cli import app
from dreamlora.config import ModelConfig
from dreamlora.errors import ConfigError
from dreamlora.generate import load_loras
from dreamlora.models import build_pipeline, load_components, load_model, tokenize

runner = CliRunner()


def _flat(output: str) -> str:
    return " ".join(output.replace("│", " ").split())


def _outputs(components) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokenize(components.tokenizer, ["a photo of sks dog"])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        context = components.text_encoder(ids)[0]
        return context, components.unet(latents, torch.tensor([500]), encoder_hidden_states=context).sample


@pytest.fixture
def style_run(tmp_path: Path, instance_dir: Path) -> Path:
    """A trained run with non-zero LoRA weights on the UNet and the text encoder, to fuse."""
    result = runner.invoke(app, ["train", "--model", "tiny", "--instance", str(instance_dir), "--max-steps", "1", "--set", "adapter.init=nonzero",
                                 "--set", "train.num_samples=0", "--out", str(tmp_path / "runs" / "style")])  # fmt: skip
    assert result.exit_code == 0, result.output
    return tmp_path / "runs" / "style"


def test_base_weights_are_the_lora_fused_at_its_scale(style_run: Path) -> None:
    fused = load_model(ModelConfig(name="tiny", base_weights=(f"{style_run}:0.5",)))
    plain = load_components("tiny")
    adapted = load_components("tiny")
    load_loras(build_pipeline(adapted), [(style_run, 0.5)])  # the same LoRA through diffusers' loader, not fused
    got, want, base = _outputs(fused), _outputs(adapted), _outputs(plain)
    for g, w, b in zip(got, want, base):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
        assert (w - b).abs().max() > 1e-3  # the LoRA changes both parts
    assert not any("lora" in name for name, _ in fused.unet.named_modules())  # fused, no adapters left
    with pytest.raises(ConfigError, match="the scale 'strong' is not a number"):
        ModelConfig(name="tiny", base_weights=(f"{style_run}:strong",))


def test_a_run_on_base_weights_samples_and_exports_on_them(tmp_path: Path, instance_dir: Path, style_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    prior = runner.invoke(app, ["prior", "--model", "tiny", "--class", "dog", "-n", "2", "--steps", "2", "--base-weights", "runs/style:0.5"])
    assert prior.exit_code == 0, prior.output
    recorded = json.loads(Path("priors/dog/manifest.json").read_text())["base_weights"]
    assert len(recorded) == 1 and recorded[0].startswith("style:0.5:")
    topped = runner.invoke(app, ["prior", "--model", "tiny", "--class", "dog", "-n", "3", "--steps", "2"])  # without them: another model
    assert topped.exit_code == 2 and "base_weights" in _flat(topped.output)

    trained = runner.invoke(app, ["train", "--model", "tiny", "--instance", str(instance_dir), "--class", "dog", "--num-class-images", "2", "--max-steps", "1", "--base-weights", "runs/style:0.5",
                                  "--checkpoint-every", "1", "--set", "adapter.init=nonzero", "--set", "train.num_samples=0", "--out", "runs/subject"])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    assert json.loads(Path("runs/subject/run.json").read_text())["base_weights"] == ["style:0.5"]
    generate = ["generate", "-p", "a photo of sks dog", "-n", "1", "--steps", "2", "--lora", "runs/subject"]
    from_run = runner.invoke(app, [*generate, "--out", "from-run"])
    assert from_run.exit_code == 0 and "base weights runs/style:0.5, as run" in _flat(from_run.output), from_run.output
    bare = runner.invoke(app, [*generate, "--model", "tiny", "--out", "bare"])  # another base: no base weights
    assert bare.exit_code == 0 and "base weights" not in _flat(bare.output)
    assert Image.open("from-run/seed-0.png").tobytes() != Image.open("bare/seed-0.png").tobytes()

    # The merged model is base + style + subject: its verification compares it with that reference.
    merged = runner.invoke(app, ["export", "runs/subject", "--format", "merged", "--dtype", "fp32", "--out", "merged"])
    assert merged.exit_code == 0 and "passed" in merged.output, merged.output
    lora = runner.invoke(app, ["export", "runs/subject", "--out", "subject.safetensors"])  # a LoRA file needs no base weights
    assert lora.exit_code == 0 and "passed" in lora.output, lora.output

    # The style LoRA replaced after the run trained on it: generate and a merged export say so (run.json has its hash).
    recorded = json.loads(Path("runs/subject/run.json").read_text())["base_weights_sha256"]
    assert list(recorded) == ["runs/style:0.5"] and len(recorded["runs/style:0.5"]) == 16
    from safetensors.torch import load_file, save_file

    style_file = Path("runs/style/lora/pytorch_lora_weights.safetensors")
    from dreamlora.lora import read_metadata

    save_file({k: v * 2 for k, v in load_file(str(style_file)).items()}, str(style_file), metadata=read_metadata(style_file))
    again = runner.invoke(app, [*generate, "--out", "after-change"])
    assert again.exit_code == 0 and "base weights runs/style:0.5 changed since run runs/subject trained on them" in _flat(again.output), again.output
    remerged = runner.invoke(app, ["export", "runs/subject", "--format", "merged", "--dtype", "fp32", "--out", "merged-2"])
    assert remerged.exit_code == 0 and "changed since the run trained on them" in _flat(remerged.output), remerged.output
    assert "changed since" not in _flat(from_run.output) and "changed since" not in _flat(merged.output)
    resumed = runner.invoke(app, ["train", "--out", "runs/subject", "--resume", "--max-steps", "2"])
    assert resumed.exit_code == 0 and "base weights runs/style:0.5 changed since the run started" in _flat(resumed.output), resumed.output

    missing = runner.invoke(app, ["train", "--model", "tiny", "--instance", str(instance_dir), "--max-steps", "1", "--base-weights", "nowhere.safetensors", "--out", "runs/x"])
    assert missing.exit_code == 2 and "'nowhere.safetensors' does not exist" in _flat(missing.output) and "Traceback" not in missing.output
