"""Instance and class image folders: finding, validating and reading images into training tensors."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from dreamlora.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini", "manifest.json"}
MAX_PIXELS = 64_000_000  # larger images are treated as decompression bombs


@dataclass(frozen=True)
class ImageFolder:
    """The usable images of a folder and what was skipped."""

    root: Path
    paths: tuple[Path, ...]
    skipped: tuple[str, ...]


def list_images(folder: Path | str, role: str) -> ImageFolder:
    """Image files of a folder, sorted; non-image files are skipped with a note. `role` names the folder in messages."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise DataError(f"{role} folder '{folder}' does not exist; pass a folder of photos (.png, .jpg, .jpeg, .webp, .bmp)")
    if not root.is_dir():
        raise DataError(f"{role} folder '{folder}' is a file, not a folder; pass the folder that holds the photos")
    paths, skipped = [], []
    for path in sorted(root.iterdir()):
        if path.is_dir() or path.name in IGNORED_NAMES or path.name.startswith("."):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            paths.append(path)
        elif path.suffix.lower() != ".txt":
            skipped.append(f"{path.name} (not an image)")
    if not paths:
        raise DataError(f"{role} folder '{folder}' has no images (.png, .jpg, .jpeg, .webp, .bmp); add 3-20 photos of the subject")
    for note in skipped:
        log.info("%s folder: skipped %s", role, note)
    return ImageFolder(root, tuple(paths), tuple(skipped))


def open_image(path: Path) -> Image.Image:
    """An RGB image with its EXIF orientation applied; unreadable files raise a DataError naming the file."""
    if path.stat().st_size == 0:
        raise DataError(f"image '{path}' is empty (0 bytes); remove it or replace it with a valid photo")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise DataError(
                        f"image '{path}' is {image.width}x{image.height} pixels, too large to be a photo (limit {MAX_PIXELS:,}); downscale it"
                    )
                image.load()
                image = ImageOps.exif_transpose(image)
                if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
                    rgba = image.convert("RGBA")
                    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    image = Image.alpha_composite(background, rgba)
                return image.convert("RGB")
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DataError(f"image '{path}' is a decompression bomb ({error}); remove it") from error
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"image '{path}' cannot be read ({error}); it is corrupt or truncated: remove or replace it") from error


def resize_and_crop(image: Image.Image, resolution: int, crop_box: tuple[int, int] | None = None) -> Image.Image:
    """Scale the shorter side to `resolution`, then crop a square (centre, or at `crop_box` = (left, top))."""
    scale = resolution / min(image.size)
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = crop_box if crop_box is not None else ((width - resolution) // 2, (height - resolution) // 2)
    return image.crop((left, top, left + resolution, top + resolution))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 to CHW float in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of one folder with one prompt, resized and cropped to the training resolution."""

    def __init__(self, folder: ImageFolder, prompt: str, resolution: int, role: str, center_crop: bool = True) -> None:
        self.folder, self.prompt, self.resolution, self.center_crop = folder, prompt, resolution, center_crop
        self.images = [open_image(path) for path in folder.paths]
        for path, image in zip(folder.paths, self.images):
            if min(image.size) < resolution // 2:
                log.warning("%s image '%s' is %dx%d, less than half the training resolution %d; it will look blurry", role, path.name, *image.size, resolution)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": to_tensor(resize_and_crop(self.images[index], self.resolution)), "prompt": self.prompt, "index": index}

    def random_crop(self, index: int, generator: torch.Generator) -> torch.Tensor:
        """A random square crop of image `index` at the training resolution."""
        return to_tensor(resize_and_crop(self.images[index], self.resolution, self.random_crop_box(index, generator)))

    def resized_size(self, index: int) -> tuple[int, int]:
        """(width, height) of image `index` after its shorter side is scaled to the training resolution."""
        image = self.images[index]
        scale = self.resolution / min(image.size)
        return max(self.resolution, round(image.width * scale)), max(self.resolution, round(image.height * scale))

    def random_crop_box(self, index: int, generator: torch.Generator) -> tuple[int, int]:
        """(left, top) of a random square crop of the resized image `index`."""
        width, height = self.resized_size(index)
        left = int(torch.randint(0, width - self.resolution + 1, (1,), generator=generator))
        top = int(torch.randint(0, height - self.resolution + 1, (1,), generator=generator))
        return left, top

    def center_crop_box(self, index: int) -> tuple[int, int]:
        """(left, top) of the centre crop, as `resize_and_crop` takes it."""
        width, height = self.resized_size(index)
        return (width - self.resolution) // 2, (height - self.resolution) // 2

    def size_conditioning(self, index: int, crop_box: tuple[int, int], flipped: bool = False) -> torch.Tensor:
        """SDXL's six size numbers for one example: original (height, width), crop (top, left), target (height, width).

        The crop offset is in the resized image, as SDXL was trained; a flipped example's crop is mirrored.
        """
        image = self.images[index]
        left, top = crop_box
        if flipped:
            left = self.resized_size(index)[0] - left - self.resolution
        return torch.tensor([image.height, image.width, top, left, self.resolution, self.resolution], dtype=torch.float32)


def collate_dreambooth(instance: list[dict], class_examples: list[dict]) -> dict:
    """One batch with instance examples first, then class examples; `n_instance` tells the loss where to split."""
    examples = instance + class_examples
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "prompts": [e["prompt"] for e in examples],
        "n_instance": len(instance),
    }


def batch_indices(step: int, batch_size: int, n_items: int, seed: int) -> list[int]:
    """Indices of the examples used at `step`: a seeded permutation per epoch, a pure function of (seed, step).

    Being pure, it needs no sampler state in checkpoints: a resumed run draws exactly what an uninterrupted one would.
    """
    start = step * batch_size
    indices = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, n_items)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        indices.append(int(torch.randperm(n_items, generator=generator)[offset]))
    return indices
