"""`dreamlora doctor`: what this machine offers dreamlora, for a bug report or before a long run: the versions of the
libraries it rests on, each device with its memory and half-precision support, which attention and precision training
would pick, whether the model hub can be reached, and where the caches are and what they hold."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from dataclasses import dataclass, field
from typing import Any

import torch

PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "xformers", "bitsandbytes", "prodigyopt", "lion-pytorch", "schedulefree", "pillow-heif")


@dataclass
class Report:
    versions: dict[str, str | None]  # package -> version, None: not installed
    devices: list[dict[str, Any]]
    training: dict[str, str]  # what `train` would pick on the first device: device, precision, attention
    hub: str  # reachable (and whether a token is there to push with), offline (HF_HUB_OFFLINE) or unreachable
    caches: dict[str, dict[str, Any]]
    problems: list[str] = field(default_factory=list)  # what stands in the way, each with what to do

    def to_dict(self) -> dict[str, Any]:
        return {"versions": self.versions, "devices": self.devices, "training": self.training, "hub": self.hub, "caches": self.caches, "problems": self.problems}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _devices() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            free, total = torch.cuda.mem_get_info(index)
            found.append({
                "device": f"cuda:{index}", "name": properties.name, "memory_gib": round(total / 2**30, 1), "free_gib": round(free / 2**30, 1),
                "capability": f"{properties.major}.{properties.minor}", "bf16": bool(torch.cuda.is_bf16_supported()),
            })  # fmt: skip
    found.append({"device": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "cores": os.cpu_count()})
    return found


def diagnose() -> Report:
    """Look at the machine; loads no model and writes nothing."""
    from dreamlora.latent_cache import cache_usage, default_cache_dir
    from dreamlora.models import cache_root, hub_offline, hub_reachable, resolve_precision, xformers_works
    from dreamlora.single_file import converted_usage

    versions = {"dreamlora": _version("dreamlora"), "python": platform.python_version(), **{p: _version(p) for p in PACKAGES}}
    versions = {**dict(list(versions.items())[:3]), "torch CUDA": torch.version.cuda or "none (a CPU build)", **dict(list(versions.items())[3:])}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision, _ = resolve_precision("auto", device)
    xformers = xformers_works(device)
    training = {"device": str(device), "precision": precision, "attention": "xformers" if xformers else "sdpa"}
    problems = []
    if device.type == "cpu":
        hint = " (torch was built without CUDA: install the CUDA build of torch)" if torch.version.cuda is None else " (no GPU is visible: check the driver and CUDA_VISIBLE_DEVICES)"
        problems.append(f"no CUDA GPU: training runs on the CPU, minutes per step at 512 px{hint}; the built-in toy model trains in minutes")
    elif versions["xformers"] and not xformers:
        problems.append(f"xformers {versions['xformers']} is installed but its kernels do not run with this torch/CUDA build; PyTorch's SDPA is used instead (as fast on torch 2)")
    if hub_offline():
        hub = "offline (HF_HUB_OFFLINE)"
    else:
        hub = "reachable" if hub_reachable() else "unreachable"
    if hub != "reachable":
        problems.append("the Hugging Face hub is not reachable: models load from local folders, single files and the local hub cache only (--model PATH)")
    else:
        import huggingface_hub

        hub += ", logged in" if huggingface_hub.get_token() else ", not logged in (`export --push-to-hub` needs `hf auth login` or HF_TOKEN)"
    latents = cache_usage(default_cache_dir())
    converted, count, size = converted_usage()
    caches = {
        "root": {"folder": str(cache_root())},
        "latents": {"folder": str(default_cache_dir()), "entries": latents.entries, "bytes": latents.bytes},
        "converted_checkpoints": {"folder": str(converted), "models": count, "bytes": size},
    }
    return Report(versions, _devices(), training, hub, caches, problems)

