"""`--epochs`: a run's length as passes over the photos (kohya's max_train_epochs), and the training record kohya
writes into A1111 files (`ss_num_epochs`, `ss_learning_rate`, ...), which Civitai and LoRA browsers show."""

import json
import re
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from dreamlora.cli import app
from dreamlora.config import load_config, replace
from dreamlora.dataset_report import build_dataset_report, model_geometry
from dreamlora.train import resolve_epochs

runner = CliRunner()


def _flat(output: str) -> str:
    return " ".join(output.split())


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata())


@pytest.mark.parametrize(
    "settings, processes, per_epoch",
    [
        ({}, 1, 4),  # 4 photos, batch 1
        ({"data.repeats": "2", "train.batch_size": "3"}, 1, 3),  # 8 views in batches of 3
        ({"data.repeats": "2", "train.gradient_accumulation": "2"}, 1, 4),  # 8 micro-batches, 2 per step
        ({"data.repeats": "2"}, 2, 4),  # two processes draw 2 batches per step
        ({"data.buckets": "true", "train.batch_size": "2"}, 1, 3),  # buckets: 2 wide photos in one batch, 3 square in two
    ],
)
def test_epochs_count_the_batches_the_run_draws(tmp_path: Path, settings: dict, processes: int, per_epoch: int) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, size in enumerate([(40, 40), (40, 40), (40, 40), (80, 40), (80, 40)] if "data.buckets" in settings else [(40, 40)] * 4):
        Image.new("RGB", size, (200, 40 * i, 30)).save(folder / f"{i}.png")
    cfg = load_config(None, {"model.name": "tiny", "data.instance_dir": str(folder), "train.epochs": "3", **settings})
    resolved = resolve_epochs(cfg, processes)
    assert resolved.train.max_steps == 3 * per_epoch
    if processes == 1:  # what `dreamlora dataset` reports for the same settings, at the model's resolution
        native, factor = model_geometry("tiny")
        report = build_dataset_report(replace(resolved, data=replace(resolved.data, resolution=native)), factor, tmp_path / "sheet.png")
        assert report.steps_per_epoch == per_epoch and report.epochs == pytest.approx(3.0)
    assert resolve_epochs(load_config(None, {"model.name": "tiny", "data.instance_dir": str(folder), "train.max_steps": "7"})).train.max_steps == 7


def test_epochs_through_train_resume_and_the_exported_training_record(tmp_path: Path, instance_dir: Path, class_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    train = ["train", "--model", "tiny", "--instance", str(instance_dir), "--class-dir", str(class_dir), "--repeats", "2",
             "--lr", "2e-4", "--set", "adapter.init=nonzero", "--set", "train.num_samples=0", "--checkpoint-every", "4", "--keep-checkpoints", "9", "--out", "runs/ep"]
    both = runner.invoke(app, [*train, "--epochs", "2", "--max-steps", "5"])
    assert both.exit_code == 2 and "--max-steps and --epochs both set the run's length; pass one" in _flat(both.output)
    assert not (tmp_path / "runs").exists()

    trained = runner.invoke(app, [*train, "--epochs", "2"])  # 4 photos x 2 repeats at batch 1: 8 steps an epoch
    assert trained.exit_code == 0, trained.output
    run = tmp_path / "runs" / "ep"
    info = json.loads((run / "run.json").read_text())
    assert info["steps"] == info["max_steps"] == 16 and info["steps_per_epoch"] == 8
    assert info["instance_images"] == 4 and info["class_images"] == 6

    extended = runner.invoke(app, ["train", "--resume", "--out", "runs/ep", "--epochs", "3"])  # the constant schedule extends
    assert extended.exit_code == 0, extended.output
    assert json.loads((run / "run.json").read_text())["steps"] == 24

    exported = runner.invoke(app, ["export", str(run), "--format", "a1111", "--out", "ep.safetensors"])
    assert exported.exit_code == 0, exported.output
    meta = _metadata(tmp_path / "ep.safetensors")
    assert meta["ss_steps"] == meta["ss_max_train_steps"] == "24"
    assert meta["ss_num_epochs"] == meta["ss_epoch"] == "3" and meta["ss_num_batches_per_epoch"] == "8"
    assert meta["ss_num_train_images"] == "8" and meta["ss_num_reg_images"] == "6"
    assert json.loads(meta["ss_dataset_dirs"]) == {"dog": {"n_repeats": 2, "img_count": 4}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"dog": {"n_repeats": 1, "img_count": 6}}
    assert meta["ss_learning_rate"] == meta["ss_unet_lr"] == meta["ss_text_encoder_lr"] == "0.0002"
    assert meta["ss_optimizer"] == "torch.optim.AdamW" and meta["ss_lr_scheduler"] == "constant" and meta["ss_mixed_precision"] == "no"
    assert meta["ss_prior_loss_weight"] == "1.0" and meta["ss_min_snr_gamma"] == meta["ss_noise_offset"] == "None"
    assert meta["ss_batch_size_per_device"] == meta["ss_total_batch_size"] == "1" and meta["ss_flip_aug"] == "False"
    assert str(tmp_path) not in json.dumps(meta)

    checkpoint = runner.invoke(app, ["export", str(run), "--step", "8", "--format", "a1111", "--out", "ep8.safetensors"])
    assert checkpoint.exit_code == 0, checkpoint.output
    meta = _metadata(tmp_path / "ep8.safetensors")
    assert meta["ss_steps"] == "8" and meta["ss_epoch"] == "1" and meta["ss_max_train_steps"] == "24"

    report = runner.invoke(app, ["dataset", str(instance_dir), "--model", "tiny", "--repeats", "2", "--epochs", "2"])
    assert report.exit_code == 0, report.output
    assert re.search(r"max steps\W+16\b", report.output) and re.search(r"steps per epoch\W+8\b", report.output)


def test_checkpoints_and_samples_every_n_epochs(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kohya's --save_every_n_epochs/--sample_every_n_epochs: the cadence in epochs becomes steps as the run draws them."""
    monkeypatch.chdir(tmp_path)
    cfg = resolve_epochs(load_config(None, {"data.instance_dir": str(instance_dir), "data.repeats": "2", "train.checkpoint_every_epochs": "2", "train.sample_every_epochs": "3"}))
    assert (cfg.train.checkpoint_every, cfg.train.sample_every, cfg.train.max_steps) == (16, 24, 800)  # 8 steps an epoch; the length stays --max-steps

    base = ["train", "--model", "tiny", "--instance", str(instance_dir), "--class", "dog", "--num-class-images", "2", "--epochs", "3",
            "--set", "train.num_samples=1", "--set", "prior.steps=1", "--set", "train.keep_checkpoints=5"]  # fmt: skip
    both = runner.invoke(app, [*base, "--checkpoint-every", "2", "--checkpoint-every-epochs", "1", "--out", "runs/bad"])
    assert both.exit_code == 2 and "--checkpoint-every and --checkpoint-every-epochs both set" in _flat(both.output)
    assert not (tmp_path / "runs" / "bad").exists()
    result = runner.invoke(app, [*base, "--checkpoint-every-epochs", "1", "--sample-every-epochs", "2", "--out", "runs/every"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "every"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000008", "step-000012"]  # 4 photos: 4 steps an epoch
    assert (run / "samples" / "step-000008.png").is_file() and not (run / "samples" / "step-000004.png").is_file()
    saved = load_config(run / "config.toml")
    assert (saved.train.checkpoint_every, saved.train.sample_every, saved.train.max_steps) == (4, 8, 12)
