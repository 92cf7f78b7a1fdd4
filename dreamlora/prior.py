"""Class-prior images: top a folder up to N images of the class prompt, one seed per index, with a manifest."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dreamlora.checkpoint import write_atomic, write_json
from dreamlora.config import PriorConfig
from dreamlora.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# Settings that change the images: a folder made with other values is not topped up with these.
IDENTITY_KEYS = ("model", "prompt", "negative_prompt", "resolution", "steps", "guidance", "scheduler", "seed")


@dataclass(frozen=True)
class PriorResult:
    out_dir: Path
    existing: int
    generated: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


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


def auto_batch_size(device: torch.device, resolution: int) -> int:
    """Large batches on GPU (prior generation is launch-bound at batch 1), small ones on CPU."""
    if device.type != "cuda":
        return 4
    free, _ = torch.cuda.mem_get_info(device)
    per_image = 0.25 * (resolution / 512) ** 2 * 2**30  # ~0.25 GiB per 512px image with CFG in half precision
    return int(max(1, min(32, (free * 0.5) // per_image)))


def generate_class_images(
    pipeline: Any,
    prior_cfg: PriorConfig,
    resolution: int,
    out_dir: Path,
    model_ref: str,
    on_progress: Callable[[int, int], None] | None = None,
) -> PriorResult:
    """Generate the missing images of `out_dir` up to `prior_cfg.num_images`; each write is atomic."""
    import time

    from dreamlora.models import pipeline_family

    out_dir.mkdir(parents=True, exist_ok=True)
    guidance = prior_cfg.resolved_guidance(pipeline_family(pipeline).default_guidance)
    settings = {
        "model": model_ref,
        "prompt": prior_cfg.resolved_prompt(),
        "negative_prompt": prior_cfg.negative_prompt,
        "resolution": resolution,
        "steps": prior_cfg.steps,
        "guidance": guidance,
        "scheduler": prior_cfg.scheduler,
        "seed": prior_cfg.seed,
    }
    manifest = _read_manifest(out_dir)
    if manifest is not None:
        changed = [k for k in IDENTITY_KEYS if manifest.get(k) != settings[k]]
        if changed:
            diff = ", ".join(f"{k}: {manifest.get(k)!r} -> {settings[k]!r}" for k in changed)
            raise ConfigError(f"prior set '{out_dir}' was made with other settings ({diff}); use another --out, or delete the folder to regenerate it")
    files = {int(p.stem): p.name for p in out_dir.glob("[0-9]" * 5 + ".png")}
    missing = [i for i in range(prior_cfg.num_images) if i not in files]
    device = pipeline.device
    batch_size = prior_cfg.batch_size or auto_batch_size(device, resolution)
    started = time.perf_counter()
    done = 0
    if on_progress:
        on_progress(0, len(missing))
    for start in range(0, len(missing), batch_size):
        indices = missing[start : start + batch_size]
        generators = [torch.Generator(device=device).manual_seed(image_seed(prior_cfg.seed, i)) for i in indices]
        images = pipeline(
            prompt=[settings["prompt"]] * len(indices),
            negative_prompt=[prior_cfg.negative_prompt] * len(indices) if prior_cfg.negative_prompt else None,
            num_inference_steps=prior_cfg.steps,
            guidance_scale=guidance,
            height=resolution,
            width=resolution,
            generator=generators,
        ).images
        for index, image in zip(indices, images):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            write_atomic(out_dir / image_name(index), buffer.getvalue())
            files[index] = image_name(index)
        done += len(indices)
        if on_progress:
            on_progress(done, len(missing))
    seconds = time.perf_counter() - started
    entries = [{"file": files[i], "index": i, "seed": image_seed(prior_cfg.seed, i)} for i in sorted(files)]
    write_json(out_dir / MANIFEST, {**settings, "class_name": prior_cfg.class_name, "num_images": len(entries), "files": entries})
    return PriorResult(out_dir, prior_cfg.num_images - len(missing), len(missing), seconds)


def run_prior(
    prior_cfg: PriorConfig,
    model_cfg: Any,
    resolution: int = 0,
    priors_root: Path = Path("priors"),
    on_progress: Callable[[int, int], None] | None = None,
) -> PriorResult:
    """Load the base model and top up the class folder; also writes a contact sheet beside it."""
    from dreamlora.generate import make_grid
    from dreamlora.models import build_pipeline, load_components, public_model_ref, resolve_precision, select_attention

    if not prior_cfg.class_name and not prior_cfg.out:
        raise ConfigError("no class given; pass --class NAME (e.g. --class dog)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, dtype = resolve_precision(model_cfg.precision, device)
    components = load_components(model_cfg.name, dtype=dtype, device=device, allow_pickle=model_cfg.allow_pickle, vae=getattr(model_cfg, "vae", ""))
    select_attention(components, model_cfg.attention, device)
    pipeline = build_pipeline(components, prior_cfg.scheduler)
    out_dir = Path(prior_cfg.out) if prior_cfg.out else priors_root / safe_name(prior_cfg.class_name)
    result = generate_class_images(pipeline, prior_cfg, resolution or components.native_resolution, out_dir, public_model_ref(model_cfg.name), on_progress)
    from PIL import Image

    names = sorted(out_dir.glob("[0-9]" * 5 + ".png"))[:32]
    if names:
        thumbs = [Image.open(p).convert("RGB").resize((96, 96)) for p in names]
        rows = [thumbs[i : i + 8] for i in range(0, len(thumbs), 8)]
        make_grid(rows).save(out_dir.parent / f"{out_dir.name}-preview.png")
    return result
