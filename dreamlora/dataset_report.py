"""What `dreamlora dataset` reports: the instance and class sets exactly as `train` will build them, and their problems."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from dreamlora.config import RunConfig
from dreamlora.data import IGNORED_NAMES, ImageFolder, caption_path, caption_prompt, few_photos_warning, learned_share, list_images, load_image, load_masks, make_buckets, nearest_bucket, read_caption, resize_and_crop_to, token_placement_problems
from dreamlora.emphasis import has_emphasis
from dreamlora.errors import DataError
from dreamlora.hygiene import NEAR_DUPLICATE_BITS, dhash, hamming, image_problem, near_duplicates
from dreamlora.sampling import class_span, instance_plan, steps_per_epoch

SHEET_COLUMNS = 8
MIN_SHEET_CELL = 96  # smaller training views are enlarged by a whole factor (nearest neighbour) to stay legible


@dataclass
class ImageEntry:
    name: str
    format: str
    file_size: tuple[int, int]  # as stored
    size: tuple[int, int]  # upright, after EXIF orientation
    train_size: tuple[int, int]  # the view training sees (the bucket, or the square resolution)
    fixes: tuple[str, ...] = ()
    prompt: str | None = None  # from a caption file
    problem: str | None = None  # black, blank, nan
    dhash: int = 0


@dataclass
class FolderReport:
    role: str
    folder: Path
    images: list[ImageEntry] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # `name (reason)`
    unreadable: list[str] = field(default_factory=list)  # fatal: `path: reason`
    near_duplicates: list[tuple[str, str, int]] = field(default_factory=list)
    too_small: list[str] = field(default_factory=list)
    empty_captions: list[str] = field(default_factory=list)

    @property
    def formats(self) -> Counter:
        return Counter(e.format for e in self.images)

    @property
    def orientations(self) -> Counter:
        return Counter("portrait" if e.size[1] > e.size[0] else "landscape" if e.size[0] > e.size[1] else "square" for e in self.images)

    @property
    def captions(self) -> int:
        return sum(e.prompt is not None for e in self.images)

    @property
    def problems(self) -> list[tuple[str, str]]:
        return [(e.name, e.problem) for e in self.images if e.problem]


@dataclass
class DatasetReport:
    instance: FolderReport
    klass: FolderReport | None
    resolution: int
    bucket_sizes: Counter  # training size (w, h) -> instance images
    in_class_set: list[tuple[str, str, int]]  # (instance image, class image, dHash distance)
    steps_per_epoch: int
    epochs: float  # at train.max_steps
    class_per_epoch: int
    sheet: Path | None
    notes: list[str] = field(default_factory=list)

    @property
    def fatal(self) -> list[str]:
        return self.instance.unreadable + (self.klass.unreadable if self.klass else [])

    def raise_if_fatal(self) -> None:
        """A DataError naming every file that would stop `train`."""
        if self.fatal:
            raise DataError("these files would stop training:\n  " + "\n  ".join(self.fatal) + "\nremove or replace them, then run `dreamlora dataset` again")


def model_geometry(ref: str, single_file_config: str = "", revision: str = "", allow_pickle: bool = False) -> tuple[int, int]:
    """(native resolution, VAE scale factor) from a model's config files (a hub id's at `revision`), without loading
    weights; SD 1.x's when unknown. (A single-file checkpoint is converted first, once, as every command does; a
    pickled one only with `allow_pickle`.)"""
    from dreamlora.models import check_revision, resolve_model_dir

    configs: dict[str, dict] = {}
    source = resolve_model_dir(ref, allow_pickle, single_file_config) if not ref.startswith("random:") else None  # a bad path raises ModelLoadError (exit 2)
    if source is not None:
        check_revision(ref, source, revision)
    for part in ("unet", "vae"):
        path = None
        if isinstance(source, Path):
            path = source / part / "config.json"
        elif isinstance(source, str):
            try:
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(source, f"{part}/config.json", revision=revision or None)
                path = Path(cached) if isinstance(cached, str) else None
            except Exception:  # noqa: BLE001 - an unknown hub layout only loses the exact geometry
                path = None
        if path is not None and path.is_file():
            configs[part] = json.loads(path.read_text(encoding="utf-8"))
    if "unet" not in configs or "vae" not in configs:
        return 512, 8
    factor = 2 ** (len(configs["vae"].get("block_out_channels", [0] * 4)) - 1)
    return int(configs["unet"].get("sample_size", 64)) * factor, factor


def _scan(folder: ImageFolder, role: str, resolution: int, buckets: list[tuple[int, int]] | None, token: str | None) -> FolderReport:
    report = FolderReport(role, folder.root, skipped=list(folder.skipped))
    report.skipped += [f"{p.name} (system file, ignored)" for p in sorted(folder.root.iterdir()) if p.is_file() and (p.name in IGNORED_NAMES - {"manifest.json"} or p.name.startswith("."))]
    for path in folder.paths:
        try:
            loaded = load_image(path)
        except DataError as error:
            report.unreadable.append(str(error))
            continue
        size = loaded.image.size
        train_size = nearest_bucket(size, buckets) if buckets else (resolution, resolution)
        entry = ImageEntry(path.name, loaded.format, loaded.file_size, size, train_size, loaded.fixes, problem=image_problem(loaded.image), dhash=dhash(loaded.image))
        if token is not None:
            caption = read_caption(path)
            if caption:
                entry.prompt = caption_prompt(caption, token)
            elif (empty := caption_path(path)) is not None:
                report.empty_captions.append(empty.name)
        if min(size) < resolution // 2:
            report.too_small.append(f"{path.name} ({size[0]}x{size[1]})")
        report.images.append(entry)
    report.near_duplicates = [(report.images[i].name, report.images[j].name, d) for i, j, d in near_duplicates([e.dhash for e in report.images])]
    return report


def write_contact_sheet(folder: ImageFolder, report: FolderReport, path: Path) -> Path:
    """The instance images as training sees them (upright, cover-resized, centre-cropped), labelled with their names."""
    views = []
    by_name = {e.name: e for e in report.images}
    for image_path in folder.paths:
        entry = by_name.get(image_path.name)
        if entry is not None:
            views.append((entry.name, resize_and_crop_to(load_image(image_path).image, entry.train_size)))
    cell_w = max(v.width for _, v in views)
    cell_h = max(v.height for _, v in views)
    zoom = max(1, math.ceil(MIN_SHEET_CELL / max(cell_w, cell_h)))
    cell_w, cell_h, label = cell_w * zoom + 8, cell_h * zoom + 8, 14
    columns = min(SHEET_COLUMNS, len(views))
    rows = math.ceil(len(views) / columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * (cell_h + label)), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for n, (name, view) in enumerate(views):
        x, y = (n % columns) * cell_w, (n // columns) * (cell_h + label)
        view = view.resize((view.width * zoom, view.height * zoom), Image.Resampling.NEAREST) if zoom > 1 else view
        sheet.paste(view, (x + 4, y + 4))
        draw.text((x + 4, y + cell_h), f"{name} {view.width // zoom}x{view.height // zoom}"[: cell_w // 6], fill=(230, 230, 230))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def build_dataset_report(cfg: RunConfig, vae_scale_factor: int = 8, sheet_path: Path | None = None) -> DatasetReport:
    """Scan the instance (and class) folders of `cfg.data` at its resolution (resolved, not 0) and write the contact sheet."""
    data, train = cfg.data, cfg.train
    if not data.instance_dir:
        raise DataError("no instance folder; pass it as the argument, e.g. `dreamlora dataset ./dog`")
    if data.resolution <= 0:
        raise DataError(f"the training resolution is unknown ({data.resolution}); pass --resolution")
    buckets = make_buckets(data.resolution, 8 * vae_scale_factor, data.bucket_max_ratio) if data.buckets else None
    folder = list_images(data.instance_dir, "instance")
    instance = _scan(folder, "instance", data.resolution, buckets, data.token if data.captions else None)
    klass = None
    in_class_set: list[tuple[str, str, int]] = []
    notes: list[str] = []
    if data.class_dir:
        class_folder = list_images(data.class_dir, "class")
        klass = _scan(class_folder, "class", data.resolution, None, None)
        in_class_set = [(a.name, b.name, d) for a in instance.images for b in klass.images if (d := hamming(a.dhash, b.dhash)) <= NEAR_DUPLICATE_BITS]
    plan = instance_plan([e.train_size for e in instance.images], data.resolution, train.batch_size, data.repeats, train.seed, buckets)
    micro_batches = plan.batches_per_epoch
    per_epoch = steps_per_epoch(plan, 1, train.gradient_accumulation)
    class_per_epoch = class_span(micro_batches, train.batch_size, data.class_ratio)[0] if klass else 0
    if warning := few_photos_warning(len(instance.images)):
        notes.append(warning)
    notes += token_placement_problems(data, bool(data.class_dir))
    if not data.center_crop:
        notes.append("random crops: the contact sheet shows the centre crop; training sees other crops of the same scaled image")
    if data.color_jitter:
        notes.append(f"colour jitter {data.color_jitter}: not shown on the contact sheet")
    if data.mask_dir:
        shares = [learned_share(mask) for mask in load_masks(folder, data.mask_dir, [e.size for e in instance.images])]
        notes.append(f"--mask-dir: every photo has its mask in '{data.mask_dir}'; on average {100 * sum(shares) / len(shares):.0f}% of a photo is learned")
        if blank := [e.name for e, share in zip(instance.images, shares) if share < 0.01]:
            notes.append(f"the masks of {', '.join(blank[:5])} are black, so those photos teach nothing (white marks what is learned)")
    elif data.masked_loss:
        masked = sum("alpha flattened on white" in e.fixes for e in instance.images)
        notes.append(f"--masked-loss: {masked} of {len(instance.images)} photos have an alpha channel, which weights their loss (the others count whole)")
    if data.varies_captions and instance.captions:
        what = " and ".join(w for w, on in (("shuffled", data.shuffle_caption), (f"dropped with probability {data.caption_tag_dropout:g}", data.caption_tag_dropout > 0)) if on)
        notes.append(f"caption tags (split at {data.caption_separator!r}) are {what} every step; the first {data.keep_tokens} stay in place")
    if bracketed := [e.name for e in instance.images if e.prompt is not None and has_emphasis(e.prompt)]:
        if data.weighted_captions:
            notes.append(f"--weighted-captions: {len(bracketed)} captions weigh words with brackets, read as AUTOMATIC1111's emphasis")
        else:
            notes.append(f"{len(bracketed)} captions have brackets ({', '.join(bracketed[:3])}), trained as plain text; --weighted-captions reads them as emphasis, (word:1.2)")
    if data.caption_dropout and instance.captions:
        notes.append(f"caption dropout {data.caption_dropout}: that share of captioned examples uses '{data.resolved_instance_prompt()}'")
    sheet = None
    if instance.images:
        target = sheet_path or folder.root.parent / f"{folder.root.name}-dataset.png"
        sheet = write_contact_sheet(folder, instance, target)
    return DatasetReport(
        instance, klass, data.resolution, Counter(e.train_size for e in instance.images), in_class_set,
        per_epoch, train.max_steps / per_epoch, class_per_epoch, sheet, notes,
    )
