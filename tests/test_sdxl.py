"""SDXL on the tiny SDXL preset: family detection, size conditioning, NaN latents, training, both exports and the CLI."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from dreamlora.config import AdapterConfig, ExportConfig, load_config
from dreamlora.data import ImageFolderDataset, list_images
from dreamlora.errors import ConfigError
from dreamlora.export import export_run, kohya_naming, ldm_unet_module_name, sgm_unet_module_name, sgm_unet_renames
from dreamlora.lora import adapter_metadata, adapter_state_dicts, attach_adapters, read_diffusers_lora, save_diffusers_lora
from dreamlora.models import SD1, SDXL, build_pipeline, build_random, detect_family, load_components, tiny_model_dir, tokenize

RANK, ALPHA = 4, 8.0
PROMPT = "a photo of sks dog"
SDXL_UNET = json.loads((Path(__file__).resolve().parents[1] / "dreamlora" / "configs" / "sdxl" / "unet.json").read_text())
TIME_IDS = torch.tensor([[48.0, 40.0, 4.0, 8.0, 32.0, 32.0]])


def probe(components) -> dict[str, torch.Tensor]:
    """Fixed-seed last hidden state of both text encoders and the UNet's prediction with SDXL's added conditioning."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, 64, generator=generator)
    added = {"text_embeds": torch.randn(1, 32, generator=generator), "time_ids": TIME_IDS}
    with torch.no_grad():
        out = {
            group: getattr(components, group).float()(tokenize(getattr(components, tok), [PROMPT])).last_hidden_state
            for group, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
        }
        out["unet"] = components.unet.float()(latents, torch.tensor([500]), encoder_hidden_states=context, added_cond_kwargs=added).sample
    return out


def assert_reproduces(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], base: dict[str, torch.Tensor], rtol: float) -> None:
    for group in ("unet", "text_encoder", "text_encoder_2"):
        effect = (reference[group] - base[group]).abs().max()
        assert effect > 1e-2, f"the {group} LoRA must change the output, or the comparison proves nothing"
        diff = (got[group] - reference[group]).abs().max()
        assert diff <= rtol * effect + 1e-6, f"{group}: |diff| {diff} vs LoRA effect {effect}"


def photos(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(sizes))
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"photo{i}.png")
    return folder


# --- family and presets ---------------------------------------------------------------------------


def test_tiny_sdxl_is_detected_and_loads_as_an_sdxl_pipeline() -> None:
    from diffusers import StableDiffusionXLPipeline

    components = load_components("tiny-sdxl")
    assert components.family is SDXL and components.family.base_model_version == "sdxl_base_v1-0"
    assert type(components.text_encoder_2).__name__ == "CLIPTextModelWithProjection" and components.tokenizer_2 is not None
    assert list(components.text_encoders) == ["text_encoder", "text_encoder_2"] and components.native_resolution == 32
    index = json.loads((tiny_model_dir("tiny-sdxl") / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir("tiny-sdxl"), local_files_only=True)
    assert pipe.unet.config.addition_embed_type == "text_time"
    image = build_pipeline(components)("a photo of dog", num_inference_steps=2, height=32, width=32, guidance_scale=5.0).images[0]
    assert image.size == (32, 32)
    sd1 = load_components("tiny")
    assert detect_family(sd1.text_encoder.config, dict(sd1.unet.config)) is SD1


def test_random_sdxl_has_sdxl_1_0_architecture() -> None:
    components = build_random("sdxl", dtype=torch.bfloat16, device="meta")
    counts = {name: sum(p.numel() for p in getattr(components, name).parameters()) for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    # Parameter counts of stabilityai/stable-diffusion-xl-base-1.0's parts.
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}
    assert components.family is SDXL and components.native_resolution == 1024
    assert components.unet.dtype == torch.bfloat16 and components.text_encoder_2.config.projection_dim == 1280


# --- SGM names ------------------------------------------------------------------------------------


def test_sgm_names_of_sdxl_base() -> None:
    renames = sgm_unet_renames(SDXL_UNET)
    expected = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0": "input_blocks.8.1.transformer_blocks.9.attn2.to_out.0",
        "mid_block.attentions.0.transformer_blocks.3.attn1.to_k": "middle_block.1.transformer_blocks.3.attn1.to_k",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v": "output_blocks.0.1.transformer_blocks.0.attn1.to_v",
        "up_blocks.1.attentions.2.proj_out": "output_blocks.5.1.proj_out",
        "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
        "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.2.resnets.2.conv_shortcut": "output_blocks.8.0.skip_connection",
        "add_embedding.linear_1": "label_emb.0.0",
        "conv_in": "input_blocks.0.0",
    }
    for diffusers_name, sgm in expected.items():
        assert sgm_unet_module_name(diffusers_name, renames) == sgm


def test_sgm_names_invert_to_diffusers_names_for_every_layer() -> None:
    """Every Linear/Conv layer of SDXL's UNet blocks: our SGM name read back by the LDM reader gives the diffusers name."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SDXL_UNET)
    naming = kohya_naming("sdxl", SDXL_UNET)
    down = ["CrossAttn" in t for t in SDXL_UNET["down_block_types"]]
    up = ["CrossAttn" in t for t in SDXL_UNET["up_block_types"]]
    layers = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n.startswith(("down_blocks", "mid_block", "up_blocks"))]
    assert len(layers) == 788  # 70 transformer blocks and 22 resnets (and samplers) of SDXL
    names = set()
    for name in layers:
        kohya = naming.name("unet", name)
        assert re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_\d", kohya), kohya
        assert ldm_unet_module_name(kohya[len("lora_unet_"):], 2, down, up) == name.replace(".", "_")
        names.add(kohya)
    assert len(names) == len(layers)  # no two layers share a name
    assert naming.name("text_encoder_2", "encoder.layers.31.self_attn.out_proj") == "lora_te2_text_model_encoder_layers_31_self_attn_out_proj"


# --- data: size conditioning and NaN latents -------------------------------------------------------


def test_size_conditioning_follows_the_real_image_size_and_crop(tmp_path: Path) -> None:
    folder = photos(tmp_path / "dog", [(49, 40), (40, 64)])
    dataset = ImageFolderDataset(list_images(folder, "instance"), "p", 32, "instance")
    # 49x40 -> resized 39x32: centre crop at left 3; its mirror image has the crop at 39 - 3 - 32 = 4.
    assert dataset.size_conditioning(0, dataset.center_crop_box(0)).tolist() == [40, 49, 0, 3, 32, 32]
    assert dataset.size_conditioning(0, dataset.center_crop_box(0), flipped=True).tolist() == [40, 49, 0, 4, 32, 32]
    # 40x64 -> resized 32x51: centre crop at top 9.
    assert dataset.size_conditioning(1, dataset.center_crop_box(1)).tolist() == [64, 40, 9, 0, 32, 32]
    box = dataset.random_crop_box(1, torch.Generator().manual_seed(5))
    assert box[0] == 0 and 0 <= box[1] <= 19
    assert dataset.size_conditioning(1, box).tolist() == [64, 40, box[1], 0, 32, 32]
    # The random crop's pixels are the crop the conditioning describes.
    assert torch.equal(dataset.random_crop(1, torch.Generator().manual_seed(5)), dataset.random_crop(1, torch.Generator().manual_seed(5)))


def test_nan_latents_give_a_clear_error(tmp_path: Path) -> None:
    from dreamlora.train import LatentSource, prepare_vae

    folder = photos(tmp_path / "dog", [(32, 32)])
    components = load_components("tiny-sdxl")
    components.vae.encoder.conv_in.weight.data.fill_(float("nan"))  # what an fp16 overflow leaves behind
    dataset = ImageFolderDataset(list_images(folder, "instance"), "p", 32, "instance")
    with pytest.raises(ConfigError, match=r"NaN/inf latents for 1 of 1 images.*--vae"):
        LatentSource(dataset, components.vae, flip=False, cache=True)
    with pytest.raises(ConfigError, match="NaN/inf latents"):
        LatentSource(dataset, components.vae, flip=False, cache=False).sample([0], torch.Generator().manual_seed(0))
    half = load_components("tiny-sdxl", dtype=torch.float16)
    prepare_vae(half, torch.float16)  # SDXL's VAE (force_upcast) encodes in fp32 under fp16 training
    assert half.vae.dtype == torch.float32
    sd1 = load_components("tiny", dtype=torch.float16)
    prepare_vae(sd1, torch.float16)
    assert sd1.vae.dtype == torch.float16


# --- training ---------------------------------------------------------------------------------------


def _hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" not in name:
            digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def test_training_adapts_unet_and_both_text_encoders_with_per_image_time_ids(tmp_path: Path, class_dir: Path) -> None:
    from dreamlora.train import resolve_data, train

    instance = photos(tmp_path / "inst", [(49, 40), (40, 64), (32, 32)])
    components = load_components("tiny-sdxl")
    hashes = {name: _hash(getattr(components, name)) for name in ("unet", "text_encoder", "text_encoder_2")}
    seen: list[dict] = []
    components.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("added_cond_kwargs")), with_kwargs=True)
    overrides = {
        "model.name": "tiny-sdxl", "data.instance_dir": str(instance), "data.class_dir": str(class_dir), "data.class_name": "dog",
        "train.max_steps": "2", "train.out": str(tmp_path / "runs" / "x"), "train.num_samples": "1", "prior.steps": "1", "data.flip": "true",
    }  # fmt: skip
    cfg, _ = resolve_data(load_config(None, overrides), priors_root=tmp_path / "none")
    result = train(cfg, components=components)
    assert {name: _hash(getattr(components, name)) for name in hashes} == hashes
    state_dicts, metadata = read_diffusers_lora(result.lora_path)
    assert set(state_dicts) == {"unet", "text_encoder", "text_encoder_2"} == set(metadata)
    for group, sd in state_dicts.items():
        assert all(v.abs().sum() > 0 for k, v in sd.items() if "lora_B" in k), f"{group} LoRA did not train"
    # The first encoder is read at its penultimate layer: its last layer has no LoRA (it could never train).
    assert not any("layers.2." in k for k in state_dicts["text_encoder"]) and any("layers.2." in k for k in state_dicts["text_encoder_2"])
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["family"] == "sdxl" and info["base_model_version"] == "sdxl_base_v1-0" and info["unet_layout"]["layers_per_block"] == 2
    # The UNet saw each example's own size conditioning: instance rows from the photos' sizes, class rows 32x32.
    instance_ids = {(40.0, 49.0, 0.0, 3.0), (40.0, 49.0, 0.0, 4.0), (64.0, 40.0, 9.0, 0.0), (32.0, 32.0, 0.0, 0.0)}
    training_calls = [k for k in seen if k is not None and k["time_ids"].shape[0] == 2][:2]
    assert len(training_calls) == 2
    for call in training_calls:
        ids = call["time_ids"]
        assert tuple(ids[0, :4].tolist()) in instance_ids and ids[1].tolist() == [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]
        assert ids[:, 4:].eq(32).all() and call["text_embeds"].shape == (2, 32)


# --- exports ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    components = load_components("tiny-sdxl")
    base = probe(load_components("tiny-sdxl"))
    torch.manual_seed(1)
    attach_adapters(components.unet, components.text_encoder, AdapterConfig(rank=RANK, alpha=ALPHA, init="nonzero"), components.text_encoder_2)
    models = {"unet": components.unet, **components.text_encoders}
    run = root / "runs" / "sks-dog"
    save_diffusers_lora(run / "lora", adapter_state_dicts(models), {k: adapter_metadata(m) for k, m in models.items()})
    info = {
        "model": "tiny-sdxl", "family": "sdxl", "base_model_version": "sdxl_base_v1-0", "resolution": 32, "steps": 3, "token": "sks",
        "class_name": "dog", "instance_prompt": PROMPT, "rank": RANK, "alpha": ALPHA, "train_text_encoder": True, "seed": 0, "name": "sks-dog",
        "unet_layout": {k: components.unet.config[k] for k in ("layers_per_block", "down_block_types", "up_block_types")},
    }  # fmt: skip
    (run / "run.json").write_text(json.dumps(info), encoding="utf-8")
    return {"root": root, "run": run, "reference": probe(components), "base": base}


def test_a1111_export_uses_sgm_and_te1_te2_names_and_loads_through_diffusers_kohya_loader(sdxl_run) -> None:
    out = sdxl_run["root"] / "exports" / "a.safetensors"
    result = export_run(sdxl_run["run"], ExportConfig(format="a1111", dtype="fp32", out=str(out)))
    assert result.verify.status == "passed" and result.key_counts == {"unet": 136, "text_encoder": 12, "text_encoder_2": 12}
    tensors = load_file(str(out))
    names = {k.split(".")[0] for k in tensors}
    for name in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_out_0",
        "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k",
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_v",
        "lora_unet_output_blocks_5_1_transformer_blocks_0_attn2_to_q",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_2_self_attn_out_proj",
    ):
        assert name in names, name
    assert not any(n.startswith(("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks", "lora_te_")) for n in names)
    assert all(float(tensors[f"{n}.alpha"]) == ALPHA for n in names)
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False" and meta["ss_network_alpha"] == "8"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora" and meta["ss_resolution"] == "(32, 32)"
    # Independently of export's own check: diffusers' kohya loader (SGM -> diffusers) on a tiny SDXL pipeline.
    loaded = load_components("tiny-sdxl")
    build_pipeline(loaded).load_lora_weights(str(out))
    assert_reproduces(probe(loaded), sdxl_run["reference"], sdxl_run["base"], 1e-5)


def test_diffusers_export_loads_with_sdxl_pipeline(sdxl_run) -> None:
    from diffusers import StableDiffusionXLPipeline

    result = export_run(sdxl_run["run"], ExportConfig(format="diffusers", dtype="fp16"), exports_root=sdxl_run["root"] / "exp")
    assert result.verify.status == "passed"
    with safe_open(str(result.path / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        prefixes = {k.split(".")[0] for k in handle.keys()}
        adapter_meta = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"} and adapter_meta["text_encoder_2.lora_alpha"] == ALPHA
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir("tiny-sdxl"), local_files_only=True)
    pipe.load_lora_weights(str(result.path))
    assert_reproduces(probe(pipe), sdxl_run["reference"], sdxl_run["base"], 2e-2)


def test_inspect_recognises_sdxl_files(sdxl_run) -> None:
    from dreamlora.inspection import inspect_path

    out = sdxl_run["root"] / "exports" / "inspect.safetensors"
    export_run(sdxl_run["run"], ExportConfig(format="a1111", out=str(out), verify=False))
    report = inspect_path(out)
    assert report["family"] == "sdxl" and report["format"] == "a1111" and report["problems"] == []
    assert report["groups"]["text_encoder_2"]["modules"] == 12 and report["text_encoder_2_modules"] == 12


# --- the three user commands ------------------------------------------------------------------------


def test_prior_train_export_commands_on_tiny_sdxl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dreamlora.cli import app

    runner = CliRunner()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DREAMLORA_MODEL", "tiny-sdxl")
    instance = photos(tmp_path / "photos", [(40, 48), (48, 40), (32, 32)])
    result = runner.invoke(app, ["prior", "--class", "dog", "-n", "2", "--steps", "2"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "priors" / "dog" / "manifest.json").read_text())
    assert manifest["model"] == "tiny-sdxl" and manifest["guidance"] == 5.0 and manifest["resolution"] == 32 and manifest["num_images"] == 2
    result = runner.invoke(app, ["train", "--instance", str(instance), "--class", "dog", "--max-steps", "2", "--set", "train.num_samples=1", "--set", "prior.steps=1", "--set", "prior.num_images=2"])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "runs" / "sks-dog" / "run.json").read_text())
    assert info["family"] == "sdxl" and info["with_prior"] and info["steps"] == 2
    for fmt in ("a1111", "diffusers"):
        result = runner.invoke(app, ["export", "--format", fmt])
        assert result.exit_code == 0, result.output
        assert "passed" in result.output
    assert (tmp_path / "exports" / "sks-dog-a1111.safetensors").is_file() and (tmp_path / "exports" / "sks-dog-diffusers").is_dir()


# --- SDXL through main's pipeline: buckets and disk cache, the graphed step, bf16, TE cut-off ---------


def test_bucketed_examples_carry_their_own_size_and_crop(tmp_path: Path, class_dir: Path) -> None:
    """Buckets (centre crops cached on disk, and random crops with colour jitter): the target is the bucket, the crop is the one taken."""
    from dreamlora.data import cover_size
    from dreamlora.train import DreamBoothBatches

    instance = photos(tmp_path / "inst", [(60, 110), (110, 60), (64, 64)])
    components = load_components("tiny-sdxl")
    sizes = [(60, 110), (110, 60), (64, 64)]
    for extra in ({"data.latent_cache_dir": str(tmp_path / "latents")}, {"data.center_crop": "false", "data.color_jitter": "0.05"}):
        overrides = {
            "model.name": "tiny-sdxl", "data.instance_dir": str(instance), "data.class_dir": str(class_dir), "data.class_prompt": "a photo of dog",
            "data.resolution": "64", "data.buckets": "true", "data.flip": "true", **extra,
        }  # fmt: skip
        batches = DreamBoothBatches(load_config(None, overrides), components, torch.device("cpu"))
        for micro_step in range(6):
            batch = batches.draw_batch(micro_step)
            latents, rows, _ = batches.draw(micro_step)
            assert torch.equal(latents, batch.latents) and torch.equal(rows, batch.rows)  # draw() is draw_batch() without the sizes
            height, width = (batch.latents.shape[-2] * 2, batch.latents.shape[-1] * 2)  # tiny-sdxl's VAE factor is 2
            assert batch.size_ids.shape == (batch.latents.shape[0], 6) and batch.size_ids[:, 4:].eq(torch.tensor([height, width])).all()
            original_h, original_w, top, left = batch.size_ids[0, :4].tolist()
            assert (int(original_w), int(original_h)) in sizes
            cover_w, cover_h = cover_size((int(original_w), int(original_h)), (width, height))
            assert 0 <= top <= cover_h - height and 0 <= left <= cover_w - width
            if "data.latent_cache_dir" in extra:  # centre crops: the centre, or its mirror image
                assert top == (cover_h - height) // 2 and left in ((cover_w - width) // 2, cover_w - width - (cover_w - width) // 2)
            # The class row (a 32x32 class image covering the bucket) is conditioned on its own size.
            assert batch.size_ids[-1, :2].tolist() == [32.0, 32.0]


def test_graph_body_conditions_sdxl_on_size_ids_and_equals_the_eager_step() -> None:
    """What the CUDA graph captures takes the size ids as a static input; on CPU its body equals the eager step."""
    from dreamlora.models import encode_prompts, tokenize_all
    from dreamlora.step import CudaGraphStep, batch_loss

    def adapted():
        torch.manual_seed(0)
        components = load_components("tiny-sdxl")
        attach_adapters(components.unet, components.text_encoder, AdapterConfig(rank=4, init="nonzero"), components.text_encoder_2, SDXL.penultimate_encoders)
        return components, [p for m in (components.unet, *components.text_encoders.values()) for p in m.parameters() if p.requires_grad]

    generator = torch.Generator().manual_seed(1)
    inputs = [
        (torch.tensor([0, 1]), torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([100, 700]), torch.randn(2, 4, 16, 16, generator=generator), torch.ones(2), ids)
        for ids in (torch.tensor([[40.0, 49, 0, 3, 32, 32], [32, 32, 0, 0, 32, 32]]), torch.tensor([[64.0, 40, 9, 0, 32, 32], [32, 32, 0, 0, 32, 32]]))
    ]
    results, losses = [], []
    for mode in ("graph body", "eager"):
        components, params = adapted()
        ids = tokenize_all(components, ["a photo of sks dog", "a photo of dog"])
        seen: list[torch.Tensor] = []
        components.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"]), with_kwargs=True)

        def loss_fn(rows, noisy, t, target, w, size_ids, components=components, ids=ids):
            return batch_loss(components.unet, lambda: encode_prompts(components, ids), rows, noisy, t, target, 1, 1.0, torch.float32, w, size_ids, SDXL.added_conditioning)

        optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
        if mode == "graph body":
            step = CudaGraphStep(loss_fn, params, optimizer, max_grad_norm=1.0)
            step.arm(torch.device("cpu"))
            losses.append([step._body(x)[0].item() for x in inputs])
        else:
            losses.append([])
            for x in inputs:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(*x)[0]
                losses[-1].append(loss.item())
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
        assert [s.tolist() for s in seen] == [x[5].tolist() for x in inputs]  # each step's own size ids reached the UNet
        results.append([p.detach().clone() for p in params])
    assert losses[0] == losses[1] and all(torch.equal(a, b) for a, b in zip(*results))


def test_bf16_training_with_text_encoder_cutoff_and_final_samples(tmp_path: Path, class_dir: Path) -> None:
    """tiny-sdxl in bf16 (master weights): both text-encoder LoRAs stop at the cut-off; the final grid decodes with the bf16 VAE."""
    from dreamlora.train import resolve_data, train

    instance = photos(tmp_path / "inst", [(49, 40), (40, 64), (32, 32)])
    overrides = {
        "model.name": "tiny-sdxl", "model.precision": "bf16", "data.instance_dir": str(instance), "data.class_dir": str(class_dir), "data.class_name": "dog",
        "train.max_steps": "3", "train.out": str(tmp_path / "run"), "train.num_samples": "1", "prior.steps": "2", "train.lr": "1e-2",
        "train.text_encoder_steps_fraction": "0.3", "train.checkpoint_every": "1", "train.keep_checkpoints": "3", "train.log_every": "1",
    }  # fmt: skip
    cfg, _ = resolve_data(load_config(None, overrides), priors_root=tmp_path / "none")
    assert cfg.train.text_encoder_stop_step == 1
    result = train(cfg)
    assert result.precision == "bf16" and (result.run_dir / "samples" / "final.png").is_file()
    loras = {step: read_diffusers_lora(result.run_dir / "checkpoints" / f"step-{step:06d}" / "lora")[0] for step in (1, 2)}
    loras[3] = read_diffusers_lora(result.lora_path)[0]
    for group in ("text_encoder", "text_encoder_2"):
        assert all(torch.equal(loras[1][group][k], loras[3][group][k]) for k in loras[1][group]), f"{group} LoRA trained after its cut-off"
    assert any(not torch.equal(loras[2]["unet"][k], loras[3]["unet"][k]) for k in loras[2]["unet"])
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr_text_encoder"] > 0 for m in metrics] == [True, False, False]


def test_samples_decode_when_the_prepared_unet_returns_fp32() -> None:
    """Under mixed precision accelerate makes the UNet return fp32; the bf16 VAE must still decode (seen on the GPU with random:sdxl)."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    from dreamlora.generate import comparison_grid

    components = load_components("tiny-sdxl", dtype=torch.bfloat16)
    def bf16_input(module, args):  # autocast runs a prepared model's layers in bf16 whatever the input dtype
        return (args[0].to(torch.bfloat16), *args[1:])

    def fp32_output(module, args, output):  # accelerate's convert_outputs_to_fp32
        return (output[0].float(),) if isinstance(output, tuple) else UNet2DConditionOutput(sample=output.sample.float())

    components.unet.register_forward_pre_hook(bf16_input)
    components.unet.register_forward_hook(fp32_output)
    grid = comparison_grid(components, ["a photo of dog"], 1, 0, 2, 5.0, 32)
    assert grid.size[1] == 2 * 128  # base and LoRA rows, enlarged to 128 px
    sd1 = load_components("tiny", dtype=torch.bfloat16)
    sd1.unet.register_forward_pre_hook(bf16_input)
    sd1.unet.register_forward_hook(fp32_output)
    comparison_grid(sd1, ["a photo of dog"], 1, 0, 2, 7.5, 32)


# --- converting an SDXL LoRA trained elsewhere --------------------------------------------------

# (kohya name, group, module, rank, alpha): SGM names, one diffusers-style UNet name, both text encoders, per-module alphas.
SDXL_KOHYA_MODULES = [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 4, 8.0),
    ("lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k", "unet", "mid_block.attentions.0.transformer_blocks.1.attn2.to_k", 4, 2.0),
    ("lora_unet_output_blocks_5_1_proj_out", "unet", "up_blocks.1.attentions.2.proj_out", 2, 2.0),
    ("lora_unet_down_blocks_2_attentions_1_transformer_blocks_1_attn2_to_v", "unet", "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_v", 4, 1.0),
    ("lora_te1_text_model_encoder_layers_1_self_attn_v_proj", "text_encoder", "encoder.layers.1.self_attn.v_proj", 4, 8.0),
    ("lora_te1_text_model_encoder_layers_1_self_attn_out_proj", "text_encoder", "encoder.layers.1.self_attn.out_proj", 4, 8.0),
    ("lora_te2_text_model_encoder_layers_2_self_attn_out_proj", "text_encoder_2", "encoder.layers.2.self_attn.out_proj", 4, 2.0),
]


def hand_written_sdxl_kohya(path: Path) -> dict[str, torch.Tensor]:
    """An SDXL kohya file written by hand, and tiny-sdxl's outputs with each delta added to its weight by hand."""
    from safetensors.torch import save_file

    components = load_components("tiny-sdxl")
    generator = torch.Generator().manual_seed(4)
    tensors = {}
    for name, group, module_name, rank, alpha in SDXL_KOHYA_MODULES:
        model = getattr(components, group)
        layer = model.get_submodule(module_name) if module_name in dict(model.named_modules()) else model.get_submodule("text_model." + module_name)
        weight = layer.weight.data
        down = torch.randn(rank, weight.shape[1], generator=generator) * 0.3
        up = torch.randn(weight.shape[0], rank, generator=generator) * 0.3
        weight += (up @ down) * alpha / rank
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)})
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    return probe(components)


def test_convert_sdxl_kohya_file(tmp_path: Path) -> None:
    from dreamlora.errors import ExportError
    from dreamlora.export import convert_lora

    src = tmp_path / "sdxl-civitai.safetensors"
    reference = hand_written_sdxl_kohya(src)
    base = probe(load_components("tiny-sdxl"))
    a1111 = convert_lora(src, tmp_path / "fixed.safetensors", "a1111", base_model="tiny-sdxl", dtype="fp32")
    assert a1111.verify.status == "passed" and a1111.key_counts == {"unet": 4, "text_encoder": 2, "text_encoder_2": 1}
    assert any("folded" in note for note in a1111.notes) and not any("lora_te_text_model_" in note for note in a1111.notes)
    fixed = load_file(str(a1111.path))
    names = {k.split(".")[0] for k in fixed}
    assert "lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_v" in names  # the diffusers-style name, written as SGM
    assert "lora_te2_text_model_encoder_layers_2_self_attn_out_proj" in names and not any(n.startswith("lora_te_") for n in names)
    assert len({float(v) for k, v in fixed.items() if k.endswith(".alpha")}) == 1
    loaded = load_components("tiny-sdxl")
    build_pipeline(loaded).load_lora_weights(str(a1111.path))  # diffusers' own kohya (SGM) loader
    assert_reproduces(probe(loaded), reference, base, 1e-4)
    folder = convert_lora(src, tmp_path / "fixed-diffusers", "diffusers", base_model="tiny-sdxl", dtype="fp32")
    assert folder.verify.status == "passed"
    loaded = load_components("tiny-sdxl")
    build_pipeline(loaded).load_lora_weights(str(folder.path))
    assert_reproduces(probe(loaded), reference, base, 1e-4)
    with pytest.raises(ExportError, match="SDXL"):
        convert_lora(src, tmp_path / "on-sd1.safetensors", "a1111", base_model="tiny")
    assert not (tmp_path / "on-sd1.safetensors").exists()


def test_single_file_sdxl_merge_loads_with_from_single_file(tmp_path: Path) -> None:
    """--single-file for SDXL writes Stability's SGM layout (OpenCLIP second encoder); diffusers' from_single_file
    reads back every tensor of the merged model. The second encoder is wider than the first, as in SDXL."""
    from diffusers import StableDiffusionXLPipeline

    from dreamlora.models import build_tiny_sdxl

    base_dir = build_tiny_sdxl(tmp_path / "tiny-sdxl-wide", text_encoder_2_width=48)
    components = load_components(str(base_dir))
    torch.manual_seed(2)
    attach_adapters(components.unet, components.text_encoder, AdapterConfig(rank=RANK, alpha=ALPHA, init="nonzero"), components.text_encoder_2)
    models = {"unet": components.unet, **components.text_encoders}
    run = tmp_path / "runs" / "wide"
    save_diffusers_lora(run / "lora", adapter_state_dicts(models), {k: adapter_metadata(m) for k, m in models.items()})
    info = {"model": str(base_dir), "family": "sdxl", "resolution": 32, "rank": RANK, "alpha": ALPHA, "name": "wide",
            "unet_layout": {k: components.unet.config[k] for k in ("layers_per_block", "down_block_types", "up_block_types")}}
    (run / "run.json").write_text(json.dumps(info), encoding="utf-8")
    single = export_run(run, ExportConfig(format="merged", dtype="fp32", single_file=True), exports_root=tmp_path / "exports")
    assert single.verify.status == "passed" and single.verify.loader == "StableDiffusionXLPipeline.from_single_file"
    keys = set(load_file(str(single.path)))
    for key in ("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", "model.diffusion_model.label_emb.0.0.weight",
                "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight", "conditioner.embedders.1.model.text_projection",
                "conditioner.embedders.1.model.positional_embedding", "first_stage_model.decoder.mid.attn_1.q.weight"):
        assert key in keys, key
    folder = export_run(run, ExportConfig(format="merged", dtype="fp32"), exports_root=tmp_path / "exports").path
    expected = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)
    loaded = StableDiffusionXLPipeline.from_single_file(str(single.path), config=str(base_dir), local_files_only=True)
    for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
        want, got = getattr(expected, part).state_dict(), getattr(loaded, part).state_dict()
        assert set(want) - {"text_model.embeddings.position_ids"} <= set(got), part
        for key, value in want.items():
            assert torch.allclose(got[key].float(), value.float(), atol=1e-6), f"{part}.{key}"
    merged_te2 = expected.text_encoder_2.state_dict()["text_model.encoder.layers.0.self_attn.q_proj.weight"]
    base_te2 = load_components(str(base_dir)).text_encoder_2.state_dict()["text_model.encoder.layers.0.self_attn.q_proj.weight"]
    assert (merged_te2 - base_te2).abs().max() > 1e-3  # the LoRA really is fused into the second encoder
