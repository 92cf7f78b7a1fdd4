"""`dreamlora generate` with several LoRAs at their own scales, `--compare`, and data-parallel training on two CPU processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from dreamlora.cli import app
from dreamlora.config import load_config
from dreamlora.train import resolve_data, train

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture
def trained_run(tmp_path: Path, instance_dir: Path) -> Path:
    cfg, _ = resolve_data(load_config(None, {
        "model.name": "tiny", "data.instance_dir": str(instance_dir), "adapter.init": "nonzero", "adapter.alpha": "8",
        "train.max_steps": "2", "train.num_samples": "0", "train.out": str(tmp_path / "runs" / "lora"),
    }), priors_root=tmp_path / "none")
    return train(cfg).run_dir


def test_generate_with_two_loras_and_compare(tmp_path: Path, trained_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exported = runner.invoke(app, ["export", str(trained_run), "--format", "a1111", "--out", "lora.safetensors"])
    assert exported.exit_code == 0, exported.output
    args = ["generate", "--model", "tiny", "-p", "a photo of sks dog", "-n", "2", "--steps", "2", "--compare"]
    result = runner.invoke(app, [*args, "--lora", f"{trained_run}:0.5", "--lora", "lora.safetensors:1.0", "--out", "both"])
    assert result.exit_code == 0, result.output
    grid = Image.open(tmp_path / "both" / "grid.png")
    assert grid.size == (160 + 2 * 128, 2 * 128)  # label column; base row and LoRA row, 2 seeds enlarged to 128 px
    base_row = grid.crop((160, 0, 160 + 2 * 128, 128))
    lora_row = grid.crop((160, 128, 160 + 2 * 128, 256))
    assert base_row.tobytes() != lora_row.tobytes()
    single = runner.invoke(app, [*args[:-1], "--lora", f"{trained_run}:0.5", "--out", "half"])
    assert single.exit_code == 0, single.output
    both = Image.open(tmp_path / "both" / "seed-0.png").tobytes()
    assert Image.open(tmp_path / "half" / "seed-0.png").tobytes() != both  # the second LoRA and its scale count


def test_generate_draws_in_batches_with_the_same_images_and_shows_progress(tmp_path: Path, trained_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Many images are drawn a batch at a time (one call for all of them ran out of memory on a GPU); a seed's image
    # does not depend on the batch it is in.
    import numpy as np

    monkeypatch.chdir(tmp_path)
    args = ["generate", "--model", "tiny", "-p", "a photo of sks dog", "-n", "3", "--steps", "2", "--lora", str(trained_run), "--compare"]
    one_call = runner.invoke(app, [*args, "--batch-size", "3", "--out", "whole"])
    batched = runner.invoke(app, [*args, "--batch-size", "2", "--out", "batched"])
    assert one_call.exit_code == 0 and batched.exit_code == 0, one_call.output + batched.output
    for seed in range(3):
        a, b = (np.asarray(Image.open(tmp_path / folder / f"seed-{seed}.png"), dtype=int) for folder in ("whole", "batched"))
        assert np.abs(a - b).max() <= 1
    assert "6/6" in batched.output and "img/s" in batched.output  # base and LoRA rows counted, with the rate


def test_without_model_generate_uses_the_model_the_run_was_trained_on(tmp_path: Path, trained_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DREAMLORA_MODEL", raising=False)
    args = ["generate", "-p", "a photo of sks dog", "-n", "1", "--steps", "2"]
    result = runner.invoke(app, [*args, "--lora", str(trained_run / "lora" / "pytorch_lora_weights.safetensors"), "--out", "own"])
    assert result.exit_code == 0, result.output
    assert f"base model tiny, as run {trained_run} was trained on" in " ".join(result.output.split())
    assert (tmp_path / "own" / "seed-0.png").is_file()
    other = tmp_path / "runs" / "other"  # the same LoRA, recorded as trained on another base model
    shutil.copytree(trained_run, other)
    config = other / "config.toml"
    config.write_text(config.read_text().replace('name = "tiny"', 'name = "tiny-v"', 1))
    result = runner.invoke(app, [*args, "--lora", str(trained_run), "--lora", str(other), "--out", "mixed"])
    assert result.exit_code == 2 and "different base models: tiny" in " ".join(result.output.split()) and "--model" in result.output
    assert not (tmp_path / "mixed").exists()


def test_compare_without_a_lora_and_unusable_xformers_are_user_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, instance_dir: Path) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["generate", "--model", "tiny", "-p", "x", "--compare"])
    assert result.exit_code == 2 and "--compare needs" in result.output
    result = runner.invoke(app, ["train", "--model", "tiny", "--instance", str(instance_dir), "--attention", "xformers", "--max-steps", "1"])
    assert result.exit_code == 2 and "xformers" in result.output and "Traceback" not in result.output


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on CPU is exercised on Linux CI")
def test_two_cpu_processes_train_data_parallel(tmp_path: Path, instance_dir: Path) -> None:
    """`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2` really runs two gloo ranks, the
    automatic prior set first (split between them), then data-parallel training on it. The model cache starts empty:
    both ranks want the tiny model at once, one builds it (under a lock) whichever rank that is. With --pivotal, whose
    embeddings DDP does not average itself, gradient accumulation (the prepared models skip all but each step's last all-reduce)
    and --validate-every (measured by the main process alone)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "DREAMLORA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29517",
               "-m", "dreamlora", "train", "--model", "tiny", "--instance", str(instance_dir), "--max-steps", "4", "--out", "runs/ddp",
               "--class", "dog", "--set", "prior.num_images=4", "--set", "prior.steps=2", "--resolution", "32",
               "--set", "train.num_samples=0", "--checkpoint-every", "2", "--pivotal", "--gradient-accumulation", "2",
               "--validate-every", "2", "--validation-images", "1"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    info = json.loads((tmp_path / "runs" / "ddp" / "run.json").read_text())
    assert info["processes"] == 2 and info["steps"] == 4 and info["status"] == "finished"
    assert result.stdout.count("training finished") == 1  # only the main process reports
    assert "4/4" in result.stderr and "0/4" not in result.stderr  # one progress bar, the main process's (not an idle one per rank)
    assert (tmp_path / "runs" / "ddp" / "checkpoints" / "step-000002" / "state.json").is_file()
    # Pivotal tuning's embeddings sit outside the models DDP wraps: their gradients are averaged by hand.
    assert (tmp_path / "runs" / "ddp" / "lora" / "embeddings.safetensors").is_file()
    # The prior set was made once (how the processes split it: test_prior) and the run trained on it.
    manifest = json.loads((tmp_path / "priors" / "dog" / "manifest.json").read_text())
    assert [f["index"] for f in manifest["files"]] == [0, 1, 2, 3] and result.stderr.count("generating 4 class images first") == 1
    assert result.stderr.count("latent cache") == 1  # one line for both processes
    assert sorted(p.name for p in (tmp_path / "priors" / "dog").glob("*.png")) == [f"{i:05d}.png" for i in range(4)]
    assert info["with_prior"] is True
    # --validate-every: the main process measures (the others wait), one reading every 2 steps, one line each.
    assert info["validation_class_images"] == ["00002.png"] and info["class_images"] == 3
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val_class_loss" in m] == [2, 4]
    assert " ".join(result.stderr.split()).count("validation: held-out class loss") == 2  # printed above the progress bar
    assert sorted(p.name for p in (tmp_path / "cache" / "tiny-v1" / "text_encoder").iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on CPU is exercised on Linux CI")
def test_two_cpu_processes_train_schedule_free(tmp_path: Path, instance_dir: Path, class_dir: Path) -> None:
    """Schedule-free AdamW on two gloo ranks: every process switches to the averaged weights for checkpoints, samples
    and validation and back, so the processes stay in step and the final LoRA is the last checkpoint's average."""
    pytest.importorskip("schedulefree")
    import torch
    from safetensors.torch import load_file

    from dreamlora.checkpoint import find_lora

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29519",
               "-m", "dreamlora", "train", "--model", "tiny", "--instance", str(instance_dir), "--class-dir", str(class_dir), "--max-steps", "4",
               "--out", "runs/sf", "--resolution", "32", "--optimizer", "adamw_schedulefree", "--lr", "1e-3", "--checkpoint-every", "2",
               "--sample-every", "2", "--num-samples", "1", "--set", "prior.steps=1", "--validate-every", "2", "--validation-images", "1"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "runs" / "sf"
    assert json.loads((run / "run.json").read_text())["processes"] == 2
    final = load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))
    last = load_file(str(find_lora(run, 4)))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert any(final[k].abs().max() > 0 for k in final if "lora_B" in k)  # trained, not the zero start
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val_class_loss" in m] == [2, 4] and [m["step"] for m in metrics if "class_drift" in m] == [2, 4]


def test_generate_images_calls_the_pipeline_once_per_batch() -> None:
    import torch

    from dreamlora.generate import generate_images

    calls: list[int] = []
    rescales: list[object] = []

    class Pipeline:
        device = torch.device("cpu")
        scheduler = None

        def __call__(self, prompt: list[str], generator: list[torch.Generator], **kwargs: object) -> object:
            calls.append(len(prompt))
            rescales.append(kwargs["guidance_rescale"])
            return type("Output", (), {"images": [Image.new("RGB", (8, 8)) for _ in prompt]})()

    counted: list[int] = []
    images = generate_images(Pipeline(), "a photo of dog", list(range(5)), 2, 5.0, 8, batch_size=2, on_batch=counted.append)
    assert calls == [2, 2, 1] and counted == [2, 2, 1] and len(images) == 5
    calls.clear()
    generate_images(Pipeline(), "a photo of dog", list(range(5)), 2, 5.0, 8)
    assert calls == [5]  # 0: all at once (samples during training, the demo's reading)
    assert set(rescales) == {0.0}  # plain guidance on an ordinary schedule
    from diffusers import DDPMScheduler

    rescales.clear()
    zero_snr = Pipeline()
    zero_snr.scheduler = DDPMScheduler(rescale_betas_zero_snr=True)
    generate_images(zero_snr, "a photo of dog", [0], 2, 5.0, 8)
    assert rescales == [0.7]  # a zero-terminal-SNR model is drawn with guidance rescale, as Lin et al. advise
