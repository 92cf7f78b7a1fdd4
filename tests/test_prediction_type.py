"""What the UNet predicts: `--prediction-type` (kohya's --v_parameterization) for models whose files do not say so,
single-file checkpoints marked `v_pred`/`ztsnr` as ComfyUI reads them, and the choice carried through class images,
training targets, exported metadata, merged checkpoints and `generate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dreamlora import single_file
from dreamlora.cli import app
from dreamlora.config import ModelConfig
from dreamlora.errors import ConfigError
from dreamlora.lora import read_safetensors
from dreamlora.models import load_components, load_model
from dreamlora.train import diffusion_target

runner = CliRunner()


def _flat(output: str) -> str:
    return " ".join(output.replace("│", " ").split())


def test_the_override_changes_what_training_and_sampling_take_the_unet_to_predict() -> None:
    native = load_model(ModelConfig(name="tiny"))
    chosen = load_model(ModelConfig(name="tiny", prediction_type="v_prediction"))
    assert native.prediction_type == "epsilon" and chosen.prediction_type == "v_prediction"
    latents, noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([10, 900])
    alphas = chosen.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(diffusion_target(chosen.noise_scheduler, latents, noise, timesteps), alphas.sqrt() * noise - (1 - alphas).sqrt() * latents)
    assert torch.equal(diffusion_target(native.noise_scheduler, latents, noise, timesteps), noise)
    assert load_model(ModelConfig(name="tiny-v", prediction_type="epsilon")).prediction_type == "epsilon"
    assert load_model(ModelConfig(name="tiny-v")).prediction_type == "v_prediction"  # auto: the model's own config
    with pytest.raises(ConfigError, match="model.prediction_type must be one of auto, epsilon, v_prediction; got 'sample'"):
        ModelConfig(name="tiny", prediction_type="sample")


def test_prediction_type_from_class_images_to_training_export_and_generate(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    prior = ["prior", "--model", "tiny", "--class", "dog", "-n", "2", "--steps", "2"]
    drawn = runner.invoke(app, [*prior, "--prediction-type", "v_prediction"])
    assert drawn.exit_code == 0, drawn.output
    assert json.loads((tmp_path / "priors" / "dog" / "manifest.json").read_text())["prediction_type"] == "v_prediction"
    other = runner.invoke(app, [*prior, "-n", "3"])  # topping the set up as epsilon would mix two sets
    assert other.exit_code == 2 and "prediction_type: 'v_prediction' -> 'epsilon'" in _flat(other.output) and "Traceback" not in other.output
    bad = runner.invoke(app, [*prior, "--prediction-type", "v"])
    assert bad.exit_code == 2 and "model.prediction_type must be one of auto, epsilon, v_prediction" in _flat(bad.output)

    train = ["train", "--model", "tiny", "--instance", str(instance_dir), "--class", "dog", "--num-class-images", "2", "--max-steps", "1",
             "--set", "adapter.init=nonzero", "--set", "train.num_samples=0"]
    trained = runner.invoke(app, [*train, "--prediction-type", "v_prediction", "--out", "runs/v"])
    assert trained.exit_code == 0, trained.output
    run = tmp_path / "runs" / "v"
    assert json.loads((run / "run.json").read_text())["prediction_type"] == "v_prediction"

    exported = runner.invoke(app, ["export", str(run), "--format", "a1111", "--out", "v.safetensors"])
    assert exported.exit_code == 0, exported.output
    _, metadata = read_safetensors(tmp_path / "v.safetensors")
    assert metadata["ss_v_parameterization"] == "True" and metadata["modelspec.prediction_type"] == "v"

    generate = ["generate", "-p", "a photo of sks dog", "-n", "1", "--steps", "2"]
    from_run = runner.invoke(app, [*generate, "--lora", str(run), "--out", "from-run"])
    assert from_run.exit_code == 0 and f"prediction type v_prediction, as run {run} was trained for" in _flat(from_run.output), from_run.output
    from_file = runner.invoke(app, [*generate, "--model", "tiny", "--lora", "v.safetensors", "--out", "from-file"])
    assert from_file.exit_code == 0 and "prediction type v_prediction, as LoRA v.safetensors was trained for" in _flat(from_file.output)
    chosen = runner.invoke(app, [*generate, "--model", "tiny", "--lora", "v.safetensors", "--prediction-type", "epsilon", "--out", "chosen"])
    assert chosen.exit_code == 0 and "prediction type v_prediction" not in _flat(chosen.output)
    # The same seed drawn as v-prediction and as epsilon are different images: the choice reached the sampler.
    assert (tmp_path / "from-file" / "seed-0.png").read_bytes() != (tmp_path / "chosen" / "seed-0.png").read_bytes()

    plain = runner.invoke(app, [*train, "--out", "runs/plain", "--class-dir", "priors/dog"])  # the model's own: auto, recorded as such
    assert plain.exit_code == 0, plain.output
    assert json.loads((tmp_path / "runs" / "plain" / "run.json").read_text())["prediction_type"] == "epsilon"
    mixed = runner.invoke(app, [*generate, "--lora", str(run), "--lora", "runs/plain", "--out", "mixed"])
    assert mixed.exit_code == 2 and "different prediction types: auto (run runs/plain), v_prediction (run" in _flat(mixed.output)
    assert not (tmp_path / "mixed").exists()


def test_markers_say_what_a_checkpoint_predicts() -> None:
    assert single_file.marked_scheduler_settings(["model.diffusion_model.x"], {}) == {}
    assert single_file.marked_scheduler_settings(["v_pred"], {}) == {"prediction_type": "v_prediction"}
    assert single_file.marked_scheduler_settings([], {"modelspec.prediction_type": "v"}) == {"prediction_type": "v_prediction"}
    assert single_file.marked_scheduler_settings([], {"modelspec.prediction_type": "epsilon"}) == {"prediction_type": "epsilon"}
    assert single_file.marked_scheduler_settings(["v_pred", "ztsnr"], {}) == {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    assert set(single_file.scheduler_markers({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True})) == {"v_pred", "ztsnr"}
    assert single_file.scheduler_markers({"prediction_type": "epsilon"}) == {}


def test_a_v_prediction_model_survives_the_single_file_round_trip(tmp_path: Path, instance_dir: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A merged single-file export of a v-prediction run carries `v_pred`; converting it back (with the configs of an
    epsilon model of the same architecture, as diffusers would take them from the hub) gives a v-prediction model."""
    monkeypatch.chdir(tmp_path)
    trained = runner.invoke(app, ["train", "--model", "tiny", "--instance", str(instance_dir), "--max-steps", "1", "--prediction-type", "v_prediction",
                                  "--set", "adapter.init=nonzero", "--set", "train.num_samples=0", "--out", "runs/v"])
    assert trained.exit_code == 0, trained.output
    exported = runner.invoke(app, ["export", "runs/v", "--format", "merged", "--single-file", "--dtype", "fp32", "--out", "v-model.safetensors"])
    assert exported.exit_code == 0 and "passed" in exported.output, exported.output
    with safe_open(str(tmp_path / "v-model.safetensors"), framework="pt") as handle:
        assert "v_pred" in handle.keys() and "ztsnr" not in handle.keys()
        assert handle.metadata()["modelspec.prediction_type"] == "v"
    folder = runner.invoke(app, ["export", "runs/v", "--format", "merged", "--dtype", "fp32", "--out", "v-folder"])
    assert folder.exit_code == 0, folder.output
    assert json.loads((tmp_path / "v-folder" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"

    inspected = runner.invoke(app, ["inspect", "v-model.safetensors"])  # a model file: what it predicts, no LoRA problems
    said = _flat(inspected.output)
    assert inspected.exit_code == 0 and "single-file checkpoint" in said and "v_prediction (marked in the file)" in said and "no problems found" in said, said
    monkeypatch.setenv("DREAMLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(single_file.ARCHITECTURE_CONFIGS, "sd", str(tiny_dir))  # offline: an epsilon model's configs
    assert load_components("v-model.safetensors").prediction_type == "v_prediction"
    # A zero-terminal-SNR marker added to the file: its conversion (a new one: the file changed) rescales the schedule.
    tensors = load_file(str(tmp_path / "v-model.safetensors"))
    save_file({**tensors, "ztsnr": torch.zeros(0)}, str(tmp_path / "ztsnr-model.safetensors"))
    marked = load_components("ztsnr-model.safetensors")
    assert marked.prediction_type == "v_prediction" and marked.noise_scheduler.config.rescale_betas_zero_snr
    assert marked.noise_scheduler.alphas_cumprod[-1] < 1e-6 < load_components("v-model.safetensors").noise_scheduler.alphas_cumprod[-1]
    # A LoRA trained on it says what it was trained for, though no flag asked for v-prediction or zero-terminal SNR.
    on_marked = runner.invoke(app, ["train", "--model", "ztsnr-model.safetensors", "--instance", str(instance_dir), "--max-steps", "1",
                                    "--set", "train.num_samples=0", "--out", "runs/on-marked"])  # fmt: skip
    assert on_marked.exit_code == 0, on_marked.output
    exported = runner.invoke(app, ["export", "runs/on-marked", "--out", "on-marked.safetensors", "--no-verify"])
    assert exported.exit_code == 0, exported.output
    _, metadata = read_safetensors(tmp_path / "on-marked.safetensors")
    assert metadata["ss_v_parameterization"] == "True" and metadata["ss_zero_terminal_snr"] == "True"
    # A folder converted before dreamlora read the markers (its scheduler says epsilon) is corrected on its next use.
    converted = next(p for p in (tmp_path / "cache" / "models").iterdir() if p.name.startswith("v-model-"))
    config_file = converted / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "epsilon"}))
    assert load_components("v-model.safetensors").prediction_type == "v_prediction"
    assert json.loads(config_file.read_text())["prediction_type"] == "v_prediction"
