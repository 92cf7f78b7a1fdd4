"""`--targets all` (kohya's LoRA: the transformers' projections and feed-forward, the text encoder's MLPs) and
`--conv-rank`/`--conv-alpha` (kohya's conv_dim/conv_alpha, LoCon): which layers train, at which rank and alpha, that
they all receive gradients, and that every export carries them with their own alphas."""

import json
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from typer.testing import CliRunner

from dreamlora.cli import app
from dreamlora.config import TARGET_PRESETS, AdapterConfig
from dreamlora.errors import ConfigError, TrainingError
from dreamlora.inspection import inspect_path
from dreamlora.lora import attach_adapters, read_diffusers_lora, read_safetensors
from dreamlora.models import encode_prompt, load_components, tokenize
from dreamlora.train import _enable_checkpointing, check_gradients

runner = CliRunner()
RANK, ALPHA, CONV_RANK, CONV_ALPHA = 4, 8.0, 2, 1.0  # alpha/rank 2 and 0.5: a mixed-up alpha cannot pass unnoticed


def _flat(output: str) -> str:
    return " ".join(output.split())


def _kind(name: str) -> str:
    last = name.rsplit(".", 1)[-1]
    if last in ("conv1", "conv2") or name.endswith(("downsamplers.0.conv", "upsamplers.0.conv")):
        return "conv3x3"
    if last in ("conv_shortcut", "time_emb_proj"):
        return "resnet-1x1"
    if last in ("proj_in", "proj_out") or ".ff." in name:
        return "transformer-extra"
    return "attention"


def _adapted(model: torch.nn.Module) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_config_checks_conv_settings() -> None:
    assert AdapterConfig().all_unet_targets == TARGET_PRESETS["attention"][0]
    assert "conv1" in AdapterConfig(conv_rank=2).all_unet_targets and AdapterConfig(conv_rank=2).resolved_conv_alpha == 2.0
    with pytest.raises(ConfigError, match="conv_alpha needs adapter.conv_rank"):
        AdapterConfig(conv_alpha=1.0)
    with pytest.raises(ConfigError, match="conv_rank must be in 0..1024"):
        AdapterConfig(conv_rank=-1)


def test_all_targets_and_conv_layers_get_their_rank_alpha_and_gradients() -> None:
    components = load_components("tiny")
    unet_targets, te_targets = TARGET_PRESETS["all"]
    cfg = AdapterConfig(rank=RANK, alpha=ALPHA, conv_rank=CONV_RANK, conv_alpha=CONV_ALPHA, unet_targets=unet_targets, text_encoder_targets=te_targets, init="nonzero")
    attach_adapters(components.unet, components.text_encoder, cfg)
    unet, te = _adapted(components.unet), _adapted(components.text_encoder)
    kinds = {kind: [n for n in unet if _kind(n) == kind] for kind in ("conv3x3", "resnet-1x1", "transformer-extra", "attention")}
    assert all(kinds.values()), kinds  # every kind of layer is adapted on the tiny UNet
    assert any(n.endswith("downsamplers.0.conv") for n in kinds["conv3x3"]) and any(n.endswith("upsamplers.0.conv") for n in kinds["conv3x3"])
    for name, layer in unet.items():
        conv = _kind(name) == "conv3x3"
        assert layer.r["default"] == (CONV_RANK if conv else RANK), name
        assert layer.scaling["default"] == pytest.approx(CONV_ALPHA / CONV_RANK if conv else ALPHA / RANK), name
        if conv:
            assert tuple(layer.lora_A["default"].weight.shape[2:]) == (3, 3)  # the adapter sees the 3x3 neighbourhood
    assert {n.rsplit(".", 1)[-1] for n in te} == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}

    # Every adapted layer, convolutions included, learns: finite, non-zero gradients through checkpointing.
    _enable_checkpointing(components, train_text_encoder=True)
    components.unet.train()
    components.text_encoder.train()
    context = encode_prompt(components.text_encoder, tokenize(components.tokenizer, ["a photo of sks dog"]))
    components.unet(torch.randn(1, 4, 16, 16), torch.tensor([400]), context).sample.square().mean().backward()
    groups = {kind: [p for n in names for p in unet[n].parameters() if p.requires_grad] for kind, names in kinds.items()}
    groups["text_encoder"] = [p for layer in te.values() for p in layer.parameters() if p.requires_grad]
    norms = check_gradients(groups)
    assert all(norm > 0 for norm in norms.values()), norms
    for p in groups["conv3x3"]:
        p.grad = None
    with pytest.raises(TrainingError, match="conv3x3 LoRA received no gradients"):
        check_gradients(groups)


def test_train_export_inspect_and_resume_with_conv_layers(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = ["train", "--model", "tiny", "--instance", str(instance_dir), "--class", "dog", "--num-class-images", "2", "--max-steps", "2",
            "--rank", str(RANK), "--alpha", str(ALPHA), "--set", "adapter.init=nonzero", "--set", "train.num_samples=0"]  # fmt: skip
    bad = runner.invoke(app, [*base, "--targets", "everything", "--out", "runs/bad"])
    assert bad.exit_code == 2 and "--targets must be one of attention, all; got 'everything'" in _flat(bad.output) and "Traceback" not in bad.output
    lonely = runner.invoke(app, [*base, "--conv-alpha", "1", "--out", "runs/bad"])
    assert lonely.exit_code == 2 and "conv_alpha needs adapter.conv_rank" in _flat(lonely.output)
    assert not (tmp_path / "runs" / "bad").exists()

    conv = ["--targets", "all", "--conv-rank", str(CONV_RANK), "--conv-alpha", str(CONV_ALPHA)]
    trained = runner.invoke(app, [*base, *conv, "--checkpoint-every", "1", "--out", "runs/locon"])
    assert trained.exit_code == 0, trained.output
    run = tmp_path / "runs" / "locon"
    info = json.loads((run / "run.json").read_text())
    assert info["conv_rank"] == CONV_RANK and info["conv_alpha"] == CONV_ALPHA
    state_dicts, metadata = read_diffusers_lora(run / "lora")
    assert metadata["unet"]["rank_pattern"]["conv1"] == CONV_RANK and metadata["unet"]["alpha_pattern"]["conv1"] == CONV_ALPHA
    assert state_dicts["unet"]["down_blocks.0.resnets.0.conv1.lora_A.weight"].shape == (CONV_RANK, 32, 3, 3)
    assert "mid_block.attentions.0.transformer_blocks.0.ff.net.2.lora_B.weight" in state_dicts["unet"]
    assert any(".mlp.fc1.lora_A" in k for k in state_dicts["text_encoder"])

    # A1111: kohya's names for the new layers, each module with its own alpha, conv_dim/conv_alpha in ss_network_args;
    # export loads the file back through diffusers and compares it with the run (it fails on a wrong alpha).
    exported = runner.invoke(app, ["export", str(run), "--format", "a1111", "--out", "locon.safetensors"])
    assert exported.exit_code == 0, exported.output
    tensors, meta = read_safetensors(tmp_path / "locon.safetensors")
    conv_name = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{conv_name}.lora_down.weight"].shape == (CONV_RANK, 32, 3, 3) and tensors[f"{conv_name}.lora_up.weight"].shape == (32, CONV_RANK, 1, 1)
    assert float(tensors[f"{conv_name}.alpha"]) == CONV_ALPHA
    for name in ("lora_unet_down_blocks_0_downsamplers_0_conv", "lora_unet_up_blocks_0_upsamplers_0_conv"):
        assert float(tensors[f"{name}.alpha"]) == CONV_ALPHA
    for name in ("lora_unet_down_blocks_1_attentions_0_proj_in", "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj",
                 "lora_unet_down_blocks_1_resnets_0_conv_shortcut", "lora_unet_down_blocks_1_resnets_0_time_emb_proj",
                 "lora_te_text_model_encoder_layers_0_mlp_fc1"):  # fmt: skip
        assert float(tensors[f"{name}.alpha"]) == ALPHA and tensors[f"{name}.lora_down.weight"].shape[0] == RANK, name
    assert meta["ss_network_dim"] == str(RANK) and meta["ss_network_alpha"] == f"{ALPHA:g}"
    assert json.loads(meta["ss_network_args"]) == {"train_text_encoder": True, "conv_dim": str(CONV_RANK), "conv_alpha": f"{CONV_ALPHA:g}"}
    # Differing alphas on convolutions are read right by diffusers too (the export just verified it): not a problem.
    assert not any("alphas differ" in p for p in inspect_path(tmp_path / "locon.safetensors")["problems"])

    for fmt in ("diffusers", "merged"):
        other = runner.invoke(app, ["export", str(run), "--format", fmt, "--dtype", "fp32"])
        assert other.exit_code == 0 and "verification │ passed (" in _flat(other.output), other.output

    changed = runner.invoke(app, ["train", "--resume", "--out", str(run), "--max-steps", "3", "--conv-rank", "4"])
    assert changed.exit_code == 2 and "adapter.conv_rank" in _flat(changed.output)


def test_inspect_flags_only_alphas_diffusers_misreads(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    def module(name: str, rank: int, alpha: float, conv: bool = False) -> dict[str, torch.Tensor]:
        shape = (rank, 8, 3, 3) if conv else (rank, 8)
        up = (8, rank, 1, 1) if conv else (8, rank)
        return {f"{name}.lora_down.weight": torch.ones(shape), f"{name}.lora_up.weight": torch.ones(up), f"{name}.alpha": torch.tensor(alpha)}

    attention = [f"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_{p}" for p in ("q", "k", "v", "out_0")]
    convs = {**{k: v for n in attention for k, v in module(n, 4, 8.0).items()}, **module("lora_unet_down_blocks_0_resnets_0_conv1", 2, 1.0, conv=True)}
    save_file(convs, str(tmp_path / "convs.safetensors"))
    assert not any("alphas differ" in p for p in inspect_path(tmp_path / "convs.safetensors")["problems"])
    odd = {**convs, **module(attention[0], 4, 3.0)}  # one attention module off its group's most common alpha
    save_file(odd, str(tmp_path / "odd.safetensors"))
    problems = [p for p in inspect_path(tmp_path / "odd.safetensors")["problems"] if "alphas differ" in p]
    assert problems and f"1 text-encoder or UNet-attention modules (first: {attention[0]})" in problems[0]


def test_sdxl_conv_layers_export_with_sgm_names(tmp_path: Path) -> None:
    from dreamlora.config import ExportConfig
    from dreamlora.export import export_run
    from dreamlora.lora import adapter_metadata, adapter_state_dicts, save_diffusers_lora

    components = load_components("tiny-sdxl")
    cfg = AdapterConfig(rank=RANK, alpha=ALPHA, conv_rank=CONV_RANK, conv_alpha=CONV_ALPHA, init="nonzero")
    attach_adapters(components.unet, components.text_encoder, cfg, components.text_encoder_2, components.family.penultimate_encoders)
    models = {"unet": components.unet, "text_encoder": components.text_encoder, "text_encoder_2": components.text_encoder_2}
    run = tmp_path / "runs" / "xl"
    save_diffusers_lora(run / "lora", adapter_state_dicts(models), {k: adapter_metadata(m) for k, m in models.items()})
    layout = {key: components.unet.config[key] for key in ("layers_per_block", "down_block_types", "up_block_types")}
    info = {"model": "tiny-sdxl", "family": "sdxl", "base_model_version": "sdxl_base_v1-0", "resolution": 64, "steps": 1, "token": "sks", "class_name": "dog", "unet_layout": layout}
    (run / "run.json").write_text(json.dumps(info))
    result = export_run(run, ExportConfig(format="a1111", dtype="fp32"), exports_root=tmp_path / "exports")
    assert result.verify.status == "passed"  # loaded back through diffusers and compared, every module consumed
    tensors, _ = read_safetensors(result.path)
    # Stability's SGM names, as kohya writes SDXL LoCon files: the downsamplers are `op`, the upsamplers `N.2.conv`.
    for name in ("lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_2_2_conv", "lora_unet_input_blocks_1_0_in_layers_2"):
        assert float(tensors[f"{name}.alpha"]) == CONV_ALPHA and tensors[f"{name}.lora_down.weight"].shape[0] == CONV_RANK, name
    assert float(tensors["lora_unet_input_blocks_4_0_skip_connection.alpha"]) == ALPHA  # a 1x1 shortcut: the main rank and alpha


def test_a1111_export_folds_alphas_diffusers_would_misread(tmp_path: Path) -> None:
    """Attention modules off their group's most common alpha (here: to_k at 3 among modules at 8): diffusers would give
    them the common one. The export folds the alphas into the weights and says so; the file then verifies through diffusers."""
    from dreamlora.config import ExportConfig
    from dreamlora.export import alphas_diffusers_misreads, export_run, modules_from_peft
    from dreamlora.lora import adapter_metadata, adapter_state_dicts, save_diffusers_lora

    components = load_components("tiny")
    cfg = AdapterConfig(rank=RANK, alpha=ALPHA, conv_rank=CONV_RANK, conv_alpha=CONV_ALPHA, init="nonzero")
    attach_adapters(components.unet, components.text_encoder, cfg)
    models = {"unet": components.unet, "text_encoder": components.text_encoder}
    metadata = {k: adapter_metadata(m) for k, m in models.items()}
    metadata["unet"]["alpha_pattern"] = {**metadata["unet"]["alpha_pattern"], "to_k": 3.0}
    run = tmp_path / "runs" / "odd"
    save_diffusers_lora(run / "lora", adapter_state_dicts(models), metadata)
    (run / "run.json").write_text(json.dumps({"model": "tiny", "family": "sd1", "resolution": 32, "steps": 1, "token": "sks", "class_name": "dog"}))
    modules = modules_from_peft(*read_diffusers_lora(run / "lora"))
    misread = alphas_diffusers_misreads((m.group, m.module, m.alpha) for m in modules)
    assert misread and all(name.endswith(".to_k") for name in misread)
    assert {m.alpha for m in modules if m.module.endswith(".to_k")} == {3.0}
    result = export_run(run, ExportConfig(format="a1111", dtype="fp32"), exports_root=tmp_path / "exports")
    assert result.verify.status == "passed" and any("alphas folded" in note for note in result.notes)
    tensors, _ = read_safetensors(result.path)
    assert len({float(v) for k, v in tensors.items() if k.endswith(".alpha")}) == 1
