"""Bad input, one case per row of the list in the robustness issue: exit 2, one message naming the thing and the fix,
no traceback, nothing written. Rows already covered in test_cli.py (missing instance folder, unknown key, resolution
not a multiple of 8, token with a space, invalid TOML, model folder that is not a diffusers folder, --resume with
nothing to resume) are not repeated here."""

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from dreamlora.cli import app
from dreamlora.config import load_config
from dreamlora.data import ImageFolderDataset, list_images
from dreamlora.train import resolve_data

runner = CliRunner()


def flat(output: str) -> str:
    """Output without rich's panel borders and whitespace (rich wraps long paths mid-word)."""
    return re.sub(r"[│╭╮╰╯─\s]+", "", output)


def shows(output: str, message: str) -> bool:
    return re.sub(r"\s+", "", message) in flat(output)


def _written(workspace: Path) -> list[str]:
    """What a command left in the workspace besides the inputs the test made."""
    return sorted(p.name for p in workspace.iterdir() if p.name not in {"dog", "inputs"})


def _image_rows() -> list:
    def empty(folder: Path) -> None:
        for path in folder.iterdir():
            path.unlink()

    def only_text(folder: Path) -> None:
        empty(folder)
        (folder / "notes.md").write_text("my dog")
        (folder / "album.pdf").write_bytes(b"%PDF-1.4")

    def zero_bytes(folder: Path) -> None:
        (folder / "broken.png").write_bytes(b"")

    def corrupt(folder: Path) -> None:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not image data")

    def truncated(folder: Path) -> None:
        data = (folder / "photo0.png").read_bytes()
        (folder / "broken.png").write_bytes(data[: len(data) // 2])

    def bomb(folder: Path) -> None:
        Image.new("1", (10_000, 10_000)).save(folder / "broken.png")  # 100 megapixels in a few kB

    return [
        pytest.param(empty, "has no images", id="instance-folder-empty"),
        pytest.param(only_text, "has no images", id="instance-folder-only-non-images"),
        pytest.param(zero_bytes, "broken.png' is empty (0 bytes)", id="zero-byte-image"),
        pytest.param(corrupt, "broken.png' cannot be read", id="corrupt-image"),
        pytest.param(truncated, "broken.png' cannot be read", id="truncated-image"),
        pytest.param(bomb, "broken.png' is a decompression bomb", id="decompression-bomb"),
    ]


@pytest.mark.parametrize(("damage", "message"), _image_rows())
def test_bad_instance_images_exit_2_naming_the_file(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch, damage, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    damage(instance_dir)
    # --class dog with no prior set would generate one first: the bad photo must be caught before that.
    result = runner.invoke(app, ["train", "--model", "tiny", "--instance", str(instance_dir), "--class", "dog", "--max-steps", "1"])
    assert result.exit_code == 2, result.output
    assert shows(result.output, message)
    assert "Traceback" not in result.output
    assert _written(tmp_path) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--token", ""], "data.token is empty; pass a rare word such as `sks`", id="empty-token"),
        pytest.param(["--rank", "0"], "adapter.rank must be in 1..1024; got 0", id="rank-too-small"),
        pytest.param(["--rank", "4096"], "adapter.rank must be in 1..1024; got 4096", id="rank-too-large"),
        pytest.param(["--max-steps", "0"], "train.max_steps must be in 1..1000000; got 0", id="steps-zero"),
        pytest.param(["--lr", "2"], "train.lr must be in (0, 1); got 2.0", id="lr-too-large"),
        pytest.param(["--lr", "0"], "train.lr must be in (0, 1); got 0.0", id="lr-zero"),
        pytest.param(["--batch-size", "0"], "train.batch_size must be in 1..256; got 0", id="batch-size-zero"),
        pytest.param(["--set", "train.batch_size=many"], "train.batch_size must be a int; got 'many'", id="batch-size-not-a-number"),
    ],
)
def test_out_of_range_settings_exit_2(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "--model", "tiny", "--instance", str(instance_dir), *args])
    assert result.exit_code == 2, result.output
    assert shows(result.output, message)
    assert "Traceback" not in result.output
    assert _written(tmp_path) == []


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        pytest.param("model", ["--model", "./models/sd15"], "model folder './models/sd15' does not exist", id="model-missing"),
        pytest.param("out", ["--out", "mine"], "run folder 'mine' already exists and is never overwritten", id="out-exists"),
        pytest.param("", ["--masked-loss", "--mask-dir", "nowhere"], "mask folder 'nowhere' does not exist", id="mask-dir-missing"),
        pytest.param("masks", ["--masked-loss", "--mask-dir", "masks"], "mask folder 'masks' has no mask for 1 of the", id="mask-missing"),
        pytest.param("", ["--init-lora", "inputs"], "'inputs' does not exist", id="init-lora-missing"),
        pytest.param("", ["--base-weights", "style.safetensors:0.5"], "'style.safetensors' does not exist", id="base-weights-missing"),
        pytest.param("pickle", ["--base-weights", "inputs/old.pt"], "'inputs/old.pt' is not a .safetensors file", id="base-weights-pickle"),
        pytest.param("", ["--vae", "./vae-ft-mse"], "--vae folder './vae-ft-mse' does not exist", id="vae-missing"),
        pytest.param("pickle", ["--vae", "inputs"], "--vae 'inputs' has no config.json", id="vae-not-a-vae"),
        pytest.param("pickle", ["--init-lora", "inputs/old.pt"], "'inputs/old.pt' is not a .safetensors file", id="init-lora-pickle"),
        pytest.param("damaged", ["--init-lora", "inputs/cut.safetensors"], "'inputs/cut.safetensors' could not be read as safetensors", id="init-lora-damaged"),
    ],
)
def test_inputs_training_would_trip_on_are_refused_before_a_prior_set_or_the_model(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch, setup: str, args: list[str], message: str) -> None:
    """They used to be found only after the model loaded and the latents were encoded (or a prior set was drawn)."""
    import dreamlora.train

    monkeypatch.chdir(tmp_path)
    if setup == "out":
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "keep.txt").write_text("mine")
    if setup == "masks":
        (tmp_path / "masks").mkdir()
        for photo in sorted(instance_dir.glob("*.png"))[1:]:
            Image.new("L", Image.open(photo).size, 255).save(tmp_path / "masks" / photo.name)
    if setup in ("pickle", "damaged"):
        (tmp_path / "inputs").mkdir()
        (tmp_path / "inputs" / "old.pt").write_bytes(b"\x80\x04pickle")
        (tmp_path / "inputs" / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    monkeypatch.setattr(dreamlora.train, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the input was checked"))
    # Without --class (straight to training) and with it (a prior set to draw first); a missing model stops both.
    model = [] if setup == "model" else ["--model", "tiny"]
    for first in ([], [] if setup == "model" else ["--class", "dog"]):
        result = runner.invoke(app, ["train", *model, *first, "--instance", str(instance_dir), "--max-steps", "1", *args])
        assert result.exit_code == 2 and shows(result.output, message) and "Traceback" not in result.output, result.output
        assert not (tmp_path / "priors").exists() and not (tmp_path / "runs").exists()
    if setup == "out":
        assert [p.name for p in (tmp_path / "mine").iterdir()] == ["keep.txt"]


def test_export_of_a_run_without_weights_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "empty"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"name": "empty", "model": "tiny", "steps": 0}))
    result = runner.invoke(app, ["export", "--run", "runs/empty"])
    assert result.exit_code == 2, result.output
    assert shows(result.output, "run 'runs/empty' has no LoRA weights yet") and shows(result.output, "let it train")
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"] and sorted(p.name for p in run_dir.iterdir()) == ["run.json"]


@pytest.mark.parametrize("command", ["export", "inspect", "generate"])
def test_a_folder_that_is_not_a_run_is_named_as_such(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "someone-elses.safetensors").write_bytes(b"")
    args = {"export": ["export", "downloads"], "inspect": ["inspect", "downloads"], "generate": ["generate", "--model", "nowhere", "--prompt", "x", "--lora", "downloads"]}[command]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert shows(result.output, "'downloads' is not a run folder (no run.json)") and shows(result.output, "it holds someone-elses.safetensors")
    assert "Traceback" not in result.output


def test_unknown_export_format_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["export", "--format", "ckpt", "--run", "runs/x"])
    assert result.exit_code == 2, result.output
    assert shows(result.output, "export format must be one of a1111, diffusers, merged; got 'ckpt'")
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


# --- resume -----------------------------------------------------------------------------------


@pytest.fixture
def run_with_checkpoint(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """runs/r: two finished steps and checkpoints at steps 1 and 2 (the last step)."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [
        "train", "--model", "tiny", "--instance", str(instance_dir), "--resolution", "32", "--max-steps", "2",
        "--checkpoint-every", "1", "--out", "runs/r", "--set", "train.num_samples=1", "--set", "prior.steps=2",
    ])
    assert result.exit_code == 0, result.output
    return tmp_path / "runs" / "r"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_with_changed_settings_is_refused_unless_forced(run_with_checkpoint: Path) -> None:
    before = _snapshot(run_with_checkpoint)
    finished = runner.invoke(app, ["train", "--out", "runs/r", "--resume"])
    assert finished.exit_code == 2 and shows(finished.output, "already finished; pass --max-steps larger than 2"), finished.output
    step_1 = ["--resume-from", "runs/r/checkpoints/step-000001"]
    result = runner.invoke(app, ["train", *step_1, "--lr", "5e-4", "--rank", "8"])
    assert result.exit_code == 2, result.output
    assert all(shows(result.output, s) for s in ("adapter.rank: 4 -> 8", "train.lr: 0.0001 -> 0.0005", "--force"))
    assert "Traceback" not in result.output
    assert _snapshot(run_with_checkpoint) == before  # nothing written

    harmless = runner.invoke(app, ["train", *step_1, "--set", "train.log_every=1"])
    assert harmless.exit_code == 0, harmless.output  # logging settings do not change the result

    forced = runner.invoke(app, ["train", *step_1, "--lr", "5e-4", "--force"])
    assert forced.exit_code == 0, forced.output
    assert "lr = 0.0005" in (run_with_checkpoint / "config.toml").read_text()


def test_resume_from_a_folder_that_is_not_a_checkpoint_exits_2(run_with_checkpoint: Path, instance_dir: Path) -> None:
    before = _snapshot(run_with_checkpoint)
    for folder in (instance_dir, run_with_checkpoint, run_with_checkpoint / "checkpoints" / "step-000099"):
        result = runner.invoke(app, ["train", "--resume-from", str(folder)])
        assert result.exit_code == 2, result.output
        assert shows(result.output, "is not a complete dreamlora checkpoint") and shows(result.output, "runs/<name>/checkpoints/")
        assert "Traceback" not in result.output
    assert _snapshot(run_with_checkpoint) == before


def test_resume_on_a_base_model_whose_architecture_changed_exits_2(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's local model folder replaced by another architecture (as a hub branch can move): --resume names the
    module that no longer fits instead of an optimizer-group count, and the run is left as it was."""
    import shutil

    from dreamlora.models import tiny_model_dir

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir("tiny"), tmp_path / "model")
    done = runner.invoke(app, [
        "train", "--model", "model", "--instance", str(instance_dir), "--max-steps", "2", "--checkpoint-every", "1", "--out", "runs/m",
        "--set", "train.num_samples=0",
    ])  # fmt: skip
    assert done.exit_code == 0, done.output
    before = _snapshot(tmp_path / "runs" / "m")
    shutil.rmtree(tmp_path / "model")
    shutil.copytree(tiny_model_dir("tiny-sdxl"), tmp_path / "model")
    result = runner.invoke(app, ["train", "--out", "runs/m", "--resume", "--max-steps", "3"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert shows(result.output, "does not fit the base model it was loaded on") and shows(result.output, "attn2.to_k"), result.output
    assert _snapshot(tmp_path / "runs" / "m") == before


def test_resume_of_a_run_without_checkpoints_exits_2(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    done = runner.invoke(app, ["train", "--model", "tiny", "--instance", str(instance_dir), "--resolution", "32", "--max-steps", "1", "--out", "runs/plain", "--set", "train.num_samples=1", "--set", "prior.steps=2"])
    assert done.exit_code == 0, done.output
    result = runner.invoke(app, ["train", "--out", "runs/plain", "--resume"])
    assert result.exit_code == 2, result.output
    assert shows(result.output, "has no complete checkpoint to resume from") and shows(result.output, "--checkpoint-every")


# --- warnings: training goes on, the user is told ------------------------------------------------


def _resolve(instance_dir: Path, tmp_path: Path, **extra: str):
    overrides = {"model.name": "tiny", "data.instance_dir": str(instance_dir), **extra}
    return resolve_data(load_config(None, overrides), priors_root=tmp_path / "no-priors")


def test_a_common_word_as_token_is_warned(tmp_path: Path, instance_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        _resolve(instance_dir, tmp_path, **{"data.token": "dog"})
    assert any("token 'dog' is a common word" in r.getMessage() and "sks" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _resolve(instance_dir, tmp_path, **{"data.token": "sks"})
    assert not any("common word" in r.getMessage() for r in caplog.records)


def test_prompts_that_misplace_the_token_are_warned(tmp_path: Path, instance_dir: Path, class_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    def warnings(**extra: str) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            _resolve(instance_dir, tmp_path, **{"data.class_dir": str(class_dir), "data.class_name": "dog", **extra})
        return [r.getMessage() for r in caplog.records if "token 'sks'" in r.getMessage()]

    assert warnings() == [] and warnings(**{"data.instance_prompt": "(sks:1.2) dog on a sofa"}) == []
    assert warnings(**{"data.instance_prompt": "a photo of {token} dog", "data.class_prompt": "a photo of a dog"}) == []
    missing = warnings(**{"data.instance_prompt": "a photo of a sksdog"})  # inside another word: not the token
    assert len(missing) == 1 and "does not contain the token 'sks'" in missing[0] and "--instance-prompt 'a photo of sks dog'" in missing[0]
    leaked = warnings(**{"data.class_prompt": "a photo of sks dog"})
    assert len(leaked) == 1 and "the class prompt 'a photo of sks dog' contains the token 'sks'" in leaked[0] and "--class-prompt 'a photo of dog'" in leaked[0]
    # `dreamlora dataset` lists the same problems among its notes.
    from dreamlora.dataset_report import build_dataset_report

    overrides = {"model.name": "tiny", "data.instance_dir": str(instance_dir), "data.resolution": "32", "data.instance_prompt": "a photo of a dog"}
    notes = build_dataset_report(load_config(None, overrides), sheet_path=tmp_path / "sheet.png").notes
    assert sum("does not contain the token 'sks'" in note for note in notes) == 1


def test_class_images_that_copy_instance_images_are_warned(tmp_path: Path, instance_dir: Path, class_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        _resolve(instance_dir, tmp_path, **{"data.class_dir": str(class_dir)})
    assert not any("is a copy of instance image" in r.getMessage() for r in caplog.records)
    shutil.copy(instance_dir / "photo2.png", class_dir / "00099.png")
    with caplog.at_level(logging.WARNING):
        _resolve(instance_dir, tmp_path, **{"data.class_dir": str(class_dir)})
    copies = [r.getMessage() for r in caplog.records if "is a copy of instance image" in r.getMessage()]
    assert len(copies) == 1 and "00099.png" in copies[0] and "'photo2.png'" in copies[0]


def test_an_image_smaller_than_half_the_resolution_is_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    Image.new("RGB", (40, 40)).save(tmp_path / "fine.png")
    Image.new("RGB", (15, 20)).save(tmp_path / "tiny.png")
    with caplog.at_level(logging.WARNING):
        ImageFolderDataset(list_images(tmp_path, "instance"), "a photo of sks dog", 32, "instance")
    small = [r.getMessage() for r in caplog.records if "less than half the training resolution" in r.getMessage()]
    assert len(small) == 1 and "'tiny.png' is 15x20" in small[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["-n", "0"], "--num-images must be in 1..10000; got 0", id="no-images"),
        pytest.param(["--steps", "0"], "--steps must be in 1..1000; got 0", id="no-steps"),
        pytest.param(["--guidance", "-1"], "--guidance must be 0 or more; got -1.0", id="negative-guidance"),
        pytest.param(["--resolution", "30"], "--resolution must be a positive multiple of 8; got 30", id="resolution"),
        pytest.param(["--batch-size", "-1"], "--batch-size must be in 1..1024, or 0 for automatic; got -1", id="batch-size"),
        pytest.param(["--lora", "missing.safetensors"], "'missing.safetensors' does not exist; pass a run folder (runs/NAME) or a LoRA .safetensors file", id="missing-lora"),
        pytest.param(["--lora", "inputs:nan"], "LoRA 'inputs' has scale nan; pass a finite number", id="nan-scale"),
        pytest.param(["--lora", "inputs/damaged.safetensors"], "'inputs/damaged.safetensors' could not be read as safetensors", id="damaged-lora"),
        pytest.param(["--out", "inputs"], "--out 'inputs' already holds files, which are never overwritten", id="out-with-files"),
        pytest.param(["--out", "inputs/photo.png"], "--out 'inputs/photo.png' is a file", id="out-is-a-file"),
    ],
)
def test_bad_generate_settings_exit_2_before_the_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inputs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "inputs" / "photo.png")
    (tmp_path / "inputs" / "damaged.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")  # cut short
    before = (tmp_path / "inputs" / "photo.png").read_bytes()
    # A model that does not exist: each error must come before loading it.
    result = runner.invoke(app, ["generate", "--model", str(tmp_path / "no-model"), "-p", "a photo of dog", *args])
    assert result.exit_code == 2, result.output
    assert shows(result.output, message)
    assert "Traceback" not in result.output
    assert _written(tmp_path) == [] and (tmp_path / "inputs" / "photo.png").read_bytes() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--steps", "0"], "--steps must be 2 or more", id="steps"),
        pytest.param(["--warmup", "0"], "--warmup and --prior-images 1 or more", id="warmup"),
    ],
)
def test_bench_with_nothing_to_time_exits_2(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["bench", "--model", "tiny", *args])
    assert result.exit_code == 2 and shows(result.output, message) and "Traceback" not in result.output


def test_a_damaged_lora_file_exits_2_in_convert_and_inspect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lora.safetensors").write_bytes(b"not a safetensors file")
    for args in (["convert", "lora.safetensors", "out.safetensors", "--to", "a1111", "--model", "tiny"], ["inspect", "lora.safetensors"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert shows(result.output, "'lora.safetensors' could not be read as safetensors") and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]


def test_prior_never_writes_among_files_it_did_not_make(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, instance_dir: Path) -> None:
    """A folder with the user's files and no manifest (their photos, say) is refused before the model loads; so is a file."""
    monkeypatch.chdir(tmp_path)
    (instance_dir / "00000.png").write_bytes((instance_dir / "photo0.png").read_bytes())  # named like a class image
    before = {p.name: p.read_bytes() for p in instance_dir.iterdir()}
    result = runner.invoke(app, ["prior", "--class", "dog", "--model", "tiny", "--out", "dog", "--num-images", "2"])
    assert result.exit_code == 2, result.output
    assert shows(result.output, "'dog' already holds files and is not a prior set made by `dreamlora prior` (no manifest.json)")
    assert "Traceback" not in result.output and "━" not in result.output  # no progress bar before the error
    assert {p.name: p.read_bytes() for p in instance_dir.iterdir()} == before and _written(tmp_path) == []
    result = runner.invoke(app, ["prior", "--class", "dog", "--model", "tiny", "--out", "dog/photo0.png"])
    assert result.exit_code == 2 and shows(result.output, "'dog/photo0.png' is a file, not a folder")
    assert {p.name: p.read_bytes() for p in instance_dir.iterdir()} == before
