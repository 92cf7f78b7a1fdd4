"""The toy world draws what it is asked, reads it back through diffusion-like damage, and the toy model follows prompts."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from dreamlora.toy import world
from dreamlora.toy.pretrain import build_tokenizer

ASSET = Path(world.__file__).resolve().parents[1] / "assets" / "toy"


def _damage(image: Image.Image, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Blur, noise, colour drift or a trip through 16x16, as a diffusion model's output might show."""
    if kind in ("blur", "both"):
        image = image.filter(ImageFilter.GaussianBlur(1.5))
    if kind == "coarse":
        image = image.resize((16, 16), Image.BILINEAR).resize((64, 64), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0
    if kind in ("noise", "both"):
        array = array + rng.normal(0, 0.06, array.shape) + rng.normal(0, 0.03, (1, 1, 3))
    return np.clip(array, 0.0, 1.0)


@pytest.mark.parametrize("cls", world.CLASSES)
def test_render_scene_draws_the_class_shape_and_colour(cls: str) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        image = world.render_scene(cls, rng)
        assert image.size == (64, 64) and image.mode == "RGB"
        reading = world.read_scene(image)
        assert (reading.cls, reading.shape, reading.marked) == (cls, world.SHAPES[cls], False)
        # Object 20-44 px across: at least ~4% of the canvas, at most ~40%.
        assert 0.04 < reading.object_fraction < 0.45
        colours = np.asarray(image).reshape(-1, 3) / 255.0
        distance = np.abs(colours - np.array(world.COLOURS[cls])).max(axis=1)
        assert (distance <= world.COLOUR_JITTER + 0.01).sum() > 100


def test_mark_is_present_only_when_marked() -> None:
    rng = np.random.default_rng(1)
    marked = [world.render_scene("dog", rng, marked=True) for _ in range(30)]
    plain = [world.render_scene("dog", rng) for _ in range(30)]
    assert world.mark_rate(marked) == 1.0 and world.class_rate(marked, "dog") == 1.0
    assert world.mark_rate(plain) == 0.0
    yellow = np.abs(np.asarray(marked[0]) / 255.0 - np.array(world.MARK_COLOUR)).max(axis=-1) < 0.02
    assert yellow.mean() > 0.01  # bold: a large yellow area, not a thin line


def test_batched_renderer_matches_layout() -> None:
    generator = torch.Generator().manual_seed(0)
    layout = world.sample_layout(torch.arange(8) % 4, generator, marked=False)
    images = world.render_batch(layout, 64)
    assert images.shape == (8, 3, 64, 64)
    assert images.min() >= 0 and images.max() <= 1
    readings = [world.read_scene(image) for image in world.to_pil(images)]
    assert [r.cls for r in readings] == [world.CLASSES[i % 4] for i in range(8)]


@pytest.mark.parametrize("cls", world.CLASSES)
def test_read_scene_survives_blur_noise_and_coarse_detail(cls: str) -> None:
    rng = np.random.default_rng(2)
    hits = total = 0
    for marked in (False, True) if cls == world.INSTANCE_CLASS else (False,):
        for _ in range(25):
            image = world.render_scene(cls, rng, marked=marked)
            for kind in ("noise", "blur", "both", "coarse"):
                reading = world.read_scene(_damage(image, kind, rng))
                hits += reading.cls == cls and reading.marked == marked
                total += 1
    assert hits / total >= 0.95


def test_plain_background_reads_as_nothing() -> None:
    rng = np.random.default_rng(3)
    for _ in range(10):
        colour = np.clip(0.9 + rng.normal(0, 0.04, 3), 0, 1)
        image = np.clip(np.ones((64, 64, 3)) * colour + rng.normal(0, 0.03, (64, 64, 3)), 0, 1)
        reading = world.read_scene(image)
        assert reading.cls is None and not reading.marked


def test_instance_photos_are_marked_dogs(tmp_path: Path) -> None:
    paths = world.write_instance_photos(tmp_path, n=6, seed=0)
    assert len(paths) == 6 and all(p.suffix == ".png" for p in paths)
    images = [Image.open(p) for p in paths]
    assert all(im.size == (64, 64) for im in images)
    assert world.mark_rate(images) == 1.0 and world.class_rate(images, "dog") == 1.0
    # The shipped sample photos are these, pixel for pixel: the world's drawing has not drifted under them.
    from dreamlora.demo import SAMPLE_PHOTOS

    shipped = sorted(SAMPLE_PHOTOS.glob("*.png"))
    assert [p.name for p in shipped] == [p.name for p in paths]
    assert all(np.array_equal(np.asarray(Image.open(a)), np.asarray(b)) for a, b in zip(shipped, images))


def test_tokenizer_keeps_the_rare_token_and_words_whole() -> None:
    tokenizer = build_tokenizer()
    ids = tokenizer("a photo of sks dog").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    words = ids[1:-1]
    assert len(words) == 5  # each word one token
    assert tokenizer.unk_token_id not in words and tokenizer.eos_token_id not in words
    # An unseen word falls back to character tokens, never to unknown.
    spelled = tokenizer("zebra", add_special_tokens=False).input_ids
    assert len(spelled) >= 2 and tokenizer.unk_token_id not in spelled
    assert tokenizer.decode(spelled).strip() == "zebra"


def test_modifier_words_change_the_size_and_nothing_else() -> None:
    classes = torch.arange(64) % 4
    plain = world.sample_layout(classes, torch.Generator().manual_seed(5))
    none = world.sample_layout(classes, torch.Generator().manual_seed(5), modifiers=torch.full((64,), -1))
    assert torch.equal(plain.across, none.across) and torch.equal(plain.centre, none.centre)
    sizes = {}
    for word in world.MODIFIERS:
        layout = world.sample_layout(classes, torch.Generator().manual_seed(5), modifiers=torch.full((64,), world.modifier_index(word)))
        assert torch.equal(layout.colour, plain.colour) and torch.equal(layout.classes, plain.classes)
        images = world.to_pil(world.render_batch(layout, 64))
        assert world.class_rate(images, "dog") == 0.25 and world.mark_rate(images) == 0.0
        sizes[word] = np.mean([world.read_scene(image).object_fraction for image in images])
    assert sizes["big"] > 2 * sizes["small"]
    with pytest.raises(ValueError, match="big"):
        world.modifier_index("huge")


def test_named_individuals_carry_their_mark_and_are_read_back() -> None:
    classes = torch.arange(64) % 4
    plain = world.sample_layout(classes, torch.Generator().manual_seed(5))
    for name, colour_of in world.NAMES.items():
        layout = world.sample_layout(classes, torch.Generator().manual_seed(5), modifiers=torch.full((64,), world.modifier_index(name)))
        # Same places and sizes; a class that has the name's own colour becomes the next class.
        assert torch.equal(layout.centre, plain.centre) and torch.equal(layout.across, plain.across)
        own = world.class_index(colour_of)
        assert not (layout.classes == own).any()
        assert torch.equal(layout.classes[plain.classes != own], plain.classes[plain.classes != own])
        images = world.to_pil(world.render_batch(layout, 64))
        assert world.name_mark_rate(images, name) == 1.0 and world.mark_rate(images) == 0.0
        assert [world.read_scene(im).cls for im in images] == [world.CLASSES[c] for c in layout.classes.tolist()]
        for other in world.NAMES:
            if other != name:
                assert world.name_mark_rate(images, other) == 0.0
    # Neither plain scenes nor the subject's yellow mark read as any name's mark.
    for images in (world.to_pil(world.render_batch(plain, 64)), world.instance_photos(8)):
        assert all(world.name_mark_rate(images, name) == 0.0 for name in world.NAMES)
    # The yellow mark is no name's colour: DreamBooth's subject stays new to a model pretrained with names.
    assert tuple(world.MARK_COLOUR) not in {world.COLOURS[c] for c in world.NAMES.values()}


def test_prefix_words_do_not_move_older_token_ids() -> None:
    from dreamlora.toy.pretrain import vocabulary_words

    tokenizer = build_tokenizer()
    words = vocabulary_words()
    assert words[-len(world.PREFIX_WORDS):] == list(world.PREFIX_WORDS)  # appended, so earlier ids stay
    for word in world.PREFIX_WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1
    if (ASSET / "tokenizer" / "vocab.json").is_file():
        import json

        shipped = json.loads((ASSET / "tokenizer" / "vocab.json").read_text())
        vocab = tokenizer.get_vocab()
        assert all(vocab[token] == index for token, index in shipped.items())


def test_pretraining_scenes_match_their_prompt_words() -> None:
    """The UNet phase's scenes: a named scene carries its name's mark, a size word its size, a plain one neither;
    the VAE's scenes include every mark colour."""
    from dreamlora.toy.pretrain import _codec_images, _modified_images

    generator = torch.Generator().manual_seed(0)
    images, classes, words = _modified_images(256, generator, 0.75, ("small", "rex", "zed"))
    assert set(words.tolist()) == {-1, world.modifier_index("small"), world.modifier_index("rex"), world.modifier_index("zed")}
    pictures = world.to_pil((images + 1) / 2)
    for word, name in ((world.modifier_index("rex"), "rex"), (world.modifier_index("zed"), "zed")):
        chosen = [p for p, w in zip(pictures, words.tolist()) if w == word]
        assert world.name_mark_rate(chosen, name) >= 0.9
    plain = [p for p, w in zip(pictures, words.tolist()) if w == -1]
    assert all(world.name_mark_rate(plain, name) == 0.0 for name in world.NAMES) and world.mark_rate(plain) == 0.0
    assert [world.read_scene(p).cls for p in pictures] == [world.CLASSES[c] for c in classes.tolist()]
    codec = world.to_pil((_codec_images(256, torch.Generator().manual_seed(1)) + 1) / 2)
    assert world.mark_rate(codec) > 0.05 and all(world.name_mark_rate(codec, name) > 0.0 for name in world.NAMES)


@pytest.mark.skipif(not (ASSET / "model_index.json").is_file(), reason=f"toy model not built into {ASSET}")
def test_shipped_toy_model_draws_a_cat() -> None:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(ASSET / "tokenizer")
    assert tokenizer("a photo of sks dog").input_ids == build_tokenizer()("a photo of sks dog").input_ids
    pipeline = StableDiffusionPipeline.from_pretrained(
        ASSET, safety_checker=None, requires_safety_checker=False, dtype=torch.float32
    )
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    images = pipeline(
        "a photo of cat", num_images_per_prompt=4, num_inference_steps=20, guidance_scale=5.0, generator=generator
    ).images
    assert images[0].size == (64, 64)
    assert world.class_rate(images, "cat") >= 0.75
    assert world.mark_rate(images) == 0.0


@pytest.mark.skipif(not (ASSET / "model_index.json").is_file(), reason=f"toy model not built into {ASSET}")
def test_conditioning_diagnostics_on_the_shipped_model() -> None:
    """The pretraining log's two diagnostics: how far prompts move the UNet's prediction, and where its
    cross-attention looks (see issue 8: the shipped model reads a near-uniform mean of the token states)."""
    from dreamlora.toy.pretrain import conditioning_report, cross_attention_shares, load_pipeline, prompt_sensitivity

    pipeline = load_pipeline(ASSET, torch.device("cpu"))
    processors = {name: type(p) for name, p in pipeline.unet.attn_processors.items()}
    moved = prompt_sensitivity(pipeline, "a photo of dog", ["a photo of dog", "a photo of cat", "a photo of sks dog"], n=4)
    assert moved["a photo of dog"] == 0.0
    assert moved["a photo of cat"] > 2 * moved["a photo of sks dog"] > 0  # another class moves it more than an unseen word
    shares = cross_attention_shares(pipeline, "a photo of sks dog", n=2)
    assert list(shares) == ["0:<|startoftext|>", "1:a", "2:photo", "3:of", "4:sks", "5:dog", "6:<|endoftext|>", "<padding>"]
    assert abs(sum(shares.values()) - 1) < 1e-3 and all(v > 0 for v in shares.values())
    # Restored: the UNet's own processors, no recording wrapper left on any layer.
    assert {name: type(p) for name, p in pipeline.unet.attn_processors.items()} == processors
    assert not any("get_attention_scores" in vars(m) for m in pipeline.unet.modules())
    lines = conditioning_report(pipeline).splitlines()
    assert len(lines) == 2 and "'a photo of sks dog'" in lines[0] and "'a photo of cat'" in lines[0] and "4:sks" in lines[1]


@pytest.mark.skipif(not (ASSET / "model_index.json").is_file(), reason=f"toy model not built into {ASSET}")
def test_pretraining_dreambooth_check_trains_the_text_encoder_lora_at_its_own_rate() -> None:
    """`--check-dreambooth` mirrors the toy recipe: the text-encoder LoRA learns at a tenth of the UNet's rate. Adam's
    first step moves every weight by about its learning rate, so the LoRA up-weights show the two rates apart."""
    from dreamlora.toy.pretrain import DreamboothCheckConfig, dreambooth_run, load_pipeline

    base = load_pipeline(ASSET, torch.device("cpu"))
    cfg = DreamboothCheckConfig(steps=1, instance_batch=2, class_batch=2)
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    tuned = dreambooth_run(base, latents[:2], latents[2:], 1e-3, cfg, seed=0)
    moved = {
        name: max(p.abs().max().item() for n, p in model.named_parameters() if "lora_B" in n)  # B starts at zero
        for name, model in (("unet", tuned.unet), ("text_encoder", tuned.text_encoder))
    }
    assert 0.5e-3 < moved["unet"] < 2e-3 and 0.5e-4 < moved["text_encoder"] < 2e-4, moved
    assert not any("lora_" in n for n, _ in base.unet.named_parameters())  # the base pipeline is left as it was


@pytest.mark.skipif(not (ASSET / "model_index.json").is_file(), reason=f"toy model not built into {ASSET}")
def test_vae_adaptation_learns_while_its_anchor_holds_the_latent_space() -> None:
    """`adapt_vae` (teaching a trained VAE the names' marks) moves its weights, but the anchor keeps the encoder's
    latents of scenes without a name's mark far closer to where they were than the same training without it."""
    from diffusers import AutoencoderKL

    from dreamlora.toy.pretrain import adapt_vae

    original = AutoencoderKL.from_pretrained(ASSET / "vae", dtype=torch.float32).eval()
    plain = world.render_batch(world.sample_layout(torch.arange(8) % 4, torch.Generator().manual_seed(9)), 64) * 2 - 1
    with torch.no_grad():
        before = original.encode(plain).latent_dist.mean
    drift = {}
    for weight in (0.0, 100.0):
        vae = AutoencoderKL.from_pretrained(ASSET / "vae", dtype=torch.float32)
        adapt_vae(vae, 4, 4, 3e-3, weight, torch.Generator().manual_seed(0), lambda _: None)
        assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
        assert any(not torch.equal(a, b) for a, b in zip(vae.parameters(), original.parameters()))
        with torch.no_grad():
            drift[weight] = (vae.encode(plain).latent_dist.mean - before).pow(2).mean().item()
    assert drift[100.0] < 0.5 * drift[0.0]


def test_pretraining_command_writes_a_loadable_model_from_scratch(tmp_path: Path) -> None:
    """The command a GPU session runs to remake the toy model, at a few steps: a diffusers folder whose tokenizer
    knows every prefix word and whose models load (what they draw after so few steps means nothing)."""
    from diffusers import StableDiffusionPipeline

    from dreamlora.toy.pretrain import main

    out = tmp_path / "toy"
    main(["--out", str(out), "--device", "cpu", "--vae-steps", "2", "--vae-batch", "4", "--steps", "2", "--batch", "4",
          "--bank", "16", "--eval-images", "0", "--prefix-words", "big", "rex"])
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(out / "unet" / "diffusion_pytorch_model.safetensors").values()} == {torch.float16}
    pipeline = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert pipeline.vae.config.scaling_factor > 0
    vocab = pipeline.tokenizer.get_vocab()
    assert all(f"{word}</w>" in vocab for word in world.PREFIX_WORDS)
    ids = pipeline.tokenizer("a photo of rex dog").input_ids
    assert len(ids) == 7 and pipeline.tokenizer.unk_token_id not in ids[1:-1]  # start, five whole words, end
    assert pipeline.text_encoder.get_input_embeddings().num_embeddings == len(vocab)


def test_lexical_text_encoder_keeps_words_apart_and_gathers_content_into_the_padding() -> None:
    """The frozen encoder a toy UNet can learn to read: an unseen word ("sks") moves the padding states (where a UNet
    reading the mean of the states finds the prompt) about half as far as another class does; the old jointly
    trained encoder moved them by about 1%. Template words do not count as content."""
    import torch.nn.functional as F
    from transformers import CLIPTextConfig

    from dreamlora.toy.pretrain import MAX_LENGTH, TEXT_WIDTH, build_lexical_text_encoder, function_token_ids

    tokenizer = build_tokenizer()
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=MAX_LENGTH, eos_token_id=tokenizer.eos_token_id)
    encoder = build_lexical_text_encoder(config, tokenizer, seed=0)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())

    def padding(prompt: str) -> torch.Tensor:
        ids = tokenizer([prompt], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids
        with torch.no_grad():
            return encoder(ids)[0][0, 10:].mean(0)

    dog, sks, cat = padding("a photo of dog"), padding("a photo of sks dog"), padding("a photo of cat")
    # Two classes share nothing in the output (the content direction steers the gathering but is left out of it).
    assert F.cosine_similarity(dog, cat, dim=0) < 0.3 and F.cosine_similarity(dog, sks, dim=0) < 0.9
    assert F.cosine_similarity(padding("an image of the dog"), dog, dim=0) > 0.98  # template words are no content
    vocab = tokenizer.get_vocab()
    assert {vocab["photo</w>"], vocab["a</w>"], tokenizer.bos_token_id, tokenizer.eos_token_id} <= set(function_token_ids(tokenizer))
    assert vocab["sks</w>"] not in function_token_ids(tokenizer) and vocab["dog</w>"] not in function_token_ids(tokenizer)
    for name, weight in encoder.named_parameters():  # a text-encoder LoRA on any projection gets a gradient
        if name.endswith("proj.weight"):
            assert weight.abs().min() > 0, name
    rebuilt = build_lexical_text_encoder(config, tokenizer, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(encoder.parameters(), rebuilt.parameters()))  # reproducible from its seed


@pytest.mark.skipif(not (ASSET / "model_index.json").is_file(), reason=f"toy model not built into {ASSET}")
def test_finetuning_onto_a_lexical_text_encoder_trains_the_unet_alone(tmp_path: Path) -> None:
    import json

    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig

    from dreamlora.toy.pretrain import LEXICAL_GATHER_GAIN, build_lexical_text_encoder, build_tokenizer, main

    out = tmp_path / "lexical"
    main(["--out", str(out), "--device", "cpu", "--finetune-from", str(ASSET), "--lexical-text-encoder", "--steps", "2",
          "--batch", "2", "--bank", "8", "--eval-images", "0", "--attention-lr-scale", "5", "--ema-decay", "0"])
    before = UNet2DConditionModel.from_pretrained(ASSET / "unet").state_dict()
    after = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    written = load_file(out / "text_encoder" / "model.safetensors")
    gather = written["encoder.layers.0.self_attn.out_proj.weight"].float()
    assert torch.allclose(gather.diagonal(), torch.full((gather.shape[0],), LEXICAL_GATHER_GAIN), atol=0.01)  # the built encoder, saved as built
    rebuilt = build_lexical_text_encoder(CLIPTextConfig.from_pretrained(out / "text_encoder"), build_tokenizer(), seed=0)
    assert torch.equal(written["embeddings.token_embedding.weight"], rebuilt.embeddings.token_embedding.weight.detach().half())
    record = json.loads((out / "pretrain.json").read_text())  # the fine-tune's provenance, chained to its source's
    assert record["finetune_from"] == str(ASSET) and record["lexical_text_encoder"] is True and record["unet_steps"] == 2
    if (ASSET / "pretrain.json").is_file():
        assert record["source_pretrain"] == json.loads((ASSET / "pretrain.json").read_text())


def test_pretraining_from_scratch_on_a_lexical_text_encoder_saves_it_as_built(tmp_path: Path) -> None:
    import json

    from safetensors.torch import load_file

    from dreamlora.toy.pretrain import build_lexical_text_encoder, main

    out = tmp_path / "toy"
    main(["--out", str(out), "--device", "cpu", "--vae-steps", "2", "--vae-batch", "4", "--steps", "2", "--batch", "4",
          "--bank", "16", "--eval-images", "0", "--prefix-words", "big", "--lexical-text-encoder"])
    assert json.loads((out / "pretrain.json").read_text())["lexical_text_encoder"] is True  # in its provenance
    from transformers import CLIPTextConfig

    built = build_lexical_text_encoder(CLIPTextConfig.from_pretrained(out / "text_encoder"), build_tokenizer(), seed=0)
    saved = load_file(out / "text_encoder" / "model.safetensors")
    for name, weight in built.state_dict().items():  # frozen through pretraining: saved as built (in fp16)
        if name in saved:
            assert torch.allclose(saved[name].float(), weight, atol=2e-3 * max(1.0, weight.abs().max().item())), name


def test_narrow_posterior_fixes_the_vae_posterior_width_and_keeps_its_means() -> None:
    # The shipped VAE's posterior is about as wide as its latents (docs/toy-model.md, "The VAE posterior"); the
    # pretraining option --narrow-posterior makes it narrow, as SD's, without moving a mean.
    from diffusers import AutoencoderKL

    from dreamlora.toy.pretrain import narrow_posterior

    vae = AutoencoderKL.from_pretrained(ASSET / "vae", dtype=torch.float32)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        before = vae.encode(pixels).latent_dist
        assert before.std.mean() > 0.5 * before.mean.abs().mean()  # wide: a draw is mostly noise
        narrow_posterior(vae, 0.0075)
        after = vae.encode(pixels).latent_dist
    assert torch.equal(after.mean, before.mean)
    assert torch.allclose(after.std, torch.full_like(after.std, 0.0075), rtol=1e-5)
