"""DreamBooth-LoRA training: the recipe from a RunConfig to a run folder with the trained LoRA."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dreamlora import __version__
from dreamlora import checkpoint as ckpt
from dreamlora.config import RunConfig, replace, to_toml
from dreamlora.data import ImageFolderDataset, batch_indices, list_images, resize_and_crop, to_tensor
from dreamlora.errors import ConfigError, TrainingError
from dreamlora.lora import adapter_metadata, adapter_state_dicts, attach_adapters, load_adapters, save_diffusers_lora, trainable_parameters
from dreamlora.models import Components, encode_prompts, load_components, public_model_ref, resolve_precision, select_attention, tokenize_all
from dreamlora.prior import MANIFEST, read_prior_set, safe_name

log = logging.getLogger(__name__)

COMMON_WORDS = {"a", "an", "the", "dog", "cat", "man", "woman", "person", "photo", "car", "toy", "of", "and", "my", "style"}
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


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, n_instance: int, prior_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MSE on the instance half plus `prior_weight` x MSE on the class half (rows after `n_instance`), in fp32."""
    pred, target = pred.float(), target.float()
    instance_loss = F.mse_loss(pred[:n_instance], target[:n_instance])
    if pred.shape[0] == n_instance:
        return instance_loss, instance_loss, torch.zeros_like(instance_loss)
    prior_loss = F.mse_loss(pred[n_instance:], target[n_instance:])
    return instance_loss + prior_weight * prior_loss, instance_loss, prior_loss


def diffusion_target(noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict, read from the scheduler's `prediction_type`."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise TrainingError(f"unsupported prediction_type {prediction_type!r} in the model's scheduler; dreamlora trains epsilon and v_prediction models")


# --- data resolution ------------------------------------------------------------------------------


def resolve_data(cfg: RunConfig, priors_root: Path = Path("priors")) -> tuple[RunConfig, bool]:
    """Fill in class folder, class name and prompts; return the config and whether a prior set must be generated first."""
    data = cfg.data
    if not data.instance_dir:
        raise ConfigError("no instance folder; pass --instance ./photos (a folder of 3-20 photos of the subject)")
    list_images(data.instance_dir, "instance")
    if data.token.lower() in COMMON_WORDS:
        log.warning("token %r is a common word the model already knows; a rare token such as `sks` personalizes better", data.token)
    needs_prior = False
    class_dir, class_name, class_prompt = data.class_dir, data.class_name, data.class_prompt
    if not class_dir and class_name:
        class_dir = str(priors_root / safe_name(class_name))
        needs_prior = not (Path(class_dir) / MANIFEST).is_file() or len(read_prior_set(Path(class_dir))["files"]) < cfg.prior.num_images
    elif not class_dir:
        sets = sorted(p.parent for p in priors_root.glob(f"*/{MANIFEST}"))
        if len(sets) == 1:
            class_dir = str(sets[0])
            log.info("using the prior set in %s for prior preservation", class_dir)
        elif len(sets) > 1:
            names = ", ".join(p.name for p in sets)
            raise ConfigError(f"several prior sets in {priors_root}/ ({names}); choose one with --class NAME")
        else:
            log.warning("no prior set found in %s/: training without prior preservation (the class may drift); run `dreamlora prior --class NAME` first to keep it", priors_root)
    if class_dir and (Path(class_dir) / MANIFEST).is_file():
        manifest = read_prior_set(Path(class_dir))
        class_name = class_name or manifest.get("class_name", "")
        class_prompt = class_prompt or manifest["prompt"]
    if class_dir and not needs_prior:
        list_images(class_dir, "class")
        if not class_prompt:
            raise ConfigError(f"class folder '{class_dir}' has no manifest.json; pass --class-prompt (e.g. 'a photo of dog')")
    data = replace(data, class_dir=class_dir, class_name=class_name, class_prompt=class_prompt)
    prior = replace(cfg.prior, class_name=cfg.prior.class_name or class_name, out=cfg.prior.out or class_dir)
    if needs_prior and not prior.class_name:
        raise ConfigError("a prior set must be generated but no class name is known; pass --class NAME")
    return replace(cfg, data=data, prior=prior), needs_prior


def default_run_dir(cfg: RunConfig, runs_root: Path = Path("runs")) -> tuple[Path, bool]:
    """The run folder and whether its name was chosen automatically (then a free suffix is added)."""
    if cfg.train.out:
        return Path(cfg.train.out), False
    name = "-".join(safe_name(part) for part in (cfg.data.token, cfg.data.class_name or "subject"))
    return runs_root / name, True


# --- latent cache --------------------------------------------------------------------------------


@torch.no_grad()
def encode_latent_stats(vae: torch.nn.Module, pixels: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior for each image; a step then samples latents without running the VAE."""
    means, stds = [], []
    for start in range(0, pixels.shape[0], batch_size):
        chunk = pixels[start : start + batch_size].to(vae.device, vae.dtype)
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def check_latents(means: torch.Tensor, vae: torch.nn.Module, where: str) -> None:
    """Refuse NaN/inf latents at once: a VAE overflowing in fp16 (SDXL's does) would otherwise train on garbage."""
    bad = int((~torch.isfinite(means.flatten(1))).any(dim=1).sum())
    if bad:
        raise ConfigError(
            f"the VAE gave NaN/inf latents for {bad} of {means.shape[0]} images of {where} (VAE in {str(vae.dtype).replace('torch.', '')}); "
            "SDXL's VAE overflows in fp16: use --precision bf16 or fp32, or a VAE made for fp16 with --vae (e.g. madebyollin/sdxl-vae-fp16-fix)"
        )


class LatentSource:
    """Latents of one image folder: cached posterior statistics (and their flips), or encoded per step for random crops.

    Each example also carries its size conditioning (original size, crop offset, target size) for SDXL.
    """

    def __init__(self, dataset: ImageFolderDataset, vae: torch.nn.Module, flip: bool, cache: bool) -> None:
        self.dataset, self.vae, self.flip, self.cache = dataset, vae, flip, cache
        self.scaling = vae.config.scaling_factor
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0
        if cache:
            pixels = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
            views = [pixels, pixels.flip(-1)] if flip else [pixels]
            stats = [encode_latent_stats(vae, view) for view in views]
            self.means = torch.stack([s[0] for s in stats])  # (views, N, C, h, w)
            self.stds = torch.stack([s[1] for s in stats])
            check_latents(self.means.flatten(0, 1), vae, f"'{dataset.folder.root}'")
            boxes = [dataset.center_crop_box(i) for i in range(len(dataset))]
            self.size_ids = torch.stack([torch.stack([dataset.size_conditioning(i, boxes[i], flipped=v == 1) for i in range(len(dataset))]) for v in range(len(views))])

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        return self.sample_with_sizes(indices, generator)[0]

    def sample_with_sizes(self, indices: list[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents of the examples `indices` and their size conditioning, shape (len(indices), 6)."""
        device = generator.device
        flips = torch.randint(0, 2, (len(indices),), generator=generator, device=device) if self.flip else torch.zeros(len(indices), dtype=torch.long, device=device)
        if self.cache:
            index = torch.tensor(indices, device=self.means.device)
            mean = self.means[flips.to(self.means.device), index]
            std = self.stds[flips.to(self.means.device), index]
            sizes = self.size_ids[flips.cpu(), index.cpu()]
        else:
            boxes = [self.dataset.random_crop_box(i, torch.Generator().manual_seed(int(generator.initial_seed()) + i)) for i in indices]
            pixels = torch.stack([to_tensor(resize_and_crop(self.dataset.images[i], self.dataset.resolution, box)) for i, box in zip(indices, boxes)])
            pixels = torch.where(flips.cpu().view(-1, 1, 1, 1).bool(), pixels.flip(-1), pixels)
            mean, std = encode_latent_stats(self.vae, pixels)
            check_latents(mean, self.vae, f"'{self.dataset.folder.root}'")
            sizes = torch.stack([self.dataset.size_conditioning(i, box, flipped=bool(f)) for i, box, f in zip(indices, boxes, flips.tolist())])
        eps = torch.randn(mean.shape, generator=generator, device=device)
        return ((mean.to(device) + std.to(device) * eps) - self.shift) * self.scaling, sizes.to(device)


@dataclass
class DrawnBatch:
    """One micro-step's examples: instance rows first, then class rows."""

    latents: torch.Tensor
    rows: torch.Tensor  # the prompt of each example (0: instance, 1: class)
    size_ids: torch.Tensor  # (examples, 6) SDXL size conditioning
    generator: torch.Generator  # for the micro-step's other random draws


class DreamBoothBatches:
    """Instance rows then class rows for each micro-step, drawn as a pure function of (seed, micro-step, rank)."""

    def __init__(self, cfg: RunConfig, components: Components, device: torch.device, world: int = 1, rank: int = 0) -> None:
        data = cfg.data
        self.batch_size, self.seed, self.device, self.world, self.rank = cfg.train.batch_size, cfg.train.seed, device, world, rank
        instance = ImageFolderDataset(list_images(data.instance_dir, "instance"), data.resolved_instance_prompt(), data.resolution, "instance", data.center_crop)
        self.sources = [LatentSource(instance, components.vae, data.flip, cache=data.center_crop)]
        self.prompts = [data.resolved_instance_prompt()]
        self.with_prior = bool(data.class_dir)
        if self.with_prior:
            class_set = ImageFolderDataset(list_images(data.class_dir, "class"), data.class_prompt, data.resolution, "class", data.center_crop)
            self.sources.append(LatentSource(class_set, components.vae, data.flip, cache=data.center_crop))
            self.prompts.append(data.class_prompt)

    def draw(self, micro_step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        """Latents, the prompt row of each example, and the generator for this micro-step's other random draws."""
        batch = self.draw_batch(micro_step)
        return batch.latents, batch.rows, batch.generator

    def draw_batch(self, micro_step: int) -> DrawnBatch:
        """The micro-step's latents, prompt rows and size conditioning."""
        # Every random draw of a micro-step comes from a generator seeded by (seed, micro-step, rank): resume is exact.
        position = micro_step * self.world + self.rank
        generator = torch.Generator(device=self.device).manual_seed(self.seed * 7_919 + position)
        latents, rows, sizes = [], [], []
        for row, source in enumerate(self.sources):
            sampled, size_ids = source.sample_with_sizes(batch_indices(position, self.batch_size, len(source), self.seed + row), generator)
            latents.append(sampled)
            sizes.append(size_ids)
            rows += [row] * self.batch_size
        return DrawnBatch(torch.cat(latents), torch.tensor(rows, device=self.device), torch.cat(sizes), generator)


def make_optimizer(groups: dict[str, list[torch.nn.Parameter]], cfg: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with one parameter group (and learning rate) per trained model; fused kernels on CUDA."""
    lrs = {"unet": cfg.train.lr, "text_encoder": cfg.train.resolved_text_encoder_lr, "text_encoder_2": cfg.train.resolved_text_encoder_lr}
    return torch.optim.AdamW(
        [{"params": params, "lr": lrs[name]} for name, params in groups.items()],
        betas=(0.9, 0.999),
        weight_decay=1e-2,
        eps=1e-8,
        fused=device.type == "cuda",
    )


# --- the recipe ----------------------------------------------------------------------------------


def _make_accelerator(cfg: RunConfig) -> tuple[Any, str, torch.dtype]:
    from accelerate import Accelerator

    probe_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision, weight_dtype = resolve_precision(cfg.model.precision, probe_device)
    mixed = {"fp16": "fp16", "bf16": "bf16", "fp32": "no"}[precision]
    accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=cfg.train.gradient_accumulation)
    return accelerator, precision, weight_dtype


def _enable_checkpointing(components: Components, train_text_encoder: bool) -> None:
    # Non-reentrant checkpointing, explicitly: with reentrant checkpointing a text-encoder LoRA can get no gradients.
    from torch.utils.checkpoint import checkpoint

    components.unet.enable_gradient_checkpointing(functools.partial(checkpoint, use_reentrant=False))
    if train_text_encoder:
        for text_encoder in components.text_encoders.values():
            text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def prepare_vae(components: Components, weight_dtype: torch.dtype) -> None:
    """Encode latents in fp32 where the family's VAE overflows in fp16 (SDXL), unless the VAE is one made for fp16."""
    vae = components.vae
    if weight_dtype == torch.float16 and not components.family.vae_fp16_safe and getattr(vae.config, "force_upcast", True):
        log.info("the %s VAE overflows in fp16: encoding latents in fp32 (pass --vae with an fp16-safe VAE to skip this)", components.family.name)
        vae.to(torch.float32)


def check_gradients(groups: dict[str, list[torch.nn.Parameter]]) -> dict[str, float]:
    """Every trained LoRA group must have finite, non-zero gradients after the first step; fail loudly otherwise."""
    norms = {}
    for name, params in groups.items():
        grads = [p.grad.detach().float() for p in params if p.grad is not None]
        norm = torch.sqrt(sum((g**2).sum() for g in grads)).item() if grads else 0.0
        if not math.isfinite(norm) or norm == 0.0:
            raise TrainingError(f"the {name} LoRA received {'no' if norm == 0.0 else 'non-finite'} gradients in the first step ({len(grads)}/{len(params)} tensors have a gradient); this is a bug, please report it with --debug output")
        norms[name] = norm
    return norms


def _run_info(cfg: RunConfig, components: Components, run_dir: Path, steps: int, status: str) -> dict[str, Any]:
    return {
        "name": run_dir.name,
        "model": public_model_ref(cfg.model.name),  # never an absolute path of the user's machine
        "family": components.family.name,
        "base_model_version": components.family.base_model_version,
        "prediction_type": components.prediction_type,
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
        "train_text_encoder": cfg.adapter.train_text_encoder,
        "unet_layout": {key: components.unet.config[key] for key in ("layers_per_block", "down_block_types", "up_block_types")},
        "seed": cfg.train.seed,
        "dreamlora_version": __version__,
        "status": status,
    }


def train(
    cfg: RunConfig,
    components: Components | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    resume_from: Path | None = None,
    run_dir: Path | None = None,
) -> TrainResult:
    """Train UNet (and text-encoder) LoRAs with prior preservation; write the run folder; return what was done."""
    accelerator, precision, weight_dtype = _make_accelerator(cfg)
    device = accelerator.device
    torch.manual_seed(cfg.train.seed)  # adapter initialisation
    if components is None:
        components = load_components(cfg.model.name, dtype=weight_dtype, device=device, allow_pickle=cfg.model.allow_pickle, vae=cfg.model.vae)
    if not cfg.data.resolution:
        cfg = replace(cfg, data=replace(cfg.data, resolution=components.native_resolution))
    unet, text_encoder, vae = components.unet, components.text_encoder, components.vae
    attention = select_attention(components, cfg.model.attention, device)
    vae.requires_grad_(False)
    train_te = cfg.adapter.train_text_encoder
    text_encoder_2 = components.text_encoder_2  # SDXL's second text encoder; None for one-encoder families
    attach_adapters(unet, text_encoder, cfg.adapter, text_encoder_2, components.family.penultimate_encoders)
    prepare_vae(components, weight_dtype)
    if cfg.train.gradient_checkpointing:
        _enable_checkpointing(components, train_te)

    # Data: instance and class latents cached once (each image and its flip), prompts tokenized once.
    batches = DreamBoothBatches(cfg, components, device, accelerator.num_processes, accelerator.process_index)
    with_prior = batches.with_prior
    input_ids = [ids.to(device) for ids in tokenize_all(components, batches.prompts)]  # one tensor per tokenizer (SDXL: two)
    if not train_te:
        with torch.no_grad():
            cached_embeddings = encode_prompts(components, input_ids)

    # Optimizer: separate groups (and learning rates) for UNet and each text encoder.
    groups = {"unet": trainable_parameters(unet)}
    if train_te:
        groups.update({name: trainable_parameters(encoder) for name, encoder in components.text_encoders.items()})
    optimizer = make_optimizer(groups, cfg, device)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=cfg.train.max_steps)
    text_encoders = list(components.text_encoders.values())
    models = [unet, *text_encoders] if train_te else [unet]
    prepared = accelerator.prepare(*models, optimizer)
    unet = prepared[0]
    if train_te:
        text_encoder = prepared[1]
        text_encoders = list(prepared[1:-1])  # wrapped for training, in the family's order
    optimizer = prepared[-1]

    # Run folder: created by the main process, its path shared with the others.
    start_step = 0
    if run_dir is None:
        path, auto = default_run_dir(cfg)
        run_dir = ckpt.create_run_dir(path, auto) if accelerator.is_main_process else path
        run_dir = _broadcast_path(accelerator, run_dir)
    if resume_from is not None:
        start_step = _restore(resume_from, accelerator, unet, text_encoder, optimizer, lr_scheduler, text_encoder_2)
        if accelerator.is_main_process:
            _truncate_metrics(run_dir / ckpt.METRICS_FILE, start_step)
    if accelerator.is_main_process:
        (run_dir / ckpt.CONFIG_FILE).write_text(to_toml(cfg), encoding="utf-8")
        ckpt.write_json(run_dir / ckpt.RUN_INFO, _run_info(cfg, components, run_dir, start_step, "running"))

    def unwrapped() -> dict[str, torch.nn.Module]:
        out = {"unet": accelerator.unwrap_model(unet)}
        if train_te:
            out.update({name: accelerator.unwrap_model(encoder) for name, encoder in zip(components.text_encoders, text_encoders)})
        return out

    def write_lora(folder: Path) -> Path:
        parts = unwrapped()
        return save_diffusers_lora(folder, adapter_state_dicts(parts), {k: adapter_metadata(m) for k, m in parts.items()})

    def training_state(step: int) -> dict[str, Any]:
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        return {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(), "scaler": scaler, "config": ckpt_config(cfg)}

    noise_scheduler = components.noise_scheduler
    bsz, accum = cfg.train.batch_size, cfg.train.gradient_accumulation
    metrics_path = run_dir / ckpt.METRICS_FILE
    started = time.perf_counter()
    bad_steps, skipped, loss_value = 0, 0, float("nan")
    unet.train()
    for step in range(start_step, cfg.train.max_steps):
        for micro in range(accum):
            batch = batches.draw_batch(step * accum + micro)
            latents, rows, generator = batch.latents, batch.rows, batch.generator
            noise = torch.randn(latents.shape, generator=generator, device=device)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            target = diffusion_target(noise_scheduler, latents, noise, timesteps)
            with accelerator.accumulate(*models), accelerator.autocast():
                # Encode each distinct prompt once and index it: gradients still reach every row.
                embeddings = (encode_prompts(components, input_ids, text_encoders) if train_te else cached_embeddings).select(rows)
                context = embeddings.context
                # SDXL also conditions on the pooled prompt and each image's size and crop; other families add nothing.
                added = components.family.added_conditioning(embeddings, batch.size_ids)
                added = {k: v.to(weight_dtype) for k, v in added.items()} if added else None
                pred = unet(noisy.to(weight_dtype), timesteps, context.to(weight_dtype), added_cond_kwargs=added).sample
                loss, instance_loss, prior_loss = dreambooth_loss(pred, target, bsz, cfg.train.prior_weight)
                if not torch.isfinite(loss):
                    # A non-finite loss must not reach the weights: skip the step and stop after several in a row.
                    optimizer.zero_grad(set_to_none=True)
                    continue
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if step == start_step:
                        check_gradients(groups)
                    if cfg.train.max_grad_norm > 0:
                        accelerator.clip_grad_norm_([p for ps in groups.values() for p in ps], cfg.train.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            bad_steps, skipped = bad_steps + 1, skipped + 1
            log.warning("step %d: non-finite loss, step skipped", step + 1)
            if bad_steps >= MAX_BAD_STEPS:
                raise TrainingError(f"the loss was non-finite {bad_steps} steps in a row (step {step + 1}); lower --lr or use --precision bf16. The last checkpoint is kept in {run_dir}")
        else:
            bad_steps = 0
        lr_scheduler.step()
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.max_steps or done == start_step + 1:
            loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
            elapsed = time.perf_counter() - started
            record = {
                "step": done,
                "loss": loss_value,
                "instance_loss": accelerator.reduce(instance_loss.detach(), reduction="mean").item(),
                "prior_loss": accelerator.reduce(prior_loss.detach(), reduction="mean").item(),
                "lr": lr_scheduler.get_last_lr()[0],
                "time": round(elapsed, 3),
                "it_s": (done - start_step) / elapsed if elapsed > 0 else 0.0,
            }
            if accelerator.is_main_process:
                with metrics_path.open("a", encoding="utf-8") as handle:
                    handle.write(ckpt.json_line(record))
                if on_log:
                    on_log({**record, "max_steps": cfg.train.max_steps})
        if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0 and done < cfg.train.max_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                ckpt.save_checkpoint(run_dir, done, write_lora, training_state(done), cfg.train.keep_checkpoints)
                ckpt.write_json(run_dir / ckpt.RUN_INFO, _run_info(cfg, components, run_dir, done, "running"))

    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - started
    lora_path = run_dir / ckpt.LORA_DIR / "pytorch_lora_weights.safetensors"
    samples: list[Path] = []
    if accelerator.is_main_process:
        lora_path = write_lora(run_dir / ckpt.LORA_DIR)
        ckpt.write_json(run_dir / ckpt.RUN_INFO, _run_info(cfg, components, run_dir, cfg.train.max_steps, "finished"))
        samples = _final_pictures(cfg, components, unwrapped(), run_dir)
    accelerator.end_training()
    return TrainResult(run_dir, cfg.train.max_steps, loss_value, seconds, lora_path, attention, precision, with_prior, skipped, samples)


def ckpt_config(cfg: RunConfig) -> dict[str, Any]:
    from dreamlora.config import to_dict

    return to_dict(cfg)


def _broadcast_path(accelerator: Any, path: Path) -> Path:
    if accelerator.num_processes == 1:
        return path
    from accelerate.utils import broadcast_object_list

    holder = [str(path)]
    broadcast_object_list(holder, from_process=0)
    return Path(holder[0])


def _restore(folder: Path, accelerator: Any, unet: Any, text_encoder: Any, optimizer: Any, lr_scheduler: Any, text_encoder_2: Any = None) -> int:
    """Load LoRA weights, optimizer, LR schedule and scaler from a checkpoint; return its step."""
    from dreamlora.lora import read_diffusers_lora

    state = ckpt.load_checkpoint_state(folder)
    state_dicts, metadata = read_diffusers_lora(folder / ckpt.LORA_DIR)
    models = {"unet": accelerator.unwrap_model(unet), "text_encoder": accelerator.unwrap_model(text_encoder)}
    if text_encoder_2 is not None:
        models["text_encoder_2"] = accelerator.unwrap_model(text_encoder_2)
    load_adapters(models, state_dicts, metadata)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if state.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    return int(state["step"])


def _final_pictures(cfg: RunConfig, components: Components, models: dict[str, torch.nn.Module], run_dir: Path) -> list[Path]:
    """Sample grid (base vs trained, instance and class prompts) and the loss curve."""
    from dreamlora.generate import comparison_grid, plot_metrics

    written = []
    for model in models.values():
        model.eval()
    prompts = [cfg.data.resolved_instance_prompt()] + ([cfg.data.class_prompt] if cfg.data.class_prompt else [])
    guidance = cfg.prior.resolved_guidance(components.family.default_guidance)
    grid = comparison_grid(components, prompts, cfg.train.num_samples, cfg.train.seed, cfg.prior.steps, guidance, cfg.data.resolution)
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
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line)["step"] <= step]
        ckpt.write_atomic(path, "".join(line + "\n" for line in lines).encode("utf-8"))


# Keys that may differ when resuming without changing the result.
RESUME_FREE_KEYS = {
    "train.out", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.sample_every",
    "train.num_samples", "model.attention", "prior.batch_size", "train.compile",
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


def changed_keys(saved: RunConfig, new: RunConfig) -> list[str]:
    """Settings that differ between a saved run and a resume request and would change its result."""
    from dreamlora.config import to_dict

    before, after = to_dict(saved), to_dict(new)
    keys = []
    for section, values in after.items():
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if dotted in RESUME_FREE_KEYS or before[section].get(key) == value:
                continue
            if dotted == "train.max_steps" and new.train.lr_scheduler == "constant" and new.train.warmup_steps < min(saved.train.max_steps, new.train.max_steps):
                continue  # a constant schedule does not depend on the step budget
            keys.append(f"{dotted}: {before[section].get(key)!r} -> {value!r}")
    return keys
