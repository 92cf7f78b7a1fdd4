"""`dreamlora merge`: several LoRAs into one file (kohya's merge_lora / svd_merge_lora).

Each module's update is the weighted sum of the sources' updates, sum_i w_i x alpha_i/rank_i x up_i @ down_i. By
default that sum is written exactly, as one LoRA whose rank is the sum of the ranks: the down weights stacked, the
up weights side by side with each source's weight and scale folded in, alpha = rank (scale 1). With `--rank` the
exact sum is then cut to that rank by truncated SVD (`resize`: the closest update of that rank), as kohya's
svd_merge_lora does. A module only some sources adapt takes the others' update as zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dreamlora.checkpoint import find_lora
from dreamlora.errors import ConfigError
from dreamlora.export import ExportResult, LoraModule, read_for_rewrite, read_lora_modules, write_lora_file
from dreamlora.pivotal import embeddings_for
from dreamlora.resize import check_method, describe_cut, kept_summary, rank_metadata, resize_module


@dataclass(frozen=True)
class Source:
    path: Path
    weight: float
    modules: list[LoraModule]


def stack_modules(sources: list[tuple[float, LoraModule]]) -> LoraModule:
    """One module whose update is exactly sum_i w_i x alpha_i/rank_i x up_i @ down_i (rank: the sum of the ranks)."""
    first = sources[0][1]
    for _, m in sources[1:]:
        if m.down.shape[1:] != first.down.shape[1:] or m.up.shape[0] != first.up.shape[0] or m.up.shape[2:] != first.up.shape[2:]:
            raise ConfigError(
                f"{first.group}.{first.module} has shape up {tuple(first.up.shape)} / down {tuple(first.down.shape)} in one LoRA and "
                f"{tuple(m.up.shape)} / {tuple(m.down.shape)} in another: they were trained on different base models and cannot be merged"
            )
    down = torch.cat([m.down.float() for _, m in sources], dim=0)
    up = torch.cat([m.up.float() * (w * m.alpha / m.rank) for w, m in sources], dim=1)
    return LoraModule(first.group, first.module, down, up, float(down.shape[0]))


def looks_sdxl(modules: list[LoraModule]) -> bool:
    """SDXL's modules: a second text encoder, transformer stacks deeper than one block, or cross-attention keys
    reading its 2048-wide context (whatever format the file came in)."""
    return any(
        m.group == "text_encoder_2" or ".transformer_blocks.1." in m.module or (m.module.endswith("attn2.to_k") and m.down.shape[1] == 2048)
        for m in modules
    )


def shared_metadata(metas: list[dict[str, str]]) -> dict[str, str]:
    """The kohya metadata every source agrees on (base model, resolution, ...); training details that differ are dropped."""
    first = metas[0]
    return {k: v for k, v in first.items() if all(m.get(k) == v for m in metas[1:])}


def carried_embedding(files: list[Path]) -> tuple[str, dict[str, torch.Tensor]] | None:
    """The one pivotal-tuned embedding among the sources, carried over as it is (its token means one subject)."""
    found = [(file, e) for file in files if (e := embeddings_for(file)) is not None]
    if len(found) > 1:
        listed = ", ".join(f"{file.name} ({e[0]})" for file, e in found)
        raise ConfigError(f"several of the LoRAs carry a pivotal-tuned embedding: {listed}; a merged LoRA carries one embedding, so merge at most one pivotal-tuned LoRA")
    return found[0][1] if found else None


def merge_loras(
    sources: list[tuple[Path, float]], dst: Path, rank: int | None = None, method: str = "fixed", param: float | None = None,
    to: str = "a1111", base_model: str | None = None, dtype: str = "fp16", verify: bool = True, load_options: dict[str, Any] | None = None,
) -> tuple[ExportResult, list[LoraModule]]:
    """Merge `sources` (path, weight) into `dst` as `to`; exact unless `rank` is given; checked against `base_model`
    (loaded with `load_options`). Returns the written modules too."""
    if len(sources) < 2:
        raise ConfigError("merge needs two or more LoRAs (PATH or PATH:WEIGHT each); to scale or convert a single one use `dreamlora resize` or `convert`")
    for path, weight in sources:
        if not math.isfinite(weight) or weight == 0:
            raise ConfigError(f"{path}: the weight must be a finite number other than 0; got {weight}")
    value = check_method(method, param, rank) if rank is not None else None
    if rank is None and (method != "fixed" or param is not None):
        raise ConfigError("--method and --param choose how --rank cuts the merged LoRA; add --rank N or drop them")
    dst = Path(dst)
    files = [find_lora(Path(path)) for path, _ in sources]
    if len(set(files)) < len(files):
        raise ConfigError("the same LoRA is given twice; give it once with the sum of its weights (PATH:WEIGHT)")
    modules, meta, notes, naming = read_for_rewrite(files[0], dst, to, dtype, base_model, "merge", load_options)
    loaded, metas = [Source(files[0], sources[0][1], modules)], [meta]
    for file, (_, weight) in zip(files[1:], sources[1:]):
        more, more_meta, more_notes, more_naming = read_lora_modules(file, base_model, load_options=load_options)
        if looks_sdxl(more) != looks_sdxl(modules):
            raise ConfigError(f"'{files[0]}' and '{file}' are for different model families (SD 1.x/2.x and SDXL); merge LoRAs of one base model")
        naming = naming or more_naming
        loaded.append(Source(file, weight, more))
        metas.append(more_meta)
        notes += [f"{file.name}: {note}" for note in more_notes]

    keys: dict[tuple[str, str], list[tuple[float, LoraModule]]] = {}
    for source in loaded:
        for m in source.modules:
            keys.setdefault((m.group, m.module), []).append((source.weight, m))
    merged = [stack_modules(members) for members in keys.values()]
    partial = sum(1 for members in keys.values() if len(members) < len(loaded))
    if partial:
        notes.append(f"{partial} of {len(merged)} modules are adapted by only some of the LoRAs (the others add nothing there)")
    how = " + ".join(f"{s.path.name} x {s.weight:g}" for s in loaded)
    if rank is not None:
        resized = [resize_module(m, method, value or 0.0, rank) for m in merged]
        merged = [r.module for r in resized]
        notes.append(f"cut to {describe_cut(method, value or 0.0, rank)}: {kept_summary([r.kept_fro for r in resized])}")
    metadata = {
        **rank_metadata(merged),
        "ss_training_comment": f"merged by dreamlora: {how}" + (f", cut to rank {rank}" if rank is not None else " (exact)"),
    }
    embedding = carried_embedding(files)
    result = write_lora_file(merged, shared_metadata(metas), notes, naming, dst, to, base_model, dtype, verify, metadata, embedding, load_options)
    return result, merged

