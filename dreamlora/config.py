"""Run configuration: frozen, validated dataclasses loaded from TOML plus command-line overrides."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreamlora.errors import ConfigError
from dreamlora.prompts import SAMPLERS, parse_prompt_line

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
PRECISIONS = ("auto", "fp16", "bf16", "fp32")
ATTENTIONS = ("auto", "sdpa", "xformers")
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear", "cosine_with_restarts", "polynomial")  # constant_with_warmup: constant (which warms up too)
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "prodigy", "adafactor", "lion", "lion8bit", "adamw_schedulefree")
LION_DEFAULT_LR = 3e-5  # what `train --optimizer lion` runs at without --lr: a third of AdamW's 1e-4 (Lion's steps are sign-sized)
TRACKERS = ("tensorboard", "wandb")
LOSSES = ("l2", "l1", "huber", "smooth_l1")  # kohya's --loss_type
HUBER_SCHEDULES = ("snr", "exponential", "constant")  # kohya's --huber_schedule (snr is its default)
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# kohya's networks.lora: every Linear and 1x1 convolution of the UNet's transformers and of the text encoder's attention and MLP.
UNET_ALL_TARGETS = UNET_TARGETS + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_ENCODER_ALL_TARGETS = TEXT_ENCODER_TARGETS + ("fc1", "fc2")
TARGET_PRESETS = {"attention": (UNET_TARGETS, TEXT_ENCODER_TARGETS), "all": (UNET_ALL_TARGETS, TEXT_ENCODER_ALL_TARGETS)}
# kohya's conv_dim (LoCon): the ResNet, down- and upsampling blocks join; their 3x3 convolutions take the conv rank and
# alpha, their 1x1 shortcut and time projection the main ones.
CONV3X3_TARGETS = ("conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv")
RESNET_TARGETS = CONV3X3_TARGETS + ("conv_shortcut", "time_emb_proj")


def _default_model() -> str:
    return os.environ.get("DREAMLORA_MODEL") or DEFAULT_MODEL


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


BLOCKS = 12  # kohya's block weights: 12 down, 1 middle, 12 up (SD 1.x's input and output blocks)
BLOCK_PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")


@functools.lru_cache(maxsize=64)  # block_lr_weight asks for it once per UNet module and parameter
def block_weights(spec: str, name: str) -> tuple[float, ...] | None:
    """kohya's down_lr_weight/up_lr_weight: 12 comma-separated factors, or a preset (sine, cosine, linear,
    reverse_linear, zeros) with an optional +N added to each; None for an empty spec."""
    spec = spec.strip()
    if not spec:
        return None
    preset, _, plus = spec.partition("+")
    if preset in BLOCK_PRESETS:
        try:
            base = float(plus) if plus else 0.0
        except ValueError:
            raise ConfigError(f"{name} {spec!r}: the part after + must be a number, e.g. sine+0.5") from None
        steps = [i / (BLOCKS - 1) for i in range(BLOCKS)]
        values = {
            "sine": [math.sin(math.pi * s / 2) for s in steps],
            "cosine": [math.sin(math.pi * s / 2) for s in reversed(steps)],
            "linear": steps,
            "reverse_linear": list(reversed(steps)),
            "zeros": [0.0] * BLOCKS,
        }[preset]
        return tuple(v + base for v in values)
    try:
        values = [float(v) for v in spec.split(",")]
    except ValueError:
        raise ConfigError(f"{name} must be {BLOCKS} comma-separated numbers or one of {', '.join(BLOCK_PRESETS)} (with an optional +N); got {spec!r}") from None
    _check(len(values) == BLOCKS, f"{name} needs {BLOCKS} factors, one per block (kohya's layout); got {len(values)}: {spec!r}")
    _check(all(0 <= v <= 100 for v in values), f"{name} factors must be in [0, 100]; got {spec!r}")
    return tuple(values)


def lora_reference(item: str, default_scale: float = 1.0, flag: str = "--lora") -> tuple[Path, float]:
    """A LoRA given as PATH or PATH:SCALE (a run folder or a file; a path that exists as written is never split)."""
    path, sep, value = item.rpartition(":")
    if sep and path and not Path(item).exists():
        try:
            return Path(path), float(value)
        except ValueError:
            if Path(path).exists():
                raise ConfigError(f"{flag} {item}: the scale {value!r} is not a number; write PATH:SCALE, e.g. {path}:0.8") from None
    return Path(item), default_scale


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and how to run it."""

    name: str = field(default_factory=_default_model)  # hub id, local diffusers folder, `tiny`, `toy` or `random:sd15`
    precision: str = "auto"  # auto: bf16 where supported, else fp16 on CUDA; fp32 on CPU
    attention: str = "auto"  # auto: xformers when its kernels really run, else PyTorch SDPA
    allow_pickle: bool = False  # refuse .bin/.ckpt/.pt weights unless set
    vae: str = ""  # replacement VAE (folder or hub id), e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16
    revision: str = ""  # a hub model's branch, tag or commit (diffusers' --revision); hub ids only
    variant: str = ""  # the weights files of a diffusers folder or hub id to read, e.g. fp16: diffusion_pytorch_model.fp16.safetensors (diffusers' --variant; half the download)
    single_file_config: str = ""  # a .safetensors checkpoint's configs and tokenizer: a diffusers folder or hub id of its architecture (default: diffusers' choice)
    clip_skip: int = 1  # read prompts from the text encoder's Nth layer from the end, as A1111/kohya count (2: penultimate, for most anime SD 1.5 models)
    prediction_type: str = "auto"  # what the UNet predicts; auto: the model's scheduler config (a single file's v_pred marker); v_prediction as kohya's --v_parameterization
    base_weights: tuple[str, ...] = ()  # LoRAs (PATH or PATH:SCALE) fused into the base weights first: the model is base + them (kohya's --base_weights)

    def __post_init__(self) -> None:
        _check(bool(self.name.strip()), "model.name is empty; pass a hub id, a local diffusers folder or `tiny`")
        _check(re.fullmatch(r"[A-Za-z0-9_-]*", self.variant) is not None, f"model.variant is a weights-file infix such as fp16; got {self.variant!r}")
        _check(1 <= self.clip_skip <= 12, f"model.clip_skip must be in 1..12 (1: the text encoder's last layer, 2: the penultimate, as A1111 and kohya count); got {self.clip_skip}")
        _check_choice("model.precision", self.precision, PRECISIONS)
        _check_choice("model.attention", self.attention, ATTENTIONS)
        _check_choice("model.prediction_type", self.prediction_type, PREDICTION_TYPES)
        for item in self.base_weights:
            lora_reference(item, flag="--base-weights")


@dataclass(frozen=True)
class DataConfig:
    """Instance and class images and the prompts that describe them."""

    instance_dir: str = ""
    class_dir: str = ""  # empty: found in priors/ or trained without prior preservation
    token: str = "sks"  # the rare identifier bound to the subject
    class_name: str = ""  # e.g. `dog`; read from the prior set when empty
    instance_prompt: str = ""  # default `a photo of {token} {class_name}`
    class_prompt: str = ""  # default: the prior set's prompt
    resolution: int = 0  # 0: the model's native resolution (512 for SD 1.x)
    center_crop: bool = True  # False: random crop (latents are then encoded every step)
    flip: bool = False  # random horizontal flip (both orientations are cached)
    captions: bool = True  # `photo.txt` beside `photo.jpg` is its prompt (`{token}` places the token, else it is prefixed)
    caption_dropout: float = 0.0  # probability of training a captioned image on the plain instance prompt instead
    shuffle_caption: bool = False  # shuffle each prompt's comma-separated tags every step (kohya's --shuffle_caption)
    keep_tokens: int = 0  # the first N tags stay in place and are never dropped (kohya's --keep_tokens)
    caption_tag_dropout: float = 0.0  # drop each other tag with this probability every step (kohya's --caption_tag_dropout_rate)
    caption_separator: str = ","  # what separates tags (kohya's --caption_separator)
    weighted_captions: bool = False  # read A1111's emphasis in training prompts, `(red collar:1.2)`, as kohya's --weighted_captions; off: brackets are text
    max_token_length: int = 75  # tokens of a prompt read: 75 (one window), 150 or 225 (kohya's --max_token_length, windows joined)
    masked_loss: bool = False  # weight the instance loss by each photo's alpha channel, so transparent background is not learned (kohya's --masked_loss --alpha_mask)
    mask_dir: str = ""  # with masked_loss: masks from this folder (same file names, white learned) instead of the alpha channel (kohya's conditioning_data_dir)
    repeats: int = 1  # each instance image appears this many times per epoch
    class_ratio: float = 1.0  # class images per instance image in a batch (0.5: one every other step at batch size 1)
    buckets: bool = False  # aspect-ratio buckets of about resolution**2 pixels, so non-square photos train whole
    bucket_max_ratio: float = 2.0  # the most elongated bucket (long side / short side)
    color_jitter: float = 0.0  # brightness/contrast/saturation jitter strength, e.g. 0.1 (latents then encoded every step)
    cache_latents: bool = True  # keep VAE latents on disk between runs when the augmentations allow
    latent_cache_dir: str = ""  # default $DREAMLORA_CACHE/latents (~/.cache/dreamlora/latents)

    def __post_init__(self) -> None:
        _check(bool(self.token.strip()), "data.token is empty; pass a rare word such as `sks`")
        _check(0 <= self.caption_dropout <= 1, f"data.caption_dropout must be in [0, 1]; got {self.caption_dropout}")
        _check(0 <= self.caption_tag_dropout < 1, f"data.caption_tag_dropout must be in [0, 1) (0 = off, 0.1 is usual); got {self.caption_tag_dropout}")
        _check(self.max_token_length in (75, 150, 225), f"data.max_token_length must be 75, 150 or 225 (tokens, in windows of 75); got {self.max_token_length}")
        _check(0 <= self.keep_tokens <= 100, f"data.keep_tokens must be in 0..100 tags; got {self.keep_tokens}")
        _check(bool(self.caption_separator.strip()), "data.caption_separator is empty; pass the character between tags, e.g. ','")
        _check(
            self.varies_captions or (self.keep_tokens == 0 and self.caption_separator == ","),
            "data.keep_tokens and data.caption_separator shape --shuffle-caption and --caption-tag-dropout; add one of them or drop them",
        )
        _check(not self.mask_dir or self.masked_loss, "data.mask_dir is set but data.masked_loss is off; set masked_loss = true (the masks weight the loss) or drop mask_dir")
        _check(1 <= self.repeats <= 1000, f"data.repeats must be in 1..1000; got {self.repeats}")
        _check(0 < self.class_ratio <= 16, f"data.class_ratio must be in (0, 16] class images per instance image; got {self.class_ratio}")
        _check(1 <= self.bucket_max_ratio <= 4, f"data.bucket_max_ratio must be in [1, 4]; got {self.bucket_max_ratio}")
        _check(0 <= self.color_jitter <= 0.5, f"data.color_jitter must be in [0, 0.5] (0 = off, 0.1 = light); got {self.color_jitter}")
        _check(" " not in self.token.strip(), f"data.token {self.token!r} has a space; use one rare word such as `sks`")
        _check(
            self.resolution == 0 or (self.resolution >= 8 and self.resolution % 8 == 0),
            f"data.resolution must be a positive multiple of 8 (or 0 for the model's native size); got {self.resolution}",
        )

    def resolved_instance_prompt(self) -> str:
        if self.instance_prompt:
            return self.instance_prompt.replace("{token}", self.token)
        return " ".join(part for part in ("a photo of", self.token, self.class_name) if part)

    @property
    def varies_captions(self) -> bool:
        """Whether prompts change from step to step (tags shuffled or dropped), so they are encoded every step."""
        return self.shuffle_caption or self.caption_tag_dropout > 0

    @property
    def latents_cacheable(self) -> bool:
        """Whether an image view always gives the same pixels, so its latents can be encoded once."""
        return self.center_crop and self.color_jitter == 0


@dataclass(frozen=True)
class PriorConfig:
    """Class-prior image generation with the base model."""

    class_name: str = ""
    prompt: str = ""  # default `a photo of {class_name}`
    negative_prompt: str = ""
    num_images: int = 200
    steps: int = 25
    guidance: float = 0.0  # 0: the model family's default (7.5 SD 1.x/2.x, 5.0 SDXL)
    scheduler: str = "dpm++"  # one of SAMPLERS; pndm is the reference script's default
    batch_size: int = 0  # 0: automatic (large on GPU, small on CPU)
    seed: int = 0
    out: str = ""  # default priors/<class_name>

    def __post_init__(self) -> None:
        _check(self.num_images >= 1, f"prior.num_images must be at least 1; got {self.num_images}")
        _check(1 <= self.steps <= 1000, f"prior.steps must be in 1..1000; got {self.steps}")
        _check(self.guidance >= 0, f"prior.guidance must be >= 0; got {self.guidance}")
        _check(self.batch_size >= 0, f"prior.batch_size must be >= 0 (0 = automatic); got {self.batch_size}")
        _check_choice("prior.scheduler", self.scheduler, SAMPLERS)

    def resolved_prompt(self) -> str:
        return self.prompt or f"a photo of {self.class_name}"

    def resolved_guidance(self, family_default: float) -> float:
        return self.guidance or family_default


@dataclass(frozen=True)
class AdapterConfig:
    """LoRA adapters on the UNet attention projections and the text encoder."""

    rank: int = 4
    alpha: float = 0.0  # 0: equal to rank
    train_text_encoder: bool = True
    unet_targets: tuple[str, ...] = UNET_TARGETS
    text_encoder_targets: tuple[str, ...] = TEXT_ENCODER_TARGETS
    dropout: float = 0.0  # PEFT's lora_dropout: dropout on each LoRA's input (diffusers' --lora_dropout)
    network_dropout: float = 0.0  # dropout on each LoRA's down-projection output, per element (kohya's --network_dropout)
    rank_dropout: float = 0.0  # drop whole rank channels per image, the rest rescaled (kohya's rank_dropout network arg)
    module_dropout: float = 0.0  # skip a whole LoRA module for a step with this probability (kohya's module_dropout network arg)
    init: str = "default"  # default: zero up-weights; gaussian; nonzero (tests: adapted differs from base at step 0)
    conv_rank: int = 0  # > 0: LoRA on the UNet's ResNet and resampling blocks too, 3x3 convolutions at this rank (kohya's conv_dim, LoCon)
    conv_alpha: float = 0.0  # 0: equal to conv_rank (kohya's conv_alpha)
    init_lora: str = ""  # start from this LoRA's weights: a run folder, diffusers or kohya/A1111 .safetensors (kohya's --network_weights)
    down_lr_weight: str = ""  # kohya's block weights: 12 comma-separated factors for the UNet's down blocks (or sine, cosine, linear, reverse_linear, zeros, each +N)
    mid_lr_weight: float = 1.0  # the factor for the UNet's middle block
    up_lr_weight: str = ""  # 12 factors for the up blocks, as down_lr_weight
    block_lr_zero_threshold: float = 0.0  # factors at or below this count as 0: no LoRA in that block
    pivotal: bool = False  # pivotal tuning: also learn new token embeddings for the subject's token (diffusers' --train_text_encoder_ti)
    pivotal_vectors: int = 2  # embedding vectors (new tokens) the subject's token stands for
    pivotal_init: str = ""  # the word the vectors start from; empty: the class name (random without one)

    def __post_init__(self) -> None:
        _check(1 <= self.rank <= 1024, f"adapter.rank must be in 1..1024; got {self.rank}")
        _check(self.alpha >= 0, f"adapter.alpha must be >= 0 (0 = rank); got {self.alpha}")
        _check(0 <= self.conv_rank <= 1024, f"adapter.conv_rank must be in 0..1024 (0: no LoRA on 3x3 convolutions); got {self.conv_rank}")
        _check(self.conv_alpha >= 0, f"adapter.conv_alpha must be >= 0 (0 = conv_rank); got {self.conv_alpha}")
        _check(not self.conv_alpha or self.conv_rank > 0, "adapter.conv_alpha needs adapter.conv_rank (--conv-rank N): without it no convolution is trained")
        for name in ("dropout", "network_dropout", "rank_dropout", "module_dropout"):
            value = getattr(self, name)
            _check(0 <= value < 1, f"adapter.{name} must be in [0, 1) (0 = off, 0.1 is usual); got {value}")
        _check(bool(self.unet_targets), "adapter.unet_targets is empty; the UNet needs at least one LoRA target")
        _check_choice("adapter.init", self.init, ("default", "gaussian", "nonzero"))
        for name in ("down_lr_weight", "up_lr_weight"):
            block_weights(getattr(self, name), f"adapter.{name}")  # checked here, used by `block_lr_weight`
        _check(0 <= self.mid_lr_weight <= 100, f"adapter.mid_lr_weight must be in [0, 100] (1 = --lr); got {self.mid_lr_weight}")
        _check(0 <= self.block_lr_zero_threshold < 100, f"adapter.block_lr_zero_threshold must be in [0, 100); got {self.block_lr_zero_threshold}")
        _check(
            self.block_lr_zero_threshold == 0 or self.block_weights_set,
            "adapter.block_lr_zero_threshold applies to the block weights; add --down-lr-weight, --mid-lr-weight or --up-lr-weight, or drop it",
        )
        _check(1 <= self.pivotal_vectors <= 16, f"adapter.pivotal_vectors must be in 1..16 (2 is usual); got {self.pivotal_vectors}")
        _check(
            self.pivotal or (self.pivotal_vectors == 2 and not self.pivotal_init),
            "adapter.pivotal_vectors and adapter.pivotal_init shape pivotal tuning's new embeddings; add --pivotal or drop them",
        )

    @property
    def resolved_alpha(self) -> float:
        return float(self.alpha or self.rank)

    @property
    def block_weights_set(self) -> bool:
        return bool(self.down_lr_weight or self.up_lr_weight) or self.mid_lr_weight != 1.0

    @property
    def block_lr_factors(self) -> set[float]:
        """Every UNet block's learning-rate factor (1 outside the blocks)."""
        return {self.block_lr_weight(block) for block in range(-1, 2 * BLOCKS + 1)}

    def block_lr_weight(self, block: int) -> float:
        """The learning-rate factor of a UNet block as kohya numbers them (`lora.unet_block_index`): 1-11 down, 12
        middle, 13-24 up, -1 outside the blocks (always 1); 0 means no LoRA there (also at or below the threshold)."""
        if block < 0:
            return 1.0
        if block < BLOCKS:
            weight = (block_weights(self.down_lr_weight, "adapter.down_lr_weight") or (1.0,) * BLOCKS)[block]
        elif block == BLOCKS:
            weight = self.mid_lr_weight
        else:
            weight = (block_weights(self.up_lr_weight, "adapter.up_lr_weight") or (1.0,) * BLOCKS)[block - BLOCKS - 1]
        return 0.0 if weight <= self.block_lr_zero_threshold else weight

    @property
    def kohya_dropouts(self) -> bool:
        """Any of the dropouts applied to each LoRA's down-projection output (`lora.add_dropout_hooks`)."""
        return bool(self.network_dropout or self.rank_dropout or self.module_dropout)

    @property
    def any_dropout(self) -> bool:
        """Some LoRA dropout draws random numbers in the forward pass (checkpointing must then replay the same draws)."""
        return bool(self.dropout) or self.kohya_dropouts

    @property
    def resolved_conv_alpha(self) -> float:
        return float(self.conv_alpha or self.conv_rank)

    @property
    def all_unet_targets(self) -> tuple[str, ...]:
        """The UNet's LoRA targets with the ResNet and resampling layers when `conv_rank` is set."""
        extra = tuple(t for t in RESNET_TARGETS if t not in self.unet_targets) if self.conv_rank else ()
        return tuple(self.unet_targets) + extra


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop and the run folder it writes."""

    out: str = ""  # default runs/<token>-<class>-<n>
    max_steps: int = 800
    epochs: int = 0  # N > 0: max_steps is N passes over the instance photos x data.repeats (kohya's max_train_epochs)
    batch_size: int = 1  # instance images per step (as many class images join them)
    gradient_accumulation: int = 1
    lr: float = 1e-4
    text_encoder_lr: float = 0.0  # 0: same as lr
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    prior_weight: float = 1.0
    seed: int = 0
    gradient_checkpointing: bool = True
    max_grad_norm: float = 1.0
    checkpoint_every: int = 0  # 0: only the final save
    checkpoint_every_epochs: int = 0  # N > 0: checkpoint_every becomes N epochs of steps (kohya's --save_every_n_epochs)
    keep_checkpoints: int = 2
    sample_every: int = 0  # 0: samples only at the end
    sample_every_epochs: int = 0  # N > 0: sample_every becomes N epochs of steps (kohya's --sample_every_n_epochs)
    num_samples: int = 4
    validate_every: int = 0  # N > 0: every N steps, the loss at fixed timesteps and noise on held-out class images and on the photos (validation.py); 0: off
    validation_images: int = 4  # class images held out of training for that validation (only with validate_every)
    sample_prompts: tuple[str, ...] = ()  # more prompts in every sample grid, e.g. the subject somewhere new
    sample_scheduler: str = "dpm++"  # the sample grids' sampler, one of SAMPLERS (kohya's --sample_sampler)
    log_every: int = 10
    compile: str = "auto"  # CUDA graph of the whole step: auto (when possible), on, off
    master_weights: bool = True  # bf16: LoRA weights compute in bf16 with fp32 master copies (no per-use casts); False: autocast
    report_to: str = ""  # tensorboard or wandb through accelerate (optional extras); empty: metrics.jsonl only
    optimizer: str = "adamw"  # adamw8bit: bitsandbytes' 8-bit AdamW (extra `bnb`), paged_adamw8bit its paged variant, lion8bit its 8-bit Lion (as lion); prodigy: Prodigy, lr 1.0 (extra `prodigy`); adafactor: transformers' Adafactor at a fixed lr; lion: Lion (extra `lion`; `train` without --lr runs it at LION_DEFAULT_LR); adamw_schedulefree: schedule-free AdamW (extra `schedulefree`), constant rate
    weight_decay: float = -1.0  # the optimizer's (decoupled) weight decay (diffusers' --adam_weight_decay, kohya's weight_decay optimizer arg); -1: its default (1e-2; Lion and Adafactor 0)
    text_encoder_weight_decay: float = -1.0  # the text encoders' weight decay (diffusers' --adam_weight_decay_text_encoder); -1: weight_decay
    adam_beta1: float = -1.0  # beta1 of AdamW (all kinds), Prodigy and Lion (diffusers' --adam_beta1); -1: the optimizer's default (0.9)
    adam_beta2: float = -1.0  # their beta2 (diffusers' --adam_beta2; 0.99 is common with Prodigy); -1: the optimizer's default (0.999; Lion 0.99)
    adam_epsilon: float = 0.0  # AdamW (all kinds) and Prodigy epsilon (diffusers' --adam_epsilon); 0: the default 1e-8
    scale_lr: bool = False  # every learning rate times batch size x gradient accumulation x processes (diffusers' --scale_lr)
    lr_cycles: int = 1  # cosine_with_restarts: number of cosine cycles, each restarting at the full lr
    lr_power: float = 1.0  # polynomial: the decay's power (1: linear; diffusers' --lr_power, kohya's --lr_scheduler_power)
    text_encoder_lr_scheduler: str = ""  # empty: same as lr_scheduler
    text_encoder_warmup_steps: int = -1  # -1: same as warmup_steps
    text_encoder_steps_fraction: float = 1.0  # train the text-encoder LoRA for this fraction of max_steps, then freeze it
    snr_gamma: float = 0.0  # min-SNR-gamma loss weighting (5.0 in the paper); 0: plain MSE
    noise_offset: float = 0.0  # per-image, per-channel shift of the noise mean (0.05-0.1 helps very dark/bright images); 0: off
    adaptive_noise_scale: float = 0.0  # adds this times each image's absolute channel mean to the noise offset (kohya's --adaptive_noise_scale, 0.00357 suggested); may be negative
    noise_offset_random_strength: bool = False  # each step's noise offset is drawn in [0, noise_offset) (kohya's --noise_offset_random_strength)
    loss: str = "l2"  # l2 (MSE), l1, huber or smooth_l1: the scheduled pseudo-Huber losses resist outlier photos (kohya's --loss_type)
    huber_c: float = 0.1  # huber/smooth_l1: the pseudo-Huber threshold at the noisiest timestep (kohya's --huber_c)
    huber_schedule: str = "snr"  # huber/smooth_l1: how the threshold falls from 1 at t=0 to huber_c: snr, exponential, constant
    multires_noise_iterations: int = 0  # > 0: pyramid noise of this many scales (kohya's --multires_noise_iterations, 6-10 usual)
    multires_noise_discount: float = 0.3  # weight ratio between successive pyramid scales (kohya's --multires_noise_discount)
    debiased_estimation: bool = False  # weight each timestep's loss by 1/sqrt(SNR) (kohya's --debiased_estimation_loss)
    zero_terminal_snr: bool = False  # rescale the noise schedule so its last timestep is pure noise (Lin et al. 2024; kohya's --zero_terminal_snr)
    ip_noise_gamma_random_strength: bool = False  # each step's ip_noise_gamma is drawn in [0, ip_noise_gamma) (kohya's --ip_noise_gamma_random_strength)
    ip_noise_gamma: float = 0.0  # input perturbation: the UNet sees latents noised with noise + gamma * extra noise, the target stays the noise (kohya's --ip_noise_gamma, 0.1 usual)
    min_timestep: int = 0  # train on timesteps in [min_timestep, max_timestep) only (kohya's --min_timestep)
    max_timestep: int = 0  # 0: the scheduler's num_train_timesteps (kohya's --max_timestep)
    scale_weight_norms: float = 0.0  # > 0: after each step, scale down any LoRA module whose update norm exceeds this (kohya's max-norm, 1.0 usual)
    loraplus_lr_ratio: float = 0.0  # LoRA+: the up (B) weights learn this many times faster than the down weights (kohya's loraplus_lr_ratio; 16 in the paper); 0: off
    loraplus_unet_lr_ratio: float = 0.0  # the UNet's LoRA+ ratio; 0: loraplus_lr_ratio (kohya's loraplus_unet_lr_ratio)
    loraplus_text_encoder_lr_ratio: float = 0.0  # the text encoders' LoRA+ ratio; 0: loraplus_lr_ratio (kohya's loraplus_text_encoder_lr_ratio)
    pivotal_lr: float = 0.0  # learning rate of pivotal tuning's embeddings; 0: 5e-4 (with Prodigy: lr). They follow the text encoder's schedule
    pivotal_steps_fraction: float = 0.5  # train the embeddings for this fraction of max_steps, then freeze them (diffusers' --train_text_encoder_ti_frac)

    def __post_init__(self) -> None:
        _check(1 <= self.max_steps <= 1_000_000, f"train.max_steps must be in 1..1000000; got {self.max_steps}")
        _check(0 <= self.epochs <= 100_000, f"train.epochs must be in 0..100000 (0: train.max_steps decides); got {self.epochs}")
        _check(1 <= self.batch_size <= 256, f"train.batch_size must be in 1..256; got {self.batch_size}")
        _check(self.gradient_accumulation >= 1, f"train.gradient_accumulation must be >= 1; got {self.gradient_accumulation}")
        self._check_rates()
        self._check_schedule_and_step()
        self._check_loss_and_noise()
        _check(self.scale_weight_norms >= 0, f"train.scale_weight_norms must be >= 0 (0 = off, 1.0 is usual); got {self.scale_weight_norms}")
        self._check_monitoring()

    def _check_rates(self) -> None:
        """The optimizer, its learning rates and LoRA+ ratios (Prodigy has rules of its own)."""
        _check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        if self.optimizer == "prodigy":
            # Prodigy finds the step size itself; the learning rates scale it (1.0 as its authors and diffusers use it).
            _check(0.1 <= self.lr <= 10, f"train.lr with --optimizer prodigy scales the step size Prodigy finds (1.0 is usual); got {self.lr}: pass --lr 1.0")
            # Its step-size estimate is shared: every group must run at the first group's rate or at 0 (it raises otherwise, mid-run).
            one_rate = "Prodigy runs every parameter group at one learning rate (its step-size estimate is shared)"
            _check(self.text_encoder_lr in (0, self.lr), f"{one_rate}: drop --text-encoder-lr {self.text_encoder_lr:g} or set it to --lr {self.lr:g}")
            _check(
                self.text_encoder_lr_scheduler in ("", self.lr_scheduler) and self.text_encoder_warmup_steps in (-1, self.warmup_steps),
                f"{one_rate}: drop --text-encoder-lr-scheduler and --text-encoder-warmup-steps (the text encoder follows --lr-scheduler; "
                "--text-encoder-steps-fraction still works)",
            )
            _check(
                not (self.loraplus_lr_ratio or self.loraplus_unet_lr_ratio or self.loraplus_text_encoder_lr_ratio),
                f"{one_rate}, so LoRA+ (--loraplus-lr-ratio) cannot go with it; use --optimizer adamw for LoRA+",
            )
            _check(self.pivotal_lr in (0, self.lr), f"{one_rate}: drop --pivotal-lr {self.pivotal_lr:g} or set it to --lr {self.lr:g}")
        else:
            _check(0 < self.lr < 1, f"train.lr must be in (0, 1); got {self.lr}")
            _check(0 <= self.text_encoder_lr < 1, f"train.text_encoder_lr must be in [0, 1) (0 = lr); got {self.text_encoder_lr}")
            _check(0 <= self.pivotal_lr < 1, f"train.pivotal_lr must be in [0, 1) (0 = 5e-4); got {self.pivotal_lr}")
        for name in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
            value = getattr(self, name)
            _check(value == 0 or 1 <= value <= 1000, f"train.{name} must be 0 (off) or in [1, 1000] (16 in the LoRA+ paper, 4-16 usual); got {value}")
        self._check_optimizer_settings()

    def _check_optimizer_settings(self) -> None:
        """Weight decay, betas and epsilon: in range, and only for an optimizer that has them."""
        for name in ("weight_decay", "text_encoder_weight_decay"):
            value = getattr(self, name)
            _check(value == -1 or 0 <= value <= 1, f"train.{name} must be in [0, 1] (1e-2 is the default) or -1 (the default); got {value}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            _check(value == -1 or 0 <= value < 1, f"train.{name} must be in [0, 1) or -1 (the optimizer's default); got {value}")
        _check(0 <= self.adam_epsilon < 1, f"train.adam_epsilon must be in [0, 1) (0: the default 1e-8); got {self.adam_epsilon}")
        if self.optimizer == "adafactor":
            _check(
                self.adam_beta1 == -1 and self.adam_beta2 == -1 and not self.adam_epsilon,
                "--optimizer adafactor has no Adam betas or epsilon (it factors its second moment); drop train.adam_beta1, adam_beta2 and adam_epsilon",
            )
        if self.optimizer in ("lion", "lion8bit"):
            _check(not self.adam_epsilon, f"--optimizer {self.optimizer} has no epsilon (its update is a sign); drop train.adam_epsilon")
        _check(
            not (self.scale_lr and self.optimizer == "prodigy"),
            "--scale-lr multiplies the learning rates, but Prodigy's --lr scales the step size it finds itself (1.0 is usual); drop --scale-lr",
        )

    def _check_schedule_and_step(self) -> None:
        """Learning-rate schedules, warm-up, how long each part trains, checkpoints, clipping, the CUDA graph and trackers."""
        _check_choice("train.lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        if self.optimizer == "adamw_schedulefree":
            self._check_schedule_free()
        _check(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0; got {self.warmup_steps}")
        _check(self.prior_weight >= 0, f"train.prior_weight must be >= 0; got {self.prior_weight}")
        _check(self.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0; got {self.checkpoint_every}")
        _check(self.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1; got {self.keep_checkpoints}")
        _check(self.max_grad_norm >= 0, f"train.max_grad_norm must be >= 0 (0 = no clipping); got {self.max_grad_norm}")
        _check_choice("train.compile", self.compile, ("auto", "on", "off"))
        if self.report_to:
            _check_choice("train.report_to", self.report_to, TRACKERS)
        _check(self.lr_cycles >= 1, f"train.lr_cycles must be >= 1; got {self.lr_cycles}")
        _check(0 < self.lr_power <= 10, f"train.lr_power must be in (0, 10] (1 = linear decay); got {self.lr_power}")
        _check(
            self.lr_power == 1.0 or "polynomial" in (self.lr_scheduler, self.text_encoder_lr_scheduler),
            "train.lr_power shapes the polynomial schedule; add --lr-scheduler polynomial or drop it",
        )
        if self.text_encoder_lr_scheduler:
            _check_choice("train.text_encoder_lr_scheduler", self.text_encoder_lr_scheduler, LR_SCHEDULERS)
        _check(self.text_encoder_warmup_steps >= -1, f"train.text_encoder_warmup_steps must be >= 0 (or -1 = warmup_steps); got {self.text_encoder_warmup_steps}")
        _check(0 < self.text_encoder_steps_fraction <= 1, f"train.text_encoder_steps_fraction must be in (0, 1] (1 = all steps); got {self.text_encoder_steps_fraction}")
        _check(0 < self.pivotal_steps_fraction <= 1, f"train.pivotal_steps_fraction must be in (0, 1] (0.5: the first half; 1 = all steps); got {self.pivotal_steps_fraction}")

    def _check_loss_and_noise(self) -> None:
        """The loss and its weighting, and every way the noise or the timesteps are shaped."""
        _check(self.snr_gamma >= 0, f"train.snr_gamma must be >= 0 (0 = off, 5 is usual); got {self.snr_gamma}")
        _check(self.noise_offset >= 0, f"train.noise_offset must be >= 0 (0 = off, 0.05-0.1 is usual); got {self.noise_offset}")
        _check_choice("train.loss", self.loss, LOSSES)
        _check(0 < self.huber_c <= 1, f"train.huber_c must be in (0, 1] (0.1 is usual); got {self.huber_c}")
        _check_choice("train.huber_schedule", self.huber_schedule, HUBER_SCHEDULES)
        if not self.pseudo_huber:
            _check(
                self.huber_c == 0.1 and self.huber_schedule == "snr",
                f"train.huber_c and train.huber_schedule shape the huber and smooth_l1 losses, not {self.loss}; add --loss huber or drop them",
            )
        _check(0 <= self.multires_noise_iterations <= 20, f"train.multires_noise_iterations must be in 0..20 (0 = off, 6-10 is usual); got {self.multires_noise_iterations}")
        _check(0 < self.multires_noise_discount <= 1, f"train.multires_noise_discount must be in (0, 1] (0.3 is usual); got {self.multires_noise_discount}")
        _check(
            self.multires_noise_iterations or self.multires_noise_discount == 0.3,
            "train.multires_noise_discount shapes the pyramid noise of --multires-noise-iterations N; add it or drop the discount",
        )
        _check(self.noise_offset > 0 or not self.adaptive_noise_scale, "train.adaptive_noise_scale adapts the strength of --noise-offset N; add it or drop the adaptive scale")
        _check(-1 <= self.adaptive_noise_scale <= 1, f"train.adaptive_noise_scale must be in [-1, 1] (about a tenth of --noise-offset is usual); got {self.adaptive_noise_scale}")
        _check(self.noise_offset > 0 or not self.noise_offset_random_strength, "train.noise_offset_random_strength draws the strength of --noise-offset N; add it or drop the random strength")
        _check(self.ip_noise_gamma > 0 or not self.ip_noise_gamma_random_strength, "train.ip_noise_gamma_random_strength draws the strength of --ip-noise-gamma G; add it or drop the random strength")
        _check(0 <= self.ip_noise_gamma <= 1, f"train.ip_noise_gamma must be in [0, 1] (0 = off, 0.1 is usual); got {self.ip_noise_gamma}")
        _check(self.min_timestep >= 0 and self.max_timestep >= 0, f"train.min_timestep and train.max_timestep must be >= 0; got {self.min_timestep} and {self.max_timestep}")
        _check(
            not self.max_timestep or self.min_timestep < self.max_timestep,
            f"train.min_timestep ({self.min_timestep}) must be below train.max_timestep ({self.max_timestep}): timesteps are drawn from [min, max)",
        )

    def _check_monitoring(self) -> None:
        """Sample grids, their prompts and sampler, and the validation loss."""
        _check(self.checkpoint_every_epochs >= 0 and self.sample_every_epochs >= 0, "train.checkpoint_every_epochs and train.sample_every_epochs must be >= 0 (0: off)")
        _check(self.sample_every >= 0, f"train.sample_every must be >= 0 (0 = samples only at the end); got {self.sample_every}")
        _check(self.num_samples >= 0, f"train.num_samples must be >= 0 (0: no sample images); got {self.num_samples}")
        _check(self.validate_every >= 0, f"train.validate_every must be >= 0 (0 = no validation loss); got {self.validate_every}")
        _check(1 <= self.validation_images <= 64, f"train.validation_images must be in [1, 64] (class images held out for validation; 4 is usual); got {self.validation_images}")
        _check_choice("train.sample_scheduler", self.sample_scheduler, SAMPLERS)
        for prompt in self.sample_prompts:  # kohya's options: a bad one stops the run before it starts
            parse_prompt_line(prompt, f"train.sample_prompts {prompt!r}")

    def _check_schedule_free(self) -> None:
        """Schedule-free AdamW averages its iterates in place of a schedule: a constant rate (a warm-up is fine), and
        no max-norm rescaling of the weights the gradient is taken at (the average it exports would not follow)."""
        _check(
            self.lr_scheduler == "constant" and self.text_encoder_lr_scheduler in ("", "constant"),
            f"--optimizer adamw_schedulefree replaces the learning-rate schedule by averaging; use --lr-scheduler constant (now "
            f"{self.lr_scheduler!r}{', text encoder ' + repr(self.text_encoder_lr_scheduler) if self.text_encoder_lr_scheduler else ''}), with --warmup-steps if wanted",
        )
        _check(self.scale_weight_norms == 0, "--scale-weight-norms cannot go with --optimizer adamw_schedulefree: it would rescale the weights the gradient is taken at, not the average that is saved")

    @property
    def pseudo_huber(self) -> bool:
        """The loss takes a threshold per row (`huber_c` on the `huber_schedule`): huber or smooth_l1."""
        return self.loss in ("huber", "smooth_l1")

    def loraplus_ratio(self, model: str) -> float:
        """How many times the LoRA up weights of `model` (unet, text_encoder, text_encoder_2) out-learn its down weights (1: LoRA+ off)."""
        if model == "embeddings":
            return 1.0  # pivotal tuning's vectors have no up weights
        own = self.loraplus_unet_lr_ratio if model == "unet" else self.loraplus_text_encoder_lr_ratio
        return float(own or self.loraplus_lr_ratio or 1.0)

    @property
    def optimizer_betas(self) -> tuple[float, float]:
        """The betas the optimizer runs with: adam_beta1/adam_beta2 where set, else its own (Lion's 0.9/0.99, the others' 0.9/0.999)."""
        default = (0.9, 0.99) if self.optimizer in ("lion", "lion8bit") else (0.9, 0.999)
        return (self.adam_beta1 if self.adam_beta1 >= 0 else default[0], self.adam_beta2 if self.adam_beta2 >= 0 else default[1])

    @property
    def optimizer_weight_decay(self) -> float:
        """The weight decay the optimizer runs with: weight_decay where set, else its own (Lion and Adafactor 0, the others 1e-2)."""
        if self.weight_decay >= 0:
            return self.weight_decay
        return 0.0 if self.optimizer in ("lion", "lion8bit", "adafactor") else 1e-2

    def lr_scale(self, processes: int) -> float:
        """What every learning rate is multiplied by: with `scale_lr`, the images of one optimizer step (batch size x
        gradient accumulation x processes), as diffusers' --scale_lr; else 1."""
        return float(self.batch_size * self.gradient_accumulation * processes) if self.scale_lr else 1.0

    @property
    def resolved_text_encoder_lr(self) -> float:
        return self.text_encoder_lr or self.lr

    @property
    def resolved_pivotal_lr(self) -> float:
        return self.pivotal_lr or (self.lr if self.optimizer == "prodigy" else DEFAULT_PIVOTAL_LR)

    @property
    def text_encoder_stop_step(self) -> int:
        """The step from which the text-encoder LoRA is frozen (max_steps: never)."""
        return math.ceil(self.text_encoder_steps_fraction * self.max_steps)

    @property
    def pivotal_stop_step(self) -> int:
        """The step from which pivotal tuning's embeddings are frozen (max_steps: never)."""
        return math.ceil(self.pivotal_steps_fraction * self.max_steps)

    def stop_step(self, model: str) -> int:
        """The step from which a trained part (a `make_optimizer` group name) is frozen: the UNet's LoRA never is."""
        return {"unet": self.max_steps, "embeddings": self.pivotal_stop_step}.get(model, self.text_encoder_stop_step)


DEFAULT_PIVOTAL_LR = 5e-4  # cloneofsimo's lora_pti rate for textual-inversion vectors
EXPORT_FORMATS = ("a1111", "diffusers", "merged")
EXPORT_DTYPES = ("fp16", "bf16", "fp32")


@dataclass(frozen=True)
class ExportConfig:
    """How `dreamlora export` writes a run's LoRA."""

    format: str = "a1111"
    dtype: str = "fp16"
    out: str = ""  # default exports/<run name>-<format>[.safetensors]
    scale: float = 1.0  # merged: LoRA strength fused into the weights
    single_file: bool = False  # merged: one original-layout checkpoint .safetensors instead of a diffusers folder
    verify: bool = True  # load the written file back through diffusers and compare with the run's LoRA
    # a1111: the model spec's publishing fields (kohya's --metadata_title, _author, _description, _license, _tags)
    title: str = ""  # default: the file's name
    author: str = ""
    description: str = ""
    license: str = ""
    tags: str = ""  # comma-separated
    hub_repo: str = ""  # the Hugging Face repo the export is pushed to: a folder's model card loads it from there

    @property
    def publishing_metadata(self) -> dict[str, str]:
        """The `modelspec.*` fields given (title, author, description, license, tags), tags as ", "-joined words."""
        tags = ", ".join(t.strip() for t in self.tags.split(",") if t.strip())
        fields = {"title": self.title.strip(), "author": self.author.strip(), "description": self.description.strip(), "license": self.license.strip(), "tags": tags}
        return {f"modelspec.{name}": value for name, value in fields.items() if value}

    def __post_init__(self) -> None:
        _check(
            self.format in EXPORT_FORMATS,
            f"export format must be one of {', '.join(EXPORT_FORMATS)}; got {self.format!r} "
            "(AUTOMATIC1111, ComfyUI, Forge and kohya-based tools all load a1111; diffusers loads a1111 and diffusers)",
        )
        _check_choice("export dtype", self.dtype, EXPORT_DTYPES)
        _check(not (self.single_file and self.format != "merged"), "--single-file only applies to --format merged")
        _check(
            not self.publishing_metadata or not (self.format == "merged" and self.single_file),
            "--title, --author, --description, --license and --tags go into the a1111 file's metadata or a folder's model card (README.md); "
            "a --single-file merged checkpoint has neither: export a merged folder (drop --single-file) or use --format a1111",
        )


@dataclass(frozen=True)
class RunConfig:
    """Everything one `dreamlora train` or `dreamlora prior` run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_SECTION_CLASSES = {
    "model": ModelConfig,
    "data": DataConfig,
    "prior": PriorConfig,
    "adapter": AdapterConfig,
    "train": TrainConfig,
}


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(options)}"


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a TOML or command-line value to the field's type, refusing what does not fit."""
    hint = typing.get_origin(annotation) or annotation
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return value.lower() in ("true", "1", "yes", "on")
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if hint is tuple:
            if isinstance(value, str) and value.lstrip().startswith("["):
                value = _toml_array(value, key)  # --set 'train.sample_prompts=["a, b", "c"]' keeps commas
            elif isinstance(value, str):
                value = [part.strip() for part in value.split(",") if part.strip()]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
                raise ValueError
            return tuple(str(v) for v in value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    expected = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key} must be a {expected}; got {value!r}")


def _toml_array(text: str, key: str) -> list[Any]:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{key}: {text!r} is not a TOML list ({error}); write it as [\"first\", \"second\"] or as comma-separated words") from error


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build_section(section: str, values: dict[str, Any]) -> Any:
    cls = _SECTION_CLASSES[section]
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            raise ConfigError(f"unknown config key {section}.{key}{_closest(key, list(types_))}")
        kwargs[key] = _coerce(value, types_[key], f"{section}.{key}")
    return cls(**kwargs)


def read_toml(path: Path) -> dict[str, Any]:
    """Read a config file, turning a missing or malformed file into a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass an existing .toml file (see samples/tiny.toml)")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file '{path}' is not valid TOML: {error}; fix the line it names") from error


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults < TOML file < overrides (`section.key` -> value). Unknown keys raise, naming the closest valid key."""
    raw: dict[str, dict[str, Any]] = {name: {} for name in _SECTION_CLASSES}
    if path is not None:
        for section, values in read_toml(path).items():
            if section not in raw:
                raise ConfigError(f"unknown config section [{section}]{_closest(section, list(raw))}")
            if not isinstance(values, dict):
                raise ConfigError(f"config entry {section!r} must be a [section] table")
            raw[section].update(values)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in raw or not key:
            all_keys = [f"{s}.{k}" for s, c in _SECTION_CLASSES.items() for k in _field_types(c)]
            raise ConfigError(f"unknown config key {dotted!r}{_closest(dotted, all_keys)}")
        raw[section][key] = value
    cfg = RunConfig(**{section: _build_section(section, values) for section, values in raw.items()})
    check_across_sections(cfg)
    return cfg


def check_across_sections(cfg: RunConfig) -> None:
    """Settings of one section that another makes moot (checked where a user's config is read, not for saved runs)."""
    defaults = TrainConfig()
    if not cfg.adapter.train_text_encoder:
        # Pivotal tuning's embeddings follow the text encoder's schedule and warm-up, not its rate, stop step or LoRA+.
        schedule = ("text_encoder_lr_scheduler", "text_encoder_warmup_steps")
        text_encoder_only = ("text_encoder_lr", "loraplus_text_encoder_lr_ratio", "text_encoder_steps_fraction", *(() if cfg.adapter.pivotal else schedule))
        moot = [f"train.{name}" for name in text_encoder_only if getattr(cfg.train, name) != getattr(defaults, name)]
        _check(not moot, f"--no-text-encoder (adapter.train_text_encoder false) trains no text-encoder LoRA, so {', '.join(moot)} would do nothing; drop them or drop --no-text-encoder")
    _check(
        cfg.train.optimizer != "prodigy" or cfg.adapter.block_lr_factors <= {0.0, 1.0},
        "Prodigy runs every parameter group at one learning rate (its step-size estimate is shared), so block weights other than 0 and 1 "
        "cannot go with it; use --optimizer adamw for them",
    )
    moot = [f"train.{name}" for name in ("pivotal_lr", "pivotal_steps_fraction") if getattr(cfg.train, name) != getattr(defaults, name)]
    _check(cfg.adapter.pivotal or not moot, f"{', '.join(moot)} shape pivotal tuning's embeddings; add --pivotal or drop them")


def parse_set_options(items: list[str]) -> dict[str, str]:
    """`--set section.key=value` strings to an overrides mapping."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects section.key=value; got {item!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def replace(cfg: Any, **changes: Any) -> Any:
    """A copy of a frozen config with some fields changed (validated again)."""
    return dataclasses.replace(cfg, **changes)


def to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    return {name: {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(getattr(cfg, name)).items()} for name in _SECTION_CLASSES}


def to_toml(cfg: RunConfig) -> str:
    import tomli_w

    return tomli_w.dumps(to_dict(cfg))


def to_json(cfg: RunConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def from_dict(values: dict[str, dict[str, Any]]) -> RunConfig:
    return RunConfig(**{section: _build_section(section, values.get(section, {})) for section in _SECTION_CLASSES})

