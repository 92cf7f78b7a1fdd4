"""Pretraining of the toy Stable Diffusion model on the toy world, with its evaluation.

Run as `python -m dreamlora.toy.pretrain --out PATH --seed 0 --device cuda`. It trains an
AutoencoderKL on rendered scenes, then a cross-attention UNet jointly with a CLIP text
encoder trained from scratch on class prompts ("a photo of dog", ...), half of them with
a word before the class that changes the picture (`--prefix-words`: the size modifiers,
"a photo of big dog", and the names of individuals with their own marks, "a photo of rex
dog"), with empty-prompt dropout for classifier-free guidance, and saves an ordinary
diffusers folder in fp16. `--finetune-from FOLDER` continues the UNet and text encoder of
an existing toy folder instead of starting from scratch (VAE kept, or first taught the
names' marks with its latents anchored: `--adapt-vae-steps`). `--lexical-text-encoder`
uses a built, frozen text encoder that keeps words apart instead of a trained one, and
trains the UNet alone onto it (the shipped model was made so: its pretrain.json has the
commands; docs/toy-model.md has what it gave).
It then reports how often each class prompt draws its class (read back with
`world.read_scene`) and, with `--check-dreambooth`, whether a quick DreamBooth-LoRA run
teaches "sks dog" the yellow mark. The rare token "sks" is in the vocabulary but never
in a pretraining prompt.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dreamlora.toy import world

logger = logging.getLogger(__name__)

TEMPLATES: tuple[str, ...] = (
    "a photo of {}",
    "a photo of a {}",
    "a picture of a {}",
    "an image of a {}",
    "a {}",
    "{}",
)
EXTRA_WORDS: tuple[str, ...] = ("photo", "picture", "image", "of", "a", "an", "the", "in", "with")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 32
RESOLUTION = 64
LATENT_SIZE = 16
TEXT_WIDTH = 128


@dataclass(frozen=True)
class PretrainConfig:
    """Steps, batch sizes and learning rates of both pretraining phases."""

    seed: int = 0
    vae_steps: int = 2000
    vae_batch: int = 384
    vae_lr: float = 1.5e-3
    vae_kl_weight: float = 1e-6
    vae_seconds: float | None = None
    """Wall-clock cap for the VAE phase: steps are cut to fit after a speed estimate."""
    bank_size: int = 131072
    """Scenes rendered and VAE-encoded once for the UNet phase (each also seen mirrored)."""
    unet_steps: int = 12000
    unet_batch: int = 512
    unet_lr: float = 5e-4
    unet_seconds: float | None = None
    """Wall-clock cap for the UNet phase, as for the VAE."""
    empty_prompt_rate: float = 0.1
    modifier_rate: float = 0.5
    """Share of UNet-phase scenes drawn with a word before the class (one of `prefix_words`) in their prompt."""
    prefix_words: tuple[str, ...] = world.PREFIX_WORDS
    """The size modifiers and names (world.PREFIX_WORDS) those scenes draw from."""
    ema_decay: float = 0.999
    warmup_steps: int = 100
    attention_lr_scale: float = 1.0
    """Learning-rate multiplier for the UNet's cross-attention queries and keys (which words it looks at)."""
    lexical_text_encoder: bool = False
    """Use a built, frozen `build_lexical_text_encoder` and train the UNet alone (docs/toy-model.md)."""


@dataclass(frozen=True)
class DreamboothCheckConfig:
    """The quick DreamBooth-LoRA fine-tune run after pretraining."""

    learning_rates: tuple[float, ...] = (3e-4, 1e-3)
    text_encoder_lr_scale: float = 0.1  # the text-encoder LoRA's rate relative to the UNet's, as the toy recipe
    steps: int = 400
    rank: int = 8
    alpha: float = 8.0
    instance_batch: int = 4
    class_batch: int = 4
    class_images: int = 64
    prior_weight: float = 1.0
    instance_prompt: str = "a photo of sks dog"
    class_prompt: str = "a photo of dog"


def vocabulary_words() -> list[str]:
    """Every word the tokenizer keeps whole: template words, class names, the rare token, then
    the modifier words and names (appended last, so the first toy model's token ids stay valid)."""
    words = function_words() | set(world.CLASSES) | {world.INSTANCE_TOKEN}
    return sorted(words) + [word for word in world.PREFIX_WORDS if word not in words]


def function_words() -> set[str]:
    """The words of the prompt templates and the extra words: none of them says what to draw."""
    return {word for template in TEMPLATES for word in template.format("").split()} | set(EXTRA_WORDS)


def build_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP BPE vocabulary and merges: specials, printable characters, then whole words.

    Every printable ASCII character is a token with and without the end-of-word suffix,
    so any ASCII prompt tokenizes to known ids; each listed word is built by a chain of
    left-to-right merges and ends as one token.
    """
    tokens = [BOS, EOS]
    characters = [chr(code) for code in range(33, 127)]
    tokens += characters + [c + "</w>" for c in characters]
    merges: list[tuple[str, str]] = []
    for word in vocabulary_words():
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for piece in pieces[1:]:
            if (left, piece) not in merges:
                merges.append((left, piece))
            left += piece
            if left not in tokens:
                tokens.append(left)
    return {token: i for i, token in enumerate(tokens)}, merges


def build_tokenizer() -> CLIPTokenizer:
    """The toy CLIP tokenizer; checks that every vocabulary word is a single known token."""
    vocab, merges = build_vocabulary()
    # transformers 5 ignores vocab_file=/merges_file=; the in-memory vocab= and merges= are honoured.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)
    for word in vocabulary_words():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if ids != [vocab[word + "</w>"]]:
            raise RuntimeError(f"toy tokenizer splits {word!r} into {ids}")
    return tokenizer


def build_models(vocab_size: int, tokenizer: CLIPTokenizer) -> tuple[AutoencoderKL, UNet2DConditionModel, CLIPTextModel]:
    """Fresh VAE (64x64 -> 16x16x4), UNet with cross-attention, and CLIP text encoder."""
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=RESOLUTION,
    )
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=32,
    )
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return vae, unet, CLIPTextModel(text_config)


LEXICAL_POSITION_SCALE = 5.0
"""Position embeddings of the lexical encoder: 5x the usual init (std 0.1), a tenth of a word's (std 1)."""
LEXICAL_CONTENT_NORM = TEXT_WIDTH**0.5
"""Length of the direction every content word's embedding shares: that of a word's own part (~sqrt(width))."""


def function_token_ids(tokenizer: CLIPTokenizer) -> list[int]:
    """Ids of the tokens that carry no content: start, end and the template words ("a", "photo", "of", ...)."""
    vocab = tokenizer.get_vocab()
    return sorted({vocab[BOS], vocab[EOS], *(vocab[f"{word}</w>"] for word in function_words())})


LEXICAL_CONTENT_DIMS = 8
"""The content direction lives on the first dims of the residual stream, which the final layer norm then drops."""
LEXICAL_GATHER_GAIN = 3.0
"""How strongly the lexical encoder's first layer adds the bag of content words to each state (vs. its own word)."""
LEXICAL_GATHER_SHARPNESS = 4.0
"""Query length of that layer's content-seeking attention: content words get e^~6 times a function word's weight."""


def build_lexical_text_encoder(config: CLIPTextConfig, tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModel:
    """A CLIP text encoder that keeps words apart, to be frozen while the UNet learns to read it.

    A text encoder trained jointly with the UNet on class prompts learns that only the class
    word matters: it maps "sks dog" and "dog" to states whose cosine is 0.99, and the UNet
    reads a near-uniform mean of them (three quarters of it the padding after the prompt),
    so DreamBooth cannot bind a new word apart from its class (docs/toy-model.md). This one
    is built, not trained. Every token gets a random embedding of unit variance (different
    words are near-orthogonal), and every token except the function words
    (`function_token_ids`: start, end, "a", "photo", "of", ...) also a shared content
    direction, as a language model tells a noun from a stop word without knowing the noun (on
    `LEXICAL_CONTENT_DIMS` dims of its own, which the final layer norm zeroes: it steers the
    gathering below but is not in the output); position embeddings are a tenth of a word's. The first layer's attention seeks the
    content words (its keys read the content direction, its query is constant) and adds
    their mean, `LEXICAL_GATHER_GAIN` times over, to every later position: like CLIP's end
    token, the padding then carries the bag of the prompt's content words ("sks dog": half
    "sks", half "dog"), where a UNet reading the mean of the states finds it. The other
    weights are the usual random init with their residual branches damped (attention output
    1/4, MLP output 1/2). An unseen word ("sks") is a content word in a new direction, which
    a LoRA can bind apart from the class. Every weight a LoRA targets stays non-zero, so a
    text-encoder LoRA still receives gradients.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the layers' own init is seeded too, without touching the caller's RNG
        torch.manual_seed(seed)
        model = CLIPTextModel(config).float()
    width, heads = config.hidden_size, config.num_attention_heads
    head_dim = width // heads
    with torch.no_grad():
        tokens = model.embeddings.token_embedding.weight
        tokens.copy_(torch.randn(tokens.shape, generator=generator))
        content = torch.zeros(width)
        content[:LEXICAL_CONTENT_DIMS] = LEXICAL_CONTENT_DIMS**-0.5  # a unit vector on the first dims only
        tokens -= torch.outer(tokens @ content, content)  # a word's own part says nothing along the content direction
        is_content = torch.ones(tokens.shape[0], dtype=torch.bool)
        is_content[function_token_ids(tokenizer)] = False
        tokens[is_content] += LEXICAL_CONTENT_NORM * content
        model.embeddings.position_embedding.weight.mul_(LEXICAL_POSITION_SCALE)
        for layer in model.encoder.layers:
            layer.self_attn.out_proj.weight.mul_(0.25)
            layer.mlp.fc2.weight.mul_(0.5)
        gather = model.encoder.layers[0].self_attn
        seek = torch.zeros(head_dim)
        seek[0] = 1.0  # every head: key = (content . state) along its first axis; query = a constant along it
        noise = 1e-3 * torch.randn((width, width), generator=generator)  # non-zero everywhere, for a LoRA's gradient
        gather.q_proj.weight.copy_(noise)
        gather.q_proj.bias.copy_((LEXICAL_GATHER_SHARPNESS * seek).repeat(heads))
        gather.k_proj.weight.copy_(torch.outer(seek.repeat(heads), content) + noise.roll(1, 0))
        gather.k_proj.bias.zero_()
        gather.v_proj.weight.copy_(torch.eye(width) + noise.roll(2, 0))
        gather.v_proj.bias.zero_()
        gather.out_proj.weight.copy_(LEXICAL_GATHER_GAIN * torch.eye(width) + noise.roll(3, 0))
        gather.out_proj.bias.zero_()
        # The output leaves the content direction out: shared by every content word and by the padding's bag, it
        # would make all prompts' states nearly collinear, and a LoRA reading them would change every prompt alike.
        model.final_layer_norm.weight[:LEXICAL_CONTENT_DIMS] = 0.0
        model.final_layer_norm.bias[:LEXICAL_CONTENT_DIMS] = 0.0
    return model.eval().requires_grad_(False)


def build_noise_scheduler() -> DDPMScheduler:
    """Stable Diffusion 1.x's training schedule: 1000 steps, scaled-linear betas, epsilon."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def _random_images(batch: int, generator: torch.Generator, marked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random scenes in [-1, 1] and their class indices."""
    classes = torch.randint(len(world.CLASSES), (batch,), generator=generator, device=generator.device)
    images = world.render_batch(world.sample_layout(classes, generator, marked), RESOLUTION)
    return images * 2 - 1, classes


def _random_words(batch: int, generator: torch.Generator, rate: float, words: Sequence[str]) -> torch.Tensor:
    """(batch,) indices into world.PREFIX_WORDS, each one of `words` at random, or -1 (no word) for a `1 - rate` share."""
    device = generator.device
    allowed = torch.tensor([world.modifier_index(word) for word in words], device=device, dtype=torch.long)
    chosen = allowed[torch.randint(len(allowed), (batch,), generator=generator, device=device)]
    plain = torch.rand(batch, generator=generator, device=device) >= rate
    return torch.where(plain, torch.full_like(chosen, -1), chosen)


def _modified_images(
    batch: int, generator: torch.Generator, rate: float, words: Sequence[str] = world.PREFIX_WORDS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random scenes in [-1, 1], their class indices and indices into world.PREFIX_WORDS of the word
    before the class (one of `words`; -1: none, a `1 - rate` share)."""
    classes = torch.randint(len(world.CLASSES), (batch,), generator=generator, device=generator.device)
    modifiers = _random_words(batch, generator, rate, words)
    layout = world.sample_layout(classes, generator, False, modifiers)
    return world.render_batch(layout, RESOLUTION) * 2 - 1, layout.classes, modifiers


def _codec_images(
    batch: int, generator: torch.Generator, recolour_rate: float = 0.3, marked_class: str | None = None
) -> torch.Tensor:
    """Scenes for the VAE, in [-1, 1]: beyond the class scenes, marked objects (half of them
    with the yellow mark, half with a name's) and objects of any hue, so the codec keeps
    colours (the mark's yellow above all) the diffusion model has yet to learn."""
    device = generator.device
    classes = torch.randint(len(world.CLASSES), (batch,), generator=generator, device=device)
    marked = torch.rand(batch, generator=generator, device=device) < 0.4
    names = None
    if marked_class is not None:
        marked &= classes == world.class_index(marked_class)
    else:  # half the marks are a name's (sample_layout paints those, yellow the rest)
        names = torch.where(marked, _random_words(batch, generator, 0.5, tuple(world.NAMES)), -1)
    layout = world.sample_layout(classes, generator, marked, names)
    hue = torch.rand(batch, generator=generator, device=device)
    saturation = 0.6 + 0.4 * torch.rand(batch, generator=generator, device=device)
    value = 0.5 + 0.5 * torch.rand(batch, generator=generator, device=device)
    vivid = world.hsv_to_rgb(hue, saturation, value)
    recolour = torch.rand(batch, generator=generator, device=device) < recolour_rate
    layout = replace(layout, colour=torch.where(recolour[:, None], vivid, layout.colour))
    return world.render_batch(layout, RESOLUTION) * 2 - 1


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _fit_steps(step: int, total: int, elapsed: float, budget: float | None, log: Callable[[str], None]) -> int:
    """After `step` steps in `elapsed` seconds, the total that fits `budget` seconds (never more than `total`)."""
    if budget is None:
        return total
    affordable = max(int(step / elapsed * budget), step + 1)
    if affordable < total:
        log(f"{step / elapsed:.1f} steps/s: capping to {affordable} steps to fit {budget:.0f}s")
        return affordable
    return total


def train_vae(vae: AutoencoderKL, cfg: PretrainConfig, generator: torch.Generator, log: Callable[[str], None]) -> None:
    """Reconstruction (MSE + L1) with a small KL term; sets `scaling_factor` from the latent std."""
    device = generator.device
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0, fused=device.type == "cuda")
    vae.train()
    total, start, step = cfg.vae_steps, time.perf_counter(), 0
    while step < total:
        for group in optimizer.param_groups:
            group["lr"] = cfg.vae_lr * _lr_factor(step, total, cfg.warmup_steps)
        images = _codec_images(cfg.vae_batch, generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            posterior = vae.encode(images).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(
                posterior.mean.shape, generator=generator, device=device
            )
            reconstruction = vae.decode(latents).sample.float()
        kl = posterior.kl().mean()
        loss = F.mse_loss(reconstruction, images) + 0.1 * F.l1_loss(reconstruction, images) + cfg.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step == 100:
            total = _fit_steps(step, total, time.perf_counter() - start, cfg.vae_seconds, log)
        if step % 250 == 0 or step == total:
            log(f"vae step {step}/{total} loss {loss.item():.5f} kl {kl.item():.1f} ({time.perf_counter() - start:.0f}s)")
    vae.eval()
    with torch.no_grad():
        images, _ = _random_images(min(512, 8 * cfg.vae_batch), generator)  # for the latent std
        latents = vae.encode(images).latent_dist.mean
        error = F.mse_loss(vae.decode(latents).sample, images).item()
        marked = world.render_batch(world.sample_layout(["dog"] * min(64, cfg.vae_batch), generator, True), RESOLUTION) * 2 - 1
        rebuilt = world.to_pil((vae.decode(vae.encode(marked).latent_dist.mean).sample + 1) / 2)
    scaling = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling)
    log(f"vae done: reconstruction mse {error:.5f}, latent std {1 / scaling:.3f}, scaling_factor {scaling:.4f}; "
        f"marked dogs rebuilt: dog {world.class_rate(rebuilt, 'dog'):.2f}, mark {world.mark_rate(rebuilt):.2f}")


def refine_decoder(
    vae: AutoencoderKL, steps: int, batch: int, lr: float, generator: torch.Generator, log: Callable[[str], None]
) -> None:
    """Train only the decoder on class scenes (40% of dogs marked), the encoder (and so the latent space) frozen.

    Repairs a VAE whose decoder never saw the mark's yellow without touching the latents
    the UNet was trained on. No other hues or marked classes: an encoder that never saw
    them maps them near the class colours, and the decoder would then paint them there.
    """
    vae.requires_grad_(False)
    trained = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    vae.decoder.train()
    for step in range(steps):
        images = _codec_images(batch, generator, recolour_rate=0.0, marked_class=world.INSTANCE_CLASS)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mean
        reconstruction = vae.decode(latents).sample
        loss = F.mse_loss(reconstruction, images) + 0.1 * F.l1_loss(reconstruction, images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"decoder step {step}/{steps} loss {loss.item():.5f}")
    vae.eval()
    vae.requires_grad_(False)


def adapt_vae(
    vae: AutoencoderKL, steps: int, batch: int, lr: float, anchor_weight: float, generator: torch.Generator,
    log: Callable[[str], None],
) -> None:
    """Teach a trained VAE the names' marks (world.NAMES) without moving the latents a UNet was trained on.

    Encoder and decoder learn to rebuild scenes with every mark colour; an anchor term
    keeps the encoder's means on scenes without a name's mark (class scenes, yellow-marked
    objects) where the frozen original put them, so the UNet's latent space stays valid.
    """
    device = generator.device
    reference = copy.deepcopy(vae).requires_grad_(False).eval()
    vae.requires_grad_(True)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        modifiers = _random_words(batch, generator, 0.5, tuple(world.NAMES))
        named = modifiers >= 0
        classes = torch.randint(len(world.CLASSES), (batch,), generator=generator, device=device)
        yellow = ~named & (torch.rand(batch, generator=generator, device=device) < 0.3)
        layout = world.sample_layout(classes, generator, yellow, modifiers)
        images = world.render_batch(layout, RESOLUTION) * 2 - 1
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.mean).sample
        with torch.no_grad():
            anchor = reference.encode(images).latent_dist.mean
        keep = (~named).float()[:, None, None, None]
        scale = vae.config.scaling_factor  # in units of the latent std the UNet sees
        drift = (((posterior.mean - anchor) * scale) ** 2 * keep).sum() / keep.sum().clamp(min=1) / anchor[0].numel()
        loss = F.mse_loss(reconstruction, images) + 0.1 * F.l1_loss(reconstruction, images) + anchor_weight * drift
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae adapt step {step}/{steps} loss {loss.item():.5f} latent drift {drift.item():.5f}")
    vae.eval()
    vae.requires_grad_(False)


def narrow_posterior(vae: AutoencoderKL, std: float) -> None:
    """Fix the encoder's posterior standard deviation at `std` for every latent (the log-variance half of quant_conv
    becomes a constant); means and decoder are unchanged, so are generated images.

    The VAE is trained with a tiny KL weight, so its posterior stays about as wide as the latents themselves (std 0.54
    against a mean of 0.44 on the sample photos), while the UNet learns from posterior means. `dreamlora train` draws
    latents from the posterior, as diffusers and kohya do, so a toy LoRA learns the posterior's noise. SD's VAE
    posterior is narrow next to its latents; this makes the toy's so too. Not applied to the shipped model: at the toy
    recipe its DreamBooth runs then stop binding the subject (docs/toy-model.md, "The VAE posterior")."""
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:] = 0
        vae.quant_conv.bias[channels:] = 2 * math.log(std)


def prompt_table(tokenizer: CLIPTokenizer, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (classes, 1 + prefix words, templates, MAX_LENGTH) of every prompt, plus the empty prompt.

    Row 0 of the second axis is the plain class prompt ("a photo of dog"), row 1 + m the
    prompt with world.PREFIX_WORDS[m] before the class word ("a photo of big dog").
    """
    rows = []
    for cls in world.CLASSES:
        per_modifier = []
        for subject in (cls, *(f"{word} {cls}" for word in world.PREFIX_WORDS)):
            prompts = [template.format(subject) for template in TEMPLATES]
            per_modifier.append(
                tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids
            )
        rows.append(torch.stack(per_modifier))
    empty = tokenizer([""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids
    return torch.stack(rows).to(device), empty[0].to(device)


def _sample_prompts(
    classes: torch.Tensor,
    modifiers: torch.Tensor,
    table: torch.Tensor,
    empty: torch.Tensor,
    rate: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """One random template per scene's class and modifier; a `rate` share replaced by the empty prompt."""
    device = generator.device
    templates = torch.randint(table.shape[2], classes.shape, generator=generator, device=device)
    ids = table[classes, modifiers + 1, templates]
    drop = torch.rand(classes.shape, generator=generator, device=device) < rate
    return torch.where(drop[:, None], empty[None], ids)


def encode_bank(
    vae: AutoencoderKL, size: int, modifier_rate: float, generator: torch.Generator,
    words: Sequence[str] = world.PREFIX_WORDS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scaled latents (size, 4, 16, 16) of `size` random scenes, their class and prefix-word indices."""
    latents, classes, modifiers = [], [], []
    chunk = 2048 if generator.device.type == "cuda" else 256
    with torch.no_grad(), torch.autocast(generator.device.type, dtype=torch.bfloat16, enabled=generator.device.type == "cuda"):
        for start in range(0, size, chunk):
            images, index, modifier = _modified_images(min(chunk, size - start), generator, modifier_rate, words)
            latents.append(vae.encode(images).latent_dist.mean.float() * vae.config.scaling_factor)
            classes.append(index)
            modifiers.append(modifier)
    return torch.cat(latents), torch.cat(classes), torch.cat(modifiers)


def _ema_update(ema: Sequence[torch.Tensor], live: Sequence[torch.Tensor], decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(list(ema), list(live), 1.0 - decay)


def train_denoiser(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    vae: AutoencoderKL,
    tokenizer: CLIPTokenizer,
    cfg: PretrainConfig,
    generator: torch.Generator,
    log: Callable[[str], None],
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Joint epsilon-prediction training of UNet and text encoder (or of the UNet alone, the text encoder frozen:
    `cfg.lexical_text_encoder`); returns their EMA copies (the frozen text encoder itself)."""
    train_text_encoder = not cfg.lexical_text_encoder
    device = generator.device
    scheduler = build_noise_scheduler()
    alphas = scheduler.alphas_cumprod.to(device)
    table, empty = prompt_table(tokenizer, device)
    models = [unet, text_encoder] if train_text_encoder else [unet]
    params = [p for m in models for p in m.parameters()]
    ema_models = [copy.deepcopy(m).requires_grad_(False) for m in models]
    ema_params = [p for m in ema_models for p in m.parameters()]
    looking = {id(p) for n, p in unet.named_parameters() if ".attn2.to_q." in n or ".attn2.to_k." in n}
    groups = [
        {"params": [p for p in params if id(p) not in looking], "scale": 1.0},
        {"params": [p for p in params if id(p) in looking], "scale": cfg.attention_lr_scale},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.unet_lr, weight_decay=1e-2, fused=device.type == "cuda")
    bank, bank_classes, bank_modifiers = encode_bank(vae, cfg.bank_size, cfg.modifier_rate, generator, cfg.prefix_words)
    log(f"latent bank: {tuple(bank.shape)}, std {bank.std().item():.3f}")
    total, start = cfg.unet_steps, time.perf_counter()
    for m in models:
        m.train()
    step = 0
    while step < total:
        for group in optimizer.param_groups:
            group["lr"] = cfg.unet_lr * group["scale"] * _lr_factor(step, total, cfg.warmup_steps)
        with torch.no_grad():
            pick = torch.randint(len(bank), (cfg.unet_batch,), generator=generator, device=device)
            latents, classes, modifiers = bank[pick], bank_classes[pick], bank_modifiers[pick]
            flip = torch.rand(len(pick), generator=generator, device=device) < 0.5
            latents = torch.where(flip[:, None, None, None], latents.flip(-1), latents)
            ids = _sample_prompts(classes, modifiers, table, empty, cfg.empty_prompt_rate, generator)
            noise = torch.randn(latents.shape, generator=generator, device=device)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=device)
            a = alphas[t][:, None, None, None]
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            with torch.set_grad_enabled(train_text_encoder):
                hidden = text_encoder(ids)[0]
            prediction = unet(noisy, t, encoder_hidden_states=hidden).sample.float()
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        _ema_update(ema_params, params, cfg.ema_decay if step > cfg.warmup_steps else 0.0)
        step += 1
        if step == 100:
            # Fit the planned steps into the time budget; the learning-rate schedule follows.
            total = _fit_steps(step, total, time.perf_counter() - start, cfg.unet_seconds, log)
        if step % (500 if device.type == "cuda" else 100) == 0 or step == total:
            log(f"unet step {step}/{total} loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
    for m in ema_models:
        m.eval()
    return ema_models[0], (ema_models[1] if train_text_encoder else text_encoder.eval())


def save_pipeline(
    out: Path,
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
) -> None:
    """Write a diffusers folder with fp16 safetensors weights and no safety checker."""
    pipeline = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).to("cpu", torch.float16),
        text_encoder=copy.deepcopy(text_encoder).to("cpu", torch.float16),
        tokenizer=tokenizer,
        unet=copy.deepcopy(unet).to("cpu", torch.float16),
        scheduler=build_noise_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; vocab.json and merges.txt serve older loaders too.
    vocab, merges = build_vocabulary()
    (out / "tokenizer" / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (out / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def load_pipeline(path: Path, device: torch.device) -> StableDiffusionPipeline:
    """The saved toy pipeline in fp32 on `device`, with DPM-Solver++ for sampling."""
    pipeline = StableDiffusionPipeline.from_pretrained(
        path, safety_checker=None, requires_safety_checker=False, dtype=torch.float32
    )
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def sample(pipeline: StableDiffusionPipeline, prompt: str, n: int, seed: int, guidance: float = 5.0) -> list:
    """`n` PIL images for one prompt, 20 DPM-Solver++ steps, reproducible from `seed`."""
    generator = torch.Generator(pipeline.device).manual_seed(seed)
    return pipeline(
        prompt, num_images_per_prompt=n, num_inference_steps=20, guidance_scale=guidance, generator=generator
    ).images


def _known_prefix_words(tokenizer: CLIPTokenizer) -> list[str]:
    """The world.PREFIX_WORDS that a model's tokenizer keeps whole (older toy models lack some)."""
    known = set(tokenizer.get_vocab())
    return [word for word in world.PREFIX_WORDS if f"{word}</w>" in known]


def evaluate(pipeline: StableDiffusionPipeline, n: int, seed: int) -> dict[str, dict[str, float]]:
    """Class rate (colour, and colour plus shape), mark rate and object size for each "a photo of {class}",
    for "a photo of sks dog" and for the instance class with each modifier word."""
    table = {}
    for i, cls in enumerate(world.CLASSES):
        table[f"a photo of {cls}"] = _scores(sample(pipeline, f"a photo of {cls}", n, seed + i), cls)
    rare = f"a photo of {world.INSTANCE_TOKEN} {world.INSTANCE_CLASS}"
    table[rare] = {**_scores(sample(pipeline, rare, n, seed + 10), world.INSTANCE_CLASS), "shape_rate": float("nan")}
    for word in _known_prefix_words(pipeline.tokenizer):
        cls = world.INSTANCE_CLASS if world.NAMES.get(word) != world.INSTANCE_CLASS else "cat"
        prompt = f"a photo of {word} {cls}"
        table[prompt] = _scores(sample(pipeline, prompt, n, seed + 30), cls, word if word in world.NAMES else None)
    return table


CONDITIONING_TIMESTEPS = (800, 500, 200)


def _context(pipeline: StableDiffusionPipeline, prompt: str) -> torch.Tensor:
    """The text encoder's last hidden states for one prompt, padded as the pipeline pads it, in the UNet's dtype."""
    from dreamlora.models import tokenize

    with torch.no_grad():
        return pipeline.text_encoder(tokenize(pipeline.tokenizer, [prompt]).to(pipeline.device))[0].to(pipeline.unet.dtype)


def _noisy_latents(pipeline: StableDiffusionPipeline, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same `n` random latents noised to each of CONDITIONING_TIMESTEPS: (noisy latents, timesteps) per timestep."""
    generator = torch.Generator().manual_seed(seed)
    shape = (n, pipeline.unet.config.in_channels, LATENT_SIZE, LATENT_SIZE)
    clean, noise = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    scheduler = build_noise_scheduler()
    batches = []
    for t in CONDITIONING_TIMESTEPS:
        timesteps = torch.full((n,), t, dtype=torch.long)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        batches.append((noisy.to(pipeline.device, pipeline.unet.dtype), timesteps.to(pipeline.device)))
    return batches


def prompt_sensitivity(pipeline: StableDiffusionPipeline, reference: str, prompts: Sequence[str], n: int = 16, seed: int = 0) -> dict[str, float]:
    """How far each prompt moves the UNet's noise prediction from the reference prompt's, on the same noisy latents:
    ||eps(prompt) - eps(reference)|| / ||eps(reference)||, averaged over CONDITIONING_TIMESTEPS.

    A model that DreamBooth can teach "sks" apart from "dog" must react to words besides the class: compare the
    figure for "a photo of sks dog" (an unseen word) with those for a modifier word and for another class.
    """
    unet = pipeline.unet
    contexts = {p: _context(pipeline, p) for p in (reference, *prompts)}
    totals = dict.fromkeys(prompts, 0.0)
    with torch.no_grad():
        for noisy, timesteps in _noisy_latents(pipeline, n, seed):
            base = unet(noisy, timesteps, encoder_hidden_states=contexts[reference].expand(n, -1, -1)).sample.float()
            for prompt in prompts:
                moved = unet(noisy, timesteps, encoder_hidden_states=contexts[prompt].expand(n, -1, -1)).sample.float()
                totals[prompt] += ((moved - base).norm() / base.norm()).item() / len(CONDITIONING_TIMESTEPS)
    return totals


def cross_attention_shares(pipeline: StableDiffusionPipeline, prompt: str, n: int = 8, seed: int = 0) -> dict[str, float]:
    """Share of the UNet's cross-attention each token of `prompt` receives (averaged over layers, heads, pixels, the
    CONDITIONING_TIMESTEPS), and "<padding>": everything after the prompt's end token. Uniform attention (every
    token ~1/length) means the UNet reads a mean of the token states rather than looking at single words."""
    from diffusers.models.attention_processor import AttnProcessor

    unet, tokenizer = pipeline.unet, pipeline.tokenizer
    saved = unet.attn_processors
    recorded: list[torch.Tensor] = []
    layers = [module for name, module in unet.named_modules() if name.endswith("attn2")]
    for layer in layers:
        original = layer.get_attention_scores

        def recording(*args: object, _original: Callable = original, **kwargs: object) -> torch.Tensor:
            probs = _original(*args, **kwargs)
            recorded.append(probs.float().mean(dim=(0, 1)))  # (tokens,)
            return probs

        layer.get_attention_scores = recording
    try:
        unet.set_attn_processor(AttnProcessor())  # the processor that forms the attention matrix explicitly
        context = _context(pipeline, prompt)
        with torch.no_grad():
            for noisy, timesteps in _noisy_latents(pipeline, n, seed):
                unet(noisy, timesteps, encoder_hidden_states=context.expand(n, -1, -1))
    finally:
        for layer in layers:
            del layer.get_attention_scores
        unet.set_attn_processor(saved)
    mean = torch.stack(recorded).mean(dim=0)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt).input_ids)  # start, the words, end
    shares = {f"{i}:{token.replace('</w>', '')}": mean[i].item() for i, token in enumerate(tokens)}
    shares["<padding>"] = mean[len(tokens):].sum().item()
    return shares


def conditioning_report(pipeline: StableDiffusionPipeline, seed: int = 0) -> str:
    """Two lines for the pretraining log: prompt sensitivity and the cross-attention spread."""
    reference = f"a photo of {world.INSTANCE_CLASS}"
    others = [c for c in world.CLASSES if c != world.INSTANCE_CLASS][:1]
    words = _known_prefix_words(pipeline.tokenizer)
    prompts = [f"a photo of {world.INSTANCE_TOKEN} {world.INSTANCE_CLASS}", *(f"a photo of {w} {world.INSTANCE_CLASS}" for w in words), *(f"a photo of {c}" for c in others)]
    moved = prompt_sensitivity(pipeline, reference, prompts, seed=seed)
    shares = cross_attention_shares(pipeline, prompts[0], seed=seed)
    return "\n".join([
        f"prediction moved from {reference!r} by: " + ", ".join(f"{p!r} {v:.1%}" for p, v in moved.items()),
        f"cross-attention on {prompts[0]!r}: " + ", ".join(f"{token} {v:.1%}" for token, v in shares.items()),
    ])


def _scores(images: list, cls: str, name: str | None = None) -> dict[str, float]:
    return {
        "class_rate": world.class_rate(images, cls),
        "shape_rate": world.class_rate(images, cls, require_shape=True),
        "mark_rate": world.mark_rate(images),
        "name_mark": world.name_mark_rate(images, name) if name else float("nan"),
        "size": _mean_size(images),
    }


def _mean_size(images: list) -> float:
    """Mean share of the canvas covered by the object."""
    return sum(world.read_scene(image).object_fraction for image in images) / max(len(images), 1)


def _encode(vae: AutoencoderKL, images: list, device: torch.device) -> torch.Tensor:
    """Scaled VAE means of PIL images and of their mirror images."""
    batch = torch.stack([torch.from_numpy(world.image_to_array(im)).permute(2, 0, 1) for im in images]).to(device)
    batch = torch.cat([batch, batch.flip(-1)]) * 2 - 1
    with torch.no_grad():
        return vae.encode(batch).latent_dist.mean * vae.config.scaling_factor


def _attach_lora(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, cfg: DreamboothCheckConfig) -> tuple[list, list]:
    """Inject LoRA into UNet attention and text-encoder attention; returns the trainable parameters of each."""
    from peft import LoraConfig, inject_adapter_in_model

    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    for model, targets in (
        (unet, ["to_q", "to_k", "to_v", "to_out.0"]),
        (text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"]),
    ):
        config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian", target_modules=targets)
        inject_adapter_in_model(config, model)
    return tuple([p for n, p in m.named_parameters() if "lora_" in n] for m in (unet, text_encoder))


def dreambooth_run(
    base: StableDiffusionPipeline,
    instance_latents: torch.Tensor,
    class_latents: torch.Tensor,
    lr: float,
    cfg: DreamboothCheckConfig,
    seed: int,
) -> StableDiffusionPipeline:
    """Fine-tune LoRA copies of the base UNet and text encoder; returns a pipeline using them."""
    device = base.device
    generator = torch.Generator(device).manual_seed(seed)
    unet, text_encoder = copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder)
    unet_params, text_params = _attach_lora(unet, text_encoder, cfg)
    groups = [{"params": unet_params, "lr": lr}, {"params": text_params, "lr": lr * cfg.text_encoder_lr_scale}]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=1e-2)
    tokens = base.tokenizer(
        [cfg.instance_prompt] * cfg.instance_batch + [cfg.class_prompt] * cfg.class_batch,
        padding="max_length", max_length=MAX_LENGTH, return_tensors="pt",
    ).input_ids.to(device)
    alphas = base.scheduler.alphas_cumprod.to(device)
    unet.train()
    text_encoder.train()
    for _ in range(cfg.steps):
        pick_i = torch.randint(len(instance_latents), (cfg.instance_batch,), generator=generator, device=device)
        pick_c = torch.randint(len(class_latents), (cfg.class_batch,), generator=generator, device=device)
        latents = torch.cat([instance_latents[pick_i], class_latents[pick_c]])
        noise = torch.randn(latents.shape, generator=generator, device=device)
        t = torch.randint(0, 1000, (latents.shape[0],), generator=generator, device=device)
        a = alphas[t][:, None, None, None]
        prediction = unet(a.sqrt() * latents + (1 - a).sqrt() * noise, t, text_encoder(tokens)[0]).sample
        error = ((prediction - noise) ** 2).mean(dim=(1, 2, 3))
        loss = error[: cfg.instance_batch].mean() + cfg.prior_weight * error[cfg.instance_batch :].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    unet.eval()
    text_encoder.eval()
    return StableDiffusionPipeline(
        vae=base.vae, text_encoder=text_encoder, tokenizer=base.tokenizer, unet=unet, scheduler=base.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def check_dreambooth(
    base: StableDiffusionPipeline, cfg: DreamboothCheckConfig, n: int, seed: int, log: Callable[[str], None]
) -> dict[str, dict[str, float]]:
    """DreamBooth-LoRA with prior preservation at each learning rate; mark and class rates after."""
    photos = world.instance_photos(6, seed=0)  # the shipped samples/dog photos
    class_images = sample(base, cfg.class_prompt, cfg.class_images, seed + 100)
    log(f"dreambooth: class images read as dog {world.class_rate(class_images, 'dog'):.2f}, "
        f"marked {world.mark_rate(class_images):.2f}")
    instance_latents = _encode(base.vae, photos, base.device)
    class_latents = _encode(base.vae, class_images, base.device)
    table = {}
    for lr in cfg.learning_rates:
        start = time.perf_counter()
        tuned = dreambooth_run(base, instance_latents, class_latents, lr, cfg, seed)
        tuned.set_progress_bar_config(disable=True)
        sks = sample(tuned, cfg.instance_prompt, n, seed + 1)
        dog = sample(tuned, cfg.class_prompt, n, seed + 2)
        cat = sample(tuned, "a photo of cat", n, seed + 3)
        table[f"lr {lr:g}"] = {
            "sks_mark": world.mark_rate(sks),
            "sks_dog": world.class_rate(sks, "dog"),
            "dog_mark": world.mark_rate(dog),
            "dog_dog": world.class_rate(dog, "dog"),
            "cat_cat": world.class_rate(cat, "cat"),
        }
        log(f"dreambooth lr {lr:g}, {cfg.steps} steps ({time.perf_counter() - start:.0f}s): {table[f'lr {lr:g}']}")
    return table


def save_grid(rows: Sequence[Sequence], path: Path) -> None:
    """Save rows of equally sized PIL images as one picture."""
    from PIL import Image

    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(r) for r in rows), height * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * width, y * height))
    grid.save(path)


def format_table(title: str, rows: dict[str, dict[str, float]]) -> str:
    """Plain-text table: one row per key, one column per metric."""
    columns = list(next(iter(rows.values())))
    width = max(len(key) for key in rows) + 2
    lines = [title, " " * width + "".join(f"{c:>12}" for c in columns)]
    lines += [f"{key:<{width}}" + "".join(f"{row[c]:>12.2f}" for c in columns) for key, row in rows.items()]
    return "\n".join(lines)


def pretrain(out: Path, cfg: PretrainConfig, device: torch.device, log: Callable[[str], None]) -> None:
    """Train VAE, then UNet and text encoder (or the UNet alone on a frozen lexical encoder, `cfg.lexical_text_encoder`),
    and save the pipeline folder to `out`."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    vae, unet, text_encoder = build_models(len(tokenizer), tokenizer)
    if cfg.lexical_text_encoder:
        text_encoder = build_lexical_text_encoder(text_encoder.config, tokenizer, cfg.seed)
    sizes = {name: sum(p.numel() for p in m.parameters()) for name, m in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder))}
    log(f"parameters: {sizes}, total {sum(sizes.values()) / 1e6:.2f}M")
    vae.to(device)
    start = time.perf_counter()
    train_vae(vae, cfg, generator, log)
    log(f"vae phase {time.perf_counter() - start:.0f}s")
    vae.requires_grad_(False)
    unet.to(device)
    text_encoder.to(device)
    start = time.perf_counter()
    unet, text_encoder = train_denoiser(unet, text_encoder, vae, tokenizer, cfg, generator, log)
    log(f"unet phase {time.perf_counter() - start:.0f}s")
    save_pipeline(out, vae, unet, text_encoder, tokenizer)
    (out / "pretrain.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    log(f"saved {out}")


def load_for_finetune(
    path: Path, device: torch.device, log: Callable[[str], None]
) -> tuple[AutoencoderKL, UNet2DConditionModel, CLIPTextModel, CLIPTokenizer]:
    """VAE, UNet and text encoder (fp32) of a saved toy folder, with today's tokenizer.

    Words added to the vocabulary since that folder was made get new embedding rows;
    the ids it already knew must be unchanged.
    """
    tokenizer = build_tokenizer()
    old = json.loads((path / "tokenizer" / "vocab.json").read_text())
    new = tokenizer.get_vocab()
    moved = [word for word, index in old.items() if new.get(word) != index]
    if moved:
        raise RuntimeError(f"the toy vocabulary changed ids of {moved[:5]}: cannot continue training {path}")
    vae = AutoencoderKL.from_pretrained(path / "vae", dtype=torch.float32).to(device)
    unet = UNet2DConditionModel.from_pretrained(path / "unet", dtype=torch.float32).to(device)
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", dtype=torch.float32).to(device)
    if len(new) > len(old):
        text_encoder.resize_token_embeddings(len(new))
        log(f"text encoder: {len(new) - len(old)} new token rows for {[w for w in new if w not in old]}")
    return vae, unet, text_encoder, tokenizer


def finetune(
    source: Path, out: Path, cfg: PretrainConfig, device: torch.device, log: Callable[[str], None], adapt_vae_steps: int = 0
) -> None:
    """Continue the UNet and text encoder of `source` and save the pipeline to `out`. The VAE is kept, or first
    taught the names' marks with its latent space anchored (`adapt_vae_steps`, batch 16, lr 3e-4). With
    `cfg.lexical_text_encoder` the text encoder is replaced by a frozen `build_lexical_text_encoder` and the UNet learns to read it."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    vae, unet, text_encoder, tokenizer = load_for_finetune(source, device, log)
    if cfg.lexical_text_encoder:
        text_encoder = build_lexical_text_encoder(text_encoder.config, tokenizer, cfg.seed).to(device)
        log("text encoder: replaced by a frozen lexical one (build_lexical_text_encoder); training the UNet alone")
    if adapt_vae_steps > 0:
        start = time.perf_counter()
        adapt_vae(vae, adapt_vae_steps, 16, 3e-4, 10.0, generator, log)
        log(f"vae adaptation {time.perf_counter() - start:.0f}s")
    vae.requires_grad_(False)
    start = time.perf_counter()
    unet, text_encoder = train_denoiser(unet, text_encoder, vae, tokenizer, cfg, generator, log)
    log(f"unet phase {time.perf_counter() - start:.0f}s")
    save_pipeline(out, vae, unet, text_encoder, tokenizer)
    record = {"finetune_from": str(source), "adapt_vae_steps": adapt_vae_steps, **asdict(cfg)}
    if (source / "pretrain.json").is_file():  # the chain of recipes that made the source, so the provenance stays whole
        record["source_pretrain"] = json.loads((source / "pretrain.json").read_text())
    (out / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"saved {out}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dreamlora.toy.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the diffusers pipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vae-steps", type=int, default=PretrainConfig.vae_steps)
    parser.add_argument("--vae-batch", type=int, default=PretrainConfig.vae_batch)
    parser.add_argument("--vae-seconds", type=float, default=None, help="cap the VAE phase to this many seconds")
    parser.add_argument("--bank", type=int, default=PretrainConfig.bank_size, help="scenes in the latent bank")
    parser.add_argument("--steps", type=int, default=PretrainConfig.unet_steps, help="UNet steps")
    parser.add_argument("--batch", type=int, default=PretrainConfig.unet_batch, help="UNet batch")
    parser.add_argument("--unet-seconds", type=float, default=None, help="cap the UNet phase to this many seconds")
    parser.add_argument("--lr", type=float, default=PretrainConfig.unet_lr, help="UNet and text-encoder learning rate")
    parser.add_argument(
        "--modifier-rate", type=float, default=PretrainConfig.modifier_rate,
        help="share of UNet-phase scenes with a modifier word (0: class prompts only, as the shipped model was made)",
    )
    parser.add_argument(
        "--prefix-words", nargs="+", choices=world.PREFIX_WORDS, default=list(PretrainConfig.prefix_words),
        help="the modifier words and names those scenes use (default: all)",
    )
    parser.add_argument(
        "--adapt-vae-steps", type=int, default=0,
        help="with --finetune-from: first teach the VAE the names' marks this many steps, its latents anchored",
    )
    parser.add_argument(
        "--attention-lr-scale", type=float, default=PretrainConfig.attention_lr_scale,
        help="learning-rate multiplier for the UNet's cross-attention queries and keys",
    )
    parser.add_argument("--ema-decay", type=float, default=PretrainConfig.ema_decay)
    parser.add_argument("--warmup", type=int, default=PretrainConfig.warmup_steps, help="warm-up steps (both phases)")
    parser.add_argument(
        "--finetune-from", type=Path, default=None,
        help="continue the UNet and text encoder of this toy folder (VAE kept) instead of pretraining from scratch",
    )
    parser.add_argument(
        "--refine-decoder-steps", type=int, default=0,
        help="then train only the VAE decoder this many steps on marked and any-hue scenes (batch 8, lr 1e-3)",
    )
    parser.add_argument(
        "--lexical-text-encoder", action="store_true",
        help="use a built, frozen text encoder that keeps words apart (build_lexical_text_encoder) instead of training "
        "one; the UNet learns to read it (from scratch, or with --finetune-from)",
    )
    parser.add_argument(
        "--narrow-posterior", type=float, default=None, metavar="STD",
        help="then fix the --out folder's VAE posterior standard deviation at STD (narrow_posterior; 0.0075 is 1%% of "
        "the latents' spread) and record it in pretrain.json",
    )
    parser.add_argument("--eval-images", type=int, default=32, help="images per prompt in evaluation (0 skips it)")
    parser.add_argument("--skip-train", action="store_true", help="evaluate an existing --out folder")
    parser.add_argument("--grid", type=Path, default=None, help="save a PNG of 8 samples per prompt here")
    parser.add_argument("--check-dreambooth", action="store_true")
    parser.add_argument("--dreambooth-steps", type=int, default=DreamboothCheckConfig.steps)
    parser.add_argument("--dreambooth-lrs", type=float, nargs="+", default=list(DreamboothCheckConfig.learning_rates))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    cfg = PretrainConfig(
        seed=args.seed, vae_steps=args.vae_steps, vae_batch=args.vae_batch, vae_seconds=args.vae_seconds,
        bank_size=args.bank,
        unet_steps=args.steps, unet_batch=args.batch, unet_seconds=args.unet_seconds,
        unet_lr=args.lr, ema_decay=args.ema_decay, attention_lr_scale=args.attention_lr_scale, lexical_text_encoder=args.lexical_text_encoder, modifier_rate=args.modifier_rate, prefix_words=tuple(args.prefix_words),
        warmup_steps=min(args.warmup, max(min(args.steps, args.vae_steps) // 10, 1)),
    )
    if args.finetune_from is not None:
        start = time.perf_counter()
        finetune(args.finetune_from, args.out, cfg, device, logger.info, args.adapt_vae_steps)
        logger.info(f"fine-tuning wall time {time.perf_counter() - start:.0f}s")
    elif not args.skip_train:
        start = time.perf_counter()
        pretrain(args.out, cfg, device, logger.info)
        logger.info(f"pretraining wall time {time.perf_counter() - start:.0f}s")
    if args.refine_decoder_steps > 0:
        vae = AutoencoderKL.from_pretrained(args.out / "vae", dtype=torch.float32).to(device)
        generator = torch.Generator(device).manual_seed(args.seed)
        refine_decoder(vae, args.refine_decoder_steps, 8, 1e-3, generator, logger.info)
        vae.to(torch.float16).save_pretrained(args.out / "vae", safe_serialization=True)
    if args.narrow_posterior is not None:
        vae = AutoencoderKL.from_pretrained(args.out / "vae", dtype=torch.float32)
        narrow_posterior(vae, args.narrow_posterior)
        vae.to(torch.float16).save_pretrained(args.out / "vae", safe_serialization=True)
        record_path = args.out / "pretrain.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        record["narrow_posterior"] = {"std": args.narrow_posterior, "note": "applied to this folder's VAE afterwards (narrow_posterior)"}
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    if args.eval_images > 0:
        pipeline = load_pipeline(args.out, device)
        print(format_table(f"base model, {args.eval_images} images per prompt", evaluate(pipeline, args.eval_images, args.seed)), flush=True)
        print(conditioning_report(pipeline, args.seed), flush=True)
        if args.check_dreambooth:
            db_cfg = DreamboothCheckConfig(steps=args.dreambooth_steps, learning_rates=tuple(args.dreambooth_lrs))
            table = check_dreambooth(pipeline, db_cfg, args.eval_images, args.seed, logger.info)
            print(format_table(f"dreambooth-lora check, {db_cfg.steps} steps, rank {db_cfg.rank}", table), flush=True)
        if args.grid is not None:
            prompts = [f"a photo of {cls}" for cls in world.CLASSES] + ["a photo of sks dog", ""]
            save_grid([sample(pipeline, prompt, 8, args.seed) for prompt in prompts], args.grid)


if __name__ == "__main__":
    main()
