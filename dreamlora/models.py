"""Base-model loading: resolve a model reference to its components, and the built-in offline presets."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from dreamlora.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
TOY_MODEL_DIR = PACKAGE_DIR / "assets" / "toy"
RANDOM_CONFIGS_DIR = PACKAGE_DIR / "configs"
TINY_PRESETS = {"tiny": "epsilon", "tiny-v": "v_prediction"}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


@dataclass(frozen=True)
class ModelFamily:
    """What differs between model families; the training loop and exporters ask this, never the model name."""

    name: str  # sd1, sd2
    base_model_version: str  # kohya's ss_base_model_version
    default_resolution: int
    text_encoder_names: tuple[str, ...]  # pipeline attributes holding text encoders
    kohya_text_encoder_prefixes: tuple[str, ...]  # lora_te (SD 1.x/2.x); SDXL: lora_te1, lora_te2


SD1 = ModelFamily("sd1", "sd_v1", 512, ("text_encoder",), ("lora_te",))
SD2 = ModelFamily("sd2", "sd_v2", 768, ("text_encoder",), ("lora_te",))


@dataclass
class Components:
    """A loaded base model: the parts training, prior generation and export need."""

    ref: str
    family: ModelFamily
    tokenizer: Any
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    noise_scheduler: Any
    source_dir: Path | None = None  # a diffusers folder holding this model, when there is one

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        """The image size the UNet was built for (512 for SD 1.x, 32 for the tiny preset)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor


def detect_family(text_encoder_config: Any, unet_config: Any) -> ModelFamily:
    """SD 2.x uses OpenCLIP-H (1024 wide) and head dims per block; everything else with one text encoder is SD 1.x-shaped."""
    if getattr(text_encoder_config, "hidden_size", 0) == 1024 and unet_config.get("cross_attention_dim") == 1024:
        return SD2
    return SD1


def resolve_precision(precision: str, device: torch.device) -> tuple[str, torch.dtype]:
    """`auto` is bf16 on GPUs that support it, else fp16 with loss scaling; fp32 on CPU."""
    if device.type != "cuda":
        if precision == "bf16":
            return "bf16", torch.bfloat16  # works on CPU, slowly; asked for explicitly only
        if precision == "fp16":
            log.warning("fp16 was requested on %s; using fp32 there", device.type)
        return "fp32", torch.float32
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision, {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]


# --- the built-in tiny preset -------------------------------------------------------------------


def _cache_root() -> Path:
    root = os.environ.get("DREAMLORA_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "dreamlora")
    return Path(root)


def write_char_tokenizer(folder: Path, max_length: int = 77) -> None:
    """A CLIP BPE tokenizer with no merges: every word becomes its characters, so any prompt has real ids."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tokenizer.save_pretrained(folder)


def build_tiny(folder: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Build the tiny Stable Diffusion (32 px, seeded random weights) and save it as a diffusers folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    try:
        write_char_tokenizer(tmp / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            sample_size=32,
            norm_num_groups=32,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=3,
                vocab_size=len(tokenizer),
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                projection_dim=32,
            )
        )
        scheduler = DDPMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            clip_sample=False,
            steps_offset=1,
            prediction_type=prediction_type,
        )
        unet.save_pretrained(tmp / "unet")
        vae.save_pretrained(tmp / "vae")
        text_encoder.save_pretrained(tmp / "text_encoder")
        scheduler.save_pretrained(tmp / "scheduler")
        _write_model_index(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_model_index(folder: Path) -> None:
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def tiny_model_dir(preset: str = "tiny") -> Path:
    """The tiny preset's diffusers folder, built on first use and cached."""
    folder = _cache_root() / f"{preset}-v1"
    if not (folder / "model_index.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        build_tiny(folder, prediction_type=TINY_PRESETS[preset])
    return folder


# --- resolving and loading ----------------------------------------------------------------------


def resolve_model_dir(ref: str, allow_pickle: bool = False) -> Path | str:
    """A local diffusers folder for presets and paths, or the hub id itself when it is one."""
    if ref in TINY_PRESETS:
        return tiny_model_dir(ref)
    if ref == "toy":
        if not (TOY_MODEL_DIR / "model_index.json").is_file():
            raise ModelLoadError(f"the built-in toy model is missing from the package ({TOY_MODEL_DIR}); reinstall dreamlora")
        return TOY_MODEL_DIR
    path = Path(ref).expanduser()
    looks_local = path.exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref
    if looks_local:
        if not path.exists():
            raise ModelLoadError(f"model folder '{ref}' does not exist; pass a diffusers folder (with model_index.json), a hub id, or `--model tiny`")
        if path.is_file():
            raise ModelLoadError(
                f"model '{ref}' is a single file; dreamlora needs a diffusers folder (model_index.json with unet/, vae/, text_encoder/, tokenizer/, scheduler/). "
                "Convert it with diffusers' convert_original_stable_diffusion_to_diffusers.py, or pass a hub id"
            )
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"'{ref}' is not a diffusers model folder (no model_index.json); pass the folder that holds model_index.json, or `--model tiny`")
        _check_weights_format(path, allow_pickle)
        return path
    return ref


def _check_weights_format(folder: Path, allow_pickle: bool) -> None:
    for sub in ("unet", "vae", "text_encoder"):
        part = folder / sub
        if not part.is_dir():
            raise ModelLoadError(f"model folder '{folder}' has no {sub}/ subfolder; pass a complete diffusers Stable Diffusion folder")
        has_safe = any(part.glob("*.safetensors"))
        has_pickle = any(p.suffix in PICKLE_SUFFIXES for p in part.iterdir())
        if not has_safe and has_pickle and not allow_pickle:
            raise ModelLoadError(
                f"'{part}' holds only pickle weights (.bin/.ckpt/.pt), which can run code when loaded; "
                "convert them to safetensors, or pass --allow-pickle if you trust the file"
            )


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _from_pretrained(cls: Any, source: Path | str, subfolder: str, allow_pickle: bool, local_only: bool, **kwargs: Any) -> Any:
    return cls.from_pretrained(source, subfolder=subfolder, use_safetensors=None if allow_pickle else True, local_files_only=local_only, **kwargs)


def _load_parts(source: Path | str, allow_pickle: bool, cache_only: bool, dtype: torch.dtype) -> tuple[Any, ...]:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=cache_only)
    text_encoder = _from_pretrained(CLIPTextModel, source, "text_encoder", allow_pickle, cache_only, dtype=dtype)
    unet = _from_pretrained(UNet2DConditionModel, source, "unet", allow_pickle, cache_only, dtype=dtype)
    vae = _from_pretrained(AutoencoderKL, source, "vae", allow_pickle, cache_only, dtype=dtype)
    noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", local_files_only=cache_only)
    return tokenizer, text_encoder, unet, vae, noise_scheduler


def load_components(ref: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", allow_pickle: bool = False) -> Components:
    """Load tokenizer, text encoder, UNet, VAE and the training noise scheduler of a model reference."""
    if ref.startswith("random:"):
        return build_random(ref.split(":", 1)[1], dtype=dtype, device=device)
    source = resolve_model_dir(ref, allow_pickle)
    local = isinstance(source, Path)
    try:
        parts = _load_parts(source, allow_pickle, True, dtype)
    except (OSError, ValueError) as error:
        # A hub id not in the cache: download only when the hub can be reached, so offline fails at once.
        if local or not _hub_reachable():
            raise _load_failure(ref, source, error) from error
        try:
            parts = _load_parts(source, allow_pickle, False, dtype)
        except (OSError, ValueError) as second:
            raise _load_failure(ref, source, second) from second
    tokenizer, text_encoder, unet, vae, noise_scheduler = parts
    family = detect_family(text_encoder.config, dict(unet.config))
    for module in (unet, vae, text_encoder):
        module.to(device=device).requires_grad_(False)  # base weights never train; adapters opt in
    return Components(ref, family, tokenizer, text_encoder, unet, vae, noise_scheduler, source if local else None)


def _load_failure(ref: str, source: Path | str, error: Exception | None) -> ModelLoadError:
    if isinstance(source, Path):
        return ModelLoadError(f"could not load the model in '{source}': {error}; check that it is a complete diffusers Stable Diffusion folder")
    reason = "the Hugging Face hub is unreachable from this machine" if not _hub_reachable() else f"loading failed: {error}"
    return ModelLoadError(
        f"model {ref!r} is not in the local cache and {reason}. Download it where there is network "
        f"(`huggingface-cli download {ref}`) and pass the local folder with --model PATH, set DREAMLORA_MODEL, "
        "or try the offline built-in model with --model tiny (or toy)"
    )


def build_random(arch: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Components:
    """A model of a real architecture with random weights from configs shipped in the package (speed does not depend on values)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = RANDOM_CONFIGS_DIR / arch
    if not folder.is_dir():
        known = sorted(p.name for p in RANDOM_CONFIGS_DIR.iterdir() if p.is_dir())
        raise ConfigError(f"unknown random architecture {arch!r}; known: {', '.join('random:' + k for k in known)}")
    read = lambda name: json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))  # noqa: E731
    tokenizer_dir = _cache_root() / "char-tokenizer"
    if not (tokenizer_dir / "vocab.json").is_file():
        write_char_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(read("unet"))
        vae = AutoencoderKL.from_config(read("vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**read("text_encoder")))
    noise_scheduler = DDPMScheduler.from_config(read("scheduler"))
    for module in (unet, vae, text_encoder):
        module.to(dtype=dtype).requires_grad_(False)
    family = detect_family(text_encoder.config, dict(unet.config))
    return Components(f"random:{arch}", family, tokenizer, text_encoder, unet, vae, noise_scheduler)


def public_model_ref(ref: str) -> str:
    """The model reference as recorded in run metadata: a local path keeps only its folder name."""
    if ref in TINY_PRESETS or ref == "toy" or ref.startswith("random:"):
        return ref
    path = Path(ref).expanduser()
    return path.resolve().name if path.exists() else ref


def tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's maximum length, as Stable Diffusion expects."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


def encode_prompt(text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The last hidden state of the text encoder: the UNet's cross-attention context."""
    return text_encoder(input_ids)[0]


def build_pipeline(components: Components, scheduler: str = "dpm++") -> Any:
    """A StableDiffusionPipeline over the loaded components with an inference scheduler."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
    )

    classes = {"dpm++": DPMSolverMultistepScheduler, "pndm": PNDMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}
    config = dict(components.noise_scheduler.config)
    extra = {"algorithm_type": "dpmsolver++"} if scheduler == "dpm++" else {}
    inference_scheduler = classes[scheduler].from_config(config, **extra)
    pipeline = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=inference_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def xformers_works(device: torch.device) -> bool:
    """Whether xformers' attention kernel really runs here (it can import yet fail to load its kernels)."""
    if device.type != "cuda":
        return False
    try:
        import xformers.ops

        q = torch.randn(1, 8, 1, 40, device=device, dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
        return True
    except Exception as error:  # noqa: BLE001 - any failure means the kernels are unusable
        log.info("xformers probe failed: %s", error)
        return False


def select_attention(components: Components, mode: str, device: torch.device) -> str:
    """Set the attention implementation and return its name: `xformers` or `sdpa`."""
    if mode in ("auto", "xformers") and xformers_works(device):
        components.unet.enable_xformers_memory_efficient_attention()
        return "xformers"
    if mode == "xformers":
        raise ConfigError(
            "attention=xformers was requested but xformers' kernels do not run here "
            f"({'no CUDA device' if device.type != 'cuda' else 'not built for this torch/CUDA'}); use --attention sdpa or auto"
        )
    if mode == "auto" and device.type == "cuda":
        log.info("xformers is not usable here; using PyTorch SDPA attention")
    from diffusers.models.attention_processor import AttnProcessor2_0

    components.unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"
