"""The three user commands, typed verbatim in an empty folder holding dog/, on the built-in tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]


def _dreamlora(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dreamlora", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_three_commands_verbatim(tmp_path: Path, instance_dir: Path, model_cache: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    os.rename(instance_dir, work / "dog")
    env = {**os.environ, "DREAMLORA_MODEL": "tiny", "DREAMLORA_CACHE": str(model_cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for command in ("prior --class dog", "train --instance ./dog --token sks", "export --format a1111"):
        result = _dreamlora(command.split(), work, env)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    assert len(list((work / "priors" / "dog").glob("*.png"))) == 200
    info = json.loads((work / "runs" / "sks-dog" / "run.json").read_text())
    assert info["steps"] == 800 and info["with_prior"] and info["instance_prompt"] == "a photo of sks dog"
    exported = work / "exports" / "sks-dog-a1111.safetensors"
    with safe_open(str(exported), framework="pt") as handle:
        keys = list(handle.keys())
        ups = {k: handle.get_tensor(k) for k in keys if k.endswith(".lora_up.weight")}
        alphas = {handle.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
        metadata = handle.metadata()
    assert any(k.startswith("lora_unet_") for k in ups) and any(k.startswith("lora_te_text_model_encoder_layers_") for k in ups)
    assert all(v.abs().sum() > 0 for v in ups.values())
    assert alphas == {float(info["alpha"])}
    assert metadata["ss_network_alpha"] == str(int(info["alpha"])) or float(metadata["ss_network_alpha"]) == info["alpha"]
