"""`dreamlora doctor`: versions, devices, what training would pick, the hub and the caches, read without changing anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dreamlora.cli import app

runner = CliRunner()


def test_doctor_reports_the_machine_and_touches_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DREAMLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    entry = tmp_path / "cache" / "latents" / "ab" / ("ab" + "0" * 62 + ".safetensors")
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"x" * 1234)
    (tmp_path / "cache" / "latents" / "cd").mkdir()  # an empty folder a prune would remove: doctor leaves it
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["diffusers"]
    assert report["devices"][-1]["device"] == "cpu" and report["devices"][-1]["threads"] == torch.get_num_threads()
    if not torch.cuda.is_available():
        assert report["training"] == {"device": "cpu", "precision": "fp32", "attention": "sdpa"} and any("no CUDA GPU" in p for p in report["problems"])
    assert report["caches"]["latents"] == {"folder": str(tmp_path / "cache" / "latents"), "entries": 1, "bytes": 1234}
    assert report["hub"] == "offline (HF_HUB_OFFLINE)" and any("not reachable" in p for p in report["problems"])
    assert (tmp_path / "cache" / "latents" / "cd").is_dir()
    shown = runner.invoke(app, ["doctor"])
    assert shown.exit_code == 0 and "training would use" in shown.output and "versions" in shown.output


def test_a_reachable_hub_says_whether_a_token_is_there_to_push_with(monkeypatch) -> None:
    import huggingface_hub

    import dreamlora.models
    from dreamlora.doctor import diagnose

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(dreamlora.models, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert diagnose().hub == "reachable, not logged in (`export --push-to-hub` needs `hf auth login` or HF_TOKEN)"
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_x")
    assert diagnose().hub == "reachable, logged in"
