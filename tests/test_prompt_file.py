"""`generate --from-file`: many prompts in one run, each line in kohya's sample-prompt format with its own negative
prompt, size, seed, guidance and steps."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from dreamlora.cli import app
from dreamlora.errors import ConfigError
from dreamlora.prompts import PromptSpec, read_prompt_file

runner = CliRunner()


def _flat(output: str) -> str:
    return " ".join(output.replace("│", " ").split())


def test_prompt_lines_are_read_as_kohya_writes_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    file = tmp_path / "prompts.txt"
    file.write_text(
        "# the subject in new places\n"
        "a photo of sks dog on a beach --n blurry, low quality --w 512 --h 768 --d 42 --l 7.5 --s 30\n"
        "\n"
        "a photo of sks dog--in a bucket --ss k_euler_a --S 12 --cn canny.png\n"
        "a photo of dog --ss k_lms\n",
        encoding="utf-8",
    )
    with caplog.at_level(logging.WARNING):
        specs = read_prompt_file(file)
    assert specs == [
        PromptSpec("a photo of sks dog on a beach", negative_prompt="blurry, low quality", width=512, height=768, seed=42, guidance=7.5, steps=30),
        PromptSpec("a photo of sks dog--in a bucket", steps=12, scheduler="euler_a"),  # "--" inside a word is the prompt's; kohya's names; case-blind
        PromptSpec("a photo of dog"),
    ]
    assert "--cn" in caplog.text and "--ss k_lms (samplers: dpm++, pndm" in caplog.text  # options and samplers dreamlora does not have
    for line, message in (
        ("a dog --w wide", "line 1: --w 'wide' is not a whole number"),
        ("a dog --l high", "line 1: --l 'high' is not a number"),
        ("a dog --w 500", "line 1: --w must be a positive multiple of 8; got 500"),
        ("a dog --s 0", "line 1: --steps must be in 1..1000; got 0"),
        ("--d 3", "line 1 has options but no prompt"),
        ("# only a comment", "has no prompts"),
    ):
        file.write_text(line + "\n", encoding="utf-8")
        with pytest.raises(ConfigError, match=message):
            read_prompt_file(file)
    with pytest.raises(ConfigError, match="cannot be read"):
        read_prompt_file(tmp_path / "missing.txt")


def test_generate_draws_each_line_with_its_own_settings(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("prompts.txt").write_text("a photo of dog --d 7 --s 3\na photo of cat --w 48 --h 32 --n dog --l 3 --ss euler_a\n", encoding="utf-8")
    common = ["generate", "--model", "tiny", "-n", "2", "--steps", "2"]
    result = runner.invoke(app, [*common, "--from-file", "prompts.txt", "--out", "many"])
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in Path("many").glob("*-seed-*.png"))
    assert files == ["01-seed-7.png", "01-seed-8.png", "02-seed-0.png", "02-seed-1.png"]
    assert Image.open("many/01-seed-7.png").size == (32, 32) and Image.open("many/02-seed-0.png").size == (48, 32)
    records = {r["file"]: r for r in json.loads(Path("many/images.json").read_text())["images"]}
    assert records["01-seed-7.png"] == {"file": "01-seed-7.png", "prompt": "a photo of dog", "negative_prompt": "", "seed": 7, "steps": 3,
                                             "guidance": 7.5, "width": 32, "height": 32, "scheduler": "dpm++"}  # fmt: skip
    assert records["02-seed-1.png"]["negative_prompt"] == "dog" and records["02-seed-1.png"]["guidance"] == 3
    assert records["02-seed-1.png"]["scheduler"] == "euler_a"
    # The line's sampler drew its images: the same prompt and settings with another sampler differ, with euler_a equal.
    Path("cat.txt").write_text("a photo of cat --w 48 --h 32 --n dog --l 3\n", encoding="utf-8")
    for sampler in ("euler_a", "ddim"):
        again = runner.invoke(app, [*common, "--from-file", "cat.txt", "--scheduler", sampler, "--out", f"cat-{sampler}"])
        assert again.exit_code == 0, again.output
    assert Image.open("cat-euler_a/seed-0.png").tobytes() == Image.open("many/02-seed-0.png").tobytes()
    assert Image.open("cat-ddim/seed-0.png").tobytes() != Image.open("many/02-seed-0.png").tobytes()
    unknown = runner.invoke(app, [*common, "-p", "a dog", "--scheduler", "lms"])
    assert unknown.exit_code == 2 and "--scheduler must be one of dpm++, pndm" in _flat(unknown.output)
    # A line draws what the same settings on the command line draw.
    single = runner.invoke(app, [*common, "-p", "a photo of dog", "--seed", "7", "--steps", "3", "-n", "1", "--out", "one"])
    assert single.exit_code == 0, single.output
    assert Image.open("one/seed-7.png").tobytes() == Image.open("many/01-seed-7.png").tobytes()
    grid = Image.open("many/grid.png")
    assert grid.height == 2 * 128 and grid.width > 2 * 192  # a row per prompt, 32 px images enlarged 4x, cells of the largest

    trained = runner.invoke(app, ["train", "--model", "tiny", "--instance", str(instance_dir), "--max-steps", "1", "--set", "adapter.init=nonzero",
                                  "--set", "train.num_samples=0", "--out", "runs/a"])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    compared = runner.invoke(app, [*common, "--from-file", "prompts.txt", "--lora", "runs/a", "--compare", "--out", "compared"])
    assert compared.exit_code == 0, compared.output
    assert Image.open("compared/grid.png").height == 4 * 128  # base and LoRA rows for each prompt
    assert Image.open("compared/01-seed-7.png").tobytes() != Image.open("many/01-seed-7.png").tobytes()  # the LoRA's images

    neither = runner.invoke(app, common)
    assert neither.exit_code == 2 and "no prompt given" in _flat(neither.output)
    both = runner.invoke(app, [*common, "-p", "a dog", "--from-file", "prompts.txt"])
    assert both.exit_code == 2 and "--prompt and --from-file both set the prompts; pass one" in _flat(both.output)
    Path("bad.txt").write_text("a dog --h 33\n", encoding="utf-8")
    bad = runner.invoke(app, [*common, "--from-file", "bad.txt", "--out", "bad"])
    assert bad.exit_code == 2 and "line 1: --h must be a positive multiple of 8; got 33" in _flat(bad.output) and "Traceback" not in bad.output
    assert not Path("bad").exists()


def test_training_sample_prompts_carry_their_own_settings(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kohya's --sample_prompts file: its lines join the sample grids with their options (here a wide image and its own
    seed), recorded in the run's config; a bad line stops the run before it starts."""
    monkeypatch.chdir(tmp_path)
    Path("samples.txt").write_text("# kohya's file\na photo of sks dog on a beach --w 64 --h 32 --d 5 --ss euler_a\n", encoding="utf-8")
    train = ["train", "--model", "tiny", "--instance", str(instance_dir), "--max-steps", "2", "--set", "train.num_samples=1"]
    trained = runner.invoke(app, [*train, "--sample-prompts", "samples.txt", "--sample-every", "1", "--out", "runs/s"])
    assert trained.exit_code == 0, trained.output
    assert "--ss" not in _flat(trained.output)  # euler_a is a sampler dreamlora has
    config = Path("runs/s/config.toml").read_text()
    assert "a photo of sks dog on a beach --w 64 --h 32 --d 5 --ss euler_a" in config
    final, step = Image.open("runs/s/samples/final.png"), Image.open("runs/s/samples/step-000001.png")
    # Instance and class rows of 32x32 (enlarged 4x) and the beach rows of 64x32: cells as wide as the widest image.
    assert final.height == 4 * 128 and final.width > 256 and step.height == 2 * 128
    euler = runner.invoke(app, [*train, "--sample-prompts", "samples.txt", "--sample-scheduler", "k_euler_a", "--out", "runs/e"])
    assert euler.exit_code == 0, euler.output
    assert 'sample_scheduler = "euler_a"' in Path("runs/e/config.toml").read_text()  # kohya's name, as dreamlora's
    assert Image.open("runs/e/samples/final.png").tobytes() != final.tobytes()  # another sampler drew the grid
    literal = runner.invoke(app, [*train, "--instance-prompt", "a photo of sks dog --w 64", "--sample-every", "1", "--out", "runs/lit"])
    assert literal.exit_code == 0, literal.output  # the instance prompt is drawn as written, never read as options
    # 32 px images enlarged to 128 beside a label; read as --w 64 they would be 256 wide, and the grids wider than 400.
    assert Image.open("runs/lit/samples/final.png").width < 400 and Image.open("runs/lit/samples/step-000001.png").width < 400
    Path("bad.txt").write_text("a dog\na dog --d x\n", encoding="utf-8")
    bad = runner.invoke(app, [*train, "--sample-prompts", "bad.txt", "--out", "runs/bad"])
    assert bad.exit_code == 2 and "prompt file 'bad.txt' line 2: --d 'x' is not a whole number" in _flat(bad.output)
    assert not Path("runs/bad").exists()
    flagged = runner.invoke(app, [*train, "--sample-prompt", "a dog --w 12", "--out", "runs/flag"])
    assert flagged.exit_code == 2 and "--w must be a positive multiple of 8; got 12" in _flat(flagged.output)
