"""Pivotal tuning (`--pivotal`): the token's new embeddings, trained beside the LoRA, saved, resumed, exported in
every format and loaded back by dreamlora's generate and by diffusers' own `load_textual_inversion`."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from dreamlora.cli import app
from dreamlora.config import ExportConfig, load_config
from dreamlora.errors import ConfigError
from dreamlora.export import export_run
from dreamlora.generate import generate_images, install_embeddings
from dreamlora.lora import read_diffusers_lora
from dreamlora.merge import merge_loras
from dreamlora.models import build_pipeline, encode_prompts, load_components, tokenize_all
from dreamlora.pivotal import PivotalEmbeddings, embeddings_for, expand_prompt, install, read_embeddings
from dreamlora.train import _attach_pivotal, resolve_data, train

runner = CliRunner()


def _config(instance_dir: Path, class_dir: Path | None, out: Path, **extra: str):
    overrides = {
        "model.name": "tiny", "data.instance_dir": str(instance_dir), "data.resolution": "32", "train.max_steps": "3",
        "train.out": str(out), "train.num_samples": "0", "prior.steps": "2", "train.log_every": "1", "adapter.pivotal": "true",
    }
    if class_dir is not None:
        overrides.update({"data.class_dir": str(class_dir), "data.class_name": "dog"})
    overrides.update(extra)
    return resolve_data(load_config(None, overrides), priors_root=out.parent / "no-priors")[0]


def test_expand_prompt_replaces_the_whole_word_in_any_case() -> None:
    assert expand_prompt("a photo of sks dog", "sks", 2) == "a photo of <sks_0> <sks_1> dog"
    assert expand_prompt("SKS, sks. tasks sksdog", "sks", 1) == "<sks_0>, <sks_0>. tasks sksdog"
    once = expand_prompt("sks", "sks", 3)
    assert expand_prompt(once, "sks", 3) == once  # already expanded prompts are left alone


def test_new_tokens_get_their_own_ids_and_the_hook_matches_the_installed_rows() -> None:
    trained = load_components("tiny")
    table = trained.text_encoder.get_input_embeddings().weight.detach().clone()
    pivotal = PivotalEmbeddings.attach(trained, "sks", 2, "dog")
    tokenizer = trained.tokenizers[0]
    ids = tokenizer(pivotal.expand("a photo of sks dog")).input_ids
    new = [len(tokenizer) - 2, len(tokenizer) - 1]
    assert ids.count(new[0]) == 1 and ids.count(new[1]) == 1 and tokenizer.unk_token_id not in ids[1:-1]  # unknown is also the end token here
    assert tokenizer("a photo of dog").input_ids == [i for i in ids if i not in new]  # the rest tokenizes as before
    assert torch.equal(trained.text_encoder.get_input_embeddings().weight[: len(table)], table)  # base rows untouched
    assert not trained.text_encoder.get_input_embeddings().weight.requires_grad
    with torch.no_grad():
        for param in pivotal.parameters():
            param.add_(torch.randn_like(param))  # trained vectors, not the initial ones
    prompt = pivotal.expand("a photo of sks dog")
    hooked = encode_prompts(trained, tokenize_all(trained, [prompt])).context
    # Inference writes the vectors into the new rows instead: the same encoding.
    fresh = load_components("tiny")
    assert install(fresh, "sks", pivotal.tensors()) == 2
    installed = encode_prompts(fresh, tokenize_all(fresh, [prompt])).context
    assert torch.allclose(hooked, installed, atol=1e-6)
    base = encode_prompts(fresh, tokenize_all(fresh, ["a photo of sks dog"])).context
    assert not torch.allclose(installed, base, atol=1e-3)  # the new tokens change the encoding


def test_pivotal_trains_the_embeddings_beside_the_unet_lora_only(tmp_path: Path, instance_dir: Path, class_dir: Path) -> None:
    components = load_components("tiny")
    table = components.text_encoder.get_input_embeddings().weight.detach().clone()
    dog = table[components.tokenizers[0]("dog", add_special_tokens=False).input_ids].mean(0)
    cfg = _config(instance_dir, class_dir, tmp_path / "runs" / "p", **{"adapter.train_text_encoder": "false"})
    result = train(cfg, components=components)
    state_dicts, _ = read_diffusers_lora(result.lora_path)
    assert set(state_dicts) == {"unet"}
    token, tensors = read_embeddings(result.run_dir / "lora" / "embeddings.safetensors")
    assert token == "sks" and set(tensors) == {"emb_params"} and tensors["emb_params"].shape == (2, 32)
    moved = (tensors["emb_params"] - dog).abs().amax(dim=1)
    assert torch.all(moved > 0), "each vector started at 'dog' and must have been trained"
    assert torch.equal(components.text_encoder.get_input_embeddings().weight[: len(table)], table)
    # The caller's components end as `install` leaves them: the trained vectors in the new rows, no hook.
    assert torch.equal(components.text_encoder.get_input_embeddings().weight[len(table) :], tensors["emb_params"])
    hooks = components.text_encoder.get_input_embeddings()._forward_hooks.values()
    assert not [hook for hook in hooks if hook.__name__ == "put_vectors"]
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["pivotal"] == {"token": "sks", "vectors": 2, "tokens": ["<sks_0>", "<sks_1>"]}
    # --init-lora from this run starts from its vectors; with another vector count they start afresh.
    again = _config(instance_dir, class_dir, tmp_path / "runs" / "q", **{"adapter.init_lora": str(result.run_dir)})
    started = _attach_pivotal(again, load_components("tiny"), None).tensors()
    assert torch.equal(started["emb_params"], tensors["emb_params"])
    other = _config(instance_dir, class_dir, tmp_path / "runs" / "r", **{"adapter.init_lora": str(result.run_dir), "adapter.pivotal_vectors": "3"})
    assert torch.allclose(_attach_pivotal(other, load_components("tiny"), None).tensors()["emb_params"], dog.expand(3, -1))


def test_embeddings_freeze_at_their_stop_step_and_resume_exactly(tmp_path: Path, instance_dir: Path, class_dir: Path) -> None:
    extra = {"train.max_steps": "4", "train.checkpoint_every": "1", "train.keep_checkpoints": "5", "adapter.pivotal_vectors": "1"}
    full = train(_config(instance_dir, class_dir, tmp_path / "runs" / "full", **extra)).run_dir  # --pivotal-steps-fraction 0.5
    saved = {step: full / "checkpoints" / f"step-{step:06d}" / "lora" for step in (1, 2, 3, 4)}
    vectors = {step: read_embeddings(folder / "embeddings.safetensors")[1]["emb_params"] for step, folder in saved.items()}
    assert not torch.equal(vectors[1], vectors[2])  # trained in steps 1 and 2
    assert torch.equal(vectors[2], vectors[3]) and torch.equal(vectors[3], vectors[4])  # frozen from step 3
    text_lora = {step: read_diffusers_lora(folder / "pytorch_lora_weights.safetensors")[0]["text_encoder"] for step, folder in saved.items()}
    assert any(not torch.equal(text_lora[3][k], text_lora[4][k]) for k in text_lora[4])  # the text-encoder LoRA still trains
    final = read_embeddings(full / "lora" / "embeddings.safetensors")[1]["emb_params"]
    assert torch.equal(final, vectors[4])
    metrics = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr_embeddings"] for m in metrics] == [5e-4, 5e-4, 0.0, 0.0] and [m["lr_text_encoder"] for m in metrics] == [1e-4] * 4
    # Resuming from step 1 gives the uninterrupted run's vectors and LoRA.
    cfg = _config(instance_dir, class_dir, tmp_path / "runs" / "full", **extra)
    resumed = train(cfg, resume_from=full / "checkpoints" / "step-000001", run_dir=tmp_path / "runs" / "full")
    assert torch.equal(read_embeddings(resumed.run_dir / "lora" / "embeddings.safetensors")[1]["emb_params"], final)
    assert torch.equal(read_diffusers_lora(resumed.lora_path)[0]["text_encoder"][next(iter(text_lora[4]))], next(iter(text_lora[4].values())))
    # With the text encoder frozen too (and no text-encoder LoRA), the encoding is computed once from step 2 on.
    only = train(_config(instance_dir, class_dir, tmp_path / "runs" / "only", **{**extra, "adapter.train_text_encoder": "false", "train.pivotal_steps_fraction": "0.25"})).run_dir
    first, last = (read_embeddings(only / "checkpoints" / f"step-{s:06d}" / "lora" / "embeddings.safetensors")[1]["emb_params"] for s in (1, 4))
    assert torch.equal(first, last)


@pytest.fixture(scope="module")
def pivotal_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import draw_subject

    root = tmp_path_factory.mktemp("pivotal")
    photos = root / "photos"
    photos.mkdir()
    for i in range(3):
        draw_subject(photos / f"{i}.png", shift=i)
    cfg = _config(photos, None, root / "runs" / "sks", **{"adapter.init": "nonzero", "adapter.alpha": "8", "train.max_steps": "2", "data.instance_prompt": "a photo of {token} dog", "adapter.pivotal_init": "dog"})
    return train(cfg).run_dir


def test_exports_carry_the_embedding_and_load_back_as_trained(tmp_path: Path, pivotal_run: Path) -> None:
    token, trained = read_embeddings(pivotal_run / "lora" / "embeddings.safetensors")
    a1111 = export_run(pivotal_run, ExportConfig(format="a1111", dtype="fp32"), exports_root=tmp_path)
    with safe_open(str(a1111.path), framework="pt") as handle:
        bundled = sorted(k for k in handle.keys() if k.startswith("bundle_emb"))
        assert bundled == ["bundle_emb.sks.string_to_param.*"]
        assert torch.equal(handle.get_tensor(bundled[0]), trained["emb_params"])
    assert a1111.verify.status == "passed" and a1111.embedding == tmp_path / "sks-a1111_emb.safetensors"
    assert any("bundled in the LoRA file" in note and "embedding:sks" in note for note in a1111.notes)
    diffusers_export = export_run(pivotal_run, ExportConfig(format="diffusers", dtype="fp32"), exports_root=tmp_path)
    written_token, written = read_embeddings(diffusers_export.embedding)
    assert written_token == "sks" and torch.equal(written["emb_params"], trained["emb_params"])
    for lora in (pivotal_run, a1111.path, diffusers_export.path):
        found = embeddings_for(lora / "lora" / "pytorch_lora_weights.safetensors" if lora == pivotal_run else (lora / "pytorch_lora_weights.safetensors" if lora.is_dir() else lora))
        assert found is not None and found[0] == "sks" and torch.equal(found[1]["emb_params"], trained["emb_params"])

    # diffusers alone, as the note says: the LoRA folder, then load_textual_inversion with token <sks>.
    reference = load_components("tiny")
    pipeline = build_pipeline(reference)
    pipeline.load_lora_weights(str(diffusers_export.path))
    pipeline.load_textual_inversion(str(diffusers_export.embedding), token="<sks>")
    theirs = generate_images(pipeline, "a photo of <sks> dog", [0], 2, 5.0, 32)[0]
    # dreamlora's generate on each export (and the run) reads the same prompt spelled with the token.
    for lora in (pivotal_run, a1111.path, diffusers_export.path):
        components = load_components("tiny")
        ours_pipeline = build_pipeline(components)
        from dreamlora.generate import load_loras

        load_loras(ours_pipeline, [(lora, 1.0)])
        rewrite = install_embeddings(components, [(lora, 1.0)])
        ours = generate_images(ours_pipeline, rewrite("a photo of sks dog"), [0], 2, 5.0, 32)[0]
        difference = torch.tensor(list(ours.getdata()), dtype=torch.float) - torch.tensor(list(theirs.getdata()), dtype=torch.float)
        assert difference.abs().max() <= 1, lora
    # The command: a1111 export (bundled embedding), prompt with the token.
    args = ["generate", "--model", "tiny", "-p", "a photo of sks dog", "-n", "1", "--steps", "2", "--guidance", "5", "--resolution", "32"]
    result = runner.invoke(app, [*args, "--lora", str(a1111.path), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    cli = Image.open(tmp_path / "cli" / "seed-0.png")
    assert max(abs(a - b) for p, q in zip(cli.getdata(), theirs.getdata()) for a, b in zip(p, q)) <= 1
    plain = generate_images(build_pipeline(load_components("tiny")), "a photo of sks dog", [0], 2, 5.0, 32)[0]
    assert list(plain.getdata()) != list(theirs.getdata())


def test_convert_and_resize_carry_the_embedding_and_merge_takes_one(tmp_path: Path, pivotal_run: Path) -> None:
    result = runner.invoke(app, ["resize", str(pivotal_run), str(tmp_path / "small.safetensors"), "--rank", "2", "--model", "tiny"])
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "small.safetensors"), framework="pt") as handle:
        assert "bundle_emb.sks.string_to_param.*" in handle.keys()
    assert (tmp_path / "small_emb.safetensors").is_file()
    result = runner.invoke(app, ["convert", str(tmp_path / "small.safetensors"), str(tmp_path / "small-diffusers"), "--to", "diffusers", "--model", "tiny"])
    assert result.exit_code == 0, result.output
    assert read_embeddings(tmp_path / "small-diffusers_emb.safetensors")[0] == "sks"
    with pytest.raises(ConfigError, match="carry a pivotal-tuned embedding"):
        merge_loras([(pivotal_run, 1.0), (tmp_path / "small.safetensors", 0.5)], tmp_path / "merged.safetensors", base_model="tiny")
    assert not (tmp_path / "merged.safetensors").exists()
    result = runner.invoke(app, ["inspect", str(tmp_path / "small.safetensors")])
    assert result.exit_code == 0 and "no problems found" in result.output, result.output
    from dreamlora.inspection import inspect_path

    report = inspect_path(tmp_path / "small.safetensors")
    assert report["format"] == "a1111" and report["embedding"] == "'sks', 2 vectors (emb_params 2x32), bundled in the file"
    assert inspect_path(pivotal_run)["embedding"] == "'sks', 2 vectors (emb_params 2x32), in its own file beside the LoRA"


def test_pivotal_settings_need_pivotal_and_embeddings_that_do_not_fit_are_refused(tmp_path: Path, instance_dir: Path) -> None:
    for flags in (["--pivotal-vectors", "3"], ["--pivotal-lr", "1e-3"], ["--pivotal-init", "cat"]):
        result = runner.invoke(app, ["train", "--model", "tiny", "--instance", str(instance_dir), *flags])
        assert result.exit_code == 2 and "--pivotal" in result.output.replace("│", " ") and "Traceback" not in result.output, flags
    result = runner.invoke(app, ["train", "--model", "tiny", "--instance", str(instance_dir), "--pivotal", "--optimizer", "prodigy", "--pivotal-lr", "1e-3"])
    assert result.exit_code == 2 and "Prodigy" in result.output
    # --no-text-encoder with --pivotal: the text encoder's schedule still applies (to the embeddings), its stop step does not.
    load_config(None, {"adapter.train_text_encoder": "false", "adapter.pivotal": "true", "train.text_encoder_lr_scheduler": "cosine"})
    for key in ("train.text_encoder_steps_fraction", "train.text_encoder_lr_scheduler"):
        with pytest.raises(ConfigError, match=key):
            load_config(None, {"adapter.train_text_encoder": "false", key: "0.5" if "fraction" in key else "cosine"})
    with pytest.raises(ConfigError, match="text_encoder_steps_fraction"):
        load_config(None, {"adapter.train_text_encoder": "false", "adapter.pivotal": "true", "train.text_encoder_steps_fraction": "0.5"})
    with pytest.raises(ConfigError, match="pivotal_steps_fraction"):
        load_config(None, {"train.pivotal_steps_fraction": "0.7"})
    components = load_components("tiny")
    with pytest.raises(ConfigError, match="another base model"):
        install(components, "sks", {"emb_params": torch.zeros(2, 7)})
    with pytest.raises(ConfigError, match="another model family"):
        install(components, "sks", {"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(2, 64)})


def test_sdxl_keeps_one_embedding_per_text_encoder(tmp_path: Path, instance_dir: Path) -> None:
    components = load_components("tiny-sdxl")
    for module in components.text_encoder_2.modules():
        if hasattr(module, "eos_token_id"):
            module.eos_token_id = 2  # as SDXL's published config says: the pooled prompt must still be read at the real end
    cfg = _config(instance_dir, None, tmp_path / "runs" / "xl", **{"model.name": "tiny-sdxl", "train.max_steps": "1", "data.resolution": "64", "adapter.pivotal_init": "dog"})
    result = train(cfg, components=components)
    assert all(getattr(m, "eos_token_id", None) in (None, components.tokenizers[1].eos_token_id) for m in components.text_encoder_2.modules())
    token, tensors = read_embeddings(result.run_dir / "lora" / "embeddings.safetensors")
    widths = [int(encoder.config.hidden_size) for encoder in components.text_encoders.values()]
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"clip_l": (2, widths[0]), "clip_g": (2, widths[1])}
    exported = export_run(result.run_dir, ExportConfig(format="a1111", verify=False), exports_root=tmp_path)
    with safe_open(str(exported.path), framework="pt") as handle:
        assert sorted(k for k in handle.keys() if k.startswith("bundle_emb")) == ["bundle_emb.sks.clip_g", "bundle_emb.sks.clip_l"]


def test_train_command_reports_the_embedding(tmp_path: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["train", "--model", "tiny", "--instance", str(instance_dir), "--max-steps", "1", "--resolution", "32", "--out", "runs/p",
            "--pivotal", "--pivotal-vectors", "3", "--pivotal-init", "dog", "--no-text-encoder", "--set", "train.num_samples=0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "sks = 3 new tokens" in result.output.replace("│", " ")
    assert read_embeddings(tmp_path / "runs" / "p" / "lora" / "embeddings.safetensors")[1]["emb_params"].shape == (3, 32)


def test_init_lora_with_an_embedding_but_without_pivotal_says_it_is_unused(tmp_path: Path, instance_dir: Path, pivotal_run: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _config(instance_dir, None, tmp_path / "runs" / "plain", **{"adapter.pivotal": "false", "adapter.init_lora": str(pivotal_run), "train.max_steps": "1"})
    with caplog.at_level("WARNING", logger="dreamlora.train"):
        result = train(cfg)
    assert "carries a pivotal-tuned embedding of 'sks'" in caplog.text
    assert not (result.run_dir / "lora" / "embeddings.safetensors").exists()
