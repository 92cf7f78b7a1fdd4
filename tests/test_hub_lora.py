"""A LoRA named by its Hugging Face repo (`OWNER/NAME[/FILE.safetensors]`), as diffusers' load_lora_weights takes one,
read offline from the Hugging Face cache by every command that takes a LoRA; a local path that is not there is
still reported as a missing path."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dreamlora.cli import app

runner = CliRunner()


def said(output: str) -> str:
    return re.sub(r"[\s│╭╮╰╯─]+", " ", output)


def _cached_repo(cache: Path, repo: str, files: dict[str, Path]) -> None:
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "snapshots" / commit).mkdir(parents=True)
    for name, source in files.items():
        shutil.copyfile(source, folder / "snapshots" / commit / name)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


@pytest.fixture
def hub_loras(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The cache holds acme/sks-lora (diffusers' pytorch_lora_weights.safetensors) and acme/two (a.safetensors and
    b.safetensors): a non-zero rank-4 LoRA of the tiny model."""
    import huggingface_hub.constants

    from dreamlora.config import AdapterConfig
    from dreamlora.lora import adapter_metadata, adapter_state_dicts, attach_adapters, save_diffusers_lora
    from dreamlora.models import load_components

    components = load_components("tiny")
    torch.manual_seed(5)
    attach_adapters(components.unet, components.text_encoder, AdapterConfig(rank=4, alpha=8.0, init="nonzero"))
    models = {"unet": components.unet, "text_encoder": components.text_encoder}
    lora = save_diffusers_lora(tmp_path / "made", adapter_state_dicts(models), {k: adapter_metadata(m) for k, m in models.items()})
    lora_file = lora if Path(lora).is_file() else Path(lora) / "pytorch_lora_weights.safetensors"
    cache = tmp_path / "hf"
    _cached_repo(cache, "acme/sks-lora", {"pytorch_lora_weights.safetensors": lora_file})
    _cached_repo(cache, "acme/two", {"a.safetensors": lora_file, "b.safetensors": lora_file})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_commands_read_a_hub_lora_from_the_cache(hub_loras: Path, instance_dir: Path) -> None:
    inspected = runner.invoke(app, ["inspect", "acme/sks-lora"])
    assert inspected.exit_code == 0 and "diffusers" in inspected.output, inspected.output
    assert "kind hub" in said(inspected.output) and "hub_commit 0123456789abcdef0123456789abcdef01234567" in said(inspected.output)
    converted = runner.invoke(app, ["convert", "acme/sks-lora", "sks.safetensors", "--model", "tiny"])
    assert converted.exit_code == 0 and "passed" in converted.output, converted.output
    drawn = runner.invoke(app, ["generate", "--model", "tiny", "-p", "a photo of sks dog", "--lora", "acme/sks-lora:0.8", "-n", "1", "--steps", "1", "--out", "drawn"])
    assert drawn.exit_code == 0 and (hub_loras / "drawn" / "seed-0.png").is_file(), drawn.output
    started = runner.invoke(app, [
        "train", "--model", "tiny", "--instance", str(instance_dir), "--max-steps", "1", "--init-lora", "acme/two/b.safetensors",
        "--set", "train.num_samples=0", "--out", "runs/from-hub",
    ])  # fmt: skip
    assert started.exit_code == 0, started.output


def test_an_ambiguous_missing_or_mistyped_reference_is_one_clear_message(hub_loras: Path) -> None:
    two = runner.invoke(app, ["inspect", "acme/two"])
    assert two.exit_code == 2 and "holds 2 top-level .safetensors files (a.safetensors, b.safetensors); name one: acme/two/FILE.safetensors" in said(two.output), two.output
    missing = runner.invoke(app, ["inspect", "acme/missing"])
    assert missing.exit_code == 2 and "not in the local cache" in said(missing.output) and "hf download acme/missing" in said(missing.output), missing.output
    (hub_loras / "runs").mkdir()
    typo = runner.invoke(app, ["inspect", "runs/nope"])  # runs/ is here: a local path, never a repo
    assert typo.exit_code == 2 and "'runs/nope' does not exist" in said(typo.output) and "Hugging Face" not in typo.output, typo.output
    local_file = runner.invoke(app, ["inspect", "exports/sks.safetensors"])  # a file in a folder that is not here: a missing path
    assert local_file.exit_code == 2 and "'exports/sks.safetensors' does not exist" in said(local_file.output), local_file.output
    pickle = runner.invoke(app, ["inspect", "acme/two/model.bin"])
    assert pickle.exit_code == 2 and "reads only .safetensors LoRAs" in said(pickle.output), pickle.output
