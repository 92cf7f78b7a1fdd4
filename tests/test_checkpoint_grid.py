"""`generate --checkpoints`: a row for each checkpoint of a run at the same seeds, to pick the best step (A1111 users'
X/Y plot over epochs), pivotal runs included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from dreamlora.cli import app

runner = CliRunner()


def _flat(output: str) -> str:
    return " ".join(output.replace("│", " ").split())


def _train(instance_dir: Path, out: str, *extra: str) -> None:
    result = runner.invoke(app, ["train", "--model", "tiny", "--instance", str(instance_dir), "--max-steps", "2", "--checkpoint-every", "1",
                                 "--lr", "1e-2", "--set", "adapter.init=nonzero", "--set", "train.num_samples=0", "--out", out, *extra])  # fmt: skip
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("pivotal", [False, True], ids=["lora", "pivotal"])
def test_each_checkpoint_gets_a_row_at_the_same_seeds(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch, pivotal: bool) -> None:
    monkeypatch.chdir(tmp_path)
    _train(instance_dir, "runs/a", *(["--pivotal", "--pivotal-lr", "0.5"] if pivotal else []))
    generate = ["generate", "-p", "a photo of sks dog", "-n", "1", "--steps", "2", "--lora", "runs/a"]
    grid = runner.invoke(app, [*generate, "--checkpoints", "--compare", "--out", "steps"])
    assert grid.exit_code == 0, grid.output
    assert sorted(p.name for p in Path("steps").glob("*.png")) == ["grid.png", "step-000001-seed-0.png", "step-000002-seed-0.png"]  # step 2 is the final LoRA
    assert Image.open("steps/grid.png").height == 3 * 128  # base, step 1, step 2
    records = json.loads(Path("steps/images.json").read_text())["images"]
    assert [r["lora"][0].split("checkpoints/")[1].split("/")[0] for r in records] == ["step-000001", "step-000002"]
    final = runner.invoke(app, [*generate, "--out", "final"])
    assert final.exit_code == 0, final.output
    # Step 2's row is the final LoRA's image; step 1's is another (for a pivotal run, another embedding too).
    assert Image.open("steps/step-000002-seed-0.png").tobytes() == Image.open("final/seed-0.png").tobytes()
    assert Image.open("steps/step-000001-seed-0.png").tobytes() != Image.open("final/seed-0.png").tobytes()


def test_checkpoints_need_one_run_with_checkpoints(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _train(instance_dir, "runs/a")
    plain = runner.invoke(app, ["train", "--model", "tiny", "--instance", str(instance_dir), "--max-steps", "1", "--set", "train.num_samples=0", "--out", "runs/b"])
    assert plain.exit_code == 0, plain.output
    generate = ["generate", "-p", "a dog", "-n", "1", "--steps", "2", "--checkpoints"]
    for loras, message in (
        (["--lora", "runs/a", "--lora", "runs/b"], "compares the checkpoints of one run"),
        (["--lora", "runs/a/lora/pytorch_lora_weights.safetensors"], "compares the checkpoints of one run"),
        (["--lora", "runs/b"], "run 'runs/b' has no checkpoints to compare; train with --checkpoint-every N"),
    ):
        result = runner.invoke(app, [*generate, *loras, "--out", "x"])
        assert result.exit_code == 2 and message in _flat(result.output) and "Traceback" not in result.output, result.output
        assert not Path("x").exists()
