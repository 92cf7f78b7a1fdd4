"""`--weighted-captions` (kohya's --weighted_captions): A1111's emphasis read in the prompts training encodes."""

import copy
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dreamlora.cli import app
from dreamlora.config import load_config
from dreamlora.emphasis import plain_text, tokenize_weighted, weigh_context, weighted_tokens
from dreamlora.lora import read_safetensors
from dreamlora.models import PromptEmbeddings, encode_prompts, load_components, tokenize, tokenize_all

runner = CliRunner()
LONG = "sks dog " + "sitting on a red sofa in a sunny living room " * 3  # 143 tokens in the tiny (character) tokenizer


def test_brackets_weigh_their_tokens_and_leave_the_ids_of_the_plain_text() -> None:
    tokenizer = load_components("tiny").tokenizer
    ids, weights = weighted_tokens(tokenizer, ["a photo of (sks:1.5) [dog]", "a photo"])
    assert torch.equal(ids, tokenize(tokenizer, ["a photo of sks dog", "a photo"]))
    plain = tokenizer("a photo of ", add_special_tokens=False).input_ids
    sks = tokenizer("sks", add_special_tokens=False).input_ids
    dog = tokenizer(" dog", add_special_tokens=False).input_ids
    start = 1 + len(plain)
    expected = [1.0] * 77
    expected[start : start + len(sks)] = [1.5] * len(sks)
    expected[start + len(sks) : start + len(sks) + len(dog)] = [1 / 1.1] * len(dog)
    assert weights.shape == (2, 77) and torch.allclose(weights[0], torch.tensor(expected)) and bool((weights[1] == 1).all())
    assert plain_text("a photo of (sks:1.5) [dog]") == "a photo of sks dog"
    # Nothing weighed: no weights at all, so training takes the plain path.
    assert tokenize_weighted([tokenizer], ["a photo of sks dog", r"a \(literal\) bracket"])[1] is None


def test_long_prompts_keep_their_windows_and_weights_line_up_with_the_joined_context() -> None:
    components = load_components("tiny")
    weighted = LONG.replace("sunny", "(sunny:2)", 1) + " (velvet:1.3)"
    ids, weights = tokenize_weighted(components.tokenizers, [weighted, "a photo"], 150)
    assert torch.equal(ids[0], tokenize(components.tokenizer, [plain_text(weighted), "a photo"], 150))
    with torch.no_grad():
        context = encode_prompts(components, ids).context
    assert weights is not None and weights.shape == context.shape[:2] == (2, 152)  # BOS, 2 x 75, EOS
    full = components.tokenizer(plain_text(weighted)).input_ids
    heavy = [i for i in range(152) if weights[0, i] != 1]
    assert len(heavy) == len("sunny") + len("velvet") and max(heavy) > 76  # the second window's tokens are weighed too
    assert [full[i] for i in heavy[: len("sunny")]] == components.tokenizer("sunny", add_special_tokens=False).input_ids


def test_weighing_scales_each_token_then_restores_the_prompts_mean() -> None:
    context = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    weights = torch.tensor([[1.0, 2.0, 1.0]])
    out = weigh_context(PromptEmbeddings(context, torch.ones(1, 4)), weights)
    scaled = torch.tensor([[[1.0, 2.0], [6.0, 8.0], [5.0, 6.0]]])
    assert torch.allclose(out.context, scaled * (21 / 28)) and torch.allclose(out.context.mean(), context.mean())
    assert torch.equal(out.pooled, torch.ones(1, 4))  # SDXL's pooled prompt is not weighed
    assert weigh_context(PromptEmbeddings(context), None).context is context


def test_a_prompt_whose_mean_is_zero_keeps_its_weighted_context_instead_of_being_zeroed() -> None:
    context = torch.tensor([[[1.0, -1.0], [2.0, -2.0], [3.0, -3.0]], [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])  # prompt 0: mean 0
    weights = torch.tensor([[1.0, 2.0, 1.0], [1.0, 2.0, 1.0]])
    out = weigh_context(PromptEmbeddings(context), weights).context
    assert torch.equal(out[0], context[0] * weights[0, :, None])  # A1111's ratio would be 0/0 here
    assert torch.allclose(out[1].mean(), context[1].mean()) and not torch.allclose(out[1], context[1])  # the other prompt as before


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_gradients_reach_the_text_encoder_through_the_weights(model: str) -> None:
    components = load_components(model)
    ids, weights = tokenize_weighted(components.tokenizers, ["a photo of (sks:1.4) dog"])
    encoder = components.text_encoder
    encoder.requires_grad_(True)
    context = weigh_context(encode_prompts(components, ids), weights).context
    plain = encode_prompts(components, tokenize_all(components, ["a photo of sks dog"])).context
    assert not torch.allclose(context, plain)
    # A fixed projection, not the sum of squares: after a final layer norm without bias every token's norm is fixed, so
    # that sum has no gradient to find.
    (context * torch.randn(context.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    grads = [p.grad for p in encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def _train(tmp_path: Path, instance_dir: Path, name: str, caption: str, *flags: str) -> dict[str, torch.Tensor]:
    folder = tmp_path / f"photos-{name}"
    folder.mkdir()
    for photo in sorted(instance_dir.glob("*.png")):
        (folder / photo.name).write_bytes(photo.read_bytes())
        (folder / f"{photo.stem}.txt").write_text(caption)
    args = ["train", "--model", "tiny", "--instance", str(folder), "--max-steps", "2", "--resolution", "32", "--seed", "3",
            "--set", "train.num_samples=0", "--set", "adapter.init=gaussian", "--out", str(tmp_path / name), *flags]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return read_safetensors(next((tmp_path / name).rglob("pytorch_lora_weights.safetensors")))[0]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_reads_weights_only_with_the_flag(tmp_path: Path, instance_dir: Path) -> None:
    plain = _train(tmp_path, instance_dir, "plain", "a photo of sks dog")
    # Weight 1 read: the same prompt, the same run, bit for bit.
    assert _same(plain, _train(tmp_path, instance_dir, "one", "a photo of (sks:1.0) dog", "--weighted-captions"))
    # A real weight changes what the UNet and the text encoder are trained on.
    weighed = _train(tmp_path, instance_dir, "weighed", "a photo of (sks:1.5) dog", "--weighted-captions")
    assert not _same(plain, weighed) and all(torch.isfinite(v).all() for v in weighed.values())
    # Without the flag the brackets are text, as kohya and diffusers read them: another prompt again.
    assert not _same(plain, _train(tmp_path, instance_dir, "literal", "a photo of (sks:1.0) dog"))
    # Shuffled tags are tokenized every step, with their weights.
    shuffled = _train(tmp_path, instance_dir, "shuffled", "(sks:1.5), dog, photo", "--weighted-captions", "--shuffle-caption")
    assert all(torch.isfinite(v).all() for v in shuffled.values())
    assert load_config(tmp_path / "weighed" / "config.toml").data.weighted_captions
    exported = runner.invoke(app, ["export", str(tmp_path / "weighed"), "--format", "a1111", "--out", str(tmp_path / "w.safetensors"), "--no-verify"])
    assert exported.exit_code == 0 and read_safetensors(tmp_path / "w.safetensors")[1]["ss_weighted_captions"] == "True", exported.output
    assert not load_config(tmp_path / "plain" / "config.toml").data.weighted_captions


def test_resuming_with_another_reading_of_the_captions_is_refused(tmp_path: Path, instance_dir: Path) -> None:
    _train(tmp_path, instance_dir, "run", "a photo of (sks:1.5) dog", "--weighted-captions", "--checkpoint-every", "2")
    args = ["train", "--resume", "--out", str(tmp_path / "run"), "--max-steps", "3"]
    refused = runner.invoke(app, [*args, "--set", "data.weighted_captions=false"])
    assert refused.exit_code == 2 and "data.weighted_captions: True -> False" in " ".join(refused.output.replace("│", " ").split()), refused.output
    assert runner.invoke(app, args).exit_code == 0  # the run's own setting is kept


def test_the_warning_about_long_captions_counts_the_text_without_brackets() -> None:
    from dreamlora.train import warn_long_prompts

    small = copy.deepcopy(load_components("tiny").tokenizer)
    small.model_max_length = 32
    bracketed = "(" + "x" * 29 + ":1.2)"  # 29 tokens of text, 36 with the brackets read as text
    assert warn_long_prompts(small, [bracketed]) == [bracketed]
    assert warn_long_prompts(small, [plain_text(bracketed)]) == []


def test_dataset_says_how_bracketed_captions_are_read(tmp_path: Path, instance_dir: Path) -> None:
    (instance_dir / "photo1.txt").write_text("a photo of (sks:1.3) dog, [grass]")
    args = ["dataset", str(instance_dir), "--model", "tiny", "--sheet", str(tmp_path / "sheet.png")]
    plain = runner.invoke(app, args)
    assert plain.exit_code == 0 and "1 captions have brackets (photo1.png), trained as plain text" in _flat(plain.output), plain.output
    weighted = runner.invoke(app, [*args, "--weighted-captions"])
    assert weighted.exit_code == 0 and "--weighted-captions: 1 captions weigh words" in _flat(weighted.output), weighted.output


def _flat(output: str) -> str:
    return re.sub(r"[│┌┐└┘─┬┴┼├┤\s]+", " ", output)
