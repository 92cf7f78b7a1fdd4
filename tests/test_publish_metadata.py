"""What an a1111 export says about itself for Civitai and LoRA browsers: kohya's training times and the model spec's
date, and the publishing fields (`--title`, `--author`, `--description`, `--license`, `--tags`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dreamlora.cli import app
from dreamlora.lora import read_safetensors

runner = CliRunner()


def test_export_records_training_times_and_publishing_fields(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    train = ["train", "--model", "tiny", "--instance", str(instance_dir), "--set", "train.num_samples=0", "--checkpoint-every", "1", "--out", "runs/rex"]
    first = runner.invoke(app, [*train, "--max-steps", "1"])
    assert first.exit_code == 0, first.output
    info = json.loads(Path("runs/rex/run.json").read_text())
    assert 0 < info["started_at"] <= info["finished_at"]
    resumed = runner.invoke(app, [*train, "--resume", "--max-steps", "2"])
    assert resumed.exit_code == 0, resumed.output
    again = json.loads(Path("runs/rex/run.json").read_text())
    assert again["started_at"] == info["started_at"] and again["finished_at"] >= info["finished_at"]  # the run started once

    exported = runner.invoke(app, ["export", "runs/rex", "--out", "rex.safetensors", "--title", "Rex the dog", "--author", "Ada",
                                   "--description", "My dog, trained with dreamlora", "--license", "CreativeML OpenRAIL-M", "--tags", " dog, pet ,,rex "])  # fmt: skip
    assert exported.exit_code == 0, exported.output
    _, meta = read_safetensors(tmp_path / "rex.safetensors")
    assert meta["ss_training_started_at"] == str(info["started_at"]) and meta["ss_training_finished_at"] == str(again["finished_at"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["modelspec.date"])
    assert {k: meta[k] for k in ("modelspec.title", "modelspec.author", "modelspec.description", "modelspec.license", "modelspec.tags")} == {
        "modelspec.title": "Rex the dog", "modelspec.author": "Ada", "modelspec.description": "My dog, trained with dreamlora",
        "modelspec.license": "CreativeML OpenRAIL-M", "modelspec.tags": "dog, pet, rex",
    }  # fmt: skip
    plain = runner.invoke(app, ["export", "runs/rex", "--out", "plain.safetensors", "--no-verify"])
    assert plain.exit_code == 0, plain.output
    _, meta = read_safetensors(tmp_path / "plain.safetensors")
    assert meta["modelspec.title"] == "plain" and "modelspec.author" not in meta  # fields not given are not written
    wrong = runner.invoke(app, ["export", "runs/rex", "--format", "merged", "--single-file", "--out", "m.safetensors", "--title", "Rex"])
    assert wrong.exit_code == 2 and "drop --single-file) or use --format a1111" in " ".join(wrong.output.replace("│", " ").split())
    assert not Path("m.safetensors").exists()
    folder = runner.invoke(app, ["export", "runs/rex", "--format", "diffusers", "--out", "folder", "--title", "Rex", "--no-verify"])
    assert folder.exit_code == 0, folder.output
    assert "# Rex" in Path("folder/README.md").read_text()  # a folder's fields go into its model card


def test_tag_frequency_counts_the_captions_tags_under_the_photo_folders_name(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kohya's ss_tag_frequency (Civitai shows it as the words a LoRA was trained on): each caption's comma-separated tags
    counted, keyed by the folder's name as ss_dataset_dirs is; it held only the default prompt before, whatever the captions."""
    monkeypatch.chdir(tmp_path)
    (instance_dir / "photo0.txt").write_text("sks dog, on a sofa, red collar")
    (instance_dir / "photo1.txt").write_text("in the snow, sks dog")
    (instance_dir / "photo2.txt").write_text("a red collar")  # the token is prefixed: "sks, a red collar"
    result = runner.invoke(app, ["train", "--model", "tiny", "--instance", str(instance_dir), "--max-steps", "1", "--set", "train.num_samples=0", "--out", "runs/rex"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["export", "runs/rex", "--out", "rex.safetensors", "--no-verify"]).exit_code == 0
    _, meta = read_safetensors(tmp_path / "rex.safetensors")
    assert json.loads(meta["ss_tag_frequency"]) == {
        "dog": {"sks dog": 2, "a photo of sks": 1, "a red collar": 1, "in the snow": 1, "on a sofa": 1, "red collar": 1, "sks": 1},  # no --class: "a photo of sks"
    }
    assert json.loads(meta["ss_dataset_dirs"]).keys() == {"dog"}
    # inspect lists them, most frequent first (the metadata row itself is cut short)
    from dreamlora.inspection import inspect_path

    assert inspect_path(tmp_path / "rex.safetensors")["trained_words"][:2] == [("sks dog", 2), ("a photo of sks", 1)]
    shown = runner.invoke(app, ["inspect", "rex.safetensors"])
    assert shown.exit_code == 0 and "sks dog (2), a photo of sks (1)" in re.sub(r"[\s│]+", " ", shown.output), shown.output
