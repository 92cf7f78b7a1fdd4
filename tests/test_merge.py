"""`dreamlora merge` (kohya's merge_lora / svd_merge_lora): the weighted sum of several LoRAs' updates, written
exactly (ranks stacked) or cut to a rank by SVD; a file that loads back right; mistakes refused with a message."""

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dreamlora.checkpoint import find_lora
from dreamlora.cli import app
from dreamlora.errors import ConfigError
from dreamlora.export import LoraModule, read_lora_modules
from dreamlora.lora import read_safetensors
from dreamlora.merge import merge_loras, stack_modules

runner = CliRunner()


def _update(m: LoraModule) -> torch.Tensor:
    return (m.alpha / m.rank) * (m.up.double().flatten(1) @ m.down.double().flatten(1))


@pytest.mark.parametrize("conv", [False, True])
def test_stacking_is_the_exact_weighted_sum(conv: bool) -> None:
    g = torch.Generator().manual_seed(0)

    def module(rank: int, alpha: float) -> LoraModule:
        down = torch.randn((rank, 6, 3, 3) if conv else (rank, 10), generator=g)
        up = torch.randn((12, rank, 1, 1) if conv else (12, rank), generator=g)
        return LoraModule("unet", "x", down, up, alpha)

    a, b, c = module(4, 2.0), module(2, 8.0), module(3, 3.0)
    merged = stack_modules([(0.7, a), (-0.5, b), (1.0, c)])
    assert merged.rank == 9 and merged.alpha == 9.0 and merged.down.shape[1:] == a.down.shape[1:] and merged.up.shape[2:] == a.up.shape[2:]
    assert torch.allclose(_update(merged), 0.7 * _update(a) - 0.5 * _update(b) + _update(c), atol=1e-5)
    other = LoraModule("unet", "x", torch.randn(2, 7), torch.randn(12, 2), 2.0)
    with pytest.raises(ConfigError, match="different base models"):
        stack_modules([(1.0, LoraModule("unet", "x", torch.randn(2, 10), torch.randn(12, 2), 2.0)), (1.0, other)])


def test_merge_runs_and_files_from_the_command_line(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = ["train", "--model", "tiny", "--instance", str(instance_dir), "--class", "dog", "--num-class-images", "2", "--max-steps", "1",
            "--set", "adapter.init=nonzero", "--set", "train.num_samples=0"]  # fmt: skip
    for name, flags in (("a", ["--rank", "4", "--alpha", "2"]), ("b", ["--rank", "2", "--alpha", "8", "--no-text-encoder", "--seed", "1"])):
        trained = runner.invoke(app, [*base, *flags, "--out", f"runs/{name}"])
        assert trained.exit_code == 0, trained.output
    exported = runner.invoke(app, ["export", "runs/a", "--format", "a1111", "--dtype", "fp32", "--out", "a.safetensors"])
    assert exported.exit_code == 0, exported.output
    a = {(m.group, m.module): m for m in read_lora_modules(tmp_path / "a.safetensors", "tiny")[0]}
    b = {(m.group, m.module): m for m in read_lora_modules(find_lora(tmp_path / "runs" / "b"), None)[0]}
    assert any(k[0] == "text_encoder" for k in a) and not any(k[0] == "text_encoder" for k in b)

    merged = runner.invoke(app, ["merge", "a.safetensors:0.7", "runs/b:-0.5", "--out", "merged.safetensors", "--dtype", "fp32"])
    flat = " ".join(merged.output.split())
    assert merged.exit_code == 0, merged.output
    assert "verification │ passed (" in flat and "2 LoRAs merged; rank 4-6" in flat and "adapted by only some" in flat
    got = {(m.group, m.module): m for m in read_lora_modules(tmp_path / "merged.safetensors", "tiny")[0]}
    assert got.keys() == a.keys() | b.keys()
    for key, module in got.items():
        expected = (0.7 * _update(a[key]) if key in a else 0) + (-0.5 * _update(b[key]) if key in b else 0)
        assert torch.allclose(_update(module), expected, rtol=1e-4, atol=1e-6), key
    _, meta = read_safetensors(tmp_path / "merged.safetensors")
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_training_comment"].startswith("merged by dreamlora: a.safetensors x 0.7 + ")

    cut = runner.invoke(app, ["merge", "a.safetensors", "runs/b", "--out", "cut", "--to", "diffusers", "--rank", "2", "--model", "tiny"])
    assert cut.exit_code == 0 and "verification │ passed (" in " ".join(cut.output.split()), cut.output
    assert {m.rank for m in read_lora_modules(tmp_path / "cut" / "pytorch_lora_weights.safetensors", None)[0]} == {2}

    for args, message in (
        (["a.safetensors", "--out", "one.safetensors"], "merge needs two or more LoRAs"),
        (["a.safetensors", "runs/b", "--out", "merged.safetensors"], "already exists"),
        (["a.safetensors", "runs/b", "--out", "m.safetensors", "--method", "sv_fro"], "add --rank N or drop them"),
        (["a.safetensors", "runs/b:0", "--out", "m.safetensors"], "other than 0"),
        (["a.safetensors", "runs/b:x", "--out", "m.safetensors"], "the scale 'x' is not a number"),
        (["a.safetensors", "a.safetensors:2", "--out", "m.safetensors"], "the same LoRA is given twice"),
        (["a.safetensors", "missing.safetensors", "--out", "m.safetensors"], "missing.safetensors"),
    ):  # fmt: skip
        bad = runner.invoke(app, ["merge", *args])
        said = " ".join(bad.output.replace("│", " ").split())
        assert bad.exit_code == 2 and message in said and "Traceback" not in said, (args, bad.output)
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "one.safetensors").exists()


def test_loras_of_different_families_are_not_merged(tmp_path: Path) -> None:
    from dreamlora.config import AdapterConfig
    from dreamlora.lora import adapter_metadata, adapter_state_dicts, attach_adapters, save_diffusers_lora
    from dreamlora.models import load_components

    paths = []
    for preset in ("tiny", "tiny-sdxl"):
        components = load_components(preset)
        attach_adapters(components.unet, None, AdapterConfig(rank=2, train_text_encoder=False, init="nonzero"))
        models = {"unet": components.unet}
        paths.append(save_diffusers_lora(tmp_path / preset, adapter_state_dicts(models), {k: adapter_metadata(m) for k, m in models.items()}))
    with pytest.raises(ConfigError, match="different model families"):
        merge_loras([(paths[0], 1.0), (paths[1], 1.0)], tmp_path / "m.safetensors", base_model=None)
    assert not (tmp_path / "m.safetensors").exists()
