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
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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


def checkpoint_architecture(path: Path) -> tuple[str, torch.dtype, dict[str, Any]]:
    """`sd` (SD 1.x/2.x) or `sdxl`, the dtype of the UNet's weights and the scheduler settings its markers say
    (`marked_scheduler_settings`), from the tensor names and header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            settings = marked_scheduler_settings(keys, handle.metadata() or {})
            unet_key = next((k for k in keys if k.startswith("model.diffusion_model.")), None)
            if unet_key is None:
                hint = " (it looks like a LoRA: pass it to generate --lora, or inspect it)" if any("lora" in k for k in keys[:200]) else ""
                raise ModelLoadError(f"'{path}' is not a Stable Diffusion checkpoint (no model.diffusion_model.* weights){hint}")
            dtype = handle.get_slice(unet_key).get_dtype()
    except SafetensorError as error:
        raise ModelLoadError(f"'{path}' could not be read as safetensors ({error}); the file is damaged or not a checkpoint") from error
    architecture = "sdxl" if any(k.startswith("conditioner.embedders.1.") for k in keys) else "sd"
    return architecture, torch.float16 if dtype in ("F16", "BF16") else torch.float32, settings


# Empty tensors that say how a checkpoint was trained, as ComfyUI reads them (NoobAI-XL v-pred and other v-prediction
# anime checkpoints carry them; diffusers' from_single_file ignores them and loads such a model as epsilon).
V_PRED_MARKER, ZTSNR_MARKER = "v_pred", "ztsnr"


def scheduler_markers(scheduler_config: Any) -> dict[str, torch.Tensor]:
    """The marker tensors a single-file checkpoint of a model with this scheduler config carries: `v_pred` for
    v-prediction, `ztsnr` for a zero-terminal-SNR schedule."""
    markers = {V_PRED_MARKER: torch.zeros(0)} if scheduler_config.get("prediction_type") == "v_prediction" else {}
    if scheduler_config.get("rescale_betas_zero_snr"):
        markers[ZTSNR_MARKER] = torch.zeros(0)
    return markers


def marked_scheduler_settings(keys: Iterable[str], metadata: dict[str, str]) -> dict[str, Any]:
    """The scheduler settings a checkpoint's markers (and its model spec's `prediction_type`, "v" or "epsilon") say:
    {} when it says nothing."""
    keys = set(keys)
    spec = (metadata.get("modelspec.prediction_type") or "").strip().lower()
    settings: dict[str, Any] = {}
    if V_PRED_MARKER in keys or spec in ("v", "v_prediction", "v-prediction"):
        settings["prediction_type"] = "v_prediction"
    elif spec in ("epsilon", "eps"):
        settings["prediction_type"] = "epsilon"
    if ZTSNR_MARKER in keys:
        settings.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return settings


def _mark_scheduler(folder: Path, settings: dict[str, Any]) -> None:
    """Write the checkpoint's marked settings into a converted folder's scheduler config (which diffusers took from
    the architecture's configs), once: a folder converted by an older dreamlora is corrected the same way."""
    from dreamlora.checkpoint import write_atomic

    config_file = folder / "scheduler" / "scheduler_config.json"
    if not settings or not config_file.is_file():
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if all(config.get(key) == value for key, value in settings.items()):
        return
    log.warning("the checkpoint is marked %s: its scheduler config now says so", ", ".join(f"{k}={v}" for k, v in settings.items()))
    config.update(settings)
    write_atomic(config_file, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


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
    architecture, dtype, settings = checkpoint_architecture(path)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem)[:60]
    folder = converted_dir_root() / f"{stem}-{file_key(path)}"
    if (folder / "model_index.json").is_file():
        _mark_scheduler(folder, settings)
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
        _mark_scheduler(temporary, settings)
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
