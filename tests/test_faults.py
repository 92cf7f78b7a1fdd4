"""Faults during training: signals, SIGKILL, non-finite loss, out of memory, a full disk; none may cost more than the steps since the last checkpoint."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dreamlora import checkpoint as ckpt
from dreamlora import train as training
from dreamlora.cli import app
from dreamlora.config import load_config
from dreamlora.errors import TrainingError, TrainingInterrupted
from dreamlora.lora import read_diffusers_lora

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _config(instance_dir: Path, out: Path, **extra: str):
    overrides = {
        "model.name": "tiny", "data.instance_dir": str(instance_dir), "data.resolution": "32", "train.max_steps": "6",
        "train.out": str(out), "train.num_samples": "1", "prior.steps": "2", "train.log_every": "1", "train.lr": "1e-3",
    }
    overrides.update(extra)
    cfg, _ = training.resolve_data(load_config(None, overrides), priors_root=out.parent / "no-priors")
    return cfg


def _assert_same_lora(a_path: Path, b_path: Path) -> None:
    a, _ = read_diffusers_lora(a_path)
    b, _ = read_diffusers_lora(b_path)
    assert a.keys() == b.keys()
    for group in a:
        assert a[group].keys() == b[group].keys()
        for key in a[group]:
            assert torch.equal(a[group][key], b[group][key]), f"{group}.{key} differs"


def _no_temporary_folders(run_dir: Path) -> bool:
    return not any(p.name.startswith(".") for p in run_dir.rglob("*"))


def test_rng_states_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = ckpt.capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    folder = ckpt.save_checkpoint(tmp_path, 5, lambda f: f.mkdir(parents=True), {"optimizer": {"state": {}, "param_groups": []}, "rng": state}, keep=2)
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.restore_rng_state(ckpt.load_checkpoint_state(folder)["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[0] == again[0] and expected[1] == again[1] and torch.equal(expected[2], again[2])


def test_sigint_saves_a_checkpoint_at_the_step_boundary_and_resume_is_exact(tmp_path: Path, instance_dir: Path) -> None:
    # LoRA dropout draws from the global torch generator, so this is exact only if the checkpoint restores it.
    extra = {"adapter.dropout": "0.3", "train.lr_scheduler": "cosine", "data.flip": "true"}
    full = training.train(_config(instance_dir, tmp_path / "runs" / "full", **extra))

    def interrupt_at_step_3(record: dict) -> None:
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    run_dir = tmp_path / "runs" / "stopped"
    cfg = _config(instance_dir, run_dir, **extra)
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match=r"SIGINT after step 3 of 6.*--resume") as stopped:
        training.train(cfg, on_log=interrupt_at_step_3)
    assert stopped.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is handler_before  # the training handler is removed again
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [3]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    assert not (run_dir / "lora").exists() and _no_temporary_folders(run_dir)

    _, checkpoint = training.resume_point(run_dir, None)
    resumed = training.train(cfg, run_dir=run_dir, resume_from=checkpoint)
    _assert_same_lora(full.lora_path, resumed.lora_path)
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def _fake_loss(monkeypatch: pytest.MonkeyPatch, bad_calls: set[int], fault: Exception | None = None) -> None:
    import dreamlora.step as step_module

    real = step_module.dreambooth_loss
    calls = [0]

    def loss(*args, **kwargs):
        calls[0] += 1
        result = real(*args, **kwargs)
        if calls[0] in bad_calls:
            if fault is not None:
                raise fault
            return tuple(r * float("nan") for r in result)
        return result

    monkeypatch.setattr(step_module, "dreambooth_loss", loss)


def test_an_isolated_non_finite_loss_is_skipped_and_counted(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_loss(monkeypatch, {2})
    result = training.train(_config(instance_dir, tmp_path / "runs" / "nan", **{"train.max_steps": "4"}))
    assert result.skipped_steps == 1 and result.steps == 4
    state_dicts, _ = read_diffusers_lora(result.lora_path)
    assert all(torch.isfinite(t).all() for group in state_dicts.values() for t in group.values())


def test_non_finite_losses_in_a_row_stop_and_keep_the_last_good_checkpoint(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_loss(monkeypatch, set(range(5, 100)))  # good steps 1-4, then every loss is NaN
    run_dir = tmp_path / "runs" / "nan"
    cfg = _config(instance_dir, run_dir, **{"train.max_steps": "20", "train.checkpoint_every": "2"})
    with pytest.raises(TrainingError, match=r"non-finite 5 steps in a row.*lower --lr.*bf16.*step-000004") as error:
        training.train(cfg)
    assert "step 9" in str(error.value)
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2, 4]  # no checkpoint written during the bad streak
    state_dicts, _ = read_diffusers_lora(ckpt.find_lora(run_dir))
    assert all(torch.isfinite(t).all() for group in state_dicts.values() for t in group.values())
    assert not (run_dir / "lora").exists()


def test_out_of_memory_stops_with_levers_and_keeps_the_checkpoint(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _fake_loss(monkeypatch, {3}, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    result = runner.invoke(app, [
        "train", "--model", "tiny", "--instance", str(instance_dir), "--resolution", "32", "--max-steps", "6", "--batch-size", "2",
        "--checkpoint-every", "2", "--out", "runs/oom", "--set", "train.num_samples=1",
    ])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.replace("│", " ").split())
    for expected in ("out of memory", "peak", "--batch-size 1 (now 2", "--resolution (now 32)", "gradient checkpointing", "--rank (now 4)", "step-000002"):
        assert expected in text, expected
    assert "Traceback" not in result.output
    run_dir = tmp_path / "runs" / "oom"
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2]
    assert not (run_dir / "lora").exists() and _no_temporary_folders(run_dir)


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    real_save, saves = safetensors.torch.save_file, [0]

    def save_file(tensors, filename, metadata=None):
        if filename.endswith(ckpt.STATE_TENSORS):
            saves[0] += 1
            if saves[0] == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [
        "train", "--model", "tiny", "--instance", str(instance_dir), "--resolution", "32", "--max-steps", "6",
        "--checkpoint-every", "2", "--out", "runs/full-disk", "--set", "train.num_samples=1",
    ])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.replace("│", " ").split())
    assert "could not write checkpoint step 4" in text and "disk is full" in text and "step-000002 is intact" in text
    assert "Traceback" not in result.output
    run_dir = tmp_path / "runs" / "full-disk"
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2]
    assert ckpt.load_checkpoint_state(run_dir / "checkpoints" / "step-000002")["step"] == 2
    assert _no_temporary_folders(run_dir)


# --- real processes -------------------------------------------------------------------------------


def _start_training(tmp_path: Path, instance_dir: Path, max_steps: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "dreamlora", "train", "--model", "tiny", "--instance", str(instance_dir), "--resolution", "32",
        "--max-steps", str(max_steps), "--checkpoint-every", "2", "--keep-checkpoints", "3", "--lr", "1e-3", "--out", "runs/real",
        "--set", "train.log_every=1", "--set", "train.num_samples=1", "--set", "prior.steps=2",
    ]
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(process: subprocess.Popen, run_dir: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ckpt.list_checkpoints(run_dir):
        if process.poll() is not None:
            pytest.fail(f"training ended before its first checkpoint:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("no checkpoint appeared in time")
        time.sleep(0.01)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path: Path, instance_dir: Path) -> None:
    run_dir = tmp_path / "runs" / "real"
    process = _start_training(tmp_path, instance_dir, max_steps=1000)
    _wait_for_checkpoint(process, run_dir)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, output
    flat = " ".join(output.replace("│", " ").split())
    assert "stopped by SIGTERM" in flat and "--resume" in flat and "Traceback" not in output
    stop_step = json.loads((run_dir / "run.json").read_text())["steps"]
    assert ckpt.list_checkpoints(run_dir)[-1][0] == stop_step >= 2  # a checkpoint at the very step it stopped
    assert f"after step {stop_step} of 1000" in flat
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == stop_step
    assert _no_temporary_folders(run_dir)


def test_sigkill_loses_at_most_the_steps_since_the_last_checkpoint(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    max_steps = 24
    run_dir = tmp_path / "runs" / "real"
    process = _start_training(tmp_path, instance_dir, max_steps)
    _wait_for_checkpoint(process, run_dir)
    process.kill()  # SIGKILL: no handler runs
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    killed_at = ckpt.list_checkpoints(run_dir)[-1][0]
    assert 2 <= killed_at < max_steps
    ckpt.load_checkpoint_state(ckpt.latest_checkpoint(run_dir))  # the folder is loadable as it was left
    read_diffusers_lora(ckpt.find_lora(run_dir))

    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "--out", "runs/real", "--resume"])
    assert result.exit_code == 0, result.output
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["steps"] == max_steps
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, max_steps + 1))

    reference = runner.invoke(app, [
        "train", "--model", "tiny", "--instance", str(instance_dir), "--resolution", "32", "--max-steps", str(max_steps),
        "--lr", "1e-3", "--out", "runs/uninterrupted", "--set", "train.num_samples=1", "--set", "prior.steps=2",
    ])
    assert reference.exit_code == 0, reference.output
    _assert_same_lora(tmp_path / "runs" / "uninterrupted" / "lora" / "pytorch_lora_weights.safetensors", run_dir / "lora" / "pytorch_lora_weights.safetensors")


def test_an_unwritable_run_folder_at_the_final_save_is_a_clear_error(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(folder, write):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))

    monkeypatch.setattr(ckpt, "write_folder_atomic", read_only)
    run_dir = tmp_path / "runs" / "read-only"
    with pytest.raises(TrainingError, match=r"could not write the run files to '.*lora': the file system is read-only.*step-000003 is intact.*--resume"):
        training.train(_config(instance_dir, run_dir, **{"train.max_steps": "3", "train.checkpoint_every": "2"}))
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2, 3]  # the last step's checkpoint holds the finished LoRA


def test_metrics_cut_short_by_a_kill_are_repaired_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "loss": 0.3}\n{"step": 4, "lo')
    training._truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n'
