"""`dreamlora resize` (kohya's resize_lora): each module's update cut to a lower rank by truncated SVD, the best
approximation of that rank; fixed or per-module (dynamic) ranks; a written file that loads back right."""

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dreamlora.cli import app
from dreamlora.errors import ConfigError
from dreamlora.export import LoraModule
from dreamlora.lora import read_safetensors
from dreamlora.resize import check_method, choose_rank, resize_module, svd_factors

runner = CliRunner()


def _update(m: LoraModule) -> torch.Tensor:
    return (m.alpha / m.rank) * (m.up.double().flatten(1) @ m.down.double().flatten(1))


def _module(rank: int, conv: bool = False, seed: int = 0) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    down = torch.randn((rank, 6, 3, 3) if conv else (rank, 10), generator=g)
    up = torch.randn((12, rank, 1, 1) if conv else (12, rank), generator=g)
    return LoraModule("unet", "down_blocks.0.resnets.0.conv1" if conv else "mid.to_q", down, up, alpha=rank / 2)


@pytest.mark.parametrize("conv", [False, True])
def test_truncated_svd_is_exact_at_full_rank_and_optimal_below(conv: bool) -> None:
    module = _module(8, conv)
    u, s, vh = svd_factors(module)
    assert torch.allclose(u @ torch.diag(s) @ vh, _update(module), atol=1e-10)
    full = resize_module(module, "fixed", 0.0, 8)
    assert full.module.rank == 8 and full.module.alpha == 8.0 and full.kept_fro == pytest.approx(1.0)
    assert full.module.down.shape[1:] == module.down.shape[1:] and full.module.up.shape[2:] == module.up.shape[2:]
    assert torch.allclose(_update(full.module), _update(module), rtol=1e-5, atol=1e-5)

    cut = resize_module(module, "fixed", 0.0, 3)
    assert cut.module.down.shape[0] == 3 and cut.module.up.shape[1] == 3 and cut.old_rank == 8
    error = (_update(cut.module) - _update(module)).norm().item()
    assert error == pytest.approx(s[3:].square().sum().sqrt().item(), rel=1e-4)  # Eckart-Young: the discarded values
    assert cut.kept_fro == pytest.approx(math.sqrt(s[:3].square().sum().item() / s.square().sum().item()), rel=1e-6)
    # no other rank-3 update is closer: a random rank-3 competitor does worse
    other = LoraModule("unet", "x", cut.module.down + 0.05 * torch.randn_like(cut.module.down), cut.module.up, 3.0)
    assert (_update(other) - _update(module)).norm().item() > error


def test_dynamic_ranks_follow_the_singular_values() -> None:
    s = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.1])
    assert choose_rank(s, "fixed", 0.0, 4) == 4 and choose_rank(s, "fixed", 0.0, 9) == 6
    assert choose_rank(s, "sv_ratio", 4.0, 8) == 2  # values of at least 10 / 4 = 2.5: 10 and 5
    assert choose_rank(s, "sv_ratio", 5.0, 8) == 3 and choose_rank(s, "sv_ratio", 5.0, 2) == 2  # capped by --rank
    fro = (s.square().cumsum(0) / s.square().sum()).sqrt()
    assert choose_rank(s, "sv_fro", 0.9, 8) == int((fro < 0.9).sum()) + 1 and fro[choose_rank(s, "sv_fro", 0.9, 8) - 1] >= 0.9
    cumulative = s.cumsum(0) / s.sum()
    k = choose_rank(s, "sv_cumulative", 0.9, 8)
    assert cumulative[k - 1] >= 0.9 and cumulative[k - 2] < 0.9
    assert choose_rank(torch.zeros(4), "sv_fro", 0.9, 8) == 4  # a zero update: nothing to choose by
    narrow = LoraModule("unet", "x", torch.randn(8, 10), torch.randn(3, 8), 8.0)  # rank 8 into 3 outputs: truly rank 3
    exact = resize_module(narrow, "fixed", 0.0, 8)
    assert exact.module.rank == 3 and torch.allclose(_update(exact.module), _update(narrow), atol=1e-5)


def test_method_settings_are_checked() -> None:
    for method, param, message in (
        ("svd", None, "--method must be one of"), ("fixed", 0.5, "--param goes with"), ("sv_fro", None, "needs --param"),
        ("sv_fro", 1.5, "in (0, 1]"), ("sv_ratio", 0.5, "pass 1 or more"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace("]", "\\]")):
            check_method(method, param, 4)


def test_resize_a_run_and_a_file_from_the_command_line(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    trained = runner.invoke(app, ["train", "--model", "tiny", "--instance", str(instance_dir), "--class", "dog", "--num-class-images", "2",
                                  "--max-steps", "2", "--rank", "8", "--alpha", "4", "--set", "adapter.init=nonzero", "--set", "train.num_samples=0",
                                  "--out", "runs/big"])  # fmt: skip
    assert trained.exit_code == 0, trained.output

    fixed = runner.invoke(app, ["resize", "runs/big", "small.safetensors", "--rank", "2", "--dtype", "fp32"])
    flat = " ".join(fixed.output.split())
    assert fixed.exit_code == 0, fixed.output
    assert "verification │ passed (" in flat and "unet: rank 8 -> 2" in flat  # the run's base model (tiny) verified the file
    tensors, meta = read_safetensors(tmp_path / "small.safetensors")
    downs = {k: v for k, v in tensors.items() if k.endswith("lora_down.weight")}
    assert downs and all(v.shape[0] == 2 for v in downs.values())
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "2" and meta["ss_training_comment"].startswith("resized by dreamlora from rank 8")

    dynamic = runner.invoke(app, ["resize", "small.safetensors", "dyn", "--to", "diffusers", "--rank", "2", "--method", "sv_fro", "--param", "0.5", "--model", "tiny"])
    assert dynamic.exit_code == 0 and "verification │ passed (" in " ".join(dynamic.output.split()), dynamic.output
    meta = json.loads(read_safetensors(tmp_path / "dyn" / "pytorch_lora_weights.safetensors")[1]["lora_adapter_metadata"])
    assert meta["unet.r"] in (1, 2)

    exists = runner.invoke(app, ["resize", "runs/big", "small.safetensors", "--rank", "2"])
    assert exists.exit_code == 2 and "already exists" in " ".join(exists.output.split())
    bad = runner.invoke(app, ["resize", "runs/big", "other.safetensors", "--method", "sv_fro"])
    assert bad.exit_code == 2 and "needs --param" in bad.output and not (tmp_path / "other.safetensors").exists()
