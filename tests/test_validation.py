"""`train --validate-every N`: the loss at fixed timesteps and noise on held-out class images and on the photos."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from dreamlora.cli import app
from dreamlora.config import load_config
from dreamlora.data import list_images
from dreamlora.errors import ConfigError
from dreamlora.models import load_components
from dreamlora.train import DreamBoothBatches, changed_keys, resolve_data, train
from dreamlora.validation import held_out_indices, split_class_folder, validation_timesteps

VALIDATION_KEYS = {"val_class_loss", "val_class_loss_base", "fit_instance_loss", "fit_instance_loss_base"}


def _class_set(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    files = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
        files.append({"file": f"{i:05d}.png", "index": i, "seed": i})
    (folder / "manifest.json").write_text(json.dumps({"model": "tiny", "prompt": "a photo of dog", "class_name": "dog", "files": files, "num_images": count}))
    return folder


def _config(tmp_path: Path, instance_dir: Path, class_dir: Path | None, name: str, model: str = "tiny", **extra: str):
    overrides = {
        "model.name": model, "data.instance_dir": str(instance_dir), "data.resolution": "32", "train.max_steps": "4", "train.lr": "1e-2",
        "adapter.init": "gaussian", "train.num_samples": "0", "train.log_every": "100", "train.out": str(tmp_path / name), **extra,
    }  # fmt: skip
    if class_dir is not None:
        overrides.update({"data.class_dir": str(class_dir), "data.class_name": "dog"})
    else:
        overrides["data.class_prompt"] = "a photo of dog"
    return resolve_data(load_config(None, overrides), priors_root=tmp_path / "none")[0]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_held_out_images_are_spread_over_the_set_and_timesteps_over_the_schedule(tmp_path: Path) -> None:
    assert held_out_indices(10, 4) == [1, 3, 6, 8]
    assert held_out_indices(200, 4) == [25, 75, 125, 175]
    assert held_out_indices(5, 5) == [0, 1, 2, 3, 4]
    assert validation_timesteps(1000) == [100, 300, 500, 700, 900]
    folder = list_images(_class_set(tmp_path / "c", 10), "class")
    kept, held = split_class_folder(folder, 4)
    assert [p.name for p in held.paths] == ["00001.png", "00003.png", "00006.png", "00008.png"]
    assert len(kept.paths) == 6 and not set(kept.paths) & set(held.paths)
    with pytest.raises(ConfigError, match=r"holds out 4 class images, but the class set .* has only 3.*--validation-images"):
        split_class_folder(list_images(_class_set(tmp_path / "small", 3), "class"), 4)


def test_training_never_draws_the_held_out_class_images(tmp_path: Path, instance_dir: Path) -> None:
    class_dir = _class_set(tmp_path / "priors" / "dog", 10)
    cfg = _config(tmp_path, instance_dir, class_dir, "run", **{"train.validate_every": "2", "train.batch_size": "2"})
    batches = DreamBoothBatches(cfg, load_components("tiny"), torch.device("cpu"))
    training = batches.sources[1].dataset.folder.paths
    assert [p.name for p in batches.held_out.folder.paths] == ["00001.png", "00003.png", "00006.png", "00008.png"]
    assert len(training) == 6 and not set(training) & set(batches.held_out.folder.paths)
    plain = DreamBoothBatches(_config(tmp_path, instance_dir, class_dir, "plain"), load_components("tiny"), torch.device("cpu"))
    assert plain.held_out is None and len(plain.sources[1]) == 10  # without --validate-every every class image trains


def test_validation_is_logged_plotted_and_starts_at_the_base_models_loss(tmp_path: Path, instance_dir: Path) -> None:
    class_dir = _class_set(tmp_path / "priors" / "dog", 10)
    # Zero-initialised LoRA (the default): before the first update the model is the base model, so the fixed-noise
    # loss a validation at "step 0" would read must equal the base model's, exactly; a redrawn noise would not.
    cfg = _config(tmp_path, instance_dir, class_dir, "zero", **{"adapter.init": "default", "train.validate_every": "2", "train.lr": "1e-12"})
    metrics = _metrics(train(cfg).run_dir)
    logged = [m for m in metrics if "val_class_loss" in m]
    assert [m["step"] for m in logged] == [2, 4]
    zero_base = logged[0]["val_class_loss_base"]
    for m in logged:  # lr 1e-12: the weights all but stay
        assert m["val_class_loss"] == pytest.approx(m["val_class_loss_base"], rel=1e-6)
        assert m["fit_instance_loss"] == pytest.approx(m["fit_instance_loss_base"], rel=1e-6)
    # Trained (lr 1e-2): the figures move away from the base, which stays fixed through the run.
    extra = {"train.validate_every": "3", "train.checkpoint_every": "2"}
    run = train(_config(tmp_path, instance_dir, class_dir, "run", **extra)).run_dir
    logged = [m for m in _metrics(run) if VALIDATION_KEYS <= m.keys()]
    assert [m["step"] for m in logged] == [3, 4]  # every 3 steps and at the last one
    assert logged[0]["val_class_loss_base"] == logged[1]["val_class_loss_base"] == pytest.approx(zero_base, rel=1e-6)
    # Resumed from step 2, where the LoRA is trained: the base figure is still the base model's (the LoRA switched
    # off), and the readings are the uninterrupted run's.
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    train(_config(tmp_path, instance_dir, class_dir, "resumed", **extra), run_dir=resumed, resume_from=resumed / "checkpoints" / "step-000002")
    again = [m for m in _metrics(resumed) if VALIDATION_KEYS <= m.keys()]
    for key in VALIDATION_KEYS:
        assert [m[key] for m in again] == pytest.approx([m[key] for m in logged], rel=1e-5)
    assert all(abs(m["val_class_loss"] - m["val_class_loss_base"]) > 1e-4 for m in logged)
    assert logged[0]["val_class_loss"] != logged[1]["val_class_loss"]
    info = json.loads((run / "run.json").read_text())
    assert info["validation_class_images"] == ["00001.png", "00003.png", "00006.png", "00008.png"] and info["class_images"] == 6
    assert Image.open(run / "loss.png").size == (700, 900)  # loss, learning rate and a validation panel


def test_validating_does_not_change_what_training_learns(tmp_path: Path, instance_dir: Path) -> None:
    # LoRA dropout draws from the global generator in training mode: validation runs in eval mode and draws nothing.
    class_dir = _class_set(tmp_path / "priors" / "dog", 10)
    loras = []
    for name, every in (("every1", "1"), ("every4", "4")):
        run = train(_config(tmp_path, instance_dir, class_dir, name, **{"train.validate_every": every, "adapter.dropout": "0.2"})).run_dir
        loras.append(load_file(str(run / "lora" / "pytorch_lora_weights.safetensors")))
        assert sum("val_class_loss" in m for m in _metrics(run)) == 4 // int(every)
    assert loras[0].keys() == loras[1].keys()
    assert all(torch.equal(loras[0][k], loras[1][k]) for k in loras[0])


@pytest.mark.parametrize("model,extra", [("tiny-sdxl", {}), ("tiny", {"adapter.pivotal": "true"}), ("tiny", {"data.weighted_captions": "true"})], ids=["sdxl", "pivotal", "weighted"])
def test_validation_runs_with_sdxl_pivotal_tuning_and_weighted_captions(tmp_path: Path, instance_dir: Path, model: str, extra: dict[str, str]) -> None:
    class_dir = _class_set(tmp_path / "priors" / "dog", 6)
    run = train(_config(tmp_path, instance_dir, class_dir, "run", model, **{"train.validate_every": "2", "train.validation_images": "2", **extra})).run_dir
    logged = [m for m in _metrics(run) if VALIDATION_KEYS <= m.keys()]
    assert [m["step"] for m in logged] == [2, 4]
    assert all(np.isfinite(m[k]) and m[k] > 0 for m in logged for k in VALIDATION_KEYS)


def test_without_a_prior_set_only_the_fit_is_measured(tmp_path: Path, instance_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = train(_config(tmp_path, instance_dir, None, "run", **{"train.validate_every": "4"})).run_dir
    last = _metrics(run)[-1]
    assert "fit_instance_loss" in last and "val_class_loss" not in last
    assert "no class images to hold out" in caplog.text


def test_cli_progress_line_and_flag_errors(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    class_dir = _class_set(tmp_path / "priors" / "dog", 5)
    base = ["train", "--model", "tiny", "--instance", str(instance_dir), "--class-dir", str(class_dir), "--resolution", "32", "--max-steps", "2", "--num-samples", "0"]
    result = CliRunner().invoke(app, [*base, "--validate-every", "2", "--validation-images", "1", "--out", "ok"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert re.search(r"step 2 validation: held-out class loss [\d.]+ \(base [\d.]+\), photo fit [\d.]+ \(base [\d.]+\)", text)
    assert re.search(r"│ validation │ held-out class loss [\d.]+ \(base", text)  # and in the summary at the end
    inspected = CliRunner().invoke(app, ["inspect", "ok"])  # and `inspect` of the run folder shows the last reading
    assert inspected.exit_code == 0 and re.search(r"run validation, step 2 │ held-out class loss [\d.]+ \(base", " ".join(inspected.output.split()))
    for args, message in (
        (["--validation-images", "2"], "add --validate-every"),
        (["--validate-every", "1", "--validation-images", "5"], "holds out 5 class images, but the class set"),
        (["--validate-every", "-1"], "train.validate_every must be >= 0"),
    ):
        result = CliRunner().invoke(app, [*base, *args, "--out", "bad"])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()) and "Traceback" not in result.output
        assert not (tmp_path / "bad").exists()  # refused before a run folder is made


def test_resume_may_change_how_often_but_not_whether_it_validates() -> None:
    saved = load_config(None, {"train.validate_every": "50"})
    assert changed_keys(saved, load_config(None, {"train.validate_every": "20"})) == []
    assert changed_keys(saved, load_config(None, {})) == ["train.validate_every: 50 -> 0"]  # the held-out images would train
    assert changed_keys(saved, load_config(None, {"train.validate_every": "50", "train.validation_images": "8"})) == ["train.validation_images: 4 -> 8"]
