"""A hub id, as real users pass one (`--model org/name`), read offline from the Hugging Face cache: the path every
test with a built-in model skips. `--revision` picks a cached commit; what is not cached is one clear message."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dreamlora.cli import app

runner = CliRunner()
COMMIT = "0123456789abcdef0123456789abcdef01234567"
MAIN = "89abcdef0123456789abcdef0123456789abcdef"


def said(output: str) -> str:
    return re.sub(r"[\s│╭╮╰╯─]+", " ", output)


@pytest.fixture
def hub_cache(tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face cache holding `acme/tiny-sd` at two commits: the tiny model at COMMIT, and at MAIN, where `main`
    points, another model (the tiny SDXL), so what a command loads shows whether it asked for the revision."""
    import huggingface_hub.constants

    from dreamlora.models import tiny_model_dir

    repo = tmp_path / "hf" / "models--acme--tiny-sd"
    shutil.copytree(tiny_dir, repo / "snapshots" / COMMIT)
    shutil.copytree(tiny_model_dir("tiny-sdxl"), repo / "snapshots" / MAIN)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # read when a file is looked up
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


def test_a_cached_hub_model_runs_the_three_commands_offline_and_pins_a_revision(
    tmp_path: Path, instance_dir: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    prior = ["prior", "--model", "acme/tiny-sd", "--class", "dog", "-n", "2", "--steps", "2"]
    made = runner.invoke(app, prior)
    assert made.exit_code == 0, made.output
    manifest = json.loads((tmp_path / "priors" / "dog" / "manifest.json").read_text())
    assert (manifest["model"], manifest["revision"]) == ("acme/tiny-sd", "") and "model_fingerprint" not in manifest  # a hub id, no folder
    pinned = runner.invoke(app, [*prior, "--revision", COMMIT, "--out", "priors/pinned"])
    assert pinned.exit_code == 0, pinned.output
    assert json.loads((tmp_path / "priors" / "pinned" / "manifest.json").read_text())["revision"] == COMMIT
    assert (tmp_path / "priors" / "dog" / "00000.png").read_bytes() != (tmp_path / "priors" / "pinned" / "00000.png").read_bytes()
    refused = runner.invoke(app, [*prior[:-4], "-n", "3", "--steps", "2", "--out", "priors/pinned"])
    assert refused.exit_code == 2 and f"revision: '{COMMIT}' -> ''" in said(refused.output), refused.output

    train = ["train", "--model", "acme/tiny-sd", "--revision", COMMIT, "--instance", str(instance_dir), "--class-dir", "priors/pinned",
             "--max-steps", "2", "--set", "adapter.init=nonzero", "--set", "train.num_samples=0", "--out", "runs/hub"]  # fmt: skip
    trained = runner.invoke(app, train)
    assert trained.exit_code == 0 and "prior set in" not in trained.output, trained.output
    settings = tomllib.loads((tmp_path / "runs" / "hub" / "config.toml").read_text())["model"]
    assert (settings["name"], settings["revision"]) == ("acme/tiny-sd", COMMIT)
    exported = runner.invoke(app, ["export", "runs/hub", "--format", "diffusers", "--out", "lora"])
    assert exported.exit_code == 0 and "passed" in exported.output, exported.output  # verified against the cached base
    card = (tmp_path / "lora" / "README.md").read_text()
    assert f'from_pretrained("acme/tiny-sd", revision="{COMMIT}", torch_dtype=torch.float16)' in card and "base_model: \"acme/tiny-sd\"" in card
    drawn = runner.invoke(app, ["generate", "-p", "a photo of sks dog", "-n", "1", "--steps", "2", "--lora", "runs/hub", "--out", "drawn"])
    assert drawn.exit_code == 0 and f"acme/tiny-sd at revision {COMMIT}" in said(drawn.output), drawn.output


def test_what_the_cache_lacks_and_a_revision_of_a_local_model_are_one_clear_message(hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    prior = ["prior", "--class", "dog", "-n", "1", "--steps", "2"]
    for extra, message in (
        (["--model", "acme/tiny-sd", "--revision", "v2"], "model 'acme/tiny-sd' at revision 'v2' is not in the local cache and the Hugging Face hub is unreachable"),
        (["--model", "acme/other"], "model 'acme/other' is not in the local cache"),
        (["--model", "tiny", "--revision", "v2"], "--revision picks a branch, tag or commit of a Hugging Face hub model; 'tiny' is a local model"),
    ):
        result = runner.invoke(app, [*prior, *extra])
        assert result.exit_code == 2 and message in said(result.output) and "Traceback" not in result.output, result.output
    assert "hf download acme/tiny-sd --revision v2" in said(runner.invoke(app, [*prior, "--model", "acme/tiny-sd", "--revision", "v2"]).output)
    assert not (tmp_path / "priors").exists() or not any((tmp_path / "priors").rglob("*.png"))


def test_dataset_reads_the_geometry_of_the_revision_asked_for(hub_cache: Path, tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dataset` reads the model's native size from its configs: at `main` (here made 48 px) unless --revision pins
    the commit (32 px), as `train` would load it; a revision of a local model is refused there too."""
    monkeypatch.chdir(tmp_path)
    unet_config = hub_cache / "models--acme--tiny-sd" / "snapshots" / MAIN / "unet" / "config.json"
    unet_config.write_text(json.dumps({**json.loads(unet_config.read_text()), "sample_size": 24}))
    for extra, size in (([], "48x48"), (["--revision", COMMIT], "32x32")):
        result = runner.invoke(app, ["dataset", str(instance_dir), "--model", "acme/tiny-sd", *extra])
        assert result.exit_code == 0, result.output
        assert f"training sizes {size}: 4" in said(result.output), result.output
    refused = runner.invoke(app, ["dataset", str(instance_dir), "--model", "tiny", "--revision", COMMIT])
    assert refused.exit_code == 2 and "'tiny' is a local model" in said(refused.output), refused.output
