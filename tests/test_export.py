"""Export and convert on the tiny model with a non-zero LoRA whose alpha (8) differs from its rank (4)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreamlora.config import AdapterConfig, ExportConfig
from dreamlora.errors import ExportError
from dreamlora.export import (
    convert_lora,
    export_run,
    kohya_module_name,
    ldm_unet_module_name,
    modules_from_peft,
    verify_export,
)
from dreamlora.lora import adapter_metadata, adapter_state_dicts, attach_adapters, read_diffusers_lora, save_diffusers_lora
from dreamlora.models import build_pipeline, encode_prompt, load_components, public_model_ref, tokenize

RANK, ALPHA = 4, 8.0
PROMPT = "a photo of sks dog"
FP16_RTOL = 2e-2  # of the LoRA's effect on the output: fp16 rounds the LoRA weights only


def probe(components) -> dict[str, torch.Tensor]:
    """Fixed-seed text-encoder output and UNet noise prediction."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        hidden = encode_prompt(components.text_encoder.float(), tokenize(components.tokenizer, [PROMPT]))
        noise = components.unet.float()(latents, torch.tensor([500]), encoder_hidden_states=context).sample
    return {"text_encoder": hidden, "unet": noise}


def write_run(root: Path, name: str = "sks-dog") -> tuple[Path, dict[str, torch.Tensor], list[str], list[str]]:
    components = load_components("tiny")
    torch.manual_seed(1)
    attach_adapters(components.unet, components.text_encoder, AdapterConfig(rank=RANK, alpha=ALPHA, init="nonzero"))
    models = {"unet": components.unet, "text_encoder": components.text_encoder}
    run = root / name
    save_diffusers_lora(run / "lora", adapter_state_dicts(models), {k: adapter_metadata(m) for k, m in models.items()})
    info = {
        "model": "tiny", "family": "sd1", "base_model_version": "sd_v1", "resolution": 32, "steps": 3, "token": "sks",
        "class_name": "dog", "instance_prompt": PROMPT, "class_prompt": "a photo of dog", "rank": RANK, "alpha": ALPHA,
        "train_text_encoder": True, "seed": 0, "dreamlora_version": "0.1.0", "name": name,
    }  # fmt: skip
    (run / "run.json").write_text(json.dumps(info), encoding="utf-8")
    from peft.tuners.lora import LoraLayer

    unet_modules = sorted(n for n, m in components.unet.named_modules() if isinstance(m, LoraLayer))
    te_modules = sorted(n for n, m in components.text_encoder.named_modules() if isinstance(m, LoraLayer))
    return run, probe(components), unet_modules, te_modules


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws")
    run, reference, unet_modules, te_modules = write_run(root / "runs")
    base = probe(load_components("tiny"))
    return {"root": root, "run": run, "reference": reference, "base": base, "unet_modules": unet_modules, "te_modules": te_modules}


def load_with_diffusers(path: Path):
    components = load_components("tiny")
    build_pipeline(components).load_lora_weights(str(path))
    return components


def assert_reproduces(got: dict[str, torch.Tensor], ws: dict, rtol: float) -> None:
    for group in ("unet", "text_encoder"):
        effect = (ws["reference"][group] - ws["base"][group]).abs().max()
        assert effect > 1e-2, "the LoRA must change the output, or the comparison proves nothing"
        diff = (got[group] - ws["reference"][group]).abs().max()
        assert diff <= rtol * effect + 1e-6, f"{group}: |diff| {diff} vs LoRA effect {effect}"


def test_a1111_keys_alpha_and_metadata(workspace):
    out = workspace["root"] / "exports" / "a.safetensors"
    result = export_run(workspace["run"], ExportConfig(format="a1111", out=str(out)))
    assert result.path == out and result.key_counts == {"unet": 32, "text_encoder": 12}
    assert result.verify.status == "passed" and result.verify.max_abs_diff["unet"] < result.verify.tolerance["unet"]
    tensors = load_file(str(out))
    assert sorted(tensors)[:4] == [
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj.alpha",
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_out_proj.alpha",
    ]
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in tensors
    expected_names = {kohya_module_name("unet", m) for m in workspace["unet_modules"]} | {kohya_module_name("text_encoder", m) for m in workspace["te_modules"]}
    assert {k.split(".")[0] for k in tensors} == expected_names
    assert not any(k.startswith("lora_te1_") for k in tensors)
    for name in expected_names:
        assert float(tensors[f"{name}.alpha"]) == ALPHA  # the real alpha, not the rank
        assert tensors[f"{name}.lora_down.weight"].dtype == torch.float16 and tensors[f"{name}.lora_down.weight"].shape[0] == RANK
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_steps"] == "3" and "sks" in meta["ss_training_comment"]
    forbidden = [str(workspace["root"]), str(Path.home()), socket.gethostname()]
    assert not any(bad and bad in value for value in meta.values() for bad in forbidden)
    blob = out.read_bytes()
    header = struct.unpack("<Q", blob[:8])[0]
    assert meta["sshs_model_hash"] == hashlib.sha256(blob[8 + header:]).hexdigest()


@pytest.mark.parametrize("dtype, rtol", [("fp16", FP16_RTOL), ("fp32", 1e-5)])
def test_a1111_file_through_diffusers_kohya_loader_reproduces(workspace, dtype, rtol):
    out = workspace["root"] / "exports" / f"kohya-{dtype}.safetensors"
    export_run(workspace["run"], ExportConfig(format="a1111", dtype=dtype, out=str(out), verify=False))
    assert_reproduces(probe(load_with_diffusers(out)), workspace, rtol)


@pytest.mark.parametrize("dtype, rtol", [("fp16", FP16_RTOL), ("fp32", 1e-5)])
def test_diffusers_folder_reproduces(workspace, dtype, rtol):
    result = export_run(workspace["run"], ExportConfig(format="diffusers", dtype=dtype), exports_root=workspace["root"] / f"exp-{dtype}")
    assert result.path == workspace["root"] / f"exp-{dtype}" / "sks-dog-diffusers" and result.verify.status == "passed"
    state_dicts, metadata = read_diffusers_lora(result.path)
    assert metadata["unet"]["lora_alpha"] == ALPHA and metadata["text_encoder"]["r"] == RANK
    assert_reproduces(probe(load_with_diffusers(result.path)), workspace, rtol)


def test_merged_folder_and_single_file_reproduce(workspace):
    from diffusers import StableDiffusionPipeline

    folder = export_run(workspace["run"], ExportConfig(format="merged", dtype="fp32"), exports_root=workspace["root"] / "merged").path
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    assert_reproduces(probe(pipe), workspace, 1e-4)
    single = export_run(workspace["run"], ExportConfig(format="merged", dtype="fp16", single_file=True), exports_root=workspace["root"] / "merged").path
    assert single.name == "sks-dog-merged.safetensors"
    keys = set(load_file(str(single)))
    assert "model.diffusion_model.input_blocks.3.1.proj_in.weight" in keys and "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys


def test_verify_rejects_a_file_that_does_not_reproduce(workspace):
    out = workspace["root"] / "exports" / "check.safetensors"
    export_run(workspace["run"], ExportConfig(format="a1111", out=str(out), verify=False))
    state_dicts, metadata = read_diffusers_lora(workspace["run"] / "lora")
    doubled = modules_from_peft(state_dicts, metadata)
    for m in doubled:
        m.alpha *= 2
    with pytest.raises(ExportError, match="does not reproduce"):
        verify_export(out, "a1111", doubled, "tiny", "fp16")


def test_run_without_weights_and_existing_output_are_refused(workspace, tmp_path):
    empty = tmp_path / "runs" / "empty"
    empty.mkdir(parents=True)
    (empty / "run.json").write_text(json.dumps({"model": "tiny", "name": "empty"}), encoding="utf-8")
    with pytest.raises(ExportError, match="no LoRA weights"):
        export_run(empty, ExportConfig(), exports_root=tmp_path / "exports")
    taken = tmp_path / "exports" / "sks-dog-a1111.safetensors"
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"keep me")
    with pytest.raises(ExportError, match="--out"):
        export_run(workspace["run"], ExportConfig(), exports_root=tmp_path / "exports")
    assert taken.read_bytes() == b"keep me"


def test_ldm_names_and_public_model_name():
    sd15 = dict(layers_per_block=2, down_attention=[True, True, True, False], up_attention=[False, True, True, True])
    assert ldm_unet_module_name("input_blocks_4_1_proj_in", **sd15) == "down_blocks_1_attentions_0_proj_in"
    assert ldm_unet_module_name("input_blocks_3_0_op", **sd15) == "down_blocks_0_downsamplers_0_conv"
    assert ldm_unet_module_name("input_blocks_2_0_in_layers_2", **sd15) == "down_blocks_0_resnets_1_conv1"
    assert ldm_unet_module_name("middle_block_1_transformer_blocks_0_attn2_to_k", **sd15) == "mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    assert ldm_unet_module_name("output_blocks_2_1_conv", **sd15) == "up_blocks_0_upsamplers_0_conv"
    assert ldm_unet_module_name("output_blocks_11_1_proj_out", **sd15) == "up_blocks_3_attentions_2_proj_out"
    assert ldm_unet_module_name("output_blocks_8_2_conv", **sd15) == "up_blocks_2_upsamplers_0_conv"
    assert public_model_ref(os.path.join(str(Path.home()), "models", "my-sd15")) == "my-sd15"
    assert public_model_ref("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"


# --- converting a LoRA trained elsewhere ---------------------------------------------------------

# (kohya name, diffusers module, rank, alpha): per-module alphas differ; one LDM-style name; one 3x3 conv (LoCon).
KOHYA_MODULES = [
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 4, 8.0),
    ("lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 4, 1.0),
    ("lora_unet_up_blocks_0_attentions_1_proj_out", "up_blocks.0.attentions.1.proj_out", 2, 2.0),
    ("lora_unet_down_blocks_1_resnets_0_conv1", "down_blocks.1.resnets.0.conv1", 4, 3.0),
    ("lora_te_text_model_encoder_layers_1_self_attn_v_proj", "encoder.layers.1.self_attn.v_proj", 4, 8.0),
    ("lora_te_text_model_encoder_layers_2_self_attn_out_proj", "encoder.layers.2.self_attn.out_proj", 4, 2.0),
]


def hand_written_kohya(path: Path) -> dict[str, torch.Tensor]:
    """A kohya file written by hand, and the tiny model's outputs with each module's delta applied to its weight by hand."""
    components = load_components("tiny")
    generator = torch.Generator().manual_seed(3)
    tensors = {}
    for name, module_name, rank, alpha in KOHYA_MODULES:
        group = components.unet if name.startswith("lora_unet_") else components.text_encoder
        layer = group.get_submodule(module_name)
        weight = layer.weight.data
        if weight.dim() == 4:
            down = torch.randn(rank, weight.shape[1], *weight.shape[2:], generator=generator) * 0.3
            up = torch.randn(weight.shape[0], rank, 1, 1, generator=generator) * 0.3
            delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        else:
            down = torch.randn(rank, weight.shape[1], generator=generator) * 0.3
            up = torch.randn(weight.shape[0], rank, generator=generator) * 0.3
            delta = up @ down
        weight += delta * alpha / rank
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)})
    save_file(tensors, str(path))
    return probe(components)


def test_convert_hand_written_kohya_file(tmp_path):
    src = tmp_path / "civitai.safetensors"
    reference = hand_written_kohya(src)
    ws = {"reference": reference, "base": probe(load_components("tiny"))}
    raw = probe(load_with_diffusers(src))  # diffusers alone: most common alpha for all, LDM name dropped
    assert (raw["unet"] - reference["unet"]).abs().max() > 1e-3
    a1111 = convert_lora(src, tmp_path / "fixed.safetensors", "a1111", base_model="tiny", dtype="fp32")
    assert a1111.key_counts == {"unet": 4, "text_encoder": 2} and a1111.verify.status == "passed"
    assert any("folded" in note for note in a1111.notes) and any("LDM" in note for note in a1111.notes)
    fixed = load_file(str(a1111.path))
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.alpha" in fixed
    assert len({float(v) for k, v in fixed.items() if k.endswith(".alpha")}) == 1
    assert_reproduces(probe(load_with_diffusers(a1111.path)), ws, 1e-4)
    folder = convert_lora(src, tmp_path / "fixed-diffusers", "diffusers", base_model="tiny", dtype="fp16")
    assert folder.verify.status == "passed"
    assert_reproduces(probe(load_with_diffusers(folder.path)), ws, FP16_RTOL)
    with pytest.raises(ExportError, match="--model"):  # without --model, names are checked against SD 1.5, which has no up_blocks.0 attentions
        convert_lora(src, tmp_path / "sd15-names.safetensors", "a1111")


def test_text_encoder_only_and_dora_kohya_files(tmp_path):
    """A text-encoder-only kohya LoRA (no out_proj: diffusers' own loader refuses it) converts to a diffusers file that
    loads and reproduces it; it crashed writing the missing UNet part. A DoRA file is refused by convert, not written
    without its magnitudes, and inspect names it."""
    from dreamlora.inspection import inspect_path

    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    torch.manual_seed(0)
    te_only = {f"{name}.lora_down.weight": torch.randn(4, 32), f"{name}.lora_up.weight": torch.randn(32, 4), f"{name}.alpha": torch.tensor(2.0)}
    save_file(te_only, str(tmp_path / "te.safetensors"))
    converted = convert_lora(tmp_path / "te.safetensors", tmp_path / "te-diffusers", "diffusers", base_model="tiny", dtype="fp32")
    assert converted.key_counts == {"text_encoder": 1} and converted.verify.status == "passed"
    base = load_components("tiny")
    loaded = load_with_diffusers(converted.path)
    ids = tokenize(base.tokenizer, [PROMPT])
    with torch.no_grad():
        q = base.text_encoder.encoder.layers[0].self_attn.q_proj
        hidden = base.text_encoder.embeddings(ids)
        hidden = base.text_encoder.encoder.layers[0].layer_norm1(hidden)
        want = q(hidden) + (2.0 / 4) * hidden @ te_only[f"{name}.lora_down.weight"].T @ te_only[f"{name}.lora_up.weight"].T
        got = loaded.text_encoder.encoder.layers[0].self_attn.q_proj(hidden)
    assert torch.allclose(got, want, atol=1e-4)  # alpha 2 / rank 4 kept
    save_file({**te_only, f"{name}.dora_scale": torch.rand(32, 1) + 0.5}, str(tmp_path / "dora.safetensors"))
    with pytest.raises(ExportError, match="DoRA magnitude"):
        convert_lora(tmp_path / "dora.safetensors", tmp_path / "dora-diffusers", "diffusers", base_model="tiny")
    assert not (tmp_path / "dora-diffusers").exists()
    problems = inspect_path(tmp_path / "dora.safetensors")["problems"]
    assert any("DoRA" in problem for problem in problems)
    assert any("one magnitude per output row" in problem for problem in problems)  # (32, 1): PEFT's orientation, which A1111 misreads
    save_file({**te_only, f"{name}.dora_scale": torch.rand(1, 32) + 0.5}, str(tmp_path / "lycoris.safetensors"))
    problems = inspect_path(tmp_path / "lycoris.safetensors")["problems"]
    assert any("DoRA" in problem for problem in problems) and not any("per output row" in problem for problem in problems)


def test_convert_command_verifies_on_dreamlora_model_when_no_model_is_given(workspace, tmp_path, monkeypatch):
    """$DREAMLORA_MODEL is the base for `convert` as for every other command (a tiny-model LoRA fails the SD 1.x name check)."""
    from typer.testing import CliRunner

    from dreamlora.cli import app

    exported = export_run(workspace["run"], ExportConfig(format="a1111", out=str(tmp_path / "ours.safetensors"), verify=False)).path
    monkeypatch.delenv("DREAMLORA_MODEL", raising=False)
    result = CliRunner().invoke(app, ["convert", str(exported), str(tmp_path / "plain.safetensors")])
    assert result.exit_code == 2 and "match no module of the base model" in result.output
    monkeypatch.setenv("DREAMLORA_MODEL", "tiny")
    result = CliRunner().invoke(app, ["convert", str(exported), str(tmp_path / "back"), "--to", "diffusers"])
    assert result.exit_code == 0, result.output
    assert "passed" in result.output
    assert_reproduces(probe(load_with_diffusers(tmp_path / "back")), workspace, FP16_RTOL)


def test_a_base_model_of_another_architecture_is_a_clear_error_and_leaves_no_file(workspace, tmp_path):
    """A run whose base model changed shape since training (a hub branch moved, a local folder replaced): export,
    merged export and generate stop with one message naming a module that no longer fits, exit 2, and write nothing."""
    import shutil

    from typer.testing import CliRunner

    from dreamlora.cli import app

    run = tmp_path / "runs" / "moved"
    shutil.copytree(workspace["run"], run)
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    (run / "run.json").write_text(json.dumps({**info, "model": "tiny-sdxl"}), encoding="utf-8")
    for fmt, out in (("a1111", tmp_path / "x.safetensors"), ("diffusers", tmp_path / "x-folder"), ("merged", tmp_path / "x-merged")):
        result = CliRunner().invoke(app, ["export", str(run), "--format", fmt, "--out", str(out)])
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        assert "does not fit base model" in text and "attn2.to_k" in text and "Traceback" not in text, text
        assert not out.exists()
    result = CliRunner().invoke(app, ["generate", "-p", PROMPT, "--model", "tiny-sdxl", "--lora", str(run / "lora"), "-n", "1", "--steps", "1", "--out", str(tmp_path / "gen")])
    assert result.exit_code == 2, result.output
    assert "another architecture" in " ".join(result.output.split()) and not (tmp_path / "gen").exists()
    from conftest import draw_subject

    instance = tmp_path / "photos"
    instance.mkdir()
    draw_subject(instance / "a.png")
    for flag in ("--init-lora", "--base-weights"):  # the run's LoRA to start from, or fused into the base first
        out = tmp_path / "runs" / flag.strip("-")
        result = CliRunner().invoke(app, ["train", "--model", "tiny-sdxl", "--instance", str(instance), "--max-steps", "1", flag, str(run), "--out", str(out), "--set", "train.num_samples=0"])
        assert result.exit_code == 2, (flag, result.output)
        assert "another architecture" in " ".join(result.output.split()) and "Traceback" not in result.output and not out.exists(), (flag, result.output)


def test_a_verification_that_crashes_leaves_no_unverified_file(workspace, tmp_path, monkeypatch):
    import dreamlora.export as export

    def crash(*args, **kwargs):
        raise RuntimeError("a bug in the loader")

    monkeypatch.setattr(export, "verify_export", crash)
    out = tmp_path / "crash.safetensors"
    with pytest.raises(RuntimeError, match="a bug in the loader"):
        export_run(workspace["run"], ExportConfig(format="a1111", out=str(out)))
    assert not out.exists()
