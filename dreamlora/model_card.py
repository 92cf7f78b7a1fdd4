"""The model card (README.md) of a diffusers-format export, as the Hugging Face Hub reads one.

diffusers' DreamBooth-LoRA script writes a card with YAML metadata (base model, instance prompt, tags), example images
and a usage stub. This one says what a user of the folder needs: the trigger prompt, how to load the LoRA (and a
pivotal-tuned embedding) with diffusers, what the run trained and how, and the run's last drift and validation
figures, with its base-vs-LoRA sample grid. Only names, never local paths.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dreamlora.checkpoint import read_metrics
from dreamlora.config import ExportConfig, RunConfig

CARD_FILE = "README.md"
PICTURE_FILE = "samples.png"
FAMILY_TAGS = {"sd1": ["stable-diffusion", "stable-diffusion-diffusers"], "sd2": ["stable-diffusion", "stable-diffusion-diffusers"], "sdxl": ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"]}
FIGURES = (  # metrics.jsonl keys the card reports, last reading of each
    ("val_class_loss", "held-out class loss (base model: {val_class_loss_base:.4f}; above it = the class drifted)"),
    ("fit_instance_loss", "loss on the photos (base model: {fit_instance_loss_base:.4f})"),
    ("class_palette_drift", "class palette drift (0 = the class images' colours as the base model's)"),
    ("instance_distance", "distance of subject samples to the photos"),
)


def _yaml_text(value: str) -> str:
    """A quoted string: valid as a YAML scalar (quotes and colons escaped) and as a Python literal in the usage code."""
    return json.dumps(value, ensure_ascii=False)


def last_readings(metrics_path: Path) -> dict[str, dict[str, Any]]:
    """For each reported figure (FIGURES), the last metrics.jsonl record holding it; empty without metrics."""
    found: dict[str, dict[str, Any]] = {}
    for record in read_metrics(metrics_path):
        found.update({key: record for key, _ in FIGURES if key in record})
    return found


def model_card(
    run: dict[str, Any], cfg: RunConfig | None, export: ExportConfig, merged: bool, picture: bool, readings: dict[str, dict[str, Any]], embedding: str | None = None,
    weight_name: str | None = None,
) -> str:
    """README.md text for the export folder. `merged`: a whole pipeline with the LoRA fused in, not a LoRA folder;
    `picture`: the folder holds the run's base-vs-LoRA grid as samples.png; `embedding`: the file name of a pivotal
    run's standalone embedding beside the folder; `weight_name`: the card of a hub repo holding the export as this
    one file (an a1111 LoRA or a single-file merged checkpoint) rather than a folder."""
    base, prompt, token = str(run.get("model", "")), str(run.get("instance_prompt", "")), str(run.get("token", ""))
    family = str(run.get("family", "sd1"))
    tags = ["text-to-image", "diffusers", "dreambooth", "dreamlora", *(["lora"] if not merged else []), *FAMILY_TAGS.get(family, [])]
    tags += [t.strip() for t in export.tags.split(",") if t.strip() and t.strip() not in tags]
    front = ["---", f"base_model: {_yaml_text(base)}", "library_name: diffusers"]
    if export.license:
        front.append(f"license: {_yaml_text(export.license)}")
    front += [f"instance_prompt: {_yaml_text(prompt)}", "tags:", *[f"- {_yaml_text(t)}" for t in tags], "---", ""]
    title = export.title or str(run.get("name", "dreamlora LoRA"))
    what = "DreamBooth model (the LoRA fused into the base model's weights)" if merged else "DreamBooth LoRA"
    body = [f"# {title}", ""]
    if export.description:
        body += [export.description, ""]
    body += [
        f"A {what} of `{token}`" + (f" (class `{run['class_name']}`)" if run.get("class_name") else "") + f" for `{base}`, trained with "
        f"dreamlora {run.get('dreamlora_version', '')}. "
        f"Write `{prompt}` (or `{token}` in any prompt) to draw the subject.",
        "",
    ]
    if export.author:
        body += [f"Author: {export.author}", ""]
    if picture:
        body += ["![Base model (upper rows) and this LoRA (lower rows) at the same seeds](samples.png)", ""]
    single_file = merged and weight_name  # one original-layout checkpoint: from_single_file reads it from the repo
    pipeline_class = ("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline") if single_file else "AutoPipelineForText2Image"
    body += ["## Use it with diffusers", "", "```python", "import torch", f"from diffusers import {pipeline_class}", ""]
    here = _yaml_text(export.hub_repo) if export.hub_repo else '"PATH/TO/THIS/FOLDER"'  # pushed: loaded from the hub repo
    if single_file:
        url = f"https://huggingface.co/{export.hub_repo}/blob/main/{weight_name}"
        body += [f'pipe = {pipeline_class}.from_single_file({_yaml_text(url)}, torch_dtype=torch.float16).to("cuda")']
    elif merged:
        body += [f'pipe = AutoPipelineForText2Image.from_pretrained({here}, torch_dtype=torch.float16).to("cuda")']
    else:
        source = {"revision": cfg.model.revision, "variant": cfg.model.variant} if cfg is not None else {}  # the files the run read
        source_args = "".join(f", {key}={_yaml_text(value)}" for key, value in source.items() if value)
        body += [f'pipe = AutoPipelineForText2Image.from_pretrained({_yaml_text(base)}{source_args}, torch_dtype=torch.float16).to("cuda")', f"pipe.load_lora_weights({here}{f', weight_name={_yaml_text(weight_name)}' if weight_name else ''})"]
    use_prompt = prompt
    if embedding:
        body += _embedding_lines(embedding, token, family)
        use_prompt = prompt.replace(token, f"<{token}>")
    body += [f"image = pipe({_yaml_text(use_prompt)}).images[0]", "```", ""]
    if weight_name and not merged:
        body += [f"AUTOMATIC1111, Forge and ComfyUI load `{weight_name}` as it is: put it in their LoRA folder and write `<lora:{Path(weight_name).stem}:1>` (A1111) or use a LoRA loader node (ComfyUI).", ""]
    if embedding:
        where = "in this repo" if weight_name else "beside this folder"
        users = "it is also bundled in the LoRA file, which AUTOMATIC1111 and Forge load with it" if weight_name and not merged else "AUTOMATIC1111 and ComfyUI users take the `a1111` export instead"
        body += [f"The subject's token was pivotal-tuned: its embedding is `{embedding}`, {where}; {users}.", ""]
    body += ["## Training", "", "| setting | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in _settings(run, cfg)], ""]
    rows = []
    for key, label in FIGURES:
        if key in readings:
            record = readings[key]
            try:
                text = label.format(**record)
            except KeyError:  # the base model's figure is missing
                text = label.split(" (")[0]
            rows.append(f"| {text} | {record.get('step', '')} | {record[key]:.4f} |")
    if rows:
        body += ["The training monitor's last readings:", "", "| figure | step | value |", "|---|---|---|", *rows, ""]
    return "\n".join(front + body)


def _embedding_lines(embedding: str, token: str, family: str) -> list[str]:
    if family == "sdxl":
        return [
            "from safetensors.torch import load_file",
            "",
            f'state = load_file("PATH/TO/{embedding}")',
            f'pipe.load_textual_inversion(state["clip_l"], token="<{token}>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)',
            f'pipe.load_textual_inversion(state["clip_g"], token="<{token}>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)',
        ]
    return [f'pipe.load_textual_inversion("PATH/TO/{embedding}", token="<{token}>")']


def _settings(run: dict[str, Any], cfg: RunConfig | None) -> list[tuple[str, str]]:
    rows = [
        ("base model", f"`{run.get('model', '')}`"),
        ("instance prompt", f"`{run.get('instance_prompt', '')}` ({run.get('instance_images', '?')} photos)"),
        ("prior preservation", f"yes: `{run.get('class_prompt', '')}`, {run.get('class_images', 0)} class images" if run.get("with_prior") else "no"),
        ("steps", str(run.get("steps", ""))),
        ("resolution", str(run.get("resolution", ""))),
        ("LoRA rank / alpha", f"{run.get('rank', '')} / {float(run.get('alpha', 0)):g}"),
        ("text encoder", "LoRA trained too" if run.get("train_text_encoder") else "not trained"),
        ("precision", str(run.get("precision", ""))),
    ]
    if cfg is not None:
        t = cfg.train
        rows[3:3] = [("batch size", str(t.batch_size * t.gradient_accumulation))]
        scale = t.lr_scale(int(run.get("processes") or 1))  # --scale-lr: the rates it trained at
        rows += [
            ("optimizer", t.optimizer),
            (
                "learning rate",
                f"{t.lr * scale:g} ({t.lr_scheduler}); text encoder {float(t.resolved_text_encoder_lr) * scale:g}" if cfg.adapter.train_text_encoder else f"{t.lr * scale:g} ({t.lr_scheduler})",
            ),
            ("prior weight", f"{t.prior_weight:g}"),
            ("seed", str(t.seed)),
        ]
        if cfg.adapter.pivotal:
            rows.append(("pivotal tuning", f"{cfg.adapter.pivotal_vectors} new vectors for `{cfg.data.token}`"))
    return rows
