"""Watching a run: image distances, sample grids with drift every N steps, the curves PNG and tracker logging."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dreamlora import generate
from dreamlora import train as train_module
from dreamlora.cli import app
from dreamlora.config import load_config
from dreamlora.monitor import class_drift, colour_histogram, image_distance, instance_distance, palette_drift
from dreamlora.train import ParkedVae, resolve_data, train


def test_image_distances_by_hand() -> None:
    black, white = Image.new("RGB", (32, 32), "black"), Image.new("RGB", (32, 32), "white")
    half = Image.new("RGB", (32, 32), "black")
    half.paste(white.crop((0, 0, 16, 32)), (0, 0))
    assert image_distance(black, white) == 1.0 and image_distance(half, black) == 0.5
    assert class_drift([black, half], [black, white]) == pytest.approx((0 + 0.5) / 2)
    big_white_photo, big_black_photo = Image.new("RGB", (64, 48), "white"), Image.new("RGB", (80, 80), "black")
    # Each image counts its closest photo (resized to 32 px): black -> 0, half -> 0.5.
    assert instance_distance([black, half], [big_white_photo, big_black_photo]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="size"):
        image_distance(black, Image.new("RGB", (16, 16)))


def test_palette_drift_compares_the_sets_colours_not_seed_by_seed() -> None:
    def disc_at(x: int, colour: str, background: str = "lavender") -> Image.Image:
        image = Image.new("RGB", (32, 32), background)
        image.paste(Image.new("RGB", (8, 8), colour), (x, 12))
        return image

    base = [disc_at(2, "red"), disc_at(20, "red")]
    moved = [disc_at(20, "red"), disc_at(2, "red")]  # the same pictures, seeds swapped: each seed's image changed
    assert class_drift(moved, base) > 0.05 and palette_drift(moved, base) == 0.0
    # The subject's yellow leaking into one of two class images: 64 of 2048 pixels change box.
    leaked = [disc_at(2, "red"), disc_at(20, "yellow")]
    assert palette_drift(leaked, base) == pytest.approx(64 / 2048)
    assert palette_drift([Image.new("RGB", (8, 8), "black")], [Image.new("RGB", (4, 4), "white")]) == 1.0  # sizes may differ
    histogram = colour_histogram(base)
    assert histogram.shape == (64,) and histogram.sum() == pytest.approx(1.0) and (histogram > 0).sum() == 2  # background, disc
    with pytest.raises(ValueError, match="at least one"):
        palette_drift([], base)


def _rows(grid: Path, n_rows: int, n_cols: int, size: int, label_width: int = 160, upscaled: int = 128) -> list[list[Image.Image]]:
    """Cut a grid back into its images at their generated size (nearest-neighbour upscaling is undone exactly)."""
    image = Image.open(grid).convert("RGB")
    return [
        [image.crop((label_width + c * upscaled, r * upscaled, label_width + (c + 1) * upscaled, (r + 1) * upscaled)).resize((size, size), Image.Resampling.NEAREST) for c in range(n_cols)]
        for r in range(n_rows)
    ]


def test_sample_every_writes_grids_drift_and_curves(tmp_path: Path, instance_dir: Path, class_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = generate.generate_images

    def counting(pipeline, prompt, seeds, *args, **kwargs):
        calls.append(prompt)
        return real(pipeline, prompt, seeds, *args, **kwargs)

    monkeypatch.setattr(generate, "generate_images", counting)
    overrides = {
        "model.name": "tiny", "data.instance_dir": str(instance_dir), "data.class_dir": str(class_dir), "data.class_name": "dog",
        "data.resolution": "32", "train.max_steps": "4", "train.sample_every": "2", "train.num_samples": "2", "train.log_every": "10",
        "prior.steps": "2", "train.out": str(tmp_path / "run"), "train.lr": "1e-2", "adapter.init": "gaussian",
    }
    cfg, _ = resolve_data(load_config(None, overrides), priors_root=tmp_path / "none")
    result = train(cfg)
    run = result.run_dir
    # Base images once (2 prompts), then 2 prompts x 2 samples; the final grid reuses the base and the step-4 images.
    assert len(calls) == 2 + 4
    for name in ("step-000002.png", "step-000004.png"):
        with Image.open(run / "samples" / name) as grid:
            grid.verify()
        assert Image.open(run / "samples" / name).size == (160 + 2 * 128, 2 * 128)  # label column, 2 seeds; instance and class rows
    assert Image.open(run / "samples" / "final.png").size == (160 + 2 * 128, 4 * 128)  # base and LoRA rows per prompt
    curves = Image.open(run / "loss.png")
    assert curves.format == "PNG" and curves.size == (700, 900)  # three panels: loss, learning rate, drift
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 4]
    assert "class_drift" not in metrics[0]
    for m in metrics[1:]:
        assert 0 <= m["class_drift"] <= 1 and 0 <= m["class_palette_drift"] <= 1 and 0 < m["instance_distance"] <= 1
    # The logged drift is what the pictures show: step-4 class row against the final grid's base class row.
    step_rows = _rows(run / "samples" / "step-000004.png", 2, 2, 32)
    final_rows = _rows(run / "samples" / "final.png", 4, 2, 32)
    assert final_rows[3] == step_rows[1] or class_drift(final_rows[3], step_rows[1]) < 1e-6  # final LoRA row == last sample
    assert class_drift(step_rows[1], final_rows[2]) == pytest.approx(metrics[-1]["class_drift"], abs=1e-6)
    assert palette_drift(step_rows[1], final_rows[2]) == pytest.approx(metrics[-1]["class_palette_drift"], abs=1e-9)
    assert metrics[-1]["class_drift"] > 0  # a gaussian-initialised LoRA trained at lr 1e-2 moves the class images


def test_report_to_tensorboard_logs_loss_and_drift(tmp_path: Path, instance_dir: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = {
        "model.name": "tiny", "data.instance_dir": str(instance_dir), "data.class_prompt": "a photo of dog", "data.resolution": "32",
        "train.max_steps": "2", "train.sample_every": "2", "train.num_samples": "1", "prior.steps": "1", "train.log_every": "1",
        "train.out": str(tmp_path / "run"), "train.report_to": "tensorboard",
    }
    cfg, _ = resolve_data(load_config(None, overrides), priors_root=tmp_path / "none")
    result = train(cfg)
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss", "instance_loss", "lr", "lr_text_encoder", "class_drift", "class_palette_drift", "instance_distance"} <= set(tags)
    assert [e.step for e in events.Scalars("loss")] == [1, 2] and [e.step for e in events.Scalars("class_drift")] == [2]


def test_missing_tracker_package_exits_2(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    result = CliRunner().invoke(app, ["train", "--model", "tiny", "--instance", str(instance_dir), "--max-steps", "1", "--report-to", "wandb"])
    assert result.exit_code == 2, result.output
    assert "pip install 'dreamlora[wandb]'" in re.sub(r"[│╭╮╰╯─\s]+", " ", result.output) and "Traceback" not in result.output


def test_progress_line_shows_drift(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["train", "--model", "tiny", "--instance", str(instance_dir), "--resolution", "32", "--max-steps", "2", "--sample-every", "1",
            "--num-samples", "1", "--class-prompt", "a photo of dog", "--set", "prior.steps=1", "--snr-gamma", "5", "--noise-offset", "0.05",
            "--sample-prompt", "a photo of sks dog on a beach, at sunset", "--sample-prompt", "a painting of sks dog"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "class drift" in result.output and "palette" in result.output and "subject dist" in result.output
    assert sorted(p.name for p in (tmp_path / "runs").glob("*/samples/*.png")) == ["final.png", "step-000001.png", "step-000002.png"]
    samples = next((tmp_path / "runs").glob("*/samples"))
    # Instance, class, then the two extra prompts: one row each per sampling, base and LoRA rows in the final grid.
    assert Image.open(samples / "step-000002.png").size[1] == 4 * 128 and Image.open(samples / "final.png").size[1] == 8 * 128
    saved = load_config(samples.parent / "config.toml")
    assert saved.train.sample_prompts == ("a photo of sks dog on a beach, at sunset", "a painting of sks dog")  # commas kept


class _Moves(torch.nn.Module):
    """A stand-in VAE that records where it is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.moves: list[str] = []

    def to(self, *args, **kwargs):  # type: ignore[override]
        self.moves.append(str(args[0]))
        return self


def test_parked_vae_leaves_the_gpu_between_samples_and_stays_on_cpu_runs() -> None:
    vae = _Moves()
    parked = ParkedVae(vae, torch.device("cuda"), enabled=True)
    parked.park()
    with parked.on_device():
        assert vae.moves == ["cpu", "cuda"]
    assert vae.moves == ["cpu", "cuda", "cpu"]
    parked.unpark()
    assert vae.moves[-1] == "cuda"
    for device, enabled in ((torch.device("cpu"), True), (torch.device("cuda"), False)):
        idle = _Moves()
        parked = ParkedVae(idle, device, enabled)
        parked.park()
        with parked.on_device():
            pass
        assert idle.moves == [] and not parked.enabled


@pytest.mark.parametrize("center_crop", [True, False])
def test_training_parks_the_vae_only_when_every_latent_is_cached(tmp_path: Path, instance_dir: Path, class_dir: Path, monkeypatch: pytest.MonkeyPatch, center_crop: bool) -> None:
    events: list[str] = []
    real_generate = generate.generate_images

    class Recording(ParkedVae):
        def __init__(self, vae, device, enabled):  # as on a GPU: the decision is the data's
            super().__init__(vae, torch.device("cpu"), enabled)
            self.enabled = enabled
            self.home = True
            events.append(f"enabled={enabled}")

        def park(self) -> None:
            if self.enabled:
                self.home = False
                events.append("park")

        def unpark(self) -> None:
            if self.enabled:
                self.home = True
                events.append("on")

    def generating(pipeline, prompt, seeds, *args, **kwargs):
        events.append("generate" if recorder_home() else "generate while parked")
        return real_generate(pipeline, prompt, seeds, *args, **kwargs)

    recorders: list[Recording] = []
    recorder_home = lambda: not recorders or recorders[0].home  # noqa: E731
    monkeypatch.setattr(train_module, "ParkedVae", lambda *a, **k: recorders.append(Recording(*a, **k)) or recorders[0])
    monkeypatch.setattr(generate, "generate_images", generating)
    overrides = {
        "model.name": "tiny", "data.instance_dir": str(instance_dir), "data.class_dir": str(class_dir), "data.class_name": "dog",
        "data.resolution": "32", "train.max_steps": "2", "train.sample_every": "1", "train.num_samples": "1", "train.log_every": "10",
        "prior.steps": "1", "train.out": str(tmp_path / "run"), "data.center_crop": str(center_crop).lower(),
    }
    cfg, _ = resolve_data(load_config(None, overrides), priors_root=tmp_path / "none")
    train(cfg)
    assert "generate while parked" not in events
    # The monitor draws the base images first (VAE on the device), then the VAE is parked if it can be.
    assert events[:3] == ["generate", "generate", f"enabled={center_crop}"]
    if center_crop:
        # Each sampling (steps 1 and 2) brings it back and parks it after; the final grid brings it back for good.
        assert [e for e in events[3:] if e in ("on", "park")] == ["park", "on", "park", "on", "park", "on"]
    else:
        assert "park" not in events and "on" not in events
