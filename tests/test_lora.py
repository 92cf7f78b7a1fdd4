from pathlib import Path

import torch

from dreamlora.config import AdapterConfig
from dreamlora.lora import adapter_metadata, adapter_state_dicts, attach_adapters, load_adapters, read_diffusers_lora, save_diffusers_lora
from dreamlora.models import build_pipeline, load_components, tokenize


def _adapted(init: str = "nonzero", rank: int = 4, alpha: float = 8.0):
    torch.manual_seed(0)
    components = load_components("tiny")
    attach_adapters(components.unet, components.text_encoder, AdapterConfig(rank=rank, alpha=alpha, init=init))
    return components


def test_only_adapter_parameters_are_trainable_and_fp32() -> None:
    components = _adapted()
    for model in (components.unet, components.text_encoder):
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in components.vae.parameters())


def _outputs(components, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    ids = tokenize(components.tokenizer, ["a photo of sks dog"])
    with torch.no_grad():
        context = components.text_encoder(ids)[0]
        return context, components.unet(latents, torch.tensor([500]), context).sample


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    components = _adapted()
    models = {"unet": components.unet, "text_encoder": components.text_encoder}
    state_dicts = adapter_state_dicts(models)
    assert all(v.abs().sum() > 0 for k, v in state_dicts["unet"].items() if "lora_B" in k)
    path = save_diffusers_lora(tmp_path, state_dicts, {k: adapter_metadata(m) for k, m in models.items()})
    loaded, metadata = read_diffusers_lora(path)
    assert metadata["unet"]["lora_alpha"] == 8.0 and metadata["unet"]["r"] == 4
    for group in state_dicts:
        assert set(loaded[group]) == set(state_dicts[group])
        assert all(torch.equal(loaded[group][k], state_dicts[group][k]) for k in loaded[group])
    fresh = load_components("tiny")
    load_adapters({"unet": fresh.unet, "text_encoder": fresh.text_encoder}, loaded, metadata)
    for a, b in zip(_outputs(components), _outputs(fresh)):
        assert torch.equal(a, b)


def test_diffusers_loader_keeps_alpha(tmp_path: Path) -> None:
    components = _adapted(alpha=2.0)
    models = {"unet": components.unet, "text_encoder": components.text_encoder}
    save_diffusers_lora(tmp_path, adapter_state_dicts(models), {k: adapter_metadata(m) for k, m in models.items()})
    base = load_components("tiny")
    base_outputs = _outputs(base)
    pipeline = build_pipeline(base)
    pipeline.load_lora_weights(str(tmp_path))
    expected, got = _outputs(components), _outputs(base)
    for e, g, b in zip(expected, got, base_outputs):
        assert torch.allclose(e, g, atol=1e-5)
        assert not torch.allclose(e, b, atol=1e-3)  # the LoRA really changes the output
