"""LoRA adapters through PEFT: attach, list trainable parameters, read, save and load their weights."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from dreamlora.config import BLOCKS, CONV3X3_TARGETS, AdapterConfig
from dreamlora.errors import ConfigError, ExportError

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"
LORA_FILE = "pytorch_lora_weights.safetensors"
GROUPS = ("unet", "text_encoder", "text_encoder_2")  # the models a LoRA file can adapt, in file-prefix order (text_encoder_2: SDXL)


def lora_config(adapter_cfg: AdapterConfig, targets: tuple[str, ...], exclude: list[str] | None = None, conv_layers: tuple[str, ...] = ()) -> Any:
    """PEFT's LoraConfig; `conv_layers` (target names) take the conv rank and alpha through PEFT's rank/alpha patterns."""
    from peft import LoraConfig

    init: bool | str = {"default": True, "gaussian": "gaussian", "nonzero": False}[adapter_cfg.init]
    patterns: dict[str, Any] = {}
    if conv_layers and adapter_cfg.conv_rank != adapter_cfg.rank:
        patterns["rank_pattern"] = {name: adapter_cfg.conv_rank for name in conv_layers}
    if conv_layers and adapter_cfg.resolved_conv_alpha != adapter_cfg.resolved_alpha:
        patterns["alpha_pattern"] = {name: adapter_cfg.resolved_conv_alpha for name in conv_layers}
    return LoraConfig(
        r=adapter_cfg.rank,
        lora_alpha=adapter_cfg.resolved_alpha,
        lora_dropout=adapter_cfg.dropout,
        target_modules=list(targets),
        init_lora_weights=init,
        **({"exclude_modules": exclude} if exclude else {}),
        **patterns,
    )


def unet_lora_config(adapter_cfg: AdapterConfig, unet: torch.nn.Module | None = None) -> Any:
    """The UNet's LoraConfig: its targets, and with `conv_rank` the ResNet/resampling layers (3x3 convolutions at the conv rank).
    With block weights (`adapter.down_lr_weight` ...), the target modules of blocks whose factor is 0 get no LoRA."""
    exclude = None
    if unet is not None and adapter_cfg.block_weights_set:
        targets = tuple("." + t for t in adapter_cfg.all_unet_targets)
        adapted = [name for name, _ in unet.named_modules() if name.endswith(targets)]
        exclude = [name for name in adapted if adapter_cfg.block_lr_weight(unet_block_index(name)) == 0]
        if exclude and len(exclude) == len(adapted):
            raise ConfigError("the block weights are 0 for every UNet block with a LoRA target, so nothing would train; raise some of --down-lr-weight, --mid-lr-weight, --up-lr-weight")
    return lora_config(adapter_cfg, adapter_cfg.all_unet_targets, exclude, conv_layers=CONV3X3_TARGETS if adapter_cfg.conv_rank else ())


_UNET_BLOCK = re.compile(r"(?:^|\.)(up|down)_blocks\.(\d+)\.(resnets|upsamplers|downsamplers|attentions)\.(\d+)\.")


def unet_block_index(module: str) -> int:
    """kohya's block number of a UNet module (diffusers name): 1-11 down (0 would be conv_in), 12 the middle block,
    13-24 up, -1 outside the blocks. A down or up block i counts 3 places, resnets/attentions j at 3i + j and its
    resampler at 3i + 2 (as kohya's get_block_index)."""
    found = _UNET_BLOCK.search(module)
    if found:
        side, i, kind, j = found.groups()
        place = 3 * int(i) + (2 if kind in ("upsamplers", "downsamplers") else int(j))
        return 1 + place if side == "down" else BLOCKS + 1 + place
    return BLOCKS if module.startswith("mid_block.") or ".mid_block." in module else -1


def block_lr_factors(unet: torch.nn.Module, adapter_cfg: AdapterConfig) -> list[float]:
    """For each of `trainable_parameters(unet)`, in its order: the learning-rate factor of its block."""
    return [adapter_cfg.block_lr_weight(unet_block_index(name)) for name, p in unet.named_parameters() if p.requires_grad]


def last_layer_marker(text_encoder: torch.nn.Module) -> str:
    """The part of a module name that places it in a CLIP text encoder's last layer (`layers.N.`)."""
    return f"layers.{int(text_encoder.config.num_hidden_layers) - 1}."


def final_layer_modules(text_encoder: torch.nn.Module, targets: tuple[str, ...]) -> list[str]:
    """The target modules of a CLIP text encoder's last layer (SDXL reads the first encoder's penultimate state, so they get no gradient)."""
    marker = last_layer_marker(text_encoder)
    return [name for name, _ in text_encoder.named_modules() if marker in name and name.endswith(tuple("." + t for t in targets))]


def attach_adapters(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    adapter_cfg: AdapterConfig,
    text_encoder_2: torch.nn.Module | None = None,
    skip_final_layer: tuple[str, ...] = (),
) -> None:
    """Freeze the base weights and add LoRA adapters; adapter weights are fp32 whatever the base dtype.

    `text_encoder_2` (SDXL) gets the same text-encoder targets as `text_encoder`; both train jointly with the UNet.
    `skip_final_layer` names encoders whose last layer the UNet never sees (`ModelFamily.penultimate_encoders`): no LoRA there.
    """
    unet.requires_grad_(False)
    unet.add_adapter(unet_lora_config(adapter_cfg, unet))
    for name, encoder in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if encoder is not None:
            encoder.requires_grad_(False)
            if adapter_cfg.train_text_encoder:
                exclude = final_layer_modules(encoder, adapter_cfg.text_encoder_targets) if name in skip_final_layer else None
                encoder.add_adapter(lora_config(adapter_cfg, adapter_cfg.text_encoder_targets, exclude))
    for model in (unet, text_encoder, text_encoder_2):
        if model is None:
            continue
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def up_weight_flags(model: torch.nn.Module) -> list[bool]:
    """For each of `trainable_parameters(model)`, in its order: whether it is a LoRA up (B) weight (LoRA+ speeds those up)."""
    return [".lora_B." in name for name, p in model.named_parameters() if p.requires_grad]


def has_adapter(model: torch.nn.Module | None) -> bool:
    return model is not None and bool(getattr(model, "peft_config", None))


def adapter_state_dicts(models: dict[str, torch.nn.Module | None]) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT-keyed LoRA weights (`…to_q.lora_A.weight`) per adapted model, without the adapter name."""
    from peft.utils import get_peft_model_state_dict

    return {
        name: {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}
        for name, model in models.items()
        if has_adapter(model)
    }


def adapter_metadata(model: torch.nn.Module) -> dict[str, Any]:
    """The LoRA config diffusers needs to restore alpha on load (without it alpha silently becomes rank)."""
    config = model.peft_config[ADAPTER_NAME].to_dict()
    config["base_model_name_or_path"] = None  # transformers fills in the local model path: never put it in a shared file
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def save_diffusers_lora(folder: Path, state_dicts: dict[str, dict[str, torch.Tensor]], metadata: dict[str, dict[str, Any]], dtype: torch.dtype | None = None) -> Path:
    """Write `pytorch_lora_weights.safetensors` as diffusers' `load_lora_weights` reads it: `unet.`/`text_encoder.`(/`text_encoder_2.`) keys and adapter metadata."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    def cast(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (v.to(dtype) if dtype is not None else v).cpu().contiguous() for k, v in sd.items()}

    folder.mkdir(parents=True, exist_ok=True)
    if "text_encoder_2" in state_dicts:
        StableDiffusionXLPipeline.save_lora_weights(
            folder,
            unet_lora_layers=cast(state_dicts["unet"]) if "unet" in state_dicts else None,
            text_encoder_lora_layers=cast(state_dicts["text_encoder"]) if "text_encoder" in state_dicts else None,
            text_encoder_2_lora_layers=cast(state_dicts["text_encoder_2"]),
            unet_lora_adapter_metadata=metadata.get("unet"),
            text_encoder_lora_adapter_metadata=metadata.get("text_encoder"),
            text_encoder_2_lora_adapter_metadata=metadata.get("text_encoder_2"),
            safe_serialization=True,
        )
        return folder / LORA_FILE
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=cast(state_dicts["unet"]) if "unet" in state_dicts else None,  # a text-encoder-only LoRA has none
        text_encoder_lora_layers=cast(state_dicts["text_encoder"]) if "text_encoder" in state_dicts else None,
        unet_lora_adapter_metadata=metadata.get("unet"),
        text_encoder_lora_adapter_metadata=metadata.get("text_encoder"),
        safe_serialization=True,
    )
    return folder / LORA_FILE


def _open_safetensors(path: Path, read: Any) -> Any:
    """`read(handle)` on an open safetensors file; a truncated or foreign file is a user error, not a crash."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return read(handle)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own types for corrupt files
        raise ExportError(f"'{path}' could not be read as safetensors ({error}); is the file complete? Copy or download it again") from error


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the metadata of a safetensors file."""
    return _open_safetensors(path, lambda handle: ({k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})))


def read_keys(path: Path) -> list[str]:
    """A safetensors file's tensor names alone (its tensors are not read)."""
    return _open_safetensors(path, lambda handle: list(handle.keys()))


# LyCORIS network types other than LoRA/LoCon (lora_down/lora_up), by the key suffixes only they write.
LYCORIS_SUFFIXES = {
    "hada_w1_a": "LoHa", "lokr_w1": "LoKr", "lokr_w1_a": "LoKr", "on_input": "IA3", "oft_blocks": "OFT", "oft_diag": "OFT",
    "oft_R": "BOFT", "a1.weight": "GLoRA", "diff": "full", "w_norm": "norm",
}


def lycoris_types(keys: Any) -> dict[str, int]:
    """How many kohya-named modules of each LyCORIS type other than LoRA/LoCon the keys hold ({} for none): LoHa, LoKr,
    IA3, OFT, BOFT, GLoRA, full (weight differences) or norm."""
    found: dict[str, set[str]] = {}
    for key in keys:
        module, _, suffix = key.partition(".")
        if suffix in LYCORIS_SUFFIXES:
            found.setdefault(LYCORIS_SUFFIXES[suffix], set()).add(module)
    return {kind: len(modules) for kind, modules in sorted(found.items())}


def lycoris_note(types: dict[str, int]) -> str:
    """What a LyCORIS file of these types is, and who loads it."""
    listed = ", ".join(f"{kind} ({n} module{'s' if n > 1 else ''})" for kind, n in types.items())
    return (
        f"a LyCORIS {listed} network, not a LoRA: AUTOMATIC1111, Forge and ComfyUI load it as it is; diffusers' "
        "load_lora_weights and dreamlora's generate, convert, resize and merge read LoRA/LoCon (lora_down/lora_up) only"
    )


def read_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata alone (its tensors are not read)."""
    return _open_safetensors(path, lambda handle: dict(handle.metadata() or {}))


def read_diffusers_lora(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
    """Split a diffusers LoRA file into per-model PEFT state dicts and their adapter configs."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise ExportError(f"no LoRA weights at '{path}'; pass a run folder with a finished run or a .safetensors file")
    state_dicts: dict[str, dict[str, torch.Tensor]] = {}
    tensors, file_metadata = read_safetensors(path)
    raw_meta = file_metadata.get("lora_adapter_metadata")
    for key, tensor in tensors.items():
        group, _, rest = key.partition(".")
        if group not in GROUPS:
            raise ExportError(f"'{path}' is not a diffusers LoRA file (key {key!r}); use `dreamlora convert` for other layouts")
        state_dicts.setdefault(group, {})[rest] = tensor
    metadata: dict[str, dict[str, Any]] = {}
    if raw_meta:
        flat = json.loads(raw_meta)
        for group in GROUPS:
            prefix = f"{group}."
            sub = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
            if sub:
                metadata[group] = sub
    return state_dicts, metadata


def load_adapters(models: dict[str, torch.nn.Module | None], state_dicts: dict[str, dict[str, torch.Tensor]], metadata: dict[str, dict[str, Any]]) -> None:
    """Attach adapters described by `metadata` and load their weights exactly (for resume and generation)."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    for group, state_dict in state_dicts.items():
        model = models.get(group)
        if model is None:
            continue
        if group not in metadata:
            raise ExportError(f"the LoRA file has no adapter metadata for {group}; its alpha is unknown")
        if not has_adapter(model):
            model.add_adapter(LoraConfig(**metadata[group]))
        result = set_peft_model_state_dict(model, state_dict, adapter_name=ADAPTER_NAME)
        unexpected = getattr(result, "unexpected_keys", []) or []
        if unexpected:
            raise ExportError(f"{len(unexpected)} LoRA keys for {group} match no module (first: {unexpected[0]}); was the LoRA trained on another model?")


def lora_summary(state_dicts: dict[str, dict[str, torch.Tensor]], metadata: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Modules, rank and alpha per adapted model."""
    summary = {}
    for group, sd in state_dicts.items():
        downs = [v for k, v in sd.items() if "lora_A" in k]
        meta = metadata.get(group, {})
        summary[group] = {
            "modules": len(downs),
            "rank": int(downs[0].shape[0]) if downs else 0,
            "alpha": meta.get("lora_alpha"),
            "nonzero_up": sum(int(v.abs().sum() > 0) for k, v in sd.items() if "lora_B" in k),
        }
    return summary


def load_initial_weights(models: dict[str, torch.nn.Module | None], modules: list[Any], source: str) -> int:
    """Start training from an existing LoRA (kohya's --network_weights): copy each module's down and up weights (any
    object with group, module, down, up, alpha, rank, is_conv3x3: `export.LoraModule`) into the attached adapters; returns how many were loaded.

    Every module of the file must be adapted here at its rank; a file alpha other than the adapter's is folded into
    the up weight, so each layer starts with exactly the file's update. Adapted layers the file lacks start as usual.
    """
    from dreamlora.errors import ConfigError

    layers = {group: dict(lora_layers(model)) for group, model in models.items() if has_adapter(model)}
    missing = [m for m in modules if m.module not in layers.get(m.group, {})]
    if missing:
        groups = sorted({m.group for m in missing})
        untrained = [g for g in groups if g not in layers]
        hint = (
            f"it adapts the {', '.join(untrained)}, which this run does not train (drop --no-text-encoder)"
            if untrained
            else "add the layers it adapts (--targets all, --conv-rank N, a block weight above 0 where it adapts a block), or check it was trained on this base model"
        )
        raise ConfigError(f"--init-lora {source}: {len(missing)} of its {len(modules)} modules are not adapted in this run (first: {missing[0].group}.{missing[0].module}); {hint}")
    with torch.no_grad():
        for m in modules:
            layer = layers[m.group][m.module]
            down, up = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
            if m.down.shape[0] == down.shape[0] and (tuple(m.down.shape[1:]) != tuple(down.shape[1:]) or tuple(m.up.shape) != tuple(up.shape)):
                raise ConfigError(
                    f"--init-lora {source}: {m.group}.{m.module} is {tuple(m.down.shape)} / {tuple(m.up.shape)} (down / up) in the LoRA but "
                    f"{tuple(down.shape)} / {tuple(up.shape)} in this run: the LoRA was trained on a model of another architecture; "
                    "start from a LoRA of this base model, or train on the one it was trained on"
                )
            if tuple(m.down.shape) != tuple(down.shape) or tuple(m.up.shape) != tuple(up.shape):
                option = "--conv-rank" if m.is_conv3x3 else "--rank"
                raise ConfigError(
                    f"--init-lora {source}: {m.group}.{m.module} has rank {m.rank} (shape {tuple(m.down.shape)}), this run's adapter "
                    f"{tuple(down.shape)}; pass {option} {m.rank}, or check the LoRA was trained on this base model"
                )
            down.copy_(m.down.to(down.dtype))
            up.copy_((m.up.float() * (m.alpha / m.rank / float(layer.scaling[ADAPTER_NAME]))).to(up.dtype))
    return len(modules)


# --- regularizers: kohya's LoRA dropouts and max-norm -------------------------------------------------


def lora_layers(model: torch.nn.Module) -> list[tuple[str, Any]]:
    """(name, PEFT LoRA layer) for every module of `model` that carries the adapter."""
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER_NAME in m.lora_A]


def _dropout_hook(network: float, rank: float, module: float) -> Any:
    """A forward hook on a LoRA's down projection: kohya's dropouts on its output, in training mode only.

    network: each element dropped with that probability (the rest rescaled); rank: whole rank channels dropped per
    image, the rest rescaled; module: the whole LoRA skipped for this forward pass (not rescaled, as kohya does).
    """

    def hook(layer: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not layer.training:
            return None
        if network:
            output = torch.nn.functional.dropout(output, p=network, training=True)
        if rank:
            channel_dim = 1 if isinstance(layer, torch.nn.Conv2d) else output.dim() - 1
            shape = [1] * output.dim()
            shape[0], shape[channel_dim] = output.shape[0], output.shape[channel_dim]
            keep = torch.rand(shape, device=output.device) >= rank
            output = output * (keep.to(output.dtype) / (1.0 - rank))
        if module:
            output = output * (torch.rand((), device=output.device) >= module).to(output.dtype)
        return output

    return hook


def add_dropout_hooks(models: list[torch.nn.Module | None], adapter_cfg: AdapterConfig) -> list[Any]:
    """Hook kohya's network/rank/module dropouts onto every LoRA of `models` (none when all three are 0); returns the handles."""
    if not adapter_cfg.kohya_dropouts:
        return []
    hook = _dropout_hook(adapter_cfg.network_dropout, adapter_cfg.rank_dropout, adapter_cfg.module_dropout)
    return [layer.lora_A[ADAPTER_NAME].register_forward_hook(hook) for model in models if model is not None for _, layer in lora_layers(model)]


def update_norm(down: torch.Tensor, up: torch.Tensor, scaling: float) -> torch.Tensor:
    """Frobenius norm of a LoRA's weight update scaling * up @ down (convolutions flattened), without forming it."""
    d, u = down.detach().flatten(1).float(), up.detach().flatten(1).float()
    return ((u.T @ u) * (d @ d.T)).sum().clamp_min(0).sqrt() * scaling  # ||UD||^2 = sum((U^T U) * (D D^T))


class WeightNormLimiter:
    """kohya's --scale_weight_norms (max-norm regularisation): after each optimizer step, every LoRA whose update
    norm exceeds `max_norm` has its down and up weights scaled by the same factor, so the norm becomes `max_norm`.

    `substitute` maps a model parameter to the tensor the optimizer steps (the fp32 master copy under bf16 master
    weights). Statistics stay on the device until `stats` reads them (at log steps).
    """

    def __init__(self, models: list[torch.nn.Module | None], max_norm: float, substitute: dict[torch.nn.Parameter, torch.Tensor] | None = None) -> None:
        self.max_norm = float(max_norm)
        self.pairs: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        substitute = substitute or {}
        for model in models:
            if model is None:
                continue
            for _, layer in lora_layers(model):
                down, up = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
                if down.requires_grad:
                    self.pairs.append((substitute.get(down, down), substitute.get(up, up), float(layer.scaling[ADAPTER_NAME])))
        self.norms: torch.Tensor | None = None
        self.scaled: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self) -> None:
        if not self.pairs:
            return
        norms = torch.stack([update_norm(down, up, scaling) for down, up, scaling in self.pairs])
        over = norms > self.max_norm
        factors = torch.where(over, self.max_norm / norms.clamp_min(1e-12), torch.ones_like(norms)).sqrt()
        for (down, up, _), factor in zip(self.pairs, factors):
            down.mul_(factor.to(down.dtype))
            up.mul_(factor.to(up.dtype))
        self.norms, self.scaled = torch.minimum(norms, torch.full_like(norms, self.max_norm)), over.sum()

    def stats(self) -> dict[str, float]:
        """kohya's logged figures for the last step: modules scaled, and the mean and largest update norm after scaling; syncs."""
        if self.norms is None or self.scaled is None:
            return {}
        return {"keys_scaled": int(self.scaled.item()), "average_key_norm": float(self.norms.mean().item()), "max_key_norm": float(self.norms.max().item())}
