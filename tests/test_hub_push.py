"""`export --push-to-hub`: what would be uploaded, in one commit, to which repo; and every way it can fail before or
after the export is written. The hub is never reached: HfApi's two calls are replaced by recorders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dreamlora.cli import app

runner = CliRunner()


def said(output: str) -> str:
    return re.sub(r"[\s│╭╮╰╯─]+", " ", output)


@pytest.fixture
def trained(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    args = ["train", "--model", "tiny", "--instance", str(instance_dir), "--max-steps", "1", "--set", "train.num_samples=0", "--set", "adapter.init=nonzero", "--out", "runs/sks"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return tmp_path / "runs" / "sks"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> dict:
    """The hub switched on, a token, and HfApi's create_repo/create_commit recording what they were given."""
    import huggingface_hub
    from huggingface_hub import HfApi

    calls: dict = {"repos": [], "commits": [], "fail": None}

    def create_repo(self, repo_id, **kwargs):  # type: ignore[no-untyped-def]
        calls["repos"].append((repo_id, kwargs))

    def create_commit(self, repo_id, operations, commit_message, **kwargs):  # type: ignore[no-untyped-def]
        if calls["fail"] is not None:
            raise calls["fail"]
        contents = [op.path_or_fileobj if isinstance(op.path_or_fileobj, bytes) else Path(op.path_or_fileobj).read_bytes() for op in operations]
        calls["commits"].append((repo_id, sorted(op.path_in_repo for op in operations), commit_message, contents))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def test_an_a1111_file_and_a_diffusers_folder_are_pushed_in_one_commit_each(trained: Path, tmp_path: Path, hub: dict) -> None:
    result = runner.invoke(app, ["export", "runs/sks", "--out", "sks.safetensors", "--push-to-hub", "me/sks-dog", "--private"])
    assert result.exit_code == 0, result.output
    assert hub["repos"] == [("me/sks-dog", {"private": True, "exist_ok": True})]
    repo, paths, message, contents = hub["commits"][0]
    assert (repo, paths) == ("me/sks-dog", ["README.md", "sks.safetensors"]) and "sks" in message
    assert contents[0] == (tmp_path / "sks.safetensors").read_bytes()  # the verified file, as written
    card = contents[1].decode()  # made for the repo: the file has no folder to carry one
    assert 'pipe.load_lora_weights("me/sks-dog", weight_name="sks.safetensors")' in card and "<lora:sks:1>" in card
    assert not (tmp_path / "README.md").exists()
    assert "https://huggingface.co/me/sks-dog/commit/abc" in said(result.output)

    folder = runner.invoke(app, ["export", "runs/sks", "--format", "diffusers", "--out", "sks-diffusers", "--push-to-hub", "me/sks-dog-diffusers"])
    assert folder.exit_code == 0, folder.output
    assert hub["repos"][1] == ("me/sks-dog-diffusers", {"private": None, "exist_ok": True})
    assert hub["commits"][1][1] == ["README.md", "pytorch_lora_weights.safetensors"]  # the folder's files at the repo's top, the model card too
    card = (tmp_path / "sks-diffusers" / "README.md").read_text()
    assert 'pipe.load_lora_weights("me/sks-dog-diffusers")' in card and "PATH/TO/THIS/FOLDER" not in card  # the card loads it from the repo


@pytest.mark.parametrize("setup,args,message", [
    ("no token", ["--push-to-hub", "me/sks"], "needs a Hugging Face token with write access"),
    ("offline", ["--push-to-hub", "me/sks"], "HF_HUB_OFFLINE is set"),
    ("", ["--push-to-hub", "not a repo!"], "'not a repo!' is not a hub repo id"),
    ("", ["--private"], "add --push-to-hub OWNER/NAME or drop --private"),
])  # fmt: skip
def test_what_stops_a_push_stops_it_before_anything_is_written(trained: Path, tmp_path: Path, hub: dict, monkeypatch: pytest.MonkeyPatch, setup: str, args: list, message: str) -> None:
    import huggingface_hub

    if setup == "no token":
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    if setup == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["export", "runs/sks", "--out", "x.safetensors", *args])
    assert result.exit_code == 2 and message in said(result.output) and "Traceback" not in result.output, result.output
    assert not (tmp_path / "x.safetensors").exists() and hub["repos"] == hub["commits"] == []


def test_a_refused_or_failed_upload_keeps_the_export_and_says_how_to_upload_it(trained: Path, tmp_path: Path, hub: dict) -> None:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    request = httpx2.Request("POST", "https://huggingface.co/api/models/me/sks/commit/main")
    hub["fail"] = HfHubHTTPError("403 Forbidden", response=httpx2.Response(403, request=request))
    refused = runner.invoke(app, ["export", "runs/sks", "--out", "a.safetensors", "--push-to-hub", "me/sks"])
    assert refused.exit_code == 2, refused.output
    assert "the token cannot write there" in said(refused.output) and "hf upload me/sks a.safetensors" in said(refused.output)
    assert (tmp_path / "a.safetensors").is_file()
    hub["fail"] = httpx2.ConnectError("connection refused", request=request)
    offline = runner.invoke(app, ["export", "runs/sks", "--out", "b.safetensors", "--push-to-hub", "me/sks"])
    assert offline.exit_code == 1 and "the hub could not be reached" in said(offline.output) and "Traceback" not in offline.output, offline.output
    assert (tmp_path / "b.safetensors").is_file()


def test_the_card_of_a_pushed_single_file_checkpoint_loads_it_with_from_single_file() -> None:
    from dreamlora.config import ExportConfig
    from dreamlora.model_card import model_card

    run = {"model": "base/sd", "family": "sdxl", "instance_prompt": "a photo of sks dog", "token": "sks"}
    card = model_card(run, None, ExportConfig(format="merged", single_file=True, hub_repo="me/m"), True, False, {}, weight_name="m.safetensors")
    code = card.split("```python")[1].split("```")[0]
    assert "from diffusers import StableDiffusionXLPipeline" in code and "AutoPipeline" not in code
    assert 'StableDiffusionXLPipeline.from_single_file("https://huggingface.co/me/m/blob/main/m.safetensors", torch_dtype=torch.float16)' in code
    compile(code, "card", "exec")  # valid Python


TRAIN = ["train", "--model", "tiny", "--max-steps", "1", "--set", "train.num_samples=0", "--set", "adapter.init=nonzero"]


def test_train_pushes_the_finished_run_as_a_diffusers_folder_in_one_commit(tmp_path: Path, instance_dir: Path, hub: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [*TRAIN, "--instance", str(instance_dir), "--out", "runs/sks", "--push-to-hub", "me/sks-dog", "--private"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "exports" / "sks-diffusers"  # written and verified as `export --format diffusers` would
    assert hub["repos"] == [("me/sks-dog", {"private": True, "exist_ok": True})]
    repo, paths, message, contents = hub["commits"][0]
    assert (repo, paths) == ("me/sks-dog", ["README.md", "pytorch_lora_weights.safetensors"]) and "sks" in message
    assert contents[1] == (folder / "pytorch_lora_weights.safetensors").read_bytes()
    assert 'pipe.load_lora_weights("me/sks-dog")' in contents[0].decode()
    from safetensors.torch import load_file

    pushed, trained = load_file(folder / "pytorch_lora_weights.safetensors"), load_file(tmp_path / "runs" / "sks" / "lora" / "pytorch_lora_weights.safetensors")
    assert pushed.keys() == trained.keys() and any(v.abs().max() > 0 for k, v in pushed.items() if "lora_B" in k or "lora.up" in k)
    assert "https://huggingface.co/me/sks-dog/commit/abc" in said(result.output)


@pytest.mark.parametrize("setup,args,message", [
    ("no token", ["--push-to-hub", "me/sks"], "needs a Hugging Face token with write access"),
    ("", ["--push-to-hub", "me/"], "'me/' is not a hub repo id"),
    ("", ["--private"], "add --push-to-hub OWNER/NAME or drop --private"),
])  # fmt: skip
def test_train_checks_the_push_before_any_step_or_prior_image(tmp_path: Path, instance_dir: Path, hub: dict, monkeypatch: pytest.MonkeyPatch, setup: str, args: list, message: str) -> None:
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    if setup == "no token":
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    result = runner.invoke(app, [*TRAIN, "--instance", str(instance_dir), "--class", "dog", "--num-class-images", "2", *args])
    assert result.exit_code == 2 and message in said(result.output) and "Traceback" not in result.output, result.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "priors").exists() and hub["repos"] == []


def test_a_push_that_fails_after_training_keeps_the_run_and_says_how_to_push_it(tmp_path: Path, instance_dir: Path, hub: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx2

    monkeypatch.chdir(tmp_path)
    (tmp_path / "exports" / "sks-diffusers").mkdir(parents=True)  # the user's earlier export of that name: never overwritten
    taken = runner.invoke(app, [*TRAIN, "--instance", str(instance_dir), "--out", "runs/sks", "--push-to-hub", "me/sks"])
    assert taken.exit_code == 2 and "Traceback" not in taken.output, taken.output
    assert "push it later with `dreamlora export runs/sks --format diffusers --push-to-hub me/sks`" in said(taken.output)
    assert (tmp_path / "runs" / "sks" / "lora" / "pytorch_lora_weights.safetensors").is_file() and not any((tmp_path / "exports" / "sks-diffusers").iterdir())
    assert hub["commits"] == []

    hub["fail"] = httpx2.ConnectError("connection refused", request=httpx2.Request("POST", "https://huggingface.co/api/models/me/sks/commit/main"))
    offline = runner.invoke(app, [*TRAIN, "--instance", str(instance_dir), "--out", "runs/sks2", "--push-to-hub", "me/sks"])
    assert offline.exit_code == 1 and "the hub could not be reached" in said(offline.output) and "Traceback" not in offline.output, offline.output
    assert (tmp_path / "runs" / "sks2" / "lora" / "pytorch_lora_weights.safetensors").is_file() and (tmp_path / "exports" / "sks2-diffusers" / "pytorch_lora_weights.safetensors").is_file()


def test_a_resumed_run_is_pushed_when_it_ends(tmp_path: Path, instance_dir: Path, hub: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(app, [*TRAIN, "--instance", str(instance_dir), "--out", "runs/sks", "--checkpoint-every", "1"]).exit_code == 0
    assert hub["commits"] == []  # no --push-to-hub, no push
    result = runner.invoke(app, ["train", "--resume", "--out", "runs/sks", "--max-steps", "2", "--push-to-hub", "me/sks"])
    assert result.exit_code == 0, result.output
    assert [c[0] for c in hub["commits"]] == ["me/sks"] and "runs/sks" not in hub["commits"][0][1]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "exports" / "sks-diffusers" / "pytorch_lora_weights.safetensors"), "pt") as pushed:
        assert json.loads(pushed.metadata()["lora_adapter_metadata"])  # the verified diffusers export, with its alphas
    assert json.loads((tmp_path / "runs" / "sks" / "run.json").read_text())["steps"] == 2  # the resumed run's end, not step 1
