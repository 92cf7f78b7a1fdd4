"""What `dreamlora inspect` reports about a run folder or a LoRA file: format, family, ranks, alphas, counts, metadata and problems."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from dreamlora.checkpoint import METRICS_FILE, RUN_INFO, find_lora, read_run_info
from dreamlora.model_card import last_readings
from dreamlora.errors import ExportError
from dreamlora.export import alphas_diffusers_misreads, is_kohya_key
from dreamlora.lora import GROUPS, LYCORIS_SUFFIXES, lycoris_note, lycoris_types, read_safetensors
from dreamlora.pivotal import embeddings_for, split_bundle

CROSS_ATTENTION_FAMILIES = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
BASE_MODEL_FAMILIES = {"sd_v1": "sd1", "sd_v2": "sd2", "sdxl_base_v1-0": "sdxl"}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix != ".safetensors":
        raise ExportError(f"'{path}' is not a .safetensors file; inspect reads run folders and safetensors LoRAs")
    return read_safetensors(path)


def _kohya_group(name: str) -> str:
    if name.startswith("lora_unet_"):
        return "unet"
    return "text_encoder_2" if name.startswith("lora_te2_") else "text_encoder"


def _kohya_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    modules: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, _, kind = key.partition(".")
        entry = modules.setdefault(name, {"group": _kohya_group(name)})
        if kind == "lora_down.weight":
            entry["down"] = value
        elif kind == "lora_up.weight":
            entry["up"] = value
        elif kind == "alpha":
            entry["alpha"] = float(value.float().item())
        elif kind in LYCORIS_SUFFIXES:
            entry["lycoris"] = LYCORIS_SUFFIXES[kind]
    return modules


def _diffusers_modules(tensors: dict[str, torch.Tensor], file_meta: dict[str, str]) -> dict[str, dict[str, Any]]:
    adapter_meta = json.loads(file_meta["lora_adapter_metadata"]) if "lora_adapter_metadata" in file_meta else {}
    modules: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        group, _, rest = key.partition(".")
        for marker, slot in ((".lora_A.", "down"), (".lora_B.", "up")):
            if marker in rest:
                name = rest.split(marker)[0]
                entry = modules.setdefault(f"{group}.{name}", {"group": group})
                entry[slot] = value
    for name, entry in modules.items():
        group, _, module = name.partition(".")
        alpha = adapter_meta.get(f"{group}.lora_alpha")
        pattern = adapter_meta.get(f"{group}.alpha_pattern") or {}
        for key, value in pattern.items():
            if module == key or module.endswith("." + key):
                alpha = value
        if alpha is not None:
            entry["alpha"] = float(alpha)
    return modules


def _family(modules: dict[str, dict[str, Any]], tensors: dict[str, torch.Tensor], file_meta: dict[str, str], run: dict[str, Any] | None) -> str:
    if run and run.get("family"):
        return str(run["family"])
    if file_meta.get("ss_base_model_version") in BASE_MODEL_FAMILIES:
        return BASE_MODEL_FAMILIES[file_meta["ss_base_model_version"]]
    if any(k.startswith("lora_te2_") or k.startswith("text_encoder_2.") for k in tensors):
        return "sdxl"
    for name, entry in modules.items():
        if "attn2" in name and ("to_k" in name) and (width := _in_features(name, entry, tensors)):
            return CROSS_ATTENTION_FAMILIES.get(width, f"unknown (cross-attention width {width})")
    return "unknown"


def _in_features(name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> int | None:
    """A module's input width: a LoRA's down weight, a LoHa's hada_w1_b, or a LoKr's Kronecker factors (in = c * d for
    w1 (a, c) and w2 (b, d), each whole or as a product of two low-rank factors)."""
    if "down" in entry:
        return int(entry["down"].shape[1])
    if (loha := tensors.get(f"{name}.hada_w1_b")) is not None:
        return int(loha.shape[1])
    widths = []
    for factor in ("lokr_w1", "lokr_w2"):
        whole, low = tensors.get(f"{name}.{factor}"), tensors.get(f"{name}.{factor}_b")
        if whole is None and low is None:
            return None
        widths.append(int((whole if whole is not None else low).shape[1]))
    return widths[0] * widths[1]


def _group_summary(modules: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    summary = {}
    for group in GROUPS:
        members = [m for m in modules.values() if m["group"] == group and ("down" in m or "lycoris" in m)]
        if not members:
            continue
        ranks = Counter(int(m["down"].shape[0]) for m in members if "down" in m)  # a LyCORIS type's dimension is not a rank
        alphas = Counter(m.get("alpha") for m in members)
        summary[group] = {
            "modules": len(members),
            "ranks": sorted(ranks),
            "alphas": sorted(a for a in alphas if a is not None),
            "missing_alpha": alphas.get(None, 0),
        }
    return summary


def find_problems(fmt: str, family: str, modules: dict[str, dict[str, Any]], tensors: dict[str, torch.Tensor], file_meta: dict[str, str]) -> list[str]:
    """Problems a consumer (A1111, ComfyUI, diffusers) would hit with these tensors, each with what to do."""
    problems = []
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        problems.append(f"{len(bad)} tensors contain NaN or inf (first: {bad[0]}); the LoRA is broken, use an earlier checkpoint")
    ups = {name: m["up"] for name, m in modules.items() if "up" in m}
    zero = [name for name, up in ups.items() if not bool(up.abs().sum() > 0)]
    if ups and len(zero) == len(ups):
        problems.append("every up weight is zero: the LoRA has no effect (untrained, or trained with a zero learning rate)")
    elif zero:
        problems.append(f"{len(zero)} of {len(ups)} modules have all-zero up weights (first: {zero[0]}); they do nothing")
    if lycoris := lycoris_types(tensors):
        problems.append(lycoris_note(lycoris))
    incomplete = [name for name, m in modules.items() if ("down" not in m or "up" not in m) and "lycoris" not in m]
    if incomplete:
        problems.append(f"{len(incomplete)} modules lack a down or up weight (first: {incomplete[0]}); consumers skip them")
    missing_alpha = [name for name, m in modules.items() if "alpha" not in m and "down" in m]
    if missing_alpha:
        where = "adapter metadata (lora_adapter_metadata)" if fmt == "diffusers" else ".alpha"
        problems.append(f"{len(missing_alpha)} modules have no {where} (first: {missing_alpha[0]}); consumers assume alpha = rank, which may not be how it was trained")
    if fmt == "a1111":
        problems += _kohya_problems(family, modules, tensors, file_meta)
    return problems


def _kohya_problems(family: str, modules: dict[str, dict[str, Any]], tensors: dict[str, torch.Tensor], file_meta: dict[str, str]) -> list[str]:
    problems = []
    te_names = [name for name, m in modules.items() if m["group"] == "text_encoder"]
    if family in ("sd1", "sd2"):
        te1 = [n for n in te_names if n.startswith("lora_te1_")]
        if te1:
            problems.append(f"{len(te1)} text-encoder modules use the SDXL prefix lora_te1_ on an SD 1.x/2.x LoRA (first: {te1[0]}); A1111 ignores them, it expects lora_te_text_model_…; fix with `dreamlora convert --to a1111`")
        no_text_model = [n for n in te_names if n.startswith("lora_te_") and not n.startswith("lora_te_text_model_")]
        if no_text_model:
            problems.append(f"{len(no_text_model)} text-encoder modules lack text_model_ (first: {no_text_model[0]}); A1111 ignores them; fix with `dreamlora convert --to a1111`")
    misread = alphas_diffusers_misreads((m["group"], name, m["alpha"]) for name, m in modules.items() if "alpha" in m)
    if misread:
        alphas = sorted({m["alpha"] for m in modules.values() if "alpha" in m})
        problems.append(
            f"alphas differ between modules ({', '.join(f'{a:g}' for a in alphas)}); diffusers' load_lora_weights gives {len(misread)} text-encoder or "
            f"UNet-attention modules (first: {misread[0]}) its group's most common alpha instead of their own (A1111 and ComfyUI read each one); "
            "`dreamlora convert` folds them into the weights so every consumer agrees"
        )
    dora = sorted({k.split(".", 1)[0] for k in tensors if k.endswith(".dora_scale")})
    if te_names and not any("out_proj" in n for n in te_names):
        fix = "" if dora else "; `dreamlora convert FILE OUT.safetensors --to diffusers` writes one diffusers loads"
        problems.append(f"the text-encoder LoRA has no out_proj modules; diffusers' load_lora_weights raises on it (A1111 and ComfyUI load it){fix}")
    ldm = [n for n in modules if n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))]
    if ldm and family in ("sd1", "sd2"):
        problems.append(f"{len(ldm)} UNet modules use LDM names (first: {ldm[0]}); diffusers drops them with only a warning; `dreamlora convert --to a1111` renames them")
    if "lora_adapter_metadata" in file_meta:
        problems.append("kohya alphas and diffusers adapter metadata in one file: diffusers' load_lora_weights raises; `dreamlora convert` drops the metadata")
    if dora:
        problems.append(f"{len(dora)} modules are DoRA (dora_scale magnitudes, first: {dora[0]}): AUTOMATIC1111 and ComfyUI load them; dreamlora's convert refuses them rather than drop the magnitudes")
        per_output = [name for name in dora if _dora_per_output(tensors[f"{name}.dora_scale"])]
        if per_output:
            problems.append(
                f"{len(per_output)} DoRA modules keep one magnitude per output row (first: {per_output[0]}), as PEFT and diffusers train DoRA: "
                "AUTOMATIC1111 reads dora_scale as one magnitude per input column and ComfyUI scales such rows by the base weight's norm, "
                "so neither reproduces them; only per-input-column DoRA (shape (1, in), as LyCORIS and kohya train it) loads alike everywhere"
            )
    return problems


def _dora_per_output(scale: torch.Tensor) -> bool:
    """A dora_scale shaped (out, 1, ...): magnitudes per output row (PEFT's orientation), not LyCORIS' (1, in, ...) per input column."""
    return scale.dim() >= 2 and scale.shape[0] > 1 and all(int(d) == 1 for d in scale.shape[1:])


def _adapter_summary(file_meta: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Rank, alpha and targets per group from a diffusers file's `lora_adapter_metadata`."""
    flat = json.loads(file_meta.get("lora_adapter_metadata") or "{}")
    return {
        group: {key: flat[f"{group}.{key}"] for key in ("r", "lora_alpha", "target_modules") if f"{group}.{key}" in flat}
        for group in GROUPS
        if any(k.startswith(f"{group}.") for k in flat)
    }


def _embedding_summary(lora_file: Path, bundled: bool) -> str:
    """Pivotal tuning's embedding that goes with the LoRA (`pivotal.embeddings_for`), in a line; "" without one."""
    found = embeddings_for(lora_file)
    if found is None:
        return ""
    token, tensors = found
    shapes = ", ".join(f"{key} {'x'.join(str(n) for n in value.shape)}" for key, value in tensors.items())
    return f"{token!r}, {next(iter(tensors.values())).shape[0]} vectors ({shapes}), " + ("bundled in the file" if bundled else "in its own file beside the LoRA")


def _checkpoint_report(path: Path, tensors: dict[str, torch.Tensor], file_meta: dict[str, str]) -> dict[str, Any]:
    """A single-file model checkpoint (not a LoRA): its architecture, dtype and what its markers say it predicts."""
    from dreamlora.single_file import checkpoint_architecture

    architecture, dtype, settings = checkpoint_architecture(path)
    marked = settings.get("prediction_type")
    return {
        "path": str(path),
        "kind": "file",
        "format": "single-file checkpoint (a model: use it with --model FILE)",
        "family": "sdxl" if architecture == "sdxl" else "sd1/sd2",
        "dtype": DTYPE_NAMES.get(dtype, str(dtype)),
        "file_size": path.stat().st_size,
        "tensors": len(tensors),
        "prediction_type": f"{marked} (marked in the file)" if marked else "not marked: epsilon, unless --prediction-type says otherwise",
        "zero_terminal_snr": "yes (ztsnr marker): sampled with trailing timesteps" if settings.get("rescale_betas_zero_snr") else "no",
        "metadata": {k: v for k, v in file_meta.items() if k.startswith(("ss_", "sshs_", "modelspec."))},
        "problems": [],
    }


def trained_words(file_meta: dict[str, str], limit: int = 10) -> list[tuple[str, int]]:
    """The most frequent caption tags of kohya's `ss_tag_frequency` over all its folders (what Civitai lists as a LoRA's
    trained words: where its trigger word is found), most frequent first; [] without it or when it does not parse."""
    try:
        frequency = json.loads(file_meta.get("ss_tag_frequency") or "{}")
    except ValueError:
        return []
    counts: Counter[str] = Counter()
    for tags in frequency.values() if isinstance(frequency, dict) else ():
        for tag, count in tags.items() if isinstance(tags, dict) else ():
            if isinstance(count, (int, float)):
                counts[str(tag)] += int(count)
    return counts.most_common(limit)


def inspect_path(path: Path) -> dict[str, Any]:
    """Describe a run folder or a LoRA file (kohya/A1111 or diffusers); see the keys of the returned dict."""
    path = Path(path)
    lora_file = find_lora(path)  # a hub LoRA (OWNER/NAME) is read from the cache
    run = read_run_info(path) if path.is_dir() and (path / RUN_INFO).is_file() else None
    tensors, file_meta = _read(lora_file)
    if any(key.startswith("model.diffusion_model.") for key in tensors):
        return _checkpoint_report(path, tensors, file_meta)
    tensors, bundled = split_bundle(tensors)
    if tensors and all(is_kohya_key(k) for k in tensors):
        fmt, modules = "a1111", _kohya_modules(tensors)
    elif tensors and all(k.split(".", 1)[0] in GROUPS and (".lora_A." in k or ".lora_B." in k) for k in tensors):
        fmt, modules = "diffusers", _diffusers_modules(tensors, file_meta)
    else:
        fmt, modules = "unknown", {}
    family = _family(modules, tensors, file_meta, run)
    dtypes = Counter(DTYPE_NAMES.get(v.dtype, str(v.dtype)) for k, v in tensors.items() if not k.endswith(".alpha"))
    groups = _group_summary(modules)
    problems = find_problems(fmt, family, modules, tensors, file_meta) if fmt != "unknown" else [
        "not a LoRA layout dreamlora knows (kohya lora_unet_/lora_te_ keys or diffusers unet./text_encoder. keys with lora_A/lora_B)"
    ]
    hub = not path.exists()  # found by find_lora as a Hugging Face repo, in the HF cache
    return {
        "path": str(path),
        "kind": "run" if run is not None else ("hub" if hub else "file"),
        "lora_file": str(lora_file),
        **({"hub_commit": lora_file.parts[lora_file.parts.index("snapshots") + 1]} if hub and "snapshots" in lora_file.parts else {}),
        "format": fmt,
        "family": family,
        "dtype": dtypes.most_common(1)[0][0] if dtypes else "none",
        "file_size": lora_file.stat().st_size,
        "tensors": len(tensors),
        "unet_modules": groups.get("unet", {}).get("modules", 0),
        "text_encoder_modules": groups.get("text_encoder", {}).get("modules", 0),
        **({"lycoris": lycoris} if (lycoris := lycoris_types(tensors)) else {}),
        **({"text_encoder_2_modules": groups["text_encoder_2"]["modules"]} if "text_encoder_2" in groups else {}),
        "embedding": _embedding_summary(lora_file, bool(bundled)),
        "groups": groups,
        **({"trained_words": words} if (words := trained_words(file_meta)) else {}),
        "metadata": {k: v for k, v in file_meta.items() if k.startswith(("ss_", "sshs_", "modelspec.", "dreamlora_"))},
        "adapter_metadata": _adapter_summary(file_meta),
        "run": run,
        "readings": last_readings(path / METRICS_FILE) if run is not None else {},
        "problems": problems,
    }
