"""The toy world: draws coloured shapes on pastel backgrounds and reads them back.

Each scene holds one object of a class on a plain, pale background. The class decides
shape and colour (dog = red disc, cat = blue square, car = green triangle, bird = purple
diamond); place, size, exact colour and background vary. The personalised subject
"sks dog" is a red disc with a bold yellow inner disc, the mark, which pretraining never
shows. Drawing is batched torch (fast on the training device); reading is numpy and
judges colour first, so it tolerates the blur and colour drift of a diffusion model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLASSES: tuple[str, ...] = ("dog", "cat", "car", "bird")
SHAPES: dict[str, str] = {"dog": "disc", "cat": "square", "car": "triangle", "bird": "diamond"}
COLOURS: dict[str, tuple[float, float, float]] = {
    "dog": (0.86, 0.16, 0.16),
    "cat": (0.18, 0.32, 0.88),
    "car": (0.16, 0.66, 0.24),
    "bird": (0.60, 0.22, 0.80),
}
MARK_COLOUR: tuple[float, float, float] = (0.98, 0.86, 0.12)
MARK_SCALE = 0.6
"""The mark is the object's own shape, this fraction of its size, in yellow (36% of its area)."""

INSTANCE_CLASS = "dog"
INSTANCE_TOKEN = "sks"

MIN_ACROSS, MAX_ACROSS = 20.0, 44.0
"""Object width in pixels on a 64-pixel canvas; scales with the canvas."""

MODIFIERS: tuple[str, ...] = ("big", "small")
"""Words written before the class word that change the picture: "big" and "small" narrow
the object's width to the top or bottom of its range. They teach the model that a word in
front of the class can change the object, as the rare token must after DreamBooth,
without ever showing the mark. (A "hollow" object and a "dark" one were tried and
dropped: the shipped VAE decodes the hole yellowish and the dark colour bright, since
its decoder was refined on class scenes and marked dogs only.)"""
_SIZE_RANGES: dict[str, tuple[float, float]] = {"big": (36.0, MAX_ACROSS), "small": (MIN_ACROSS, 26.0)}

NAMES: dict[str, str] = {"rex": "cat", "max": "car", "kit": "bird", "zed": "dog"}
"""Named individuals: "a photo of rex dog" is a dog with an inner mark (the mark's shape
and size) in the colour of the class named here (rex: blue), on any class of another
colour. Like a large model that has seen many individual, named animals, a model
pretrained with them knows that a name in front of the class word means one individual
with its own markings; DreamBooth then binds a new name ("sks") to a new marking (the
yellow one, which no name uses)."""

PREFIX_WORDS: tuple[str, ...] = MODIFIERS + tuple(NAMES)
"""Every word a pretraining prompt may put before its class word, in token-id order."""

COLOUR_JITTER = 0.05

# Hue bands in degrees (start, end) for reading; orange and cyan gaps absorb blended edges.
_HUE_BANDS: dict[str, tuple[tuple[float, float], ...]] = {
    "dog": ((0.0, 18.0), (335.0, 360.0)),
    "car": ((85.0, 170.0),),
    "cat": ((195.0, 255.0),),
    "bird": ((258.0, 320.0),),
}
_MARK_BAND = (38.0, 75.0)
_MIN_SATURATION = 0.45
_MIN_VALUE = 0.35
_MIN_OBJECT_FRACTION = 0.012
_MIN_MARK_SHARE = 0.15
_MIN_MARK_FRACTION = 0.004
_MIN_MARK_SATURATION = 0.55
_MIN_MARK_VALUE = 0.6


@dataclass(frozen=True)
class Layout:
    """Parameters of a batch of scenes, one row per scene; lengths in pixels of a 64-pixel canvas."""

    classes: torch.Tensor  # (B,) long, index into CLASSES
    marked: torch.Tensor  # (B,) bool
    centre: torch.Tensor  # (B, 2) float, x and y
    across: torch.Tensor  # (B,) float, object width
    colour: torch.Tensor  # (B, 3) float in [0, 1]
    background: torch.Tensor  # (B, 3) float in [0, 1]
    mark_colour: torch.Tensor | None = None  # (B, 3) float in [0, 1]; None: MARK_COLOUR for every scene


@dataclass(frozen=True)
class SceneReading:
    """What `read_scene` saw in one image."""

    cls: str | None
    """Class whose colour covers most of the saturated pixels, or None if too few."""
    shape: str | None
    """Shape guessed from the object's outline ("disc", "square", "triangle", "diamond")."""
    marked: bool
    object_fraction: float
    """Share of the image covered by the object (class colour plus mark colour)."""
    mark_share: float
    """Share of the object's pixels that are mark yellow."""


def class_index(cls: str) -> int:
    """Index of a class name in CLASSES; raises ValueError naming the valid ones."""
    if cls not in CLASSES:
        raise ValueError(f"unknown toy class {cls!r}; choose one of {', '.join(CLASSES)}")
    return CLASSES.index(cls)


def hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """HSV (each (B,), hue in [0, 1)) to RGB (B, 3)."""
    k = torch.stack([torch.full_like(hue, n) for n in (5.0, 3.0, 1.0)], dim=1)
    k = (k + hue[:, None] * 6.0) % 6.0
    ramp = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return value[:, None] - value[:, None] * saturation[:, None] * ramp


def modifier_index(word: str) -> int:
    """Index of a word in PREFIX_WORDS (a size modifier or a name); raises ValueError naming the valid ones."""
    if word not in PREFIX_WORDS:
        raise ValueError(f"unknown toy modifier {word!r}; choose one of {', '.join(PREFIX_WORDS)}")
    return PREFIX_WORDS.index(word)


def sample_layout(
    classes: Sequence[str] | torch.Tensor,
    generator: torch.Generator,
    marked: bool | torch.Tensor = False,
    modifiers: torch.Tensor | None = None,
) -> Layout:
    """Random place, size, colour jitter and pastel background for each class given.

    `classes` is a list of names or a (B,) long tensor of indices; random numbers come
    from `generator` and land on its device. `modifiers` is an optional (B,) long tensor
    of indices into PREFIX_WORDS, -1 for none: a size word narrows the width, a name marks
    the object in its colour (and a scene whose class has that very colour becomes the
    next class, read the returned `classes`). It draws no extra random numbers, so scenes
    without modifiers are the same with or without it.
    """
    device = generator.device
    if isinstance(classes, torch.Tensor):
        index = classes.to(device=device, dtype=torch.long)
    else:
        index = torch.tensor([class_index(c) for c in classes], device=device, dtype=torch.long)
    n = index.shape[0]
    flags = marked.to(device) if isinstance(marked, torch.Tensor) else torch.full((n,), marked, device=device)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator, device=device)

    across = uniform(MIN_ACROSS, MAX_ACROSS, n)
    mark_colour = None
    if modifiers is not None:
        modifiers = modifiers.to(device=device, dtype=torch.long)
        unit = (across - MIN_ACROSS) / (MAX_ACROSS - MIN_ACROSS)
        for word, (low, high) in _SIZE_RANGES.items():
            across = torch.where(modifiers == modifier_index(word), low + (high - low) * unit, across)
        mark_colour = torch.tensor(MARK_COLOUR, device=device).repeat(n, 1)
        for word, colour_of in NAMES.items():
            named = modifiers == modifier_index(word)
            own = class_index(colour_of)
            index = torch.where(named & (index == own), (own + 1) % len(CLASSES), index)
            flags = flags | named
            mark_colour = torch.where(named[:, None], torch.tensor(COLOURS[colour_of], device=device), mark_colour)
    margin = across / 2 + 2.0
    centre = margin[:, None] + torch.rand(n, 2, generator=generator, device=device) * (64.0 - 2 * margin[:, None])
    base = torch.tensor([COLOURS[c] for c in CLASSES], device=device)[index]
    colour = torch.clamp(base + uniform(-COLOUR_JITTER, COLOUR_JITTER, n, 3), 0.0, 1.0)
    background = hsv_to_rgb(uniform(0.0, 1.0, n), uniform(0.04, 0.25, n), uniform(0.85, 1.0, n))
    return Layout(index, flags.bool(), centre, across, colour, background, mark_colour)


def _signed_distance(layout: Layout, x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """Signed distance in canvas pixels to each scene's shape, (B, H, W); negative inside."""
    px = x[None] - layout.centre[:, 0, None, None]
    py = y[None] - layout.centre[:, 1, None, None]
    half = (layout.across * scale / 2)[:, None, None]
    disc = torch.sqrt(px**2 + py**2) - half
    square = torch.maximum(px.abs(), py.abs()) - 0.86 * half
    # Equilateral triangle pointing up, centroid at the centre: inradius is a third of its height.
    inradius = 2 * half * 0.866 / 3
    edges = torch.stack([py, -0.866 * px - 0.5 * py, 0.866 * px - 0.5 * py])
    triangle = edges.amax(dim=0) - inradius
    diamond = (px.abs() + py.abs() - half) * 0.7071
    shapes = torch.stack([disc, square, triangle, diamond], dim=1)
    return shapes.gather(1, layout.classes[:, None, None, None].expand(-1, 1, *px.shape[1:]))[:, 0]


def render_batch(layout: Layout, size: int = 64) -> torch.Tensor:
    """Draw the scenes of `layout` as a (B, 3, size, size) float tensor in [0, 1], antialiased."""
    device = layout.centre.device
    step = 64.0 / size
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) * step
    y, x = torch.meshgrid(coords, coords, indexing="ij")

    def coverage(scale: float) -> torch.Tensor:
        return torch.clamp(0.5 - _signed_distance(layout, x, y, scale) / step, 0.0, 1.0)[:, None]

    image = layout.background[:, :, None, None].expand(-1, -1, size, size)
    image = torch.lerp(image, layout.colour[:, :, None, None].expand_as(image), coverage(1.0))
    mark = coverage(MARK_SCALE) * layout.marked[:, None, None, None].float()
    if layout.mark_colour is None:
        paint = torch.tensor(MARK_COLOUR, device=device)[None, :, None, None].expand_as(image)
    else:
        paint = layout.mark_colour[:, :, None, None].expand_as(image)
    return torch.lerp(image, paint, mark)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) tensor in [0, 1] to PIL RGB images."""
    array = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in array]


def render_scene(cls: str, rng: np.random.Generator, marked: bool = False, size: int = 64) -> Image.Image:
    """One random scene of `cls` (with the yellow mark if `marked`) as a size x size PIL image."""
    generator = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    return to_pil(render_batch(sample_layout([cls], generator, marked), size))[0]


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees, saturation and value of an (..., 3) float array in [0, 1]."""
    high = rgb.max(axis=-1)
    low = rgb.min(axis=-1)
    span = high - low
    safe = np.where(span > 1e-6, span, 1.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.where(
        high == r, ((g - b) / safe) % 6.0, np.where(high == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    saturation = np.where(high > 1e-6, span / np.where(high > 1e-6, high, 1.0), 0.0)
    return hue * 60.0, saturation, high


def _in_bands(hue: np.ndarray, bands: Iterable[tuple[float, float]]) -> np.ndarray:
    mask = np.zeros(hue.shape, dtype=bool)
    for low, high in bands:
        mask |= (hue >= low) & (hue < high)
    return mask


def _class_pixels(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Hue, saturation and value of an (H, W, 3) array, its vivid pixels, and each class's vivid pixels by hue band."""
    hue, saturation, value = _hsv(rgb)
    vivid = (saturation > _MIN_SATURATION) & (value > _MIN_VALUE)
    return hue, saturation, value, vivid, {cls: vivid & _in_bands(hue, bands) for cls, bands in _HUE_BANDS.items()}


def _guess_shape(mask: np.ndarray) -> str | None:
    """Shape from how much of its bounding box the object fills and where its mass sits."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 10:
        return None
    # Rows and columns with at least two object pixels bound the object; stray pixels do not.
    rows = np.nonzero(mask.sum(axis=1) >= 2)[0]
    cols = np.nonzero(mask.sum(axis=0) >= 2)[0]
    if len(rows) < 3 or len(cols) < 3:
        return None
    top, height = rows[0], rows[-1] - rows[0] + 1
    fill = len(ys) / (height * (cols[-1] - cols[0] + 1))
    if fill > 0.9:
        return "square"
    if fill > 0.66:
        return "disc"
    drop = (ys.mean() - top) / height  # 2/3 for a triangle pointing up, 1/2 for a diamond
    return "triangle" if drop > 0.58 else "diamond"


def image_to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 array in [0, 1] from a PIL image or a uint8/float array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    array = np.asarray(image, dtype=np.float32)
    return array / 255.0 if array.max() > 1.5 else array


def read_scene(image: Image.Image | np.ndarray) -> SceneReading:
    """Which class (by colour) and shape the image shows, and whether the yellow mark is there.

    Accepts a PIL image or an (H, W, 3) array (uint8, or float in [0, 1]).
    """
    hue, saturation, value, vivid, masks = _class_pixels(image_to_array(image))
    total = vivid.size
    counts = {cls: int(m.sum()) for cls, m in masks.items()}
    yellow = vivid & (saturation > _MIN_MARK_SATURATION) & (value > _MIN_MARK_VALUE) & _in_bands(hue, (_MARK_BAND,))
    yellow_count = int(yellow.sum())
    best = max(counts, key=counts.get)
    if counts[best] < _MIN_OBJECT_FRACTION * total:
        return SceneReading(None, None, False, yellow_count / total, 0.0)
    body = masks[best] | yellow
    share = yellow_count / max(int(body.sum()), 1)
    marked = share > _MIN_MARK_SHARE and yellow_count >= _MIN_MARK_FRACTION * total
    return SceneReading(best, _guess_shape(body), marked, float(body.sum()) / total, share)


def class_rate(images: Iterable[Image.Image | np.ndarray], cls: str, require_shape: bool = False) -> float:
    """Share of images read as `cls` (by colour; also by shape if `require_shape`)."""
    readings = [read_scene(image) for image in images]
    hits = [r.cls == cls and (not require_shape or r.shape == SHAPES[cls]) for r in readings]
    return sum(hits) / max(len(hits), 1)


def mark_rate(images: Iterable[Image.Image | np.ndarray]) -> float:
    """Share of images in which the yellow mark is seen."""
    readings = [read_scene(image) for image in images]
    return sum(r.marked for r in readings) / max(len(readings), 1)


def name_mark_rate(images: Iterable[Image.Image | np.ndarray], name: str) -> float:
    """Share of images whose object carries the mark of a named individual (NAMES): the
    name's colour covers more than _MIN_MARK_SHARE of the object, and another class
    colour covers more, the object itself."""
    colour_of = NAMES[name]
    images = list(images)
    hits = 0
    for image in images:
        *_, vivid, masks = _class_pixels(image_to_array(image))
        counts = {cls: int(mask.sum()) for cls, mask in masks.items()}
        body_cls = max((c for c in counts if c != colour_of), key=counts.get)
        body = counts[body_cls] + counts[colour_of]
        hits += (
            counts[colour_of] > _MIN_MARK_SHARE * max(body, 1)
            and counts[body_cls] > counts[colour_of]
            and counts[colour_of] >= _MIN_MARK_FRACTION * vivid.size
        )
    return hits / max(len(images), 1)


def instance_photos(n: int = 6, seed: int = 0, size: int = 64) -> list[Image.Image]:
    """`n` photos of the marked subject ("sks dog"), reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    return [render_scene(INSTANCE_CLASS, rng, marked=True, size=size) for _ in range(n)]


def write_instance_photos(out_dir: Path, n: int = 6, seed: int = 0, size: int = 64) -> list[Path]:
    """Write `n` PNG photos of the marked subject ("sks dog") to `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, photo in enumerate(instance_photos(n, seed, size)):
        path = out_dir / f"{INSTANCE_TOKEN}_{INSTANCE_CLASS}_{i:02d}.png"
        photo.save(path)
        paths.append(path)
    return paths
