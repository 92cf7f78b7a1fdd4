"""A1111's prompt emphasis in the images dreamlora draws: `(word:1.3)`, `(word)`, `[word]`, escapes; each token's
context scaled by its weight and the prompt rescaled to its unweighted mean; plain prompts take diffusers' own path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dreamlora.cli import app
from dreamlora.emphasis import emphasized_embeddings, has_emphasis, parse_emphasis, pipeline_inputs
from dreamlora.models import build_pipeline, load_components, tokenize

runner = CliRunner()


def test_emphasis_is_parsed_as_a1111_reads_it() -> None:
    assert parse_emphasis("a photo of dog") == [("a photo of dog", 1.0)]
    parsed = parse_emphasis("a (sks dog:1.5) on [grass], ((sunny)) day")
    assert [text for text, _ in parsed] == ["a ", "sks dog", " on ", "grass", ", ", "sunny", " day"]
    assert [round(w, 4) for _, w in parsed] == [1.0, 1.5, 1.0, round(1 / 1.1, 4), 1.0, 1.21, 1.0]
    assert parse_emphasis(r"a \(literal\) dog: cute") == [("a (literal) dog: cute", 1.0)]
    assert parse_emphasis("a (dog") == [("a ", 1.0), ("dog", 1.1)]  # unclosed: to the end
    assert parse_emphasis("a dog) ]") == [("a dog ", 1.0)]  # stray closers are dropped
    assert parse_emphasis("((a:2) b)") == [("a", 2.2), (" b", 1.1)]  # nested weights multiply
    assert has_emphasis("a (dog)") and not has_emphasis("a dog: 16:9")


def test_emphasized_embeddings_weigh_only_the_emphasized_tokens() -> None:
    components = load_components("tiny")
    pipeline = build_pipeline(components)
    plain = components.text_encoder(tokenize(components.tokenizer, ["a photo of sks dog"]))[0]
    neutral = emphasized_embeddings(pipeline, ["a photo of (sks dog:1.0)"]).context
    torch.testing.assert_close(neutral, plain, rtol=0, atol=1e-6)  # weight 1 is the plain encoding, token for token
    strong = emphasized_embeddings(pipeline, ["a photo of (sks dog:1.5)"]).context
    ratio = (strong / plain)[0, :, 0]  # per position, one channel
    emphasized = [len(components.tokenizer("a photo of", add_special_tokens=False).input_ids) + 1 + k for k in range(len(components.tokenizer("sks dog", add_special_tokens=False).input_ids))]
    others = [i for i in range(ratio.shape[0]) if i not in emphasized]
    rescale = ratio[others].mean()
    torch.testing.assert_close(ratio[others], torch.full_like(ratio[others], float(rescale)), rtol=1e-4, atol=1e-4)  # the rest only rescaled
    torch.testing.assert_close(ratio[emphasized], torch.full_like(ratio[emphasized], 1.5 * float(rescale)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(strong.mean(), plain.mean(), rtol=1e-5, atol=1e-6)  # A1111's rescale to the unweighted mean
    assert set(pipeline_inputs(pipeline, ["a dog"], None)) == {"prompt", "negative_prompt"}  # plain text: diffusers encodes it
    assert set(pipeline_inputs(pipeline, ["a (dog)"], None)) == {"prompt_embeds", "negative_prompt_embeds"}


def test_emphasized_embeddings_on_sdxl_carry_the_pooled_prompt() -> None:
    pipeline = build_pipeline(load_components("tiny-sdxl"))
    inputs = pipeline_inputs(pipeline, ["a (dog:1.3)"], ["blurry"])
    assert set(inputs) == {"prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"}
    image = pipeline(**inputs, num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_generate_reads_emphasis_unless_told_not_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    common = ["generate", "--model", "tiny", "-n", "1", "--steps", "2"]
    for name, prompt, extra in (("plain", "a photo of dog", []), ("neutral", "a photo of (dog:1.0)", []), ("strong", "a photo of (dog:3)", []),
                                ("literal", "a photo of (dog:3)", ["--no-emphasis"])):  # fmt: skip
        result = runner.invoke(app, [*common, "-p", prompt, "--out", name, *extra])
        assert result.exit_code == 0, result.output
    image = {name: Image.open(f"{name}/seed-0.png").tobytes() for name in ("plain", "neutral", "strong", "literal")}
    assert image["neutral"] == image["plain"]  # weight 1 through the embeddings path draws the same image
    assert image["strong"] != image["plain"] and image["literal"] != image["strong"]
