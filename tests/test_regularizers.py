"""kohya's regularizers: network, rank and module dropout on each LoRA, max-norm (--scale-weight-norms), a timestep
range, input perturbation (--ip-noise-gamma), pyramid noise and debiased estimation: what each does to the numbers, that checkpointing replays the dropout
masks, and that a run records them (metrics, export metadata)."""

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from typer.testing import CliRunner

from dreamlora import lora as lora_module
from dreamlora.cli import app
from dreamlora.config import AdapterConfig, TrainConfig, load_config
from dreamlora.errors import ConfigError
from dreamlora.lora import ADAPTER_NAME, WeightNormLimiter, add_dropout_hooks, attach_adapters, lora_layers, read_diffusers_lora, read_safetensors, update_norm
from dreamlora.models import encode_prompt, load_components, tokenize
from dreamlora.train import _enable_checkpointing, check_timestep_range, debiased_weights, draw_timesteps, noisy_latents, pyramid_noise, resolve_data, train

runner = CliRunner()


class _Pair(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)


def _hooked(cfg: AdapterConfig) -> tuple[torch.nn.Module, dict[str, list[torch.Tensor]]]:
    """A linear and a conv with rank-8 LoRAs, the dropout hooks, and a later hook that records what the up projection gets."""
    torch.manual_seed(0)
    model = inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=["proj", "conv"], init_lora_weights=False), _Pair())
    assert len(add_dropout_hooks([model], cfg)) == 2
    seen: dict[str, list[torch.Tensor]] = {"proj": [], "conv": []}
    for name, layer in lora_layers(model):
        layer.lora_A[ADAPTER_NAME].register_forward_hook(lambda m, i, out, name=name: seen[name].append(out.detach()))
    return model, seen


def test_dropout_settings_are_checked() -> None:
    assert not AdapterConfig().any_dropout and AdapterConfig(dropout=0.1).any_dropout and not AdapterConfig(dropout=0.1).kohya_dropouts
    assert AdapterConfig(rank_dropout=0.1).kohya_dropouts and add_dropout_hooks([torch.nn.Linear(2, 2)], AdapterConfig()) == []
    for name in ("network_dropout", "rank_dropout", "module_dropout"):
        with pytest.raises(ConfigError, match=f"adapter.{name} must be in \\[0, 1\\)"):
            AdapterConfig(**{name: 1.0})
    with pytest.raises(ConfigError, match="min_timestep \\(500\\) must be below train.max_timestep \\(400\\)"):
        TrainConfig(min_timestep=500, max_timestep=400)
    scheduler = load_components("tiny").noise_scheduler
    with pytest.raises(ConfigError, match="0 <= min < max <= 1000"):
        check_timestep_range(load_config(None, {"train.max_timestep": "2000"}), scheduler)
    with pytest.raises(ConfigError, match="0 <= min < max <= 1000"):
        check_timestep_range(load_config(None, {"train.min_timestep": "1000"}), scheduler)
    check_timestep_range(load_config(None, {"train.min_timestep": "10", "train.max_timestep": "1000"}), scheduler)


def test_rank_dropout_drops_whole_channels_per_image_and_rescales() -> None:
    model, seen = _hooked(AdapterConfig(rank_dropout=0.5))
    x = torch.randn(64, 5, 8)
    image = torch.randn(64, 8, 6, 6)
    model.train()
    model.proj(x)
    model.conv(image)
    for name, before, channel_dim in (("proj", x @ model.proj.lora_A[ADAPTER_NAME].weight.T, -1), ("conv", model.conv.lora_A[ADAPTER_NAME]._conv_forward(image, model.conv.lora_A[ADAPTER_NAME].weight, None), 1)):
        after = seen[name][-1]
        kept = after != 0
        assert torch.allclose(after[kept], 2 * before[kept], rtol=1e-5)  # the kept channels rescaled by 1 / (1 - 0.5)
        # one decision per image and rank channel, the same at every token / pixel
        per_channel = kept.movedim(channel_dim, 1).flatten(2)
        assert torch.equal(per_channel.all(dim=2), per_channel.any(dim=2)), name
        share = per_channel[:, :, 0].float().mean().item()
        assert 0.35 < share < 0.65, (name, share)
    model.eval()
    model.proj(x)
    assert torch.equal(seen["proj"][-1], x @ model.proj.lora_A[ADAPTER_NAME].weight.T)  # no dropout at inference


def test_network_dropout_is_elementwise_and_module_dropout_skips_whole_loras() -> None:
    model, seen = _hooked(AdapterConfig(network_dropout=0.5))
    model.train()
    x = torch.randn(64, 5, 8)
    model.proj(x)
    kept = seen["proj"][-1] != 0
    assert not torch.equal(kept.all(dim=1), kept.any(dim=1))  # unlike rank dropout, tokens of one channel differ
    assert 0.35 < kept.float().mean().item() < 0.65

    model, seen = _hooked(AdapterConfig(module_dropout=0.5))
    model.train()
    base = torch.nn.functional.linear(x, model.proj.base_layer.weight, model.proj.base_layer.bias)
    skipped = 0
    for _ in range(200):
        out = model.proj(x)
        lora_out = seen["proj"][-1]
        if torch.equal(lora_out, torch.zeros_like(lora_out)):
            skipped += 1
            assert torch.allclose(out, base, atol=1e-6)  # the whole LoRA is skipped: the base layer's output
        else:
            assert torch.equal(lora_out, x @ model.proj.lora_A[ADAPTER_NAME].weight.T)  # kept unscaled, as kohya
    assert 60 < skipped < 140, skipped


def _dropout_grads(checkpointing: bool, preserve_rng: bool) -> dict[str, torch.Tensor]:
    components = load_components("tiny")
    torch.manual_seed(0)
    cfg = AdapterConfig(rank=4, init="nonzero", network_dropout=0.3, rank_dropout=0.3, module_dropout=0.2)
    attach_adapters(components.unet, components.text_encoder, cfg)
    add_dropout_hooks([components.unet, components.text_encoder], cfg)
    if checkpointing:
        _enable_checkpointing(components, train_text_encoder=True, preserve_rng=preserve_rng)
    components.unet.train()
    components.text_encoder.train()
    ids = tokenize(components.tokenizer, ["a photo of sks dog", "a photo of dog"])
    latents, timesteps = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([300, 700])
    torch.manual_seed(123)  # the dropout masks
    context = encode_prompt(components.text_encoder, ids)
    components.unet(latents, timesteps, context).sample.square().mean().backward()
    return {f"{group}.{n}": p.grad.clone() for group, m in (("unet", components.unet), ("te", components.text_encoder)) for n, p in m.named_parameters() if p.requires_grad}


def test_checkpointing_replays_the_dropout_masks() -> None:
    """Non-reentrant checkpointing recomputes each block in backward; the dropout there must draw the masks of the
    forward pass (preserve_rng_state), or the gradients belong to another network than the loss."""
    plain = _dropout_grads(checkpointing=False, preserve_rng=False)
    replayed = _dropout_grads(checkpointing=True, preserve_rng=True)
    assert plain.keys() == replayed.keys() and any(k.startswith("te.") for k in plain)
    for key in plain:
        assert torch.allclose(plain[key], replayed[key], rtol=1e-4, atol=1e-7), key
    assert any(v.abs().sum() > 0 for k, v in plain.items() if k.startswith("te.")) and any(v.abs().sum() > 0 for k, v in plain.items() if k.startswith("unet."))
    redrawn = _dropout_grads(checkpointing=True, preserve_rng=False)  # the control: without the saved RNG state they differ
    assert any(not torch.allclose(plain[k], redrawn[k], rtol=1e-4, atol=1e-7) for k in plain)


def _explicit_norms(models: list[torch.nn.Module]) -> list[torch.Tensor]:
    out = []
    for model in models:
        for _, layer in lora_layers(model):
            down, up = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
            out.append(layer.scaling[ADAPTER_NAME] * (up.detach().flatten(1) @ down.detach().flatten(1)))
    return out


def test_weight_norm_limiter_caps_each_update_norm_and_keeps_its_direction() -> None:
    components = load_components("tiny")
    torch.manual_seed(0)
    attach_adapters(components.unet, components.text_encoder, AdapterConfig(rank=4, alpha=2.0, conv_rank=2, conv_alpha=4.0, init="nonzero"))
    models = [components.unet, components.text_encoder]
    with torch.no_grad():
        for i, (_, layer) in enumerate(lora_layers(components.unet)):
            layer.lora_B[ADAPTER_NAME].weight.mul_(1 + 3 * (i % 3))  # a spread of norms
    before = _explicit_norms(models)
    norms = torch.stack([d.norm() for d in before])
    assert torch.allclose(norms, torch.stack([update_norm(layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight, layer.scaling[ADAPTER_NAME]) for m in models for _, layer in lora_layers(m)]), rtol=1e-4)
    cap = norms.median().item()
    over = norms > cap
    assert 0 < int(over.sum()) < len(norms)

    # With master copies the limiter scales the copies (what the optimizer steps), not the model's weights.
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    masters = {p: p.detach().clone() for p in params}
    shadow = WeightNormLimiter(models, cap, substitute=masters)
    shadow()
    assert _explicit_norms(models)[0].equal(before[0]) and any(not masters[p].equal(p) for p in params)

    limiter = WeightNormLimiter(models, cap)
    assert len(limiter.pairs) == len(norms)
    limiter()
    after = _explicit_norms(models)
    for i, (old, new) in enumerate(zip(before, after)):
        if over[i]:
            assert new.norm().item() == pytest.approx(cap, rel=1e-4)
            assert torch.allclose(new, old * (cap / norms[i]), rtol=1e-4, atol=1e-7)  # the same direction, shorter
        else:
            assert torch.equal(new, old)  # modules within the cap are not touched
    stats = limiter.stats()
    assert stats["keys_scaled"] == int(over.sum()) and stats["max_key_norm"] == pytest.approx(cap, rel=1e-4)
    assert stats["average_key_norm"] == pytest.approx(torch.minimum(norms, torch.tensor(cap)).mean().item(), rel=1e-4)
    zero = WeightNormLimiter([torch.nn.Linear(2, 2)], 1.0)
    zero()
    assert zero.stats() == {}


def test_timestep_range_and_input_perturbation() -> None:
    scheduler = load_components("tiny").noise_scheduler
    drawn = draw_timesteps(scheduler, 5000, torch.Generator().manual_seed(0), torch.device("cpu"), 200, 300)
    assert drawn.min().item() == 200 and drawn.max().item() == 299
    full = draw_timesteps(scheduler, 5000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert full.max().item() > 990 and full.min().item() < 10

    latents, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    timesteps = torch.tensor([10, 300, 600, 999])
    generator = torch.Generator().manual_seed(5)
    assert torch.equal(noisy_latents(scheduler, latents, noise, timesteps, generator), scheduler.add_noise(latents, noise, timesteps))
    extra = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    perturbed = noisy_latents(scheduler, latents, noise, timesteps, torch.Generator().manual_seed(5), ip_noise_gamma=0.1)
    sigma = (1 - scheduler.alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(perturbed - scheduler.add_noise(latents, noise, timesteps), sigma * 0.1 * extra, atol=1e-5)


def test_random_strengths_draw_one_scale_per_batch() -> None:
    """kohya's --noise_offset_random_strength and --ip_noise_gamma_random_strength: the offset (the perturbation) is the
    fixed-strength one scaled by one uniform draw in [0, 1) for the whole batch, different from batch to batch."""
    from dreamlora.train import sample_noise

    latents = torch.zeros(6, 4, 8, 8)
    scales = []
    for seed in range(8):
        base = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
        draw = torch.Generator().manual_seed(seed)
        torch.randn(latents.shape, generator=draw)
        strength = torch.rand(1, generator=draw).item()
        channel = torch.randn((6, 4, 1, 1), generator=draw)
        noise = sample_noise(latents, torch.Generator().manual_seed(seed), 0.1, random=True)
        assert torch.allclose(noise - base, (0.1 * strength * channel).expand_as(noise), atol=1e-6)
        scales.append(strength)
    assert len(set(scales)) == len(scales) and all(0 <= v < 1 for v in scales)

    scheduler = load_components("tiny").noise_scheduler
    noise, timesteps = torch.randn(4, 4, 8, 8), torch.tensor([10, 300, 600, 999])
    sigma = (1 - scheduler.alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
    draw = torch.Generator().manual_seed(3)
    gamma = 0.1 * torch.rand(1, generator=draw).item()
    extra = torch.randn(noise.shape, generator=draw)
    perturbed = noisy_latents(scheduler, latents[:4], noise, timesteps, torch.Generator().manual_seed(3), ip_noise_gamma=0.1, random=True)
    assert 0 < gamma < 0.1 and torch.allclose(perturbed - scheduler.add_noise(latents[:4], noise, timesteps), sigma * gamma * extra, atol=1e-5)


def test_adaptive_noise_scale_follows_each_images_channel_means() -> None:
    """kohya's --adaptive_noise_scale: each image and channel's offset strength is noise_offset + scale x |its latent
    mean|, never below 0; the draws are the plain offset's."""
    from dreamlora.train import sample_noise

    latents = torch.zeros(2, 4, 8, 8)
    latents[0, 1] += 2.0
    latents[1, 2] -= 3.0
    base = sample_noise(latents, torch.Generator().manual_seed(4), 0.0)
    plain = sample_noise(latents, torch.Generator().manual_seed(4), 0.1) - base  # 0.1 x channel draws
    adaptive = sample_noise(latents, torch.Generator().manual_seed(4), 0.1, adaptive_scale=0.05) - base
    means = latents.mean(dim=(2, 3), keepdim=True).abs()
    assert torch.allclose(adaptive, plain * (0.1 + 0.05 * means) / 0.1, atol=1e-6)
    assert not torch.allclose(adaptive, plain)
    negative = sample_noise(latents, torch.Generator().manual_seed(4), 0.1, adaptive_scale=-0.05) - base
    assert torch.allclose(negative, plain * (0.1 - 0.05 * means).clamp(min=0) / 0.1, atol=1e-6)
    assert negative[1, 2].abs().max() == 0 and negative[0, 0].abs().max() > 0  # |mean| 3 x 0.05 > 0.1: no offset left


@pytest.mark.parametrize("preset", ["tiny", "tiny-v"])
def test_debiased_estimation_weights(preset: str) -> None:
    scheduler = load_components(preset).noise_scheduler
    timesteps = torch.tensor([0, 50, 400, 999])
    weights = debiased_weights(scheduler, timesteps)
    for t, w in zip(timesteps.tolist(), weights.tolist()):
        a = float(scheduler.alphas_cumprod[t])
        snr = min(a / (1 - a), 1000.0)
        assert w == pytest.approx(snr**-0.5 if preset == "tiny" else 1 / (snr + 1), rel=1e-5), t
    assert weights[-1] > weights[0]  # the noisy timesteps, where the plain loss is biased low, weigh more
    with pytest.raises(ConfigError, match="multires_noise_discount shapes the pyramid noise"):
        TrainConfig(multires_noise_discount=0.5)


def test_pyramid_noise_adds_low_frequencies_at_unit_std() -> None:
    noise = torch.randn(8, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    pyramid = pyramid_noise(noise, torch.Generator().manual_seed(3), iterations=6, discount=0.8)
    again = pyramid_noise(noise, torch.Generator().manual_seed(3), iterations=6, discount=0.8)
    assert torch.equal(pyramid, again) and not torch.allclose(pyramid, noise)
    assert pyramid.std().item() == pytest.approx(1.0, rel=1e-4)
    white_dc, pyramid_dc = noise.mean(dim=(2, 3)).std().item(), pyramid.mean(dim=(2, 3)).std().item()
    assert pyramid_dc > 5 * white_dc  # each image's channel means move: overall brightness and colour can be learned
    assert torch.equal(pyramid_noise(noise, torch.Generator().manual_seed(3), 0, 0.8), noise / noise.std())


def test_text_encoders_train_in_training_mode(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The text encoders load in eval mode (PEFT's new LoRA layers in training mode); sampling during the run puts each
    model back in its mode, so a run must put them in training mode, or their LoRA dropout stops after the first samples."""
    calls: list[tuple[int, bool]] = []
    original = lora_module._dropout_hook

    def recording(*args: float):
        hook = original(*args)

        def wrapper(layer, inputs, output):
            if torch.is_grad_enabled():  # a training forward (sampling runs without gradients)
                calls.append((id(layer), layer.training))
            return hook(layer, inputs, output)

        return wrapper

    monkeypatch.setattr(lora_module, "_dropout_hook", recording)
    overrides = {"model.name": "tiny", "data.instance_dir": str(instance_dir), "data.resolution": "32", "train.max_steps": "2",
                 "train.out": str(tmp_path / "run"), "train.num_samples": "1", "train.sample_every": "1", "prior.steps": "1", "adapter.rank_dropout": "0.5"}  # fmt: skip
    cfg, _ = resolve_data(load_config(None, overrides), priors_root=tmp_path / "none")
    components = load_components("tiny")
    train(cfg, components=components)
    text_encoder = {id(layer.lora_A[ADAPTER_NAME]) for _, layer in lora_layers(components.text_encoder)}
    unet = {id(layer.lora_A[ADAPTER_NAME]) for _, layer in lora_layers(components.unet)}
    assert text_encoder and {i for i, _ in calls} == text_encoder | unet  # every LoRA's hook ran
    assert all(training for i, training in calls if i in text_encoder)


def test_cli_run_records_the_regularizers(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = ["train", "--model", "tiny", "--instance", str(instance_dir), "--class", "dog", "--num-class-images", "2", "--max-steps", "3",
            "--set", "adapter.init=nonzero", "--set", "train.num_samples=0", "--set", "train.log_every=1"]  # fmt: skip
    for flags, message in (
        (["--max-timestep", "2000"], "0 <= min < max <= 1000"), (["--rank-dropout", "1"], "adapter.rank_dropout must be in [0, 1)"),
        (["--noise-offset-random-strength"], "noise_offset_random_strength draws the strength of --noise-offset N"),
        (["--adaptive-noise-scale", "0.01"], "adaptive_noise_scale adapts the strength of --noise-offset N"),
    ):  # fmt: skip
        bad = runner.invoke(app, [*base, *flags, "--out", "runs/bad"])
        assert bad.exit_code == 2 and message in " ".join(bad.output.split()) and "Traceback" not in bad.output, bad.output
    assert not (tmp_path / "runs" / "bad").exists()

    cap = 0.05
    regularizers = ["--lora-dropout", "0.05", "--network-dropout", "0.1", "--rank-dropout", "0.2", "--module-dropout", "0.1", "--scale-weight-norms", str(cap),
                    "--ip-noise-gamma", "0.1", "--ip-noise-gamma-random-strength", "--noise-offset", "0.05", "--noise-offset-random-strength", "--adaptive-noise-scale", "0.005", "--min-timestep", "100", "--max-timestep", "900", "--multires-noise-iterations", "3",
                    "--debiased-estimation"]  # fmt: skip
    trained = runner.invoke(app, [*base, *regularizers, "--checkpoint-every", "3", "--out", "runs/reg"])
    assert trained.exit_code == 0, trained.output
    run = tmp_path / "runs" / "reg"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["keys_scaled"] > 0 and all(m["max_key_norm"] <= cap * 1.0001 for m in metrics)
    state_dicts, metadata = read_diffusers_lora(run / "lora")
    assert metadata["unet"]["lora_dropout"] == 0.05  # PEFT's own dropout, in the adapter config
    for group, sd in state_dicts.items():
        scaling = metadata[group]["lora_alpha"] / metadata[group]["r"]
        for key in (k for k in sd if "lora_A" in k):
            assert update_norm(sd[key], sd[key.replace("lora_A", "lora_B")], scaling).item() <= cap * 1.001, key

    exported = runner.invoke(app, ["export", str(run), "--format", "a1111", "--out", "reg.safetensors"])
    assert exported.exit_code == 0, exported.output
    _, meta = read_safetensors(tmp_path / "reg.safetensors")
    assert meta["ss_network_dropout"] == "0.1" and meta["ss_scale_weight_norms"] == str(cap) and meta["ss_ip_noise_gamma"] == "0.1"
    assert meta["ss_adaptive_noise_scale"] == "0.005"
    assert meta["ss_noise_offset"] == "0.05" and meta["ss_noise_offset_random_strength"] == meta["ss_ip_noise_gamma_random_strength"] == "True"
    assert meta["ss_multires_noise_iterations"] == "3" and meta["ss_multires_noise_discount"] == "0.3" and meta["ss_debiased_estimation"] == "True"
    assert json.loads(meta["ss_network_args"]) == {"train_text_encoder": True, "rank_dropout": "0.2", "module_dropout": "0.1"}
    changed = runner.invoke(app, ["train", "--resume", "--out", str(run), "--max-steps", "4", "--rank-dropout", "0.3"])
    assert changed.exit_code == 2 and "adapter.rank_dropout" in " ".join(changed.output.split())


def _deltas(state_dicts: dict, metadata: dict) -> dict[str, torch.Tensor]:
    out = {}
    for group, sd in state_dicts.items():
        scaling = metadata[group]["lora_alpha"] / metadata[group]["r"]
        for key in (k for k in sd if k.endswith("lora_A.weight")):
            up = sd[key.replace("lora_A", "lora_B")].float()
            out[f"{group}.{key}"] = scaling * (up.flatten(1) @ sd[key].float().flatten(1))
    return out


def test_init_lora_starts_from_an_existing_lora(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kohya's --network_weights: a run starts from a LoRA file (kohya/A1111 or diffusers) with exactly its update,
    whatever its alpha; a file this run cannot hold is refused before anything is written."""
    monkeypatch.chdir(tmp_path)
    base = ["train", "--model", "tiny", "--instance", str(instance_dir), "--class", "dog", "--num-class-images", "2",
            "--set", "train.num_samples=0"]  # fmt: skip
    first = runner.invoke(app, [*base, "--max-steps", "2", "--rank", "4", "--alpha", "8", "--set", "adapter.init=nonzero", "--out", "runs/first"])
    assert first.exit_code == 0, first.output
    exported = runner.invoke(app, ["export", "runs/first", "--format", "a1111", "--dtype", "fp32", "--out", "first.safetensors"])
    assert exported.exit_code == 0, exported.output
    reference = _deltas(*read_diffusers_lora(tmp_path / "runs" / "first" / "lora"))
    assert all(d.abs().sum() > 0 for d in reference.values())

    last = max(int(k.split("layers.")[1].split(".")[0]) for k in reference if k.startswith("text_encoder."))
    # --clip-skip 2 removes the text encoder's last layer: the file's modules there are left out, the rest start as saved.
    without_last = {k: v for k, v in reference.items() if f"text_encoder.encoder.layers.{last}." not in k}
    assert 0 < len(without_last) < len(reference)
    for source, name, flags, expected in (
        ("first.safetensors", "from-a1111", [], reference), ("runs/first", "from-run", [], reference),
        ("first.safetensors", "clip-skip-a1111", ["--clip-skip", "2"], without_last), ("runs/first", "clip-skip-run", ["--clip-skip", "2"], without_last),
    ):  # fmt: skip
        # alpha 2 here against the file's 8: the start must still be the file's update; lr ~0 keeps it there for a step
        run = runner.invoke(app, [*base, "--max-steps", "1", "--rank", "4", "--alpha", "2", "--lr", "1e-12", "--text-encoder-lr", "1e-12",
                                  "--init-lora", source, *flags, "--out", f"runs/{name}"])  # fmt: skip
        assert run.exit_code == 0, run.output
        started = _deltas(*read_diffusers_lora(tmp_path / "runs" / name / "lora"))
        assert started.keys() == expected.keys()
        for key, delta in expected.items():
            assert torch.allclose(started[key], delta, rtol=1e-4, atol=1e-6), (name, key)

    for flags, message in (
        (["--rank", "2"], "has rank 4"), (["--no-text-encoder"], "drop --no-text-encoder"),
        (["--init-lora", "missing.safetensors"], "--init-lora 'missing.safetensors' does not exist"),
    ):  # fmt: skip
        args = [*base, "--max-steps", "1", *(["--init-lora", "first.safetensors"] if "--init-lora" not in flags else []), *flags, "--out", "runs/bad"]
        bad = runner.invoke(app, args)
        assert bad.exit_code == 2 and message in " ".join(bad.output.split()) and "Traceback" not in bad.output, (flags, bad.output)
    wide = runner.invoke(app, [*base, "--max-steps", "1", "--targets", "all", "--out", "runs/wide"])
    assert wide.exit_code == 0, wide.output
    narrow = runner.invoke(app, [*base, "--max-steps", "1", "--init-lora", "runs/wide", "--out", "runs/bad"])
    assert narrow.exit_code == 2 and "--targets all" in " ".join(narrow.output.split())
    assert not (tmp_path / "runs" / "bad").exists()


def test_init_lora_on_sdxl_skips_nothing_it_needs(tmp_path: Path) -> None:
    from dreamlora.lora import adapter_metadata, adapter_state_dicts, load_initial_weights, save_diffusers_lora
    from dreamlora.train import _initial_lora_modules

    source = load_components("tiny-sdxl")
    torch.manual_seed(0)
    adapter = AdapterConfig(rank=4, alpha=8.0, init="nonzero")
    attach_adapters(source.unet, source.text_encoder, adapter, source.text_encoder_2, source.family.penultimate_encoders)
    models = {"unet": source.unet, "text_encoder": source.text_encoder, "text_encoder_2": source.text_encoder_2}
    state_dicts = adapter_state_dicts(models)
    reference = _deltas(state_dicts, {k: adapter_metadata(m) for k, m in models.items()})
    # kohya's SDXL files also carry the first encoder's last layer, which SDXL never reads: dropped, not refused.
    last = source.text_encoder.config.num_hidden_layers - 1
    state_dicts["text_encoder"][f"encoder.layers.{last}.self_attn.q_proj.lora_A.weight"] = torch.ones(4, 32)
    state_dicts["text_encoder"][f"encoder.layers.{last}.self_attn.q_proj.lora_B.weight"] = torch.ones(32, 4)
    path = save_diffusers_lora(tmp_path / "xl", state_dicts, {k: adapter_metadata(m) for k, m in models.items()})

    target = load_components("tiny-sdxl")
    cfg = load_config(None, {"model.name": "tiny-sdxl", "adapter.rank": "4", "adapter.alpha": "1", "adapter.init_lora": str(path)})
    modules = _initial_lora_modules(cfg, target)
    attach_adapters(target.unet, target.text_encoder, cfg.adapter, target.text_encoder_2, target.family.penultimate_encoders)
    fresh = {"unet": target.unet, "text_encoder": target.text_encoder, "text_encoder_2": target.text_encoder_2}
    assert load_initial_weights(fresh, modules, str(path)) == len(reference)
    started = _deltas(adapter_state_dicts(fresh), {k: adapter_metadata(m) for k, m in fresh.items()})
    assert started.keys() == reference.keys() and any(k.startswith("text_encoder_2.") for k in started)
    for key, delta in reference.items():
        assert torch.allclose(started[key], delta, rtol=1e-4, atol=1e-6), key


def test_loraplus_groups_scale_the_up_weights_learning_rate() -> None:
    """LoRA+ (kohya's loraplus_lr_ratio): each model's LoRA up weights get a group of their own at its rate times the
    ratio (the text encoders' own ratio where set); both groups of a model follow its schedule."""
    from dreamlora.train import make_lr_scheduler, make_optimizer

    cfg = load_config(None, {"train.lr": "1e-3", "train.text_encoder_lr": "5e-4", "train.loraplus_lr_ratio": "16", "train.loraplus_text_encoder_lr_ratio": "4",
                             "train.text_encoder_steps_fraction": "0.5", "train.max_steps": "4"})  # fmt: skip
    params = {name: [torch.nn.Parameter(torch.zeros(2)) for _ in range(4)] for name in ("unet", "text_encoder")}
    flags = {name: [False, True, False, True] for name in params}
    optimizer = make_optimizer(params, cfg, torch.device("cpu"), up_weights=flags)
    groups = [(g["model"], g["lr"], [id(p) for p in g["params"]]) for g in optimizer.param_groups]
    assert groups == [
        ("unet", 1e-3, [id(params["unet"][0]), id(params["unet"][2])]), ("unet", 16e-3, [id(params["unet"][1]), id(params["unet"][3])]),
        ("text_encoder", 5e-4, [id(params["text_encoder"][0]), id(params["text_encoder"][2])]), ("text_encoder", 2e-3, [id(params["text_encoder"][1]), id(params["text_encoder"][3])]),
    ]  # fmt: skip
    scheduler = make_lr_scheduler(optimizer, cfg)
    rates = []
    for _ in range(3):
        rates.append(scheduler.get_last_lr())
        optimizer.step()
        scheduler.step()
    assert rates[2] == [1e-3, 16e-3, 0.0, 0.0]  # the text encoder stops at step 2 (half of 4), both its groups
    unet_only = TrainConfig(lr=1e-3, loraplus_lr_ratio=16, loraplus_unet_lr_ratio=8)  # the UNet's own ratio wins there
    assert [unet_only.loraplus_ratio(m) for m in ("unet", "text_encoder", "text_encoder_2", "embeddings")] == [8.0, 16.0, 16.0, 1.0]
    off = make_optimizer(params, load_config(None, {}), torch.device("cpu"), up_weights=flags)
    assert [g["model"] for g in off.param_groups] == ["unet", "text_encoder"]
    with pytest.raises(ConfigError, match="loraplus_lr_ratio must be 0"):
        TrainConfig(loraplus_lr_ratio=0.5)


def test_loraplus_run_moves_the_up_weights_ratio_times_further(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From the same start (--init-lora), one AdamW step with --loraplus-lr-ratio 16 moves every up weight 16 times
    as far as without it and every down weight the same; the export records the ratio as kohya does; a resume that
    changes the optimizer's groups is refused with a message."""
    monkeypatch.chdir(tmp_path)
    base = ["train", "--model", "tiny", "--instance", str(instance_dir), "--class", "dog", "--num-class-images", "2", "--set", "train.num_samples=0", "--max-steps", "1"]
    start = runner.invoke(app, [*base, "--set", "adapter.init=nonzero", "--out", "runs/start"])
    assert start.exit_code == 0, start.output
    initial = read_diffusers_lora(tmp_path / "runs" / "start" / "lora")[0]
    moved = {}
    for name, flags in (("plain", []), ("plus", ["--loraplus-lr-ratio", "16", "--checkpoint-every", "1"])):
        run = runner.invoke(app, [*base, "--lr", "1e-3", "--init-lora", "runs/start", *flags, "--out", f"runs/{name}"])
        assert run.exit_code == 0, run.output
        after = read_diffusers_lora(tmp_path / "runs" / name / "lora")[0]
        moved[name] = {f"{g}.{k}": after[g][k] - initial[g][k] for g in initial for k in initial[g]}
    ups = [k for k in moved["plain"] if ".lora_B." in k]
    downs = [k for k in moved["plain"] if ".lora_A." in k]
    assert ups and downs and any(k.startswith("text_encoder.") for k in ups)
    for key in ups:
        assert moved["plain"][key].abs().sum() > 0, key
        assert torch.allclose(moved["plus"][key], 16 * moved["plain"][key], rtol=1e-3, atol=1e-9), key
    for key in downs:
        assert torch.allclose(moved["plus"][key], moved["plain"][key], rtol=1e-4, atol=1e-9), key
    metrics = json.loads((tmp_path / "runs" / "plus" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["lr"] == 1e-3  # the base (down-weight) rate is the one logged

    exported = runner.invoke(app, ["export", "runs/plus", "--format", "a1111", "--out", "plus.safetensors"])
    assert exported.exit_code == 0, exported.output
    from safetensors import safe_open

    with safe_open(str(tmp_path / "plus.safetensors"), "pt") as handle:
        network_args = json.loads(handle.metadata()["ss_network_args"])
    assert network_args["loraplus_lr_ratio"] == "16"

    before = {p: p.read_bytes() for p in (tmp_path / "runs" / "plus").rglob("*") if p.is_file()}
    resumed = runner.invoke(app, ["train", "--out", "runs/plus", "--resume", "--max-steps", "2", "--loraplus-lr-ratio", "0", "--force"])
    said = " ".join(resumed.output.replace("│", " ").split())
    assert resumed.exit_code == 2 and "holds 4 optimizer parameter groups, this run has 2" in said and "Traceback" not in said, resumed.output
    assert {p: p.read_bytes() for p in (tmp_path / "runs" / "plus").rglob("*") if p.is_file()} == before
