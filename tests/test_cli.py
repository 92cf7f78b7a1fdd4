import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dreamlora.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def flat(output: str) -> str:
    """Output without rich's panel borders and line wrapping."""
    return re.sub(r"[│╭╮╰╯─\s]+", " ", output)


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("prior", "train", "export", "generate", "inspect", "convert"):
        assert command in result.output


def test_train_with_the_sample_config(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "--config", str(ROOT / "samples" / "tiny.toml"), "--instance", str(instance_dir), "--max-steps", "3"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "priors" / "dog" / "manifest.json").is_file()  # --class from the config generated the prior set first
    info = json.loads((tmp_path / "runs" / "sks-dog" / "run.json").read_text())
    assert info["with_prior"] and info["steps"] == 3 and info["alpha"] == 8.0
    said = " ".join(result.output.split())
    assert "next: dreamlora export runs/sks-dog --format a1111" in said and 'dreamlora generate --lora runs/sks-dog -p "a photo of sks dog" --compare' in said


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--instance", "missing-folder"], "does not exist"),
        (["train", "--instance", "{instance}", "--set", "train.max_step=3"], "did you mean"),
        (["train", "--instance", "{instance}", "--resolution", "30"], "multiple of 8"),
        (["train", "--instance", "{instance}", "--token", "two words"], "space"),
        (["train", "--instance", "{instance}", "--config", "{bad_toml}"], "not valid TOML"),
        (["train", "--instance", "{instance}", "--model", "{instance}"], "not a diffusers model folder"),
        (["train", "--resume"], "nothing to resume"),
        (["export", "--format", "a1111"], "no runs found"),
        (["export", "--format", "comfyui"], "ComfyUI, Forge and kohya-based tools all load a1111"),
        (["export", "runs/a", "--run", "runs/b"], "two run folders given"),
        (["prior", "--class", "dog", "--model", "/nowhere/model"], "does not exist"),
        (["generate", "-p", "a photo of sks dog", "--model", "tiny", "--lora", "{instance}:strong"], "the scale 'strong' is not a number"),
        (["dataset", "{instance}", "--instance", "{bad_toml}"], "two instance folders given"),
    ],
)
def test_user_errors_exit_2_without_traceback(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    args = [a.format(instance=instance_dir, bad_toml=bad) for a in args]
    result = runner.invoke(app, [*args, "--max-steps", "1"] if args[0] == "train" and "--resume" not in args else args)
    assert result.exit_code == 2, result.output
    assert message in flat(result.output)
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "priors").exists()  # nothing written


@pytest.mark.parametrize(
    "args",
    [
        ["prior", "--model", "tiny", "--class", "dog", "-n", "1", "--steps", "1", "--out", "notes.txt/priors"],
        ["generate", "--model", "tiny", "-p", "a photo of dog", "-n", "1", "--steps", "1", "--out", "notes.txt/samples"],
        ["prior", "--model", "tiny", "--class", "dog", "-n", "1", "--steps", "1", "--out", "/proc/no-such-place/priors"],
    ],
)
def test_an_output_path_the_file_system_refuses_exits_2_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "file system" in result.output and ("notes.txt" in flat(result.output) or "/proc/no-such-place" in flat(result.output))
    assert "Traceback" not in result.output and "report it" not in result.output
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "--instance", "missing", "--debug"])
    assert result.exit_code == 2
    assert "Traceback" in result.output
