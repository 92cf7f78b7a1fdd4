"""`--model model.safetensors`: a single-file checkpoint (as A1111, ComfyUI and kohya users have) converted once by
diffusers' from_single_file into a cached diffusers folder, then used like any local model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dreamlora import single_file
from dreamlora.cli import app
from dreamlora.config import ExportConfig, load_config
from dreamlora.export import export_run
from dreamlora.train import resolve_data, train

runner = CliRunner()


def said(output: str) -> str:
    """The output's words without the panel's borders and line breaks."""
    return re.sub(r"[\s│╭╮╰╯─]+", " ", output)


@pytest.fixture
def checkpoint(tmp_path: Path, instance_dir: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A fine-tuned tiny model as one original-layout .safetensors file (dreamlora's merged single-file export), and
    the same model as a diffusers folder; conversions go to a cache of this test's own."""
    cfg, _ = resolve_data(load_config(None, {
        "model.name": "tiny", "data.instance_dir": str(instance_dir), "adapter.init": "nonzero",
        "train.max_steps": "1", "train.num_samples": "0", "train.out": str(tmp_path / "runs" / "lora"),
    }), priors_root=tmp_path / "none")
    run = train(cfg).run_dir
    file = export_run(run, ExportConfig(format="merged", dtype="fp32", single_file=True, out=str(tmp_path / "my-model.safetensors"))).path
    folder = export_run(run, ExportConfig(format="merged", dtype="fp32", out=str(tmp_path / "my-model-diffusers"))).path
    monkeypatch.setenv("DREAMLORA_CACHE", str(tmp_path / "cache"))
    # Offline, the SD 1.x configs and tokenizer come from a local folder of the same architecture (here the tiny model's).
    monkeypatch.setitem(single_file.ARCHITECTURE_CONFIGS, "sd", str(tiny_dir))
    return {"file": file, "folder": folder, "root": tmp_path}


def test_a_single_file_checkpoint_is_converted_once_and_used_as_the_model(checkpoint: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(checkpoint["root"])
    args = ["generate", "--model", "my-model.safetensors", "-p", "a photo of dog", "-n", "1", "--steps", "2"]
    first = runner.invoke(app, [*args, "--out", "first"])
    assert first.exit_code == 0, first.output
    converted = list((checkpoint["root"] / "cache" / "models").iterdir())
    assert len(converted) == 1 and converted[0].name.startswith("my-model-") and (converted[0] / "model_index.json").is_file()
    # The converted UNet and text encoder are the checkpoint's weights (the same model written as a diffusers folder).
    for part, name in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        got, want = load_file(str(converted[0] / part / name)), load_file(str(checkpoint["folder"] / part / name))
        assert got.keys() == want.keys() and all(torch.allclose(got[k].float(), want[k].float(), atol=1e-6) for k in want)
    stamp = (converted[0] / "model_index.json").stat().st_mtime_ns
    second = runner.invoke(app, [*args, "--out", "second"])
    assert second.exit_code == 0, second.output
    assert (converted[0] / "model_index.json").stat().st_mtime_ns == stamp and len(list(converted[0].parent.iterdir())) == 1  # no second conversion
    assert (checkpoint["root"] / "first" / "seed-0.png").read_bytes() == (checkpoint["root"] / "second" / "seed-0.png").read_bytes()
    shown = runner.invoke(app, ["cache"])  # the conversion's disk use is shown beside the latent cache
    assert shown.exit_code == 0 and "converted single-file checkpoints" in shown.output, shown.output
    # prior records the checkpoint by its file name, as A1111 names models.
    prior = runner.invoke(app, ["prior", "--model", "my-model.safetensors", "--class", "dog", "-n", "1", "--steps", "2"])
    assert prior.exit_code == 0, prior.output
    assert json.loads((checkpoint["root"] / "priors" / "dog" / "manifest.json").read_text())["model"] == "my-model.safetensors"
    # The three commands chain on it: train (with that prior set), then export verified against the converted base.
    trained = runner.invoke(app, ["train", "--model", "my-model.safetensors", "--instance", "dog", "--max-steps", "1", "--set", "train.num_samples=0"])
    assert trained.exit_code == 0, trained.output
    exported = runner.invoke(app, ["export", "--format", "a1111"])
    assert exported.exit_code == 0 and "passed" in exported.output, exported.output


def test_a_checkpoint_that_cannot_be_converted_is_one_clear_error(checkpoint: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(checkpoint["root"])
    args = ["generate", "-p", "a photo of dog", "-n", "1", "--steps", "2"]
    # Offline, with no configs for its architecture: it says where they come from and how to pass them.
    monkeypatch.setitem(single_file.ARCHITECTURE_CONFIGS, "sd", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, [*args, "--model", "my-model.safetensors"])
    text = said(result.output)
    assert result.exit_code == 2 and "could not convert the single-file checkpoint 'my-model.safetensors' (sd)" in text, result.output
    assert "--set model.single_file_config=PATH" in text and "Traceback" not in result.output
    assert not (checkpoint["root"] / "cache" / "models").exists() or not any(p.name.startswith("my-model") for p in (checkpoint["root"] / "cache" / "models").iterdir())
    # A LoRA passed as the model, a pickled checkpoint, and a damaged file.
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(checkpoint["root"] / "style.safetensors"))
    (checkpoint["root"] / "old.ckpt").write_bytes(b"\x80\x02}q\x00.")
    (checkpoint["root"] / "cut.safetensors").write_bytes(checkpoint["file"].read_bytes()[:1000])
    for name, message in (
        ("style.safetensors", "is not a Stable Diffusion checkpoint (no model.diffusion_model.* weights) (it looks like a LoRA"),
        ("old.ckpt", "is a pickled single-file checkpoint (.ckpt)"),
        ("cut.safetensors", "could not be read as safetensors"),
    ):
        result = runner.invoke(app, [*args, "--model", name])
        assert result.exit_code == 2 and message in said(result.output), result.output


def test_an_sdxl_checkpoint_converts_with_the_sdxl_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SDXL checkpoints (Stability's SGM layout, OpenCLIP second encoder) are told apart by their tensor names and
    convert through diffusers' SDXL single-file loader; the converted model is SDXL with the file's weights."""
    from dreamlora.config import AdapterConfig
    from dreamlora.lora import adapter_metadata, adapter_state_dicts, attach_adapters, save_diffusers_lora
    from dreamlora.models import build_tiny_sdxl, load_components

    base_dir = build_tiny_sdxl(tmp_path / "tiny-sdxl-wide", text_encoder_2_width=48)  # a wider second encoder, as in SDXL
    components = load_components(str(base_dir))
    torch.manual_seed(3)
    attach_adapters(components.unet, components.text_encoder, AdapterConfig(rank=4, alpha=8.0, init="nonzero"), components.text_encoder_2)
    models = {"unet": components.unet, **components.text_encoders}
    run = tmp_path / "runs" / "xl"
    save_diffusers_lora(run / "lora", adapter_state_dicts(models), {k: adapter_metadata(m) for k, m in models.items()})
    info = {"model": str(base_dir), "family": "sdxl", "resolution": 32, "rank": 4, "alpha": 8.0, "name": "xl",
            "unet_layout": {k: components.unet.config[k] for k in ("layers_per_block", "down_block_types", "up_block_types")}}
    (run / "run.json").write_text(json.dumps(info), encoding="utf-8")
    file = export_run(run, ExportConfig(format="merged", dtype="fp32", single_file=True, out=str(tmp_path / "xl.safetensors"))).path
    folder = export_run(run, ExportConfig(format="merged", dtype="fp32", out=str(tmp_path / "xl-diffusers"))).path
    assert single_file.checkpoint_architecture(file) == ("sdxl", torch.float32, {"prediction_type": "epsilon"})  # from its model spec
    monkeypatch.setenv("DREAMLORA_CACHE", str(tmp_path / "cache"))
    loaded = load_components(str(file), single_file_config=str(base_dir))
    assert loaded.family.name == "sdxl" and loaded.text_encoder_2 is not None
    want = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    got = loaded.unet.state_dict()
    assert all(torch.allclose(got[k].float(), want[k].float(), atol=1e-6) for k in want)
