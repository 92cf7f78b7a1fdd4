"""Export: write a run's LoRA as an A1111/kohya file, a diffusers folder or a merged model, convert LoRAs between layouts, and verify what was written.

Key mapping is pure (`kohya_module_name`, `kohya_state_dict`, `modules_from_kohya`, `ldm_unet_module_name`,
`sgm_unet_module_name`, `KohyaNaming`, `peft_state_dicts`, `ldm_checkpoint_state_dict`); writing files and loading models
happen in the functions below them.
Every format goes through one intermediate: a list of `LoraModule` (diffusers module name, down/up weights, alpha).
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import logging
import math
import re
import shutil
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from dreamlora.checkpoint import CONFIG_FILE, METRICS_FILE, find_lora, read_run_info, write_atomic, write_folder_atomic
from dreamlora.config import ExportConfig, RunConfig, from_dict
from dreamlora.errors import ConfigError, ExportError, ModelLoadError
from dreamlora.models import public_model_ref
from dreamlora.pivotal import bundle, embeddings_for, export_path, read_embeddings, save_embeddings, split_bundle, usage_note
from dreamlora.lora import GROUPS, LORA_FILE, last_layer_marker, load_adapters, lycoris_note, lycoris_types, read_diffusers_lora, read_keys, read_safetensors, save_diffusers_lora

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
KOHYA_UNET_PREFIX = "lora_unet_"
KOHYA_TE_PREFIX = "lora_te_"  # SD 1.x/2.x; SDXL's lora_te1_/lora_te2_ are ignored by A1111 on SD 1.x
TE_CANONICAL_ROOT = "text_model."  # A1111 and original checkpoints name CLIP modules under text_model
# Output differences allowed, relative to the LoRA's effect (files) or the output size (merged), per export dtype.
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 8e-2}
SD15_CONFIGS = Path(__file__).resolve().parent / "configs" / "sd15"
SDXL_CONFIGS = Path(__file__).resolve().parent / "configs" / "sdxl"


@dataclass
class LoraModule:
    """One adapted layer: `module` is its diffusers/transformers module name in `group` (unet or text_encoder)."""

    group: str
    module: str
    down: torch.Tensor  # [rank, in] or conv [rank, in, k, k]
    up: torch.Tensor  # [out, rank] or conv [out, rank, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def is_conv3x3(self) -> bool:
        """A convolution with a kernel wider than 1x1 (kohya's conv_dim/LoCon layers)."""
        return self.down.dim() == 4 and tuple(self.down.shape[2:]) != (1, 1)


@dataclass
class VerifyReport:
    """How the written file compared with the run's LoRA loaded exactly."""

    status: str  # passed, skipped
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # unet, text_encoder
    tolerance: dict[str, float] = field(default_factory=dict)
    lora_effect: dict[str, float] = field(default_factory=dict)  # max |adapted - base|: what a wrong alpha would show
    loader: str = ""
    warnings: list[str] = field(default_factory=list)


@dataclass
class ExportResult:
    """What `export_run` or `convert_lora` wrote."""

    path: Path
    format: str
    dtype: str
    key_counts: dict[str, int]  # LoRA modules per group (unet, text_encoder); merged: tensors per model part
    verify: VerifyReport | None
    notes: list[str] = field(default_factory=list)
    embedding: Path | None = None  # pivotal tuning's standalone embedding file, written beside the LoRA
    hub_card: dict[str, bytes] = field(default_factory=dict)  # an a1111 file pushed to the hub: its repo's model card (and grid), by name


# --- pure key mapping ----------------------------------------------------------------------------


def canonical_text_encoder_name(module: str) -> str:
    """`encoder.layers.0…` (transformers 5) -> `text_model.encoder.layers.0…` (A1111, transformers 4)."""
    return module if module.startswith(TE_CANONICAL_ROOT) else TE_CANONICAL_ROOT + module


def kohya_module_name(group: str, module: str, naming: KohyaNaming | None = None) -> str:
    """`down_blocks.1.attentions.0…to_q` -> `lora_unet_down_blocks_1_attentions_0…to_q`; text encoder under `lora_te_text_model_`.

    With `naming` (another family's, e.g. SDXL's), its prefixes and UNet names apply instead.
    """
    if naming is not None:
        return naming.name(group, module)
    if group == "unet":
        return KOHYA_UNET_PREFIX + module.replace(".", "_")
    if group == "text_encoder":
        return KOHYA_TE_PREFIX + canonical_text_encoder_name(module).replace(".", "_")
    raise ExportError(f"unknown LoRA group {group!r}; expected one of {', '.join(GROUPS)}")


def kohya_state_dict(modules: list[LoraModule], dtype: torch.dtype, naming: KohyaNaming | None = None) -> dict[str, torch.Tensor]:
    """kohya/A1111 tensors: `<name>.lora_down.weight`, `<name>.lora_up.weight` in `dtype`, `<name>.alpha` as an fp32 scalar."""
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        name = kohya_module_name(m.group, m.module, naming)
        out[f"{name}.lora_down.weight"] = m.down.to(dtype).contiguous()
        out[f"{name}.lora_up.weight"] = m.up.to(dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
    return out


def _pattern_value(module: str, pattern: dict[str, Any], default: Any) -> Any:
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def modules_from_peft(state_dicts: dict[str, dict[str, torch.Tensor]], metadata: dict[str, dict[str, Any]]) -> list[LoraModule]:
    """PEFT-keyed weights (`…to_q.lora_A.weight`) plus adapter configs -> modules with their real alpha."""
    modules = []
    for group, sd in state_dicts.items():
        meta = metadata.get(group)
        if meta is None:
            raise ExportError(f"the LoRA has no adapter metadata for {group}, so its alpha is unknown; re-save it with dreamlora or convert it with --to diffusers")
        for key in sorted(sd):
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[: -len(".lora_A.weight")]
            up_key = f"{module}.lora_B.weight"
            if up_key not in sd:
                raise ExportError(f"LoRA key {group}.{key} has no matching {up_key}; the file is incomplete")
            down, up = sd[key].float(), sd[up_key].float()
            default_alpha = meta.get("lora_alpha") or meta.get("r") or down.shape[0]
            alpha = float(_pattern_value(module, meta.get("alpha_pattern") or {}, default_alpha))
            modules.append(LoraModule(group, module, down, up, alpha))
    return modules


def _most_common(values: Iterable[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def peft_state_dicts(modules: list[LoraModule], dtype: torch.dtype = torch.float32) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
    """Modules -> PEFT state dicts and LoRA configs (`rank_pattern`/`alpha_pattern` for modules off the common rank/alpha)."""
    from peft import LoraConfig

    state_dicts: dict[str, dict[str, torch.Tensor]] = {}
    metadata: dict[str, dict[str, Any]] = {}
    for group in GROUPS:
        members = [m for m in modules if m.group == group]
        if not members:
            continue
        rank = _most_common(m.rank for m in members)
        alpha = _most_common(m.alpha for m in members)
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=sorted(m.module for m in members),
            rank_pattern={m.module: m.rank for m in members if m.rank != rank},
            alpha_pattern={m.module: m.alpha for m in members if m.alpha != alpha},
            init_lora_weights=False,
        ).to_dict()
        metadata[group] = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        sd = state_dicts.setdefault(group, {})
        for m in members:
            sd[f"{m.module}.lora_A.weight"] = m.down.to(dtype).contiguous()
            sd[f"{m.module}.lora_B.weight"] = m.up.to(dtype).contiguous()
    return state_dicts, metadata


_ATTENTION_MODULE = re.compile(r"(^|[._])to_(q|k|v|out)([._]|$)")


def alphas_diffusers_misreads(entries: Iterable[tuple[str, str, float]]) -> list[str]:
    """Of (group, module name, alpha) entries in a kohya file, the modules whose alpha diffusers' kohya loader replaces
    by its group's most common one: text-encoder and UNet attention modules (measured with diffusers 0.42: it names
    their alpha patterns in the old attention-processor form, or trims the text encoder's, and PEFT ignores them).
    UNet convolutions, projections and feed-forward layers keep their own alpha. Names: diffusers or kohya form."""
    groups: dict[str, dict[str, float]] = {}
    for group, name, alpha in entries:
        groups.setdefault(group, {})[name] = alpha
    misread = []
    for group, members in groups.items():
        if len(set(members.values())) < 2:
            continue
        common = _most_common(members.values())
        misread += sorted(n for n, a in members.items() if a != common and (group != "unet" or _ATTENTION_MODULE.search(n)))
    return misread


def fold_alphas(modules: list[LoraModule], per_module_rank: bool) -> tuple[list[LoraModule], list[str]]:
    """Fold each module's alpha into its up weights so every consumer computes the same delta.

    `per_module_rank`: alpha becomes each module's rank (scale 1; right even for loaders that ignore alpha).
    Otherwise alpha becomes one value for all modules (the most common rank), which diffusers' kohya loader also reads right.
    Returns the new modules and the names of those whose up weights changed.
    """
    common = _most_common(m.rank for m in modules) if modules else 1
    out, changed = [], []
    for m in modules:
        target = float(m.rank if per_module_rank else common)
        factor = m.alpha / target
        if factor != 1.0:
            changed.append(f"{m.group}.{m.module}")
        out.append(LoraModule(m.group, m.module, m.down, m.up * factor, target))
    return out, changed


def ldm_unet_module_name(name: str, layers_per_block: int, down_attention: list[bool], up_attention: list[bool]) -> str | None:
    """An LDM/sgm UNet module name in underscore form (`input_blocks_4_1_proj_in`) -> diffusers underscore form, or None."""
    resnet_parts = {"in_layers_0": "norm1", "in_layers_2": "conv1", "out_layers_0": "norm2", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj", "skip_connection": "conv_shortcut"}

    def resnet(rest: str) -> str:
        for old, new in resnet_parts.items():
            if rest == old or rest.startswith(old + "_"):
                return new + rest[len(old):]
        return rest

    fixed = {"input_blocks_0_0": "conv_in", "out_0": "conv_norm_out", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1", "time_embed_2": "time_embedding_linear_2"}
    if name in fixed:
        return fixed[name]
    n = layers_per_block
    if match := re.fullmatch(r"input_blocks_(\d+)_(\d+)_(.+)", name):
        index, inner, rest = int(match[1]), int(match[2]), match[3]
        block, layer = (index - 1) // (n + 1), (index - 1) % (n + 1)
        if layer == n:
            return f"down_blocks_{block}_downsamplers_0_{rest.replace('op', 'conv', 1)}" if inner == 0 else None
        if inner == 0:
            return f"down_blocks_{block}_resnets_{layer}_{resnet(rest)}"
        return f"down_blocks_{block}_attentions_{layer}_{rest}" if block < len(down_attention) and down_attention[block] else None
    if match := re.fullmatch(r"middle_block_(\d+)_(.+)", name):
        inner, rest = int(match[1]), match[2]
        return {0: f"mid_block_resnets_0_{resnet(rest)}", 1: f"mid_block_attentions_0_{rest}", 2: f"mid_block_resnets_1_{resnet(rest)}"}.get(inner)
    if match := re.fullmatch(r"output_blocks_(\d+)_(\d+)_(.+)", name):
        index, inner, rest = int(match[1]), int(match[2]), match[3]
        block, layer = index // (n + 1), index % (n + 1)
        has_attention = block < len(up_attention) and up_attention[block]
        if inner == 0:
            return f"up_blocks_{block}_resnets_{layer}_{resnet(rest)}"
        if inner == 1 and has_attention:
            return f"up_blocks_{block}_attentions_{layer}_{rest}"
        return f"up_blocks_{block}_upsamplers_0_{rest}"
    return None


def kohya_name_table(
    module_names: dict[str, Iterable[str]], naming: KohyaNaming | None = None, diffusers_unet_aliases: bool = False
) -> dict[str, tuple[str, str]]:
    """kohya name -> (group, module name) for every module of the base model, under both text-encoder prefixes in use.

    With `diffusers_unet_aliases`, UNet modules are also found under their diffusers paths
    (`lora_unet_down_blocks_1_...`), as some SDXL tools write them beside the SGM names.
    """
    table: dict[str, tuple[str, str]] = {}
    for group, names in module_names.items():
        for module in names:
            if not module:
                continue
            if group == "unet" and diffusers_unet_aliases:
                table.setdefault(KOHYA_UNET_PREFIX + module.replace(".", "_"), (group, module))
            try:
                table[kohya_module_name(group, module, naming)] = (group, module)
            except ExportError:
                continue  # containers without an SGM name (time_proj, down_blocks.1): no LoRA can target them
            if group == "text_encoder" and naming is None:
                canonical = canonical_text_encoder_name(module).replace(".", "_")
                for alias in ("lora_te1_" + canonical, "lora_te_" + module.replace(".", "_")):
                    table.setdefault(alias, (group, module))
    return table


@dataclass(frozen=True)
class UnetLayout:
    """What LDM-name mapping needs to know about a UNet."""

    layers_per_block: int
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> UnetLayout:
        return cls(
            int(config["layers_per_block"]),
            tuple("CrossAttn" in t for t in config["down_block_types"]),
            tuple("CrossAttn" in t for t in config["up_block_types"]),
        )


def modules_from_kohya(
    state_dict: dict[str, torch.Tensor], table: dict[str, tuple[str, str]], layout: UnetLayout, family_label: str = "an SD 1.x"
) -> tuple[list[LoraModule], list[str]]:
    """kohya/A1111/LyCORIS-LoCon tensors -> modules (missing alpha = rank, kohya's rule). Returns modules and notes."""
    notes: list[str] = []
    names = sorted({key.split(".", 1)[0] for key in state_dict})
    modules, unknown, ldm_names = [], [], 0
    for name in names:
        down, up = state_dict.get(f"{name}.lora_down.weight"), state_dict.get(f"{name}.lora_up.weight")
        if down is None or up is None:
            extra = sorted(k for k in state_dict if k.startswith(name + "."))
            raise ExportError(f"kohya module {name!r} lacks lora_down/lora_up weights (has {', '.join(extra)}); pass a complete LoRA file")
        if f"{name}.lora_mid.weight" in state_dict:
            raise ExportError(f"kohya module {name!r} has a lora_mid (LoCon with CP decomposition), which cannot be converted; re-train without --network_args use_tucker")
        if f"{name}.dora_scale" in state_dict:
            # Dropping the magnitudes would write a plain LoRA that verifies against itself but is not the DoRA.
            raise ExportError(
                f"kohya module {name!r} has a DoRA magnitude (dora_scale), which dreamlora does not convert (it would be lost, "
                "and the result would not be this LoRA); load the file as it is in AUTOMATIC1111 or ComfyUI"
            )
        target = table.get(name)
        if target is None and name.startswith(KOHYA_UNET_PREFIX):
            mapped = ldm_unet_module_name(name[len(KOHYA_UNET_PREFIX):], layout.layers_per_block, list(layout.down_attention), list(layout.up_attention))
            target = table.get(KOHYA_UNET_PREFIX + mapped) if mapped else None
            ldm_names += target is not None
        if target is None:
            unknown.append(name)
            continue
        alpha_tensor = state_dict.get(f"{name}.alpha")
        alpha = float(alpha_tensor.item()) if alpha_tensor is not None else float(down.shape[0])
        modules.append(LoraModule(target[0], target[1], down.float(), up.float(), alpha))
    if unknown:
        raise ExportError(
            f"{len(unknown)} LoRA modules match no module of the base model (first: {unknown[0]}); "
            f"pass the model the LoRA was trained on with --model, or check that it is {family_label} LoRA"
        )
    if ldm_names:
        notes.append(f"{ldm_names} LDM-style UNet names (input_blocks/middle_block/output_blocks) mapped to diffusers names; diffusers' loader would drop them with only a warning")
    if any(k.startswith("lora_te1_") for k in state_dict) and not any(k.startswith("lora_te2_") for k in state_dict):
        notes.append("SDXL-style lora_te1_ text-encoder names rewritten as lora_te_text_model_ (what A1111 reads for SD 1.x)")
    return modules, notes


def is_kohya_key(key: str) -> bool:
    return key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"))


# --- SDXL: diffusers -> SGM (original Stability) module names for kohya/A1111/ComfyUI --------------

# SDXL's size/pooled-text embedding, which the SGM model calls label_emb.
SGM_EXTRA_RENAMES = (("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."))


def sgm_unet_renames(unet_config: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """(diffusers prefix, SGM prefix) pairs for a UNet config: the LDM block layout plus SDXL's label embedding."""
    return tuple(_ldm_unet_renames(unet_config)) + SGM_EXTRA_RENAMES


def sgm_unet_module_name(module: str, renames: tuple[tuple[str, str], ...]) -> str:
    """`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` -> `input_blocks.4.1.transformer_blocks.0.attn1.to_q` (SDXL layout).

    Modules inside a transformer keep their names; resnet parts get their SGM names (`conv1` -> `in_layers.2`).
    """
    mapped = ldm_unet_key(module + ".", list(renames))
    if mapped == module + ".":
        raise ExportError(f"UNet module {module!r} has no SGM name; dreamlora maps down/mid/up blocks, conv_in/out, time and label embeddings")
    return mapped[:-1]


@dataclass(frozen=True)
class KohyaNaming:
    """How one model family names LoRA modules in kohya/A1111 files (built by `kohya_naming`)."""

    text_encoder_prefixes: tuple[tuple[str, str], ...]  # (group, prefix): SD 1.x (text_encoder, lora_te_); SDXL lora_te1_/lora_te2_
    unet_renames: tuple[tuple[str, str], ...] = ()  # diffusers -> SGM prefixes; empty: diffusers module paths (SD 1.x/2.x)

    def name(self, group: str, module: str) -> str:
        if group == "unet":
            return KOHYA_UNET_PREFIX + (sgm_unet_module_name(module, self.unet_renames) if self.unet_renames else module).replace(".", "_")
        prefix = dict(self.text_encoder_prefixes).get(group)
        if prefix is None:
            raise ExportError(f"unknown LoRA group {group!r} for this model family; expected unet or {', '.join(g for g, _ in self.text_encoder_prefixes)}")
        return prefix + canonical_text_encoder_name(module).replace(".", "_")


def kohya_naming(family_name: str, unet_config: dict[str, Any] | None = None) -> KohyaNaming | None:
    """The kohya naming of a family (None: SD 1.x/2.x, which `kohya_module_name` handles); SGM names need the UNet config."""
    from dreamlora.models import FAMILIES

    family = FAMILIES.get(family_name)
    if family is None or family.name in ("sd1", "sd2"):
        return None
    prefixes = tuple((group, prefix + "_") for group, prefix in zip(family.text_encoder_names, family.kohya_text_encoder_prefixes))
    if family.kohya_unet_names == "sgm":
        if unet_config is None:
            raise ExportError(f"{family.name} LoRA names need the UNet layout; pass the run folder (run.json) or the base model")
        return KohyaNaming(prefixes, sgm_unet_renames(unet_config))
    return KohyaNaming(prefixes)


# --- diffusers -> original (LDM) checkpoint layout, for --single-file ---------------------------


def _ldm_unet_renames(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) pairs for a UNet2DConditionModel config."""
    layout = UnetLayout.from_config(config)
    n, blocks = layout.layers_per_block, len(layout.down_attention)
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."), ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")]
    for i in range(blocks):
        for j in range(n):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(n + 1) * i + j + 1}.0."))
            if layout.down_attention[i]:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(n + 1) * i + j + 1}.1."))
        if i < blocks - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(n + 1) * (i + 1)}.0.op."))
        for j in range(n + 1):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(n + 1) * i + j}.0."))
            if layout.up_attention[i]:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(n + 1) * i + j}.1."))
        if i < blocks - 1:
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(n + 1) * i + n}.{2 if layout.up_attention[i] else 1}."))
    pairs += [("mid_block.attentions.0.", "middle_block.1."), ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.resnets.1.", "middle_block.2.")]
    return pairs


_RESNET_PARTS = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection.")]


def ldm_unet_key(key: str, renames: list[tuple[str, str]]) -> str:
    for old, new in renames:
        if key.startswith(old):
            rest = key[len(old):]
            if ".resnets." in old:
                rest = next((r_new + rest[len(r_old):] for r_old, r_new in _RESNET_PARTS if rest.startswith(r_old)), rest)
            return new + rest
    return key


def ldm_vae_key(key: str, num_blocks: int) -> str:
    """diffusers AutoencoderKL key -> LDM `first_stage_model` key (without the prefix)."""
    rules = [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"encoder.down.{m[1]}.block.{m[2]}."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", lambda m: f"{m[1]}.mid.attn_1."),
        (r"^(encoder|decoder)\.conv_norm_out\.", lambda m: f"{m[1]}.norm_out."),
    ]
    for pattern, repl in rules:
        key, count = re.subn(pattern, repl, key)
        if count:
            break
    key = key.replace(".conv_shortcut.", ".nin_shortcut.")
    if ".mid.attn_1." in key:
        for old, new in ((".group_norm.", ".norm."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."), (".to_out.0.", ".proj_out.")):
            key = key.replace(old, new)
    return key


def _ldm_vae_entries(vae: dict[str, torch.Tensor], vae_blocks: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in vae.items():
        new = ldm_vae_key(key, vae_blocks)
        if ".mid.attn_1." in new and new.endswith((".q.weight", ".k.weight", ".v.weight", ".proj_out.weight")) and value.dim() == 2:
            value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        out[f"first_stage_model.{new}"] = value
    return out


def ldm_checkpoint_state_dict(unet: dict[str, torch.Tensor], vae: dict[str, torch.Tensor], text_encoder: dict[str, torch.Tensor], unet_config: dict[str, Any], vae_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers UNet/VAE/CLIP state dicts -> one original Stable Diffusion checkpoint state dict."""
    renames = _ldm_unet_renames(unet_config)
    out = {f"model.diffusion_model.{ldm_unet_key(k, renames)}": v for k, v in unet.items()}
    out.update(_ldm_vae_entries(vae, vae_blocks))
    for key, value in text_encoder.items():
        out[f"cond_stage_model.transformer.{canonical_text_encoder_name(key)}"] = value
    return out


_OPEN_CLIP_NAMES = (
    ("text_model.encoder.layers.", "transformer.resblocks."), (".self_attn.out_proj.", ".attn.out_proj."),
    (".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."), (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj."),
)


def open_clip_state_dict(text_encoder: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection state dict -> OpenCLIP's text tower layout (SDXL's second encoder):
    q/k/v stacked into `in_proj_weight`, `text_projection` transposed, positional embedding without `.weight`."""
    out: dict[str, torch.Tensor] = {}
    state = {canonical_text_encoder_name(k) if not k.startswith("text_projection") else k: v for k, v in text_encoder.items()}
    singles = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for key, value in state.items():
        if key in singles:
            out[prefix + singles[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif re.search(r"\.self_attn\.[qkv]_proj\.", key):
            if ".q_proj." not in key:
                continue  # stacked with q below
            kind = key.rsplit(".", 1)[1]  # weight or bias
            stacked = torch.cat([state[key.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"])
            layer = key.split(".self_attn.")[0].replace("text_model.encoder.layers.", "transformer.resblocks.")
            out[f"{prefix}{layer}.attn.in_proj_{kind}"] = stacked
        elif key.startswith("text_model.encoder.layers."):
            new = key
            for old, replacement in _OPEN_CLIP_NAMES:
                new = new.replace(old, replacement)
            out[prefix + new] = value
        elif not key.endswith("position_ids"):
            raise ExportError(f"text encoder 2 weight {key!r} has no OpenCLIP name")
    return out


def sgm_checkpoint_state_dict(parts: dict[str, dict[str, torch.Tensor]], unet_config: dict[str, Any], vae_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers SDXL UNet/VAE/two-encoder state dicts -> one SGM (Stability's original SDXL) checkpoint state dict."""
    renames = list(sgm_unet_renames(unet_config))
    out = {f"model.diffusion_model.{ldm_unet_key(k, renames)}": v for k, v in parts["unet"].items()}
    out.update(_ldm_vae_entries(parts["vae"], vae_blocks))
    for key, value in parts["text_encoder"].items():
        out[f"conditioner.embedders.0.transformer.{canonical_text_encoder_name(key)}"] = value
    out.update(open_clip_state_dict(parts["text_encoder_2"], "conditioner.embedders.1.model."))
    return out


# --- metadata ------------------------------------------------------------------------------------


OPTIMIZER_NAMES = {
    "adamw": "torch.optim.AdamW", "adamw8bit": "bitsandbytes.optim.AdamW8bit", "prodigy": "prodigyopt.Prodigy",
    "adafactor": "transformers.optimization.Adafactor(scale_parameter=False,relative_step=False,warmup_init=False)",
    "lion": "lion_pytorch.lion_pytorch.Lion", "lion8bit": "bitsandbytes.optim.Lion8bit", "paged_adamw8bit": "bitsandbytes.optim.PagedAdamW8bit",
    "adamw_schedulefree": "schedulefree.adamw_schedulefree.AdamWScheduleFree",
}  # fmt: skip


def optimizer_label(train: Any) -> str:
    """The optimizer as kohya's ss_optimizer names it: its class, and in brackets the arguments the run set."""
    args = [f"weight_decay={train.weight_decay:g}"] if train.weight_decay >= 0 else []
    if train.adam_beta1 >= 0 or train.adam_beta2 >= 0:
        args.append("betas=({:g},{:g})".format(*train.optimizer_betas))
    if train.adam_epsilon:
        args.append(f"eps={train.adam_epsilon:g}")
    name = OPTIMIZER_NAMES[train.optimizer]
    if not args:
        return name
    return f"{name[:-1]},{','.join(args)})" if name.endswith(")") else f"{name}({','.join(args)})"


def _training_metadata(run: dict[str, Any], cfg: RunConfig | None) -> dict[str, str]:
    """kohya's `ss_*` record of how the LoRA was trained (Civitai and LoRA browsers show it), from the run's config
    and run.json; only folder names, never paths. Empty without a config (a run folder from elsewhere)."""
    if cfg is None:
        return {}
    train, data = cfg.train, cfg.data

    def off_as_none(value: Any) -> str:
        return str(value) if value else "None"  # kohya writes None for an option not used

    steps, max_steps = int(run.get("steps") or 0), int(run.get("max_steps") or train.max_steps)
    per_epoch = int(run.get("steps_per_epoch") or 0)
    instance_images = int(run.get("instance_images") or 0)
    scale = train.lr_scale(int(run.get("processes") or 1))  # --scale-lr: the rates it trained at
    meta = {
        "ss_learning_rate": str(train.lr * scale),
        "ss_unet_lr": str(train.lr * scale),
        "ss_text_encoder_lr": str(float(train.resolved_text_encoder_lr) * scale) if cfg.adapter.train_text_encoder else "None",
        "ss_lr_scheduler": train.lr_scheduler,
        "ss_lr_warmup_steps": str(train.warmup_steps),
        "ss_optimizer": optimizer_label(train),
        "ss_batch_size_per_device": str(train.batch_size),
        "ss_gradient_accumulation_steps": str(train.gradient_accumulation),
        "ss_total_batch_size": str(train.batch_size * train.gradient_accumulation * int(run.get("processes") or 1)),
        "ss_gradient_checkpointing": str(train.gradient_checkpointing),
        "ss_mixed_precision": {"fp32": "no"}.get(str(run.get("precision", "")), str(run.get("precision", "")) or "None"),
        "ss_prior_loss_weight": str(float(train.prior_weight)) if run.get("with_prior") else "None",
        "ss_noise_offset": off_as_none(train.noise_offset),
        "ss_min_snr_gamma": off_as_none(train.snr_gamma),
        "ss_loss_type": train.loss,
        "ss_network_dropout": off_as_none(cfg.adapter.network_dropout),
        "ss_scale_weight_norms": off_as_none(train.scale_weight_norms),
        "ss_ip_noise_gamma": off_as_none(train.ip_noise_gamma),
        "ss_adaptive_noise_scale": off_as_none(train.adaptive_noise_scale),
        "ss_noise_offset_random_strength": str(train.noise_offset_random_strength),
        "ss_ip_noise_gamma_random_strength": str(train.ip_noise_gamma_random_strength),
        "ss_multires_noise_iterations": off_as_none(train.multires_noise_iterations),
        "ss_multires_noise_discount": str(train.multires_noise_discount),
        "ss_debiased_estimation": str(train.debiased_estimation),
        "ss_zero_terminal_snr": str(bool(train.zero_terminal_snr or run.get("zero_terminal_snr"))),  # flag, or a zero-terminal-SNR model
        **({"ss_huber_schedule": train.huber_schedule, "ss_huber_c": str(train.huber_c)} if train.pseudo_huber else {}),
        "ss_flip_aug": str(data.flip),
        "ss_random_crop": str(not data.center_crop),
        "ss_color_aug": str(bool(data.color_jitter)),
        "ss_enable_bucket": str(data.buckets),
        "ss_caption_dropout_rate": str(float(data.caption_dropout)),
        "ss_shuffle_caption": str(data.shuffle_caption),
        "ss_keep_tokens": str(data.keep_tokens),
        "ss_caption_tag_dropout_rate": str(float(data.caption_tag_dropout)),
        "ss_weighted_captions": str(data.weighted_captions),
        "ss_max_token_length": "None" if data.max_token_length == 75 else str(data.max_token_length),  # kohya's default: None
        "ss_masked_loss": str(data.masked_loss),
        "ss_alpha_mask": str(data.masked_loss and not data.mask_dir),  # kohya's masks from the alpha channel (not from a mask folder)
        "ss_cache_latents": str(data.cache_latents and data.latents_cacheable),
    }
    if cfg.model.vae:  # kohya records the replacement VAE by its file name
        meta["ss_vae_name"] = public_model_ref(cfg.model.vae)
    if instance_images:
        meta["ss_num_train_images"] = str(instance_images * data.repeats)
        meta["ss_num_reg_images"] = str(int(run.get("class_images") or 0))
        meta["ss_dataset_dirs"] = json.dumps({Path(data.instance_dir or "instance").name: {"n_repeats": data.repeats, "img_count": instance_images}})
        if run.get("with_prior") and data.class_dir:
            meta["ss_reg_dataset_dirs"] = json.dumps({Path(data.class_dir).name: {"n_repeats": 1, "img_count": int(run.get("class_images") or 0)}})
    if per_epoch:
        meta["ss_num_batches_per_epoch"] = str(int(run.get("batches_per_epoch") or per_epoch))
        meta["ss_num_epochs"] = str(math.ceil(max_steps / per_epoch)) if max_steps else "None"
        meta["ss_epoch"] = str(math.ceil(steps / per_epoch))
    return meta


def a1111_metadata(run: dict[str, Any], modules: list[LoraModule], output_name: str, cfg: RunConfig | None = None) -> dict[str, str]:
    """kohya `ss_*` and `modelspec.*` metadata (all strings) for a run's A1111 file; no paths, user or host names.
    `cfg` (the run's config) adds the training record (`_training_metadata`)."""
    linear = [m for m in modules if not m.is_conv3x3] or modules  # kohya's network_dim/alpha; 3x3 convolutions are conv_dim/alpha
    rank = _most_common(m.rank for m in linear)
    alpha = _most_common(m.alpha for m in linear)
    network_args: dict[str, Any] = {"train_text_encoder": bool(run.get("train_text_encoder", any(m.group.startswith("text_encoder") for m in modules)))}
    convs = [m for m in modules if m.is_conv3x3]
    if convs:  # kohya writes them as strings
        network_args.update(conv_dim=str(_most_common(m.rank for m in convs)), conv_alpha=f"{_most_common(m.alpha for m in convs):g}")
    if cfg is not None:  # kohya's network args, as strings
        network_args.update({name: f"{value:g}" for name in ("rank_dropout", "module_dropout") if (value := getattr(cfg.adapter, name))})
        loraplus = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
        network_args.update({name: f"{value:g}" for name in loraplus if (value := getattr(cfg.train, name))})
        if cfg.adapter.block_weights_set:  # kohya writes the block weights as given
            blocks = {"down_lr_weight": cfg.adapter.down_lr_weight, "mid_lr_weight": f"{cfg.adapter.mid_lr_weight:g}", "up_lr_weight": cfg.adapter.up_lr_weight}
            network_args.update({name: value for name, value in blocks.items() if value})
            if cfg.adapter.block_lr_zero_threshold:
                network_args["block_lr_zero_threshold"] = f"{cfg.adapter.block_lr_zero_threshold:g}"
    resolution = int(run.get("resolution") or 512)
    v_prediction = run.get("prediction_type") == "v_prediction"
    token, class_name = run.get("token", ""), run.get("class_name", "")
    model = public_model_ref(str(run.get("model", "")))
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": str(run.get("base_model_version", "sd_v1")),
        "ss_v2": str(run.get("base_model_version") == "sd_v2"),
        "ss_sd_model_name": model,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_steps": str(run.get("steps", "")),
        "ss_max_train_steps": str(run.get("max_steps") or run.get("steps", "")),
        "ss_seed": str(run.get("seed", "")),
        "ss_clip_skip": str(run["clip_skip"]) if int(run.get("clip_skip", 1)) != 1 else "None",  # kohya writes None for the default
        "ss_output_name": output_name,
        "ss_training_comment": f"dreamlora DreamBooth LoRA; token: {token}; class: {class_name}; instance prompt: {run.get('instance_prompt', '')}",
        "ss_tag_frequency": json.dumps(run.get("tag_frequency") or {"instance": {run.get("instance_prompt") or f"{token} {class_name}".strip(): 1}}),
        "ss_network_args": json.dumps(network_args),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": _modelspec_architecture(str(run.get("family", "sd1")), v_prediction),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": output_name,
        "modelspec.trigger_phrase": token,
        **({"modelspec.prediction_type": "v" if v_prediction else "epsilon", "ss_v_parameterization": str(v_prediction)} if run.get("prediction_type") else {}),
        "dreamlora_version": str(run.get("dreamlora_version", "")),
        **_training_metadata(run, cfg),
    }
    if run.get("started_at"):  # kohya's unix times; the model spec's date is when training finished
        meta["ss_training_started_at"] = str(run["started_at"])
        if run.get("finished_at"):
            meta["ss_training_finished_at"] = str(run["finished_at"])
            meta["modelspec.date"] = datetime.datetime.fromtimestamp(float(run["finished_at"]), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return meta


def _modelspec_architecture(family_name: str, v_prediction: bool = False) -> str:
    """The model spec's architecture name; SD 2.x v-prediction models are the 768-v architecture."""
    from dreamlora.models import FAMILIES, SD1, SD2

    if family_name == SD2.name and v_prediction:
        return SD2.modelspec_architecture.replace("-512", "-768-v")
    return FAMILIES.get(family_name, SD1).modelspec_architecture


# --- writing -------------------------------------------------------------------------------------


def _data_region(blob: bytes) -> bytes:
    header_size = struct.unpack("<Q", blob[:8])[0]
    return blob[8 + header_size:]


def safetensors_bytes_with_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, str]:
    """Serialize with `sshs_model_hash` = sha256 of the tensor data after the header (what A1111 shows).

    The data region does not depend on the header, so the hash of a first serialization holds for the final one.
    """
    from safetensors.torch import save

    first = save(tensors, metadata=metadata)
    digest = hashlib.sha256(_data_region(first)).hexdigest()
    final = save(tensors, metadata={**metadata, "sshs_model_hash": digest})
    if _data_region(final) != _data_region(first):  # a safetensors change would make the hash a lie
        raise ExportError("safetensors wrote a different tensor layout when the header changed; cannot stamp sshs_model_hash")
    return final, digest


def _refuse_existing(path: Path) -> None:
    if path.exists():
        raise ExportError(f"'{path}' already exists and is never overwritten; pass another --out, or delete it first")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _count_modules(modules: list[LoraModule]) -> dict[str, int]:
    return {group: sum(m.group == group for m in modules) for group in GROUPS if any(m.group == group for m in modules)}


def write_a1111(
    path: Path, modules: list[LoraModule], metadata: dict[str, str], dtype: str, naming: KohyaNaming | None = None, extra: dict[str, torch.Tensor] | None = None
) -> Path:
    """`extra`: tensors written as they are beside the modules (pivotal tuning's bundled embeddings)."""
    blob, _ = safetensors_bytes_with_hash({**kohya_state_dict(modules, DTYPES[dtype], naming), **(extra or {})}, metadata)
    write_atomic(path, blob)
    return path


Embedding = tuple[str, dict[str, torch.Tensor]]  # pivotal tuning's token and its vectors per text encoder


def _refuse_existing_embedding(out: Path, embedding: Embedding | None) -> None:
    """Before anything is written: the export's standalone embedding file must not exist either."""
    if embedding is not None:
        _refuse_existing(export_path(out))


def _write_embedding(out: Path, fmt: str, embedding: Embedding | None, notes: list[str]) -> Path | None:
    """The standalone embedding file beside the export at `out` (None without an embedding), read back to check it,
    and how to load it in the notes; when it fails the export is removed too."""
    if embedding is None:
        return None
    token, tensors = embedding
    try:
        path = save_embeddings(export_path(out), token, tensors)
        _, back = read_embeddings(path)
        if set(back) != set(tensors) or any(not torch.equal(back[k], tensors[k].float()) for k in tensors):
            raise ExportError(f"the embedding written to '{path}' does not read back as written")
    except ExportError:
        _remove(out)
        raise
    notes.append(usage_note(token, tensors, path, bundled=fmt == "a1111"))
    return path


def _card(run_dir: Path, run: dict[str, Any], settings: RunConfig | None, cfg: ExportConfig, embedding: Path | None, weight_name: str | None = None) -> tuple[str, Path | None]:
    """The export's model card text (model_card.py) and the run's base-vs-LoRA grid it shows (None without one)."""
    from dreamlora.model_card import last_readings, model_card

    grid = run_dir / "samples" / "final.png"
    found = grid if grid.is_file() else None
    text = model_card(run, settings, cfg, cfg.format == "merged", found is not None, last_readings(run_dir / METRICS_FILE), embedding.name if embedding else None, weight_name)
    return text, found


def _write_card(out: Path, run_dir: Path, run: dict[str, Any], settings: RunConfig | None, cfg: ExportConfig, embedding: Path | None, notes: list[str]) -> None:
    """README.md and the run's grid as samples.png, into the export folder."""
    from dreamlora.model_card import CARD_FILE, PICTURE_FILE

    text, grid = _card(run_dir, run, settings, cfg, embedding)
    if grid is not None:
        shutil.copyfile(grid, out / PICTURE_FILE)
    write_atomic(out / CARD_FILE, text.encode("utf-8"))
    notes.append(f"model card {CARD_FILE}{' and ' + PICTURE_FILE if grid is not None else ''} in the folder (the Hugging Face Hub shows them)")


def _hub_card(out: Path, run_dir: Path, run: dict[str, Any], settings: RunConfig | None, cfg: ExportConfig, embedding: Path | None) -> dict[str, bytes]:
    """The model card (and the run's grid) of a hub repo holding an exported file, which has no folder to keep them
    in: its code loads the file from the repo by name (`weight_name`)."""
    from dreamlora.model_card import CARD_FILE, PICTURE_FILE

    text, grid = _card(run_dir, run, settings, cfg, embedding, weight_name=out.name)
    return {CARD_FILE: text.encode("utf-8"), **({PICTURE_FILE: grid.read_bytes()} if grid is not None else {})}


def write_diffusers(folder: Path, modules: list[LoraModule], dtype: str) -> Path:
    state_dicts, metadata = peft_state_dicts(modules)
    write_folder_atomic(folder, lambda tmp: save_diffusers_lora(tmp, state_dicts, metadata, DTYPES[dtype]), replace=False)
    return folder


# --- loading base models and LoRA files for verification ----------------------------------------


def base_load_options(settings: RunConfig | None, merged: bool) -> dict[str, Any]:
    """How the run loaded its base model, as `load_components` keywords: pickle weights it was allowed, a single-file
    checkpoint's configs, its hub revision and weights variant and, for a merged model (which holds a VAE), the replacement VAE it
    trained and sampled with."""
    if settings is None:
        return {}
    model = settings.model
    return {
        "allow_pickle": model.allow_pickle, "single_file_config": model.single_file_config, "variant": model.variant, "revision": model.revision,
        **({"vae": model.vae} if merged and model.vae else {}),
    }


def _load_base(model_ref: str, base_weights: tuple[str, ...] = (), load_options: dict[str, Any] | None = None) -> tuple[Any, str | None]:
    from dreamlora.generate import fuse_base_weights
    from dreamlora.models import load_components

    try:
        components = load_components(model_ref, **(load_options or {}))
        fuse_base_weights(components, base_weights)
        return components, None
    except (ModelLoadError, ConfigError, OSError) as error:
        return None, f"verification skipped: base model {public_model_ref(model_ref)!r} could not be loaded here ({type(error).__name__}); the file was written but not checked"


def _lora_layers(model: torch.nn.Module) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _probe_outputs(components: Any, models: dict[str, torch.nn.Module], prompt: str) -> dict[str, torch.Tensor]:
    """A fixed-seed last hidden state of each text encoder and UNet noise prediction, in fp32."""
    from dreamlora.models import tokenize

    unet = models["unet"]
    config = unet.config
    size = min(int(config.sample_size), 32)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, config.in_channels, size, size, generator=generator)
    context = torch.randn(1, components.tokenizer.model_max_length, config.cross_attention_dim, generator=generator)
    added = None
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text embedding and six size numbers
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, pooled, generator=generator), "time_ids": torch.tensor([[48.0, 40.0, 4.0, 8.0, 32.0, 32.0]])}
    out = {}
    with torch.no_grad():
        for group, tokenizer_name in zip(components.family.text_encoder_names, components.family.tokenizer_names):
            ids = tokenize(getattr(components, tokenizer_name), [prompt])
            out[group] = models[group].float()(ids).last_hidden_state.float()
        out["unet"] = unet.float()(latents, torch.tensor([500]), encoder_hidden_states=context, added_cond_kwargs=added).sample.float()
    return out


def _fresh_models(base: Any) -> dict[str, torch.nn.Module]:
    return {"unet": copy.deepcopy(base.unet), **{name: copy.deepcopy(encoder) for name, encoder in base.text_encoders.items()}}


def _reference_outputs(base: Any, modules: list[LoraModule], scale: float, prompt: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Base outputs and outputs with `modules` loaded exactly through PEFT (at `scale`)."""
    models = _fresh_models(base)
    base_out = _probe_outputs(base, models, prompt)
    state_dicts, metadata = peft_state_dicts(modules)
    load_adapters(models, state_dicts, metadata)
    if scale != 1.0:
        from peft.tuners.lora import LoraLayer

        for model in models.values():
            for module in model.modules():
                if isinstance(module, LoraLayer):
                    module.scale_layer(scale)
    return base_out, _probe_outputs(base, models, prompt)


def _compare(reference: dict[str, torch.Tensor], base_out: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor], dtype: str, merged: bool, report: VerifyReport) -> None:
    for group in reference:
        diff = float((candidate[group] - reference[group]).abs().max())
        effect = float((reference[group] - base_out[group]).abs().max())
        size = float(reference[group].abs().max())
        # A LoRA file only rounds the LoRA, so its error scales with the LoRA's effect; a merged model rounds every weight.
        tolerance = TOLERANCE[dtype] * (size if merged else effect) + 1e-5 * size
        report.max_abs_diff[group], report.lora_effect[group], report.tolerance[group] = diff, effect, tolerance
    bad = [g for g in reference if not report.max_abs_diff[g] <= report.tolerance[g]]
    if bad:
        details = "; ".join(f"{g}: max |diff| {report.max_abs_diff[g]:.3g} > tolerance {report.tolerance[g]:.3g} (LoRA effect {report.lora_effect[g]:.3g})" for g in bad)
        raise ExportError(f"verification failed ({report.loader}): the written file does not reproduce the LoRA: {details}; please report this with `dreamlora inspect` output")


def _check_consumed(models: dict[str, torch.nn.Module], modules: list[LoraModule], loader: str) -> None:
    for group, model in models.items():
        expected = {m.module for m in modules if m.group == group}
        loaded = _lora_layers(model)
        missing, extra = sorted(expected - loaded), sorted(loaded - expected)
        if missing or extra:
            first = (missing or extra)[0]
            raise ExportError(
                f"verification failed: {loader} left {len(missing)} {group} LoRA modules of the file unloaded and added {len(extra)} others (first: {first}); "
                "the file would silently lose part of the LoRA"
            )


def check_kohya_keys(state_dict: dict[str, torch.Tensor], base: Any) -> None:
    """Every kohya module maps to a real module of `base`, has down/up/alpha, and fits that module's shape."""
    models = {"unet": base.unet, **base.text_encoders}
    table = kohya_name_table({g: [n for n, _ in m.named_modules()] for g, m in models.items()}, base_kohya_naming(base))
    for name in sorted({k.split(".", 1)[0] for k in state_dict}):
        if name not in table:
            raise ExportError(f"A1111 module {name!r} matches no module of the base model; the key mapping is wrong")
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            if name + suffix not in state_dict:
                raise ExportError(f"A1111 module {name!r} has no {suffix} key; consumers would mis-scale or skip it")
        group, module_name = table[name]
        problem = fit_problem(models[group], module_name, state_dict[name + ".lora_down.weight"], state_dict[name + ".lora_up.weight"])
        if problem:
            raise ExportError(f"A1111 module {name!r} ({module_name}): {problem}")


def fit_problem(model: torch.nn.Module, module_name: str, down: torch.Tensor, up: torch.Tensor) -> str | None:
    """Why a LoRA's down/up weights cannot adapt `module_name` of `model` (missing, or other shapes), or None when they fit."""
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return "the base model has no such module"
    layer = getattr(module, "base_layer", module)
    in_features = getattr(layer, "in_features", getattr(layer, "in_channels", None))
    out_features = getattr(layer, "out_features", getattr(layer, "out_channels", None))
    kernel = tuple(getattr(layer, "kernel_size", ()))
    fits = down.shape[1] == in_features and up.shape[0] == out_features and up.shape[1] == down.shape[0]
    if fits and down.dim() == 4:  # a 3x3 LoCon down must match the convolution's kernel; 1x1 ones fit any
        fits = tuple(down.shape[2:]) in ((1, 1), kernel)
    if fits:
        return None
    return f"LoRA down {tuple(down.shape)} / up {tuple(up.shape)} do not fit the base's {in_features} -> {out_features}{f', kernel {kernel}' if kernel else ''} layer"


def fit_problems(models: dict[str, torch.nn.Module], modules: list[LoraModule]) -> list[str]:
    """Each module of the LoRA that `models` (unet, text encoders) lack or have in other shapes, as "group module: why"."""
    problems = []
    for m in modules:
        model = models.get(m.group)
        problem = f"the base model has no {m.group}" if model is None else fit_problem(model, m.module, m.down, m.up)
        if problem:
            problems.append(f"{m.group} {m.module}: {problem}")
    return problems


def check_fits(base: Any, modules: list[LoraModule], model_ref: str) -> None:
    """Every module of the LoRA exists in the loaded base model with the shapes it was trained on; otherwise the base
    is another architecture than the run's (a moved hub branch, a replaced local folder) and loading would fail deep in
    PyTorch with a size mismatch."""
    problems = fit_problems({"unet": base.unet, **base.text_encoders}, modules)
    if problems:
        raise ExportError(
            f"the LoRA does not fit base model {public_model_ref(model_ref)!r}, so that is not the model it was trained on: {len(problems)} of {len(modules)} "
            f"modules differ (first: {problems[0]}); give the run its own base model back (the local folder it trained with, or the hub revision it used)"
        )


def base_kohya_naming(base: Any) -> KohyaNaming | None:
    """The kohya naming of a loaded base model's family."""
    return kohya_naming(base.family.name, dict(base.unet.config))


def _load_with_diffusers(base: Any, path: Path) -> dict[str, torch.nn.Module]:
    from dreamlora.models import build_pipeline

    models = _fresh_models(base)
    parts = copy.copy(base)
    for name, model in models.items():
        setattr(parts, name, model)
    from dreamlora.pivotal import lora_without_bundle

    unbundled = lora_without_bundle(path)
    build_pipeline(parts).load_lora_weights(str(path) if unbundled is None else unbundled)
    return models


def verify_export(
    path: Path, fmt: str, modules: list[LoraModule], model_ref: str, dtype: str, scale: float = 1.0, prompt: str = "a photo", base_weights: tuple[str, ...] = (),
    load_options: dict[str, Any] | None = None,
) -> VerifyReport:
    """Load the written export back through diffusers' own loaders into a fresh base model and compare it with `modules` loaded exactly.

    Raises ExportError on a mismatch beyond the dtype's tolerance or on LoRA modules the loader did not consume;
    returns a skipped report when the base model is not available here. `base_weights` (a merged model's: the run's
    fused LoRAs) go into the base first; `load_options` are `base_load_options`.
    """
    base, skipped = _load_base(model_ref, base_weights, load_options)
    if base is None:
        return VerifyReport("skipped", warnings=[skipped or ""])
    if fmt == "merged" and path.is_file() and base.source_dir is None:
        return VerifyReport("skipped", warnings=["verification skipped: from_single_file needs a local diffusers folder of the base model for its config; pass --model PATH to a local copy to check it"])
    check_fits(base, modules, model_ref)
    report = VerifyReport("passed")
    base_out, reference = _reference_outputs(base, modules, scale, prompt)
    if fmt in ("a1111", "diffusers"):
        lora_path = path if fmt == "a1111" else path / LORA_FILE
        if fmt == "a1111":
            from safetensors.torch import load_file

            check_kohya_keys(split_bundle(load_file(str(path)))[0], base)
        report.loader = "diffusers load_lora_weights"
        try:
            models = _load_with_diffusers(base, lora_path)
        except ValueError as error:
            if "infer state dict type" not in str(error):
                raise ExportError(f"diffusers could not load '{path}': {error}") from error
            # diffusers' kohya loader only recognises text-encoder LoRAs that include out_proj (it looks for `to_out_lora`).
            report.warnings.append("diffusers' kohya loader cannot read text-encoder LoRAs without out_proj (A1111, ComfyUI and kohya can); checked through dreamlora's own reader instead")
            report.loader = "dreamlora kohya reader"
            models = _load_kohya_file_exactly(base, path)
        _check_consumed(models, modules, report.loader)
    else:
        report.loader = f"{base.family.pipeline_class}.from_single_file" if path.is_file() else f"{base.family.pipeline_class}.from_pretrained"
        models = _load_merged(path, base)
        _check_vae(models.pop("vae"), base.vae, dtype, report)
    candidate = _probe_outputs(base, models, prompt)
    _compare(reference, base_out, candidate, dtype, fmt == "merged", report)
    return report


def _check_vae(loaded: torch.nn.Module, base: torch.nn.Module, dtype: str, report: VerifyReport) -> None:
    """The LoRA does not touch the VAE, so a merged model's VAE must equal the base's up to rounding (catches key-mapping slips)."""
    expected, got = base.state_dict(), loaded.state_dict()
    if set(expected) != set(got):
        missing = sorted(set(expected) ^ set(got))
        raise ExportError(f"verification failed: the merged model's VAE has different tensors than the base (first: {missing[0]})")
    diff = max(float((got[k].float() - v.float()).abs().max()) for k, v in expected.items())
    size = max(float(v.float().abs().max()) for v in expected.values())
    report.max_abs_diff["vae_weights"], report.tolerance["vae_weights"] = diff, TOLERANCE[dtype] * size
    if diff > TOLERANCE[dtype] * size:
        raise ExportError(f"verification failed: the merged model's VAE weights differ from the base by {diff:.3g}; the checkpoint key mapping is wrong")


def _load_kohya_file_exactly(base: Any, path: Path) -> dict[str, torch.nn.Module]:
    from safetensors.torch import load_file

    models = _fresh_models(base)
    table = kohya_name_table({g: [n for n, _ in m.named_modules()] for g, m in models.items()}, base_kohya_naming(base))
    modules, _ = modules_from_kohya(split_bundle(load_file(str(path)))[0], table, UnetLayout.from_config(dict(base.unet.config)))
    state_dicts, metadata = peft_state_dicts(modules)
    load_adapters(models, state_dicts, metadata)
    return models


def _load_merged(path: Path, base: Any) -> dict[str, torch.nn.Module]:
    import diffusers

    pipeline_class = getattr(diffusers, base.family.pipeline_class)
    # SD 1.x/2.x pipelines would otherwise look for a safety checker the merged model does not have.
    extra = {"safety_checker": None, "requires_safety_checker": False} if pipeline_class is diffusers.StableDiffusionPipeline else {}
    if path.is_file():
        pipe = pipeline_class.from_single_file(str(path), config=str(base.source_dir), local_files_only=True, **extra)
    else:
        pipe = pipeline_class.from_pretrained(str(path), local_files_only=True, **extra)
    return {"unet": pipe.unet.float(), **{name: getattr(pipe, name).float() for name in base.family.text_encoder_names}, "vae": pipe.vae}


# --- merged models ------------------------------------------------------------------------------


def _merged_components(
    model_ref: str, lora_file: Path, modules: list[LoraModule], scale: float, prediction_type: str = "auto", base_weights: tuple[str, ...] = (),
    load_options: dict[str, Any] | None = None,
) -> Any:
    """The base model (with the run's `base_weights` fused first, loaded with `load_options`: its VAE) with the LoRA
    (`lora_file`, read as `modules`, which must fit the base) fused in at `scale` and the adapters removed; its scheduler predicts `prediction_type` (the run's: a model trained
    as v-prediction is saved as one)."""
    from dreamlora.generate import fuse_base_weights
    from dreamlora.models import apply_prediction_type, build_pipeline, load_components

    components = load_components(model_ref, **(load_options or {}))
    check_fits(components, modules, model_ref)
    fuse_base_weights(components, base_weights)
    apply_prediction_type(components, prediction_type)
    pipe = build_pipeline(components)
    pipe.load_lora_weights(str(lora_file), adapter_name="dreamlora")
    pipe.fuse_lora(lora_scale=scale, adapter_names=["dreamlora"])
    pipe.unload_lora_weights()
    return components


def write_merged(
    out: Path, model_ref: str, lora_file: Path, modules: list[LoraModule], scale: float, dtype: str, single_file: bool, prediction_type: str = "auto",
    base_weights: tuple[str, ...] = (), load_options: dict[str, Any] | None = None,
) -> dict[str, int]:
    """A full pipeline folder (or one original-layout checkpoint file, marked `v_pred`/`ztsnr` as ComfyUI reads them
    when its scheduler says so) with the LoRA fused; returns tensor counts per part."""
    from dreamlora.models import build_pipeline
    from dreamlora.single_file import scheduler_markers

    components = _merged_components(model_ref, lora_file, modules, scale, prediction_type, base_weights, load_options)
    torch_dtype = DTYPES[dtype]
    for part in (components.unet, components.vae, *components.text_encoders.values()):
        part.to(torch_dtype)
    parts = {"unet": components.unet.state_dict(), "vae": components.vae.state_dict(), **{name: encoder.state_dict() for name, encoder in components.text_encoders.items()}}
    counts = {name: len(sd) for name, sd in parts.items()}
    if single_file:
        from safetensors.torch import save

        vae_blocks = len(components.vae.config.block_out_channels)
        if components.family.name == "sdxl":
            state_dict = sgm_checkpoint_state_dict(parts, dict(components.unet.config), vae_blocks)
        else:
            state_dict = ldm_checkpoint_state_dict(parts["unet"], parts["vae"], parts["text_encoder"], dict(components.unet.config), vae_blocks)
        v_prediction = components.prediction_type == "v_prediction"
        architecture = _modelspec_architecture(components.family.name, v_prediction).removesuffix("/lora")
        metadata = {"format": "pt", "modelspec.architecture": architecture, "modelspec.prediction_type": "v" if v_prediction else "epsilon"}
        state_dict.update(scheduler_markers(components.noise_scheduler.config))
        write_atomic(out, save({k: v.contiguous() for k, v in state_dict.items()}, metadata=metadata))
    else:
        write_folder_atomic(out, lambda tmp: build_pipeline(components).save_pretrained(tmp, safe_serialization=True), replace=False)
    return counts


# --- the two entry points -----------------------------------------------------------------------


def default_output(run_name: str, fmt: str, exports_root: Path, step: int | None, single_file: bool = False) -> Path:
    stem = f"{run_name}-step{step}" if step is not None else run_name
    if fmt == "a1111" or single_file:
        return exports_root / f"{stem}-{fmt}.safetensors"
    return exports_root / f"{stem}-{fmt}"


def run_settings(run_dir: Path) -> dict[str, Any]:
    """The run's config.toml as a dict of sections ({} for a run folder without one)."""
    import tomllib

    config = Path(run_dir) / CONFIG_FILE
    return tomllib.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}


def run_config(run_dir: Path) -> RunConfig | None:
    """The run's config as written by this version's `train`; None without one or when it does not load (a run folder
    from another version), so the export goes on without the training record."""
    settings = run_settings(run_dir)
    try:
        return from_dict(settings) if settings else None
    except ConfigError as error:
        log.warning("the run's %s does not load (%s); the export carries no training record", CONFIG_FILE, error)
        return None


def base_model_ref(run_dir: Path, run: dict[str, Any]) -> str:
    """The base model to verify against: the run's config.toml keeps the full reference (run.json only its public name)."""
    return str(run_settings(run_dir).get("model", {}).get("name") or run["model"])


def run_kohya_naming(run_dir: Path, run: dict[str, Any]) -> KohyaNaming | None:
    """A run's kohya naming: its family, and for SGM names the UNet layout from run.json (or the base model's config)."""
    family = str(run.get("family", "sd1"))
    if family in ("sd1", "sd2"):
        return None
    layout = run.get("unet_layout")
    if not layout:
        from diffusers import UNet2DConditionModel

        from dreamlora.models import resolve_model_dir

        ref = base_model_ref(run_dir, run)
        try:
            layout = dict(UNet2DConditionModel.load_config(resolve_model_dir(ref), subfolder="unet", local_files_only=True))
        except (OSError, ValueError, ModelLoadError) as error:
            raise ExportError(f"run '{run_dir}' has no unet_layout in run.json and the base model {public_model_ref(ref)!r} cannot be read here ({error}); pass a run trained with this dreamlora") from error
    return kohya_naming(family, layout)


def export_run(run_dir: Path, cfg: ExportConfig, step: int | None = None, exports_root: Path = Path("exports")) -> ExportResult:
    """Write a run's LoRA (final, or checkpoint `step`) in `cfg.format`, then verify it unless `cfg.verify` is off."""
    run_dir = Path(run_dir)
    run = read_run_info(run_dir)
    if step is not None:
        run = {**run, "steps": step}  # a checkpoint's LoRA: its own step in the metadata, not the run's last
    lora_file = find_lora(run_dir, step)
    if not lora_file.is_file():
        raise ExportError(f"run '{run_dir}' has no LoRA weights at '{lora_file}'; train it first or pass --step with an existing checkpoint")
    state_dicts, metadata = read_diffusers_lora(lora_file)
    modules = modules_from_peft(state_dicts, metadata)
    if not modules:
        raise ExportError(f"'{lora_file}' holds no LoRA weights; train the run first")
    name = str(run.get("name") or run_dir.name)
    out = Path(cfg.out) if cfg.out else default_output(name, cfg.format, Path(exports_root), step, cfg.single_file)
    if cfg.format == "a1111" and out.suffix != ".safetensors":
        raise ExportError(f"A1111 output '{out}' must end in .safetensors; pass --out NAME.safetensors")
    _refuse_existing(out)
    settings = run_config(run_dir)
    fused = settings.model.base_weights if settings is not None else ()  # a merged model has them fused too
    embedding = embeddings_for(lora_file)
    _refuse_existing_embedding(out, embedding)
    notes: list[str] = []
    if cfg.format == "merged" and fused:
        from dreamlora.generate import BASE_WEIGHTS_RECORD, changed_base_weights

        if changed := changed_base_weights(run.get(BASE_WEIGHTS_RECORD) or {}, fused):
            notes.append(f"base weights {', '.join(changed)} changed since the run trained on them: the merged model holds them as they are now, not as trained")
            log.warning("%s", notes[-1])
    if cfg.format == "a1111":
        metadata = {**a1111_metadata(run, modules, out.stem, settings), **cfg.publishing_metadata}
        written = modules
        if alphas_diffusers_misreads((m.group, m.module, m.alpha) for m in modules):
            # Attention modules off their group's most common alpha (few attention targets beside many convolutions):
            # A1111 and ComfyUI would read them right, diffusers would not, so the alphas go into the weights.
            written, changed = fold_alphas(modules, per_module_rank=False)
            notes.append(f"alphas folded into the up weights of {len(changed)} modules (every module now has alpha {written[0].alpha:g}), so diffusers reads the file as A1111 does")
        write_a1111(out, written, metadata, cfg.dtype, run_kohya_naming(run_dir, run), bundle(*embedding) if embedding else None)
        counts = _count_modules(modules)
    elif cfg.format == "diffusers":
        write_diffusers(out, modules, cfg.dtype)
        counts = _count_modules(modules)
    else:
        options = base_load_options(settings, merged=True)
        counts = write_merged(out, base_model_ref(run_dir, run), lora_file, modules, cfg.scale, cfg.dtype, cfg.single_file, str(run.get("prediction_type") or "auto"), fused, options)
        if options.get("vae"):
            notes.append(f"the merged model holds the VAE the run trained and sampled with ({public_model_ref(options['vae'])}), not the base model's own")
    emb_out = _write_embedding(out, cfg.format, embedding, notes)
    if out.is_dir():  # diffusers and merged folders: a model card, as the Hub reads one
        _write_card(out, run_dir, run, settings, cfg, emb_out, notes)
    report = None
    if cfg.verify:
        prompt = str(run.get("instance_prompt") or "a photo")
        try:
            merged = cfg.format == "merged"
            report = verify_export(
                out, cfg.format, modules, base_model_ref(run_dir, run), cfg.dtype, cfg.scale if merged else 1.0, prompt, fused if merged else (), base_load_options(settings, merged),
            )
        except Exception as error:  # an unverified file is never left looking like a finished export
            _remove(out)
            if emb_out is not None:
                _remove(emb_out)
            if not isinstance(error, ExportError):
                raise
            raise ExportError(f"{error}. '{out}' was removed; export with --no-verify to keep an unverified file") from error
    hub_card = _hub_card(out, run_dir, run, settings, cfg, emb_out) if cfg.hub_repo and not out.is_dir() else {}
    return ExportResult(out, cfg.format, cfg.dtype, counts, report, notes, emb_out, hub_card)


def lora_file(src: Path) -> Path:
    """The safetensors LoRA file `src` names (a file, or a folder holding pytorch_lora_weights.safetensors), its header
    read: a missing, pickled, damaged or LyCORIS (LoHa, LoKr, ...) file is an ExportError naming it."""
    path = src / LORA_FILE if src.is_dir() else src
    if not path.is_file():
        raise ExportError(f"no LoRA file at '{src}'; pass a .safetensors LoRA or a folder holding {LORA_FILE}")
    if path.suffix != ".safetensors":
        raise ExportError(f"'{path}' is not a .safetensors file; dreamlora reads only safetensors LoRAs (pickle files can run code)")
    if lycoris := lycoris_types(read_keys(path)):  # the header alone
        raise ExportError(f"'{path}' is {lycoris_note(lycoris)}; dreamlora cannot read it without changing what it does")
    return path


def _read_any_lora(src: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, metadata = read_safetensors(lora_file(src))
    return split_bundle(tensors)[0], metadata  # pivotal tuning's bundled embeddings are read by `pivotal.embeddings_for`


@dataclass(frozen=True)
class Architecture:
    """Module names of a base model's UNet and text encoders (built on the meta device from configs only)."""

    names: dict[str, list[str]]
    layout: UnetLayout
    label: str
    family: str
    naming: KohyaNaming | None

    @classmethod
    def of(cls, names: dict[str, list[str]], unet_config: dict[str, Any], label: str, family: str) -> Architecture:
        """The layout and kohya naming follow from the UNet config and the family."""
        return cls(names, UnetLayout.from_config(unet_config), label, family, kohya_naming(family, unet_config))


def _base_configs(base_model: str | None, sdxl_file: bool = False, load_options: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any], str, Any]:
    """UNet config, text-encoder configs by name, label and family of the base model; without `base_model`,
    SD 1.5's shipped configs, or SDXL 1.0's for an SDXL file. `load_options` (`base_load_options`): how the base is
    read (pickle weights of a single-file checkpoint, its configs, a hub revision)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    from dreamlora.models import detect_family, file_options, resolve_model_dir

    encoder_names = ("text_encoder", "text_encoder_2")
    if base_model is None:
        folder = SDXL_CONFIGS if sdxl_file else SD15_CONFIGS
        unet_config = json.loads((folder / "unet.json").read_text(encoding="utf-8"))
        te_configs = {
            name: CLIPTextConfig(**json.loads((folder / f"{name}.json").read_text(encoding="utf-8")))
            for name in encoder_names if (folder / f"{name}.json").is_file()
        }
        label = "Stable Diffusion XL 1.0 architecture" if sdxl_file else "Stable Diffusion 1.5 architecture"
    else:
        options = load_options or {}
        source = resolve_model_dir(base_model, bool(options.get("allow_pickle")), str(options.get("single_file_config") or ""))
        files = file_options(True, str(options.get("revision") or ""))
        try:
            unet_config = dict(UNet2DConditionModel.load_config(source, subfolder="unet", **files))
            te_configs = {
                name: CLIPTextConfig.from_pretrained(source, subfolder=name, **files)
                for name in encoder_names if name == "text_encoder" or (Path(source) / name).is_dir()
            }
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"could not read the configs of base model {base_model!r}: {error}; pass a local diffusers folder, or leave --model out for SD 1.5") from error
        label = public_model_ref(base_model)
    return unet_config, te_configs, label, detect_family(te_configs["text_encoder"], unet_config)


def _architecture_module_names(base_model: str | None, sdxl_file: bool = False, load_options: dict[str, Any] | None = None) -> Architecture:
    """The base model's module names, built on the meta device from its configs (see `_base_configs`)."""
    import transformers
    from diffusers import UNet2DConditionModel

    unet_config, te_configs, label, family = _base_configs(base_model, sdxl_file, load_options)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        # Each encoder as its own class: CLIPTextModelWithProjection (SDXL's second) keeps the `text_model.` level.
        classes = dict(zip(family.text_encoder_names, family.text_encoder_classes))
        encoders = {name: getattr(transformers, classes[name])(config) for name, config in te_configs.items() if name in classes}
    names = {"unet": [n for n, _ in unet.named_modules()], **{g: [n for n, _ in m.named_modules()] for g, m in encoders.items()}}
    return Architecture.of(names, unet_config, label, family.name)


def live_architecture(components: Any, label: str) -> Architecture:
    """The module names of loaded components (before adapters are attached), as `_architecture_module_names` gives them.
    Layers that clip skip dropped from the text encoder are named too: LoRA files trained without it adapt them."""
    names = {group: [n for n, _ in model.named_modules()] for group, model in (("unet", components.unet), *components.text_encoders.items())}
    skipped = getattr(components, "clip_skip", 1) - 1
    if skipped:
        kept = int(components.text_encoder.config.num_hidden_layers)
        marker = last_layer_marker(components.text_encoder)
        last = [n for n in names["text_encoder"] if marker in n]
        names["text_encoder"] += [n.replace(marker, f"layers.{kept + i}.") for i in range(skipped) for n in last]
    return Architecture.of(names, dict(components.unet.config), label, components.family.name)


def _looks_sdxl(tensors: dict[str, torch.Tensor]) -> bool:
    """A kohya file made for SDXL: a second text encoder, the label embedding, deep transformer
    stacks (SD 1.x/2.x have one block per attention), or cross-attention keys reading SDXL's 2048-wide context."""
    for key, value in tensors.items():
        if key.startswith("lora_te2_") or "label_emb" in key or re.search(r"transformer_blocks_[1-9]", key):
            return True
        if key.endswith(("attn2_to_k.lora_down.weight", "attn2_to_v.lora_down.weight")) and value.shape[-1] == 2048:
            return True
    return False


def read_lora_modules(
    src: Path, base_model: str | None, arch: Architecture | None = None, load_options: dict[str, Any] | None = None
) -> tuple[list[LoraModule], dict[str, str], list[str], KohyaNaming | None]:
    """Any supported LoRA file (kohya/A1111, LoCon, LDM-named, diffusers/PEFT) -> modules, its metadata, notes,
    and the kohya naming of its model family (None: SD 1.x/2.x). `arch`: the base model's module names when they are
    at hand (`live_architecture`), instead of building them from `base_model`'s configs (read with `load_options`)."""
    src = Path(src) if Path(src).exists() else find_lora(Path(src))  # a hub LoRA (OWNER/NAME), from the cache; else: it does not exist
    tensors, file_meta = _read_any_lora(src)
    notes: list[str] = []
    if tensors and all(is_kohya_key(k) for k in tensors):
        if "lora_adapter_metadata" in file_meta:
            notes.append("dropped diffusers adapter metadata stored beside kohya alphas (diffusers' loader raises on that mix)")
        sdxl_file = _looks_sdxl(tensors)
        arch = arch or _architecture_module_names(base_model, sdxl_file, load_options)
        if sdxl_file and arch.naming is None:
            raise ExportError(f"'{src}' is an SDXL LoRA (its module names and shapes say so), but the base model {arch.label} is not SDXL; pass an SDXL base with --model, or leave --model out")
        table = kohya_name_table(arch.names, arch.naming, diffusers_unet_aliases=arch.naming is not None)
        family_label = "an SDXL" if arch.family == "sdxl" else "an SD 1.x"
        modules, kohya_notes = modules_from_kohya(tensors, table, arch.layout, family_label)
        notes += kohya_notes + [f"module names checked against the {arch.label}"]
        return modules, file_meta, notes, arch.naming
    path = Path(src) / LORA_FILE if Path(src).is_dir() else Path(src)
    state_dicts, metadata = read_diffusers_lora(path)
    if not metadata:
        ranks = {g: int(next(v for k, v in sd.items() if k.endswith("lora_A.weight")).shape[0]) for g, sd in state_dicts.items()}
        metadata = {g: {"r": r, "lora_alpha": r} for g, r in ranks.items()}
        notes.append("the diffusers file has no adapter metadata; alpha taken as rank (what diffusers assumes)")
    naming = None
    if arch is not None:
        naming = arch.naming
    elif base_model is not None or "text_encoder_2" in state_dicts:
        unet_config, _, _, family = _base_configs(base_model, "text_encoder_2" in state_dicts, load_options)
        naming = kohya_naming(family.name, unet_config)
    return modules_from_peft(state_dicts, metadata), file_meta, notes, naming


def _alphas_uniform(modules: list[LoraModule]) -> bool:
    return len({m.alpha for m in modules}) <= 1


def convert_lora(
    src: Path, dst: Path, to: str, base_model: str | None = None, dtype: str = "fp16", verify: bool = True, load_options: dict[str, Any] | None = None
) -> ExportResult:
    """Convert a LoRA trained elsewhere to `to` (a1111: one .safetensors; diffusers: a folder).

    Per-module alphas that diffusers would mis-load are folded into the up weights (noted in the result).
    Verification needs `base_model` (loaded through `load_components` with `load_options`); without it the result
    says it was skipped.
    """
    modules, file_meta, notes, naming = read_for_rewrite(Path(src), Path(dst), to, dtype, base_model, "convert", load_options)
    return write_lora_file(
        modules, file_meta, notes, naming, Path(dst), to, base_model, dtype, verify, embedding=embeddings_for(find_lora(Path(src))), load_options=load_options,
    )


def read_for_rewrite(
    src: Path, dst: Path, to: str, dtype: str, base_model: str | None, command: str, load_options: dict[str, Any] | None = None
) -> tuple[list[LoraModule], dict[str, str], list[str], KohyaNaming | None]:
    """`command`'s output settings checked (nothing is ever overwritten), then `src` read (`read_lora_modules`)."""
    if to not in ("a1111", "diffusers"):
        raise ExportError(f"{command} --to must be a1111 or diffusers; got {to!r}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    _refuse_existing(dst)
    if to == "a1111" and dst.suffix != ".safetensors":
        raise ExportError(f"A1111 output '{dst}' must end in .safetensors; pass OUT as NAME.safetensors")
    modules, file_meta, notes, naming = read_lora_modules(src, base_model, load_options=load_options)
    if not modules:
        raise ExportError(f"'{src}' holds no LoRA weights")
    return modules, file_meta, notes, naming


def write_lora_file(
    modules: list[LoraModule], file_meta: dict[str, str], notes: list[str], naming: KohyaNaming | None, dst: Path, to: str,
    base_model: str | None, dtype: str, verify: bool, metadata: dict[str, str] | None = None, embedding: Embedding | None = None,
    load_options: dict[str, Any] | None = None,
) -> ExportResult:
    """Write `modules` as `to` (`convert_lora`, `resize.resize_lora`), folding alphas where a consumer would misread
    them, keeping the source's kohya metadata (updated by `metadata`), then load it back and compare (with `base_model`).
    `embedding`: the source's pivotal-tuned embedding, carried over (bundled in a1111, and as its own file beside);
    `load_options`: how the base model is loaded (`base_load_options`)."""
    original = modules
    _refuse_existing_embedding(dst, embedding)
    if to == "a1111":
        if alphas_diffusers_misreads((m.group, m.module, m.alpha) for m in modules):
            modules, changed = fold_alphas(modules, per_module_rank=False)
            notes.append(f"per-module alphas differ where diffusers would apply the most common one (text encoder, UNet attention): folded into the up weights of {len(changed)} modules; every module now has alpha {modules[0].alpha:g}")
        kept = {k: v for k, v in file_meta.items() if k.startswith(("ss_", "modelspec.")) and k != "sshs_model_hash"}
        write_a1111(dst, modules, {**kept, **(metadata or {}), "ss_output_name": dst.stem}, dtype, naming, bundle(*embedding) if embedding else None)
    else:
        if not _alphas_uniform(modules) or len({m.rank for m in modules}) > 1:
            modules, changed = fold_alphas(modules, per_module_rank=True)
            notes.append(f"alphas/ranks differ between modules: alpha/rank folded into the up weights of {len(changed)} modules, so alpha = rank everywhere (right for every consumer)")
        write_diffusers(dst, modules, dtype)
    emb_out = _write_embedding(dst, to, embedding, notes)
    report = None
    if verify:
        if base_model is None:
            report = VerifyReport("skipped", warnings=["verification skipped: pass --model BASE to load the file back into the base model and compare"])
        else:
            try:
                report = verify_export(dst, to, original, base_model, dtype, load_options=load_options)
            except Exception as error:  # an unverified file is never left looking like a finished one
                _remove(dst)
                if emb_out is not None:
                    _remove(emb_out)
                if not isinstance(error, ExportError):
                    raise
                raise ExportError(f"{error}. '{dst}' was removed") from error
    return ExportResult(dst, to, dtype, _count_modules(modules), report, notes, emb_out)
