"""Class-prior images: top a folder up to N images of the class prompt, one seed per index, with a manifest."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dreamlora.checkpoint import write_atomic, write_json
from dreamlora.config import PriorConfig
from dreamlora.errors import ConfigError, DataError
from dreamlora.models import default_guidance_rescale

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# Settings that change the images: a folder made with other values is not topped up with these.
MAX_RETRIES = 3  # new seeds tried for a blank, black, NaN or near-duplicate class image
MODEL_SOURCE_KEYS = ("revision", "variant", "vae")  # how the model's files were read, beside its name ("" = the default)
IDENTITY_KEYS = ("model", *MODEL_SOURCE_KEYS, "prompt", "negative_prompt", "resolution", "steps", "guidance", "scheduler", "seed", "clip_skip", "prediction_type", "base_weights")
IDENTITY_DEFAULTS: dict[str, Any] = {"clip_skip": 1, "base_weights": [], **dict.fromkeys(MODEL_SOURCE_KEYS, "")}  # what a set written before the key existed was made with
UNRECORDED_AGREES = ("prediction_type",)  # a set written before these keys existed was made with the model's own


@dataclass(frozen=True)
class PriorResult:
    out_dir: Path
    existing: int
    generated: int
    seconds: float
    rejected: tuple[tuple[str, str], ...] = ()  # (file, reason) of each image replaced by one from a new seed
    unresolved: tuple[tuple[str, str], ...] = ()  # (file, reason) of images still bad after MAX_RETRIES new seeds
    rendered: int = 0  # images the pipeline made, replacements included
    per_process: tuple[int, ...] = ()  # images each process made, under `accelerate launch`

    @property
    def images_per_second(self) -> float:
        return (self.rendered or self.generated) / self.seconds if self.seconds > 0 else 0.0


class Ranks:
    """The processes sharing one prior set: one per GPU under `accelerate launch --multi_gpu`.

    Every process reads the same folder and manifest and so makes the same plan; each draws
    the indices `share` gives it (rank r takes every count-th missing index from the r-th),
    so no index is drawn twice; the main process writes the manifest and the preview.
    """

    def __init__(self, state: Any = None) -> None:
        self._state = state
        self.index = state.process_index if state is not None else 0
        self.count = state.num_processes if state is not None else 1

    @classmethod
    def detect(cls) -> Ranks:
        """The ranks of this launch: accelerate's when several processes were started, else one."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        # As Accelerator does: without cpu=True a CPU launch would not join the process group.
        return cls(PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")))

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def device(self) -> torch.device:
        if self._state is not None:
            return self._state.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def share(self, indices: dict[int, int]) -> dict[int, int]:
        """This process's part of {index: seed}."""
        return {i: indices[i] for i in sorted(indices)[self.index :: self.count]}

    def barrier(self) -> None:
        if self.count > 1:
            self._state.wait_for_everyone()

    def gather(self, value: Any) -> list[Any]:
        """`value` from every process, in rank order."""
        if self.count == 1:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])


def safe_name(text: str) -> str:
    """A folder name from user text that cannot leave its parent folder (`../../x` becomes `x`)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", text.strip()).strip("-._")
    if not name:
        raise ConfigError(f"{text!r} gives an empty folder name; use letters or digits, e.g. `dog`")
    return name[:64]


def image_seed(seed: int, index: int) -> int:
    """Each image has its own seed so a re-run reproduces the set and a top-up adds only missing images."""
    return seed * 1_000_003 + index


def image_name(index: int) -> str:
    return f"{index:05d}.png"


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"'{path}' is not valid JSON ({error}); delete it to rebuild the manifest of this prior set") from error


def read_prior_set(out_dir: Path) -> dict[str, Any]:
    """The manifest of a prior set (its prompt, class and files)."""
    manifest = _read_manifest(Path(out_dir))
    if manifest is None:
        raise DataError(f"'{out_dir}' has no {MANIFEST}; generate it with `dreamlora prior`, or pass --class-prompt with your own class images")
    return manifest


def refuse_foreign_folder(out_dir: Path) -> None:
    """Prior images go only into a new folder, an empty one, or a prior set dreamlora made (it has a manifest):
    never among files the user already has, which the class-set checks could otherwise replace."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"'{out_dir}' is a file, not a folder; pass a folder for the class images with --out")
    if out_dir.is_dir() and not (out_dir / MANIFEST).is_file() and any(out_dir.iterdir()):
        raise ConfigError(
            f"'{out_dir}' already holds files and is not a prior set made by `dreamlora prior` (no {MANIFEST}); "
            "pass a new or empty folder with --out. To train on class images you have, pass that folder to "
            "`dreamlora train --class-dir` with --class-prompt"
        )


def auto_batch_size(device: torch.device, resolution: int) -> int:
    """Large batches on GPU (prior generation is launch-bound at batch 1), small ones on CPU."""
    if device.type != "cuda":
        return 4
    free, _ = torch.cuda.mem_get_info(device)
    per_image = 0.25 * (resolution / 512) ** 2 * 2**30  # ~0.25 GiB per 512px image with CFG in half precision
    return int(max(1, min(32, (free * 0.5) // per_image)))


def retry_seed(seed: int, index: int, attempt: int) -> int:
    """The seed of the `attempt`-th replacement of a rejected image: deterministic, so a re-run makes the same set."""
    return image_seed(seed, index) + attempt * 2**40


def _write_png(array: np.ndarray, path: Path) -> None:
    buffer = io.BytesIO()
    _to_pil(array).save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())


def _to_pil(array: np.ndarray) -> Image.Image:
    # As diffusers turns its float output into PIL images, so the bytes match output_type="pil".
    return Image.fromarray((np.nan_to_num(array) * 255).round().astype("uint8"))


def _render(pipeline: Any, prior_cfg: PriorConfig, settings: dict[str, Any], seeds: dict[int, int], batch_size: int, sink: Callable[[int, np.ndarray], None]) -> None:
    """Hand each index's float image (H, W, 3) in [0, 1], possibly NaN, to `sink` as soon as its batch is drawn."""
    device, indices = pipeline.device, sorted(seeds)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        generators = [torch.Generator(device=device).manual_seed(seeds[i]) for i in chunk]
        images = pipeline(
            prompt=[settings["prompt"]] * len(chunk),
            negative_prompt=[prior_cfg.negative_prompt] * len(chunk) if prior_cfg.negative_prompt else None,
            num_inference_steps=prior_cfg.steps,
            guidance_scale=settings["guidance"],
            guidance_rescale=default_guidance_rescale(pipeline.scheduler),
            height=settings["resolution"],
            width=settings["resolution"],
            generator=generators,
            output_type="np",
        ).images
        for index, image in zip(chunk, images):
            sink(index, image)


def _set_identity(
    pipeline: Any, prior_cfg: PriorConfig, resolution: int, model_ref: str, clip_skip: int, base_weights: list[str], model_source: dict[str, str]
) -> dict[str, Any]:
    """What makes a prior set one set (`IDENTITY_KEYS`): the model and everything that changes its images."""
    from dreamlora.models import pipeline_family

    return {
        "model": model_ref,
        **{key: model_source.get(key, "") for key in MODEL_SOURCE_KEYS},
        "prompt": prior_cfg.resolved_prompt(),
        "negative_prompt": prior_cfg.negative_prompt,
        "resolution": resolution,
        "steps": prior_cfg.steps,
        "guidance": prior_cfg.resolved_guidance(pipeline_family(pipeline).default_guidance),
        "scheduler": prior_cfg.scheduler,
        "seed": prior_cfg.seed,
        "clip_skip": clip_skip,
        "prediction_type": pipeline.scheduler.config.get("prediction_type", "epsilon"),
        "base_weights": list(base_weights),
    }


def _refuse_other_settings(out_dir: Path, manifest: dict[str, Any], settings: dict[str, Any], model_fingerprint: str | None) -> None:
    """A prior set is only topped up with the settings (and the local model) it was made with."""
    recorded = {k: manifest.get(k, settings[k] if k in UNRECORDED_AGREES else IDENTITY_DEFAULTS.get(k)) for k in IDENTITY_KEYS}
    changed = [f"{k}: {recorded[k]!r} -> {settings[k]!r}" for k in IDENTITY_KEYS if recorded[k] != settings[k]]
    recorded_print = manifest.get("model_fingerprint")
    if recorded_print and model_fingerprint and recorded_print != model_fingerprint and manifest.get("model") == settings["model"]:
        changed.append(f"model: {settings['model']!r} is another folder of that name")
    if changed:
        raise ConfigError(f"prior set '{out_dir}' was made with other settings ({', '.join(changed)}); use another --out, or delete the folder to regenerate it")


def _draw_and_write(
    pipeline: Any, prior_cfg: PriorConfig, settings: dict[str, Any], seeds: dict[int, int], batch_size: int, out_dir: Path, tick: Callable[[int], None]
) -> dict[int, str]:
    """Draw the images of `seeds` (index -> seed) and write each as a PNG, encoded in threads while the GPU draws the
    next batch; returns the indices whose images had NaNs."""
    problems: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=4) as writers:
        pending: list[Any] = []

        def sink(index: int, array: np.ndarray) -> None:
            pending.append(writers.submit(_write_png, array, out_dir / image_name(index)))
            if not np.isfinite(array).all():
                problems[index] = "nan"
            tick(1)

        _render(pipeline, prior_cfg, settings, seeds, batch_size, sink)
        for future in pending:
            future.result()
    return problems


def model_source_identity(model_cfg: Any) -> dict[str, str]:
    """How a `[model]` section reads its model's files, as a prior set records it (`MODEL_SOURCE_KEYS`)."""
    from dreamlora.models import vae_reference_identity

    return {"revision": model_cfg.revision, "variant": model_cfg.variant, "vae": vae_reference_identity(model_cfg.vae)}


def base_weight_identity(base_weights: tuple[str, ...]) -> list[str]:
    """The LoRAs fused into a model, as a prior set records them: file name, scale and the first 16 hex digits of the
    file's SHA-256 (the same name retrained is another model)."""
    from dreamlora.config import lora_reference
    from dreamlora.generate import base_weight_hashes

    hashes = base_weight_hashes(base_weights)
    identity = []
    for item in base_weights:
        path, scale = lora_reference(item, flag="--base-weights")
        identity.append(f"{path.name}:{scale:g}:{hashes[item]}")
    return identity


def find_class_problems(out_dir: Path, files: dict[int, str]) -> dict[int, str]:
    """Blank, black or unreadable images and near-duplicates of an earlier image, by index, with the reason."""
    from dreamlora.hygiene import dhash, image_problem, later_duplicates

    problems, hashes, order = {}, [], sorted(files)
    for index in order:
        try:
            with Image.open(out_dir / files[index]) as handle:
                image = handle.convert("RGB")
        except OSError as error:
            problems[index] = f"unreadable ({error})"
            hashes.append(-1)
            continue
        if problem := image_problem(image):
            problems[index] = problem
        hashes.append(dhash(image))
    for later, earlier in later_duplicates(hashes).items():
        if order[later] not in problems and order[earlier] not in problems and hashes[later] >= 0:
            problems[order[later]] = f"near-duplicate of {files[order[earlier]]}"
    return problems


@dataclass
class _SetDrawing:
    """Drawing a prior set's missing images, checking the whole set and redrawing bad ones with new seeds; `files`,
    `seeds` (index -> file name, seed) and `rejected_seeds` (index -> the seeds it replaced) are updated in place.
    `on_progress(done, total)` counts this process's share."""

    pipeline: Any
    prior_cfg: PriorConfig
    settings: dict[str, Any]
    out_dir: Path
    ranks: Ranks
    batch_size: int
    files: dict[int, str]
    seeds: dict[int, int]
    rejected_seeds: dict[int, list[dict[str, Any]]]
    on_progress: Callable[[int, int], None] | None
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) of each image replaced
    unresolved: list[tuple[str, str]] = field(default_factory=list)  # still bad after MAX_RETRIES new seeds
    generated: int = 0  # images this process drew
    done: int = 0
    total: int = 0

    def tick(self, count: int) -> None:
        self.done += count
        if self.on_progress:
            self.on_progress(self.done, self.total)

    def until_good(self, todo: dict[int, int]) -> None:
        """Draw `todo` (index -> seed), then redraw what the checks find, up to MAX_RETRIES new seeds per image."""
        out_dir = self.out_dir
        self.total = len(self.ranks.share(todo))
        self.tick(0)
        for attempt in range(MAX_RETRIES + 1):
            share = self.ranks.share(todo)  # this process's indices
            problems = _draw_and_write(self.pipeline, self.prior_cfg, self.settings, share, self.batch_size, out_dir, self.tick)
            self.generated += len(share)
            for index, seed in todo.items():
                self.files[index], self.seeds[index] = image_name(index), seed
            # Every process sees every file once all have written theirs, and so reaches the same verdicts.
            nan = [problem for found in self.ranks.gather(sorted(problems.items())) for problem in found]
            # Checked on the files: NaN (seen before conversion), then black, blank and near-duplicates of the whole set.
            problems = {**find_class_problems(out_dir, self.files), **dict(nan)}
            if not problems:
                return
            if attempt == MAX_RETRIES:
                self.unresolved = [(self.files[i], reason) for i, reason in sorted(problems.items())]
                bad = ", ".join(f"{f} ({r})" for f, r in self.unresolved)
                log.warning("prior set %s: %d images still bad after %d new seeds each: %s", out_dir, len(self.unresolved), MAX_RETRIES, bad)
                return
            todo = {}
            for index, reason in sorted(problems.items()):
                self.rejected.append((self.files[index], reason))
                self.rejected_seeds.setdefault(index, []).append({"seed": self.seeds[index], "reason": reason})
                todo[index] = retry_seed(self.prior_cfg.seed, index, len(self.rejected_seeds[index]))
                log.info("prior set %s: %s is %s; regenerating it with seed %d", out_dir, self.files[index], reason, todo[index])
            self.total += len(self.ranks.share(todo))


def generate_class_images(
    pipeline: Any,
    prior_cfg: PriorConfig,
    resolution: int,
    out_dir: Path,
    model_ref: str,
    on_progress: Callable[[int, int], None] | None = None,
    ranks: Ranks | None = None,
    model_fingerprint: str | None = None,
    clip_skip: int = 1,
    base_weights: list[str] | None = None,
    model_source: dict[str, str] | None = None,
) -> PriorResult:
    """Generate the missing images of `out_dir` up to `prior_cfg.num_images`; each write is atomic.

    Blank, black, NaN and near-duplicate images (new or already there) are replaced with images from new seeds
    (`retry_seed`, up to MAX_RETRIES each); the manifest records each file's seed and the seeds it replaced.
    With several `ranks`, each process draws its share of the indices; `on_progress` then counts this
    process's share. `model_fingerprint` (of a local model folder) tells apart two local models whose public
    names agree; a set recorded with another fingerprint is not topped up. `clip_skip` (the one the pipeline's text
    encoder reads prompts with, `models.apply_clip_skip`) and the prediction type of the pipeline's scheduler
    (`models.apply_prediction_type`) are part of the set's identity too, as are the `base_weights` fused into the
    model (`base_weight_identity`), and `model_source` (`model_source_identity`): the hub revision, the weights variant read
    (fp16 files are another rounding of the model) and the replacement VAE that decodes the images.
    """
    import time

    ranks = ranks or Ranks()
    refuse_foreign_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = _set_identity(pipeline, prior_cfg, resolution, model_ref, clip_skip, base_weights or [], model_source or {})
    manifest = _read_manifest(out_dir)
    if manifest is not None:
        _refuse_other_settings(out_dir, manifest, settings, model_fingerprint)
    recorded = {int(e["index"]): e for e in (manifest or {}).get("files", []) if "index" in e}
    seeds = {i: int(recorded[i].get("seed", image_seed(prior_cfg.seed, i))) if i in recorded else image_seed(prior_cfg.seed, i) for i in range(prior_cfg.num_images)}
    rejected_seeds: dict[int, list[dict[str, Any]]] = {i: list(recorded[i].get("rejected", [])) for i in recorded}
    files = {int(p.stem): p.name for p in out_dir.glob("[0-9]" * 5 + ".png")}
    missing = [i for i in range(prior_cfg.num_images) if i not in files]
    ranks.barrier()  # every process has read the folder before any writes to it
    # What identifies the set: the settings, and the local model's fingerprint when there is one.
    header = {**settings, **({"model_fingerprint": model_fingerprint} if model_fingerprint else {}), "class_name": prior_cfg.class_name}
    if manifest is None and ranks.is_main:
        # Marks the folder as a prior set from the start, so an interrupted run is topped up (by the same model only)
        # and never refused.
        write_json(out_dir / MANIFEST, {**header, "num_images": 0, "files": []})
    batch_size = prior_cfg.batch_size or auto_batch_size(pipeline.device, resolution)
    started = time.perf_counter()
    draw = _SetDrawing(pipeline, prior_cfg, settings, out_dir, ranks, batch_size, files, seeds, rejected_seeds, on_progress)
    draw.until_good({i: seeds[i] for i in missing})
    rejected, unresolved, generated = draw.rejected, draw.unresolved, draw.generated
    seconds = time.perf_counter() - started
    per_process = tuple(ranks.gather(generated))
    entries = [{"file": files[i], "index": i, "seed": seeds.get(i, image_seed(prior_cfg.seed, i)), **({"rejected": rejected_seeds[i]} if rejected_seeds.get(i) else {})} for i in sorted(files)]
    if ranks.is_main:
        write_json(out_dir / MANIFEST, {**header, "num_images": len(entries), "files": entries})
    ranks.barrier()  # no process goes on (to training, say) before the manifest is there
    return PriorResult(
        out_dir, prior_cfg.num_images - len(missing), len(missing), seconds, tuple(rejected), tuple(unresolved),
        sum(per_process), per_process,
    )


def run_prior(
    prior_cfg: PriorConfig,
    model_cfg: Any,
    resolution: int = 0,
    priors_root: Path = Path("priors"),
    on_progress: Callable[[int, int], None] | None = None,
) -> PriorResult:
    """Load the base model and top up the class folder; also writes a contact sheet beside it.

    Under `accelerate launch --multi_gpu --num_processes N`, the N processes split the missing
    images between them (one GPU each); only the main process reports progress.
    """
    from dreamlora.generate import make_grid
    from dreamlora.models import build_pipeline, load_model, model_fingerprint, public_model_ref, resolve_precision, select_attention

    if not prior_cfg.class_name and not prior_cfg.out:
        raise ConfigError("no class given; pass --class NAME (e.g. --class dog)")
    ranks = Ranks.detect()
    device = ranks.device
    _, dtype = resolve_precision(model_cfg.precision, device)
    components = load_model(model_cfg, dtype, device)
    select_attention(components, model_cfg.attention, device)
    pipeline = build_pipeline(components, prior_cfg.scheduler)
    out_dir = Path(prior_cfg.out) if prior_cfg.out else priors_root / safe_name(prior_cfg.class_name)
    result = generate_class_images(
        pipeline, prior_cfg, resolution or components.native_resolution, out_dir, public_model_ref(model_cfg.name),
        on_progress if ranks.is_main else None, ranks,
        model_fingerprint(components.source_dir) if components.source_dir is not None else None, components.clip_skip,
        base_weight_identity(model_cfg.base_weights), model_source_identity(model_cfg),
    )
    if not ranks.is_main:
        return result
    names = sorted(out_dir.glob("[0-9]" * 5 + ".png"))[:32]
    if names:
        thumbs = [Image.open(p).convert("RGB").resize((96, 96)) for p in names]
        rows = [thumbs[i : i + 8] for i in range(0, len(thumbs), 8)]
        make_grid(rows).save(out_dir.parent / f"{out_dir.name}-preview.png")
    return result
