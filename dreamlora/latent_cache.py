"""On-disk cache of VAE latents: posterior mean and std of each image view, keyed by image content, VAE, size and crop.

An entry is one safetensors file, `<root>/<key[:2]>/<key>.safetensors`, where the key hashes the image file's bytes,
the VAE identity (its config and a hash of its weights in their dtype), the view size (width, height), the crop
and whether the view is flipped. Changing any of them gives another key, so stale entries are never read; they are
left behind until `dreamlora cache --prune-days N` / `--max-size GB` / `--clear` removes them (a hit refreshes an
entry's modification time, so pruning removes the least recently used first). Each entry is encoded alone (batch of
one) so its value does not depend on which other images happened to miss the cache in the same run.

The root is `data.latent_cache_dir` when set, else `$DREAMLORA_CACHE/latents` (default `~/.cache/dreamlora/latents`):
beside the model cache rather than in the working folder, because entries are keyed by content and so are safe to share
between projects that use the same photos.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the preprocessing changes what an entry would hold


def default_cache_dir() -> Path:
    from dreamlora.models import cache_root

    return cache_root() / "latents"


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes: the image content part of a cache key."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@torch.no_grad()
def vae_identity(vae: torch.nn.Module) -> str:
    """A hash of the VAE's config and weights (names, dtypes, shapes, values): the model part of a cache key."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class LatentDiskCache:
    """Posterior statistics of image views by key; counts hits and misses (encodes) for reports and tests."""

    def __init__(self, root: Path | str, vae_id: str) -> None:
        self.root, self.vae_id = Path(root), vae_id
        self.hits = self.misses = 0

    def key(self, content: str, size: tuple[int, int], crop: str, flipped: bool) -> str:
        parts = {"version": CACHE_VERSION, "image": content, "vae": self.vae_id, "size": list(size), "crop": crop, "flip": flipped}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(path)
            _touch(path)
            return tensors["mean"], tensors["std"]
        except Exception as error:  # noqa: BLE001 - a damaged entry is a miss, rewritten below
            log.warning("latent cache entry %s is unreadable (%s); encoding again", path, error)
            return None

    def save(self, key: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        from safetensors.torch import save

        from dreamlora.checkpoint import write_atomic

        data = save({"mean": mean.detach().float().cpu().contiguous(), "std": std.detach().float().cpu().contiguous()}, metadata={"format": "pt", "version": str(CACHE_VERSION)})
        write_atomic(self.path(key), data)

    def get_or_encode(
        self,
        keys: list[str],
        pixels: Callable[[int], torch.Tensor],
        encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked (N, C, h, w) means and stds for `keys`; a miss encodes `pixels(i)` (CHW in [-1, 1]) alone and stores it."""
        means, stds = [], []
        for i, key in enumerate(keys):
            entry = self.load(key)
            if entry is None:
                self.misses += 1
                mean, std = encode(pixels(i).unsqueeze(0))
                entry = (mean[0].float().cpu(), std[0].float().cpu())
                self.save(key, *entry)
            else:
                self.hits += 1
            means.append(entry[0])
            stds.append(entry[1])
        return torch.stack(means), torch.stack(stds)


def open_latent_cache(cache_latents: bool, cache_dir: str, vae: torch.nn.Module) -> LatentDiskCache | None:
    """The disk cache a run uses, or None when `data.cache_latents` is off."""
    if not cache_latents:
        return None
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return LatentDiskCache(root, vae_identity(vae))


def _touch(path: Path) -> None:
    """Mark an entry as used now (its modification time), for least-recently-used pruning."""
    try:
        os.utime(path)
    except OSError:
        pass  # a read-only cache is still a cache


@dataclass(frozen=True)
class CacheUsage:
    entries: int
    bytes: int
    removed: int = 0
    freed: int = 0


def _entries(root: Path) -> list[tuple[float, int, Path]]:
    """(last use, size, path) of every entry under `root`, least recently used first."""
    found = []
    for path in root.glob("??/*.safetensors"):
        try:
            stat = path.stat()
        except OSError:
            continue
        found.append((stat.st_mtime, stat.st_size, path))
    return sorted(found)


def cache_usage(root: Path) -> CacheUsage:
    """The cache's entries and bytes, touching nothing."""
    entries = _entries(Path(root)) if Path(root).is_dir() else []
    return CacheUsage(len(entries), sum(size for _, size, _ in entries), 0, 0)


def prune_cache(root: Path, max_bytes: int | None = None, older_than_days: float | None = None, clear: bool = False) -> CacheUsage:
    """Remove entries unused for `older_than_days`, then the least recently used until at most `max_bytes` remain
    (`clear`: all of them). Only cache entries (`??/<sha256>.safetensors`) are touched; returns what is left and freed."""
    root = Path(root)
    entries = _entries(root) if root.is_dir() else []
    total = sum(size for _, size, _ in entries)
    cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
    removed = freed = 0
    for mtime, size, path in entries:
        too_old = cutoff is not None and mtime < cutoff
        too_big = max_bytes is not None and total - freed > max_bytes
        if not (clear or too_old or too_big):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        removed += 1
        freed += size
    for folder in root.glob("??") if root.is_dir() else []:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return CacheUsage(len(entries) - removed, total - freed, removed, freed)
