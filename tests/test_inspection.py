"""inspect on a run folder, its exports, and files with the problems consumers trip over."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreamlora.config import AdapterConfig, ExportConfig
from dreamlora.errors import ExportError
from dreamlora.export import export_run
from dreamlora.inspection import inspect_path
from dreamlora.lora import adapter_metadata, adapter_state_dicts, attach_adapters, save_diffusers_lora
from dreamlora.models import load_components

RANK, ALPHA = 4, 8.0


def write_run(root: Path, name: str = "sks-dog") -> tuple[Path, int, int]:
    """A run folder with a non-zero LoRA (alpha != rank); returns it and the UNet / text-encoder module counts."""
    components = load_components("tiny")
    attach_adapters(components.unet, components.text_encoder, AdapterConfig(rank=RANK, alpha=ALPHA, init="nonzero"))
    models = {"unet": components.unet, "text_encoder": components.text_encoder}
    state_dicts = adapter_state_dicts(models)
    save_diffusers_lora(root / name / "lora", state_dicts, {k: adapter_metadata(m) for k, m in models.items()})
    info = {"model": "tiny", "family": "sd1", "base_model_version": "sd_v1", "resolution": 32, "steps": 3, "token": "sks", "class_name": "dog", "rank": RANK, "alpha": ALPHA, "name": name}
    (root / name / "run.json").write_text(json.dumps(info), encoding="utf-8")
    return root / name, len(state_dicts["unet"]) // 2, len(state_dicts["text_encoder"]) // 2


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    run, unet_modules, te_modules = write_run(root / "runs")
    a1111 = export_run(run, ExportConfig(format="a1111", verify=False), exports_root=root / "exports").path
    return {"root": root, "run": run, "a1111": a1111, "counts": (unet_modules, te_modules)}


def test_run_folder(exported):
    report = inspect_path(exported["run"])
    assert report["kind"] == "run" and report["format"] == "diffusers" and report["family"] == "sd1"
    assert (report["unet_modules"], report["text_encoder_modules"]) == exported["counts"]
    assert report["groups"]["unet"]["ranks"] == [RANK] and report["groups"]["text_encoder"]["alphas"] == [ALPHA]
    assert report["dtype"] == "fp32" and report["run"]["token"] == "sks" and report["problems"] == []
    assert report["adapter_metadata"]["unet"]["lora_alpha"] == ALPHA


def test_a1111_export(exported):
    report = inspect_path(exported["a1111"])
    assert report["format"] == "a1111" and report["family"] == "sd1" and report["dtype"] == "fp16"
    assert (report["unet_modules"], report["text_encoder_modules"]) == exported["counts"]
    assert report["groups"]["unet"] == {"modules": exported["counts"][0], "ranks": [RANK], "alphas": [ALPHA], "missing_alpha": 0}
    assert report["metadata"]["ss_network_alpha"] == "8" and report["file_size"] == exported["a1111"].stat().st_size
    assert report["problems"] == []


def rewrite(src, dst, change):
    tensors = load_file(str(src))
    save_file(change(tensors), str(dst), metadata={"ss_base_model_version": "sd_v1"})
    return dst


def test_flags_nan_weights(exported):
    def poison(tensors):
        key = next(k for k in sorted(tensors) if k.endswith("lora_up.weight"))
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = float("nan")
        return tensors

    report = inspect_path(rewrite(exported["a1111"], exported["root"] / "nan.safetensors", poison))
    assert any("NaN" in p for p in report["problems"])


def test_flags_sdxl_text_encoder_prefix_and_missing_alpha(exported):
    def sdxl_prefix(tensors):
        renamed = {k.replace("lora_te_", "lora_te1_"): v for k, v in tensors.items()}
        return {k: v for k, v in renamed.items() if not (k.startswith("lora_unet_down") and k.endswith(".alpha"))}

    report = inspect_path(rewrite(exported["a1111"], exported["root"] / "te1.safetensors", sdxl_prefix))
    assert report["family"] == "sd1"
    assert any("lora_te1_" in p and "A1111 ignores" in p for p in report["problems"])
    assert any("no .alpha" in p for p in report["problems"])


def test_flags_differing_alphas_and_zero_ups(exported):
    def mixed(tensors):
        for key in [k for k in tensors if k.endswith(".alpha")][:3]:
            tensors[key] = torch.tensor(1.0)
        return {k: (torch.zeros_like(v) if k.endswith("lora_up.weight") else v) for k, v in tensors.items()}

    report = inspect_path(rewrite(exported["a1111"], exported["root"] / "mixed.safetensors", mixed))
    assert any("alphas differ" in p for p in report["problems"])
    assert any("every up weight is zero" in p for p in report["problems"])


def test_missing_path(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        inspect_path(tmp_path / "nope.safetensors")


def _lycoris_files(folder: Path) -> dict[str, Path]:
    """A LoHa and a LoKr file as LyCORIS writes them (kohya names, their own tensor suffixes; LoKr with a low-rank w2)."""
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    g = torch.Generator().manual_seed(0)
    attn2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    loha = {f"{attn2}.hada_w1_a": torch.randn(320, 4, generator=g), f"{attn2}.hada_w1_b": torch.randn(4, 768, generator=g),
            f"{attn2}.hada_w2_a": torch.randn(320, 4, generator=g), f"{attn2}.hada_w2_b": torch.randn(4, 768, generator=g),
            f"{name}.hada_w1_a": torch.randn(32, 4, generator=g), f"{name}.hada_w1_b": torch.randn(4, 32, generator=g),
            f"{name}.hada_w2_a": torch.randn(32, 4, generator=g), f"{name}.hada_w2_b": torch.randn(4, 32, generator=g), f"{name}.alpha": torch.tensor(4.0)}
    lokr = {f"{name}.lokr_w1": torch.randn(4, 4, generator=g), f"{name}.lokr_w2": torch.randn(8, 8, generator=g),
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lokr_w1": torch.randn(8, 8, generator=g),  # out 8 x 8, in 8 x 96 = 768
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lokr_w2_a": torch.randn(8, 2, generator=g),
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lokr_w2_b": torch.randn(2, 96, generator=g),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lokr_w1": torch.randn(4, 4, generator=g),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lokr_w2": torch.randn(8, 8, generator=g)}
    files = {"loha": folder / "loha.safetensors", "lokr": folder / "lokr.safetensors"}
    save_file(loha, files["loha"])
    save_file(lokr, files["lokr"])
    return files


def test_lycoris_files_are_named_as_such_and_refused_by_what_cannot_read_them(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LoHa/LoKr used to show as 'modules lack a down or up weight; consumers skip them' (A1111 and ComfyUI load them),
    and generate passed diffusers' key-renaming error through."""
    import re

    from typer.testing import CliRunner

    from dreamlora.cli import app

    files = _lycoris_files(tmp_path)
    loha, lokr = inspect_path(files["loha"]), inspect_path(files["lokr"])
    assert loha["lycoris"] == {"LoHa": 2} and lokr["lycoris"] == {"LoKr": 3}
    assert (lokr["unet_modules"], lokr["text_encoder_modules"]) == (2, 1)
    assert loha["family"] == lokr["family"] == "sd1"  # read from their attn2.to_k input widths (LoKr: 768 = 8 x 96)
    for report in (loha, lokr):
        assert not any("lack a down or up weight" in p for p in report["problems"])
        assert any("LyCORIS" in p and "AUTOMATIC1111, Forge and ComfyUI load it" in p for p in report["problems"])

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    said = lambda output: re.sub(r"[\s│╭╮╰╯─]+", " ", output)  # noqa: E731
    commands = {
        "generate": ["generate", "--model", "tiny", "-p", "a photo", "--lora", str(files["loha"]), "-n", "1", "--steps", "1"],
        "convert": ["convert", str(files["lokr"]), "out.safetensors", "--to", "a1111"],
        "init-lora": ["train", "--model", "tiny", "--instance", str(instance_dir), "--init-lora", str(files["loha"]), "--max-steps", "1"],
    }
    for what, args in commands.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "Traceback" not in result.output, (what, result.output)
        assert "a LyCORIS Lo" in said(result.output) and "not a LoRA" in said(result.output), (what, result.output)
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "runs").exists() and not any(tmp_path.glob("samples-out*"))


def test_trained_words_sum_the_tag_frequency_over_folders_and_survive_bad_metadata() -> None:
    from dreamlora.inspection import trained_words

    assert trained_words({"ss_tag_frequency": json.dumps({"10_sks dog": {"sks dog": 2, "sofa": 1}, "5_sks dog": {"sofa": 2, "snow": 1}})}) == [("sofa", 3), ("sks dog", 2), ("snow", 1)]
    assert trained_words({"ss_tag_frequency": "not json"}) == trained_words({"ss_tag_frequency": '["a"]'}) == trained_words({}) == []
    assert trained_words({"ss_tag_frequency": json.dumps({"d": {"a": "many", "b": 1}})}) == [("b", 1)]
