"""The demo: a fresh working folder for the three user commands on the toy model, and the picture that judges the result.

`dreamlora demo` copies the sample photos of the toy world's subject ("sks dog", a red disc with a bold yellow centre)
into a new folder, runs `prior`, `train` and `export` there exactly as a user types them, then draws base and trained
images at the same seeds for the instance prompt, the class prompt and another class, and reads each image back with
the toy world's reader: the subject is learned when "a photo of sks dog" images carry the mark, and the class is kept
when "a photo of dog" images mostly do not and "a photo of cat" stays a blue square.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from dreamlora.checkpoint import find_lora, next_free_path
from dreamlora.generate import adapters_disabled, generate_images, install_embeddings, make_grid, upscale_small
from dreamlora.lora import load_adapters, read_diffusers_lora
from dreamlora.models import build_pipeline, load_components
from dreamlora.monitor import palette_drift

PACKAGE_DIR = Path(__file__).resolve().parent
TOY_RECIPE = PACKAGE_DIR / "configs" / "toy.toml"
SAMPLE_PHOTOS = PACKAGE_DIR.parent / "samples" / "dog"
EVAL_PROMPTS = ("a photo of sks dog", "a photo of dog", "a photo of cat")


@dataclass(frozen=True)
class PromptScore:
    prompt: str
    base_mark_rate: float
    trained_mark_rate: float
    base_class_rate: float  # share of images that read as the prompt's class
    trained_class_rate: float
    palette_drift: float  # the trained images' colours against the base images' (`monitor.palette_drift`)


@dataclass(frozen=True)
class DemoEvaluation:
    picture: Path
    scores: list[PromptScore]


def prepare_folder(out: Path) -> Path:
    """A new demo folder holding the instance photos in `dog/`; an existing folder gets the next free suffix."""
    folder = next_free_path(Path(out))
    (folder / "dog").mkdir(parents=True)
    if SAMPLE_PHOTOS.is_dir() and any(SAMPLE_PHOTOS.glob("*.png")):
        for photo in sorted(SAMPLE_PHOTOS.glob("*.png")):
            shutil.copy2(photo, folder / "dog" / photo.name)
    else:  # installed without the repository's samples/: draw the same subject
        from dreamlora.toy.world import write_instance_photos

        write_instance_photos(folder / "dog")
    return folder


def _class_of(prompt: str) -> str:
    return prompt.rsplit(" ", 1)[-1]


def evaluate(run_dir: Path, out: Path, seeds: int = 16, steps: int = 20, guidance: float = 5.0, model: str = "toy") -> DemoEvaluation:
    """Base vs trained images for each evaluation prompt at the same seeds, one picture, and what the reader saw."""
    from dreamlora.toy.world import class_rate, mark_rate

    components = load_components(model, device="cuda" if torch.cuda.is_available() else "cpu")
    state_dicts, metadata = read_diffusers_lora(find_lora(run_dir))
    load_adapters({"unet": components.unet, "text_encoder": components.text_encoder}, state_dicts, metadata)
    lora_prompt = install_embeddings(components, [(run_dir, 1.0)])  # a --pivotal run's new tokens
    pipeline = build_pipeline(components)
    resolution = components.native_resolution
    rows, labels, scores = [], [], []
    for prompt in EVAL_PROMPTS:
        with adapters_disabled([components.unet, components.text_encoder]):
            base = generate_images(pipeline, prompt, list(range(seeds)), steps, guidance, resolution)
        trained = generate_images(pipeline, lora_prompt(prompt), list(range(seeds)), steps, guidance, resolution)
        cls = _class_of(prompt)
        scores.append(PromptScore(prompt, mark_rate(base), mark_rate(trained), class_rate(base, cls), class_rate(trained, cls), palette_drift(trained, base)))
        rows += [base[:8], trained[:8]]
        labels += [f"base: {prompt}", f"LoRA: {prompt}"]
    make_grid(upscale_small(rows), labels).save(out)
    return DemoEvaluation(out, scores)
