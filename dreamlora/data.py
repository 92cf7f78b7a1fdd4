"""Instance and class image folders: finding, validating and reading images into training tensors."""

from __future__ import annotations

import functools
import logging
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from dreamlora.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif")
HEIF_SUFFIXES = (".heic", ".heif")  # iPhone photos: read when the optional pillow-heif is installed
HEIF_HINT = "HEIC photos need `pip install pillow-heif` (or `pip install 'dreamlora[heif]'`), or convert them to JPEG"
IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini", "manifest.json"}
MAX_PIXELS = 64_000_000  # larger images are treated as decompression bombs


@dataclass(frozen=True)
class ImageFolder:
    """The usable images of a folder and what was skipped."""

    root: Path
    paths: tuple[Path, ...]
    skipped: tuple[str, ...]


FEW_PHOTOS = 3


def few_photos_warning(count: int) -> str | None:
    """The warning for an instance set smaller than DreamBooth's usual 3-20 photos; None when there are enough."""
    if 0 < count < FEW_PHOTOS:
        return (
            f"only {count} photo{'s' if count > 1 else ''} of the subject: DreamBooth works best with 3-20 (other angles, "
            "backgrounds and lighting); with fewer, the LoRA tends to copy the photo instead of learning the subject"
        )
    return None


def list_images(folder: Path | str, role: str) -> ImageFolder:
    """Image files of a folder, sorted; non-image files are skipped with a note. `role` names the folder in messages."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise DataError(f"{role} folder '{folder}' does not exist; pass a folder of photos (.png, .jpg, .jpeg, .webp, .bmp, .gif, .tif, .avif)")
    if not root.is_dir():
        raise DataError(f"{role} folder '{folder}' is a file, not a folder; pass the folder that holds the photos")
    paths, skipped, heif = [], [], []
    readable = IMAGE_SUFFIXES + (HEIF_SUFFIXES if heif_readable() else ())
    for path in sorted(root.iterdir()):
        if path.is_dir() or path.name in IGNORED_NAMES or path.name.startswith("."):
            continue
        if path.suffix.lower() in readable:
            paths.append(path)
        elif path.suffix.lower() in HEIF_SUFFIXES:
            heif.append(path.name)
            skipped.append(f"{path.name} (HEIC: pillow-heif is not installed)")
        elif path.suffix.lower() not in CAPTION_SUFFIXES:
            skipped.append(f"{path.name} (not an image)")
    if not paths:
        if heif:
            raise DataError(f"{role} folder '{folder}' holds only HEIC photos ({', '.join(heif[:3])}{' ...' if len(heif) > 3 else ''}); {HEIF_HINT}")
        with_images = sorted(p.name for p in root.iterdir() if p.is_dir() and any(f.suffix.lower() in readable for f in p.iterdir() if f.is_file()))
        if with_images:  # e.g. kohya's layout, img/10_sks dog/
            listed = ", ".join(f"'{root / name}'" for name in with_images[:3]) + (" ..." if len(with_images) > 3 else "")
            hint = kohya_folder_hint(root / with_images[0], role)
            raise DataError(f"{role} folder '{folder}' has no images itself, but its subfolders do: {listed}; pass the folder that holds the photos{hint}")
        raise DataError(f"{role} folder '{folder}' has no images (.png, .jpg, .jpeg, .webp, .bmp, .gif, .tif, .avif); add 3-20 photos of the subject")
    if heif:
        log.warning("%s folder: %d HEIC photos skipped (%s); %s", role, len(heif), ", ".join(heif[:3]) + (" ..." if len(heif) > 3 else ""), HEIF_HINT)
    for note in skipped:
        log.info("%s folder: skipped %s", role, note)
    return ImageFolder(root, tuple(paths), tuple(skipped))


def kohya_folder_hint(folder: Path, role: str) -> str:
    """For a kohya-style dataset folder (`img/10_sks dog`: repeats, then the token and class; `reg/1_dog`), the
    dreamlora flags that train as it would; "" for other names."""
    match = re.fullmatch(r"(\d+)_(\S+)(?:\s+(.+))?", folder.name)
    if not match:
        return ""
    repeats, first, rest = int(match.group(1)), match.group(2), match.group(3)
    if role != "instance":
        return f" (kohya's layout: --class-dir '{folder}')"
    words = [f"--instance '{folder}'", *([f"--repeats {repeats}"] if repeats > 1 else []), f"--token {first}", *([f"--class '{rest}'" if " " in rest else f"--class {rest}"] if rest else [])]
    return f" (kohya's layout, {repeats} repeats: {' '.join(words)})"


@functools.cache
def heif_readable() -> bool:
    """Whether HEIC/HEIF files open: pillow-heif installed (its opener is registered with PIL once)."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


@dataclass(frozen=True)
class LoadedImage:
    """An image as training sees it (RGB, upright) and what was done to get there."""

    image: Image.Image
    format: str  # PIL's name of the file format, e.g. JPEG
    file_size: tuple[int, int]  # width, height as stored, before EXIF rotation
    fixes: tuple[str, ...]  # e.g. `EXIF orientation 6 applied`, `alpha flattened on white`
    alpha: Image.Image | None = None  # the alpha channel (mode L, upright) of a photo that has one: --masked-loss's mask


def open_image(path: Path) -> Image.Image:
    """An RGB image with its EXIF orientation applied; unreadable files raise a DataError naming the file."""
    return load_image(path).image


def load_image(path: Path) -> LoadedImage:
    """`open_image` with the format and the fixes applied (EXIF rotation, alpha, palette), for reports."""
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
                image.load()  # the first frame of an animated GIF
                fmt, file_size, fixes, alpha = image.format or path.suffix.lstrip(".").upper(), image.size, [], None
                orientation = image.getexif().get(0x0112, 1)
                image = ImageOps.exif_transpose(image)
                if orientation not in (0, 1):
                    fixes.append(f"EXIF orientation {orientation} applied")
                if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                    rgba = image.convert("RGBA")
                    alpha = rgba.getchannel("A")
                    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    image = Image.alpha_composite(background, rgba)
                    fixes.append("alpha flattened on white")
                elif image.mode == "P":
                    fixes.append("palette converted to RGB")
                elif image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                    # 16-bit and float greyscale (scans, some TIFFs): PIL's convert("RGB") would clip them to white.
                    values = np.asarray(image, dtype=np.float64)
                    peak = float(values.max()) if values.size else 0.0
                    if image.mode == "F":  # floats: [0, 1] as they usually are, else their own range
                        top = 1.0 if peak <= 1.0 else peak
                    else:  # 16-bit ("I" is how some 16-bit PNGs open), or 8-bit values held in "I"
                        top = 65535.0 if image.mode.startswith("I;16") or peak > 255 else 255.0
                    fixes.append(f"{'float' if image.mode == 'F' else '16-bit'} greyscale scaled to 8-bit")
                    image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
                elif image.mode not in ("RGB", "L"):
                    fixes.append(f"{image.mode} converted to RGB")
                return LoadedImage(image.convert("RGB"), fmt, file_size, tuple(fixes), alpha)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DataError(f"image '{path}' is a decompression bomb ({error}); remove it") from error
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"image '{path}' cannot be read ({error}); it is corrupt or truncated: remove or replace it") from error


def load_masks(folder: ImageFolder, mask_dir: Path | str, sizes: list[tuple[int, int]]) -> list[Image.Image]:
    """Each photo's loss mask from `mask_dir` (kohya's conditioning_data_dir for --masked_loss): the greyscale image of
    the same name (any image suffix), white learned and black ignored, upright as its EXIF says and scaled to the
    photo's size `sizes[i]` (width, height) when it is smaller or larger with the same shape. Missing, ambiguous,
    unreadable and misshapen masks are one DataError naming them."""
    masks_folder = list_images(mask_dir, "mask")
    by_stem: dict[str, list[Path]] = {}
    for path in masks_folder.paths:
        by_stem.setdefault(path.stem, []).append(path)
    missing = [p.name for p in folder.paths if p.stem not in by_stem]
    if missing:
        listed = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(f"mask folder '{mask_dir}' has no mask for {len(missing)} of the {len(folder.paths)} photos ({listed}); add a greyscale image of the same name for each (white: learned, black: ignored)")
    ambiguous = [f"{stem} ({', '.join(p.name for p in paths)})" for stem, paths in by_stem.items() if len(paths) > 1 and any(p.stem == stem for p in folder.paths)]
    if ambiguous:
        raise DataError(f"mask folder '{mask_dir}' has more than one mask for {'; '.join(ambiguous[:3])}; keep one per photo")
    masks = []
    for photo, size in zip(folder.paths, sizes):
        path = by_stem[photo.stem][0]
        mask = load_image(path).image.convert("L")
        if mask.size != size:
            if abs(math.log((mask.width / mask.height) / (size[0] / size[1]))) > 0.01:
                raise DataError(f"mask '{path}' is {mask.width}x{mask.height} but its photo '{photo.name}' is {size[0]}x{size[1]}; a mask must have its photo's shape (the same size, or scaled)")
            mask = mask.resize(size, Image.Resampling.BILINEAR)
        masks.append(mask)
    return masks


def learned_share(mask: Image.Image) -> float:
    """The share of a loss mask (mode L) that is learned: its mean, 0 (all black) to 1 (all white)."""
    return float(np.asarray(mask, dtype=np.float32).mean() / 255.0)


def check_images(folder: ImageFolder) -> None:
    """Open every image once, so a corrupt, empty or oversized file is named before anything is written."""
    for path in folder.paths:
        open_image(path).close()


def duplicate_images(first: ImageFolder, second: ImageFolder) -> list[tuple[Path, Path]]:
    """Pairs (a, b) of files of `first` and `second` with the same content (SHA-256 of the file bytes)."""
    import hashlib

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    seen = {digest(path): path for path in first.paths}
    return [(seen[h], path) for path in second.paths if (h := digest(path)) in seen]


CAPTION_SUFFIXES = (".txt", ".caption")  # .caption is kohya's default caption extension


def caption_path(image_path: Path) -> Path | None:
    """`photo.txt` (else kohya's `photo.caption`) beside `photo.jpg`, when there is one."""
    return next((p for p in (image_path.with_suffix(suffix) for suffix in CAPTION_SUFFIXES) if p.is_file()), None)


def read_caption(image_path: Path) -> str | None:
    """The caption of `photo.jpg` (see `caption_path`) on one line; None when there is none or it is empty."""
    path = caption_path(image_path)
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"caption '{path}' is not UTF-8 text ({error}); save it as UTF-8") from error
    return " ".join(text.split()) or None


def caption_prompt(caption: str, token: str) -> str:
    """A caption as a prompt: `{token}` marks where the token goes; without it (and without the token as a word of its
    own, punctuation and emphasis brackets around it allowed: `sks,` `(sks:1.2)`) it is prefixed."""
    if "{token}" in caption:
        return caption.replace("{token}", token)
    if has_token(caption, token):
        return caption
    return f"{token}, {caption}"


def has_token(prompt: str, token: str) -> bool:
    """Whether `token` is a word of its own in `prompt` (punctuation and emphasis brackets around it allowed: `sks,`
    `(sks:1.2)`; not inside another word)."""
    return re.search(rf"(?<![\w-]){re.escape(token)}(?![\w-])", prompt) is not None


def tag_frequency(prompts: list[str], separator: str = ",") -> dict[str, int]:
    """How often each tag (a prompt's `separator`-separated parts, stripped) occurs across the prompts, as kohya counts
    it for `ss_tag_frequency`, which Civitai and LoRA browsers show as the words a LoRA was trained on."""
    counts: dict[str, int] = {}
    for prompt in prompts:
        for tag in (part.strip() for part in prompt.split(separator)):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def token_placement_problems(data: Any, with_prior: bool) -> list[str]:
    """The token binds the subject only where it is written: an instance prompt without it teaches its plain words (the
    class drifts to the subject), and a class prompt with it teaches the token the class images. `data` a DataConfig."""
    problems, prompt, token, name = [], data.resolved_instance_prompt(), data.token, data.class_name or "dog"
    if not has_token(prompt, token):
        problems.append(
            f"the instance prompt {prompt!r} does not contain the token {token!r}, so the photos are learned as its plain words (and the class with them); "
            f"write the token where the subject is named, e.g. --instance-prompt 'a photo of {token} {name}' (photo captions get it prefixed)"
        )
    if with_prior and data.class_prompt and has_token(data.class_prompt, token):
        problems.append(
            f"the class prompt {data.class_prompt!r} contains the token {token!r}, so prior preservation teaches the token the class images instead of "
            f"keeping it for the subject; give the class prompt without it, e.g. --class-prompt 'a photo of {name}'"
        )
    return problems


def vary_caption(prompt: str, separator: str, keep: int, shuffle: bool, tag_dropout: float, generator: torch.Generator) -> str:
    """One step's version of a tagged prompt, as kohya's sd-scripts make it: split at `separator`, the first `keep`
    tags fixed, each other tag dropped with probability `tag_dropout`, the rest shuffled; joined with ", " (another
    separator: with a space each side). A prompt without the separator comes back unchanged."""
    if separator not in prompt:
        return prompt
    tags = [t.strip() for t in prompt.split(separator) if t.strip()]
    fixed, rest = tags[:keep], tags[keep:]
    if tag_dropout > 0 and rest:
        kept = torch.rand(len(rest), generator=generator) >= tag_dropout
        rest = [tag for tag, k in zip(rest, kept.tolist()) if k]
    if shuffle and len(rest) > 1:
        rest = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
    joiner = ", " if separator.strip() == "," else f" {separator.strip()} "
    return joiner.join(fixed + rest)


def instance_prompts(folder: ImageFolder, token: str, default: str, captions: bool = True) -> list[str]:
    """The prompt of each image: its caption file made into a prompt, else `default`."""
    if not captions:
        return [default] * len(folder.paths)
    return [caption_prompt(text, token) if (text := read_caption(path)) else default for path in folder.paths]


def resize_and_crop(image: Image.Image, resolution: int, crop_box: tuple[int, int] | None = None) -> Image.Image:
    """Scale the shorter side to `resolution`, then crop a square (centre, or at `crop_box` = (left, top))."""
    scale = resolution / min(image.size)
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = crop_box if crop_box is not None else ((width - resolution) // 2, (height - resolution) // 2)
    return image.crop((left, top, left + resolution, top + resolution))


def cover_size(image_size: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """The size an image is scaled to so that it covers `size` = (width, height) with its aspect ratio kept."""
    scale = max(size[0] / image_size[0], size[1] / image_size[1])
    return max(size[0], round(image_size[0] * scale)), max(size[1], round(image_size[1] * scale))


def resize_and_crop_to(image: Image.Image, size: tuple[int, int], offset: tuple[int, int] | None = None) -> Image.Image:
    """Scale to cover `size` = (width, height), then crop it (centre, or at `offset` = (left, top))."""
    width, height = cover_size(image.size, size)
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = offset if offset is not None else ((width - size[0]) // 2, (height - size[1]) // 2)
    return image.crop((left, top, left + size[0], top + size[1]))


def random_offset(image_size: tuple[int, int], size: tuple[int, int], generator: torch.Generator) -> tuple[int, int]:
    """A random (left, top) crop position of `size` in the image scaled to cover it."""
    width, height = cover_size(image_size, size)
    left = int(torch.randint(0, width - size[0] + 1, (1,), generator=generator))
    top = int(torch.randint(0, height - size[1] + 1, (1,), generator=generator))
    return left, top


def size_ids(image_size: tuple[int, int], size: tuple[int, int], offset: tuple[int, int] | None = None, flipped: bool = False) -> torch.Tensor:
    """SDXL's six size numbers for one example: original (height, width), crop (top, left), target (height, width).

    `image_size` and `size` are (width, height); the crop `offset` = (left, top) is in the image scaled to cover `size`
    (centre when None), as SDXL was trained; a flipped example's crop is mirrored.
    """
    width, height = cover_size(image_size, size)
    left, top = offset if offset is not None else ((width - size[0]) // 2, (height - size[1]) // 2)
    if flipped:
        left = width - left - size[0]
    return torch.tensor([image_size[1], image_size[0], top, left, size[1], size[0]], dtype=torch.float32)


def jitter_colors(image: Image.Image, strength: float, generator: torch.Generator) -> Image.Image:
    """Light colour jitter: brightness, contrast and saturation each scaled by a factor in [1 - strength, 1 + strength]."""
    from PIL import ImageEnhance

    factors = (1 + strength * (2 * torch.rand(3, generator=generator) - 1)).tolist()
    for enhancer, factor in zip((ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color), factors):
        image = enhancer(image).enhance(factor)
    return image


def make_buckets(resolution: int, step: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Kohya-style aspect buckets: (width, height) pairs, multiples of `step`, of about resolution**2 pixels (never more).

    `step` is the pixel multiple the model needs (64 for SD: 8 for the VAE times 8 for the UNet's downsampling).
    """
    area, buckets = resolution * resolution, {(resolution, resolution)}
    for width in range(step, int(resolution * max_ratio) + 1, step):
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_ratio:
            buckets |= {(width, height), (height, width)}
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def nearest_bucket(image_size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log ratio; ties go to the larger area)."""
    ratio = np.log(image_size[0] / image_size[1])
    return min(buckets, key=lambda b: (abs(np.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def latent_mask(alpha: Image.Image | None, latent_hw: tuple[int, int], flipped: bool) -> torch.Tensor:
    """A view's loss mask at latent size, (1, h, w) in [0, 1]: the alpha channel cropped as the pixels were (the caller
    does that), mirrored with them, and area-averaged down; all ones without an alpha channel."""
    if alpha is None:
        return torch.ones(1, *latent_hw)
    mask = torch.from_numpy(np.asarray(alpha, dtype=np.float32) / 255.0)[None, None]
    mask = torch.nn.functional.interpolate(mask, size=latent_hw, mode="area")[0]
    return mask.flip(-1) if flipped else mask


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 to CHW float in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of one folder with one prompt (or one per image: `prompts`), resized and cropped to the training resolution."""

    def __init__(
        self,
        folder: ImageFolder,
        prompt: str,
        resolution: int,
        role: str,
        center_crop: bool = True,
        prompts: list[str] | None = None,
        alphas: bool = False,
        mask_dir: str = "",
    ) -> None:
        self.folder, self.prompt, self.resolution, self.center_crop = folder, prompt, resolution, center_crop
        self.prompts = list(prompts) if prompts is not None else [prompt] * len(folder.paths)
        loaded = [load_image(path) for path in folder.paths]
        self.images = [item.image for item in loaded]
        # --masked-loss: each photo's alpha channel (None: no alpha, the whole image counts), or its mask from `mask_dir`.
        self.alphas: list[Image.Image | None] | None = [item.alpha for item in loaded] if alphas else None
        if alphas and mask_dir:
            self.alphas = list(load_masks(folder, mask_dir, [image.size for image in self.images]))
        for path, image in zip(folder.paths, self.images):
            if min(image.size) < resolution // 2:
                log.warning("%s image '%s' is %dx%d, less than half the training resolution %d; it will look blurry", role, path.name, *image.size, resolution)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": to_tensor(resize_and_crop(self.images[index], self.resolution)), "prompt": self.prompts[index], "index": index}

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
        """SDXL's six size numbers for a square crop of image `index` at `crop_box` = (left, top): see `size_ids`."""
        size = (self.resolution, self.resolution)
        return size_ids(self.images[index].size, size, crop_box, flipped)


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
    return stream_indices(step * batch_size, batch_size, n_items, seed)


def stream_indices(start: int, count: int, n_items: int, seed: int) -> list[int]:
    """`count` indices from position `start` of an endless stream of seeded per-epoch permutations of `n_items`."""
    indices = []
    for position in range(start, start + count):
        epoch, offset = divmod(position, n_items)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        indices.append(int(torch.randperm(n_items, generator=generator)[offset]))
    return indices
