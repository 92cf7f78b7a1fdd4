"""DreamBooth-LoRA training: the recipe from a RunConfig to a run folder with the trained LoRA."""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from dreamlora import __version__
from dreamlora import checkpoint as ckpt
from dreamlora.config import RunConfig, lora_reference, replace, to_dict, to_toml
from dreamlora.data import ImageFolderDataset, check_images, duplicate_images, few_photos_warning, instance_prompts, latent_mask, learned_share, list_images, load_image, load_masks, make_buckets, open_image, resize_and_crop, tag_frequency, to_tensor, token_placement_problems, vary_caption
from dreamlora.emphasis import plain_text, tokenize_weighted, weigh_context
from dreamlora.errors import ConfigError, DreamloraError, TrainingError, TrainingInterrupted
from dreamlora.generate import BASE_WEIGHTS_RECORD, base_weight_hashes, changed_base_weights
from dreamlora.latent_cache import LatentDiskCache, file_digest, open_latent_cache
from dreamlora.lora import LORA_FILE, WeightNormLimiter, add_dropout_hooks, adapter_metadata, adapter_state_dicts, attach_adapters, block_lr_factors, load_adapters, load_initial_weights, save_diffusers_lora, trainable_parameters, up_weight_flags
from dreamlora.models import Components, PromptEmbeddings, apply_clip_skip, check_local_model, check_local_vae, encode_prompts, load_model, public_model_ref, read_length, resolve_precision, select_attention, tokenize_all
from dreamlora.pivotal import EMBEDDINGS_FILE, PivotalEmbeddings, embeddings_for, placeholders, save_embeddings
from dreamlora.prior import MANIFEST, model_source_identity, read_prior_set, safe_name
from dreamlora.sampling import AugmentedLatents, class_indices, instance_plan, steps_per_epoch
from dreamlora.step import CudaGraphStep, batch_loss, dreambooth_loss  # noqa: F401 - dreambooth_loss is part of train's interface
from dreamlora.validation import Validator, make_set, split_class_folder

log = logging.getLogger(__name__)

COMMON_WORDS = {
    "a", "an", "the", "dog", "cat", "man", "woman", "person", "photo", "car", "toy", "of", "and", "my", "style",
    "boy", "girl", "child", "baby", "face", "house", "bird", "horse", "tree", "flower", "painting", "picture", "art",
    "red", "blue", "green", "black", "white", "big", "small", "new", "old", "good", "best", "cute", "me", "you", "it",
}
MAX_BAD_STEPS = 5


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    seconds: float
    lora_path: Path
    attention: str
    precision: str
    with_prior: bool
    skipped_steps: int = 0
    samples: list[Path] = field(default_factory=list)
    cuda_graphs: bool = False
    capture_seconds: float = 0.0


def snr_weights(noise_scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), one per timestep: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v.

    SNR(t) = alpha_bar_t / (1 - alpha_bar_t). Dividing by SNR + 1 for v-prediction gives the same effective
    weighting of the x0 error as epsilon-prediction does, because the v loss is the epsilon loss times (SNR + 1) / SNR.
    """
    snr = timestep_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if _prediction_type(noise_scheduler, "--snr-gamma") == "epsilon":
        # min(SNR, gamma) / SNR is 1 for every SNR below gamma, also in the limit at SNR 0 (--zero-terminal-snr's last step).
        return torch.where(snr > 0, clipped / snr.clamp(min=1e-30), 1.0).float()
    return (clipped / (snr + 1.0)).float()


def training_scheduler(noise_scheduler: Any, cfg: RunConfig) -> Any:
    """The noise schedule training draws from: the model's, or with `--zero-terminal-snr` the same betas rescaled so the
    last timestep's SNR is 0 (diffusers' `rescale_betas_zero_snr`, the rescaling of Lin et al. that kohya's
    --zero_terminal_snr applies). Images are still drawn with the model's own schedule."""
    if not cfg.train.zero_terminal_snr:
        return noise_scheduler
    rescaled = type(noise_scheduler).from_config(noise_scheduler.config, rescale_betas_zero_snr=True)
    if float(rescaled.alphas_cumprod[-1]) > 1e-12:
        raise ConfigError(f"--zero-terminal-snr: this model's {type(noise_scheduler).__name__} does not rescale its betas to a zero terminal SNR; drop --zero-terminal-snr")
    if cfg.train.debiased_estimation and _prediction_type(rescaled, "--debiased-estimation") == "epsilon":
        raise ConfigError("--debiased-estimation weights the loss by 1/sqrt(SNR), which is infinite at --zero-terminal-snr's last timestep for an epsilon model; drop one of them")
    return rescaled


def timestep_snr(noise_scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t) per timestep, in float64 (infinite at t = 0 for schedules that reach it)."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].double()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def _prediction_type(noise_scheduler: Any, option: str) -> str:
    """The model's prediction type where `option` supports it (epsilon or v_prediction); refused with a message otherwise."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise TrainingError(f"{option} does not support prediction_type {prediction_type!r}; use epsilon or v_prediction models")
    return prediction_type


def debiased_weights(noise_scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """Debiased-estimation loss weights (Yu et al. 2024, kohya's --debiased_estimation_loss), one per timestep:
    1 / sqrt(SNR) for epsilon, 1 / (SNR + 1) for v-prediction, with SNR capped at 1000 (it is infinite at t = 0)."""
    snr = timestep_snr(noise_scheduler, timesteps).clamp(max=1000.0)
    if _prediction_type(noise_scheduler, "--debiased-estimation") == "epsilon":
        return snr.rsqrt().float()
    return (1.0 / (snr + 1.0)).float()


def huber_thresholds(noise_scheduler: Any, timesteps: torch.Tensor, c: float, schedule: str) -> torch.Tensor:
    """The pseudo-Huber threshold per row (Khrapov et al. 2024, "scheduled pseudo-Huber loss", as kohya's sd-scripts use it):
    near 1 (the loss is about MSE) at low noise, falling to `c` (robust to outlier pixels) at high noise.

    snr: (1 - c) / (1 + sigma_t)^2 + c with sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t); exponential: c^(t / T);
    constant: c.
    """
    if schedule == "constant":
        return torch.full(timesteps.shape, float(c), device=timesteps.device)
    if schedule == "exponential":
        total = int(noise_scheduler.config.num_train_timesteps)
        return (float(c) ** (timesteps.double() / total)).float()
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].double()
    sigma = ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()
    return ((1.0 - c) / (1.0 + sigma).square() + c).float()


def random_strength(value: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """`value` times one uniform draw in [0, 1) for the whole batch (kohya's --noise_offset_random_strength and
    --ip_noise_gamma_random_strength)."""
    return value * torch.rand(1, generator=generator, device=device)


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0, random: bool = False, adaptive_scale: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`; `noise_offset` adds a random per-image, per-channel constant (shifts each
    channel's mean); `random`: its strength is drawn in [0, noise_offset) for the batch; `adaptive_scale` adds that
    many times each image's absolute channel mean to the strength (kohya's --adaptive_noise_scale), never below 0."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    if noise_offset:
        strength = random_strength(noise_offset, generator, latents.device) if random else noise_offset
        if adaptive_scale:
            strength = (strength + adaptive_scale * latents.float().mean(dim=(2, 3), keepdim=True).abs()).clamp(min=0.0)
        noise = noise + strength * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=latents.device)
    return noise


def draw_timesteps(noise_scheduler: Any, count: int, generator: torch.Generator, device: torch.device, low: int = 0, high: int = 0) -> torch.Tensor:
    """`count` training timesteps drawn uniformly from [low, high) (high 0: the scheduler's num_train_timesteps)."""
    top = high or int(noise_scheduler.config.num_train_timesteps)
    return torch.randint(low, top, (count,), generator=generator, device=device)


def check_timestep_range(cfg: RunConfig, noise_scheduler: Any) -> None:
    """--min-timestep/--max-timestep must lie within the model's training timesteps."""
    total = int(noise_scheduler.config.num_train_timesteps)
    low, high = cfg.train.min_timestep, cfg.train.max_timestep or total
    if high > total or low >= high:
        raise ConfigError(f"--min-timestep {low} / --max-timestep {high} must satisfy 0 <= min < max <= {total}, the model's number of training timesteps")


def noisy_latents(
    noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, generator: torch.Generator, ip_noise_gamma: float = 0.0, random: bool = False
) -> torch.Tensor:
    """The latents noised to `timesteps`; `ip_noise_gamma` perturbs the noise the UNet sees (input perturbation,
    kohya's --ip_noise_gamma) while the target stays the unperturbed noise; `random`: its strength is drawn in
    [0, ip_noise_gamma) for the batch."""
    if ip_noise_gamma:
        gamma = random_strength(ip_noise_gamma, generator, latents.device) if random else ip_noise_gamma
        noise = noise + gamma * torch.randn(latents.shape, generator=generator, device=latents.device)
    return noise_scheduler.add_noise(latents, noise, timesteps)


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise, as kohya's --multires_noise_iterations: noise at successively coarser random
    scales (each 2-4x smaller than the last, weighted discount**i) added to `noise`, the sum rescaled to unit standard
    deviation over the batch. Low-frequency noise lets the model change an image's overall brightness and contrast."""
    batch, channels, height, width = noise.shape
    # The scale factors come from a CPU generator seeded by the batch's: reading them needs no device sync.
    factors = (torch.rand(iterations, generator=torch.Generator().manual_seed(int(generator.initial_seed()) + 2**41)) * 2 + 2).tolist()
    out = noise.clone()
    for i, factor in enumerate(factors):
        h, w = max(1, int(height / factor**i)), max(1, int(width / factor**i))
        coarse = torch.randn((batch, channels, h, w), generator=generator, device=noise.device)
        out = out + torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear") * discount**i
        if h == 1 or w == 1:
            break
    return out / out.std()


def diffusion_inputs(cfg: RunConfig, noise_scheduler: Any, latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A micro-batch's (noisy latents, timesteps, target, loss weights or None, Huber thresholds or None), drawn from
    the batch's generator in a fixed order (noise, its offset, timesteps, input perturbation)."""
    t = cfg.train
    noise = sample_noise(latents, generator, t.noise_offset, t.noise_offset_random_strength, t.adaptive_noise_scale)
    if t.multires_noise_iterations:
        noise = pyramid_noise(noise, generator, t.multires_noise_iterations, t.multires_noise_discount)
    timesteps = draw_timesteps(noise_scheduler, latents.shape[0], generator, latents.device, t.min_timestep, t.max_timestep)
    noisy = noisy_latents(noise_scheduler, latents, noise, timesteps, generator, t.ip_noise_gamma, t.ip_noise_gamma_random_strength)
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    weights = snr_weights(noise_scheduler, timesteps, t.snr_gamma) if t.snr_gamma else None
    if t.debiased_estimation:
        debiased = debiased_weights(noise_scheduler, timesteps)
        weights = debiased if weights is None else weights * debiased  # both, as kohya applies them
    huber_c = huber_thresholds(noise_scheduler, timesteps, t.huber_c, t.huber_schedule) if t.pseudo_huber else None
    return noisy, timesteps, target, weights, huber_c


def diffusion_target(noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict, read from the scheduler's `prediction_type`."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise TrainingError(f"unsupported prediction_type {prediction_type!r} in the model's scheduler; dreamlora trains epsilon and v_prediction models")


# --- data resolution ------------------------------------------------------------------------------


def prior_set_differences(manifest: dict[str, Any], model_cfg: Any) -> list[str]:
    """How the model (its revision and weights variant) and VAE a prior set was drawn with (its manifest) differ from those of `model_cfg`, in words;
    empty where they agree or the manifest does not say (a set of another tool's images has no model)."""
    from dreamlora.models import model_fingerprint, public_model_ref

    found, source = [], model_source_identity(model_cfg)
    model, folder = public_model_ref(model_cfg.name), Path(model_cfg.name).expanduser()
    if manifest.get("model") and manifest["model"] != model:
        found.append(f"the model {manifest['model']!r} (training: {model!r})")
    elif manifest.get("model_fingerprint") and folder.is_dir() and model_fingerprint(folder) != manifest["model_fingerprint"]:
        found.append(f"another model folder named {model!r}")
    if "revision" in manifest and manifest["revision"] != source["revision"]:
        found.append(f"the hub revision {manifest['revision'] or 'main'!r} (training: {source['revision'] or 'main'!r})")
    if "variant" in manifest and manifest["variant"] != source["variant"]:
        found.append(f"the {manifest['variant'] or 'plain'} weights files (training: {source['variant'] or 'plain'})")
    drawn, used = str(manifest.get("vae", "")), source["vae"]
    if drawn != used:
        def label(identity: str) -> str:
            return f"VAE {identity.split(':')[0]!r}" if identity else "the model's own VAE"

        same_name = drawn and used and label(drawn) == label(used)
        found.append(f"another {label(used)} (a folder of the same name)" if same_name else f"{label(drawn)} (training: {label(used)})")
    return found


def resolve_data(cfg: RunConfig, priors_root: Path = Path("priors")) -> tuple[RunConfig, bool]:
    """Fill in class folder, class name and prompts; return the config and whether a prior set must be generated first."""
    data = cfg.data
    if not data.instance_dir:
        raise ConfigError("no instance folder; pass --instance ./photos (a folder of 3-20 photos of the subject)")
    instance_images = list_images(data.instance_dir, "instance")
    check_images(instance_images)  # a bad photo is named now, before a prior set or run folder is written
    check_run_inputs(cfg, instance_images)
    if warning := few_photos_warning(len(instance_images.paths)):
        log.warning(warning)
    if data.token.lower() in COMMON_WORDS:
        log.warning("token %r is a common word the model already knows; a rare token such as `sks` personalizes better", data.token)
    needs_prior = False
    class_dir, class_name, class_prompt = data.class_dir, data.class_name, data.class_prompt
    if not class_dir and class_name:
        class_dir = str(priors_root / safe_name(class_name))
        needs_prior = not (Path(class_dir) / MANIFEST).is_file() or len(read_prior_set(Path(class_dir))["files"]) < cfg.prior.num_images
    elif not class_dir:
        found = only_prior_set(priors_root)
        if found is not None:
            class_dir = str(found)
            log.info("using the prior set in %s for prior preservation", class_dir)
        else:
            log.warning("no prior set found in %s/: training without prior preservation (the class may drift); run `dreamlora prior --class NAME` first to keep it", priors_root)
    if class_dir and (Path(class_dir) / MANIFEST).is_file():
        manifest = read_prior_set(Path(class_dir))
        class_name = class_name or manifest.get("class_name", "")
        class_prompt = class_prompt or manifest["prompt"]
        if not needs_prior and (differences := prior_set_differences(manifest, cfg.model)):
            log.warning(
                "the prior set in %s was drawn with %s, so its images are not what the model you train draws for the class; draw a set "
                "with `dreamlora prior --class %s --out FOLDER` and the same --model and --vae as train, and pass --class-dir FOLDER",
                class_dir, "; ".join(differences), class_name or "NAME",
            )
        drawn_with = int(manifest.get("clip_skip", 1))
        if drawn_with != cfg.model.clip_skip and not needs_prior:
            log.warning(
                "the prior set in %s was drawn with clip skip %d but training reads prompts with clip skip %d, so its images are not what "
                "the model draws for the class as trained; draw a set with `dreamlora prior --class %s --clip-skip %d --out FOLDER` and pass --class-dir FOLDER",
                class_dir, drawn_with, cfg.model.clip_skip, class_name or "NAME", cfg.model.clip_skip,
            )
    if class_dir and not needs_prior:
        for instance_path, class_path in duplicate_images(instance_images, list_images(class_dir, "class")):
            log.warning("class image '%s' is a copy of instance image '%s'; class images must show other members of the class (let `dreamlora prior` generate them), or prior preservation pulls the class toward your subject", class_path, instance_path.name)
        if not class_prompt:
            raise ConfigError(f"class folder '{class_dir}' has no manifest.json; pass --class-prompt (e.g. 'a photo of dog')")
    data = replace(data, class_dir=class_dir, class_name=class_name, class_prompt=class_prompt)
    for problem in token_placement_problems(data, bool(class_dir)):
        log.warning("%s", problem)
    prior = replace(cfg.prior, class_name=cfg.prior.class_name or class_name, out=cfg.prior.out or class_dir)
    if needs_prior and not prior.class_name:
        raise ConfigError("a prior set must be generated but no class name is known; pass --class NAME")
    return resolve_epochs(replace(cfg, data=data, prior=prior)), needs_prior


def check_run_inputs(cfg: RunConfig, instance_images: Any) -> None:
    """What would otherwise stop a new run only after the model has loaded (or a prior set was drawn), checked first:
    a local --model or --vae that is not there, a --base-weights or --init-lora file that is not a readable safetensors
    LoRA, the --mask-dir masks (one per photo, of its shape). (An existing --out is the CLI's to refuse: a library
    caller resumes into it.)"""
    from dreamlora.export import lora_file

    check_local_model(cfg.model.name)
    if cfg.model.vae:
        check_local_vae(cfg.model.vae)
    for item in cfg.model.base_weights:
        lora_file(ckpt.find_lora(lora_reference(item, flag="--base-weights")[0]))
    if cfg.data.mask_dir:
        load_masks(instance_images, cfg.data.mask_dir, [load_image(path).image.size for path in instance_images.paths])
    if cfg.adapter.init_lora:
        lora_file(ckpt.find_lora(Path(cfg.adapter.init_lora)))


def resolve_epochs(cfg: RunConfig, processes: int | None = None) -> RunConfig:
    """Settings counted in epochs become steps: with `train.epochs` set, `train.max_steps` becomes that many passes
    over the instance photos x repeats, as the run will draw them (batch size, aspect buckets, gradient accumulation
    and `processes`, default $WORLD_SIZE); `checkpoint_every_epochs`/`sample_every_epochs` set checkpoint_every/sample_every."""
    t = cfg.train
    if not (t.epochs or t.checkpoint_every_epochs or t.sample_every_epochs):
        return cfg
    data = cfg.data
    folder = list_images(data.instance_dir, "instance")
    buckets = None
    if data.buckets:
        from dreamlora.dataset_report import model_geometry

        native, factor = model_geometry(cfg.model.name, cfg.model.single_file_config, cfg.model.revision, cfg.model.allow_pickle)
        buckets = make_buckets(data.resolution or native, 8 * factor, data.bucket_max_ratio)
    sizes = [open_image(path).size for path in folder.paths] if buckets else [(0, 0)] * len(folder.paths)
    plan = instance_plan(sizes, data.resolution, cfg.train.batch_size, data.repeats, cfg.train.seed, buckets)
    processes = processes or int(os.environ.get("WORLD_SIZE", "1"))
    per_epoch = steps_per_epoch(plan, processes, cfg.train.gradient_accumulation)
    changes = {}
    if t.checkpoint_every_epochs:
        changes["checkpoint_every"] = t.checkpoint_every_epochs * per_epoch
    if t.sample_every_epochs:
        changes["sample_every"] = t.sample_every_epochs * per_epoch
    if t.epochs:
        max_steps = changes["max_steps"] = t.epochs * per_epoch
        if max_steps > 1_000_000:
            raise ConfigError(f"{t.epochs} epochs of {per_epoch} steps is {max_steps} steps, more than 1000000; pass fewer --epochs")
        log.info("%d epochs of %d steps (%d photos x %d repeats, batch %d): %d steps", t.epochs, per_epoch, len(folder.paths), data.repeats, t.batch_size, max_steps)
    return replace(cfg, train=replace(t, **changes))


def only_prior_set(priors_root: Path = Path("priors")) -> Path | None:
    """The one prior set under `priors_root` that training uses when no class is named; None if there is none."""
    sets = sorted(p.parent for p in priors_root.glob(f"*/{MANIFEST}"))
    if len(sets) > 1:
        names = ", ".join(p.name for p in sets)
        raise ConfigError(f"several prior sets in {priors_root}/ ({names}); choose one with --class NAME")
    return sets[0] if sets else None


def default_run_dir(cfg: RunConfig, runs_root: Path = Path("runs")) -> tuple[Path, bool]:
    """The run folder and whether its name was chosen automatically (then a free suffix is added)."""
    if cfg.train.out:
        return Path(cfg.train.out), False
    name = "-".join(safe_name(part) for part in (cfg.data.token, cfg.data.class_name or "subject"))
    return runs_root / name, True


# --- latent cache --------------------------------------------------------------------------------


@torch.no_grad()
def encode_latent_stats(vae: torch.nn.Module, pixels: torch.Tensor, batch_size: int = 2, where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior for each image; a step then samples latents without running the VAE.

    Small batches: at 512 px the VAE encoder's activations, not the UNet step, would otherwise set the run's peak memory.
    `where` names the images in the error raised for NaN/inf latents (see `check_latents`).
    """
    means, stds = [], []
    for start in range(0, pixels.shape[0], batch_size):
        chunk = pixels[start : start + batch_size].to(vae.device, vae.dtype)
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    means_all = torch.cat(means)
    check_latents(means_all, vae, where or "the training images")  # before anything is cached, in memory or on disk
    return means_all, torch.cat(stds)


def check_latents(means: torch.Tensor, vae: torch.nn.Module, where: str) -> None:
    """Refuse NaN/inf latents at once: a VAE overflowing in fp16 (SDXL's does) would otherwise train on garbage."""
    bad = int((~torch.isfinite(means.flatten(1))).any(dim=1).sum())
    if bad:
        raise ConfigError(
            f"the VAE gave NaN/inf latents for {bad} of {means.shape[0]} images of {where} (VAE in {str(vae.dtype).replace('torch.', '')}); "
            "SDXL's VAE overflows in fp16: use --precision bf16 or fp32, or a VAE made for fp16 with --vae (e.g. madebyollin/sdxl-vae-fp16-fix)"
        )


class LatentSource:
    """Latents of one image folder: cached posterior statistics (and their flips), or encoded per step for random crops."""

    def __init__(self, dataset: ImageFolderDataset, vae: torch.nn.Module, flip: bool, cache: bool, disk: LatentDiskCache | None = None) -> None:
        self.dataset, self.vae, self.flip, self.cache = dataset, vae, flip, cache
        self.scaling = vae.config.scaling_factor
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0
        self.encode = functools.partial(encode_latent_stats, vae, where=f"'{dataset.folder.root}'")
        if cache:
            # SDXL's size conditioning of each cached view: the centre crop, mirrored for the flipped view.
            boxes = [dataset.center_crop_box(i) for i in range(len(dataset))]
            self.size_ids = torch.stack([torch.stack([dataset.size_conditioning(i, boxes[i], flipped) for i in range(len(dataset))]) for flipped in ((False, True) if flip else (False,))])
        if cache and disk is not None:
            # Each view read from the disk cache, or encoded alone and stored there (see latent_cache.py).
            contents, size = [file_digest(p) for p in dataset.folder.paths], (dataset.resolution, dataset.resolution)
            stats = [
                disk.get_or_encode([disk.key(c, size, "center", flipped) for c in contents], lambda i, f=flipped: dataset[i]["pixel_values"].flip(-1) if f else dataset[i]["pixel_values"], self.encode)
                for flipped in ((False, True) if flip else (False,))
            ]
            self.means = torch.stack([s[0] for s in stats]).to(vae.device)
            self.stds = torch.stack([s[1] for s in stats]).to(vae.device)
        elif cache:
            pixels = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
            views = [pixels, pixels.flip(-1)] if flip else [pixels]
            stats = [self.encode(view) for view in views]
            self.means = torch.stack([s[0] for s in stats])  # (views, N, C, h, w)
            self.stds = torch.stack([s[1] for s in stats])

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def needs_vae(self) -> bool:
        """Whether drawing latents still runs the VAE (random crops encode every step)."""
        return not self.cache

    def sample(self, indices: list[int], generator: torch.Generator, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Latents of `indices`; `size` is always the square training resolution here (buckets use sampling.AugmentedLatents)."""
        return self.sample_with_sizes(indices, generator, size)[0]

    def sample_with_sizes(self, indices: list[int], generator: torch.Generator, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents of the examples `indices` and their SDXL size conditioning, shape (len(indices), 6)."""
        return self.sample_views(indices, generator, size)[:2]

    def sample_views(
        self, indices: list[int], generator: torch.Generator, size: tuple[int, int] | None = None, masks: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`sample_with_sizes`, and with `masks` each view's loss mask at latent size (`data.latent_mask`)."""
        device = generator.device
        flips = torch.randint(0, 2, (len(indices),), generator=generator, device=device) if self.flip else torch.zeros(len(indices), dtype=torch.long, device=device)
        boxes: list[tuple[int, int] | None]
        if self.cache:
            index = torch.tensor(indices, device=self.means.device)
            mean = self.means[flips.to(self.means.device), index]
            std = self.stds[flips.to(self.means.device), index]
            sizes = self.size_ids[flips.cpu(), index.cpu()]
            boxes = [None] * len(indices)  # the centre crop
        else:
            boxes = [self.dataset.random_crop_box(i, torch.Generator().manual_seed(int(generator.initial_seed()) + i)) for i in indices]
            pixels = torch.stack([to_tensor(resize_and_crop(self.dataset.images[i], self.dataset.resolution, box)) for i, box in zip(indices, boxes)])
            pixels = torch.where(flips.cpu().view(-1, 1, 1, 1).bool(), pixels.flip(-1), pixels)
            mean, std = self.encode(pixels)
            sizes = torch.stack([self.dataset.size_conditioning(i, box, bool(f)) for i, box, f in zip(indices, boxes, flips.tolist())])
        eps = torch.randn(mean.shape, generator=generator, device=device)
        mask = None
        if masks:
            alphas = self.dataset.alphas or [None] * len(self.dataset)
            views = [(resize_and_crop(alphas[i], self.dataset.resolution, box) if alphas[i] is not None else None, bool(f)) for i, box, f in zip(indices, boxes, flips.tolist())]
            mask = torch.stack([latent_mask(alpha, tuple(mean.shape[-2:]), flipped) for alpha, flipped in views]).to(device)
        return ((mean.to(device) + std.to(device) * eps) - self.shift) * self.scaling, sizes.to(device), mask


@dataclass
class DrawnBatch:
    """One micro-step's examples: instance rows first, then class rows."""

    latents: torch.Tensor
    rows: torch.Tensor  # the prompt of each example (an index into DreamBoothBatches.prompts)
    size_ids: torch.Tensor  # (examples, 6) SDXL size conditioning; other families ignore it
    generator: torch.Generator  # for the micro-step's other random draws
    texts: list[str] | None = None  # with --shuffle-caption / --caption-tag-dropout: each example's prompt this step
    masks: torch.Tensor | None = None  # with --masked-loss: (examples, 1, h, w) loss weights, ones for class images


class DreamBoothBatches:
    """Instance rows then class rows for each micro-step, drawn as a pure function of (seed, micro-step, rank)."""

    def __init__(self, cfg: RunConfig, components: Components, device: torch.device, world: int = 1, rank: int = 0) -> None:
        data = cfg.data
        self.batch_size, self.seed, self.device, self.world, self.rank = cfg.train.batch_size, cfg.train.seed, device, world, rank
        self.data = data
        folder = list_images(data.instance_dir, "instance")
        captions = instance_prompts(folder, data.token, data.resolved_instance_prompt(), data.captions)
        self.tag_frequency = {folder.root.name: tag_frequency(captions, data.caption_separator)}  # kohya's ss_tag_frequency
        instance = ImageFolderDataset(folder, data.resolved_instance_prompt(), data.resolution, "instance", data.center_crop, captions, data.masked_loss, data.mask_dir)
        if data.mask_dir and rank == 0:
            kept = [learned_share(mask) for mask in instance.alphas or []]
            log.info("--mask-dir: %d photos masked by the files in %s (on average %.0f%% of each is learned)", len(kept), data.mask_dir, 100 * sum(kept) / max(1, len(kept)))
            if blank := [path.name for path, share in zip(folder.paths, kept) if share < 0.01]:
                log.warning("--mask-dir: the masks of %s are black, so those photos teach nothing; white marks what is learned", ", ".join(blank[:5]))
        elif data.masked_loss and rank == 0:
            with_alpha = sum(alpha is not None for alpha in instance.alphas or [])
            if not with_alpha:
                log.warning("--masked-loss: none of the %d photos has an alpha channel, so every pixel counts; save cut-outs as PNG/WebP with transparency", len(instance))
            else:
                log.info("--masked-loss: %d of %d photos masked by their alpha channel (the others count whole)", with_alpha, len(instance))
        disk = open_latent_cache(data.cache_latents, data.latent_cache_dir, components.vae) if data.latents_cacheable else None
        self.disk = disk
        # The plain path (square, no jitter) keeps LatentSource; buckets or colour jitter render views per size.
        self.augmented = data.buckets or data.color_jitter > 0
        self.sources = [self._source(instance, components, disk)]
        self.prompts = [data.resolved_instance_prompt()]
        self.with_prior = bool(data.class_dir)
        self.instance = instance
        self.held_out: ImageFolderDataset | None = None  # --validate-every: class images training never draws
        if self.with_prior:
            class_folder = list_images(data.class_dir, "class")
            if cfg.train.validate_every:
                class_folder, held = split_class_folder(class_folder, cfg.train.validation_images)
                self.held_out = ImageFolderDataset(held, data.class_prompt, data.resolution, "class", True)
                if rank == 0:
                    log.info("--validate-every: %d class images held out for the validation loss (%s); training draws from the other %d", len(held.paths), ", ".join(p.name for p in held.paths), len(class_folder.paths))
            class_set = ImageFolderDataset(class_folder, data.class_prompt, data.resolution, "class", data.center_crop)
            self.sources.append(self._source(class_set, components, disk))
            self.prompts.append(data.class_prompt)
        # Rows index distinct prompts (each encoded once per step): instance prompt, class prompt, then each caption.
        self.prompts += sorted(set(captions) - set(self.prompts))
        self.instance_rows = [self.prompts.index(p) for p in captions]
        # Shuffled or dropped tags: only prompts holding the separator change (the plain instance prompt usually does not).
        self.varied = data.varies_captions and any(data.caption_separator in p for p in captions)
        if data.varies_captions and not self.varied and rank == 0:
            log.warning("--shuffle-caption/--caption-tag-dropout: no instance prompt holds the separator %r, so nothing is shuffled or dropped", data.caption_separator)
        buckets = make_buckets(data.resolution, 8 * components.vae_scale_factor, data.bucket_max_ratio) if data.buckets else None
        self.plan = instance_plan([im.size for im in instance.images], data.resolution, self.batch_size, data.repeats, self.seed, buckets)
        if disk is not None and rank == 0:  # every process reads the same cache; one line says it
            log.info("latent cache %s: %d views read, %d encoded", disk.root, disk.hits, disk.misses)

    @property
    def needs_vae(self) -> bool:
        """Whether any source still encodes with the VAE while training (random crops, colour jitter, bucket views cached lazily)."""
        return any(source.needs_vae for source in self.sources)

    def _source(self, dataset: ImageFolderDataset, components: Components, disk: Any) -> Any:
        if self.augmented:
            data = self.data
            encode = functools.partial(encode_latent_stats, components.vae, where=f"'{dataset.folder.root}'")
            return AugmentedLatents(dataset, components.vae, encode, data.flip, data.center_crop, data.color_jitter, disk)
        return LatentSource(dataset, components.vae, self.data.flip, cache=self.data.center_crop, disk=disk)

    def draw(self, micro_step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        """Latents, the prompt row of each example, and the generator for this micro-step's other random draws."""
        batch = self.draw_batch(micro_step)
        return batch.latents, batch.rows, batch.generator

    def draw_batch(self, micro_step: int) -> DrawnBatch:
        """The micro-step's latents, prompt rows and SDXL size conditioning."""
        # Every random draw of a micro-step comes from a generator seeded by (seed, micro-step, rank): resume is exact.
        position = micro_step * self.world + self.rank
        generator = torch.Generator(device=self.device).manual_seed(self.seed * 7_919 + position)
        indices, size = self.plan.batch(position)
        sampled, ids, masks = self.sources[0].sample_views(indices, generator, size, masks=self.data.masked_loss)
        latents, sizes, mask_parts = [sampled], [ids], [masks]
        rows = [self.instance_rows[i] for i in indices]
        if self.data.caption_dropout > 0:
            # Its own generator, so turning dropout on leaves every other draw of the run unchanged.
            keep = torch.rand(len(rows), generator=torch.Generator().manual_seed(self.seed * 7_919 + position + 2**40)) >= self.data.caption_dropout
            rows = [row if kept else 0 for row, kept in zip(rows, keep.tolist())]
        texts = None
        if self.varied:
            # Their own generator too; the same (seed, micro-step, rank) gives the same tags, so resume is exact.
            tags = torch.Generator().manual_seed(self.seed * 7_919 + position + 2**41)
            d = self.data
            texts = [vary_caption(self.prompts[row], d.caption_separator, d.keep_tokens, d.shuffle_caption, d.caption_tag_dropout, tags) for row in rows]
        if self.with_prior:
            chosen = class_indices(position, self.batch_size, self.data.class_ratio, len(self.sources[1]), self.seed + 1)
            if chosen:
                sampled, ids = self.sources[1].sample_with_sizes(chosen, generator, size)
                latents.append(sampled)
                sizes.append(ids)
                mask_parts.append(torch.ones_like(sampled[:, :1]) if masks is not None else None)  # class images count whole
                rows += [1] * len(chosen)
                if texts is not None:
                    texts += [self.prompts[1]] * len(chosen)
        mask = torch.cat(mask_parts) if masks is not None else None
        return DrawnBatch(torch.cat(latents), torch.tensor(rows, device=self.device), torch.cat(sizes), generator, texts, mask)


LOGGED_RATES = {"lr": "unet", "lr_text_encoder": "text_encoder", "lr_embeddings": "embeddings"}  # metrics.jsonl key: optimizer group


def make_optimizer(
    groups: dict[str, list[torch.nn.Parameter]], cfg: RunConfig, device: torch.device, capturable: bool = False, up_weights: dict[str, list[bool]] | None = None,
    lr_factors: dict[str, list[float]] | None = None, lr_scale: float = 1.0,
) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW, paged 8-bit AdamW or 8-bit Lion, Prodigy, Adafactor, Lion or schedule-free AdamW) with one parameter group (and learning rate) per trained model;
    fused kernels on CUDA. Each group names its model under "model" (`make_lr_scheduler` reads it).

    `capturable`: state and learning rates live on the GPU so the update can run inside a CUDA graph.
    `up_weights`: per model, which of its parameters are LoRA up weights (`lora.up_weight_flags`); with LoRA+ on
    (`train.loraplus_lr_ratio`) they get a group of their own at the model's rate times the ratio, as kohya's
    loraplus_lr_ratio does.
    `lr_factors`: per model, each parameter's factor on its rate (the UNet's block weights, `lora.block_lr_factors`):
    one group per factor, as kohya's block-wise learning rates. Each group's "scale" is its rate over the model's.
    `lr_scale`: every rate's factor (`TrainConfig.lr_scale`, diffusers' --scale_lr). The text encoders' groups carry
    their own weight decay when `train.text_encoder_weight_decay` is set.
    """
    param_groups = _param_groups(groups, cfg, device, capturable, up_weights, lr_factors, lr_scale)
    name, train = cfg.train.optimizer, cfg.train
    lion = {"betas": train.optimizer_betas, "weight_decay": train.optimizer_weight_decay}
    adam = {**lion, "eps": train.adam_epsilon or 1e-8}
    if name in ("adamw8bit", "paged_adamw8bit"):  # bitsandbytes' 8-bit AdamW; paged: its state can spill to CPU memory
        attribute = "optim.PagedAdamW8bit" if name == "paged_adamw8bit" else "optim.AdamW8bit"
        return _optional_optimizer("bitsandbytes", attribute, name, "bnb", "bitsandbytes")(param_groups, **adam)
    if name == "lion8bit":  # as lion, with 8-bit state (kohya's Lion8bit)
        return _optional_optimizer("bitsandbytes", "optim.Lion8bit", name, "bnb", "bitsandbytes")(param_groups, **lion)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # At the given rates, as kohya's guides set it for LoRA: no relative step size, no parameter scaling, no warm-up init.
        return Adafactor(param_groups, lr=cfg.train.lr, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=train.optimizer_weight_decay)
    if name == "adamw_schedulefree":
        # AdamW's betas, eps and weight decay as here; the warm-up is the schedule's (--warmup-steps ramps the rate it reads).
        return _optional_optimizer("schedulefree", "AdamWScheduleFree", name, "schedulefree", "schedulefree")(param_groups, **adam, warmup_steps=0)
    if name == "lion":
        # As kohya's --optimizer_type Lion without optimizer_args: the package's betas (0.9, 0.99), no weight decay.
        return _optional_optimizer("lion_pytorch", "Lion", name, "lion", "lion-pytorch")(param_groups, **lion)
    if name == "prodigy":
        prodigy = _optional_optimizer("prodigyopt", "Prodigy", name, "prodigy", "prodigyopt")
        # As diffusers' DreamBooth-LoRA script sets it: decoupled weight decay, bias correction, and a safeguarded
        # warm-up (the step-size estimate does not run away while the LoRA up-weights are still zero).
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay" into the progress bar
            return prodigy(param_groups, **adam, decouple=True, use_bias_correction=True, safeguard_warmup=True)
    return torch.optim.AdamW(param_groups, **adam, fused=device.type == "cuda", capturable=capturable)


def _param_groups(
    groups: dict[str, list[torch.nn.Parameter]], cfg: RunConfig, device: torch.device, capturable: bool, up_weights: dict[str, list[bool]] | None, lr_factors: dict[str, list[float]] | None,
    lr_scale: float = 1.0,
) -> list[dict[str, Any]]:
    """One optimizer group per model, block-weight factor and (with LoRA+) down/up half; see `make_optimizer`."""
    t = cfg.train
    lrs = {"unet": t.lr, "text_encoder": t.resolved_text_encoder_lr, "text_encoder_2": t.resolved_text_encoder_lr, "embeddings": t.resolved_pivotal_lr}
    lrs = {name: rate * lr_scale for name, rate in lrs.items()}
    own_decay = {"weight_decay": t.text_encoder_weight_decay} if t.text_encoder_weight_decay >= 0 else {}
    lr = (lambda v: torch.tensor(v, device=device)) if capturable else float  # noqa: E731
    param_groups = []
    for name, params in groups.items():
        ratio = cfg.train.loraplus_ratio(name)
        if ratio != 1.0 and (up_weights is None or len(up_weights[name]) != len(params)):
            raise ValueError(f"LoRA+ needs the up-weight flags of every {name} parameter")
        factors = (lr_factors or {}).get(name) or [1.0] * len(params)
        if len(factors) != len(params):
            raise ValueError(f"block weights need the factor of every {name} parameter")
        ups = up_weights[name] if ratio != 1.0 and up_weights is not None else [False] * len(params)
        # Groups by factor (in block order), each split into down then up weights when LoRA+ is on.
        for factor in dict.fromkeys(factors):
            for up in (False, True) if ratio != 1.0 else (False,):
                members = [p for p, f, flag in zip(params, factors, ups) if f == factor and flag is up]
                scale = (ratio if up else 1.0) * factor
                rate = (lrs[name] * ratio if up else lrs[name]) * factor
                param_groups.append({"params": members, "lr": lr(rate), "model": name, "scale": scale, **(own_decay if name.startswith("text_encoder") else {})})
    return param_groups


def _optional_optimizer(module: str, attribute: str, option: str, extra: str, package: str) -> Any:
    """The optimizer class `module.attribute` of an optional package, or a message saying how to install it."""
    import importlib

    try:
        found: Any = importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(f"--optimizer {option} needs {package}, which is not installed ({error}); pip install 'dreamlora[{extra}]', or use --optimizer adamw") from error
    for part in attribute.split("."):
        found = getattr(found, part)
    return found


def _non_finite_error(run_dir: Path, in_a_row: int, when: str, skipped: int, lr: float) -> TrainingError:
    latest = ckpt.latest_checkpoint(run_dir)
    kept = f"the last good checkpoint {latest.name} is kept in {run_dir}" if latest else "no checkpoint was written yet"
    return TrainingError(
        f"the loss was non-finite {in_a_row} steps in a row ({when}, {skipped} skipped in all); lower --lr (now {lr:g}) "
        f"or use --precision bf16 (fp16 overflows more easily); {kept}"
    )


def use_cuda_graphs(cfg: RunConfig, device: torch.device, num_processes: int, precision: str) -> bool:
    """Whether the step is captured as a CUDA graph: `on`/`auto` where it can be, `off` never."""
    reasons = []
    if device.type != "cuda":
        reasons.append("no CUDA device")
    if num_processes > 1:
        reasons.append("several processes")
    if cfg.train.gradient_accumulation > 1:
        reasons.append("gradient accumulation")
    if precision == "fp16":
        reasons.append("fp16 loss scaling (use bf16)")
    if cfg.train.optimizer != "adamw":
        reasons.append(f"optimizer {cfg.train.optimizer}")
    if cfg.adapter.any_dropout and cfg.train.gradient_checkpointing:
        reasons.append("LoRA dropout with gradient checkpointing (its RNG state is saved per checkpoint)")
    if cfg.adapter.pivotal:
        reasons.append("pivotal tuning")
    if cfg.data.varies_captions:
        reasons.append("prompts that change every step (--shuffle-caption, --caption-tag-dropout)")
    if cfg.data.masked_loss:
        reasons.append("--masked-loss")
    if cfg.train.compile == "off" or (cfg.train.compile == "auto" and reasons):
        if cfg.train.compile == "auto" and device.type == "cuda":
            log.info("CUDA graphs off: %s", ", ".join(reasons))
        return False
    if reasons:
        raise ConfigError(f"--compile on needs a single CUDA process without gradient accumulation in bf16/fp32; here: {', '.join(reasons)}. Use --compile auto")
    return True


def lr_factor(kind: str, warmup: int, total: int, cycles: int = 1, power: float = 1.0) -> Callable[[int], float]:
    """The learning-rate multiplier at each step for a schedule (the formulas of diffusers' schedulers, warmup included)."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if kind == "polynomial":  # diffusers' polynomial decay, to 0 rather than its 1e-7
            return max(0.0, 1.0 - progress) ** power
        if kind == "cosine_with_restarts":
            return 0.0 if progress >= 1.0 else max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0))))
        raise ConfigError(f"unknown lr scheduler {kind!r}; use constant, linear, cosine, cosine_with_restarts or polynomial")

    return factor


def make_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """One schedule per parameter group, by the model it trains (`make_optimizer` names it): the UNet's, and the text
    encoders' own, which pivotal tuning's embeddings follow too; each drops to 0 at its part's stop step."""
    t = cfg.train
    unet = lr_factor(t.lr_scheduler, t.warmup_steps, t.max_steps, t.lr_cycles, t.lr_power)
    te_warmup = t.warmup_steps if t.text_encoder_warmup_steps < 0 else t.text_encoder_warmup_steps
    te_schedule = lr_factor(t.text_encoder_lr_scheduler or t.lr_scheduler, te_warmup, t.max_steps, t.lr_cycles, t.lr_power)

    def until(stop: int) -> Callable[[int], float]:
        return lambda step: te_schedule(step) if step < stop else 0.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [unet if group["model"] == "unet" else until(t.stop_step(group["model"])) for group in optimizer.param_groups])


def _initial_lora_modules(cfg: RunConfig, components: Components) -> list[Any]:
    """The modules of --init-lora (any LoRA file `convert` reads), named for these components. Text-encoder modules in
    layers the UNet never reads are dropped, as they never change the output: the last layer of encoders read at the
    penultimate one (SDXL's first), and the layers --clip-skip removed."""
    from dreamlora.export import live_architecture, read_lora_modules

    source = ckpt.find_lora(Path(cfg.adapter.init_lora))  # a run or checkpoint folder, or a file
    modules, _, notes, _ = read_lora_modules(source, None, live_architecture(components, public_model_ref(cfg.model.name)))
    if not modules:
        raise ConfigError(f"--init-lora {source} holds no LoRA weights")
    for note in notes:
        log.info("--init-lora: %s", note)
    # The first layer index whose output the UNet does not see, per text encoder.
    unread = {name: int(encoder.config.num_hidden_layers) for name, encoder in components.text_encoders.items()}
    for name in components.family.penultimate_encoders:
        unread[name] -= 1

    def read_by_unet(m: Any) -> bool:
        layer = re.search(r"layers\.(\d+)\.", m.module) if m.group in unread else None
        return layer is None or int(layer.group(1)) < unread[m.group]

    kept = [m for m in modules if read_by_unet(m)]
    if len(kept) < len(modules) and components.clip_skip > 1:
        log.info("--init-lora: %d text-encoder modules in the layers --clip-skip %d leaves out are not loaded", len(modules) - len(kept), components.clip_skip)
    return kept


def _attach_pivotal(cfg: RunConfig, components: Components, resume_from: Path | None) -> PivotalEmbeddings:
    """Pivotal tuning's new tokens, hooked into the text encoders: resumed from the checkpoint's vectors, started from
    --init-lora's when it has some for this token, else from --pivotal-init (default: the class name)."""
    token, vectors = cfg.data.token, cfg.adapter.pivotal_vectors
    initial = None
    source = resume_from if resume_from is not None else (Path(cfg.adapter.init_lora) if cfg.adapter.init_lora else None)
    found = embeddings_for(ckpt.find_lora(source)) if source is not None else None
    if resume_from is not None and found is None:
        raise ConfigError(f"checkpoint '{resume_from}' has no pivotal-tuning embeddings ({EMBEDDINGS_FILE}), so it was not trained with --pivotal; resume without --pivotal")
    if found is not None:
        saved_token, tensors = found
        shape = tuple(next(iter(tensors.values())).shape)
        if saved_token.lower() == token.lower() and shape[0] == vectors:
            initial = tensors
            log.info("pivotal tuning: %s's %d vectors start from %s", token, vectors, source)
        elif resume_from is not None:
            raise ConfigError(f"checkpoint '{resume_from}' holds {shape[0]} vectors for {saved_token!r}, not {vectors} for {token!r}; resume with the run's own --token and --pivotal-vectors")
        else:
            log.warning("--init-lora's embedding is for %r with %d vectors, not %r with %d; the vectors start afresh", saved_token, shape[0], token, vectors)
    init_word = cfg.adapter.pivotal_init or cfg.data.class_name
    pivotal = PivotalEmbeddings.attach(components, token, vectors, init_word, initial)
    if initial is None:
        log.info("pivotal tuning: %s stands for %d new tokens, starting from %s", token, vectors, repr(init_word) if init_word else "random vectors")
    return pivotal


@dataclass(frozen=True)
class PromptTokens:
    """Training prompts tokenized: one id tensor per tokenizer (SDXL: two) and, with --weighted-captions, each
    position's emphasis weight (None when nothing is weighed)."""

    ids: list[torch.Tensor]
    weights: torch.Tensor | None = None

    @classmethod
    def of(cls, components: Components, prompts: list[str], max_tokens: int, weighted: bool, device: torch.device) -> PromptTokens:
        if not weighted:
            return cls([ids.to(device) for ids in tokenize_all(components, prompts, max_tokens)])
        ids, weights = tokenize_weighted(components.tokenizers, prompts, max_tokens)
        return cls([t.to(device) for t in ids], None if weights is None else weights.to(device))

    def select(self, rows: torch.Tensor) -> PromptTokens:
        return PromptTokens([ids[rows] for ids in self.ids], None if self.weights is None else self.weights[rows])

    def encode(self, components: Components, text_encoders: Sequence[torch.nn.Module] | None = None) -> PromptEmbeddings:
        return weigh_context(encode_prompts(components, self.ids, text_encoders), self.weights)


def _varied_prompts(
    components: Components, texts: list[str], text_encoders: list[torch.nn.Module], trains: bool, expand: Callable[[str], str] | None, device: torch.device,
    max_tokens: int = 0, weighted: bool = False,
) -> tuple[Callable[[], PromptEmbeddings], torch.Tensor]:
    """This step's prompts when tags are shuffled or dropped: each distinct one tokenized and encoded now (with
    gradients while something in the text encoders trains), and the row of each example."""
    distinct = list(dict.fromkeys(texts))
    rows = torch.tensor([distinct.index(t) for t in texts], device=device)
    tokens = PromptTokens.of(components, [expand(t) for t in distinct] if expand else distinct, max_tokens, weighted, device)
    if trains:
        return (lambda: tokens.encode(components, text_encoders)), rows

    def fixed() -> PromptEmbeddings:
        with torch.no_grad():
            return tokens.encode(components, text_encoders)

    return fixed, rows


def _freeze(params: list[torch.nn.Parameter]) -> None:
    """Stop training these parameters: no gradients from now on (the optimizer skips them)."""
    for param in params:
        param.requires_grad_(False)
        param.grad = None


def _fixed_encoding(components: Components, text_encoders: list[torch.nn.Module], tokens: PromptTokens) -> PromptEmbeddings:
    """Once nothing in the text encoders trains: the prompts' encoding, computed once."""
    for encoder in text_encoders:
        encoder.eval()  # the fixed encoding without LoRA dropout
    with torch.no_grad():
        return tokens.encode(components, text_encoders)


def _sample_prompts(cfg: RunConfig) -> tuple[str, str]:
    """Instance and class prompt for samples; the class prompt falls back to `a photo of <class>` when training has none."""
    class_prompt = cfg.data.class_prompt or (f"a photo of {cfg.data.class_name}" if cfg.data.class_name else "")
    return cfg.data.resolved_instance_prompt(), class_prompt


def _make_monitor(cfg: RunConfig, components: Components, run_dir: Path, adapted_prompt: Callable[[str], str] | None = None) -> Any:
    """Sampler for `--sample-every`: the base model's images at the sample seeds are made here, once."""
    from dreamlora.monitor import SampleMonitor

    instance_prompt, class_prompt = _sample_prompts(cfg)
    seeds = list(range(cfg.train.seed, cfg.train.seed + cfg.train.num_samples))
    return SampleMonitor(
        components, instance_prompt, class_prompt, cfg.data.instance_dir, seeds, cfg.prior.steps, cfg.prior.resolved_guidance(components.family.default_guidance),
        cfg.data.resolution, run_dir / "samples", cfg.train.sample_prompts, adapted_prompt, cfg.train.sample_scheduler,
    )


def _check_tracker(name: str) -> None:
    import importlib.util

    if importlib.util.find_spec(name) is None:
        raise ConfigError(f"--report-to {name} needs the {name} package, which is not installed; pip install 'dreamlora[{name}]', or drop --report-to")


def _start_trackers(accelerator: Any, cfg: RunConfig, run_dir: Path) -> None:
    """TensorBoard logs go to `run_dir/tensorboard/`; wandb runs are named after the run folder."""
    accelerator.project_configuration.logging_dir = str(run_dir)  # known only now; trackers read it in init_trackers
    flat = {f"{section}.{key}": (", ".join(value) if isinstance(value, list) else value) for section, values in to_dict(cfg).items() for key, value in values.items()}
    tensorboard = cfg.train.report_to == "tensorboard"
    init_kwargs = {} if tensorboard else {"wandb": {"name": run_dir.name, "dir": str(run_dir)}}
    accelerator.init_trackers("tensorboard" if tensorboard else "dreamlora", config=flat, init_kwargs=init_kwargs)


# --- the recipe ----------------------------------------------------------------------------------


class MasterWeights:
    """fp32 master copies of LoRA weights that compute in bf16.

    Under autocast every use of an fp32 LoRA weight launches a cast (about 2,100 per SD 1.5 step with checkpointing).
    Here the model holds bf16 LoRA weights, so forward and backward run without casts; the optimizer steps the fp32
    masters and one grouped copy per step refreshes the bf16 weights.
    """

    def __init__(self, groups: dict[str, list[torch.nn.Parameter]], dtype: torch.dtype) -> None:
        self.params = groups
        self.masters = {name: [torch.nn.Parameter(p.detach().float().clone()) for p in ps] for name, ps in groups.items()}
        for ps in groups.values():
            for p in ps:
                p.data = p.data.to(dtype)

    def grads_to_masters(self) -> None:
        for name, ps in self.params.items():
            for master, p in zip(self.masters[name], ps):
                master.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    @torch.no_grad()
    def masters_to_model(self) -> None:
        for name, ps in self.params.items():
            torch._foreach_copy_(ps, self.masters[name])

    @contextlib.contextmanager
    def fp32_in_model(self) -> Iterator[None]:
        """The model's LoRA parameters are the fp32 masters inside this block (for saving and loading exactly)."""
        saved = {name: [p.data for p in ps] for name, ps in self.params.items()}
        for name, ps in self.params.items():
            for p, master in zip(ps, self.masters[name]):
                p.data = master.data
        try:
            yield
        finally:
            for name, ps in self.params.items():
                for p, data in zip(ps, saved[name]):
                    p.data = data
            self.masters_to_model()


def _make_accelerator(cfg: RunConfig) -> tuple[Any, str, torch.dtype]:
    from accelerate import Accelerator

    probe_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision, weight_dtype = resolve_precision(cfg.model.precision, probe_device)
    mixed = {"fp16": "fp16", "bf16": "bf16", "fp32": "no"}[precision]
    if precision == "bf16" and (cfg.train.master_weights or probe_device.type != "cuda"):
        mixed = "no"  # bf16 weights end to end with fp32 masters: no autocast (see MasterWeights)
    tracking: dict[str, Any] = {}
    if cfg.train.report_to:
        from accelerate.utils import ProjectConfiguration

        _check_tracker(cfg.train.report_to)
        # The run folder is not known yet: `_start_trackers` points the logging directory at it.
        tracking = {"log_with": cfg.train.report_to, "project_config": ProjectConfiguration(project_dir=".", logging_dir=".")}
    accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=cfg.train.gradient_accumulation, **tracking)
    return accelerator, precision, weight_dtype


def _enable_checkpointing(components: Components, train_text_encoder: bool, preserve_rng: bool = False) -> None:
    # Non-reentrant checkpointing, explicitly: with reentrant checkpointing a text-encoder LoRA can get no gradients.
    # The RNG state only matters with LoRA dropout; saving it costs a host sync and breaks CUDA-graph capture.
    from torch.utils.checkpoint import checkpoint

    kwargs = {"use_reentrant": False, "preserve_rng_state": preserve_rng}
    components.unet.enable_gradient_checkpointing(functools.partial(checkpoint, **kwargs))
    if train_text_encoder:
        for text_encoder in components.text_encoders.values():
            text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)


def prepare_vae(components: Components, weight_dtype: torch.dtype) -> None:
    """Encode latents in fp32 where the family's VAE overflows in fp16 (SDXL), unless the VAE is one made for fp16."""
    vae = components.vae
    if weight_dtype == torch.float16 and not components.family.vae_fp16_safe and getattr(vae.config, "force_upcast", True):
        log.info("the %s VAE overflows in fp16: encoding latents in fp32 (pass --vae with an fp16-safe VAE to skip this)", components.family.name)
        vae.to(torch.float32)


def check_gradients(groups: dict[str, list[torch.nn.Parameter]], allow_zero: bool = False) -> dict[str, float]:
    """Every trained LoRA group must have finite, non-zero gradients after the first step; fail loudly otherwise.
    `allow_zero`: module dropout may have skipped every LoRA of a group in that step; only non-finite fails."""
    norms = {}
    for name, params in groups.items():
        grads = [p.grad.detach().float() for p in params if p.grad is not None]
        norm = torch.sqrt(sum((g**2).sum() for g in grads)).item() if grads else 0.0
        if not math.isfinite(norm) or (norm == 0.0 and not allow_zero):
            raise TrainingError(f"the {name} LoRA received {'no' if norm == 0.0 else 'non-finite'} gradients in the first step ({len(grads)}/{len(params)} tensors have a gradient); this is a bug, please report it with --debug output")
        norms[name] = norm
    return norms


def _run_info(
    cfg: RunConfig, components: Components, run_dir: Path, steps: int, status: str, processes: int = 1, dataset: dict[str, Any] | None = None, times: dict[str, int] | None = None
) -> dict[str, Any]:
    """run.json: what the run is (for export metadata, inspect and generate); `dataset`: its image counts and epoch size;
    `times`: when it started and finished (unix seconds, kohya's ss_training_started_at/finished_at)."""
    return {
        "name": run_dir.name,
        "model": public_model_ref(cfg.model.name),  # never an absolute path of the user's machine
        "family": components.family.name,
        "base_model_version": components.family.base_model_version,
        "prediction_type": components.prediction_type,
        "zero_terminal_snr": bool(cfg.train.zero_terminal_snr or components.noise_scheduler.config.get("rescale_betas_zero_snr")),  # the model's own schedule, too
        "clip_skip": components.clip_skip,
        "resolution": cfg.data.resolution,
        "steps": steps,
        "max_steps": cfg.train.max_steps,
        "token": cfg.data.token,
        "class_name": cfg.data.class_name,
        "instance_prompt": cfg.data.resolved_instance_prompt(),
        "class_prompt": cfg.data.class_prompt,
        "with_prior": bool(cfg.data.class_dir),
        "rank": cfg.adapter.rank,
        "alpha": cfg.adapter.resolved_alpha,
        "conv_rank": cfg.adapter.conv_rank,
        "conv_alpha": cfg.adapter.resolved_conv_alpha,
        "train_text_encoder": cfg.adapter.train_text_encoder,
        **({"pivotal": {"token": cfg.data.token, "vectors": cfg.adapter.pivotal_vectors, "tokens": placeholders(cfg.data.token, cfg.adapter.pivotal_vectors)}} if cfg.adapter.pivotal else {}),
        "unet_layout": {key: components.unet.config[key] for key in ("layers_per_block", "down_block_types", "up_block_types")},
        **({"base_weights": [f"{path.name}:{scale:g}" for path, scale in map(lora_reference, cfg.model.base_weights)]} if cfg.model.base_weights else {}),
        "seed": cfg.train.seed,
        "dreamlora_version": __version__,
        "status": status,
        "processes": processes,
        **(dataset or {}),
        **(times or {}),
    }


def _recorded_start(run_dir: Path) -> int | None:
    """When the run in `run_dir` first started, from its run.json (None: not recorded, or unreadable)."""
    try:
        started = ckpt.read_run_info(run_dir).get("started_at")
    except (DreamloraError, OSError, ValueError, AttributeError):
        return None
    return int(started) if isinstance(started, (int, float)) else None


class RunControl:
    """What the loop and its guard share: the run folder once known, and a stop request from SIGINT/SIGTERM.

    As a context manager it routes SIGINT and SIGTERM to a flag the loop reads at each step boundary (then saves a
    checkpoint and stops); a second Ctrl-C aborts at once. The previous handlers are restored on exit.
    """

    def __init__(self) -> None:
        self.run_dir: Path | None = None
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> RunControl:
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _on_signal(self, number: int, frame: Any) -> None:
        # No logging here: a handler that takes the logging lock can deadlock the thread it interrupted.
        if self.signal_number is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_number = number

    def stop_requested(self, accelerator: Any) -> bool:
        """Whether any process received a stop signal (all processes agree, so they save and stop together)."""
        if accelerator.num_processes == 1:
            return self.signal_number is not None
        flag = torch.tensor([0.0 if self.signal_number is None else 1.0], device=accelerator.device)
        return accelerator.reduce(flag, reduction="sum").item() > 0


WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, getattr(errno, "EDQUOT", errno.ENOSPC)}


def train(
    cfg: RunConfig,
    components: Components | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    resume_from: Path | None = None,
    run_dir: Path | None = None,
) -> TrainResult:
    """Train UNet (and text-encoder) LoRAs with prior preservation; write the run folder; return what was done.
    `components` given by the caller are used as they are (`models.load_model` is what fuses `model.base_weights`).

    Faults end in a DreamloraError and never in a partial file: SIGINT/SIGTERM save a checkpoint at the step
    boundary (TrainingInterrupted); out of memory, a full disk or a non-finite loss keep the last checkpoint (TrainingError).
    """
    with RunControl() as control:
        try:
            return _train(cfg, components, on_log, resume_from, run_dir, control)
        except torch.cuda.OutOfMemoryError as error:
            raise TrainingError(out_of_memory_message(cfg, control.run_dir)) from error
        except OSError as error:
            if error.errno not in WRITE_ERRNOS or control.run_dir is None:
                raise
            where = Path(error.filename) if error.filename else control.run_dir
            raise TrainingError(ckpt.write_failure("the run files", where, error, control.run_dir)) from error


def out_of_memory_message(cfg: RunConfig, run_dir: Path | None) -> str:
    """Out of memory: the measured peak and the settings that lower it, with their current values."""
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        peak = f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated of {total / 2**30:.1f} GiB"
    else:
        peak = "peak not measured: no CUDA device"
    t, batch = cfg.train, cfg.train.batch_size
    levers = [
        f"--batch-size {max(1, batch // 2)} (now {batch}; add --gradient-accumulation {2 * t.gradient_accumulation} to keep the effective batch)" if batch > 1 else None,
        f"a lower --resolution (now {cfg.data.resolution or 'native'})",
        "gradient checkpointing (already on)" if t.gradient_checkpointing else "gradient checkpointing: drop --no-gradient-checkpointing",
        f"a smaller --rank (now {cfg.adapter.rank})",
        "--no-text-encoder" if cfg.adapter.train_text_encoder else None,
        "--precision bf16 (or fp16)" if cfg.model.precision == "fp32" else None,
    ]
    latest = ckpt.latest_checkpoint(run_dir) if run_dir is not None else None
    kept = f"checkpoint {latest.name} in {run_dir} is kept (resuming with changed settings needs --force)" if latest else "no checkpoint was written yet"
    return f"out of memory during training ({peak}). Levers: " + "; ".join(lever for lever in levers if lever) + f". Nothing partial was written; {kept}."


def _train(
    cfg: RunConfig,
    components: Components | None,
    on_log: Callable[[dict[str, Any]], None] | None,
    resume_from: Path | None,
    run_dir: Path | None,
    control: RunControl,
) -> TrainResult:
    run = _Trainer(cfg, components, on_log, resume_from, control)
    run.open_run(run_dir)
    return run.fit()


class _Trainer:
    """One training run: set up in phases (models and adapters, data and prompts, optimizer and schedule, run folder),
    then `fit` steps it, samples, logs, checkpoints and writes the LoRA."""

    def __init__(
        self, cfg: RunConfig, components: Components | None, on_log: Callable[[dict[str, Any]], None] | None, resume_from: Path | None, control: RunControl
    ) -> None:
        self.on_log, self.resume_from, self.control = on_log, resume_from, control
        self.accelerator, self.precision, self.weight_dtype = _make_accelerator(cfg)
        self.device = self.accelerator.device
        torch.manual_seed(cfg.train.seed)  # adapter initialisation
        self.components = components if components is not None else load_model(cfg.model, self.weight_dtype, self.device)
        apply_clip_skip(self.components, cfg.model.clip_skip)  # components given by the caller too
        if not cfg.data.resolution:
            cfg = replace(cfg, data=replace(cfg.data, resolution=self.components.native_resolution))
        self.cfg = cfg
        self._setup_models()
        self._setup_data()
        self._setup_optimizer()

    # --- setup ------------------------------------------------------------------------------------

    def _setup_models(self) -> None:
        """Adapters on the UNet (and text encoders), the pivotal embeddings, checkpointing and the noise schedule."""
        cfg, components = self.cfg, self.components
        self.unet, self.text_encoder, self.text_encoder_2 = components.unet, components.text_encoder, components.text_encoder_2  # text_encoder_2: SDXL's
        self.attention = select_attention(components, cfg.model.attention, self.device)
        components.vae.requires_grad_(False)
        self.train_te = cfg.adapter.train_text_encoder
        initial = _initial_lora_modules(cfg, components) if cfg.adapter.init_lora and self.resume_from is None else None  # names read before adapters wrap them
        attach_adapters(self.unet, self.text_encoder, cfg.adapter, self.text_encoder_2, components.family.penultimate_encoders)
        if initial is not None:
            parts = {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
            log.info("started from %d LoRA modules of %s", load_initial_weights(parts, initial, cfg.adapter.init_lora), cfg.adapter.init_lora)
        add_dropout_hooks([self.unet, self.text_encoder, self.text_encoder_2], cfg.adapter)
        self.pivotal = _attach_pivotal(cfg, components, self.resume_from) if cfg.adapter.pivotal else None
        if self.pivotal is None and initial is not None and (found := embeddings_for(ckpt.find_lora(Path(cfg.adapter.init_lora)))) is not None:
            log.warning("--init-lora carries a pivotal-tuned embedding of %r, which this run does not train or use; add --pivotal (and --token %s) to start from it", found[0], found[0])
        self.encode_each_step = self.train_te or self.pivotal is not None  # the text encoders run every step while something in them trains
        if cfg.train.gradient_checkpointing:
            _enable_checkpointing(components, self.encode_each_step, preserve_rng=cfg.adapter.any_dropout)
        self.noise_scheduler = training_scheduler(components.noise_scheduler, cfg)
        check_timestep_range(cfg, self.noise_scheduler)
        self.graphs = use_cuda_graphs(cfg, self.device, self.accelerator.num_processes, self.precision)

    def _setup_data(self) -> None:
        """Instance and class latents (cached once per image and flip) and the prompts, tokenized once."""
        cfg, components = self.cfg, self.components
        prepare_vae(components, self.weight_dtype)
        self.batches = DreamBoothBatches(cfg, components, self.device, self.accelerator.num_processes, self.accelerator.process_index)
        prompts = [self.pivotal.expand(p) for p in self.batches.prompts] if self.pivotal else self.batches.prompts  # the token as its new tokens
        self.max_tokens = cfg.data.max_token_length
        weighted = cfg.data.weighted_captions
        warn_long_prompts(components.tokenizers[0], [plain_text(p) for p in prompts] if weighted else prompts, self.max_tokens)
        self.tokens = PromptTokens.of(components, prompts, self.max_tokens, weighted, self.device)
        self.text_encoders = list(components.text_encoders.values())
        self.cached_embeddings: PromptEmbeddings | None = None
        if not self.encode_each_step:
            with torch.no_grad():
                self.cached_embeddings = self.tokens.encode(components)

    def _setup_optimizer(self) -> None:
        """Optimizer groups (and learning rates) for the UNet, each text encoder and the embeddings; the schedule; the
        max-norm limiter; then the models and optimizer prepared by accelerate."""
        cfg, components, accelerator = self.cfg, self.components, self.accelerator
        groups = {"unet": trainable_parameters(self.unet)}
        if self.train_te:
            groups.update({name: trainable_parameters(encoder) for name, encoder in components.text_encoders.items()})
        if self.pivotal:
            groups["embeddings"] = list(self.pivotal.parameters())
        self.groups = groups
        self.masters = MasterWeights(groups, self.weight_dtype) if self.weight_dtype == torch.bfloat16 and accelerator.mixed_precision == "no" else None
        up_weights = {"unet": up_weight_flags(self.unet), **({name: up_weight_flags(encoder) for name, encoder in components.text_encoders.items()} if self.train_te else {})}
        factors = {"unet": block_lr_factors(self.unet, cfg.adapter)} if cfg.adapter.block_weights_set else None
        optimizer = make_optimizer(
            self.masters.masters if self.masters else groups, cfg, self.device, capturable=self.graphs, up_weights=up_weights, lr_factors=factors,
            lr_scale=cfg.train.lr_scale(accelerator.num_processes),
        )
        self.fp32_lora = self.masters.fp32_in_model if self.masters else contextlib.nullcontext
        self.limiter = None
        if cfg.train.scale_weight_norms:
            masters = self.masters
            substitute = {p: m for name in masters.params for p, m in zip(masters.params[name], masters.masters[name])} if masters else None
            self.limiter = WeightNormLimiter([self.unet, self.text_encoder, self.text_encoder_2], cfg.train.scale_weight_norms, substitute)
        self.lr_scheduler = make_lr_scheduler(optimizer, cfg)
        # Logged rates: the UNet's, the (first) text encoder's and the embeddings' own (a group's rate over its "scale":
        # LoRA+ and block weights move groups off the model's rate).
        self.logged_groups = {key: [g["model"] for g in optimizer.param_groups].index(name) for key, name in LOGGED_RATES.items() if name in groups}
        prepared = accelerator.prepare(*([self.unet, *self.text_encoders] if self.train_te else [self.unet]), optimizer)
        self.unet = prepared[0]
        if self.train_te:
            self.text_encoders = list(prepared[1:-1])  # wrapped for training, in the family's order
            self.text_encoder = self.text_encoders[0]
            self.text_encoder_2 = self.text_encoders[1] if len(self.text_encoders) > 1 else None
        self.optimizer = prepared[-1]
        # The prepared (DDP-wrapped) models: accumulate() then skips the gradient all-reduce of all but a step's last micro-batch.
        self.models = list(prepared[:-1])
        self.context_fn = (lambda: self.tokens.encode(components, self.text_encoders)) if self.encode_each_step else (lambda: self.cached_embeddings)  # noqa: E731

    def open_run(self, run_dir: Path | None) -> None:
        """The run folder (created by the main process, its path shared with the others), a resumed run's state, the
        config and run.json, trackers, and the base model's sample images (made once, before any step)."""
        cfg, accelerator = self.cfg, self.accelerator
        if run_dir is None:
            path, auto = default_run_dir(cfg)
            run_dir = ckpt.create_run_dir(path, auto) if accelerator.is_main_process else path
            run_dir = _broadcast_path(accelerator, run_dir)
        self.run_dir = self.control.run_dir = run_dir
        plan = self.batches.plan
        self.dataset = {
            "precision": self.precision,
            "instance_images": len(self.batches.sources[0]),
            "class_images": len(self.batches.sources[1]) if self.batches.with_prior else 0,
            "batches_per_epoch": plan.batches_per_epoch,
            "steps_per_epoch": steps_per_epoch(plan, accelerator.num_processes, cfg.train.gradient_accumulation),
            "tag_frequency": self.batches.tag_frequency,
        }
        if self.batches.held_out is not None:
            self.dataset["validation_class_images"] = [path.name for path in self.batches.held_out.folder.paths]
        if cfg.model.base_weights:  # what was fused in, so a file replaced later is noticed (`generate.changed_base_weights`)
            self.dataset[BASE_WEIGHTS_RECORD] = base_weight_hashes(cfg.model.base_weights)
        self.times = {"started_at": int(time.time())}
        self.start_step = 0
        if self.resume_from is not None:
            if recorded := _recorded_start(run_dir):
                self.times["started_at"] = recorded  # a resumed run started when it first did
            fused_before = ckpt.read_run_info(run_dir).get(BASE_WEIGHTS_RECORD) or {}
            if changed := changed_base_weights(fused_before, cfg.model.base_weights, self.dataset.get(BASE_WEIGHTS_RECORD, {})):
                log.warning("base weights %s changed since the run started: the rest of it trains on another base than its first steps", ", ".join(changed))
            check_resume_step(int(ckpt.load_checkpoint_state(self.resume_from)["step"]), cfg.train.max_steps, self.resume_from)
            with self.fp32_lora():
                self.start_step = _restore(self.resume_from, accelerator, self.unet, self.text_encoder, self.optimizer, self.lr_scheduler, self.text_encoder_2)
            if accelerator.is_main_process:
                _truncate_metrics(run_dir / ckpt.METRICS_FILE, self.start_step)
        if accelerator.is_main_process:
            ckpt.write_atomic(run_dir / ckpt.CONFIG_FILE, to_toml(cfg).encode("utf-8"))
            ckpt.write_json(run_dir / ckpt.RUN_INFO, self.run_info(self.start_step, "running"))
            if cfg.train.report_to:
                _start_trackers(accelerator, cfg, run_dir)
        self.adapted_prompt = self.pivotal.expand if self.pivotal else None  # samples spell the token as its new tokens; base images do not
        sampling = cfg.train.sample_every and cfg.train.num_samples and accelerator.is_main_process
        self.monitor = _make_monitor(cfg, self.components, run_dir, self.adapted_prompt) if sampling else None
        self.validator = self._make_validator() if cfg.train.validate_every and accelerator.is_main_process else None
        self.parked_vae = ParkedVae(self.components.vae, self.device, enabled=not self.batches.needs_vae)
        self.parked_vae.park()

    def _make_validator(self) -> Validator:
        """--validate-every: the held-out class images and the photos at fixed timesteps and noise; the base model's loss now."""
        cfg, components = self.cfg, self.components
        generator = torch.Generator().manual_seed(cfg.train.seed + 2**42)  # on the CPU: the same noise on any device
        encode = functools.partial(encode_latent_stats, components.vae, where="the validation images")
        sets = []
        if self.batches.held_out is not None:
            sets.append(make_set("val_class", self.batches.held_out, components, self.noise_scheduler, generator, encode))
        else:
            log.warning("--validate-every: no class images to hold out (no prior set), so only the fit to the photos is measured")
        sets.append(make_set("fit_instance", self.batches.instance, components, self.noise_scheduler, generator, encode))
        max_tokens, weighted = self.max_tokens, cfg.data.weighted_captions

        def encode_prompts(prompts: list[str]) -> PromptEmbeddings:
            return PromptTokens.of(components, prompts, max_tokens, weighted, self.device).encode(components)

        return Validator(components, sets, encode_prompts, self.weight_dtype, self.accelerator.autocast, self.adapted_prompt)

    # --- what the run writes ----------------------------------------------------------------------

    def run_info(self, steps: int, status: str) -> dict[str, Any]:
        if status == "finished":
            self.times["finished_at"] = int(time.time())
        return _run_info(self.cfg, self.components, self.run_dir, steps, status, self.accelerator.num_processes, self.dataset, self.times)

    def unwrapped(self) -> dict[str, torch.nn.Module]:
        out = {"unet": self.accelerator.unwrap_model(self.unet)}
        if self.train_te:
            out.update({name: self.accelerator.unwrap_model(encoder) for name, encoder in zip(self.components.text_encoders, self.text_encoders)})
        return out

    def write_lora(self, folder: Path) -> Path:
        parts = self.unwrapped()
        with self.fp32_lora():
            path = save_diffusers_lora(folder, adapter_state_dicts(parts), {k: adapter_metadata(m) for k, m in parts.items()})
            if self.pivotal:
                save_embeddings(folder / EMBEDDINGS_FILE, self.pivotal.token, self.pivotal.tensors())
            return path

    def _schedule_free(self) -> Any:
        """The schedule-free optimizer (its own object, not accelerate's wrapper), or None for the others."""
        return getattr(self.optimizer, "optimizer", self.optimizer) if self.cfg.train.optimizer == "adamw_schedulefree" else None

    def _set_weights(self, averaged: bool) -> None:
        """Schedule-free keeps two points: the average x it exports (eval mode) and the point y gradients are taken at
        (train mode); put one of them in the model. Going to x, y is kept in the optimizer's state (so a checkpoint
        holds it too); coming back, y is restored exactly, not recomputed from x (which rounds): sampling and
        checkpoints do not move training, and a resumed run ends bit-identical. With bf16 master weights, the masters
        hold the point and the model gets their copy."""
        optimizer = self._schedule_free()
        if optimizer is None:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        with torch.no_grad():
            if averaged:
                for param in params:
                    if "z" in optimizer.state[param]:
                        optimizer.state[param]["y"] = param.detach().clone()
                optimizer.eval()
            else:
                optimizer.train()
                for param in params:
                    if (y := optimizer.state[param].pop("y", None)) is not None:
                        param.copy_(y)
        if self.masters:
            self.masters.masters_to_model()

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """Inside: schedule-free's averaged weights, the ones saved and sampled; after, training's. Every process
        switches alike (the round trip rounds, and the processes' weights must stay equal). No-op for other optimizers."""
        self._set_weights(averaged=True)
        try:
            yield
        finally:
            self._set_weights(averaged=False)

    def training_state(self, step: int) -> dict[str, Any]:
        scaler = self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None
        return {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(), "scaler": scaler, "rng": ckpt.capture_rng_state(), "config": to_dict(self.cfg)}

    # --- the loop ---------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        cfg = self.cfg
        self.started = time.perf_counter()
        self.bad_steps, self.skipped, self.loss_value = 0, 0, float("nan")
        # Each trained part of the text encoders freezes at its stop step (--text-encoder-steps-fraction, --pivotal-steps-fraction);
        # once all have, encode_each_step turns False and the prompts' encoding is computed once.
        self.frozen: set[str] = set()
        for model in (self.unet, *self.text_encoders) if self.train_te else (self.unet,):
            model.train()  # the text encoders load in eval mode: LoRA dropout needs training mode
        self.allow_zero = cfg.adapter.module_dropout > 0  # every LoRA of a group may be skipped in the first step
        self.graph_step = self._make_graph_step() if self.graphs else None
        self._set_weights(averaged=False)  # schedule-free steps in train mode (a checkpoint holds the average)
        for step in range(self.start_step, cfg.train.max_steps):
            if self.encode_each_step and self.graph_step is None:
                self._freeze_finished_parts(step)
            for micro in range(cfg.train.gradient_accumulation):
                batch = self.batches.draw_batch(step * cfg.train.gradient_accumulation + micro)
                inputs = diffusion_inputs(cfg, self.noise_scheduler, batch.latents, batch.generator)
                if self.graph_step is not None:
                    self._graph_micro_step(step, batch, *inputs)
                else:
                    self._eager_micro_step(step, batch, *inputs)
            self._after_step(step + 1)
        return self._finish()

    def _make_graph_step(self) -> CudaGraphStep:
        """The whole step (forward, backward, clipping, AdamW) captured once as a CUDA graph and replayed."""
        cfg = self.cfg

        def graph_loss(
            rows: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, size_ids: torch.Tensor, huber_c: torch.Tensor
        ) -> Any:
            # The text encoders stay in the graph after --text-encoder-steps-fraction: their learning rate is 0 from then on.
            return batch_loss(
                self.unet, self.context_fn, rows, noisy, timesteps, target, cfg.train.batch_size, cfg.train.prior_weight, self.weight_dtype, weights, size_ids,
                self.components.family.added_conditioning, cfg.train.loss, huber_c,
            )

        params = [p for ps in self.groups.values() for p in ps]
        first_check = (lambda: check_gradients(self.groups, self.allow_zero)) if self.start_step == 0 or self.resume_from is not None else None  # noqa: E731
        return CudaGraphStep(graph_loss, params, getattr(self.optimizer, "optimizer", self.optimizer), cfg.train.max_grad_norm, self.masters, first_check)

    def _freeze_finished_parts(self, step: int) -> None:
        """Stop training the text-encoder LoRAs and embeddings whose stop step has come; once all have, encode once."""
        for name in [n for n in self.groups if n != "unet" and n not in self.frozen and step >= self.cfg.train.stop_step(n)]:
            _freeze(self.groups[name])
            self.frozen.add(name)
        if len(self.frozen) == len(self.groups) - 1:
            self.cached_embeddings = _fixed_encoding(self.components, self.text_encoders, self.tokens)
            self.encode_each_step = False
            self.context_fn = lambda: self.cached_embeddings  # noqa: E731

    def _graph_micro_step(self, step: int, batch: DrawnBatch, noisy: torch.Tensor, timesteps: torch.Tensor, target: torch.Tensor, weights: Any, huber_c: Any) -> None:
        """One replay runs forward, backward, clipping and AdamW; a non-finite loss skips the update in-graph."""
        ones = torch.ones(len(batch.rows), device=self.device)  # static inputs the plain loss does not read
        self.losses = self.graph_step(batch.rows, noisy, timesteps, target, ones if weights is None else weights, batch.size_ids, ones if huber_c is None else huber_c)
        if self.graph_step.capture_seconds and step == self.start_step:
            log.info("CUDA graph captured in %.1f s", self.graph_step.capture_seconds)
        if self.limiter is not None:
            self.limiter()  # outside the graph, on the weights it reads
            if self.masters:
                self.masters.masters_to_model()

    def _eager_micro_step(self, step: int, batch: DrawnBatch, noisy: torch.Tensor, timesteps: torch.Tensor, target: torch.Tensor, weights: Any, huber_c: Any) -> None:
        cfg, accelerator, components = self.cfg, self.accelerator, self.components
        with accelerator.accumulate(*self.models), accelerator.autocast():
            # Encode each distinct prompt of this step once and index it: gradients still reach every row.
            if batch.texts is not None:
                expand = self.pivotal.expand if self.pivotal else None
                context_fn, rows = _varied_prompts(
                    components, batch.texts, self.text_encoders, self.encode_each_step, expand, self.device, self.max_tokens, cfg.data.weighted_captions,
                )
            else:
                used, rows = batch.rows.unique(return_inverse=True)  # with captions, only this step's prompts
                step_tokens = self.tokens.select(used)
                if self.encode_each_step:
                    context_fn = lambda: step_tokens.encode(components, self.text_encoders)  # noqa: E731
                else:
                    context_fn = lambda: self.cached_embeddings.select(used)  # noqa: E731
            self.losses = batch_loss(
                self.unet, context_fn, rows, noisy, timesteps, target, cfg.train.batch_size, cfg.train.prior_weight, self.weight_dtype, weights, batch.size_ids,
                components.family.added_conditioning, cfg.train.loss, huber_c, batch.masks,
            )
            loss = self.losses[0]
            if not torch.isfinite(loss):
                # A non-finite loss must not reach the weights: skip the step and stop after several in a row.
                self.optimizer.zero_grad(set_to_none=True)
                return
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                self._before_update(step, batch)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.limiter is not None and accelerator.sync_gradients:
                self.limiter()
            if self.masters and accelerator.sync_gradients:
                self.masters.masters_to_model()

    def _before_update(self, step: int, batch: DrawnBatch) -> None:
        """Gradients summed over the step's micro-batches: checked on the first step, averaged, moved to the masters, clipped."""
        if step == self.start_step:  # a first batch whose masks hide every pixel (a black mask) teaches nothing, rightly
            hidden = batch.masks is not None and not bool(batch.masks.any())
            check_gradients({name: ps for name, ps in self.groups.items() if name not in self.frozen}, self.allow_zero or hidden)
        if self.pivotal and self.accelerator.num_processes > 1 and "embeddings" not in self.frozen:
            self.pivotal.average_gradients(self.accelerator)  # outside any prepared model, so DDP does not average them
        if self.masters:
            self.masters.grads_to_masters()
        if self.cfg.train.max_grad_norm > 0:
            trained = self.masters.masters if self.masters else self.groups
            self.accelerator.clip_grad_norm_([p for ps in trained.values() for p in ps], self.cfg.train.max_grad_norm)

    def _after_step(self, done: int) -> None:
        """Non-finite steps counted (and too many in a row stop the run), the schedule moved on, samples drawn,
        metrics logged, a checkpoint written, and a stop request honoured."""
        cfg = self.cfg
        every, validate_every = cfg.train.sample_every, cfg.train.validate_every
        sample_now = bool(every) and (done % every == 0 or done == cfg.train.max_steps)  # the same on every process
        validate_now = bool(validate_every) and (done % validate_every == 0 or done == cfg.train.max_steps)
        log_now = sample_now or validate_now or done % cfg.train.log_every == 0 or done == cfg.train.max_steps or done == self.start_step + 1
        self._count_non_finite(done, log_now)
        # The rates this step used, read before the schedule moves on (only to log: on the graphed path they are GPU tensors).
        step_lrs = [float(rate) for rate in self.lr_scheduler.get_last_lr()] if log_now else []
        self.lr_scheduler.step()
        drift = {}
        if sample_now or validate_now:
            with self.averaged_weights():  # every process switches alike (once a step); the main process samples and measures
                if sample_now and self.monitor is not None:
                    with self.parked_vae.on_device():
                        drift = self.monitor.sample(done)
                if validate_now and self.validator is not None:
                    drift.update(self.validator.measure())
        if log_now:
            self._log(done, step_lrs, drift)
        self._checkpoint_or_stop(done)

    def _count_non_finite(self, done: int, log_now: bool) -> None:
        """The graphed step is not synced between logs: non-finite steps were skipped in-graph and counted on the
        device; read at log steps (the run of them that stops training is the longest since capture)."""
        if self.graph_step is not None:
            if log_now:
                total, self.bad_steps, worst = self.graph_step.skip_counts()
                if total > self.skipped:
                    log.warning("steps up to %d: %d non-finite losses, those steps skipped", done, total - self.skipped)
                self.skipped = total
                if worst >= MAX_BAD_STEPS:
                    raise _non_finite_error(self.run_dir, worst, f"by step {done}", self.skipped, self.cfg.train.lr)
        elif not torch.isfinite(self.losses[0]):
            self.bad_steps, self.skipped = self.bad_steps + 1, self.skipped + 1
            log.warning("step %d: non-finite loss, step skipped", done)
            if self.bad_steps >= MAX_BAD_STEPS:
                raise _non_finite_error(self.run_dir, self.bad_steps, f"step {done}", self.skipped, self.cfg.train.lr)
        else:
            self.bad_steps = 0

    def _log(self, done: int, step_lrs: list[float], drift: dict[str, float]) -> None:
        accelerator = self.accelerator
        loss, instance_loss, prior_loss = (accelerator.reduce(value.detach(), reduction="mean").item() for value in self.losses)
        self.loss_value = loss
        elapsed = time.perf_counter() - self.started
        record = {
            "step": done,
            "loss": loss,
            "instance_loss": instance_loss,
            "prior_loss": prior_loss,
            **{key: step_lrs[index] / (self.optimizer.param_groups[index].get("scale") or 1.0) for key, index in self.logged_groups.items()},
            "time": round(elapsed, 3),
            "it_s": (done - self.start_step) / elapsed if elapsed > 0 else 0.0,
            **(self.limiter.stats() if self.limiter is not None else {}),
            **drift,
        }
        if accelerator.is_main_process:
            with (self.run_dir / ckpt.METRICS_FILE).open("a", encoding="utf-8") as handle:
                handle.write(ckpt.json_line(record))
            if self.cfg.train.report_to:
                accelerator.log(record, step=done)
            if self.on_log:
                self.on_log({**record, "max_steps": self.cfg.train.max_steps})

    def _checkpoint_or_stop(self, done: int) -> None:
        """Every N steps and at the last one (so `--resume --max-steps M` can extend a finished run from where it
        ended); on SIGINT/SIGTERM, a checkpoint at this step boundary (unless one was just written), then a clean stop."""
        cfg, accelerator, run_dir = self.cfg, self.accelerator, self.run_dir
        every = cfg.train.checkpoint_every
        if every and (done % every == 0 or done == cfg.train.max_steps) and self.bad_steps == 0:
            accelerator.wait_for_everyone()
            with self.averaged_weights():
                if accelerator.is_main_process:
                    ckpt.save_checkpoint(run_dir, done, self.write_lora, self.training_state(done), cfg.train.keep_checkpoints)
                    ckpt.write_json(run_dir / ckpt.RUN_INFO, self.run_info(done, "running"))
        if done < cfg.train.max_steps and self.control.stop_requested(accelerator):
            accelerator.wait_for_everyone()
            folder = ckpt.checkpoint_dir(run_dir, done)
            with self.averaged_weights():
                if accelerator.is_main_process:
                    if not (every and done % every == 0 and self.bad_steps == 0):
                        ckpt.save_checkpoint(run_dir, done, self.write_lora, self.training_state(done), cfg.train.keep_checkpoints)
                    ckpt.write_json(run_dir / ckpt.RUN_INFO, self.run_info(done, "interrupted"))
            number = self.control.signal_number or signal.SIGTERM
            raise TrainingInterrupted(
                f"training stopped by {signal.Signals(number).name} after step {done} of {cfg.train.max_steps}; checkpoint saved in {folder}. "
                f"Continue with: dreamlora train --out {run_dir} --resume",
                number,
            )

    def _finish(self) -> TrainResult:
        """The final LoRA, run.json, sample grid and curves; the caller's text encoders keep a pivotal run's tokens."""
        cfg, accelerator = self.cfg, self.accelerator
        accelerator.wait_for_everyone()
        seconds = time.perf_counter() - self.started
        lora_path = self.run_dir / ckpt.LORA_DIR / LORA_FILE
        samples: list[Path] = []
        self.parked_vae.unpark()  # for the final pictures, and where a caller passing `components` expects it
        self._set_weights(averaged=True)  # schedule-free: the average is the result
        if accelerator.is_main_process:
            lora_path = ckpt.write_folder_atomic(self.run_dir / ckpt.LORA_DIR, self.write_lora) / LORA_FILE
            ckpt.write_json(self.run_dir / ckpt.RUN_INFO, self.run_info(cfg.train.max_steps, "finished"))
            samples = _final_pictures(cfg, self.components, self.unwrapped(), self.run_dir, self.monitor, self.adapted_prompt)
        if self.pivotal is not None:
            self.pivotal.bake()  # the caller's text encoders keep the trained tokens, without the training hook
        accelerator.wait_for_everyone()  # the process group is torn down together, not while the main process still writes
        accelerator.end_training()
        capture = self.graph_step.capture_seconds if self.graph_step is not None else 0.0
        return TrainResult(
            self.run_dir, cfg.train.max_steps, self.loss_value, seconds, lora_path, self.attention, self.precision, self.batches.with_prior, self.skipped, samples,
            self.graphs, capture,
        )


def warn_long_prompts(tokenizer: Any, prompts: list[str], max_tokens: int = 0) -> list[str]:
    """Warn about prompts (long captions) cut where `tokenize` stops reading (`models.read_length`); returns them."""
    limit = read_length(tokenizer, max_tokens)
    long = [(prompt, n) for prompt in prompts if (n := len(tokenizer(prompt).input_ids)) > limit]
    if long:
        shown = "; ".join(f"{prompt[:60]!r}{'...' if len(prompt) > 60 else ''} ({n} tokens)" for prompt, n in long[:3])
        log.warning(
            "%d prompt(s) are longer than the %d tokens read and are cut there: %s%s. "
            "Shorten those captions to keep their ends, or read up to 150 or 225 tokens with --max-token-length",
            len(long), limit, shown, " ..." if len(long) > 3 else "",
        )
    return [prompt for prompt, _ in long]


def _broadcast_path(accelerator: Any, path: Path) -> Path:
    if accelerator.num_processes == 1:
        return path
    from accelerate.utils import broadcast_object_list

    holder = [str(path)]
    broadcast_object_list(holder, from_process=0)
    return Path(holder[0])


def _restore(folder: Path, accelerator: Any, unet: Any, text_encoder: Any, optimizer: Any, lr_scheduler: Any, text_encoder_2: Any = None) -> int:
    """Load LoRA weights, optimizer, LR schedule and scaler from a checkpoint; return its step."""
    from dreamlora.export import fit_problems, modules_from_peft
    from dreamlora.lora import read_diffusers_lora

    state_dicts, metadata = read_diffusers_lora(folder / ckpt.LORA_DIR)
    models = {"unet": accelerator.unwrap_model(unet), "text_encoder": accelerator.unwrap_model(text_encoder)}
    if text_encoder_2 is not None:
        models["text_encoder_2"] = accelerator.unwrap_model(text_encoder_2)
    modules = modules_from_peft(state_dicts, metadata)
    if problems := fit_problems(models, modules):
        raise ConfigError(
            f"--resume: checkpoint {folder} does not fit the base model it was loaded on: {len(problems)} of {len(modules)} modules differ "
            f"(first: {problems[0]}), so the base is not the model the run started on (a hub branch that moved, a local folder replaced); "
            "give the run its own base model back, or start a new run"
        )
    state = ckpt.load_checkpoint_state(folder)
    saved_groups = len(state["optimizer"]["param_groups"])
    if saved_groups != len(optimizer.param_groups):
        raise ConfigError(
            f"--resume: checkpoint {folder} holds {saved_groups} optimizer parameter groups, this run has {len(optimizer.param_groups)} "
            "(LoRA+ or --no-text-encoder changed); resume with the run's own settings (drop --force), or start a new run"
        )
    load_adapters(models, state_dicts, metadata)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    # The learning rates come from this run's schedule, not the saved ones: they differ when --max-steps grew (a finished
    # run's text-encoder rate is 0 at its last step, where its stop step was).
    rates = [base * factor(lr_scheduler.last_epoch) for base, factor in zip(lr_scheduler.base_lrs, lr_scheduler.lr_lambdas)]
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    lr_scheduler._last_lr = rates
    if state.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    if state.get("rng"):
        ckpt.restore_rng_state(state["rng"])  # adapter dropout draws from the global generators
    return int(state["step"])


class ParkedVae:
    """The VAE waits in CPU memory while the steps need none (every latent cached), as kohya's sd-scripts keep it after
    caching latents: its weights (~0.16 GiB for SD 1.5 in half precision) leave the GPU's peak. Sampling brings it back
    for the while it draws. Only on CUDA (elsewhere there is nothing to free) and only when `enabled`."""

    def __init__(self, vae: torch.nn.Module, device: torch.device, enabled: bool) -> None:
        self.vae, self.device = vae, device
        self.enabled = enabled and device.type == "cuda"

    def park(self) -> None:
        if self.enabled:
            self.vae.to("cpu")
            torch.cuda.empty_cache()

    def unpark(self) -> None:
        """Back on the training device, where the caller's components had it."""
        if self.enabled:
            self.vae.to(self.device)

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        """The VAE on the training device inside the block, parked again after it."""
        self.unpark()
        try:
            yield
        finally:
            self.park()


def _final_pictures(
    cfg: RunConfig, components: Components, models: dict[str, torch.nn.Module], run_dir: Path, monitor: Any = None, adapted_prompt: Callable[[str], str] | None = None
) -> list[Path]:
    """Sample grid (base vs trained, instance and class prompts; reusing the monitor's images where it has them) and the curves."""
    from dreamlora.generate import comparison_grid, plot_metrics

    written = []
    for model in models.values():
        model.eval()
    if cfg.train.num_samples > 0:
        prompts = list(dict.fromkeys(p for p in (*_sample_prompts(cfg), *cfg.train.sample_prompts) if p))
        base = monitor.base if monitor is not None else None
        adapted = monitor.latest[1] if monitor is not None and monitor.latest[0] == cfg.train.max_steps else None
        guidance = cfg.prior.resolved_guidance(components.family.default_guidance)
        grid = comparison_grid(
            components, prompts, cfg.train.num_samples, cfg.train.seed, cfg.prior.steps, guidance, cfg.data.resolution, base, adapted, adapted_prompt,
            cfg.train.sample_scheduler, literal=_sample_prompts(cfg),
        )
        samples_dir = run_dir / "samples"
        samples_dir.mkdir(exist_ok=True)
        grid.save(samples_dir / "final.png")
        written.append(samples_dir / "final.png")
    plot = plot_metrics(run_dir / ckpt.METRICS_FILE, run_dir / "loss.png")
    if plot is not None:
        written.append(plot)
    return written


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the checkpoint a run resumes from (they are recomputed)."""
    import json

    if path.is_file():
        lines = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    lines.append(line)
            except (ValueError, KeyError, TypeError):  # a line cut short by a killed process
                continue
        ckpt.write_atomic(path, "".join(line + "\n" for line in lines).encode("utf-8"))


# Keys that may differ when resuming without changing the result.
RESUME_FREE_KEYS = {
    "train.out", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.sample_every", "train.checkpoint_every_epochs", "train.sample_every_epochs",
    "train.num_samples", "train.sample_prompts", "train.sample_scheduler", "model.attention", "prior.batch_size", "train.compile", "train.report_to", "model.allow_pickle",
    "data.latent_cache_dir",
}


def resume_point(run_dir: Path | None, resume_from: Path | None, runs_root: Path = Path("runs")) -> tuple[Path, Path]:
    """The run folder and checkpoint to continue: `--resume-from PATH`, or the latest checkpoint of a run."""
    if resume_from is not None:
        folder = Path(resume_from)
        ckpt.load_checkpoint_state(folder)  # validates the folder
        return folder.parent.parent, folder
    if run_dir is None:
        try:
            run_dir = ckpt.latest_run(runs_root)
        except Exception as error:  # noqa: BLE001 - re-raised with the resume wording
            raise ConfigError(f"--resume found nothing to resume: {error}") from error
    if not (Path(run_dir) / ckpt.CONFIG_FILE).is_file():
        raise ConfigError(f"--resume: '{run_dir}' is not a dreamlora run folder; pass --out runs/NAME of an earlier run")
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        raise ConfigError(f"--resume: run '{run_dir}' has no complete checkpoint to resume from; start a new run (use --checkpoint-every N to make checkpoints)")
    return Path(run_dir), latest


def check_resume_step(step: int, max_steps: int, checkpoint: Path) -> None:
    """A resume must have steps left to train: a checkpoint at or past --max-steps is refused, saying how to extend."""
    if step >= max_steps:
        already = "finished" if step == max_steps else f"past --max-steps {max_steps}"
        raise ConfigError(
            f"--resume: checkpoint {checkpoint} is at step {step}, so the run is already {already}; pass --max-steps "
            f"larger than {step} to train it further (a schedule other than constant then needs --force, as it changes)"
        )


def _constant_schedules(cfg: RunConfig) -> bool:
    t = cfg.train
    return t.lr_scheduler == "constant" and t.text_encoder_lr_scheduler in ("", "constant") and t.text_encoder_steps_fraction == 1.0


def changed_keys(saved: RunConfig, new: RunConfig) -> list[str]:
    """Settings that differ between a saved run and a resume request and would change its result."""
    before, after = to_dict(saved), to_dict(new)
    keys = []
    for section, values in after.items():
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if dotted in RESUME_FREE_KEYS or before[section].get(key) == value:
                continue
            if dotted == "train.validate_every" and before[section].get(key) and value:
                continue  # how often to validate; turning it on or off changes which class images training draws
            if dotted in ("train.max_steps", "train.epochs") and _constant_schedules(new) and max(new.train.warmup_steps, new.train.text_encoder_warmup_steps) < min(saved.train.max_steps, new.train.max_steps):
                continue  # a constant schedule does not depend on the step budget
            keys.append(f"{dotted}: {before[section].get(key)!r} -> {value!r}")
    return keys
