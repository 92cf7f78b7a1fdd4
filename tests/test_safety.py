"""Security and privacy: pickle weights only with --allow-pickle, no remote code, no paths or user/host names in
what is shared, and names built from user text stay inside their folder."""

import getpass
import json
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from dreamlora.cli import app
from dreamlora.config import ExportConfig, load_config
from dreamlora.export import export_run
from dreamlora.train import default_run_dir, resolve_data, train

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def shows(output: str, message: str) -> bool:
    return re.sub(r"\s+", "", message) in re.sub(r"[│╭╮╰╯─\s]+", "", output)


@pytest.fixture
def pickled_model(tiny_dir: Path, tmp_path: Path) -> Path:
    """The tiny model with its weights as pickle (.bin) files only."""
    folder = tmp_path / "inputs" / "pickled-model"
    shutil.copytree(tiny_dir, folder)
    for weights in folder.glob("*/*.safetensors"):
        name = "pytorch_model.bin" if weights.parent.name == "text_encoder" else "diffusion_pytorch_model.bin"
        torch.save(load_file(str(weights)), weights.parent / name)
        weights.unlink()
    return folder


def test_pickle_weights_need_allow_pickle_in_train_prior_and_generate(tmp_path: Path, instance_dir: Path, pickled_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    commands = {
        "train": ["train", "--model", str(pickled_model), "--instance", str(instance_dir), "--resolution", "32", "--max-steps", "1", "--out", "runs/p", "--set", "train.num_samples=1", "--set", "prior.steps=2"],
        "prior": ["prior", "--model", str(pickled_model), "--class", "dog", "-n", "1", "--steps", "1", "--resolution", "32"],
        "generate": ["generate", "--model", str(pickled_model), "-p", "a photo of dog", "-n", "1", "--steps", "1", "--resolution", "32", "--out", "gen"],
    }
    for name, args in commands.items():
        refused = runner.invoke(app, args)
        assert refused.exit_code == 2, (name, refused.output)
        assert shows(refused.output, "holds only pickle weights") and shows(refused.output, "--allow-pickle"), name
        assert "Traceback" not in refused.output
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dog", "inputs"], name  # nothing written
    for name, args in commands.items():
        allowed = runner.invoke(app, [*args, "--allow-pickle"])
        assert allowed.exit_code == 0, (name, allowed.output)
    assert (tmp_path / "runs" / "p" / "lora").is_dir() and (tmp_path / "priors" / "dog" / "00000.png").is_file() and (tmp_path / "gen").is_dir()


def test_no_remote_code_is_ever_trusted() -> None:
    sources = {path.name: path.read_text(encoding="utf-8") for path in (ROOT / "dreamlora").rglob("*.py")}
    assert sources and not [name for name, text in sources.items() if "trust_remote_code" in text]


def _private_strings(tmp_path: Path) -> list[str]:
    names = [getpass.getuser(), socket.gethostname(), socket.getfqdn()]
    return [str(tmp_path), str(tmp_path.resolve()), str(Path.home())] + [n for n in names if len(n) >= 3 and n not in ("root", "localhost")]


def test_run_metadata_and_exports_carry_no_path_user_or_host(tmp_path: Path, tiny_dir: Path, instance_dir: Path, class_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "inputs" / "my-model"
    shutil.copytree(tiny_dir, model)  # a local model under the user's folders
    overrides = {
        "model.name": str(model), "data.instance_dir": str(instance_dir), "data.class_dir": str(class_dir), "data.resolution": "32",
        "train.max_steps": "2", "train.checkpoint_every": "1", "train.out": str(tmp_path / "runs" / "private"), "train.num_samples": "1", "prior.steps": "2",
    }
    cfg, _ = resolve_data(load_config(None, overrides), priors_root=tmp_path / "priors")
    result = train(cfg)
    a1111 = export_run(result.run_dir, ExportConfig(format="a1111", verify=False), exports_root=tmp_path / "exports").path
    diffusers = export_run(result.run_dir, ExportConfig(format="diffusers", verify=False), exports_root=tmp_path / "exports").path

    shared = {"run.json": (result.run_dir / "run.json").read_text(), "metrics.jsonl": (result.run_dir / "metrics.jsonl").read_text()}
    for label, path in {"a1111": a1111, "diffusers": diffusers / "pytorch_lora_weights.safetensors", "run LoRA": result.lora_path}.items():
        with safe_open(str(path), "pt") as handle:
            shared[label] = json.dumps(handle.metadata() or {})
    assert json.loads(shared["run.json"])["model"] == "my-model"
    assert json.loads(shared["a1111"])["ss_sd_model_name"] == "my-model"
    for private in _private_strings(tmp_path):
        for label, text in shared.items():
            assert private not in text, f"{label} contains {private!r}"
    # config.toml (and each checkpoint's state.json) keep the user's own paths on purpose: resume and export
    # verification need them. They stay in the local run folder and are never copied into an export.
    assert str(model) in (result.run_dir / "config.toml").read_text()


def test_a_class_name_cannot_escape_the_priors_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workspace = tmp_path / "work"
    workspace.mkdir()
    monkeypatch.chdir(workspace)
    result = runner.invoke(app, ["prior", "--model", "tiny", "--class", "../../x", "-n", "1", "--steps", "1", "--resolution", "32"])
    assert result.exit_code == 0, result.output
    assert (workspace / "priors" / "x" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"] and sorted(p.name for p in workspace.iterdir()) == ["priors"]
    cfg = load_config(None, {"data.class_name": "../../x", "data.token": "..%2F"})
    run_dir, _ = default_run_dir(cfg)
    assert run_dir.parent == Path("runs") and ".." not in run_dir.name


def _tiny_lora(folder: Path) -> Path:
    """A non-zero rank-4, alpha-8 LoRA of the tiny model, saved as diffusers writes it."""
    from dreamlora.config import AdapterConfig
    from dreamlora.lora import adapter_metadata, adapter_state_dicts, attach_adapters, save_diffusers_lora
    from dreamlora.models import load_components

    components = load_components("tiny")
    torch.manual_seed(3)
    attach_adapters(components.unet, components.text_encoder, AdapterConfig(rank=4, alpha=8.0, init="nonzero"))
    models = {"unet": components.unet, "text_encoder": components.text_encoder}
    save_diffusers_lora(folder, adapter_state_dicts(models), {k: adapter_metadata(m) for k, m in models.items()})
    return folder


def test_convert_resize_and_merge_verify_on_a_pickle_base_with_allow_pickle(tmp_path: Path, pickled_model: Path) -> None:
    """The LoRA tools load the base model to check their output: a pickle-only base is refused with the flag that
    allows it, and with --allow-pickle (or a run trained with it) the check runs and passes."""
    lora = _tiny_lora(tmp_path / "lora")
    a1111 = tmp_path / "a.safetensors"
    assert runner.invoke(app, ["convert", str(lora), str(a1111), "--model", "tiny"]).exit_code == 0
    refused = runner.invoke(app, ["convert", str(a1111), str(tmp_path / "c.safetensors"), "--model", str(pickled_model)])
    assert refused.exit_code == 2 and shows(refused.output, "--allow-pickle") and not (tmp_path / "c.safetensors").exists(), refused.output
    commands = {
        "convert": ["convert", str(a1111), str(tmp_path / "c.safetensors")],
        "resize": ["resize", str(a1111), str(tmp_path / "r.safetensors"), "--rank", "2"],
        "merge": ["merge", str(a1111), f"{lora}:0.5", "--out", str(tmp_path / "m.safetensors")],
    }
    for name, args in commands.items():
        result = runner.invoke(app, [*args, "--model", str(pickled_model), "--allow-pickle"])
        assert result.exit_code == 0, (name, result.output)
        assert "passed" in result.output and "skipped" not in result.output, (name, result.output)
    # A run that trained on the pickle base with --allow-pickle: resize verifies on that base, as the run read it.
    run = tmp_path / "runs" / "p"
    shutil.copytree(lora, run / "lora")
    (run / "run.json").write_text(json.dumps({"model": "pickled-model", "name": "p", "family": "sd1"}), encoding="utf-8")
    (run / "config.toml").write_text(f'[model]\nname = "{pickled_model.as_posix()}"\nallow_pickle = true\n', encoding="utf-8")
    result = runner.invoke(app, ["resize", str(run), str(tmp_path / "r2.safetensors"), "--rank", "2"])
    assert result.exit_code == 0 and "passed" in result.output, result.output
