"""`dreamlora resize`: lower a LoRA's rank by truncated SVD of each module's update (kohya's resize_lora).

Each module's update W = alpha/rank x up @ down (convolutions flattened) is factored exactly through small QR and
SVD steps (never forming W's full SVD), then cut to the new rank: the best approximation of that rank in the Frobenius
norm (Eckart-Young). The rank is fixed, or chosen per module from the singular values (`sv_ratio`, `sv_fro`,
`sv_cumulative`, as kohya's dynamic methods) up to `--rank`. The new factors carry alpha = new rank (scale 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dreamlora.checkpoint import find_lora
from dreamlora.errors import ConfigError
from dreamlora.export import ExportResult, LoraModule, read_for_rewrite, write_lora_file
from dreamlora.pivotal import embeddings_for

METHODS = ("fixed", "sv_ratio", "sv_fro", "sv_cumulative")


def check_method(method: str, param: float | None, rank: int) -> float:
    """The method's parameter, checked (fixed takes none)."""
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}; got {method!r}")
    if rank < 1:
        raise ConfigError(f"--rank must be 1 or more; got {rank}")
    if method == "fixed":
        if param is not None:
            raise ConfigError("--param goes with --method sv_ratio, sv_fro or sv_cumulative; --method fixed keeps --rank")
        return 0.0
    if param is None:
        raise ConfigError(f"--method {method} needs --param (e.g. {'10' if method == 'sv_ratio' else '0.95'})")
    if method == "sv_ratio" and not (math.isfinite(param) and param >= 1):
        raise ConfigError(f"--param for sv_ratio keeps singular values within that factor of the largest; pass 1 or more (e.g. 10); got {param}")
    if method != "sv_ratio" and not 0 < param <= 1:
        raise ConfigError(f"--param for {method} is the share to keep, in (0, 1] (e.g. 0.95); got {param}")
    return float(param)


def svd_factors(module: LoraModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) with U @ diag(S) @ Vh = alpha/rank x up @ down (flattened), in float64, S descending."""
    down = module.down.double().flatten(1)  # (r, in*k*k)
    up = module.up.double().flatten(1)  # (out, r)
    q_up, r_up = torch.linalg.qr(up)  # (out, r), (r, r)
    q_down, r_down = torch.linalg.qr(down.T)  # (in*k*k, r), (r, r)
    core = (module.alpha / module.rank) * (r_up @ r_down.T)
    p, s, vh = torch.linalg.svd(core, full_matrices=False)
    return q_up @ p, s, vh @ q_down.T


def choose_rank(singular: torch.Tensor, method: str, param: float, rank: int) -> int:
    """How many singular values to keep: `rank` (fixed), or per module by `method` with `rank` as the most."""
    s = singular.double()
    available = int(s.numel())
    if method == "fixed" or float(s[0]) <= 0:
        keep = rank
    elif method == "sv_ratio":
        keep = int((s >= s[0] / param).sum())
    else:
        values = s.square() if method == "sv_fro" else s
        share = values.cumsum(0) / values.sum()
        target = param**2 if method == "sv_fro" else param  # sv_fro: the share of the Frobenius norm itself
        keep = int((share < target - 1e-12).sum()) + 1
    return max(1, min(keep, rank, available))


def describe_cut(method: str, param: float, rank: int) -> str:
    """How a rank cut was chosen, for notes and `ss_training_comment`."""
    return f"fixed rank {rank}" if method == "fixed" else f"{method} {param:g} (rank at most {rank})"


def kept_summary(kept: list[float]) -> str:
    """The share of the update norm the cut modules kept: the worst and the mean."""
    return f"update norm kept {min(kept):.1%} (worst module) to {sum(kept) / len(kept):.1%} (mean)"


def rank_span(ranks: list[int] | set[int]) -> str:
    """`4`, or `2-8` where modules differ."""
    ordered = sorted(set(ranks))
    return str(ordered[0]) if len(ordered) == 1 else f"{ordered[0]}-{ordered[-1]}"


def rank_metadata(modules: list[LoraModule]) -> dict[str, str]:
    """kohya's `ss_network_dim`/`ss_network_alpha` for modules with alpha = rank: the rank, or `Dynamic` where they differ."""
    ranks = {m.rank for m in modules}
    value = "Dynamic" if len(ranks) > 1 else str(next(iter(ranks)))
    return {"ss_network_dim": value, "ss_network_alpha": value}


@dataclass(frozen=True)
class Resized:
    module: LoraModule
    old_rank: int
    kept_fro: float  # share of the update's Frobenius norm kept (1.0: exact)


def resize_module(module: LoraModule, method: str, param: float, rank: int) -> Resized:
    """The module at its new rank: down = sqrt(S) Vh, up = U sqrt(S) (shapes as the original's), alpha = new rank."""
    u, s, vh = svd_factors(module)
    keep = choose_rank(s, method, param, rank)
    root = s[:keep].sqrt()
    down = (root[:, None] * vh[:keep]).reshape(keep, *module.down.shape[1:])
    up = (u[:, :keep] * root[None, :]).reshape(module.up.shape[0], keep, *module.up.shape[2:])
    total = float(s.square().sum())
    kept = math.sqrt(float(s[:keep].square().sum()) / total) if total > 0 else 1.0
    return Resized(LoraModule(module.group, module.module, down.float(), up.float(), float(keep)), module.rank, kept)


def resize_lora(
    src: Path, dst: Path, rank: int, method: str = "fixed", param: float | None = None, to: str = "a1111",
    base_model: str | None = None, dtype: str = "fp16", verify: bool = True, load_options: dict[str, Any] | None = None,
) -> tuple[ExportResult, list[Resized]]:
    """Resize any LoRA `convert` reads (or a run's) and write it as `to`, verified against `base_model` (loaded with
    `load_options`) when given."""
    value = check_method(method, param, rank)
    dst = Path(dst)
    source = find_lora(Path(src))
    modules, file_meta, notes, naming = read_for_rewrite(source, dst, to, dtype, base_model, "resize", load_options)
    resized = [resize_module(m, method, value, rank) for m in modules]
    old = max(r.old_rank for r in resized)
    if method == "fixed" and rank > old:
        notes.append(f"--rank {rank} is above the LoRA's rank {old}: ranks kept, nothing cut")
    metadata = {
        **rank_metadata([r.module for r in resized]),
        "ss_training_comment": f"resized by dreamlora from rank {old}: {describe_cut(method, value, rank)}; " + file_meta.get("ss_training_comment", ""),
    }
    embedding = embeddings_for(source)  # pivotal tuning's embedding is carried over as it is
    result = write_lora_file([r.module for r in resized], file_meta, notes, naming, dst, to, base_model, dtype, verify, metadata, embedding, load_options)
    return result, resized
