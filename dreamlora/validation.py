"""Validation loss during training (`train --validate-every N`): the diffusion loss at fixed timesteps and fixed noise.

Two sets, each measured with the LoRA and once with it switched off (the base model):
- held-out class images: a few images of the prior set that training never draws. Their loss under the class prompt
  rising above the base model's is the class drifting, in the model's own terms (the sample monitor's drift figures
  measure the same thing on generated pictures);
- the instance photos under their prompts: these are trained on, so this is a smooth fit curve (the training loss
  itself jumps with each step's random timesteps and noise), not a held-out loss. With 3-20 photos none are spared.

Fixed timesteps and noise make two readings comparable: the same (image, timestep, noise) triples every time, so only
the weights change the figure. Plain mean squared error of the model's prediction (no SNR weighting, Huber or mask),
in the training precision, with LoRA dropout off. As kohya's `--validate_every_n_steps`, but the held-out images are
class images, which DreamBooth has plenty of, and the base model's loss is the reference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dreamlora.data import ImageFolder, ImageFolderDataset
from dreamlora.errors import ConfigError
from dreamlora.models import Components, PromptEmbeddings

log = logging.getLogger(__name__)

TIMESTEPS = 5  # fixed timesteps per image, spread over the schedule
CHUNK = 8  # (image, timestep) pairs per UNet call


def held_out_indices(count: int, held: int) -> list[int]:
    """`held` indices spread evenly over `count` images (the middle of each of `held` equal stretches): a prior set drawn
    in batches, or a user's class folder sorted by name, is not held out from one end."""
    return sorted({(2 * i + 1) * count // (2 * held) for i in range(held)})


def split_class_folder(folder: ImageFolder, held: int) -> tuple[ImageFolder, ImageFolder]:
    """(images training draws from, images held out for validation)."""
    if len(folder.paths) <= held:
        raise ConfigError(
            f"--validate-every holds out {held} class images, but the class set in '{folder.root}' has only {len(folder.paths)}; "
            f"pass a smaller --validation-images or make a larger prior set (dreamlora prior --num-images N)"
        )
    chosen = set(held_out_indices(len(folder.paths), held))
    kept = tuple(p for i, p in enumerate(folder.paths) if i not in chosen)
    out = tuple(p for i, p in enumerate(folder.paths) if i in chosen)
    return ImageFolder(folder.root, kept, folder.skipped), ImageFolder(folder.root, out, ())


def validation_timesteps(total: int, count: int = TIMESTEPS) -> list[int]:
    """`count` timesteps at the middles of equal stretches of [0, total): 100, 300, 500, 700, 900 for 1000."""
    return [(2 * i + 1) * total // (2 * count) for i in range(count)]


@dataclass
class ValidationSet:
    """One set's (image, timestep) pairs, fixed for the run: noisy latents, targets, prompts and SDXL size ids."""

    name: str  # the metrics' prefix: val_class, fit_instance
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    size_ids: torch.Tensor
    prompts: list[str]  # one per pair


def make_set(
    name: str, dataset: ImageFolderDataset, components: Components, noise_scheduler: Any, generator: torch.Generator, encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
) -> ValidationSet:
    """Each image's centre crop, unflipped, encoded to one fixed draw from the VAE posterior (training draws a new one
    each step; SD's VAE posterior is narrow, so the draw barely matters there); each fixed timestep with its own noise."""
    from dreamlora.train import diffusion_target

    vae = components.vae
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    means, stds = encode(pixels)
    draw = torch.randn(means.shape, generator=generator, device=generator.device).to(means.device)
    latents = (means + stds * draw - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor
    steps = validation_timesteps(noise_scheduler.config.num_train_timesteps)
    latents = latents.repeat_interleave(len(steps), dim=0)
    timesteps = torch.tensor(steps * len(dataset), device=latents.device)
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    sizes = torch.stack([dataset.size_conditioning(i, dataset.center_crop_box(i)) for i in range(len(dataset))]).repeat_interleave(len(steps), dim=0)
    prompts = [dataset.prompts[i] for i in range(len(dataset)) for _ in steps]
    return ValidationSet(name, noisy, timesteps, target, sizes.to(latents.device), prompts)


class Validator:
    """The fixed sets' losses with the current weights (`measure`), and the base model's, measured once at the start."""

    def __init__(
        self,
        components: Components,
        sets: Sequence[ValidationSet],
        encode_prompts: Callable[[list[str]], PromptEmbeddings],
        weight_dtype: torch.dtype,
        autocast: Callable[[], Any],
        adapted_prompt: Callable[[str], str] | None = None,
    ) -> None:
        self.components, self.sets, self.encode_prompts = components, list(sets), encode_prompts
        self.weight_dtype, self.autocast = weight_dtype, autocast
        self.adapted_prompt = adapted_prompt or (lambda prompt: prompt)  # pivotal tuning: the token as its new tokens
        from dreamlora.generate import adapters_disabled

        with adapters_disabled(self._models()):
            # The base model reads the prompts as written (a pivotal run's new tokens are not the base model's).
            self.base = self._losses(lambda prompt: prompt)

    def _models(self) -> list[torch.nn.Module]:
        return [self.components.unet, *self.components.text_encoders.values()]

    @torch.no_grad()
    def _losses(self, rewrite: Callable[[str], str]) -> dict[str, float]:
        from dreamlora.monitor import eval_mode
        from dreamlora.step import batch_loss

        family = self.components.family
        out = {}
        with eval_mode(self._models()), self.autocast():
            for vset in self.sets:
                distinct = list(dict.fromkeys(vset.prompts))
                embeddings = self.encode_prompts([rewrite(p) for p in distinct])
                rows = torch.tensor([distinct.index(p) for p in vset.prompts], device=vset.noisy.device)
                total = 0.0
                for start in range(0, len(rows), CHUNK):
                    part = slice(start, start + CHUNK)
                    loss = batch_loss(
                        self.components.unet, lambda: embeddings, rows[part], vset.noisy[part], vset.timesteps[part], vset.target[part],
                        len(rows[part]), 0.0, self.weight_dtype, size_ids=vset.size_ids[part], added_conditioning=family.added_conditioning,
                    )[0]
                    total += float(loss) * len(rows[part])
                out[vset.name] = total / len(rows)
        return out

    def measure(self) -> dict[str, float]:
        """`<set>_loss` with the current weights and `<set>_loss_base`, the base model's, for each set (metrics.jsonl keys)."""
        now = self._losses(self.adapted_prompt)
        return {**{f"{name}_loss": value for name, value in now.items()}, **{f"{name}_loss_base": value for name, value in self.base.items()}}


def describe(figures: dict[str, float]) -> str:
    """The progress line's validation text: each set's loss and the base model's."""
    parts = []
    if "val_class_loss" in figures:
        parts.append(f"held-out class loss {figures['val_class_loss']:.4f} (base {figures['val_class_loss_base']:.4f})")
    if "fit_instance_loss" in figures:
        parts.append(f"photo fit {figures['fit_instance_loss']:.4f} (base {figures['fit_instance_loss_base']:.4f})")
    return ", ".join(parts)
