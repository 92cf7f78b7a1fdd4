import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from dreamlora import checkpoint as ckpt
from dreamlora.config import AdapterConfig, load_config
from dreamlora.errors import ConfigError, TrainingError
from dreamlora.lora import attach_adapters, read_diffusers_lora
from dreamlora.models import encode_prompt, load_components, tokenize
from dreamlora.train import _enable_checkpointing, changed_keys, check_gradients, diffusion_target, dreambooth_loss, resolve_data, resume_point, train


def _config(instance_dir: Path, class_dir: Path | None, out: Path, **extra: str):
    overrides = {
        "model.name": "tiny", "data.instance_dir": str(instance_dir), "data.resolution": "32", "train.max_steps": "3",
        "train.out": str(out), "train.num_samples": "1", "prior.steps": "2", "train.log_every": "1",
    }
    if class_dir is not None:
        overrides["data.class_dir"] = str(class_dir)
        overrides["data.class_name"] = "dog"
    overrides.update(extra)
    cfg, needs_prior = resolve_data(load_config(None, overrides), priors_root=out.parent / "no-priors")
    assert not needs_prior or class_dir is None
    return cfg


def _hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" not in name:
            digest.update(name.replace(".base_layer", "").encode())
            digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def test_dreambooth_loss_weights_the_class_half() -> None:
    pred = torch.zeros(4, 1)
    target = torch.tensor([[1.0], [1.0], [2.0], [2.0]])
    loss, instance, prior = dreambooth_loss(pred, target, n_instance=2, prior_weight=0.5)
    assert instance.item() == 1.0 and prior.item() == 4.0 and loss.item() == 3.0
    loss, instance, prior = dreambooth_loss(pred[:2], target[:2], n_instance=2, prior_weight=0.5)
    assert loss.item() == 1.0 and prior.item() == 0.0


def test_target_follows_prediction_type() -> None:
    components = load_components("tiny-v")
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10, 900])
    velocity = diffusion_target(components.noise_scheduler, latents, noise, timesteps)
    assert torch.allclose(velocity, components.noise_scheduler.get_velocity(latents, noise, timesteps))
    assert not torch.allclose(velocity, noise)
    epsilon = load_components("tiny").noise_scheduler
    assert diffusion_target(epsilon, latents, noise, timesteps) is noise
    epsilon.register_to_config(prediction_type="sample")
    with pytest.raises(TrainingError, match="prediction_type"):
        diffusion_target(epsilon, latents, noise, timesteps)


def test_every_lora_group_gets_gradients_with_checkpointing() -> None:
    components = load_components("tiny")
    attach_adapters(components.unet, components.text_encoder, AdapterConfig(rank=4))
    _enable_checkpointing(components, train_text_encoder=True)
    components.unet.train()
    components.text_encoder.train()
    ids = tokenize(components.tokenizer, ["a photo of sks dog"])
    context = encode_prompt(components.text_encoder, ids)
    pred = components.unet(torch.randn(1, 4, 16, 16), torch.tensor([400]), context).sample
    pred.square().mean().backward()
    groups = {
        "unet": [p for p in components.unet.parameters() if p.requires_grad],
        "text_encoder": [p for p in components.text_encoder.parameters() if p.requires_grad],
    }
    norms = check_gradients(groups)
    assert norms["unet"] > 0 and norms["text_encoder"] > 0
    for p in groups["text_encoder"]:
        p.grad = None
    with pytest.raises(TrainingError, match="text_encoder LoRA received no gradients"):
        check_gradients(groups)


def test_three_steps_train_the_adapters_only(tmp_path: Path, instance_dir: Path, class_dir: Path) -> None:
    components = load_components("tiny")
    base_unet, base_te = _hash(components.unet), _hash(components.text_encoder)
    cfg = _config(instance_dir, class_dir, tmp_path / "runs" / "a")
    result = train(cfg, components=components)
    assert result.steps == 3 and result.with_prior
    assert torch.isfinite(torch.tensor(result.final_loss))
    assert _hash(components.unet) == base_unet and _hash(components.text_encoder) == base_te
    state_dicts, metadata = read_diffusers_lora(result.lora_path)
    for group in ("unet", "text_encoder"):
        ups = [v for k, v in state_dicts[group].items() if "lora_B" in k]
        assert ups and all(v.abs().sum() > 0 for v in ups), f"{group} LoRA did not change"
    run = result.run_dir
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()) == [
        "config.toml", "lora/pytorch_lora_weights.safetensors", "loss.png", "metrics.jsonl", "run.json", "samples/final.png",
    ]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["steps"] == 3 and info["model"] == "tiny" and info["with_prior"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["prior_loss"] > 0 for m in metrics)


def test_without_text_encoder_and_without_prior(tmp_path: Path, instance_dir: Path) -> None:
    cfg = _config(instance_dir, None, tmp_path / "runs" / "b", **{"adapter.train_text_encoder": "false", "train.max_steps": "2"})
    assert cfg.data.class_dir == ""
    result = train(cfg)
    state_dicts, _ = read_diffusers_lora(result.lora_path)
    assert set(state_dicts) == {"unet"} and not result.with_prior


def test_existing_run_folder_is_never_overwritten(tmp_path: Path, instance_dir: Path) -> None:
    out = tmp_path / "runs" / "taken"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    from dreamlora.errors import ConfigError

    with pytest.raises(ConfigError, match="already exists"):
        train(_config(instance_dir, None, out))
    assert (out / "keep.txt").read_text() == "mine"


def _assert_same_run(reference: Path, lora: Path, run_dir: Path, steps: int) -> None:
    """The LoRA equals the reference bit for bit, and the run's metrics log every step once."""
    a, _ = read_diffusers_lora(reference)
    b, _ = read_diffusers_lora(lora)
    for group in a:
        for key in a[group]:
            assert torch.equal(a[group][key], b[group][key]), key
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))


def test_resume_is_bit_identical(tmp_path: Path, instance_dir: Path, class_dir: Path) -> None:
    extra = {"train.max_steps": "6", "train.checkpoint_every": "3", "train.lr_scheduler": "cosine", "train.warmup_steps": "2", "data.flip": "true", "train.lr": "1e-3"}
    full = train(_config(instance_dir, class_dir, tmp_path / "runs" / "full", **extra))
    checkpoints = ckpt.list_checkpoints(full.run_dir)
    assert [s for s, _ in checkpoints] == [3, 6]  # every 3 steps, and the last step
    resumed_dir = tmp_path / "runs" / "resumed"
    shutil.copytree(full.run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "lora")
    cfg = _config(instance_dir, class_dir, resumed_dir, **extra)
    resumed = train(cfg, run_dir=resumed_dir, resume_from=resumed_dir / "checkpoints" / "step-000003")
    _assert_same_run(full.lora_path, resumed.lora_path, resumed_dir, 6)


def test_prodigy_trains_and_resumes_bit_identical(tmp_path: Path, instance_dir: Path, class_dir: Path) -> None:
    """Prodigy's state (its step-size estimate d and the starting weights it measures distance from) is checkpointed
    with the rest: a resumed run ends as the uninterrupted one does."""
    pytest.importorskip("prodigyopt")  # in the test extra; optional for users (`dreamlora[prodigy]`)
    extra = {"train.optimizer": "prodigy", "train.lr": "1.0", "train.max_steps": "4", "train.checkpoint_every": "2"}
    full = train(_config(instance_dir, class_dir, tmp_path / "runs" / "full", **extra))
    trained, _ = read_diffusers_lora(full.lora_path)
    assert all(trained[group][k].abs().max() > 0 for group in trained for k in trained[group] if "lora_B" in k)  # up-weights left zero
    state = ckpt.load_checkpoint_state(full.run_dir / "checkpoints" / "step-000002")
    groups = state["optimizer"]["param_groups"]
    # Its own state is in the checkpoint: step count, step-size estimate d and its running numerator (the estimate
    # starts at d0 and grows only over tens of steps, so these few steps move the LoRA little, but not nothing).
    assert [g["lr"] for g in groups] == [1.0, 1.0] and groups[0]["k"] == 2 and groups[0]["d"] >= groups[0]["d0"] and groups[0]["d_numerator"] != 0
    resumed_dir = tmp_path / "runs" / "resumed"
    shutil.copytree(full.run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "lora")
    resumed = train(_config(instance_dir, class_dir, resumed_dir, **extra), run_dir=resumed_dir, resume_from=resumed_dir / "checkpoints" / "step-000002")
    _assert_same_run(full.lora_path, resumed.lora_path, resumed_dir, 4)


def test_a_finished_run_is_extended_from_its_last_step(tmp_path: Path, instance_dir: Path, class_dir: Path) -> None:
    """`--resume --max-steps 6` on a run that finished at step 4 continues from step 4 and ends as a 6-step run does."""
    extra = {"train.checkpoint_every": "3", "train.lr": "1e-3", "data.flip": "true"}
    longer = train(_config(instance_dir, class_dir, tmp_path / "runs" / "six", **{**extra, "train.max_steps": "6"}))
    short = train(_config(instance_dir, class_dir, tmp_path / "runs" / "four", **{**extra, "train.max_steps": "4"}))
    run_dir, checkpoint = resume_point(short.run_dir, None)
    assert checkpoint.name == "step-000004"
    saved = load_config(run_dir / "config.toml")
    with pytest.raises(ConfigError, match=r"step 4, so the run is already finished; pass --max-steps larger than 4"):
        train(saved, run_dir=run_dir, resume_from=checkpoint)
    extended = load_config(run_dir / "config.toml", {"train.max_steps": "6"})
    assert changed_keys(saved, extended) == []  # a constant schedule does not depend on the step budget
    train(extended, run_dir=run_dir, resume_from=checkpoint)
    _assert_same_run(longer.lora_path, short.lora_path, run_dir, 6)


def test_bf16_master_weights_step_matches_fp32(tmp_path: Path, instance_dir: Path, class_dir: Path) -> None:
    """The fast path (bf16 LoRA compute, fp32 masters, no autocast) gives the loss and LoRA update of the plain fp32 step."""
    results = {}
    for precision in ("fp32", "bf16"):
        logs: list[dict] = []
        cfg = _config(instance_dir, class_dir, tmp_path / "runs" / precision, **{"model.precision": precision, "train.max_steps": "4", "train.lr": "1e-3", "train.num_samples": "0"})
        result = train(cfg, on_log=logs.append)
        assert result.precision == precision
        state_dicts, _ = read_diffusers_lora(result.lora_path)
        results[precision] = ([r["loss"] for r in logs], state_dicts)
    (loss32, sd32), (loss16, sd16) = results["fp32"], results["bf16"]
    assert all(abs(a - b) / a < 2e-2 for a, b in zip(loss32, loss16))
    for group in sd32:
        assert all(v.dtype == torch.float32 for v in sd16[group].values())  # masters are saved, not bf16 copies
        a = torch.cat([sd32[group][k].flatten() for k in sorted(sd32[group]) if "lora_B" in k])
        b = torch.cat([sd16[group][k].flatten() for k in sorted(sd16[group]) if "lora_B" in k])
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.98
