"""Command line: options to config, one library call per command, results rendered with rich."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

app = typer.Typer(
    name="dreamlora",
    help="DreamBooth + LoRA for Stable Diffusion: `prior`, `dataset`, `train`, `export`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

Debug = Annotated[bool, typer.Option("--debug", help="Show full tracebacks and debug logs.")]
ConfigPath = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config file; flags override it.")]
SetOption = Annotated[Optional[list[str]], typer.Option("--set", help="Override any config key: section.key=value (repeatable).")]
Model = Annotated[Optional[str], typer.Option("--model", help="Hub id, local diffusers folder (SD 1.x/2.x or SDXL), `tiny`, `tiny-sdxl` or `toy` (default: $DREAMLORA_MODEL or SD 1.5).")]
Vae = Annotated[Optional[str], typer.Option("--vae", help="Replacement VAE folder or hub id (SDXL in fp16: madebyollin/sdxl-vae-fp16-fix).")]
Variant = Annotated[Optional[str], typer.Option("--variant", help="Read the model's weights files of this variant, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors): half the download of a hub model (diffusers' --variant).")]
Revision = Annotated[Optional[str], typer.Option("--revision", help="A hub model's branch, tag or commit to read (diffusers' --revision; hub ids only).")]
Precision = Annotated[Optional[str], typer.Option("--precision", help="auto|fp16|bf16|fp32")]
ClipSkip = Annotated[Optional[int], typer.Option("--clip-skip", help="Read prompts from the text encoder's Nth layer from the end, as A1111 and kohya count (2 for most anime SD 1.5 models; default 1).")]
PredictionType = Annotated[Optional[str], typer.Option("--prediction-type", help="epsilon|v_prediction: what the UNet predicts, for v-prediction models whose files do not say so (kohya's --v_parameterization; default auto: the model's own config or v_pred marker).")]
BaseWeights = Annotated[Optional[list[str]], typer.Option("--base-weights", help="LoRA (run folder or file, PATH:SCALE for a strength) fused into the base model first, e.g. a style to train on top of (kohya's --base_weights; repeatable).")]
LoraFormat = Annotated[str, typer.Option("--to", help="a1111|diffusers")]
LoraDtype = Annotated[str, typer.Option("--dtype", help="fp16|bf16|fp32")]
SvdMethod = Annotated[str, typer.Option("--method", help="fixed (default), or per module from its singular values: sv_ratio, sv_fro, sv_cumulative (kohya's dynamic methods).")]
SvdParam = Annotated[Optional[float], typer.Option("--param", help="sv_ratio: keep values within this factor of the largest (e.g. 10); sv_fro/sv_cumulative: the share to keep (e.g. 0.95).")]
PushToHub = Annotated[Optional[str], typer.Option("--push-to-hub", metavar="OWNER/NAME", help="Then upload the export (with its model card) to this Hugging Face repo, created if missing (needs `hf auth login` or HF_TOKEN).")]
Private = Annotated[bool, typer.Option("--private", help="--push-to-hub: create the repo private.")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Load .bin/.ckpt/.pt model weights (pickle can run code: only for files you trust).")]


def _setup_logging(debug: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s", handlers=[RichHandler(console=console, show_path=debug, show_time=False)], force=True)
    for noisy in ("matplotlib", "PIL", "urllib3", "filelock", "httpx", "httpcore", "huggingface_hub", "accelerate", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not debug:
        import warnings

        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            import diffusers.utils.logging as dlog
            import transformers.utils.logging as tlog

            tlog.set_verbosity_error()
            tlog.disable_progress_bar()
            dlog.set_verbosity_error()
            dlog.disable_progress_bar()
        except ImportError:
            pass


class _Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a job scheduler's stop) turned into an exception, so it ends like Ctrl-C: cleanly, with a line."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


PRIOR_KEPT = "the class images written so far are kept; run the same command again to finish the set"


def _run(debug: bool, action: Callable[[], Any], interrupted: str = "") -> Any:
    """Run a command body; user errors become one red panel and exit 2, runtime failures exit 1.

    Ctrl-C and SIGTERM end with one line (and `interrupted`, what is kept and how to go on), exit 130 / 143. Training
    installs its own handlers for its steps (a checkpoint, then a clean stop), and restores these after.
    """
    import signal
    import threading

    from dreamlora.errors import DreamloraError

    _setup_logging(debug)
    installed = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if installed:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return action()
    except DreamloraError as error:
        if debug:
            traceback.print_exc()
        console.print(Panel(Text(str(error)), title=f"[bold]{type(error).__name__}", border_style="red"))  # Text: no markup, `[bnb]` stays
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt as error:
        terminated = isinstance(error, _Terminated)
        console.print(f"[yellow]{'stopped by SIGTERM' if terminated else 'interrupted'}[/]" + (f": {interrupted}" if interrupted else ""))
        raise typer.Exit(143 if terminated else 130) from None
    except OSError as error:
        if not _is_path_error(error):
            raise _unexpected(error, debug) from None
        if debug:
            traceback.print_exc()
        where = f"'{error.filename}'" + (f" -> '{error.filename2}'" if error.filename2 else "")
        message = f"{where}: {error.strerror or error}. Check that the path exists and is writable (or pass another one), and that the disk has room."
        console.print(Panel(Text(message), title="[bold]file system", border_style="red"))
        raise typer.Exit(2) from None
    except Exception as error:  # noqa: BLE001 - the last line of defence: no traceback without --debug
        raise _unexpected(error, debug) from None
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


PATH_ERRNOS = {"EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "ENOENT", "ENOTDIR", "EISDIR", "EEXIST", "ENAMETOOLONG"}


def _is_path_error(error: OSError) -> bool:
    """A file-system refusal about a path the user chose or owns (permissions, read-only, full, missing folder)."""
    import errno

    return bool(error.filename) and error.errno in {getattr(errno, name) for name in PATH_ERRNOS if hasattr(errno, name)}


def _unexpected(error: Exception, debug: bool) -> typer.Exit:
    """The last line of defence: one panel (out of memory with its levers, else the error), no traceback without --debug."""
    if _is_oom(error):
        message = _oom_message(error)
    else:
        message = f"{type(error).__name__}: {error}\nRun again with --debug to see the traceback, and report it if it looks like a bug."
    if debug:
        traceback.print_exc()
    console.print(Panel(message, title="[bold]error", border_style="red"))
    return typer.Exit(1)


def _is_oom(error: Exception) -> bool:
    return type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower()


def _oom_message(error: Exception) -> str:
    peak = ""
    try:
        import torch

        if torch.cuda.is_available():
            peak = f" (peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB of {torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB)"
    except Exception:  # noqa: BLE001
        pass
    return (
        f"the GPU ran out of memory{peak}. Levers: --batch-size 1, a lower --resolution, keep gradient checkpointing on "
        "(drop --no-gradient-checkpointing), a smaller --rank, --no-text-encoder, --precision bf16/fp16. "
        "Checkpoints already written are kept; continue with --resume."
    )


def _overrides(set_items: list[str] | None, flags: dict[str, Any]) -> dict[str, Any]:
    from dreamlora.config import parse_set_options

    overrides: dict[str, Any] = parse_set_options(set_items or [])
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return overrides


def _progress() -> Any:
    """Description, bar, step count, rate, free text (loss, lr), elapsed and ETA on one line. Only the free text gives
    way in a narrow terminal (80 columns in CI logs): rich would otherwise shorten the step count to "90/20…"."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Column

    class InfoColumn(TextColumn):
        def render(self, task: Any) -> Any:
            text = super().render(task)
            text.no_wrap, text.overflow = True, "ellipsis"
            return text

    def whole() -> Column:
        return Column(no_wrap=True)

    return Progress(
        TextColumn("[bold]{task.description}", table_column=whole()),
        BarColumn(bar_width=16, table_column=whole()),
        MofNCompleteColumn(table_column=whole()),
        TextColumn("{task.fields[rate]}", table_column=whole()),
        InfoColumn("{task.fields[info]}", table_column=Column(max_width=max(10, console.width - 65))),
        TimeElapsedColumn(table_column=whole()),
        TextColumn("ETA", table_column=whole()),
        TimeRemainingColumn(table_column=whole()),
        console=console,
        transient=False,
        disable=not _is_main_process(),  # under `accelerate launch`, one bar: the main process's
    )


def _is_main_process() -> bool:
    """False in the other processes `accelerate launch` starts: only the main process reports."""
    return os.environ.get("RANK", "0") == "0"


def _summary(title: str, rows: list[tuple[str, Any]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, str(value))
    out.print(table)


# --- prior ------------------------------------------------------------------------------------


def _prior_with_progress(prior_cfg: Any, model_cfg: Any, resolution: int) -> Any:
    from dreamlora.prior import run_prior

    if not _is_main_process():
        return run_prior(prior_cfg, model_cfg, resolution)  # under `accelerate launch`, the main process reports
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    # Under `accelerate launch` each process draws its share of the missing images; the bar counts the main process's.
    label = f"class images, process 1/{processes}" if processes > 1 else "class images"
    with _progress() as progress:
        return run_prior(prior_cfg, model_cfg, resolution, on_progress=_image_counter(progress, label))


def _image_counter(progress: Any, description: str) -> Callable[[int, int], None]:
    """An `on_progress(done, total)` for image generation: the bar appears at the first call (once drawing starts, not
    before a settings or LoRA error), and the rate counts from `done == 0` (drawing, not model loading)."""
    import time

    tasks: list[Any] = []
    started = [time.perf_counter()]

    def on_progress(done: int, total: int) -> None:
        if not tasks:
            tasks.append(progress.add_task(description, total=total, rate="", info=""))
        if done == 0:
            started[0] = time.perf_counter()
        elapsed = time.perf_counter() - started[0]
        progress.update(tasks[0], completed=done, total=total, rate=f"{done / elapsed:.2f} img/s" if done and elapsed > 0 else "")

    return on_progress


@app.command()
def prior(
    class_name: Annotated[Optional[str], typer.Option("--class", help="The class word, e.g. dog.")] = None,
    num_images: Annotated[Optional[int], typer.Option("--num-images", "-n", help="How many class images (default 200).")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Prompt (default 'a photo of <class>').")] = None,
    negative_prompt: Annotated[Optional[str], typer.Option()] = None,
    resolution: Annotated[Optional[int], typer.Option(help="Image size (default: the model's, 512 for SD 1.5).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps (default 25, DPM-Solver++).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Classifier-free guidance (default: the model's, 7.5 SD 1.x, 5.0 SDXL).")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="dpm++ (default)|pndm|ddim|euler|euler_a|heun|dpm2|dpm2_a|unipc")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per batch (default: automatic).")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    out_dir: Annotated[Optional[str], typer.Option("--out", help="Folder (default priors/<class>).")] = None,
    model: Model = None,
    vae: Vae = None,
    variant: Variant = None,
    revision: Revision = None,
    precision: Precision = None,
    clip_skip: ClipSkip = None,
    prediction_type: PredictionType = None,
    base_weights: BaseWeights = None,
    allow_pickle: AllowPickle = False,
    config: ConfigPath = None,
    set_: SetOption = None,
    debug: Debug = False,
) -> None:
    """Generate class-prior images with the base model (topping up an existing set)."""

    def action() -> None:
        from dreamlora.config import load_config

        cfg = load_config(
            config,
            _overrides(set_, {
                "prior.class_name": class_name, "prior.num_images": num_images, "prior.prompt": prompt,
                "prior.negative_prompt": negative_prompt, "prior.steps": steps, "prior.guidance": guidance,
                "prior.scheduler": _sampler_name(scheduler), "prior.batch_size": batch_size, "prior.seed": seed, "prior.out": out_dir,
                "model.name": model, "model.precision": precision, "data.resolution": resolution, "model.vae": vae, "model.variant": variant, "model.revision": revision,
                "model.allow_pickle": True if allow_pickle else None, "model.clip_skip": clip_skip, "model.prediction_type": prediction_type,
                "model.base_weights": tuple(base_weights) if base_weights else None,
            }),
        )
        result = _prior_with_progress(cfg.prior, cfg.model, cfg.data.resolution)
        if not _is_main_process():
            return
        shares = [("processes", f"{len(result.per_process)} ({' + '.join(map(str, result.per_process))} images)")] if len(result.per_process) > 1 else []
        _summary("prior set", [
            ("folder", result.out_dir), ("already there", result.existing), ("generated", result.generated), *shares,
            ("speed", f"{result.images_per_second:.2f} images/s"), ("preview", result.out_dir.parent / f"{result.out_dir.name}-preview.png"),
            *[("regenerated", f"{name}: was {reason}") for name, reason in result.rejected],
            *[("[yellow]still bad[/]", f"{name}: {reason}") for name, reason in result.unresolved],
        ])

    _run(debug, action, PRIOR_KEPT)


# --- dataset ----------------------------------------------------------------------------------


def _steps_or_epochs(steps_key: str, steps: int | None, epochs_key: str, epochs: int | None) -> dict[str, Any]:
    """A count given in steps or in epochs (the run's length, checkpoint and sample cadence): a step count on the
    command line also zeroes the epochs one a config file may set. Both flags together are refused by `_check_not_both`."""
    return {steps_key: steps, epochs_key: epochs if epochs is not None else (0 if steps is not None else None)}


def _length_flags(max_steps: int | None, epochs: int | None) -> dict[str, Any]:
    return _steps_or_epochs("train.max_steps", max_steps, "train.epochs", epochs)


def _every_flags(checkpoint: int | None, checkpoint_epochs: int | None, sample: int | None, sample_epochs: int | None) -> dict[str, Any]:
    return {
        **_steps_or_epochs("train.checkpoint_every", checkpoint, "train.checkpoint_every_epochs", checkpoint_epochs),
        **_steps_or_epochs("train.sample_every", sample, "train.sample_every_epochs", sample_epochs),
    }


def _check_not_both(first_flag: str, first: Any, second_flag: str, second: Any, what: str) -> None:
    """Inside a command's error handling: two flags that set the same thing are refused together."""
    if first is not None and second is not None:
        from dreamlora.errors import ConfigError

        raise ConfigError(f"{first_flag} and {second_flag} both set {what}; pass one")


def _target_flags(targets: str | None, conv_rank: int | None, conv_alpha: float | None) -> dict[str, Any]:
    """--targets PRESET sets both target lists (an unknown preset is refused by `_check_targets`); --conv-rank/--conv-alpha LoCon."""
    from dreamlora.config import TARGET_PRESETS

    unet, text_encoder = TARGET_PRESETS.get(targets or "", (None, None))
    return {"adapter.unet_targets": unet, "adapter.text_encoder_targets": text_encoder, "adapter.conv_rank": conv_rank, "adapter.conv_alpha": conv_alpha}


def _check_targets(targets: str | None) -> None:
    from dreamlora.config import TARGET_PRESETS

    if targets is not None and targets not in TARGET_PRESETS:
        from dreamlora.errors import ConfigError

        raise ConfigError(f"--targets must be one of {', '.join(TARGET_PRESETS)}; got {targets!r}")


def _dataset_flags(no_captions: bool, caption_dropout: Any, repeats: Any, class_ratio: Any, buckets: bool, color_jitter: Any) -> dict[str, Any]:
    return {
        "data.captions": False if no_captions else None, "data.caption_dropout": caption_dropout, "data.repeats": repeats,
        "data.class_ratio": class_ratio, "data.buckets": True if buckets else None, "data.color_jitter": color_jitter,
    }


@app.command()
def dataset(
    instance: Annotated[Optional[str], typer.Argument(help="Folder of photos of the subject (or --instance, as for train).")] = None,
    instance_option: Annotated[Optional[str], typer.Option("--instance", help="The same folder, named as `train` takes it.")] = None,
    class_dir: Annotated[Optional[str], typer.Option(help="Folder of class images to check too (e.g. priors/dog).")] = None,
    token: Annotated[Optional[str], typer.Option(help="Rare identifier for the subject (default sks).")] = None,
    class_name: Annotated[Optional[str], typer.Option("--class", help="Class word, for the default instance prompt.")] = None,
    instance_prompt: Annotated[Optional[str], typer.Option(help="As train's (default 'a photo of <token> <class>'); checked for the token.")] = None,
    class_prompt: Annotated[Optional[str], typer.Option(help="As train's (default: the prior set's prompt); checked for the token.")] = None,
    resolution: Annotated[Optional[int], typer.Option(help="Training size (default: the model's).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Instance images per step.")] = None,
    gradient_accumulation: Annotated[Optional[int], typer.Option()] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps, to report epochs.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Passes over the photos, to report steps (as train --epochs).")] = None,
    repeats: Annotated[Optional[int], typer.Option(help="Times each instance image appears per epoch.")] = None,
    class_ratio: Annotated[Optional[float], typer.Option(help="Class images per instance image in a batch.")] = None,
    buckets: Annotated[bool, typer.Option("--buckets", help="Aspect-ratio buckets instead of square crops.")] = False,
    random_crop: Annotated[bool, typer.Option("--random-crop", help="Random instead of centre crops.")] = False,
    color_jitter: Annotated[Optional[float], typer.Option(help="Colour jitter strength.")] = None,
    no_captions: Annotated[bool, typer.Option("--no-captions", help="Ignore photo.txt caption files.")] = False,
    caption_dropout: Annotated[Optional[float], typer.Option(help="Probability of the plain instance prompt.")] = None,
    weighted_captions: Annotated[bool, typer.Option("--weighted-captions", help="Captions read with A1111 emphasis, as train --weighted-captions.")] = False,
    masked_loss: Annotated[bool, typer.Option("--masked-loss", help="Report the photos' alpha-channel masks, as train --masked-loss uses them.")] = False,
    mask_dir: Annotated[Optional[str], typer.Option("--mask-dir", help="Check the masks in this folder, as train --mask-dir uses them.")] = None,
    sheet: Annotated[Optional[Path], typer.Option(help="Contact sheet PNG (default <folder>-dataset.png beside the folder).")] = None,
    model: Model = None,
    revision: Revision = None,
    allow_pickle: AllowPickle = False,
    config: ConfigPath = None,
    set_: SetOption = None,
    debug: Debug = False,
) -> None:
    """Check instance (and class) images as training will see them; write a contact sheet."""

    def action() -> None:
        from dreamlora.config import load_config, replace
        from dreamlora.dataset_report import build_dataset_report, model_geometry
        from dreamlora.errors import ConfigError

        _check_not_both("--max-steps", max_steps, "--epochs", epochs, "the run's length")
        if instance and instance_option and Path(instance) != Path(instance_option):
            raise ConfigError(f"two instance folders given ('{instance}' and --instance '{instance_option}'); pass one")
        cfg = load_config(config, _overrides(set_, {
            "data.instance_dir": instance or instance_option, "data.class_dir": class_dir, "data.token": token, "data.class_name": class_name,
            "data.instance_prompt": instance_prompt, "data.class_prompt": class_prompt, "data.resolution": resolution, "train.batch_size": batch_size, "train.gradient_accumulation": gradient_accumulation,
            **_length_flags(max_steps, epochs), "data.center_crop": False if random_crop else None, "model.name": model,
            "model.revision": revision, "model.allow_pickle": True if allow_pickle else None,
            **_dataset_flags(no_captions, caption_dropout, repeats, class_ratio, buckets, color_jitter),
            "data.masked_loss": True if masked_loss or mask_dir else None, "data.mask_dir": mask_dir,
            "data.weighted_captions": True if weighted_captions else None,
        }))
        from dreamlora.prior import MANIFEST, read_prior_set, safe_name

        if not cfg.data.class_dir:  # the class images `train` would use: priors/CLASS, or the only prior set
            from dreamlora.train import only_prior_set

            if cfg.data.class_name:
                found: Path | None = Path("priors") / safe_name(cfg.data.class_name)
                found = found if (found / MANIFEST).is_file() else None
            else:
                found = only_prior_set()
            if found is not None:
                console.print(f"checking the prior set in [bold]{found}[/] too, as `train` would use it")
                cfg = replace(cfg, data=replace(cfg.data, class_dir=str(found)))
        if cfg.data.class_dir and not cfg.data.class_prompt and (Path(cfg.data.class_dir) / MANIFEST).is_file():
            cfg = replace(cfg, data=replace(cfg.data, class_prompt=read_prior_set(Path(cfg.data.class_dir))["prompt"]))  # as train reads it
        native, factor = model_geometry(cfg.model.name, cfg.model.single_file_config, cfg.model.revision, cfg.model.allow_pickle)
        if not cfg.data.resolution:
            cfg = replace(cfg, data=replace(cfg.data, resolution=native))
        if cfg.data.instance_dir and Path(cfg.data.instance_dir).is_dir():  # else the report names the problem
            from dreamlora.train import resolve_epochs

            cfg = resolve_epochs(cfg)
        report = build_dataset_report(cfg, factor, sheet)
        _render_dataset(report)
        report.raise_if_fatal()

    _run(debug, action)


def _size_range(sizes: list[tuple[int, int]]) -> str:
    if not sizes:
        return "-"
    areas = sorted(sizes, key=lambda s: s[0] * s[1])
    return f"{areas[0][0]}x{areas[0][1]} .. {areas[-1][0]}x{areas[-1][1]}"


def _render_dataset(report: Any) -> None:
    for folder in (report.instance, report.klass):
        if folder is None:
            continue
        fixed = [e for e in folder.images if e.fixes]
        rows: list[tuple[str, Any]] = [
            ("folder", folder.folder), ("images", len(folder.images)),
            ("formats", ", ".join(f"{k} {v}" for k, v in sorted(folder.formats.items())) or "-"),
            ("sizes", _size_range([e.size for e in folder.images])),
            ("aspect", ", ".join(f"{k} {v}" for k, v in sorted(folder.orientations.items())) or "-"),
            ("fixes applied", len(fixed)),
            *[("  " + e.name, "; ".join(e.fixes)) for e in fixed],
            *[("[yellow]skipped[/]", note) for note in folder.skipped],
            *[("[red]unreadable[/]", note) for note in folder.unreadable],
            *[("[yellow]too small[/]", f"{note}, under half of {report.resolution}") for note in folder.too_small],
            *[("[yellow]near-duplicates[/]", f"{a} ~ {b} (dHash distance {d})") for a, b, d in folder.near_duplicates],
            *[("[yellow]bad image[/]", f"{name}: {problem}") for name, problem in folder.problems],
        ]
        if folder.role == "instance":
            rows += [("captions found", folder.captions), *[("[yellow]empty caption[/]", n) for n in folder.empty_captions]]
            rows += [("training sizes", ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(report.bucket_sizes.items())))]
        else:
            rows += [("[yellow]instance in class set[/]", f"{a} ~ {b} (dHash distance {d})") for a, b, d in report.in_class_set]
        _summary(f"{folder.role} images", rows)
    table = Table(title="instance images as trained", title_justify="left")
    for column in ("file", "format", "stored", "upright", "trained at", "prompt"):
        table.add_column(column)
    for e in report.instance.images:
        table.add_row(e.name, e.format, f"{e.file_size[0]}x{e.file_size[1]}", f"{e.size[0]}x{e.size[1]}", f"{e.train_size[0]}x{e.train_size[1]}", e.prompt or "(instance prompt)")
    out.print(table)
    _summary("schedule", [
        ("steps per epoch", report.steps_per_epoch), ("max steps", round(report.epochs * report.steps_per_epoch)), ("epochs at max_steps", f"{report.epochs:.1f}"),
        ("class images per epoch", report.class_per_epoch), ("contact sheet", report.sheet or "-"),
        *[("note", note) for note in report.notes],
    ])


# --- train ------------------------------------------------------------------------------------


@app.command()
def train(
    instance: Annotated[Optional[str], typer.Option("--instance", "-i", help="Folder of 3-20 photos of the subject.")] = None,
    token: Annotated[Optional[str], typer.Option(help="Rare identifier for the subject (default sks).")] = None,
    class_name: Annotated[Optional[str], typer.Option("--class", help="Class word; generates priors/<class> if missing.")] = None,
    class_dir: Annotated[Optional[str], typer.Option(help="Folder of class images (default: the prior set).")] = None,
    instance_prompt: Annotated[Optional[str], typer.Option(help="Default 'a photo of <token> <class>'.")] = None,
    class_prompt: Annotated[Optional[str], typer.Option(help="Default: the prior set's prompt.")] = None,
    prior_weight: Annotated[Optional[float], typer.Option(help="Weight of the class (prior) loss (default 1.0).")] = None,
    num_class_images: Annotated[Optional[int], typer.Option(help="Prior set size when one is generated (default 200).")] = None,
    rank: Annotated[Optional[int], typer.Option(help="LoRA rank (default 4).")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha (default = rank).")] = None,
    targets: Annotated[Optional[str], typer.Option(help="attention (default: UNet and text-encoder attention, as diffusers' script) or all (also the transformers' feed-forward and projections and the text encoder's MLPs, as kohya's LoRA).")] = None,
    conv_rank: Annotated[Optional[int], typer.Option(help="Also train the UNet's ResNet and resampling blocks, 3x3 convolutions at this rank (kohya's conv_dim, LoCon; default 0: off).")] = None,
    conv_alpha: Annotated[Optional[float], typer.Option(help="Alpha of the 3x3-convolution LoRAs (default = --conv-rank).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="UNet LoRA learning rate (default 1e-4).")] = None,
    text_encoder_lr: Annotated[Optional[float], typer.Option(help="Text-encoder LoRA learning rate (default = --lr).")] = None,
    no_text_encoder: Annotated[bool, typer.Option("--no-text-encoder", help="Train the UNet LoRA alone.")] = False,
    no_gradient_checkpointing: Annotated[bool, typer.Option("--no-gradient-checkpointing", help="Faster, more memory.")] = False,
    attention: Annotated[Optional[str], typer.Option(help="auto|sdpa|xformers")] = None,
    precision: Precision = None,
    lr_scheduler: Annotated[Optional[str], typer.Option(help="constant|cosine|linear|cosine_with_restarts|polynomial (constant_with_warmup = constant, which warms up too)")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option()] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (default 800).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Train for N passes over the photos x --repeats instead of --max-steps.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Instance images per step; as many class images join.")] = None,
    gradient_accumulation: Annotated[Optional[int], typer.Option()] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    resolution: Annotated[Optional[int], typer.Option(help="Training size (default: the model's).")] = None,
    random_crop: Annotated[bool, typer.Option("--random-crop", help="Random instead of centre crops.")] = False,
    flip: Annotated[bool, typer.Option("--flip", help="Random horizontal flips.")] = False,
    no_captions: Annotated[bool, typer.Option("--no-captions", help="Ignore photo.txt caption files.")] = False,
    caption_dropout: Annotated[Optional[float], typer.Option(help="Probability of the plain instance prompt for a captioned image.")] = None,
    weighted_captions: Annotated[bool, typer.Option("--weighted-captions", help="Read A1111 emphasis in captions and prompts, '(red collar:1.2)', as kohya's --weighted_captions (default: brackets are text).")] = False,
    max_token_length: Annotated[Optional[int], typer.Option(help="Read prompts (long captions) up to 150 or 225 tokens, in windows of 75 joined as kohya's --max_token_length (default 75).")] = None,
    masked_loss: Annotated[bool, typer.Option("--masked-loss", help="Weight the loss by each photo's alpha channel: transparent background is not learned (kohya's --masked_loss --alpha_mask).")] = False,
    mask_dir: Annotated[Optional[str], typer.Option("--mask-dir", help="Masked loss with masks from this folder instead: a greyscale image of each photo's name, white learned, black ignored (kohya's conditioning_data_dir).")] = None,
    shuffle_caption: Annotated[bool, typer.Option("--shuffle-caption", help="Shuffle each caption's comma-separated tags every step (kohya's --shuffle_caption).")] = False,
    keep_tokens: Annotated[Optional[int], typer.Option(help="With --shuffle-caption/--caption-tag-dropout: the first N tags stay in place (kohya's --keep_tokens; default 0).")] = None,
    caption_tag_dropout: Annotated[Optional[float], typer.Option(help="Drop each tag with this probability every step, e.g. 0.1 (kohya's --caption_tag_dropout_rate).")] = None,
    repeats: Annotated[Optional[int], typer.Option(help="Times each instance image appears per epoch (default 1).")] = None,
    class_ratio: Annotated[Optional[float], typer.Option(help="Class images per instance image in a batch (default 1).")] = None,
    buckets: Annotated[bool, typer.Option("--buckets", help="Aspect-ratio buckets: non-square photos train whole.")] = False,
    color_jitter: Annotated[Optional[float], typer.Option(help="Colour jitter strength, e.g. 0.1 (default 0: off).")] = None,
    no_latent_cache: Annotated[bool, typer.Option("--no-latent-cache", help="Encode latents in memory only, not cached on disk.")] = False,
    latent_cache: Annotated[Optional[str], typer.Option(help="Latent cache folder (default $DREAMLORA_CACHE/latents).")] = None,
    out_dir: Annotated[Optional[str], typer.Option("--out", help="Run folder (default runs/<token>-<class>); never overwritten.")] = None,
    compile_: Annotated[Optional[str], typer.Option("--compile", help="CUDA graph of the whole step: auto (default; single GPU, bf16/fp32), on, off.")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Save a resumable checkpoint every N steps.")] = None,
    checkpoint_every_epochs: Annotated[Optional[int], typer.Option(help="Save a resumable checkpoint every N epochs (kohya's --save_every_n_epochs).")] = None,
    keep_checkpoints: Annotated[Optional[int], typer.Option(help="Newest checkpoints to keep (default 2).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out (or the latest run) from its last checkpoint.")] = False,
    resume_from: Annotated[Optional[Path], typer.Option(help="Continue from this checkpoint folder.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Resume even when settings that change the result differ.")] = False,
    sample_every: Annotated[Optional[int], typer.Option(help="Every N steps: sample grid samples/step-N.png and drift figures (0: only at the end).")] = None,
    sample_every_epochs: Annotated[Optional[int], typer.Option(help="Sample grids and drift figures every N epochs instead.")] = None,
    num_samples: Annotated[Optional[int], typer.Option(help="Images per prompt in sample grids (default 4, fixed seeds).")] = None,
    validate_every: Annotated[Optional[int], typer.Option(help="Every N steps: loss at fixed timesteps and noise on class images held out of training (the class drifting shows as it rising above the base model's) and on the photos (a smooth fit curve).")] = None,
    validation_images: Annotated[Optional[int], typer.Option(help="With --validate-every: class images held out of training for it (default 4).")] = None,
    sample_prompt: Annotated[Optional[list[str]], typer.Option("--sample-prompt", help="Another prompt for the sample grids, e.g. 'a photo of sks dog on a beach' (repeatable; may end in kohya's --n --w --h --d --l --s --ss).")] = None,
    sample_scheduler: Annotated[Optional[str], typer.Option("--sample-scheduler", help="The sample grids' sampler: dpm++ (default)|pndm|ddim|euler|euler_a|heun|dpm2|dpm2_a|unipc, or kohya's --sample_sampler names (k_euler_a, ...).")] = None,
    sample_prompts: Annotated[Optional[Path], typer.Option("--sample-prompts", help="Sample-grid prompts from a text file, one per line in kohya's format (its --sample_prompts): 'a photo of sks dog --n blurry --s 30'.")] = None,
    report_to: Annotated[Optional[str], typer.Option(help="Also log to tensorboard|wandb (extra: pip install 'dreamlora\\[tensorboard]').")] = None,
    snr_gamma: Annotated[Optional[float], typer.Option(help="Min-SNR-gamma loss weighting, e.g. 5 (default 0: off).")] = None,
    noise_offset: Annotated[Optional[float], typer.Option(help="Noise offset, e.g. 0.05 (default 0: off).")] = None,
    loss: Annotated[Optional[str], typer.Option(help="l2 (default, MSE), l1, huber or smooth_l1 (scheduled pseudo-Huber: robust to outlier photos, as kohya's --loss_type).")] = None,
    huber_c: Annotated[Optional[float], typer.Option(help="huber/smooth_l1: threshold at the noisiest timestep (default 0.1).")] = None,
    huber_schedule: Annotated[Optional[str], typer.Option(help="huber/smooth_l1: snr (default), exponential or constant.")] = None,
    multires_noise_iterations: Annotated[Optional[int], typer.Option(help="Pyramid (multi-resolution) noise of N scales, e.g. 6 (default 0: off; kohya's --multires_noise_iterations).")] = None,
    multires_noise_discount: Annotated[Optional[float], typer.Option(help="Weight ratio between pyramid scales (default 0.3).")] = None,
    debiased_estimation: Annotated[bool, typer.Option("--debiased-estimation", help="Weight each timestep's loss by 1/sqrt(SNR) (kohya's --debiased_estimation_loss).")] = False,
    zero_terminal_snr: Annotated[bool, typer.Option("--zero-terminal-snr", help="Rescale the training noise schedule so its last timestep is pure noise (kohya's --zero_terminal_snr; best with v-prediction models).")] = False,
    ip_noise_gamma: Annotated[Optional[float], typer.Option(help="Input perturbation: extra noise the UNet sees but need not predict, e.g. 0.1 (default 0: off; kohya's --ip_noise_gamma).")] = None,
    adaptive_noise_scale: Annotated[Optional[float], typer.Option(help="Add this times each image's absolute latent channel mean to --noise-offset, e.g. 0.005 (kohya's --adaptive_noise_scale).")] = None,
    noise_offset_random_strength: Annotated[bool, typer.Option("--noise-offset-random-strength", help="Draw each step's noise offset in [0, --noise-offset) (kohya's --noise_offset_random_strength).")] = False,
    ip_noise_gamma_random_strength: Annotated[bool, typer.Option("--ip-noise-gamma-random-strength", help="Draw each step's input perturbation in [0, --ip-noise-gamma) (kohya's --ip_noise_gamma_random_strength).")] = False,
    min_timestep: Annotated[Optional[int], typer.Option(help="Train on timesteps from this one (default 0).")] = None,
    max_timestep: Annotated[Optional[int], typer.Option(help="Train on timesteps below this one (default: all, 1000 for SD).")] = None,
    init_lora: Annotated[Optional[str], typer.Option(help="Start from this LoRA: a run folder, or a diffusers or kohya/A1111 .safetensors file, at its rank (kohya's --network_weights).")] = None,
    lora_dropout: Annotated[Optional[float], typer.Option(help="Dropout on each LoRA's input, e.g. 0.1 (default 0; PEFT's and diffusers' --lora_dropout).")] = None,
    network_dropout: Annotated[Optional[float], typer.Option(help="Dropout on each LoRA's down-projection output, e.g. 0.1 (default 0; kohya's --network_dropout).")] = None,
    rank_dropout: Annotated[Optional[float], typer.Option(help="Drop whole LoRA rank channels per image with this probability (default 0; kohya's rank_dropout).")] = None,
    module_dropout: Annotated[Optional[float], typer.Option(help="Skip each LoRA module for a step with this probability (default 0; kohya's module_dropout).")] = None,
    scale_weight_norms: Annotated[Optional[float], typer.Option(help="Max-norm: after each step scale down any LoRA whose update norm exceeds this, e.g. 1.0 (default 0: off; kohya's --scale_weight_norms).")] = None,
    loraplus_lr_ratio: Annotated[Optional[float], typer.Option(help="LoRA+: the LoRA up weights learn this many times faster than the down weights, e.g. 16 (default 0: off; kohya's loraplus_lr_ratio).")] = None,
    text_encoder_steps_fraction: Annotated[Optional[float], typer.Option(help="Train the text-encoder LoRA for this fraction of the steps, then freeze it (default 1).")] = None,
    down_lr_weight: Annotated[Optional[str], typer.Option(help="kohya's block weights: 12 comma-separated factors on --lr for the UNet's down blocks, or sine|cosine|linear|reverse_linear|zeros[+N]; 0 = no LoRA there.")] = None,
    mid_lr_weight: Annotated[Optional[float], typer.Option(help="Block weight of the UNet's middle block (default 1).")] = None,
    up_lr_weight: Annotated[Optional[str], typer.Option(help="Block weights of the UNet's 12 up blocks, as --down-lr-weight.")] = None,
    block_lr_zero_threshold: Annotated[Optional[float], typer.Option(help="Block weights at or below this count as 0 (no LoRA there; default 0).")] = None,
    pivotal: Annotated[bool, typer.Option("--pivotal", help="Pivotal tuning: also learn new token embeddings for --token (diffusers' --train_text_encoder_ti); exports carry them.")] = False,
    pivotal_vectors: Annotated[Optional[int], typer.Option(help="--pivotal: embedding vectors (new tokens) the token stands for (default 2).")] = None,
    pivotal_init: Annotated[Optional[str], typer.Option(help="--pivotal: the word the vectors start from (default: the class name).")] = None,
    pivotal_lr: Annotated[Optional[float], typer.Option(help="--pivotal: the embeddings' learning rate (default 5e-4; with Prodigy: --lr).")] = None,
    pivotal_steps_fraction: Annotated[Optional[float], typer.Option(help="--pivotal: train the embeddings for this fraction of the steps, then freeze them (default 0.5, diffusers' --train_text_encoder_ti_frac).")] = None,
    text_encoder_lr_scheduler: Annotated[Optional[str], typer.Option(help="Text-encoder schedule (default: --lr-scheduler).")] = None,
    text_encoder_warmup_steps: Annotated[Optional[int], typer.Option(help="Text-encoder warmup (default: --warmup-steps).")] = None,
    lr_cycles: Annotated[Optional[int], typer.Option(help="cosine_with_restarts: number of cycles (default 1).")] = None,
    lr_power: Annotated[Optional[float], typer.Option(help="polynomial: the decay's power (default 1).")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="adamw|adamw8bit|paged_adamw8bit|prodigy|adafactor|lion|lion8bit|adamw_schedulefree (8-bit and paged need pip install 'dreamlora\\[bnb]', prodigy 'dreamlora\\[prodigy]' and sets --lr 1.0; adafactor: transformers' Adafactor at --lr; lion 'dreamlora\\[lion]' (lion8bit: bnb), --lr 3e-5 unless given; adamw_schedulefree 'dreamlora\\[schedulefree]', constant --lr-scheduler).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="The optimizer's weight decay (default 1e-2; Lion and Adafactor 0; diffusers' --adam_weight_decay). Betas and epsilon: --set train.adam_beta1/adam_beta2/adam_epsilon=V, the text encoders' own decay --set train.text_encoder_weight_decay=V.")] = None,
    scale_lr: Annotated[bool, typer.Option("--scale-lr", help="Multiply the learning rates by batch size x gradient accumulation x processes (diffusers' --scale_lr).")] = False,
    model: Model = None,
    vae: Vae = None,
    variant: Variant = None,
    revision: Revision = None,
    clip_skip: ClipSkip = None,
    prediction_type: PredictionType = None,
    base_weights: BaseWeights = None,
    allow_pickle: AllowPickle = False,
    push_to_hub: Annotated[Optional[str], typer.Option("--push-to-hub", metavar="OWNER/NAME", help="When training ends, export the LoRA in diffusers' format (exports/<run>-diffusers, with its model card) and upload it to this Hugging Face repo, created if missing (diffusers' --push_to_hub; needs `hf auth login` or HF_TOKEN). Checked before training starts.")] = None,
    private: Private = False,
    config: ConfigPath = None,
    set_: SetOption = None,
    debug: Debug = False,
) -> None:
    """Train UNet and text-encoder LoRAs with prior preservation."""

    flags = {
        "data.instance_dir": instance, "data.token": token, "data.class_name": class_name, "data.class_dir": class_dir,
        "data.instance_prompt": instance_prompt, "data.class_prompt": class_prompt, "train.prior_weight": prior_weight,
        "prior.num_images": num_class_images, "adapter.rank": rank, "adapter.alpha": alpha, "train.lr": lr,
        "train.text_encoder_lr": text_encoder_lr, "adapter.train_text_encoder": False if no_text_encoder else None,
        "train.gradient_checkpointing": False if no_gradient_checkpointing else None, "model.attention": attention,
        "model.precision": precision, "train.lr_scheduler": lr_scheduler, "train.warmup_steps": warmup_steps,
        **_length_flags(max_steps, epochs), "train.batch_size": batch_size, "train.gradient_accumulation": gradient_accumulation,
        "train.seed": seed, "data.resolution": resolution, "data.center_crop": False if random_crop else None,
        "data.flip": True if flip else None, "train.out": out_dir, **_every_flags(checkpoint_every, checkpoint_every_epochs, sample_every, sample_every_epochs),
        "train.keep_checkpoints": keep_checkpoints, "model.name": model, "model.vae": vae, "model.variant": variant, "model.revision": revision, "train.compile": compile_,
        "train.validate_every": validate_every, "train.validation_images": validation_images,
        "train.num_samples": num_samples, "train.sample_prompts": tuple(sample_prompt) if sample_prompt else None, "train.sample_scheduler": _sampler_name(sample_scheduler), "train.report_to": report_to,
        "train.snr_gamma": snr_gamma, "train.noise_offset": noise_offset, "train.loss": loss, "train.huber_c": huber_c, "train.huber_schedule": huber_schedule, "train.text_encoder_steps_fraction": text_encoder_steps_fraction,
        "train.text_encoder_lr_scheduler": text_encoder_lr_scheduler, "train.text_encoder_warmup_steps": text_encoder_warmup_steps,
        "train.lr_cycles": lr_cycles, "train.lr_power": lr_power, "train.optimizer": optimizer,
        "train.weight_decay": weight_decay, "train.scale_lr": True if scale_lr else None,
        "model.allow_pickle": True if allow_pickle else None, "model.clip_skip": clip_skip, "model.prediction_type": prediction_type,
        "model.base_weights": tuple(base_weights) if base_weights else None,
        **_dataset_flags(no_captions, caption_dropout, repeats, class_ratio, buckets, color_jitter),
        "data.cache_latents": False if no_latent_cache else None, "data.latent_cache_dir": latent_cache,
        **_target_flags(targets, conv_rank, conv_alpha),
        "train.ip_noise_gamma": ip_noise_gamma, "train.adaptive_noise_scale": adaptive_noise_scale, "train.noise_offset_random_strength": True if noise_offset_random_strength else None,
        "train.ip_noise_gamma_random_strength": True if ip_noise_gamma_random_strength else None, "train.min_timestep": min_timestep, "train.max_timestep": max_timestep,
        "adapter.init_lora": init_lora, "adapter.dropout": lora_dropout, "adapter.network_dropout": network_dropout, "adapter.rank_dropout": rank_dropout, "adapter.module_dropout": module_dropout,
        "train.scale_weight_norms": scale_weight_norms, "train.loraplus_lr_ratio": loraplus_lr_ratio, "train.multires_noise_iterations": multires_noise_iterations,
        "train.multires_noise_discount": multires_noise_discount, "train.debiased_estimation": True if debiased_estimation else None,
        "train.zero_terminal_snr": True if zero_terminal_snr else None,
        "data.max_token_length": max_token_length, "data.weighted_captions": True if weighted_captions else None, "data.masked_loss": True if masked_loss or mask_dir else None, "data.mask_dir": mask_dir, "data.shuffle_caption": True if shuffle_caption else None, "data.keep_tokens": keep_tokens, "data.caption_tag_dropout": caption_tag_dropout,
        "adapter.down_lr_weight": down_lr_weight, "adapter.mid_lr_weight": mid_lr_weight, "adapter.up_lr_weight": up_lr_weight,
        "adapter.block_lr_zero_threshold": block_lr_zero_threshold,
        "adapter.pivotal": True if pivotal else None, "adapter.pivotal_vectors": pivotal_vectors, "adapter.pivotal_init": pivotal_init, "train.pivotal_lr": pivotal_lr,
        "train.pivotal_steps_fraction": pivotal_steps_fraction,
    }

    def action() -> None:
        _check_not_both("--max-steps", max_steps, "--epochs", epochs, "the run's length")
        _check_not_both("--checkpoint-every", checkpoint_every, "--checkpoint-every-epochs", checkpoint_every_epochs, "how often to checkpoint")
        _check_not_both("--sample-every", sample_every, "--sample-every-epochs", sample_every_epochs, "how often to sample")
        _check_targets(targets)
        if sample_prompts is not None:  # the file's lines go into the run's config, so it records them
            flags["train.sample_prompts"] = (*(sample_prompt or ()), *_prompt_file_lines(sample_prompts))
        overrides = _overrides(set_, flags)
        from dreamlora.checkpoint import hub_shaped

        if init_lora and not Path(init_lora).exists() and not hub_shaped(Path(init_lora)):  # OWNER/NAME: a hub LoRA
            from dreamlora.errors import ConfigError

            raise ConfigError(f"--init-lora '{init_lora}' does not exist; pass a run folder, or a diffusers or kohya/A1111 .safetensors LoRA")
        _check_push(push_to_hub, private)  # before a prior set or a step costs anything
        if resume or resume_from:
            result = _resume_training(Path(out_dir) if out_dir else None, resume_from, overrides, force)
        else:
            result = _start_training(config, overrides)
        if push_to_hub and result is not None:
            _push_run(result.run_dir, push_to_hub, private)

    _run(debug, action)


def _check_push(repo: str | None, private: bool) -> None:
    """--push-to-hub can work (repo id, hub on, a token) and --private has a push to apply to: checked before any work."""
    if private and not repo:
        from dreamlora.errors import ConfigError

        raise ConfigError("--private makes the repo --push-to-hub creates private; add --push-to-hub OWNER/NAME or drop --private")
    if repo:
        from dreamlora.hub import check_can_push

        check_can_push(repo)


def _push_run(run_dir: Path, repo: str, private: bool) -> None:
    """`train --push-to-hub`: the finished run exported in diffusers' format (verified, with its model card), then
    uploaded in one commit, as diffusers' script pushes its output folder. A failure leaves the run as it is and says
    how to push it later."""
    from dreamlora.config import ExportConfig
    from dreamlora.errors import DreamloraError
    from dreamlora.export import export_run
    from dreamlora.hub import push_export

    later = f"the trained run is kept at '{run_dir}'; push it later with `dreamlora export {run_dir} --format diffusers --push-to-hub {repo}`"
    try:
        result = export_run(run_dir, ExportConfig(format="diffusers", hub_repo=repo))
    except DreamloraError as error:
        raise type(error)(f"{error}\n{later}") from error
    _render_export(result, "export for the hub")
    url = push_export([result.path], repo, private, f"dreamlora LoRA trained as {Path(run_dir).name}")
    console.print(f"pushed to the hub: [bold]{url}[/]")


def _prompt_file_lines(path: Path) -> list[str]:
    """The prompts of a kohya-style prompt file, each line checked (a bad option is an error naming the line)."""
    from dreamlora.prompts import parse_prompt_line, prompt_lines, warn_ignored

    lines, ignored = prompt_lines(path), set()
    for number, line in lines:
        parse_prompt_line(line, f"prompt file '{path}' line {number}", ignored)
    warn_ignored(ignored, f"prompt file {path}")
    return [line for _, line in lines]


def _resume_training(out_dir: Path | None, resume_from: Path | None, overrides: dict[str, Any], force: bool) -> Any:
    """Continue a run from its last (or the given) checkpoint; settings that change the result need --force."""
    from dreamlora import train as training
    from dreamlora.checkpoint import load_checkpoint_state
    from dreamlora.config import load_config

    run_dir, checkpoint = training.resume_point(out_dir, resume_from)
    saved = load_config(run_dir / "config.toml")
    cfg = load_config(run_dir / "config.toml", overrides)
    if {"train.epochs", "train.checkpoint_every_epochs", "train.sample_every_epochs"} & overrides.keys():
        cfg = training.resolve_epochs(cfg)
    training.check_resume_step(int(load_checkpoint_state(checkpoint)["step"]), cfg.train.max_steps, checkpoint)
    changed = training.changed_keys(saved, cfg)
    if changed and not force:
        from dreamlora.errors import ConfigError

        raise ConfigError("resuming with settings that change the result:\n  " + "\n  ".join(changed) + "\nrerun without them, or add --force")
    console.print(f"resuming [bold]{run_dir}[/] from {checkpoint.name}")
    return _train_with_progress(training, cfg, run_dir=run_dir, resume_from=checkpoint)


def _start_training(config: Path | None, overrides: dict[str, Any]) -> Any:
    """A new run: the config file and flags, the prior set generated first when the class has none yet."""
    from dreamlora import train as training
    from dreamlora.config import LION_DEFAULT_LR, load_config, read_toml

    in_file = read_toml(config).get("train", {}) if config else {}
    in_file = in_file if isinstance(in_file, dict) else {}
    if overrides.get("train.optimizer", in_file.get("optimizer")) == "prodigy" and "train.lr" not in overrides and "lr" not in in_file:
        # Prodigy finds the step size itself; --lr scales it, and the AdamW default (1e-4) would all but stop it.
        overrides["train.lr"] = 1.0
        console.print("Prodigy: --lr 1.0 (it finds the step size itself; --lr scales it)")
    if overrides.get("train.optimizer", in_file.get("optimizer")) in ("lion", "lion8bit") and "train.lr" not in overrides and "lr" not in in_file:
        # Lion steps by the sign of its momentum, so every weight moves by the full rate: 3-10x below AdamW's, as its authors advise.
        overrides["train.lr"] = LION_DEFAULT_LR
        console.print(f"Lion: --lr {LION_DEFAULT_LR:g} (a third of AdamW's default: its steps are sign-sized; --lr to choose another)")
    cfg = load_config(config, overrides)
    if cfg.train.out:  # a new run never writes into an existing folder: said now, not after a prior set and the model load
        from dreamlora.checkpoint import refuse_existing_run

        refuse_existing_run(Path(cfg.train.out))
    if "train.validation_images" in overrides and not cfg.train.validate_every:
        from dreamlora.errors import ConfigError

        raise ConfigError("--validation-images sets how many class images --validate-every holds out; add --validate-every N (e.g. 50) or drop it")
    cfg, needs_prior = training.resolve_data(cfg)
    if needs_prior:
        if _is_main_process():
            console.print(f"no prior set for [bold]{cfg.prior.class_name}[/] yet: generating {cfg.prior.num_images} class images first")
        _prior_with_progress(cfg.prior, cfg.model, cfg.data.resolution)
        cfg, _ = training.resolve_data(cfg)
    return _train_with_progress(training, cfg)


def _train_with_progress(training: Any, cfg: Any, **kwargs: Any) -> Any:
    """Train with a progress bar and the summary; the main process returns the TrainResult, the others None."""
    with _progress() as progress:
        task = progress.add_task("training", total=cfg.train.max_steps, rate="", info="")
        drift, validation = [""], [""]

        def on_log(record: dict[str, Any]) -> None:
            if "instance_distance" in record:
                drift[0] = drift_figures(record)
                # Also a line of its own above the bar: a narrow terminal cuts the bar's text, and the history stays.
                progress.console.print(f"step {record['step']} samples: {drift[0]}", highlight=False)
            if "fit_instance_loss" in record:
                from dreamlora.validation import describe

                validation[0] = describe(record)
                progress.console.print(f"step {record['step']} validation: {validation[0]}", highlight=False)
            progress.update(
                task,
                completed=record["step"],
                rate=f"{record['it_s']:.2f} it/s",
                info=f"loss {record['loss']:.4f} lr {record['lr']:.2e}" + (f" | {drift[0]}" if drift[0] else ""),
            )

        result = training.train(cfg, on_log=on_log, **kwargs)
    if not _is_main_process():
        return None  # under `accelerate launch`, the main process reports (and pushes)
    _summary("training finished", [
        ("run folder", result.run_dir), ("steps", result.steps), ("final loss", f"{result.final_loss:.4f}"),
        ("time", f"{result.seconds:.1f} s"), ("attention", result.attention), ("precision", result.precision),
        ("step", f"CUDA graph (captured in {result.capture_seconds:.1f} s)" if result.cuda_graphs else "eager"),
        ("prior preservation", "yes" if result.with_prior else "no"), *([("validation", validation[0])] if validation[0] else []), ("LoRA", result.lora_path),
        *([("embedding", f"{cfg.data.token} = {cfg.adapter.pivotal_vectors} new tokens, in {result.lora_path.parent / 'embeddings.safetensors'}")] if cfg.adapter.pivotal else []),
        *[("picture", p) for p in result.samples],
    ])
    prompt = cfg.data.resolved_instance_prompt().replace('"', "'")
    console.print(
        f"next: [bold]dreamlora export {result.run_dir} --format a1111[/] (AUTOMATIC1111, ComfyUI, kohya tools), or try it: "
        f"[bold]dreamlora generate --lora {result.run_dir} -p \"{prompt}\" --compare[/]"
    )
    return result


def drift_figures(record: dict[str, Any]) -> str:
    """The drift figures of the latest samples, for the progress line and its own line (both image distances in [0, 1])."""
    text = f"subject dist {record['instance_distance']:.3f}"
    if "class_drift" in record:
        text += f" class drift {record['class_drift']:.3f} palette {record['class_palette_drift']:.3f}"
    return text


# --- export, inspect, convert --------------------------------------------------------------------


@app.command()
def export(
    run_arg: Annotated[Optional[Path], typer.Argument(metavar="RUN", help="Run folder (or --run; default: the latest under runs/).")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="a1111|diffusers|merged")] = "a1111",
    run: Annotated[Optional[Path], typer.Option("--run", help="Run folder (default: the latest under runs/).")] = None,
    step: Annotated[Optional[int], typer.Option(help="Export this checkpoint instead of the final LoRA.")] = None,
    out_path: Annotated[Optional[str], typer.Option("--out", help="Output file or folder (default under exports/).")] = None,
    dtype: Annotated[str, typer.Option(help="fp16|bf16|fp32")] = "fp16",
    scale: Annotated[float, typer.Option(help="merged: LoRA strength fused into the weights.")] = 1.0,
    single_file: Annotated[bool, typer.Option("--single-file", help="merged: one original-layout checkpoint file.")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip loading the file back to check it.")] = False,
    title: Annotated[Optional[str], typer.Option(help="The model spec's title, as Civitai and LoRA browsers show it (a1111; default: the file name; kohya's --metadata_title), or a folder's model card title (diffusers, merged).")] = None,
    author: Annotated[Optional[str], typer.Option(help="modelspec.author (a1111), or in the folder's model card.")] = None,
    description: Annotated[Optional[str], typer.Option(help="modelspec.description (a1111), or in the folder's model card.")] = None,
    license_: Annotated[Optional[str], typer.Option("--license", help="modelspec.license (a1111) or the model card's license, e.g. creativeml-openrail-m.")] = None,
    tags: Annotated[Optional[str], typer.Option(help="modelspec.tags (a1111) or more model-card tags, comma-separated.")] = None,
    push_to_hub: PushToHub = None,
    private: Private = False,
    debug: Debug = False,
) -> None:
    """Export a run's LoRA for A1111/ComfyUI/kohya tools or diffusers."""

    def action() -> None:
        from dreamlora.checkpoint import latest_run
        from dreamlora.config import ExportConfig
        from dreamlora.export import export_run

        from dreamlora.errors import ConfigError

        if run_arg and run and Path(run_arg) != Path(run):
            raise ConfigError(f"two run folders given ('{run_arg}' and --run '{run}'); pass one")
        published = {"title": title, "author": author, "description": description, "license": license_, "tags": tags}
        cfg = ExportConfig(
            format=fmt, dtype=dtype, out=out_path or "", scale=scale, single_file=single_file, verify=not no_verify, hub_repo=push_to_hub or "",
            **{k: v for k, v in published.items() if v is not None},
        )
        _check_push(push_to_hub, private)  # before anything is written
        run_dir = run_arg or run or latest_run()
        result = export_run(run_dir, cfg, step=step)
        _render_export(result)
        if push_to_hub:
            from dreamlora.hub import push_export

            files = [result.path, *([result.embedding] if result.embedding else [])]
            url = push_export(files, push_to_hub, private, f"dreamlora export of {Path(run_dir).name} ({result.format})", result.hub_card)
            console.print(f"pushed to the hub: [bold]{url}[/]")

    _run(debug, action)


def _render_export(result: Any, title: str = "export") -> None:
    rows: list[tuple[str, Any]] = [("file", result.path), ("format", result.format), ("dtype", result.dtype)]
    if getattr(result, "embedding", None) is not None:
        rows.append(("embedding", result.embedding))
    rows += [(f"{group} modules", n) for group, n in result.key_counts.items()]
    report = result.verify
    if report is None:
        rows.append(("verification", "not run (--no-verify)"))
    else:
        rows.append(("verification", f"{report.status} ({report.loader})" if report.loader else report.status))
        for group, diff in report.max_abs_diff.items():
            tolerance, effect = report.tolerance.get(group), report.lora_effect.get(group)
            detail = f"max |diff| {diff:.2e}" + (f" (tolerance {tolerance:.0e})" if tolerance is not None else "") + (f", LoRA effect {effect:.2e}" if effect is not None else "")
            rows.append((f"  {group}", detail))
        rows += [("warning", w) for w in report.warnings]
    rows += [("note", note) for note in result.notes]
    _summary(title, rows)


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="A LoRA file trained elsewhere (kohya/A1111 or diffusers).")],
    dst: Annotated[Path, typer.Argument(help="Output file (a1111) or folder (diffusers).")],
    to: LoraFormat = "a1111",
    model: Annotated[Optional[str], typer.Option("--model", help="Base model to check the names against and verify on (default: $DREAMLORA_MODEL; without either, names are checked against SD 1.x / SDXL 1.0 and the load-back check is skipped).")] = None,
    allow_pickle: AllowPickle = False,
    debug: Debug = False,
) -> None:
    """Convert a LoRA from another trainer, verified against the base model."""

    def action() -> None:
        from dreamlora.export import convert_lora

        base, options = _verify_model(model, [], allow_pickle)
        _render_export(convert_lora(src, dst, to, base, load_options=options))

    _run(debug, action)


@app.command()
def resize(
    src: Annotated[Path, typer.Argument(help="A run folder, or a LoRA file (kohya/A1111 or diffusers).")],
    dst: Annotated[Path, typer.Argument(help="Output file (a1111) or folder (diffusers).")],
    rank: Annotated[int, typer.Option("--rank", help="The new rank (with a dynamic --method: the most any module keeps).")] = 4,
    method: SvdMethod = "fixed",
    param: SvdParam = None,
    to: LoraFormat = "a1111",
    dtype: LoraDtype = "fp16",
    model: Annotated[Optional[str], typer.Option("--model", help="Base model to verify on (default: $DREAMLORA_MODEL, else the run's; without one the load-back check is skipped).")] = None,
    allow_pickle: AllowPickle = False,
    debug: Debug = False,
) -> None:
    """Lower a LoRA's rank by truncated SVD (smaller file, the closest update of that rank), verified."""

    def action() -> None:
        from dreamlora.lora import GROUPS as GROUP_ORDER
        from dreamlora.resize import check_method, kept_summary, rank_span, resize_lora

        check_method(method, param, rank)
        base, options = _verify_model(model, [src], allow_pickle)
        result, resized = resize_lora(src, dst, rank, method, param, to, base, dtype, load_options=options)
        for index, group in enumerate(sorted({r.module.group for r in resized}, key=GROUP_ORDER.index)):
            members = [r for r in resized if r.module.group == group]
            result.notes.insert(index, (
                f"{group}: rank {max(r.old_rank for r in members)} -> {rank_span({r.module.rank for r in members})}, {kept_summary([r.kept_fro for r in members])}"
            ))
        _render_export(result, "resize")

    _run(debug, action)


@app.command()
def merge(
    loras: Annotated[list[str], typer.Argument(help="Two or more run folders or LoRA files (kohya/A1111 or diffusers), each optionally PATH:WEIGHT (default 1; negative subtracts).")],
    out: Annotated[Path, typer.Option("--out", help="Output file (a1111) or folder (diffusers).")],
    rank: Annotated[Optional[int], typer.Option("--rank", help="Cut the merged LoRA to this rank by SVD (default: exact, rank = the sum of the ranks).")] = None,
    method: SvdMethod = "fixed",
    param: SvdParam = None,
    to: LoraFormat = "a1111",
    dtype: LoraDtype = "fp16",
    model: Annotated[Optional[str], typer.Option("--model", help="Base model to verify on (default: $DREAMLORA_MODEL, else the first run's; without one the load-back check is skipped).")] = None,
    allow_pickle: AllowPickle = False,
    debug: Debug = False,
) -> None:
    """Merge several LoRAs into one: their weighted sum, exact or cut to --rank (kohya's merge_lora/svd_merge_lora), verified."""

    def action() -> None:
        from dreamlora.merge import merge_loras
        from dreamlora.resize import rank_span

        sources = [_parse_lora(item, 1.0, "merge") for item in loras]
        base, options = _verify_model(model, [path for path, _ in sources], allow_pickle)
        result, merged = merge_loras(sources, out, rank, method, param, to, base, dtype, load_options=options)
        result.notes.insert(0, f"{len(sources)} LoRAs merged; rank {rank_span({m.rank for m in merged})}")
        _render_export(result, "merge")

    _run(debug, action)


def _verify_model(model: str | None, sources: list[Path], allow_pickle: bool) -> tuple[str | None, dict[str, Any]]:
    """The base model to verify a rewritten LoRA on, and how to load it: --model, else $DREAMLORA_MODEL (pickle
    weights as --allow-pickle says), else the first source run's, read as that run read it (its revision, variant,
    single-file configs, pickle permission); None when no source is a run (the load-back check is then skipped)."""
    from dreamlora.export import base_load_options, run_config
    from dreamlora.generate import run_base_model

    given = model or os.environ.get("DREAMLORA_MODEL")
    if given:
        return given, {"allow_pickle": allow_pickle}
    for src in sources:
        if found := run_base_model([(Path(src), 1.0)]):
            options = base_load_options(run_config(found[2]), merged=False)
            return found[0], {**options, "allow_pickle": allow_pickle or bool(options.get("allow_pickle"))}
    return None, {"allow_pickle": allow_pickle}


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A run folder or a LoRA .safetensors file.")],
    debug: Debug = False,
) -> None:
    """Report a LoRA's format, ranks, alphas, modules, metadata and problems."""

    def action() -> None:
        from dreamlora.inspection import inspect_path

        report = inspect_path(path)
        problems = report.pop("problems", [])
        groups = report.pop("groups", {}) or {}
        metadata = report.pop("metadata", {}) or {}
        report.pop("adapter_metadata", None)
        run = report.pop("run", None) or {}
        readings = report.pop("readings", None) or {}
        if lycoris := report.get("lycoris"):
            report["lycoris"] = ", ".join(f"{kind} {n} modules" for kind, n in lycoris.items())
        if words := report.get("trained_words"):
            report["trained_words"] = ", ".join(f"{word} ({n})" for word, n in words)
        rows = [(k, v) for k, v in report.items() if v not in (None, "", {})]
        for group, info in groups.items():
            ranks = ", ".join(str(r) for r in info.get("ranks", [])) or "none (LyCORIS)"
            alphas = ", ".join(f"{a:g}" for a in info.get("alphas", []) if a is not None) or "missing"
            rows.append((group, f"{info.get('modules')} modules, rank {ranks}, alpha {alphas}"))
        for key in ("token", "class_name", "steps", "resolution", "model", "clip_skip", "prediction_type", "status"):
            if key in run:
                rows.append((f"run {key}", run[key]))
        if "fit_instance_loss" in readings:  # the run's last validation and sample readings
            from dreamlora.validation import describe

            rows.append((f"run validation, step {readings['fit_instance_loss']['step']}", describe(readings["fit_instance_loss"])))
        if "instance_distance" in readings:
            rows.append((f"run samples, step {readings['instance_distance']['step']}", drift_figures(readings["instance_distance"])))
        for key in sorted(metadata):
            value = str(metadata[key])
            rows.append((key, value if len(value) < 70 else value[:67] + "..."))
        _summary(f"inspect {path}", rows)
        for problem in problems:
            out.print(f"[yellow]problem:[/] {problem}")
        if not problems:
            out.print("[green]no problems found[/]")

    _run(debug, action)


# --- generate ---------------------------------------------------------------------------------


@app.command()
def generate(
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="e.g. 'a photo of sks dog'.")] = None,
    from_file: Annotated[Optional[Path], typer.Option("--from-file", help="Prompts from a text file instead, one per line, each optionally ending in kohya's --n NEGATIVE --w WIDTH --h HEIGHT --d SEED --l GUIDANCE --s STEPS --ss SAMPLER; the flags below are the defaults.")] = None,
    lora: Annotated[Optional[list[str]], typer.Option("--lora", help="Run folder or LoRA file, optionally PATH:SCALE (repeatable).")] = None,
    scale: Annotated[float, typer.Option(help="Scale of LoRAs given without :SCALE.")] = 1.0,
    num_images: Annotated[int, typer.Option("--num-images", "-n")] = 4,
    seed: Annotated[int, typer.Option()] = 0,
    steps: Annotated[int, typer.Option()] = 25,
    guidance: Annotated[Optional[float], typer.Option(help="Default: the model's (7.5 SD 1.x, 5.0 SDXL).")] = None,
    negative_prompt: Annotated[str, typer.Option()] = "",
    resolution: Annotated[Optional[int], typer.Option(help="Default: the model's.")] = None,
    compare: Annotated[bool, typer.Option("--compare", help="Grid of base vs LoRA at the same seeds.")] = False,
    scheduler: Annotated[str, typer.Option("--scheduler", help="Sampler: dpm++ (default)|pndm|ddim|euler|euler_a|heun|dpm2|dpm2_a|unipc (a --from-file line's --ss chooses its own).")] = "dpm++",
    no_emphasis: Annotated[bool, typer.Option("--no-emphasis", help="Brackets are plain text: do not read A1111's (word:1.2) weights.")] = False,
    checkpoints: Annotated[bool, typer.Option("--checkpoints", help="A row for each checkpoint of the --lora run (and its final LoRA), at the same seeds: pick the best step.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per batch (default 0: automatic, as prior batches); the images do not depend on it.")] = 0,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="New or empty output folder (default: samples-out, or the next free samples-out-N).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Hub id, local diffusers folder, `tiny`, `tiny-sdxl` or `toy` (default: $DREAMLORA_MODEL, else the model a --lora run was trained on, else SD 1.5).")] = None,
    vae: Vae = None,
    variant: Variant = None,
    revision: Revision = None,
    precision: Precision = None,
    clip_skip: ClipSkip = None,
    prediction_type: PredictionType = None,
    base_weights: BaseWeights = None,
    allow_pickle: AllowPickle = False,
    debug: Debug = False,
) -> None:
    """Generate images with the base model and LoRAs, saved with a grid."""

    def action() -> None:
        import torch

        from dreamlora.errors import ConfigError
        from dreamlora.generate import check_settings, output_folder
        from dreamlora.generate import generate as run_generate
        from dreamlora.models import load_model, resolve_precision
        from dreamlora.prompts import PromptSpec, read_prompt_file

        if prompt is None and from_file is None:
            raise ConfigError("no prompt given; pass --prompt 'a photo of sks dog', or a file of prompts with --from-file FILE")
        _check_not_both("--prompt", prompt, "--from-file", from_file, "the prompts")
        prompts = read_prompt_file(from_file) if from_file is not None else prompt
        loras = [_parse_lora(item, scale) for item in lora or []]
        sampler = _sampler_name(scheduler) or "dpm++"
        check_settings(num_images, steps, guidance, resolution, loras, batch_size, sampler)
        if checkpoints:
            from dreamlora.generate import checkpoint_sets

            checkpoint_sets(loras)  # one run with checkpoints, named before the model loads
        model_cfg = _generation_model(model, vae, base_weights, clip_skip, prediction_type, precision, allow_pickle, loras, variant, revision)
        folder = output_folder(out_dir)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        _, dtype = resolve_precision(model_cfg.precision, device)
        components = load_model(model_cfg, dtype, device)
        size = resolution or components.native_resolution
        guidance_scale = guidance if guidance is not None else components.family.default_guidance
        defaults = PromptSpec("", negative_prompt, size, size, seed, guidance_scale, steps, sampler)
        with _progress() as progress:
            result = run_generate(
                components, prompts, defaults, folder, loras, num_images, compare, checkpoints, not no_emphasis, batch_size, _image_counter(progress, "images")
            )
        _summary("generated", [("images", len(result.images)), ("folder", folder), ("grid", result.grid)])

    _run(debug, action)


def _generation_model(
    model: str | None, vae: str | None, base_weights: list[str] | None, clip_skip: int | None, prediction_type: str | None, precision: str | None,
    allow_pickle: bool, loras: list[tuple[str, float]], variant: str | None = None, revision: str | None = None,
) -> Any:
    """The model `generate` draws with: --model, else $DREAMLORA_MODEL, else the one a --lora run was trained on (with
    its hub revision, weights variant, VAE and fused base weights); clip skip and prediction type as the LoRAs were trained unless given. Each choice
    taken from a run is said; a missing or damaged LoRA is named before anything loads."""
    from dreamlora.checkpoint import find_lora
    from dreamlora.config import ModelConfig
    from dreamlora.export import run_settings
    from dreamlora.generate import recorded_clip_skip, recorded_prediction_type, run_base_model
    from dreamlora.lora import read_safetensors

    base, base_vae, fused_weights = model or os.environ.get("DREAMLORA_MODEL"), vae, list(base_weights or [])
    if not base and (trained_on := run_base_model(loras)):  # the model the run was trained on, not SD 1.5
        base, run_vae, run_dir = trained_on
        base_vae = vae or run_vae or None
        recorded = run_settings(run_dir).get("model", {})
        variant, revision = variant or recorded.get("variant") or None, revision or recorded.get("revision") or None
        with_vae = (f" at revision {revision}" if revision else "") + (f" ({variant} weights)" if variant else "") + (f" with VAE {base_vae}" if base_vae else "")
        console.print(f"base model [bold]{base}[/]{with_vae}, as run {run_dir} was trained on (--model to choose another)")
        if not fused_weights and recorded.get("base_weights"):
            fused_weights = list(recorded["base_weights"])  # the run's LoRA is a change to the base with these fused in
            console.print(f"base weights {', '.join(fused_weights)}, as run {run_dir} was trained on (--base-weights to choose others)")
            from dreamlora.checkpoint import read_run_info
            from dreamlora.generate import BASE_WEIGHTS_RECORD, changed_base_weights

            if changed := changed_base_weights(read_run_info(run_dir).get(BASE_WEIGHTS_RECORD) or {}, tuple(fused_weights)):
                console.print(f"[yellow]base weights {', '.join(changed)} changed since run {run_dir} trained on them: the images use them as they are now[/]")
    for path, _ in loras:
        read_safetensors(find_lora(path))  # a missing or damaged LoRA is named before the model loads
    skip = clip_skip
    if skip is None and (trained_with := recorded_clip_skip(loras)) and trained_with[0] != 1:
        skip = trained_with[0]
        console.print(f"clip skip {skip}, as {trained_with[1]} was trained with (--clip-skip to choose another)")
    predicts = prediction_type
    if predicts is None and (trained_for := recorded_prediction_type(loras)):
        predicts = trained_for[0]
        console.print(f"prediction type {predicts}, as {trained_for[1]} was trained for (--prediction-type to choose another)")
    settings = {
        "name": base, "vae": base_vae, "variant": variant, "revision": revision, "precision": precision, "allow_pickle": allow_pickle, "clip_skip": skip, "prediction_type": predicts,
        "base_weights": tuple(fused_weights) if fused_weights else None,
    }  # fmt: skip
    return ModelConfig(**{k: v for k, v in settings.items() if v is not None})


@app.command()
def cache(
    prune_days: Annotated[Optional[float], typer.Option("--prune-days", help="Remove latents unused for this many days.")] = None,
    max_size: Annotated[Optional[str], typer.Option("--max-size", help="Then remove the least recently used until at most this much remains: 500MB, 2GB (a bare number is GB).")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove every cached latent.")] = False,
    cache_dir: Annotated[Optional[str], typer.Option("--dir", help="Cache folder (default $DREAMLORA_CACHE/latents).")] = None,
    debug: Debug = False,
) -> None:
    """Show the on-disk latent cache, or prune it (--prune-days, --max-size, --clear)."""

    def action() -> None:
        from dreamlora.errors import ConfigError
        from dreamlora.latent_cache import default_cache_dir, prune_cache

        if prune_days is not None and prune_days < 0:
            raise ConfigError("--prune-days must be 0 or more")
        root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        max_bytes = parse_size(max_size, "--max-size") if max_size is not None else None
        usage = prune_cache(root, max_bytes, prune_days, clear)
        rows = [("folder", root), ("entries", usage.entries), ("size", f"{usage.bytes / 1e6:.1f} MB")]
        if prune_days is not None or max_size is not None or clear:
            rows.append(("removed", f"{usage.removed} entries, {usage.freed / 1e6:.1f} MB"))
        _summary("latent cache", rows)
        from dreamlora.single_file import converted_usage

        models, count, size = converted_usage()
        if count:  # not pruned here: each is a model a command may load next; delete one to convert it again
            _summary("converted single-file checkpoints", [("folder", models), ("models", count), ("size", f"{size / 1e9:.2f} GB")])

    _run(debug, action)


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    debug: Debug = False,
) -> None:
    """What this machine offers: library versions, devices, the attention and precision training picks, hub, caches."""

    def action() -> None:
        import json

        from dreamlora.doctor import diagnose

        report = diagnose()
        if as_json:
            print(json.dumps(report.to_dict(), indent=2))
            return
        _summary("versions", [(name, version or "[dim]not installed[/]") for name, version in report.versions.items()])
        for device in report.devices:
            _summary(device["device"], [(key, value) for key, value in device.items() if key != "device"])
        _summary("training would use", [*report.training.items(), ("model hub", report.hub)])
        _summary("caches", [
            (name, ", ".join(f"{v / 1e6:.1f} MB" if k == "bytes" else f"{k} {v}" for k, v in info.items())) for name, info in report.caches.items()
        ])  # fmt: skip
        for problem in report.problems:
            console.print(f"[yellow]note:[/] {problem}")

    _run(debug, action)


@app.command()
def bench(
    model: Annotated[Optional[str], typer.Option("--model", help="random:sd15 (default on GPU), tiny (default on CPU), or any model.")] = None,
    part: Annotated[str, typer.Option("--part", help="train|prior|all")] = "all",
    steps: Annotated[int, typer.Option(help="Measured training steps after warm-up.")] = 30,
    warmup: Annotated[int, typer.Option(help="Warm-up steps (not measured).")] = 10,
    prior_images: Annotated[int, typer.Option(help="Class images to time.")] = 32,
    variants: Annotated[bool, typer.Option("--variants/--no-variants", help="Also time without gradient checkpointing, the reference's prior settings and (GPU) prior with a fused-QKV / channels-last UNet.")] = True,
    no_gradient_checkpointing: Annotated[bool, typer.Option("--no-gradient-checkpointing")] = False,
    compile_: Annotated[Optional[str], typer.Option("--compile", help="CUDA graph of the step: auto|on|off.")] = None,
    precision: Precision = None,
    attention: Annotated[Optional[str], typer.Option(help="auto|sdpa|xformers")] = None,
    resolution: Annotated[Optional[int], typer.Option()] = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    rank: Annotated[Optional[int], typer.Option()] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    set_: SetOption = None,
    debug: Debug = False,
) -> None:
    """Measure training it/s, peak memory and prior images/s with the real code paths."""

    def action() -> None:
        import json

        from dreamlora.bench import default_bench_config, run_bench
        from dreamlora.errors import ConfigError

        if part not in ("train", "prior", "all"):
            raise ConfigError(f"--part must be train, prior or all; got {part!r}")
        if steps < 2 or warmup < 1 or prior_images < 1:
            # Steps are timed between log records after the warm-up: at least two measured steps make an interval.
            raise ConfigError(f"--steps must be 2 or more, --warmup and --prior-images 1 or more; got {steps}, {warmup}, {prior_images}")
        cfg = default_bench_config(model, _overrides(set_, {
            "model.precision": precision, "model.attention": attention, "data.resolution": resolution,
            "train.batch_size": batch_size, "adapter.rank": rank,
            "train.gradient_checkpointing": False if no_gradient_checkpointing else None, "train.compile": compile_,
        }))
        parts = ("train", "prior") if part == "all" else (part,)
        import time

        started = time.perf_counter()

        def on_row(text: str) -> None:  # on stderr: --json's stdout stays one JSON object
            console.print(f"[dim]{time.perf_counter() - started:6.0f} s[/]  {text}")

        result = run_bench(cfg, parts, steps, warmup, prior_images, variants, on_row)
        if json_out:
            out.print_json(json.dumps(result.to_dict()))
            return
        table = Table(title=f"dreamlora bench: {result.model} on {result.device} (torch {result.torch_version})", title_justify="left")
        for column in ("part", "setting", "speed", "ms", "peak GiB", "attention/precision"):
            table.add_column(column)
        for t in result.train:
            setting = f"{t.resolution}px {t.batch} rank {t.rank}, ckpt {'on' if t.gradient_checkpointing else 'off'}, " + (f"CUDA graph (capture {t.capture_seconds:.1f} s)" if t.cuda_graphs else "eager")
            peak = f"{t.peak_memory_gib:.2f}" if t.peak_memory_gib is not None else "-"
            if t.setup_peak_gib is not None and t.steps_peak_gib is not None:
                peak += f" (setup {t.setup_peak_gib:.2f}, steps {t.steps_peak_gib:.2f})"
            table.add_row("train", setting, f"{t.it_s:.2f} it/s", f"{t.ms_per_step:.1f}", peak, f"{t.attention}/{t.precision}")
        for p in result.prior:
            peak = f"{p.peak_memory_gib:.2f}" if p.peak_memory_gib is not None else "-"
            tweaks = f", {p.unet_tweaks}" if p.unet_tweaks else ""
            same = f", max pixel diff {p.max_pixel_diff}" if p.max_pixel_diff is not None else ""  # vs the first row at these steps
            table.add_row("prior", f"{p.resolution}px {p.scheduler} {p.steps} steps, batch {p.batch_size}{tweaks} (first batch {p.warmup_seconds:.1f} s{same})", f"{p.images_per_s:.2f} img/s", "", peak, "")
        out.print(table)
        for p in result.prior:
            if p.phase_shares:
                split = ", ".join(f"{phase} {share:.0%}" for phase, share in p.phase_shares.items())
                out.print(f"prior {p.scheduler} {p.steps} steps{', ' + p.unet_tweaks if p.unet_tweaks else ''}, one synchronised batch: {split}")
        if result.graph_vs_eager:
            out.print("graph vs eager (same seed and data): " + ", ".join(f"{k} {v:.4g}" for k, v in result.graph_vs_eager.items()))

    _run(debug, action)


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="New folder for the demo (a suffix is added if it exists).")] = Path("demo-out"),
    eval_images: Annotated[int, typer.Option("--eval-images", help="Images per prompt in the base-vs-trained reading (default 16).")] = 16,
    set_: SetOption = None,
    debug: Debug = False,
) -> None:
    """The whole pipeline on the built-in toy model and the sample photos, ending with a base-vs-trained picture."""
    import contextlib

    from dreamlora.demo import TOY_RECIPE, evaluate, prepare_folder

    _setup_logging(debug)

    def check() -> None:  # before the demo folder is made
        from dreamlora.config import load_config, parse_set_options
        from dreamlora.errors import ConfigError

        if not 1 <= eval_images <= 1000:
            raise ConfigError(f"--eval-images must be in 1..1000; got {eval_images}")
        load_config(TOY_RECIPE, parse_set_options(set_ or []))

    _run(debug, check)
    folder = prepare_folder(out_dir)
    recipe = str(TOY_RECIPE)
    console.print(f"[bold]demo folder:[/] {folder} (sample photos in {folder / 'dog'})")
    with contextlib.chdir(folder):
        console.rule("dreamlora prior --class dog")
        prior(class_name="dog", model="toy", config=Path(recipe), set_=set_, debug=debug)
        console.rule("dreamlora train --instance ./dog --token sks")
        train(instance="./dog", token="sks", model="toy", config=Path(recipe), set_=set_, debug=debug)
        console.rule("dreamlora export --format a1111")
        export(fmt="a1111", debug=debug)
        console.rule("base vs trained")
        result = _run(debug, lambda: evaluate(Path("runs") / "sks-dog", Path("demo.png"), seeds=eval_images))
    table = Table(title=f"what the toy world's reader sees ({eval_images} images per prompt, same seeds)", title_justify="left")
    for column in ("prompt", "mark (base -> LoRA)", "right class (base -> LoRA)", "palette drift"):
        table.add_column(column)
    for score in result.scores:
        table.add_row(
            score.prompt, f"{score.base_mark_rate:.0%} -> {score.trained_mark_rate:.0%}",
            f"{score.base_class_rate:.0%} -> {score.trained_class_rate:.0%}", f"{score.palette_drift:.2f}",
        )  # fmt: skip
    out.print(table)
    written = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "dog" != p.parent.name and "priors" not in p.parts)
    _summary("demo wrote", [
        ("folder", folder), ("class images", f"{len(list((folder / 'priors' / 'dog').glob('*.png')))} in priors/dog/"),
        ("run", folder / "runs" / "sks-dog"), ("A1111 LoRA", next((folder / "exports").glob("*.safetensors"), "-")),
        ("picture", folder / "demo.png"), ("files", len(written)),
    ])


SIZE_UNITS = {"": 1e9, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12}


def parse_size(text: str, flag: str) -> int:
    """Bytes of a size written as 500MB, 2GB, 1.5 G or a bare number of GB (decimal units, as `cache` prints them)."""
    import re

    from dreamlora.errors import ConfigError

    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in SIZE_UNITS:
        raise ConfigError(f"{flag} {text!r} is not a size; write it as 500MB, 2GB or a number of GB")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def _sampler_name(name: str | None) -> str | None:
    """dreamlora's name of a sampler given by its own name or kohya's (k_euler_a -> euler_a)."""
    from dreamlora.prompts import KOHYA_SAMPLERS

    return None if name is None else KOHYA_SAMPLERS.get(name.lower(), name.lower())


def _parse_lora(item: str, default_scale: float, flag: str = "--lora") -> tuple[Path, float]:
    from dreamlora.config import lora_reference

    return lora_reference(item, default_scale, flag)


def main() -> None:  # pragma: no cover - console-script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
