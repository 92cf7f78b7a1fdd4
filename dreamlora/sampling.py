"""Which images, sizes and views each micro-step trains on: repeats, the instance:class ratio and aspect buckets.

Every choice is a pure function of (seed, position), like `data.batch_indices`, so a resumed run draws exactly what an
uninterrupted one would and checkpoints need no sampler state.

Bucketing and prior preservation: the instance and class rows of a batch go through one UNet call, so they must share a
latent size. A batch takes its size from its instance images' bucket, and its class images (square, from `prior`) are
scaled to cover that bucket and centre-cropped to it. This keeps one UNet call per step (the same cost as without
buckets) at the price of class images cropped to the instance aspect ratio, which still shows the model its own class.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dreamlora.data import ImageFolderDataset, jitter_colors, latent_mask, nearest_bucket, random_offset, resize_and_crop_to, size_ids, stream_indices, to_tensor
from dreamlora.latent_cache import LatentDiskCache, file_digest

Size = tuple[int, int]  # (width, height) in pixels


def class_span(position: int, batch_size: int, ratio: float) -> tuple[int, int]:
    """(start, count) of the class images in the class stream at `position`: `ratio` per instance image on average.

    With ratio 1 it is (position * batch_size, batch_size), as without the option; with 0.5 at batch size 1 every other
    step has one class image and the others none.
    """
    per_thousand = round(ratio * 1000)
    start = position * batch_size * per_thousand // 1000
    return start, (position + 1) * batch_size * per_thousand // 1000 - start


class SquarePlan:
    """Instance batches at one square size: the seeded stream of `data.batch_indices` over the images x `repeats`."""

    def __init__(self, n_images: int, resolution: int, batch_size: int, repeats: int, seed: int) -> None:
        self.n_images, self.size, self.batch_size, self.repeats, self.seed = n_images, (resolution, resolution), batch_size, repeats, seed

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n_images * self.repeats / self.batch_size)

    def batch(self, position: int) -> tuple[list[int], Size]:
        indices = stream_indices(position * self.batch_size, self.batch_size, self.n_images * self.repeats, self.seed)
        return [i % self.n_images for i in indices], self.size


class BucketPlan:
    """Instance batches of one bucket each.

    Per epoch, each bucket's images (x `repeats`) are shuffled and cut into batches, the last one topped up from the
    start of the bucket's shuffled list (every batch has exactly `batch_size` rows); then all batches are shuffled.
    """

    def __init__(self, image_buckets: list[Size], batch_size: int, repeats: int, seed: int) -> None:
        self.batch_size, self.seed = batch_size, seed
        self.buckets = sorted(set(image_buckets))
        self.members = [[i for i, b in enumerate(image_buckets) for _ in range(repeats) if b == bucket] for bucket in self.buckets]
        self._epoch: tuple[int, list[tuple[list[int], Size]]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return sum(math.ceil(len(m) / self.batch_size) for m in self.members)

    def epoch_batches(self, epoch: int) -> list[tuple[list[int], Size]]:
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        batches = []
        for number, (bucket, members) in enumerate(zip(self.buckets, self.members)):
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_009 + number)
            order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            for start in range(0, len(order), self.batch_size):
                batches.append(([order[(start + k) % len(order)] for k in range(self.batch_size)], bucket))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        self._epoch = (epoch, batches)
        return batches

    def batch(self, position: int) -> tuple[list[int], Size]:
        epoch, offset = divmod(position, self.batches_per_epoch)
        return self.epoch_batches(epoch)[offset]


def instance_plan(sizes: list[Size], resolution: int, batch_size: int, repeats: int, seed: int, buckets: list[Size] | None) -> SquarePlan | BucketPlan:
    """The instance batches of a run: one square size, or each image in its nearest aspect bucket (`buckets`)."""
    if buckets:
        return BucketPlan([nearest_bucket(size, buckets) for size in sizes] or [(resolution, resolution)], batch_size, repeats, seed)
    return SquarePlan(max(1, len(sizes)), resolution, batch_size, repeats, seed)


def steps_per_epoch(plan: SquarePlan | BucketPlan, processes: int, accumulation: int) -> int:
    """Optimizer steps in one pass over the instance images x repeats: each step takes `accumulation` micro-batches
    on each of `processes` processes."""
    return math.ceil(plan.batches_per_epoch / (processes * accumulation))


def class_indices(position: int, batch_size: int, ratio: float, n_class: int, seed: int) -> list[int]:
    start, count = class_span(position, batch_size, ratio)
    return stream_indices(start, count, n_class, seed)


class AugmentedLatents:
    """Latents of one image folder at any size: cached per (image, size, flip) in memory and on disk when the views are
    fixed (centre crop, no colour jitter), else rendered with a random crop and jitter and encoded every step."""

    def __init__(
        self,
        dataset: ImageFolderDataset,
        vae: torch.nn.Module,
        encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        flip: bool,
        center_crop: bool,
        color_jitter: float,
        disk: LatentDiskCache | None,
    ) -> None:
        self.dataset, self.vae, self.encode, self.disk = dataset, vae, encode, disk
        self.flip, self.center_crop, self.color_jitter = flip, center_crop, color_jitter
        self.cacheable = center_crop and color_jitter == 0
        self.scaling = vae.config.scaling_factor
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0
        self.memory: dict[tuple[int, Size, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        self.contents = [file_digest(p) for p in dataset.folder.paths] if disk is not None and self.cacheable else []

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def needs_vae(self) -> bool:
        """Always: even fixed views are encoded lazily, the first time a step draws their size."""
        return True

    def view(self, index: int, size: Size, flipped: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """The pixels training sees: cover-resize and crop (random with a generator and random crops), jitter, flip."""
        return self._render(index, size, flipped, generator)[0]

    def _render(self, index: int, size: Size, flipped: bool, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None]:
        """The view's pixels, its SDXL size conditioning (the crop it took, mirrored when flipped) and its crop offset
        (None: the centre)."""
        image = self.dataset.images[index]
        offset = random_offset(image.size, size, generator) if generator is not None and not self.center_crop else None
        ids = size_ids(image.size, size, offset, flipped)
        image = resize_and_crop_to(image, size, offset)
        if generator is not None and self.color_jitter > 0:
            image = jitter_colors(image, self.color_jitter, generator)
        pixels = to_tensor(image)
        return (pixels.flip(-1) if flipped else pixels), ids, offset

    def stats(self, index: int, size: Size, flipped: bool) -> tuple[torch.Tensor, torch.Tensor]:
        key = (index, size, flipped)
        if key not in self.memory:
            if self.disk is not None:
                disk_key = self.disk.key(self.contents[index], size, "center", flipped)
                mean, std = self.disk.get_or_encode([disk_key], lambda _: self.view(index, size, flipped), self.encode)
            else:
                mean, std = self.encode(self.view(index, size, flipped).unsqueeze(0))
            self.memory[key] = (mean[0].to(self.vae.device), std[0].to(self.vae.device))
        return self.memory[key]

    def sample(self, indices: list[int], generator: torch.Generator, size: Size) -> torch.Tensor:
        return self.sample_with_sizes(indices, generator, size)[0]

    def sample_with_sizes(self, indices: list[int], generator: torch.Generator, size: Size) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents of the examples `indices` at `size` = (width, height) and their size conditioning, shape (len(indices), 6)."""
        return self.sample_views(indices, generator, size)[:2]

    def sample_views(self, indices: list[int], generator: torch.Generator, size: Size, masks: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`sample_with_sizes`, and with `masks` each view's loss mask at latent size (`data.latent_mask`), cropped as its pixels."""
        device = generator.device
        flips = torch.randint(0, 2, (len(indices),), generator=generator, device=device) if self.flip else torch.zeros(len(indices), dtype=torch.long, device=device)
        if self.cacheable:
            stats = [self.stats(i, size, bool(f)) for i, f in zip(indices, flips.tolist())]
            mean, std = torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats])
            ids = [size_ids(self.dataset.images[i].size, size, None, bool(f)) for i, f in zip(indices, flips.tolist())]
            offsets = [None] * len(indices)  # the centre crop
        else:
            views = [self._render(i, size, bool(f), torch.Generator().manual_seed(int(generator.initial_seed()) + i)) for i, f in zip(indices, flips.tolist())]
            mean, std = self.encode(torch.stack([v[0] for v in views]))
            ids, offsets = [v[1] for v in views], [v[2] for v in views]
        eps = torch.randn(mean.shape, generator=generator, device=device)
        mask = None
        if masks:  # each alpha cropped at the offset its view took
            alphas = self.dataset.alphas or [None] * len(self.dataset)
            crops = [resize_and_crop_to(alphas[i], size, offset) if alphas[i] is not None else None for i, offset in zip(indices, offsets)]
            mask = torch.stack([latent_mask(alpha, tuple(mean.shape[-2:]), bool(f)) for alpha, f in zip(crops, flips.tolist())]).to(device)
        return ((mean.to(device) + std.to(device) * eps) - self.shift) * self.scaling, torch.stack(ids).to(device), mask
