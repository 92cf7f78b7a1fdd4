import time
from pathlib import Path

import pytest
import torch

from dreamlora.errors import ModelLoadError
from dreamlora.models import build_pipeline, load_components, resolve_model_dir, tokenize


def test_tiny_tokenizer_maps_prompts_to_real_ids(tiny_dir: Path) -> None:
    components = load_components("tiny")
    ids = tokenize(components.tokenizer, ["a photo of sks dog"])[0]
    tokenizer = components.tokenizer
    content = ids[(ids != tokenizer.pad_token_id) & (ids != tokenizer.bos_token_id) & (ids != tokenizer.eos_token_id)]
    assert len(content) >= 12  # every character of the prompt is a token
    assert tokenizer.unk_token_id not in content.tolist() or tokenizer.unk_token_id in (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert len(set(content.tolist())) > 5
    other = tokenize(tokenizer, ["a photo of cat"])[0]
    assert not torch.equal(ids, other)


def test_tiny_components_and_pipeline(tiny_dir: Path) -> None:
    components = load_components("tiny")
    assert components.family.name == "sd1"
    assert components.prediction_type == "epsilon"
    assert components.native_resolution == 32
    assert (tiny_dir / "model_index.json").is_file()
    image = build_pipeline(components)("a photo of dog", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)


def test_v_prediction_preset() -> None:
    assert load_components("tiny-v").prediction_type == "v_prediction"


def test_missing_folder_and_non_diffusers_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="not a diffusers model folder"):
        resolve_model_dir(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"x")  # single-file checkpoints are converted (test_single_file.py)
    with pytest.raises(ModelLoadError, match="could not be read as safetensors"):
        resolve_model_dir(str(tmp_path / "model.safetensors"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file but not a checkpoint"):
        resolve_model_dir(str(tmp_path / "notes.txt"))


def test_pickle_weights_are_refused(tmp_path: Path, tiny_dir: Path) -> None:
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_dir, copy)
    for weights in (copy / "unet").glob("*.safetensors"):
        weights.unlink()
    (copy / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="pickle"):
        resolve_model_dir(str(copy))
    assert resolve_model_dir(str(copy), allow_pickle=True) == copy


def test_unreachable_hub_fails_fast_with_guidance() -> None:
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as error:
        load_components("someone/not-cached-model")
    assert time.perf_counter() - started < 20
    message = str(error.value)
    assert "unreachable" in message and "--model tiny" in message and "--model PATH" in message


def test_a_tiny_model_left_without_text_encoder_weights_is_built_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank other than 0 of `accelerate launch` once built the tiny model with transformers writing no text encoder
    files (transformers 5 writes only on rank 0): such a cache is built again on first use, and the build writes them."""
    import json

    from dreamlora.models import tiny_model_dir, writable_on_any_rank

    monkeypatch.setenv("DREAMLORA_CACHE", str(tmp_path))
    folder = tiny_model_dir("tiny")
    encoder = folder / "text_encoder"
    for path in encoder.iterdir():
        path.unlink()
    index = json.loads((folder / "model_index.json").read_text())
    assert tiny_model_dir("tiny") == folder and sorted(p.name for p in encoder.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((folder / "model_index.json").read_text()) == index
    assert load_components(str(folder)).text_encoder is not None

    class Model:
        def should_save_on_this_rank(self, is_main_process: bool) -> bool:
            return False  # as transformers 5 answers on rank 1

    model = Model()
    writable_on_any_rank(model, None)
    assert model.should_save_on_this_rank(True) is True and model.should_save_on_this_rank(False) is False
