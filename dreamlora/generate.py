"""Images from a base model plus LoRAs at fixed seeds: user generation, training samples and picture files."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from dreamlora.checkpoint import find_lora, next_free_path, read_metrics
from dreamlora.emphasis import pipeline_inputs
from dreamlora.errors import ConfigError
from dreamlora.models import Components, build_pipeline, default_guidance_rescale, sampler_from
from dreamlora.prompts import PromptSpec, parse_prompt_line, setting_problems

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateResult:
    images: list[Path]
    grid: Path


def generate_images(
    pipeline: Any,
    prompt: str,
    seeds: list[int],
    steps: int,
    guidance: float,
    resolution: int | tuple[int, int],
    negative_prompt: str = "",
    batch_size: int = 0,
    on_batch: Callable[[int], None] | None = None,
    emphasis: bool = True,
) -> list[Image.Image]:
    """One image per seed at `resolution` (square, or (width, height)); the same seed gives the same image whatever
    the batch. `batch_size` images per pipeline call (0: all at once); `on_batch` gets the number drawn after each call.
    With `emphasis`, A1111's `(word:1.2)` weights are read (`dreamlora.emphasis`); without, brackets are plain text.
    A zero-terminal-SNR model's images are drawn with guidance rescale (`default_guidance_rescale`)."""
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    device = pipeline.device
    images: list[Image.Image] = []
    size = batch_size or max(len(seeds), 1)
    if emphasis:  # encoded once, repeated for each batch
        text = pipeline_inputs(pipeline, [prompt], [negative_prompt] if negative_prompt else None)
    else:
        text = {"prompt": [prompt], "negative_prompt": [negative_prompt] if negative_prompt else None}
    for start in range(0, len(seeds), size):
        chunk = seeds[start : start + size]
        generators = [torch.Generator(device=device).manual_seed(s) for s in chunk]
        with torch.no_grad():
            images += pipeline(
                **{key: _repeat(value, len(chunk)) for key, value in text.items()},
                num_inference_steps=steps,
                guidance_scale=guidance,
                guidance_rescale=default_guidance_rescale(pipeline.scheduler),
                height=height,
                width=width,
                generator=generators,
                callback_on_step_end=latents_in_vae_dtype,
            ).images
        if on_batch:
            on_batch(len(chunk))
    return images


def _repeat(value: Any, count: int) -> Any:
    """A one-prompt pipeline input for `count` images: a list or tensor repeated along its first axis (None stays None)."""
    if value is None:
        return None
    return value * count if isinstance(value, list) else value.repeat(count, *[1] * (value.dim() - 1))


def draw_prompt(
    pipeline: Any,
    spec: PromptSpec,
    defaults: PromptSpec,
    seeds: list[int],
    batch_size: int = 0,
    on_batch: Callable[[int], None] | None = None,
    rewrite: Callable[[str], str] | None = None,
    emphasis: bool = True,
) -> tuple[list[Image.Image], list[int]]:
    """`generate_images` of one `PromptSpec` filled from `defaults` (which set at least size, guidance and steps): as
    many images as `seeds`, from its own first seed when it has one, with its own sampler when it names one (else the
    pipeline's); `rewrite` respells its prompts (pivotal tuning's tokens). Returns the images and their seeds."""
    rewrite = rewrite or (lambda prompt: prompt)
    full = spec.filled(defaults)
    if spec.seed is not None:
        seeds = list(range(spec.seed, spec.seed + len(seeds)))
    own = pipeline.scheduler
    if spec.scheduler:  # its own sampler, on the same noise schedule, for this prompt only
        pipeline.scheduler = sampler_from(own.config, spec.scheduler)
    try:
        images = generate_images(
            pipeline, rewrite(full.prompt), seeds, full.steps, full.guidance, (full.width, full.height), rewrite(full.negative_prompt or ""),
            batch_size, on_batch, emphasis,
        )
    finally:
        pipeline.scheduler = own
    return images, seeds


def latents_in_vae_dtype(pipeline: Any, index: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """After the last denoising step, give the VAE latents in its own dtype.

    During training with mixed precision, accelerate makes the prepared UNet return fp32, so the latents are fp32 while the
    VAE is bf16/fp16 and `vae.decode` fails ("Input type (float) and bias type (c10::BFloat16)"). SDXL's pipeline still
    upcasts an fp16 VAE itself. A no-op when the dtypes already agree.
    """
    latents = tensors["latents"]
    if index == pipeline.num_timesteps - 1 and latents.dtype != pipeline.vae.dtype:
        return {"latents": latents.to(pipeline.vae.dtype)}
    return {}


def make_grid(rows: list[list[Image.Image]], labels: list[str] | None = None, label_width: int = 0) -> Image.Image:
    """Rows of images in one picture, each in a cell the size of the largest, with an optional text label left of each row."""
    width, height = max(im.width for row in rows for im in row), max(im.height for row in rows for im in row)
    columns = max(len(r) for r in rows)
    font = ImageFont.load_default(size=12)  # the default bitmap font runs words together
    label_width = label_width or (max(160, int(max(font.getlength(s) for s in labels)) + 10) if labels else 0)
    grid = Image.new("RGB", (label_width + columns * width, len(rows) * height), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        if labels:
            draw.text((4, r * height + height // 2 - 7), labels[r], fill="black", font=font)
        for c, image in enumerate(row):
            grid.paste(image, (label_width + c * width, r * height))
    return grid


@contextmanager
def adapters_disabled(models: list[torch.nn.Module]) -> Iterator[None]:
    """Run the base model: switch LoRA adapters off, then back on."""
    adapted = [m for m in models if getattr(m, "peft_config", None)]
    for model in adapted:
        model.disable_adapters()
    try:
        yield
    finally:
        for model in adapted:
            model.enable_adapters()


def comparison_grid(
    components: Components,
    prompts: list[str],
    n: int,
    seed: int,
    steps: int,
    guidance: float,
    resolution: int,
    base: dict[str, list[Image.Image]] | None = None,
    adapted: dict[str, list[Image.Image]] | None = None,
    adapted_prompt: Callable[[str], str] | None = None,
    scheduler: str = "dpm++",
    literal: Collection[str] = (),
) -> Image.Image:
    """For each prompt, a row from the base model and a row with the LoRA, at the same seeds, drawn with sampler
    `scheduler`; a prompt may end in kohya's options (`--n --w --h --d --l --s --ss`) unless it is one of `literal`
    (the instance and class prompts, drawn as written). `base` and `adapted` reuse images already made;
    `adapted_prompt` rewrites the LoRA rows' prompts (pivotal tuning's new tokens)."""
    pipeline = build_pipeline(components, scheduler)
    seeds = list(range(seed, seed + n))
    defaults = PromptSpec("", "", resolution, resolution, guidance=guidance, steps=steps)
    rows, labels = [], []
    for prompt in prompts:
        spec = PromptSpec(prompt) if prompt in literal else parse_prompt_line(prompt, "--sample-prompt")
        if base and prompt in base:
            rows.append(base[prompt])
        else:
            with adapters_disabled([components.unet, *components.text_encoders.values()]):
                rows.append(draw_prompt(pipeline, spec, defaults, seeds)[0])
        labels.append(f"base: {spec.prompt}")
        rows.append(adapted[prompt] if adapted and prompt in adapted else draw_prompt(pipeline, spec, defaults, seeds, rewrite=adapted_prompt)[0])
        labels.append(f"LoRA: {spec.prompt}")
    return make_grid(upscale_small(rows), labels)


def upscale_small(rows: list[list[Image.Image]], minimum: int = 128) -> list[list[Image.Image]]:
    """Tiny-model images (32-64 px) are enlarged with nearest neighbour, all by one whole factor, so a person can see them."""
    size = min(min(im.size) for row in rows for im in row)
    if size >= minimum:
        return rows
    factor = -(-minimum // size)
    return [[im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST) for im in row] for row in rows]


def load_loras(pipeline: Any, loras: list[tuple[Path, float]]) -> None:
    """Load each LoRA (a run folder, a diffusers or an A1111 file) through diffusers' own loader at its scale."""

    from dreamlora.export import lora_file
    from dreamlora.pivotal import lora_without_bundle

    names, scales = [], []
    for index, (path, scale) in enumerate(loras):
        file = find_lora(Path(path))
        name = f"lora{index}"
        if file.suffix == ".safetensors":
            lora_file(file)  # the reader's gate: a damaged or LyCORIS file is named before diffusers' loader trips on it
        try:
            unbundled = lora_without_bundle(file)  # an A1111 file's bundled embedding goes in with install_embeddings
            pipeline.load_lora_weights(str(file) if unbundled is None else unbundled, adapter_name=name)
        except RuntimeError as error:
            if "size mismatch" not in str(error):
                raise
            first = next(line.strip() for line in str(error).splitlines() if "size mismatch" in line)
            raise ConfigError(
                f"LoRA '{path}' was trained on a model of another architecture than this base model ({first}); use it with the base "
                f"model it was trained on (`dreamlora inspect {path}` shows what it records)"
            ) from error
        except (ValueError, KeyError, OSError) as error:
            raise ConfigError(
                f"LoRA '{path}' could not be loaded ({error}); check it was trained for this base model (`dreamlora inspect {path}` "
                "names what diffusers' loader trips on; `dreamlora convert` rewrites kohya/A1111 files in a form it loads)"
            ) from error
        names.append(name)
        scales.append(scale)
    if names:
        pipeline.set_adapters(names, adapter_weights=scales)


def fuse_loras(components: Components, loras: list[tuple[Path, float]]) -> None:
    """Fuse LoRAs into the base weights at their scales and drop the adapters (kohya's --base_weights): from here on
    the model is base + them, for training, sampling and export alike. A pivotal-tuned embedding they carry is not used."""
    if not loras:
        return
    from dreamlora.pivotal import embeddings_for

    pipeline = build_pipeline(components)
    load_loras(pipeline, loras)
    pipeline.fuse_lora(lora_scale=1.0, adapter_names=[f"lora{index}" for index in range(len(loras))])
    pipeline.unload_lora_weights()
    for path, scale in loras:
        log.info("base weights: %s fused at %g", path, scale)
        if (found := embeddings_for(find_lora(Path(path)))) is not None:
            log.warning("base weights %s carry a pivotal-tuned embedding of %r, which is not used: only their LoRA is fused", path, found[0])


def fuse_base_weights(components: Components, base_weights: tuple[str, ...]) -> None:
    """A model config's `base_weights` (PATH or PATH:SCALE each) fused into the components (`fuse_loras`)."""
    from dreamlora.config import lora_reference

    fuse_loras(components, [lora_reference(item, flag="--base-weights") for item in base_weights])


BASE_WEIGHTS_RECORD = "base_weights_sha256"  # run.json: each fused LoRA's content hash when the run started


def base_weight_hashes(base_weights: tuple[str, ...]) -> dict[str, str]:
    """Each base-weights entry (PATH[:SCALE], as configured) and the first 16 hex digits of its LoRA file's SHA-256:
    what a run records, so a file replaced later (or a hub repo that moved) is noticed where the run is used again."""
    from dreamlora.config import lora_reference
    from dreamlora.latent_cache import file_digest

    return {item: file_digest(find_lora(lora_reference(item, flag="--base-weights")[0]))[:16] for item in base_weights}


def changed_base_weights(recorded: dict[str, str], base_weights: tuple[str, ...], now: dict[str, str] | None = None) -> list[str]:
    """The base-weights entries whose LoRA file is no longer the one `recorded` (a run's run.json) hashed; `now`: their
    hashes when the caller has them (else only the recorded entries are hashed)."""
    now = now if now is not None else base_weight_hashes(tuple(item for item in base_weights if item in recorded))
    return [item for item in base_weights if item in recorded and item in now and now[item] != recorded[item]]


def install_embeddings(components: Components, loras: list[tuple[Path, float]], replace: bool = False) -> Callable[[str], str]:
    """Give the model the new tokens of each pivotal-tuned LoRA (`dreamlora.pivotal`; `replace`: over the vectors an
    earlier call installed); return the prompt rewrite that spells each one's token as them (the identity when no LoRA
    has an embedding)."""
    from dreamlora.pivotal import embeddings_for, expand_prompt, install

    tokens: list[tuple[str, int]] = []
    for path, _ in loras:
        found = embeddings_for(find_lora(Path(path)))
        if found is None:
            continue
        token, tensors = found
        if any(token.lower() == seen.lower() for seen, _ in tokens):
            raise ConfigError(f"two of the LoRAs carry an embedding for the token {token!r}; load one of them")
        tokens.append((token, install(components, token, tensors, replace)))
        log.info("LoRA %s: %r is its pivotal-tuned embedding of %d vectors", path, token, tokens[-1][1])

    def rewrite(prompt: str) -> str:
        for token, vectors in tokens:
            prompt = expand_prompt(prompt, token, vectors)
        return prompt

    return rewrite


DEFAULT_OUT = Path("samples-out")
def check_settings(
    num_images: int, steps: int, guidance: float | None, resolution: int | None, loras: list[tuple[Path, float]], batch_size: int = 0, scheduler: str = "dpm++"
) -> None:
    """`generate`'s settings, checked before the model loads."""
    import math

    from dreamlora.prompts import SAMPLERS

    problems = [] if scheduler in SAMPLERS else [f"--scheduler must be one of {', '.join(SAMPLERS)}; got {scheduler!r}"]
    if not 1 <= num_images <= 10_000:
        problems.append(f"--num-images must be in 1..10000; got {num_images}")
    problems += setting_problems(steps, guidance)
    if not 0 <= batch_size <= 1024:
        problems.append(f"--batch-size must be in 1..1024, or 0 for automatic; got {batch_size}")
    problems += setting_problems(sizes={"--resolution": resolution})
    problems += [f"LoRA '{path}' has scale {scale}; pass a finite number as PATH:SCALE" for path, scale in loras if not math.isfinite(scale)]
    if problems:
        raise ConfigError("; ".join(problems))


def run_base_model(loras: list[tuple[Path, float]]) -> tuple[str, str, Path] | None:
    """The base model (and replacement VAE, or "") the given run folders or their checkpoints were trained on, and the
    first such run; None when no LoRA comes from a run. Runs on different base models are an error."""
    from dreamlora.checkpoint import RUN_INFO
    from dreamlora.export import base_model_ref, run_settings

    found: dict[str, Path] = {}
    for path, _ in loras:
        if (run_dir := _run_of(Path(path))) is not None:
            info = json.loads((run_dir / RUN_INFO).read_text(encoding="utf-8"))
            found.setdefault(base_model_ref(run_dir, info), run_dir)
    if len(found) > 1:
        listed = ", ".join(f"{model} ({run})" for model, run in found.items())
        raise ConfigError(f"the LoRAs come from runs on different base models: {listed}; pass the one to use with --model")
    if not found:
        return None
    model, run_dir = next(iter(found.items()))
    vae = run_settings(run_dir).get("model", {}).get("vae", "")
    return model, str(vae or ""), run_dir


def _run_of(path: Path) -> Path | None:
    """The run folder a LoRA path belongs to: runs/x, runs/x/lora/FILE, runs/x/checkpoints/step-N(/lora/FILE)."""
    from dreamlora.checkpoint import CONFIG_FILE, RUN_INFO

    return next((folder for folder in (path, *list(path.parents)[:4]) if (folder / RUN_INFO).is_file() and (folder / CONFIG_FILE).is_file()), None)


def _recorded(
    loras: list[tuple[Path, float]], setting: str, key: str, from_run: Callable[[dict[str, Any]], Any], from_file: Callable[[str], Any], flag: str
) -> tuple[Any, str] | None:
    """A model setting the LoRAs were trained with, read from a run's config (`from_run` of its model section) or else
    from a file's kohya metadata `key` (`from_file` of its value; None: not recorded), and where it was read; None
    when none records it. LoRAs trained with different values are an error that names `flag`."""
    from dreamlora.export import run_settings
    from dreamlora.lora import read_metadata

    found: dict[Any, str] = {}
    for path, _ in loras:
        if (run_dir := _run_of(Path(path))) is not None:
            found.setdefault(from_run(run_settings(run_dir).get("model", {})), f"run {run_dir}")
        elif (value := from_file(read_metadata(find_lora(Path(path))).get(key, "").strip())) is not None:
            found.setdefault(value, f"LoRA {Path(path).name}")
    if len(found) > 1:
        listed = ", ".join(f"{value} ({where})" for value, where in sorted(found.items()))
        raise ConfigError(f"the LoRAs were trained with different {setting}s: {listed}; pass the one to use with {flag}")
    return next(iter(found.items())) if found else None


def recorded_clip_skip(loras: list[tuple[Path, float]]) -> tuple[int, str] | None:
    """The clip skip the LoRAs were trained with (a run's config, else a file's kohya `ss_clip_skip`; its "None" is
    kohya's default, the last layer) and where it was read."""
    from_file = lambda value: int(value) if value.isdigit() else 1 if value == "None" else None  # noqa: E731
    return _recorded(loras, "clip skip", "ss_clip_skip", lambda model: int(model.get("clip_skip", 1)), from_file, "--clip-skip")


def recorded_prediction_type(loras: list[tuple[Path, float]]) -> tuple[str, str] | None:
    """The prediction type the LoRAs were trained for when it was chosen rather than read from the model: a run's
    `model.prediction_type` other than auto, else a file's kohya `ss_v_parameterization` ("True": v_prediction).
    A run that read it from its model records auto, and the model then says it again."""
    from_file = lambda value: "v_prediction" if value == "True" else None  # noqa: E731
    found = _recorded(loras, "prediction type", "ss_v_parameterization", lambda model: str(model.get("prediction_type", "auto")), from_file, "--prediction-type")
    return found if found and found[0] != "auto" else None


def output_folder(out: Path | None) -> Path:
    """Where `generate` writes: a chosen --out that is new or empty, or else the next free `samples-out[-N]`.
    Images already there are never overwritten."""
    if out is None:
        return next_free_path(DEFAULT_OUT)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file; pass a folder for the images")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out '{out}' already holds files, which are never overwritten; pass a new or empty folder, or leave --out off for a new samples-out folder")
    return out


def checkpoint_sets(loras: list[tuple[Path, float]]) -> list[tuple[str, str, list[tuple[Path, float]]]]:
    """`generate --checkpoints`: each checkpoint of the one run given, oldest first, then its final LoRA when that is
    not the last checkpoint's, as (row label, file-name tag, LoRAs) at the run's scale."""
    from dreamlora.checkpoint import LORA_DIR, list_checkpoints, read_run_info
    from dreamlora.lora import LORA_FILE

    if len(loras) != 1 or _run_of(Path(loras[0][0])) != Path(loras[0][0]):
        raise ConfigError("--checkpoints compares the checkpoints of one run: pass one --lora RUN_FOLDER (e.g. runs/sks-dog)")
    run, scale = Path(loras[0][0]), loras[0][1]
    found = list_checkpoints(run)
    if not found:
        raise ConfigError(f"run '{run}' has no checkpoints to compare; train with --checkpoint-every N (or --checkpoint-every-epochs N)")
    sets = [(f"step {step}", f"step-{step:06d}", [(folder / LORA_DIR / LORA_FILE, scale)]) for step, folder in found]
    final = run / LORA_DIR / LORA_FILE
    if final.is_file() and int(read_run_info(run).get("steps", -1)) != found[-1][0]:
        sets.append(("final", "final", [(final, scale)]))
    return sets


def generate(
    components: Components,
    prompts: str | list[PromptSpec],
    defaults: PromptSpec,
    out_dir: Path,
    loras: list[tuple[Path, float]],
    num_images: int,
    compare: bool = False,
    checkpoints: bool = False,
    emphasis: bool = True,
    batch_size: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> GenerateResult:
    """Save `num_images` images of each prompt (a `PromptSpec` sets what it sets: negative prompt, size, first seed,
    guidance, steps, sampler; `defaults`, every one of them, the rest), `images.json` (each file's prompt and settings)
    and a grid with a row per prompt; with `compare`, a base-model row above each prompt's LoRA rows at the same seeds;
    with `checkpoints`, a row for each checkpoint of the run (`checkpoint_sets`). Files are `seed-S.png`, after the
    prompt's number `NN-` when there are several and the checkpoint (`step-000200-`, `final-`) with `checkpoints`.
    `emphasis`: read A1111's `(word:1.2)` weights; `batch_size` images per pipeline call (0: automatic, as `prior`
    batches); `on_progress(done, total)`."""
    from dreamlora.prior import auto_batch_size

    if compare and not loras:
        raise ConfigError("--compare needs at least one --lora to compare with the base model")
    sets = checkpoint_sets(loras) if checkpoints else [("LoRA", "", loras)]
    specs = [PromptSpec(prompts)] if isinstance(prompts, str) else list(prompts)
    pipeline = build_pipeline(components, defaults.scheduler or "dpm++")
    progress = {"done": 0, "total": num_images * len(specs) * (len(sets) + (1 if compare else 0))}

    def counted(drawn: int) -> None:
        progress["done"] += drawn
        if on_progress:
            on_progress(progress["done"], progress["total"])

    counted(0)
    records: list[dict[str, Any]] = []
    rows: dict[int, list[tuple[str, list[Image.Image]]]] = {number: [] for number in range(1, len(specs) + 1)}
    for index, (set_label, set_tag, set_loras) in enumerate(sets):
        if index:
            pipeline.unload_lora_weights()
        load_loras(pipeline, set_loras)  # a LoRA that does not load fails before any of its images is drawn
        lora_prompt = install_embeddings(components, set_loras, replace=index > 0)  # base images read the prompt as written
        for number, spec in enumerate(specs, 1):
            full = spec.filled(defaults)
            batch = batch_size or auto_batch_size(pipeline.device, max(full.width, full.height))
            draw = functools.partial(draw_prompt, pipeline, spec, defaults, list(range(defaults.seed, defaults.seed + num_images)), batch, counted)
            if compare and index == 0:
                pipeline.disable_lora()
                try:
                    rows[number].append(("base", draw(None, emphasis)[0]))
                finally:
                    pipeline.enable_lora()
            images, seeds = draw(lora_prompt, emphasis)
            rows[number].append((set_label, images))
            prefix = [f"{number:02d}"] * (len(specs) > 1) + [set_tag] * bool(set_tag)
            settings = {k: v for k, v in dataclasses.asdict(full).items() if k != "seed"} | ({"lora": [str(p) for p, _ in set_loras]} if checkpoints else {})
            out_dir.mkdir(parents=True, exist_ok=True)  # not before: a LoRA that does not load leaves no empty folder
            for s, image in zip(seeds, images):
                name = "-".join([*prefix, f"seed-{s}"]) + ".png"
                image.save(out_dir / name)
                records.append({"file": name, **settings, "seed": s})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "images.json").write_text(json.dumps({"loras": [[str(p), scale] for p, scale in loras], "images": records}, indent=2), encoding="utf-8")
    grid_path = out_dir / "grid.png"
    _labelled_grid(specs, rows, labelled=compare or len(specs) > 1 or len(sets) > 1).save(grid_path)
    return GenerateResult([out_dir / r["file"] for r in records], grid_path)


def _labelled_grid(specs: list[PromptSpec], rows: dict[int, list[tuple[str, list[Image.Image]]]], labelled: bool) -> Image.Image:
    """Each prompt's rows (base, LoRA or checkpoints) in prompt order, labelled with the row and, for several prompts, the prompt."""
    grid_rows, labels = [], []
    for number, spec in enumerate(specs, 1):
        short = spec.prompt if len(spec.prompt) <= 60 else spec.prompt[:57] + "..."
        for row_label, images in rows[number]:
            grid_rows.append(images)
            labels.append(f"{row_label}: {short}" if len(specs) > 1 else row_label)
    return make_grid(upscale_small(grid_rows), labels if labelled else None)


def plot_metrics(metrics_path: Path, out: Path) -> Path | None:
    """Loss (instance and prior terms), learning rate per group and, when sampled, drift against steps, as a PNG."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drift_keys = [(k, label) for k, label in DRIFT_CURVES if any(k in r for r in records)]
    validation_keys = [(k, label, colour) for k, label, colour in VALIDATION_CURVES if any(k in r for r in records)]
    panels = 2 + bool(drift_keys) + bool(validation_keys)
    fig, axes = plt.subplots(panels, 1, figsize=(7, 3 * panels), sharex=True)
    ax_loss, ax_lr = axes[0], axes[1]
    steps = [r["step"] for r in records]
    for key, label in (("loss", "total"), ("instance_loss", "instance"), ("prior_loss", "prior")):
        ax_loss.plot(steps, [r.get(key, float("nan")) for r in records], label=label)
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_lr.plot(steps, [r["lr"] for r in records], color="tab:green", label="UNet")
    if any("lr_text_encoder" in r for r in records):
        ax_lr.plot(steps, [r.get("lr_text_encoder", float("nan")) for r in records], color="tab:olive", linestyle="--", label="text encoder")
    if any("lr_embeddings" in r for r in records):
        ax_lr.plot(steps, [r.get("lr_embeddings", float("nan")) for r in records], color="tab:purple", linestyle=":", label="embeddings")
    if any("lr_text_encoder" in r or "lr_embeddings" in r for r in records):
        ax_lr.legend()
    ax_lr.set_ylabel("learning rate")
    if drift_keys:
        ax_drift = axes[2]
        for key, label in drift_keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            ax_drift.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax_drift.set_ylabel("image distance")
        ax_drift.legend()
    if validation_keys:
        ax_val = axes[2 + bool(drift_keys)]
        for key, label, colour in validation_keys:
            points = [(r["step"], r[key], r.get(f"{key}_base")) for r in records if key in r]
            ax_val.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colour, label=label)
            if points[-1][2] is not None:  # the base model's loss on the same images, timesteps and noise
                ax_val.axhline(points[-1][2], color=colour, linestyle="--", linewidth=1, label=f"{label.split(' (')[0]}: base model")
        ax_val.set_ylabel("loss (fixed noise)")
        ax_val.legend(fontsize="small")
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


VALIDATION_CURVES = (
    ("val_class_loss", "held-out class images (above base = class drifts)", "tab:red"),
    ("fit_instance_loss", "photos (fit)", "tab:blue"),
)
DRIFT_CURVES = (
    ("class_drift", "class drift (vs base, lower = class kept)"),
    ("class_palette_drift", "class palette drift (colours vs base)"),
    ("instance_distance", "instance distance (vs photos, lower = subject learned)"),
)
