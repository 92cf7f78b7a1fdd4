"""The model card (README.md) a diffusers or merged export folder gets, as the Hugging Face Hub reads one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dreamlora.config import ExportConfig, load_config
from dreamlora.export import export_run
from dreamlora.model_card import last_readings
from dreamlora.train import resolve_data, train


def _front_matter(card: str) -> dict[str, object]:
    """The card's YAML block, read the way it is written: `key: json-value` lines and `- json-value` list items."""
    lines = card.split("---\n")[1].splitlines()
    out: dict[str, object] = {}
    key = ""
    for line in lines:
        if line.startswith("- "):
            out.setdefault(key, []).append(json.loads(line[2:]))  # type: ignore[union-attr]
        else:
            key, _, value = line.partition(": ")
            key = key.rstrip(":")
            if value:
                out[key] = value if key == "library_name" else json.loads(value)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from conftest import draw_subject

    root = tmp_path_factory.mktemp("card")
    photos = root / "dog"
    photos.mkdir()
    for i in range(3):
        draw_subject(photos / f"photo{i}.png", shift=i)
    classes = root / "priors" / "dog"
    classes.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(classes / f"{i:05d}.png")
    (classes / "manifest.json").write_text(json.dumps({"model": "tiny", "prompt": "a photo of dog", "class_name": "dog", "files": [], "num_images": 4}))
    runs = {}
    for name, extra in (("plain", {}), ("pivotal", {"adapter.pivotal": "true"}), ("sdxl-pivotal", {"adapter.pivotal": "true", "model.name": "tiny-sdxl"})):
        overrides = {
            "model.name": "tiny", "data.instance_dir": str(photos), "data.class_dir": str(classes), "data.class_name": "dog", "data.resolution": "32",
            "train.max_steps": "2", "train.num_samples": "1", "prior.steps": "1", "train.validate_every": "2", "train.validation_images": "1",
            "train.sample_every": "2", "train.out": str(root / "runs" / name), **extra,
        }  # fmt: skip
        runs[name] = train(resolve_data(load_config(None, overrides), priors_root=root / "none")[0]).run_dir
    runs["root"] = root
    return runs


def test_diffusers_export_writes_a_card_with_metadata_usage_settings_figures_and_the_grid(trained: dict[str, Path]) -> None:
    cfg = ExportConfig(format="diffusers", title="My dog", license="creativeml-openrail-m", tags="dog, pets", description="Rex, our dog.", author="Ann")
    result = export_run(trained["plain"], cfg, exports_root=trained["root"] / "exports")
    card = (result.path / "README.md").read_text(encoding="utf-8")
    meta = _front_matter(card)
    assert meta["base_model"] == "tiny" and meta["library_name"] == "diffusers" and meta["license"] == "creativeml-openrail-m"
    assert meta["instance_prompt"] == "a photo of sks dog"
    assert {"text-to-image", "diffusers", "lora", "dreambooth", "stable-diffusion", "dog", "pets"} <= set(meta["tags"])  # type: ignore[arg-type]
    assert "# My dog" in card and "Rex, our dog." in card and "Author: Ann" in card
    assert "pipe.load_lora_weights(" in card and "AutoPipelineForText2Image.from_pretrained(\"tiny\"" in card
    assert 'image = pipe("a photo of sks dog")' in card and "load_textual_inversion" not in card
    assert "| prior preservation | yes: `a photo of dog`, 3 class images |" in card and "| LoRA rank / alpha | 4 / 4 |" in card
    last = last_readings(trained["plain"] / "metrics.jsonl")["val_class_loss"]
    assert f"| held-out class loss (base model: {last['val_class_loss_base']:.4f}; above it = the class drifted) | 2 | {last['val_class_loss']:.4f} |" in card
    assert "| class palette drift (0 = the class images' colours as the base model's) | 2 |" in card
    assert "](samples.png)" in card and Image.open(result.path / "samples.png").size == Image.open(trained["plain"] / "samples" / "final.png").size
    assert str(trained["root"]) not in card  # names only, never local paths
    assert result.verify.status == "passed"  # the card and picture do not disturb loading the folder
    assert any("model card README.md" in note for note in result.notes)


def test_pivotal_merged_and_a1111_exports(trained: dict[str, Path]) -> None:
    exports = trained["root"] / "exports2"
    pivotal = export_run(trained["pivotal"], ExportConfig(format="diffusers"), exports_root=exports)
    card = (pivotal.path / "README.md").read_text(encoding="utf-8")
    assert f'pipe.load_textual_inversion("PATH/TO/{pivotal.embedding.name}", token="<sks>")' in card
    assert 'image = pipe("a photo of <sks> dog")' in card and "| pivotal tuning | 2 new vectors for `sks` |" in card
    merged = export_run(trained["plain"], ExportConfig(format="merged", dtype="fp32"), exports_root=exports)
    card = (merged.path / "README.md").read_text(encoding="utf-8")
    assert "LoRA fused into the base model's weights" in card and "load_lora_weights" not in card and "lora" not in _front_matter(card)["tags"]  # type: ignore[operator]
    single = export_run(trained["plain"], ExportConfig(format="a1111"), exports_root=exports)
    assert not (single.path.parent / "README.md").exists()  # a single file keeps its record in its metadata


def _run_usage_code(card: str, model: str, folder: Path) -> object:
    """Execute the card's Python block against a tiny model on the CPU, in a few small steps."""
    from dreamlora.models import tiny_model_dir

    code = card.split("```python\n")[1].split("```")[0]
    code = code.replace(json.dumps(model), json.dumps(str(tiny_model_dir(model)))).replace("torch.float16", "torch.float32").replace('.to("cuda")', '.to("cpu")')
    code = code.replace("PATH/TO/THIS/FOLDER", str(folder)).replace("PATH/TO/", f"{folder.parent}/")
    code = code.replace(").images[0]", ", num_inference_steps=2, height=32, width=32).images[0]")
    scope: dict[str, object] = {}
    exec(compile(code, "model card", "exec"), scope)
    return scope["image"]


def test_the_cards_usage_code_runs(trained: dict[str, Path]) -> None:
    # The LoRA, the LoRA with its pivotal-tuned embedding, and SDXL's two embeddings into its two text encoders.
    for name, model in (("plain", "tiny"), ("pivotal", "tiny"), ("sdxl-pivotal", "tiny-sdxl")):
        result = export_run(trained[name], ExportConfig(format="diffusers", dtype="fp32", verify=False), exports_root=trained["root"] / f"run-{name}")
        card = (result.path / "README.md").read_text(encoding="utf-8")
        assert ("stable-diffusion-xl" in card) == (model == "tiny-sdxl")
        image = _run_usage_code(card, model, result.path)
        assert isinstance(image, Image.Image) and image.size == (32, 32)
