"""Single-file checkpoints (the `.safetensors` models AUTOMATIC1111, ComfyUI and kohya users have): converted once, by
diffusers' own `from_single_file`, into a diffusers folder in the cache, which every command then loads as a local model.

The conversion needs the architecture's component configs and tokenizer: diffusers takes them from the hub repository it
picks for the checkpoint's architecture (stable-diffusion-v1-5/stable-diffusion-v1-5 for SD 1.x, the SDXL base for SDXL),
from the local Hugging Face cache when offline, or from `model.single_file_config` (a local diffusers folder or hub id of
the same architecture). The converted folder is keyed by the file's size and its first and last MiB, so a changed file
converts again and a moved one does not.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from dreamlora.errors import ModelLoadError

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
# Architecture -> where the component configs and tokenizer come from; None: the repository diffusers picks.
ARCHITECTURE_CONFIGS: dict[str, str | None] = {"sd": None, "sdxl": None}


def converted_dir_root() -> Path:
    from dreamlora.models import cache_root

    return cache_root() / "models"


def converted_usage() -> tuple[Path, int, int]:
    """The cache folder of converted checkpoints, how many finished conversions it holds, and their bytes on disk."""
    root = converted_dir_root()
    converted = [p for p in root.glob("*") if (p / "model_index.json").is_file()] if root.is_dir() else []
    return root, len(converted), sum(f.stat().st_size for p in converted for f in p.rglob("*") if f.is_file())


def file_key(path: Path) -> str:
    """Size and the first and last MiB of a file: enough to tell checkpoints apart without reading gigabytes."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(max(0, size - (1 << 20)))
        digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def checkpoint_architecture(path: Path) -> tuple[str, torch.dtype]:
    """`sd` (SD 1.x/2.x) or `sdxl`, and the dtype of the UNet's weights, from the tensor names and header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            unet_key = next((k for k in keys if k.startswith("model.diffusion_model.")), None)
            if unet_key is None:
                hint = " (it looks like a LoRA: pass it to generate --lora, or inspect it)" if any("lora" in k for k in keys[:200]) else ""
                raise ModelLoadError(f"'{path}' is not a Stable Diffusion checkpoint (no model.diffusion_model.* weights){hint}")
            dtype = handle.get_slice(unet_key).get_dtype()
    except SafetensorError as error:
        raise ModelLoadError(f"'{path}' could not be read as safetensors ({error}); the file is damaged or not a checkpoint") from error
    architecture = "sdxl" if any(k.startswith("conditioner.embedders.1.") for k in keys) else "sd"
    return architecture, torch.float16 if dtype in ("F16", "BF16") else torch.float32


def converted_folder(path: Path, config: str = "") -> Path:
    """The diffusers folder of single-file checkpoint `path`, converting it on first use (atomically)."""
    from dreamlora.checkpoint import temporary_folder_beside
    from dreamlora.models import hub_reachable, writable_on_any_rank

    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(
            f"'{path}' is a pickled single-file checkpoint ({path.suffix}), which can run code when loaded; dreamlora reads "
            "single files in .safetensors only: use the .safetensors download of the model, or convert it"
        )
    architecture, dtype = checkpoint_architecture(path)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem)[:60]
    folder = converted_dir_root() / f"{stem}-{file_key(path)}"
    if (folder / "model_index.json").is_file():
        return folder
    import diffusers

    source = config or ARCHITECTURE_CONFIGS.get(architecture)
    pipeline_class = diffusers.StableDiffusionXLPipeline if architecture == "sdxl" else diffusers.StableDiffusionPipeline
    extra = {"safety_checker": None, "requires_safety_checker": False} if architecture == "sd" else {}
    local_config = source is not None and Path(source).expanduser().is_dir()
    offline = not local_config and not hub_reachable()
    log.warning("converting the single-file checkpoint %s to a diffusers folder, once: %s", path, folder)
    try:
        pipe = pipeline_class.from_single_file(
            str(path), config=str(Path(source).expanduser()) if local_config else source, local_files_only=offline or local_config, dtype=dtype, **extra
        )
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as error:
        where = f"'{source}'" if source else "the hub repository diffusers picks for it"
        reason = "the Hugging Face hub is unreachable and they are not in the local cache" if offline else f"loading failed: {error}"
        raise ModelLoadError(
            f"could not convert the single-file checkpoint '{path}' ({architecture}): its component configs and tokenizer come from "
            f"{where}, and {reason}. Pass a local diffusers folder of the same architecture with --set model.single_file_config=PATH "
            "to prior, train or dataset (the conversion is then kept for every command), or convert the file with diffusers' "
            "convert_original_stable_diffusion_to_diffusers.py and pass the folder"
        ) from error
    temporary = temporary_folder_beside(folder)
    try:
        writable_on_any_rank(getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))
        pipe.save_pretrained(temporary, safe_serialization=True)
        if folder.exists() and not (folder / "model_index.json").is_file():
            shutil.rmtree(folder)  # not a finished conversion (those appear whole, by rename)
        try:
            os.replace(temporary, folder)
        except OSError:
            if not (folder / "model_index.json").is_file():
                raise
            shutil.rmtree(temporary)  # another process (accelerate launch) converted it meanwhile
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return folder
