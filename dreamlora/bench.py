"""What `dreamlora bench` measures: the real training loop and prior generation on a chosen model.

Both parts run the same code paths and defaults as `train` and `prior` (`train.train`, `prior.generate_class_images`)
on synthetic images in a temporary folder. `random:sd15` builds Stable Diffusion 1.5's exact architecture with
random weights from configs shipped in the package: speed and memory do not depend on the weight values.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dreamlora.config import PriorConfig, RunConfig, load_config, replace


@dataclass
class TrainBench:
    it_s: float  # median over measured intervals, after warm-up
    ms_per_step: float
    peak_memory_gib: float | None  # the whole run: the larger of the two below
    steps_measured: int
    warmup_steps: int
    first_step_s: float  # includes CUDA-graph capture when it is on
    attention: str
    precision: str
    gradient_checkpointing: bool
    cuda_graphs: bool
    capture_seconds: float
    resolution: int
    batch: str  # instance + class rows per step
    rank: int
    losses: dict[int, float] = field(default_factory=dict)  # logged step -> loss
    lora_file: str = ""
    setup_peak_gib: float | None = None  # loading, latent encoding and the first step (CUDA-graph capture included)
    steps_peak_gib: float | None = None  # the steps after the first log record: what training itself holds


@dataclass
class PriorBench:
    images_per_s: float
    images: int
    batch_size: int
    steps: int
    scheduler: str
    resolution: int
    peak_memory_gib: float | None
    unet_tweaks: str = ""
    """Inference-only changes to the UNet for this row ("fused-qkv", "channels-last", "compile", joined by "+"; "" = as
    `prior` runs today), measured to decide whether `prior` should make them."""
    phase_shares: dict[str, float] = field(default_factory=dict)
    """Where a separate, synchronised pass of one batch spent its time: UNet calls, VAE decoding, and the rest
    (text encoding, scheduler, conversion to arrays, PNG writes, the class-set checks); shares sum to 1. Not taken for
    a compiled UNet (the timer's syncs inside its forward would break the compiled graph)."""
    warmup_seconds: float = 0.0  # the untimed first batch: with "compile", the compilation is in it
    max_pixel_diff: int | None = None
    """Largest difference (0-255) of any pixel from the same image of the first row with the same sampler and steps
    (each image has its own seed, so the batch size does not matter): a tweak that keeps the arithmetic stays near 0."""


@dataclass
class BenchResult:
    device: str
    model: str
    torch_version: str
    train: list[TrainBench] = field(default_factory=list)
    prior: list[PriorBench] = field(default_factory=list)
    graph_vs_eager: dict[str, float] = field(default_factory=dict)  # same seed and data: max relative loss gap, LoRA cosine

    def to_dict(self) -> dict[str, Any]:
        """The report; each run's LoRA file lived in a temporary folder that is gone by now, so it is left out."""
        report = asdict(self)
        for run in report["train"]:
            run.pop("lora_file", None)
        return report


def _write_images(folder: Path, n: int, size: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return folder


def _gib(value: float | None) -> str:
    return f"{value:.2f} GiB" if value is not None else "-"


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_train(cfg: RunConfig, workdir: Path, steps: int, warmup: int) -> TrainBench:
    """Run `train.train` for warmup + steps and time the steps after warm-up from its log records."""
    from dreamlora.models import load_components, resolve_precision
    from dreamlora.train import train

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, dtype = resolve_precision(cfg.model.precision, device)
    components = load_components(cfg.model.name, dtype=dtype, device=device)
    resolution = cfg.data.resolution or components.native_resolution
    instance = _write_images(workdir / "instance", 5, resolution, 0)
    klass = _write_images(workdir / "class", 10, resolution, 1)
    interval = 5
    total = warmup + steps
    cfg = replace(
        cfg,
        data=replace(cfg.data, instance_dir=str(instance), class_dir=str(klass), class_prompt="a photo of dog", class_name="dog", resolution=resolution),
        train=replace(cfg.train, max_steps=total, log_every=interval, num_samples=0, checkpoint_every=0, out=str(workdir / "run")),
    )
    stamps: list[tuple[int, float]] = []
    losses: dict[int, float] = {}

    setup_peak: list[float | None] = []

    def on_log(record: dict[str, Any]) -> None:
        stamps.append((record["step"], time.perf_counter()))
        losses[record["step"]] = record["loss"]
        if not setup_peak:
            # Where the run's peak comes from: setup (VAE encoding, capture) or the steps themselves.
            setup_peak.append(_peak(device))
            _reset_peak(device)

    _reset_peak(device)
    started = time.perf_counter()
    result = train(cfg, components=components, on_log=on_log)
    first_step_s = stamps[0][1] - started if stamps else float("nan")
    per_step = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(stamps, stamps[1:]) if s0 >= warmup]
    median = statistics.median(per_step) if per_step else float("nan")
    steps_peak = _peak(device)
    before = setup_peak[0] if setup_peak else None
    return TrainBench(
        it_s=1.0 / median,
        ms_per_step=median * 1000,
        peak_memory_gib=max(before, steps_peak) if before is not None and steps_peak is not None else steps_peak,
        steps_measured=total - max(warmup, stamps[0][0] if stamps else 0),
        warmup_steps=warmup,
        first_step_s=first_step_s,
        attention=result.attention,
        precision=result.precision,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        cuda_graphs=result.cuda_graphs,
        capture_seconds=result.capture_seconds,
        resolution=resolution,
        batch=f"{cfg.train.batch_size}+{cfg.train.batch_size}",
        rank=cfg.adapter.rank,
        losses=losses,
        lora_file=str(result.lora_path),
        setup_peak_gib=before,
        steps_peak_gib=steps_peak,
    )


class PhaseTimer:
    """Adds the wall time of chosen methods (synchronising CUDA around each call) to named phases, while installed.

    The syncs stop the host from running ahead of the GPU, so a timed pass is slower than an untimed one:
    use its shares, not its speed.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self._installed: list[tuple[Any, str]] = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, owner: Any, method: str, phase: str) -> None:
        original = getattr(owner, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self._sync()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._sync()
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

        setattr(owner, method, timed)  # an instance attribute shadows the method; `restore` deletes it
        self._installed.append((owner, method))

    def restore(self) -> None:
        for owner, method in self._installed:
            delattr(owner, method)
        self._installed.clear()


def prior_phase_shares(pipeline: Any, prior_cfg: PriorConfig, resolution: int, workdir: Path, model: str, batch: int) -> dict[str, float]:
    """Time one batch of `generate_class_images` with the UNet and the VAE decoder timed apart."""
    from dreamlora.prior import generate_class_images

    timer = PhaseTimer(pipeline.device)
    timer.wrap(pipeline.unet, "forward", "unet")
    timer.wrap(pipeline.vae, "decode", "vae_decode")
    try:
        start = time.perf_counter()
        generate_class_images(pipeline, replace(prior_cfg, num_images=batch, batch_size=batch), resolution, workdir, model)
        total = time.perf_counter() - start
    finally:
        timer.restore()
    shares = {phase: seconds / total for phase, seconds in timer.seconds.items()}
    shares["rest"] = max(0.0, 1.0 - sum(shares.values()))
    return shares


UNET_TWEAKS = ("fused-qkv", "channels-last")  # the rows each alone and together
UNET_COMPILE = "compile"


def apply_unet_tweaks(unet: Any, tweaks: str) -> None:
    """Inference-only UNet changes that keep its arithmetic: one fused QKV projection per self-attention (diffusers'
    `fuse_qkv_projections`, with its fused SDPA processor), channels-last convolution weights, and "compile":
    `torch.compile` of the UNet in place (Inductor's default mode: at prior's large batches the step is bound by
    arithmetic and memory traffic, not launches, so the fused normalisation and elementwise kernels are what could
    gain; the CUDA graph that helps training's batch of 2 is not tried)."""
    chosen = [t for t in tweaks.split("+") if t]
    unknown = sorted(set(chosen) - {*UNET_TWEAKS, UNET_COMPILE})
    if unknown:
        raise ValueError(f"unknown UNet tweak(s) {', '.join(unknown)}; known: {', '.join((*UNET_TWEAKS, UNET_COMPILE))}")
    if "fused-qkv" in chosen:
        unet.fuse_qkv_projections()
    if "channels-last" in chosen:
        unet.to(memory_format=torch.channels_last)
    if UNET_COMPILE in chosen:
        unet.compile()


def bench_prior(cfg: RunConfig, prior_cfg: PriorConfig, workdir: Path, unet_tweaks: str = "", announce: Callable[[str], None] | None = None) -> PriorBench:
    """Time `generate_class_images` after one warm-up batch (not counted), then split one batch's time by phase."""
    if announce:
        batch = f"batch {prior_cfg.batch_size}" if prior_cfg.batch_size else "automatic batch"
        announce(f"timing prior: {prior_cfg.scheduler} {prior_cfg.steps} steps, {batch}{', ' + unet_tweaks if unet_tweaks else ''}, {prior_cfg.num_images} images")
    from dreamlora.models import build_pipeline, load_components, resolve_precision, select_attention
    from dreamlora.prior import auto_batch_size, generate_class_images

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, dtype = resolve_precision(cfg.model.precision, device)
    components = load_components(cfg.model.name, dtype=dtype, device=device)
    select_attention(components, cfg.model.attention, device)
    apply_unet_tweaks(components.unet, unet_tweaks)
    pipeline = build_pipeline(components, prior_cfg.scheduler)
    resolution = cfg.data.resolution or components.native_resolution
    batch = prior_cfg.batch_size or auto_batch_size(device, resolution)
    warm = replace(prior_cfg, num_images=batch, batch_size=batch)
    started = time.perf_counter()
    generate_class_images(pipeline, warm, resolution, workdir / "warm", cfg.model.name)
    warmup_seconds = time.perf_counter() - started
    _reset_peak(device)
    result = generate_class_images(pipeline, replace(prior_cfg, batch_size=batch), resolution, workdir / "prior", cfg.model.name)
    peak = _peak(device)
    compiled = UNET_COMPILE in unet_tweaks.split("+")
    shares = {} if compiled else prior_phase_shares(pipeline, prior_cfg, resolution, workdir / "phases", cfg.model.name, batch)
    return PriorBench(result.images_per_second, result.generated, batch, prior_cfg.steps, prior_cfg.scheduler, resolution, peak, unet_tweaks, shares, warmup_seconds)


def max_pixel_diff(first: Path, second: Path) -> int:
    """Largest difference of any pixel between the same-named PNGs of two prior folders (the images of one index)."""
    names = sorted(p.name for p in first.glob("*.png"))
    if not names or names != sorted(p.name for p in second.glob("*.png")):
        raise ValueError(f"'{first}' and '{second}' hold different images")
    return max(int(np.abs(np.asarray(Image.open(first / n), dtype=np.int16) - np.asarray(Image.open(second / n), dtype=np.int16)).max()) for n in names)


def run_bench(
    cfg: RunConfig, parts: tuple[str, ...], steps: int, warmup: int, prior_images: int, variants: bool, on_row: Callable[[str], None] | None = None
) -> BenchResult:
    """Training (with and, if `variants`, without gradient checkpointing) and prior generation (ours and the reference's
    defaults). `on_row` is told what each row times before it starts and its figures when it ends (the whole bench
    takes minutes, and a run cut off at a time limit keeps what it printed)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    announce = on_row or (lambda text: None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = BenchResult(device=name, model=cfg.model.name, torch_version=torch.__version__)
    with tempfile.TemporaryDirectory(prefix="dreamlora-bench-") as tmp:
        workdir = Path(tmp)
        if "train" in parts:
            ckpt = cfg.train.gradient_checkpointing
            settings = [(ckpt, cfg.train.compile)]
            if variants:
                settings += [(not ckpt, cfg.train.compile)] + ([(ckpt, "off")] if device.type == "cuda" and cfg.train.compile != "off" else [])
            for i, (checkpointing, compile_mode) in enumerate(settings):
                run_cfg = replace(cfg, train=replace(cfg.train, gradient_checkpointing=checkpointing, compile=compile_mode))
                announce(f"timing train: checkpointing {'on' if checkpointing else 'off'}, compile {compile_mode}, {warmup} + {steps} steps")
                result.train.append(bench_train(run_cfg, workdir / f"train{i}", steps, warmup))
                announce(f"  measured: {result.train[-1].it_s:.2f} it/s, first step {result.train[-1].first_step_s:.1f} s, peak {_gib(result.train[-1].peak_memory_gib)}")
            graphed = [t for t in result.train if t.cuda_graphs and t.gradient_checkpointing == ckpt]
            eager = [t for t in result.train if not t.cuda_graphs and t.gradient_checkpointing == ckpt]
            if graphed and eager:
                result.graph_vs_eager = compare_runs(graphed[0], eager[0])
        if "prior" in parts:
            folders: list[Path] = []

            def add(prior_cfg: PriorConfig, name: str, tweaks: str = "") -> None:
                folders.append(workdir / name)
                result.prior.append(bench_prior(cfg, prior_cfg, folders[-1], tweaks, announce))
                announce(f"  measured: {result.prior[-1].images_per_s:.2f} img/s, first batch {result.prior[-1].warmup_seconds:.1f} s, peak {_gib(result.prior[-1].peak_memory_gib)}")

            ours = replace(cfg.prior, num_images=prior_images, class_name="dog")
            add(ours, "prior-ours")
            if variants:
                # The second prior goal is PNDM at 50 steps (the reference's scheduler) with our batching;
                # the reference's own batch of 4 is timed too, for the like-for-like row.
                pndm = replace(ours, steps=50, scheduler="pndm")
                add(pndm, "prior-pndm")
                if device.type == "cuda" and pndm.batch_size != 4:  # on CPU the automatic batch is 4 already
                    add(replace(pndm, batch_size=4), "prior-ref")
                if device.type == "cuda":
                    # Candidates for prior's defaults, each alone and together, then compiled too, at our settings.
                    both = "+".join(UNET_TWEAKS)
                    for tweaks in (*UNET_TWEAKS, both, f"{both}+{UNET_COMPILE}"):
                        add(ours, f"prior-{tweaks}", tweaks)
                    if ours.steps > 20:
                        # DPM-Solver++ is commonly run at 20 steps: with both tweaks, the candidate for faster defaults.
                        add(replace(ours, steps=20), "prior-20", both)
            compare_prior_images(result.prior, [folder / "prior" for folder in folders])
    return result


def compare_prior_images(rows: list[PriorBench], folders: list[Path]) -> None:
    """Set each row's `max_pixel_diff` from the first row drawn with the same sampler and steps (None for that row);
    `folders[i]` holds row i's images."""
    for row, folder in zip(rows, folders):
        first = next(i for i, other in enumerate(rows) if (other.scheduler, other.steps) == (row.scheduler, row.steps))
        if rows[first] is not row:
            row.max_pixel_diff = max_pixel_diff(folders[first], folder)


def compare_runs(a: TrainBench, b: TrainBench) -> dict[str, float]:
    """How closely two runs with the same seed and data agree: the optimized step must train like the plain one."""
    from dreamlora.lora import read_diffusers_lora

    common = sorted(set(a.losses) & set(b.losses))
    gap = max(abs(a.losses[s] - b.losses[s]) / max(abs(b.losses[s]), 1e-8) for s in common) if common else float("nan")
    first, _ = read_diffusers_lora(Path(a.lora_file))
    second, _ = read_diffusers_lora(Path(b.lora_file))
    cosines = {}
    for group in first:
        x = torch.cat([first[group][k].flatten().float() for k in sorted(first[group]) if "lora_B" in k])
        y = torch.cat([second[group][k].flatten().float() for k in sorted(second[group]) if "lora_B" in k])
        cosines[f"lora_up_cosine_{group}"] = float(torch.nn.functional.cosine_similarity(x, y, dim=0))
    return {"max_relative_loss_gap": gap, "steps_compared": float(len(common)), **cosines}


def default_bench_config(model: str | None, overrides: dict[str, Any]) -> RunConfig:
    """The training defaults, on `random:sd15` with a GPU and on the tiny model without one."""
    chosen = model or ("random:sd15" if torch.cuda.is_available() else "tiny")
    return load_config(None, {"model.name": chosen, **overrides})
