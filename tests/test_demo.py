"""`dreamlora demo`, the Quickstart's command, end to end with a short recipe (its long run is the behavioural test's)."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from dreamlora.cli import app
from dreamlora.models import TOY_MODEL_DIR

pytestmark = pytest.mark.skipif(not (TOY_MODEL_DIR / "model_index.json").is_file(), reason="toy model not in the package")

SHORT = ["--eval-images", "2", "--set", "prior.num_images=2", "--set", "prior.steps=2", "--set", "train.max_steps=2", "--set", "train.num_samples=1"]


def test_demo_runs_the_three_commands_and_draws_its_picture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    first = runner.invoke(app, ["demo", *SHORT])
    assert first.exit_code == 0, first.output
    folder = tmp_path / "demo-out"
    assert sorted(p.name for p in (folder / "dog").glob("*.png")) == sorted(p.name for p in (Path(__file__).parents[1] / "samples" / "dog").glob("*.png"))
    assert len(list((folder / "priors" / "dog").glob("*.png"))) == 2
    assert (folder / "runs" / "sks-dog" / "lora").is_dir() and len(list((folder / "exports").glob("*.safetensors"))) == 1
    assert (folder / "demo.png").stat().st_size > 0
    for prompt in ("a photo of sks dog", "a photo of dog", "a photo of cat"):
        assert prompt in first.output
    assert "2 images per prompt" in first.output
    # A second demo never touches the first: it gets a folder of its own.
    before = (folder / "demo.png").read_bytes()
    second = runner.invoke(app, ["demo", *SHORT])
    assert second.exit_code == 0, second.output
    assert (tmp_path / "demo-out-2" / "demo.png").is_file() and (folder / "demo.png").read_bytes() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--eval-images", "0"], "--eval-images must be in 1..1000"), (["--set", "train.max_step=2"], "did you mean")],
    ids=["eval-images", "unknown-key"],
)
def test_demo_settings_are_checked_before_its_folder_is_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["demo", *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "demo-out").exists()
