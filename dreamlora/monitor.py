"""Watching a run: sample grids at fixed seeds during training and the drift they show.

Three numbers say how DreamBooth is going, all in [0, 1]:

- `class_drift`: the mean absolute pixel difference (RGB scaled to [0, 1]) between the class-prompt
  images of the trained model and the base model's at the same seeds, averaged over the seeds.
  0 means the class is drawn exactly as before; it grows as the LoRA takes the class over (language drift),
  but also when a class picture changes without leaving the class (another pose, place or background).
- `class_palette_drift`: the class-prompt images compared as a set, not seed by seed: the total variation
  distance between their pooled colour histograms (4 levels per channel) and the base model's. Where the
  subject has colours of its own it rises when they leak into the class, and it does not count a subject
  that moved; it is blind to a change of shape that keeps the colours.
- `instance_distance`: for each instance-prompt image, the mean absolute pixel difference to the
  closest instance photo (centre-cropped and resized to the sample size), averaged over the images.
  It falls as the model learns to draw the subject.

Mean absolute pixel difference is crude (a shifted subject counts as different) but needs no extra
model, is the same on every machine, and at fixed seeds tracks what a person sees in the grids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreamlora.data import list_images, open_image, resize_and_crop
from dreamlora.generate import adapters_disabled, draw_prompt, make_grid, upscale_small
from dreamlora.models import Components, build_pipeline
from dreamlora.prompts import PromptSpec, parse_prompt_line


def image_distance(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference of two equally sized RGB images, pixel values scaled to [0, 1]."""
    if a.size != b.size:
        raise ValueError(f"images differ in size: {a.size} and {b.size}")
    x = np.asarray(a.convert("RGB"), dtype=np.float32) / 255.0
    y = np.asarray(b.convert("RGB"), dtype=np.float32) / 255.0
    return float(np.abs(x - y).mean())


def class_drift(images: Sequence[Image.Image], base_images: Sequence[Image.Image]) -> float:
    """Mean over seeds of the distance between each image and the base model's image at the same seed."""
    if len(images) != len(base_images) or not images:
        raise ValueError(f"need as many images as base images, at least one; got {len(images)} and {len(base_images)}")
    return float(np.mean([image_distance(a, b) for a, b in zip(images, base_images)]))


def colour_histogram(images: Sequence[Image.Image], levels: int = 4) -> np.ndarray:
    """The share of all pixels of `images` in each of levels**3 equal RGB boxes (sums to 1)."""
    if not images:
        raise ValueError("need at least one image")
    counts = np.zeros(levels**3, dtype=np.float64)
    for image in images:
        boxes = (np.asarray(image.convert("RGB"), dtype=np.int64).reshape(-1, 3) * levels) // 256
        counts += np.bincount((boxes[:, 0] * levels + boxes[:, 1]) * levels + boxes[:, 2], minlength=levels**3)
    return counts / counts.sum()


def palette_drift(images: Sequence[Image.Image], base_images: Sequence[Image.Image], levels: int = 4) -> float:
    """Total variation distance between the pooled colour histograms of two image sets: 0 for the same palette
    (wherever the colours sit), 1 for no colour in common."""
    return float(0.5 * np.abs(colour_histogram(images, levels) - colour_histogram(base_images, levels)).sum())


def instance_distance(images: Sequence[Image.Image], photos: Sequence[Image.Image]) -> float:
    """Mean over images of the distance to the closest photo; photos are centre-cropped and resized to the images' size."""
    if not images or not photos:
        raise ValueError("need at least one image and one photo")
    size = images[0].width
    fitted = [resize_and_crop(photo.convert("RGB"), size) for photo in photos]
    return float(np.mean([min(image_distance(image, photo) for photo in fitted) for image in images]))


class SampleMonitor:
    """Instance- and class-prompt images (and any extra prompts) at fixed seeds: base images once, then a grid and drift per call."""

    def __init__(
        self,
        components: Components,
        instance_prompt: str,
        class_prompt: str,
        instance_dir: Path | str,
        seeds: list[int],
        steps: int,
        guidance: float,
        resolution: int,
        out_dir: Path,
        extra_prompts: Sequence[str] = (),
        adapted_prompt: Callable[[str], str] | None = None,
        scheduler: str = "dpm++",
    ) -> None:
        self.adapted_prompt = adapted_prompt or (lambda prompt: prompt)  # pivotal tuning: the token spelled as its new tokens
        self.components, self.seeds = components, seeds
        self.defaults = PromptSpec("", "", resolution, resolution, guidance=guidance, steps=steps)  # what a sample prompt does not set itself
        # The instance row, the class row, then the user's own prompts (`--sample-prompt`), each once.
        self.prompts = list(dict.fromkeys(p for p in (instance_prompt, class_prompt, *extra_prompts) if p))
        # The user's prompts may end in kohya's options (--n --w --h --d --l --s --ss); instance and class prompts are drawn as written.
        self.specs = {p: PromptSpec(p) if p in (instance_prompt, class_prompt) else parse_prompt_line(p, "--sample-prompt") for p in self.prompts}
        self.instance_prompt, self.class_prompt = instance_prompt, class_prompt
        self.photos = [open_image(path) for path in list_images(instance_dir, "instance").paths]
        self.out_dir = out_dir
        self.latest: tuple[int, dict[str, list[Image.Image]]] = (-1, {})  # the last samples (step, images per prompt)
        self.pipeline = build_pipeline(components, scheduler)
        with eval_mode(self._models()), adapters_disabled(self._models()):
            # The base model's images, generated once per run and compared with every later sample.
            self.base = {prompt: self._generate(prompt) for prompt in self.prompts}

    def _models(self) -> list[torch.nn.Module]:
        return [self.components.unet, *self.components.text_encoders.values()]

    def _generate(self, prompt: str, rewrite: Callable[[str], str] | None = None) -> list[Image.Image]:
        return draw_prompt(self.pipeline, self.specs[prompt], self.defaults, self.seeds, rewrite=rewrite)[0]

    def sample(self, step: int) -> dict[str, float]:
        """Write `samples/step-NNNNNN.png` (instance row, class row, extra prompts' rows) and return the drift figures."""
        with eval_mode(self._models()):
            images = {prompt: self._generate(prompt, self.adapted_prompt) for prompt in self.prompts}
        self.latest = (step, images)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rows = [images[p] for p in self.prompts]
        make_grid(upscale_small(rows), [f"step {step}: {self.specs[p].prompt}" for p in self.prompts]).save(self.out_dir / f"step-{step:06d}.png")
        figures = {"instance_distance": instance_distance(images[self.instance_prompt], self.photos)}
        if self.class_prompt:
            figures["class_drift"] = class_drift(images[self.class_prompt], self.base[self.class_prompt])
            figures["class_palette_drift"] = palette_drift(images[self.class_prompt], self.base[self.class_prompt])
        return figures


class eval_mode:
    """Put models in eval mode for sampling and restore each one's previous mode."""

    def __init__(self, models: list[torch.nn.Module]) -> None:
        self.models = models

    def __enter__(self) -> None:
        self.modes = [m.training for m in self.models]
        for model in self.models:
            model.eval()

    def __exit__(self, *exc: object) -> None:
        for model, mode in zip(self.models, self.modes):
            model.train(mode)
