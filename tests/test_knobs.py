"""The training knobs: min-SNR weights, l1 and scheduled pseudo-Huber losses, noise offset, per-group LR schedules, text-encoder cut-off, 8-bit AdamW, Prodigy."""

import json
import math
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from dreamlora.config import load_config
from dreamlora.errors import ConfigError, TrainingError
from dreamlora.export import OPTIMIZER_NAMES
from dreamlora.lora import read_diffusers_lora, read_safetensors
from dreamlora.models import load_components
from dreamlora.train import dreambooth_loss, huber_thresholds, lr_factor, make_lr_scheduler, make_optimizer, resolve_data, sample_noise, snr_weights, train


@pytest.mark.parametrize("preset", ["tiny", "tiny-v"])
def test_snr_weights_follow_the_min_snr_formula(preset: str) -> None:
    scheduler = load_components(preset).noise_scheduler
    timesteps = torch.tensor([0, 10, 100, 500, 999])
    gamma = 5.0
    weights = snr_weights(scheduler, timesteps, gamma)
    for t, w in zip(timesteps.tolist(), weights.tolist()):
        a = float(scheduler.alphas_cumprod[t])
        snr = a / (1 - a)
        expected = min(snr, gamma) / snr if preset == "tiny" else min(snr, gamma) / (snr + 1)
        assert w == pytest.approx(expected, rel=1e-5), t
    if preset == "tiny":
        assert weights[-1] == pytest.approx(1.0) and weights[0] < 0.01  # noisy steps keep full weight, easy ones are damped
    scheduler.register_to_config(prediction_type="sample")
    with pytest.raises(TrainingError, match="snr-gamma"):
        snr_weights(scheduler, timesteps, gamma)


def test_dreambooth_loss_weights_each_example() -> None:
    pred = torch.zeros(4, 2)
    target = torch.tensor([[1.0, 1.0], [2.0, 2.0], [1.0, 1.0], [3.0, 3.0]])  # per-example MSE 1, 4, 1, 9
    loss, instance, prior = dreambooth_loss(pred, target, n_instance=2, prior_weight=0.5, weights=torch.tensor([1.0, 0.5, 2.0, 0.0]))
    assert instance.item() == pytest.approx((1 * 1 + 0.5 * 4) / 2)
    assert prior.item() == pytest.approx((2 * 1 + 0 * 9) / 2)
    assert loss.item() == pytest.approx(1.5 + 0.5 * 1.0)
    plain = dreambooth_loss(pred, target, 2, 0.5)
    ones = dreambooth_loss(pred, target, 2, 0.5, torch.ones(4))
    assert all(torch.equal(a, b) for a, b in zip(plain, ones))


def test_pseudo_huber_and_l1_losses_follow_their_formulas() -> None:
    pred = torch.zeros(3, 2)
    target = torch.tensor([[0.01, -0.01], [3.0, -3.0], [0.5, 0.5]])
    c = torch.tensor([0.1, 0.1, 1.0])
    _, huber, _ = dreambooth_loss(pred, target, n_instance=3, prior_weight=1.0, loss="huber", huber_c=c)
    per_row = [2 * ci * (math.sqrt(d * d + ci * ci) - ci) for d, ci in ((0.01, 0.1), (3.0, 0.1), (0.5, 1.0))]
    assert huber.item() == pytest.approx(sum(per_row) / 3, rel=1e-5)
    small = dreambooth_loss(pred[:1], target[:1], 1, 1.0, loss="huber", huber_c=c[:1])[0]
    assert small.item() == pytest.approx(0.01**2, rel=1e-2)  # about the squared error for errors far below c
    large = dreambooth_loss(pred[1:2], target[1:2], 1, 1.0, loss="huber", huber_c=c[1:2])[0]
    assert large.item() == pytest.approx(2 * 0.1 * 3.0, rel=0.05) and large.item() < 9.0 / 10  # linear, far below the MSE of 9
    _, smooth, _ = dreambooth_loss(pred, target, 3, 1.0, loss="smooth_l1", huber_c=c)
    assert smooth.item() == pytest.approx(sum(2 * (math.sqrt(d * d + ci * ci) - ci) for d, ci in ((0.01, 0.1), (3.0, 0.1), (0.5, 1.0))) / 3, rel=1e-5)
    _, l1, _ = dreambooth_loss(pred, target, 3, 1.0, loss="l1")
    assert l1.item() == pytest.approx((0.01 + 3.0 + 0.5) / 3)
    with pytest.raises(ValueError, match="huber_c"):
        dreambooth_loss(pred, target, 3, 1.0, loss="huber")


def test_huber_threshold_schedules() -> None:
    scheduler = load_components("tiny").noise_scheduler
    total = scheduler.config.num_train_timesteps
    t = torch.tensor([0, total // 2, total - 1])
    assert torch.equal(huber_thresholds(scheduler, t, 0.1, "constant"), torch.full((3,), 0.1))
    exponential = huber_thresholds(scheduler, t, 0.1, "exponential")
    assert exponential.tolist() == pytest.approx([1.0, 0.1 ** ((total // 2) / total), 0.1 ** ((total - 1) / total)], rel=1e-5)
    snr = huber_thresholds(scheduler, t, 0.1, "snr")
    a = scheduler.alphas_cumprod[t].double()
    expected = 0.9 / (1 + ((1 - a) / a).sqrt()) ** 2 + 0.1
    assert snr.tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    assert snr[0] > 0.9 and snr[0] > snr[1] > snr[2] >= 0.1  # about MSE at low noise, robust at high noise


def test_huber_loss_trains_and_is_recorded(tmp_path: Path, instance_dir: Path) -> None:
    from typer.testing import CliRunner

    from dreamlora.cli import app

    runner = CliRunner()
    common = ["train", "--model", "tiny", "--instance", str(instance_dir), "--max-steps", "2", "--set", "train.num_samples=0"]
    refused = runner.invoke(app, [*common, "--huber-c", "0.2", "--out", str(tmp_path / "bad")])
    assert refused.exit_code == 2 and "add --loss huber" in " ".join(refused.output.split()) and not (tmp_path / "bad").exists()
    trained = runner.invoke(app, [*common, "--loss", "huber", "--huber-schedule", "exponential", "--huber-c", "0.2", "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses and all(math.isfinite(v) for v in losses)
    exported = runner.invoke(app, ["export", str(tmp_path / "run"), "--format", "a1111", "--out", str(tmp_path / "huber.safetensors"), "--no-verify"])
    assert exported.exit_code == 0, exported.output
    _, meta = read_safetensors(tmp_path / "huber.safetensors")
    assert (meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_huber_c"]) == ("huber", "exponential", "0.2")


def test_noise_offset_shifts_each_channel_mean() -> None:
    latents = torch.zeros(16, 4, 32, 32)
    plain = sample_noise(latents, torch.Generator().manual_seed(3), 0.0)
    assert torch.equal(plain, torch.randn(latents.shape, generator=torch.Generator().manual_seed(3)))  # off: draws unchanged
    shifted = sample_noise(latents, torch.Generator().manual_seed(3), 0.5)
    offset = shifted - plain
    per_channel = offset.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(offset, per_channel.expand_as(offset), atol=1e-6)  # one constant per image and channel
    assert 0.3 < per_channel.std().item() < 0.7  # ~ noise_offset x N(0, 1)
    assert plain.mean(dim=(2, 3)).abs().max() < 0.2 < shifted.mean(dim=(2, 3)).abs().max()


@pytest.mark.parametrize(("kind", "diffusers_name", "warmup", "cycles"), [
    ("constant", "constant_with_warmup", 3, 1),
    ("linear", "linear", 3, 1),
    ("cosine", "cosine", 2, 1),
    ("cosine_with_restarts", "cosine_with_restarts", 2, 3),
    ("constant_with_warmup", "constant_with_warmup", 3, 1),
    ("polynomial", "polynomial", 3, 1),
    ("polynomial", "polynomial", 2, 2),  # cycles stands for the power here
])
def test_lr_factors_match_diffusers_schedules(kind: str, diffusers_name: str, warmup: int, cycles: int) -> None:
    from diffusers.optimization import get_scheduler

    total = 20
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    power = float(cycles) if kind == "polynomial" else 1.0
    reference = get_scheduler(diffusers_name, optimizer, num_warmup_steps=warmup, num_training_steps=total, num_cycles=cycles, power=power)
    ours = lr_factor(kind, warmup, total, cycles, power)
    tolerance = 2e-7 if kind == "polynomial" else 1e-9  # diffusers decays to 1e-7, not 0
    for step in range(total):
        assert ours(step) == pytest.approx(reference.get_last_lr()[0], abs=tolerance), step
        optimizer.step()
        reference.step()
    if kind == "cosine_with_restarts":
        restarts = [s for s in range(warmup + 1, total) if ours(s) > ours(s - 1)]
        assert len(restarts) == cycles - 1


def test_each_parameter_group_follows_its_schedule() -> None:
    cfg = load_config(None, {
        "train.max_steps": "10", "train.lr": "1e-3", "train.lr_scheduler": "cosine", "train.warmup_steps": "2",
        "train.text_encoder_lr": "5e-4", "train.text_encoder_lr_scheduler": "linear", "train.text_encoder_warmup_steps": "0",
        "train.text_encoder_steps_fraction": "0.6",
    })
    groups = {"unet": [torch.nn.Parameter(torch.zeros(1))], "text_encoder": [torch.nn.Parameter(torch.zeros(1))]}
    optimizer = make_optimizer(groups, cfg, torch.device("cpu"))
    scheduler = make_lr_scheduler(optimizer, cfg)
    unet_curve, te_curve = [], []
    for _ in range(10):
        unet_lr, te_lr = scheduler.get_last_lr()
        unet_curve.append(unet_lr)
        te_curve.append(te_lr)
        optimizer.step()
        scheduler.step()
    assert unet_curve == pytest.approx([1e-3 * f for f in [0, 0.5] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]])
    assert te_curve == pytest.approx([5e-4 * (10 - s) / 10 for s in range(6)] + [0.0] * 4)  # linear, then 0 from step 6 (0.6 x 10)


def test_text_encoder_lora_stops_changing_at_its_cutoff(tmp_path: Path, instance_dir: Path) -> None:
    overrides = {
        "model.name": "tiny", "data.instance_dir": str(instance_dir), "data.resolution": "32", "train.max_steps": "4",
        "train.out": str(tmp_path / "run"), "train.num_samples": "1", "prior.steps": "1", "train.lr": "1e-2",
        "train.text_encoder_steps_fraction": "0.5", "train.checkpoint_every": "1", "train.keep_checkpoints": "4", "train.log_every": "1",
    }
    cfg, _ = resolve_data(load_config(None, overrides), priors_root=tmp_path / "none")
    assert cfg.train.text_encoder_stop_step == 2
    result = train(cfg)
    loras = {step: read_diffusers_lora(result.run_dir / "checkpoints" / f"step-{step:06d}" / "lora")[0] for step in (1, 2, 3)}
    loras[4] = read_diffusers_lora(result.lora_path)[0]

    def changed(group: str, a: int, b: int) -> bool:
        return any(not torch.equal(loras[a][group][k], loras[b][group][k]) for k in loras[a][group])

    assert changed("text_encoder", 1, 2)  # trained before the cut-off
    assert not changed("text_encoder", 2, 3) and not changed("text_encoder", 2, 4)  # frozen from step 2 on
    assert changed("unet", 2, 3) and changed("unet", 3, 4)
    import json

    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    # Each line logs the rates its step used: the text encoder's is 0 from its first frozen step (3) on.
    assert [m["lr_text_encoder"] > 0 for m in metrics] == [True, True, False, False]
    assert all(m["lr"] == cfg.train.lr for m in metrics)


@pytest.mark.parametrize(
    "name,cls,betas,decay", [("adamw8bit", "AdamW8bit", (0.9, 0.999), 1e-2), ("paged_adamw8bit", "PagedAdamW8bit", (0.9, 0.999), 1e-2), ("lion8bit", "Lion8bit", (0.9, 0.99), 0.0)]
)
def test_bitsandbytes_optimizers_or_how_to_install_them(monkeypatch: pytest.MonkeyPatch, name: str, cls: str, betas: tuple, decay: float) -> None:
    # bitsandbytes' kernels need a GPU: a stand-in module records what each choice builds, with which settings.
    cfg = load_config(None, {"train.optimizer": name})
    groups = {"unet": [torch.nn.Parameter(torch.zeros(2))]}
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ConfigError, match=rf"--optimizer {name} needs bitsandbytes.*pip install 'dreamlora\[bnb\]'"):
        make_optimizer(groups, cfg, torch.device("cpu"))
    built: dict[str, tuple] = {}

    def fake_class(class_name: str) -> type:
        def init(self, params, **kwargs):  # type: ignore[no-untyped-def]
            built[class_name] = (kwargs["betas"], kwargs["weight_decay"])
            torch.optim.SGD.__init__(self, params, lr=0.1)

        return type(class_name, (torch.optim.SGD,), {"__init__": init})

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(**{c: fake_class(c) for c in ("AdamW8bit", "PagedAdamW8bit", "Lion8bit")})
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    optimizer = make_optimizer(groups, cfg, torch.device("cpu"))
    assert type(optimizer).__name__ == cls and built == {cls: (betas, decay)} and optimizer.param_groups[0]["lr"] == cfg.train.lr
    assert OPTIMIZER_NAMES[name] == f"bitsandbytes.optim.{cls}"  # ss_optimizer, as kohya writes it


def _optional_optimizer(monkeypatch: pytest.MonkeyPatch, module: str, extra: str, groups: dict, cfg, class_name: str) -> torch.optim.Optimizer:
    """An optimizer from an optional package: without it, an install hint; with it (else the test is skipped), the class."""
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(ConfigError, match=re.escape(f"pip install 'dreamlora[{extra}]'")):
        make_optimizer(groups, cfg, torch.device("cpu"))
    monkeypatch.delitem(sys.modules, module)
    pytest.importorskip(module)
    optimizer = make_optimizer(groups, cfg, torch.device("cpu"))
    assert type(optimizer).__name__ == class_name
    return optimizer


def test_prodigy_takes_lr_1_says_how_to_install_it_and_refuses_an_adamw_lr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from dreamlora.cli import app

    groups = {"unet": [torch.nn.Parameter(torch.zeros(2))]}
    cfg = load_config(None, {"train.optimizer": "prodigy", "train.lr": "1.0"})
    _optional_optimizer(monkeypatch, "prodigyopt", "prodigy", groups, cfg, "Prodigy")
    with pytest.raises(ConfigError, match=r"scales the step size Prodigy finds \(1.0 is usual\); got 0.0001: pass --lr 1.0"):
        load_config(None, {"train.optimizer": "prodigy"})
    # Prodigy raises mid-run when its groups' rates differ (other than 0): such settings are refused up front.
    for overrides, message in (
        ({"train.text_encoder_lr": "0.5"}, "drop --text-encoder-lr 0.5 or set it to --lr 1"),
        ({"train.text_encoder_warmup_steps": "5"}, "drop --text-encoder-lr-scheduler and --text-encoder-warmup-steps"),
        ({"train.text_encoder_lr_scheduler": "cosine"}, "drop --text-encoder-lr-scheduler"),
        ({"train.loraplus_lr_ratio": "16"}, "LoRA+ (--loraplus-lr-ratio) cannot go with it"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, {"train.optimizer": "prodigy", "train.lr": "1.0", **overrides})
    same = load_config(None, {"train.optimizer": "prodigy", "train.lr": "1.0", "train.text_encoder_lr": "1.0", "train.text_encoder_steps_fraction": "0.5"})
    assert same.train.resolved_text_encoder_lr == 1.0
    # On the command line, --optimizer prodigy without --lr trains at lr 1.0 and says so (the AdamW default would stall it).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "none").mkdir()
    result = CliRunner().invoke(app, ["train", "--instance", "none", "--optimizer", "prodigy"])
    assert "Prodigy: --lr 1.0" in result.output and "has no images" in result.output  # the lr passed validation


def test_lion_steps_each_group_at_its_rate_says_how_to_install_it_and_defaults_its_lr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from dreamlora.cli import app

    torch.manual_seed(0)
    unet, text = torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(8))
    cfg = load_config(None, {"train.optimizer": "lion", "train.lr": "3e-5", "train.text_encoder_lr": "1e-5"})
    optimizer = _optional_optimizer(monkeypatch, "lion_pytorch", "lion", {"unet": [unet], "text_encoder": [text]}, cfg, "Lion")
    before = unet.detach().clone(), text.detach().clone()
    (unet.sum() * 2 - text.square().sum()).backward()
    optimizer.step()
    # The first step moves every weight by exactly its group's rate, against the sign of its gradient.
    assert torch.allclose(unet.detach() - before[0], torch.full((8,), -3e-5), atol=1e-6)
    assert torch.allclose(text.detach() - before[1], 1e-5 * torch.sign(before[1]), atol=1e-6)
    # On the command line, --optimizer lion without --lr trains at 3e-5 and says so.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "none").mkdir()
    for name in ("lion", "lion8bit"):
        result = CliRunner().invoke(app, ["train", "--instance", "none", "--optimizer", name])
        assert "Lion: --lr 3e-05" in result.output and "has no images" in result.output


def test_a_lion_run_trains_resumes_exactly_and_records_its_optimizer(tmp_path: Path, instance_dir: Path) -> None:
    from typer.testing import CliRunner

    from dreamlora.cli import app

    pytest.importorskip("lion_pytorch")
    runner = CliRunner()
    args = ["train", "--model", "tiny", "--instance", str(instance_dir), "--resolution", "32", "--optimizer", "lion", "--seed", "1",
            "--set", "train.num_samples=0", "--set", "adapter.init=gaussian", "--checkpoint-every", "2"]
    assert runner.invoke(app, [*args, "--max-steps", "4", "--out", str(tmp_path / "whole")]).exit_code == 0
    assert runner.invoke(app, [*args, "--max-steps", "2", "--out", str(tmp_path / "part")]).exit_code == 0
    resumed = runner.invoke(app, ["train", "--resume", "--out", str(tmp_path / "part"), "--max-steps", "4"])
    assert resumed.exit_code == 0, resumed.output
    whole, _ = read_diffusers_lora(tmp_path / "whole" / "lora")
    part, _ = read_diffusers_lora(tmp_path / "part" / "lora")
    for model in whole:
        assert whole[model].keys() == part[model].keys() and all(torch.equal(whole[model][k], part[model][k]) for k in whole[model])
    exported = runner.invoke(app, ["export", str(tmp_path / "whole"), "--format", "a1111", "--out", str(tmp_path / "w.safetensors"), "--no-verify"])
    assert exported.exit_code == 0, exported.output
    assert read_safetensors(tmp_path / "w.safetensors")[1]["ss_optimizer"] == "lion_pytorch.lion_pytorch.Lion"


def test_schedule_free_needs_a_constant_rate_and_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for overrides, message in (
        ({"train.lr_scheduler": "cosine"}, "use --lr-scheduler constant (now 'cosine')"),
        ({"train.text_encoder_lr_scheduler": "linear"}, "text encoder 'linear'"),
        ({"train.scale_weight_norms": "1.0"}, "--scale-weight-norms cannot go with --optimizer adamw_schedulefree"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, {"train.optimizer": "adamw_schedulefree", **overrides})
    cfg = load_config(None, {"train.optimizer": "adamw_schedulefree", "train.warmup_steps": "10"})  # a warm-up is fine
    _optional_optimizer(monkeypatch, "schedulefree", "schedulefree", {"unet": [torch.nn.Parameter(torch.zeros(2))]}, cfg, "AdamWScheduleFree")


def test_a_schedule_free_run_saves_the_average_and_resumes_exactly(tmp_path: Path, instance_dir: Path) -> None:
    from typer.testing import CliRunner

    from dreamlora.checkpoint import load_checkpoint_state
    from dreamlora.cli import app

    pytest.importorskip("schedulefree")
    runner = CliRunner()
    args = ["train", "--model", "tiny", "--instance", str(instance_dir), "--resolution", "32", "--optimizer", "adamw_schedulefree", "--seed", "1",
            "--lr", "1e-3", "--set", "train.num_samples=1", "--set", "train.sample_every=1", "--set", "adapter.init=gaussian", "--checkpoint-every", "2"]
    whole = runner.invoke(app, [*args, "--max-steps", "4", "--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    assert runner.invoke(app, [*args, "--max-steps", "2", "--out", str(tmp_path / "part")]).exit_code == 0
    resumed = runner.invoke(app, ["train", "--resume", "--out", str(tmp_path / "part"), "--max-steps", "4"])
    assert resumed.exit_code == 0, resumed.output
    final, _ = read_diffusers_lora(tmp_path / "whole" / "lora")
    last = tmp_path / "whole" / "checkpoints" / "step-000004"
    state = load_checkpoint_state(last)
    # Checkpoints hold the average (the optimizer saved in eval mode), and the final LoRA is that same average.
    assert all(group["train_mode"] is False for group in state["optimizer"]["param_groups"])
    saved, _ = read_diffusers_lora(last / "lora")
    for model in final:
        assert all(torch.equal(final[model][k], saved[model][k]) for k in final[model])
    # Where training steps from (y = x + (1 - beta1)(z - x)) is not the average: saving the wrong one would show.
    z = [v["z"] for v in state["optimizer"]["state"].values()]
    assert z and any(not torch.equal(t, torch.zeros_like(t)) for t in z)
    # Resumed at step 2 (and sampled at every step in both runs): bit-identical to the uninterrupted run.
    part, _ = read_diffusers_lora(tmp_path / "part" / "lora")
    for model in final:
        assert final[model].keys() == part[model].keys() and all(torch.equal(final[model][k], part[model][k]) for k in final[model])
    exported = runner.invoke(app, ["export", str(tmp_path / "whole"), "--format", "a1111", "--out", str(tmp_path / "w.safetensors"), "--no-verify"])
    assert exported.exit_code == 0 and read_safetensors(tmp_path / "w.safetensors")[1]["ss_optimizer"] == "schedulefree.adamw_schedulefree.AdamWScheduleFree"


@pytest.mark.parametrize(("key", "value", "message"), [
    ("train.snr_gamma", "-1", "snr_gamma"),
    ("train.noise_offset", "-0.1", "noise_offset"),
    ("train.text_encoder_steps_fraction", "0", "text_encoder_steps_fraction"),
    ("train.text_encoder_steps_fraction", "1.5", "text_encoder_steps_fraction"),
    ("train.optimizer", "sgd", "adamw, adamw8bit"),
    ("train.report_to", "mlflow", "tensorboard, wandb"),
    ("train.lr_scheduler", "piecewise_constant", "cosine_with_restarts, polynomial"),
    ("train.lr_power", "0", "lr_power"),
    ("train.text_encoder_lr_scheduler", "step", "train.text_encoder_lr_scheduler"),
    ("train.lr_cycles", "0", "lr_cycles"),
    ("train.sample_every", "-1", "sample_every"),
    ("train.loss", "l3", "l2, l1, huber, smooth_l1"),
    ("train.huber_c", "0", "huber_c must be in"),
    ("train.huber_schedule", "linear", "snr, exponential, constant"),
])
def test_bad_knob_values_name_the_key(key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, {key: value})


def test_zero_terminal_snr_rescales_the_training_schedule_only(tmp_path: Path, instance_dir: Path) -> None:
    from typer.testing import CliRunner

    from dreamlora.cli import app
    from dreamlora.train import debiased_weights, training_scheduler

    components = load_components("tiny")
    cfg = load_config(None, {"train.zero_terminal_snr": "true"})
    base = components.noise_scheduler
    rescaled = training_scheduler(base, cfg)
    assert training_scheduler(base, load_config(None, {})) is base
    assert float(rescaled.alphas_cumprod[-1]) == 0.0 and float(base.alphas_cumprod[-1]) > 0  # the last step is pure noise
    assert float(rescaled.alphas_cumprod[0]) == pytest.approx(float(base.alphas_cumprod[0]), rel=1e-6)  # the first step is as before
    last = torch.tensor([999, 0])
    # Min-SNR: min(SNR, gamma)/SNR is 1 below gamma, also at SNR 0 (not 0/0); v-prediction gives 0 there.
    assert torch.equal(snr_weights(rescaled, last, 5.0)[:1], torch.ones(1))
    v_model = type(rescaled).from_config(rescaled.config, prediction_type="v_prediction")
    assert float(snr_weights(v_model, last, 5.0)[0]) == 0.0 and torch.isfinite(debiased_weights(v_model, last)).all()
    with pytest.raises(ConfigError, match="infinite"):
        training_scheduler(base, load_config(None, {"train.zero_terminal_snr": "true", "train.debiased_estimation": "true"}))

    runner = CliRunner()
    common = ["train", "--model", "tiny", "--instance", str(instance_dir), "--max-steps", "2", "--set", "train.num_samples=0", "--set", "train.log_every=1"]
    trained = runner.invoke(app, [*common, "--zero-terminal-snr", "--snr-gamma", "5", "--min-timestep", "998", "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    exported = runner.invoke(app, ["export", str(tmp_path / "run"), "--format", "a1111", "--out", str(tmp_path / "z.safetensors"), "--no-verify"])
    assert exported.exit_code == 0, exported.output
    assert read_safetensors(tmp_path / "z.safetensors")[1]["ss_zero_terminal_snr"] == "True"
    refused = runner.invoke(app, [*common, "--zero-terminal-snr", "--debiased-estimation", "--out", str(tmp_path / "bad")])
    assert refused.exit_code == 2 and "drop one of them" in " ".join(refused.output.split()) and not (tmp_path / "bad").exists()


def test_adafactor_trains_at_the_given_rates_and_is_recorded(tmp_path: Path, instance_dir: Path) -> None:
    from typer.testing import CliRunner

    from dreamlora.cli import app

    cfg = load_config(None, {"train.optimizer": "adafactor", "train.lr": "1e-3", "train.text_encoder_lr": "5e-4"})
    params = {name: [torch.nn.Parameter(torch.ones(4, 4))] for name in ("unet", "text_encoder")}
    optimizer = make_optimizer(params, cfg, torch.device("cpu"))
    assert type(optimizer).__name__ == "Adafactor" and [g["lr"] for g in optimizer.param_groups] == [1e-3, 5e-4]
    assert not optimizer.defaults["relative_step"] and not optimizer.defaults["scale_parameter"]
    runner = CliRunner()
    run = tmp_path / "run"
    trained = runner.invoke(app, ["train", "--model", "tiny", "--instance", str(instance_dir), "--max-steps", "2", "--set", "train.num_samples=0", "--optimizer", "adafactor",
                                  "--lr-scheduler", "polynomial", "--lr-power", "2", "--set", "train.log_every=1", "--out", str(run)])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    state_dicts, _ = read_diffusers_lora(run / "lora")
    assert all(v.abs().sum() > 0 for k, v in state_dicts["unet"].items() if "lora_B" in k)  # zero-initialised up weights moved
    assert [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1e-4, 1e-4 * 0.25]
    exported = runner.invoke(app, ["export", str(run), "--format", "a1111", "--out", str(tmp_path / "a.safetensors"), "--no-verify"])
    assert exported.exit_code == 0, exported.output
    meta = read_safetensors(tmp_path / "a.safetensors")[1]
    assert meta["ss_optimizer"].startswith("transformers.optimization.Adafactor(") and meta["ss_lr_scheduler"] == "polynomial"
    with pytest.raises(ConfigError, match="lr_power shapes the polynomial"):
        load_config(None, {"train.lr_power": "2"})


def test_weight_decay_betas_and_epsilon_reach_each_optimizer_group() -> None:
    """diffusers' --adam_weight_decay, --adam_weight_decay_text_encoder, --adam_beta1/2 and --adam_epsilon: the
    defaults are AdamW's (betas 0.9/0.999, decay 1e-2, eps 1e-8); set, they reach the groups they name."""
    groups = {"unet": [torch.nn.Parameter(torch.zeros(2))], "text_encoder": [torch.nn.Parameter(torch.zeros(2))]}
    plain = make_optimizer(groups, load_config(None, {}), torch.device("cpu"))
    assert [(g["betas"], g["weight_decay"], g["eps"]) for g in plain.param_groups] == [((0.9, 0.999), 1e-2, 1e-8)] * 2
    cfg = load_config(None, {
        "train.weight_decay": "0.1", "train.text_encoder_weight_decay": "0.001", "train.adam_beta2": "0.99", "train.adam_epsilon": "1e-6",
    })  # fmt: skip
    tuned = make_optimizer(groups, cfg, torch.device("cpu"))
    assert [(g["model"], g["betas"], g["weight_decay"], g["eps"]) for g in tuned.param_groups] == [
        ("unet", (0.9, 0.99), 0.1, 1e-6), ("text_encoder", (0.9, 0.99), 0.001, 1e-6),
    ]  # fmt: skip
    adafactor = make_optimizer(groups, load_config(None, {"train.optimizer": "adafactor", "train.weight_decay": "0.05"}), torch.device("cpu"))
    assert [g["weight_decay"] for g in adafactor.param_groups] == [0.05, 0.05]
    from dreamlora.export import optimizer_label

    assert optimizer_label(cfg.train) == "torch.optim.AdamW(weight_decay=0.1,betas=(0.9,0.99),eps=1e-06)"  # ss_optimizer, as kohya writes its args
    assert optimizer_label(load_config(None, {"train.optimizer": "lion8bit", "train.adam_beta1": "0.95"}).train) == "bitsandbytes.optim.Lion8bit(betas=(0.95,0.99))"
    assert optimizer_label(load_config(None, {"train.optimizer": "adafactor", "train.weight_decay": "0.05"}).train).endswith("warmup_init=False,weight_decay=0.05)")
    assert optimizer_label(load_config(None, {}).train) == "torch.optim.AdamW"


@pytest.mark.parametrize("overrides,message", [
    ({"train.optimizer": "adafactor", "train.adam_beta1": "0.9"}, "adafactor has no Adam betas or epsilon"),
    ({"train.optimizer": "lion", "train.adam_epsilon": "1e-6"}, "lion has no epsilon"),
    ({"train.optimizer": "prodigy", "train.lr": "1.0", "train.scale_lr": "true"}, "drop --scale-lr"),
    ({"train.weight_decay": "2"}, "train.weight_decay must be in [0, 1]"),
    ({"train.adam_beta2": "1.0"}, "train.adam_beta2 must be in [0, 1)"),
])  # fmt: skip
def test_optimizer_settings_an_optimizer_lacks_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_scale_lr_trains_at_the_scaled_rates_and_records_them(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--scale-lr (diffusers' --scale_lr): every rate times batch size x accumulation x processes, as the steps use
    it (metrics.jsonl) and as the export's training record and model card report it; --weight-decay is recorded too."""
    from typer.testing import CliRunner

    from dreamlora.cli import app

    monkeypatch.chdir(tmp_path)
    args = [
        "train", "--model", "tiny", "--instance", str(instance_dir), "--max-steps", "2", "--lr", "1e-4", "--text-encoder-lr", "5e-5",
        "--scale-lr", "--weight-decay", "0.1", "--set", "train.gradient_accumulation=2", "--set", "train.batch_size=2",
        "--set", "train.log_every=1", "--set", "train.num_samples=0", "--out", "runs/scaled",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "scaled" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["lr"], m["lr_text_encoder"]) for m in metrics] == [(pytest.approx(4e-4), pytest.approx(2e-4))] * 2
    exported = CliRunner().invoke(app, ["export", "runs/scaled", "--out", "scaled.safetensors", "--no-verify"])
    assert exported.exit_code == 0, exported.output
    meta = read_safetensors(tmp_path / "scaled.safetensors")[1]
    assert (float(meta["ss_learning_rate"]), float(meta["ss_text_encoder_lr"])) == (pytest.approx(4e-4), pytest.approx(2e-4))
    assert meta["ss_optimizer"] == "torch.optim.AdamW(weight_decay=0.1)"
    card = CliRunner().invoke(app, ["export", "runs/scaled", "--format", "diffusers", "--out", "scaled-folder", "--no-verify"])
    assert card.exit_code == 0 and "0.0004 (constant); text encoder 0.0002" in (tmp_path / "scaled-folder" / "README.md").read_text(), card.output
