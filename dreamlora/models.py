"""Base-model loading: resolve a model reference to its components, and the built-in offline presets."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence
from urllib.parse import urlparse

import torch

from dreamlora.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    from dreamlora.config import ModelConfig

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
TOY_MODEL_DIR = PACKAGE_DIR / "assets" / "toy"
RANDOM_CONFIGS_DIR = PACKAGE_DIR / "configs"
TINY_PRESETS = {"tiny": "epsilon", "tiny-v": "v_prediction", "tiny-sdxl": "epsilon"}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


@dataclass(frozen=True)
class PromptEmbeddings:
    """What the text encoders give the UNet: the cross-attention context and, for SDXL, the pooled embedding."""

    context: torch.Tensor  # (prompts, tokens, cross_attention_dim)
    pooled: torch.Tensor | None = None  # (prompts, projection_dim); None for single-encoder families

    def select(self, rows: torch.Tensor) -> PromptEmbeddings:
        """One embedding per example: `rows` index the encoded prompts (gradients reach every row)."""
        return PromptEmbeddings(self.context[rows], None if self.pooled is None else self.pooled[rows])


def encode_last_hidden(text_encoders: Sequence[torch.nn.Module], input_ids: Sequence[torch.Tensor]) -> PromptEmbeddings:
    """SD 1.x/2.x: the last hidden state of the one text encoder."""
    return PromptEmbeddings(text_encoders[0](input_ids[0])[0])


def encode_penultimate_pooled(text_encoders: Sequence[torch.nn.Module], input_ids: Sequence[torch.Tensor]) -> PromptEmbeddings:
    """SDXL: the penultimate hidden states of both encoders side by side, and the projected pooled output of the last one."""
    hidden, pooled = [], None
    for encoder, ids in zip(text_encoders, input_ids):
        output = encoder(ids, output_hidden_states=True)
        pooled = output[0]  # CLIPTextModelWithProjection: text_embeds; only the last encoder's is kept
        hidden.append(output.hidden_states[-2])
    return PromptEmbeddings(torch.cat(hidden, dim=-1), pooled)


def no_added_conditioning(embeddings: PromptEmbeddings, time_ids: torch.Tensor) -> dict[str, torch.Tensor] | None:
    return None


def text_time_conditioning(embeddings: PromptEmbeddings, time_ids: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """SDXL's `added_cond_kwargs`: pooled text embedding and (original h, w, crop top, left, target h, w) per example."""
    if embeddings.pooled is None:
        raise ModelLoadError("this UNet needs pooled text embeddings (SDXL) but the text encoders gave none; is text_encoder_2 missing from the model folder?")
    return {"text_embeds": embeddings.pooled, "time_ids": time_ids.to(embeddings.pooled.dtype)}


@dataclass(frozen=True)
class ModelFamily:
    """What differs between model families; the training loop, prior generation and exporters ask this, never the model name.

    A new family (SD3, Flux) is one more instance here: its encoders, how prompts become UNet inputs,
    its pipeline, and how kohya/A1111 files name its modules.
    """

    name: str  # sd1, sd2, sdxl
    base_model_version: str  # kohya's ss_base_model_version
    default_resolution: int
    text_encoder_names: tuple[str, ...]  # pipeline attributes holding text encoders (also LoRA groups and diffusers key prefixes)
    kohya_text_encoder_prefixes: tuple[str, ...]  # lora_te (SD 1.x/2.x); SDXL: lora_te1, lora_te2
    tokenizer_names: tuple[str, ...] = ("tokenizer",)  # one per text encoder, same order
    text_encoder_classes: tuple[str, ...] = ("CLIPTextModel",)  # transformers classes, same order
    encode: Callable[[Sequence[torch.nn.Module], Sequence[torch.Tensor]], PromptEmbeddings] = encode_last_hidden
    added_conditioning: Callable[[PromptEmbeddings, torch.Tensor], dict[str, torch.Tensor] | None] = no_added_conditioning
    pipeline_class: str = "StableDiffusionPipeline"  # diffusers class for prior generation, samples and loading LoRAs
    default_guidance: float = 7.5
    kohya_unet_names: str = "diffusers"  # diffusers: A1111 reads diffusers module paths (SD 1.x/2.x); sgm: input_blocks/middle_block/output_blocks
    modelspec_architecture: str = "stable-diffusion-v1/lora"
    penultimate_encoders: tuple[str, ...] = ()  # text encoders read at the penultimate layer: their last layer gets no LoRA (it would get no gradient)
    vae_fp16_safe: bool = True  # False: the VAE overflows in fp16 (SDXL), so latents are encoded in fp32 unless the VAE says otherwise


SD1 = ModelFamily("sd1", "sd_v1", 512, ("text_encoder",), ("lora_te",))
SD2 = ModelFamily("sd2", "sd_v2", 768, ("text_encoder",), ("lora_te",), modelspec_architecture="stable-diffusion-v2-512/lora")
SDXL = ModelFamily(
    "sdxl",
    "sdxl_base_v1-0",
    1024,
    ("text_encoder", "text_encoder_2"),
    ("lora_te1", "lora_te2"),
    tokenizer_names=("tokenizer", "tokenizer_2"),
    text_encoder_classes=("CLIPTextModel", "CLIPTextModelWithProjection"),
    encode=encode_penultimate_pooled,
    added_conditioning=text_time_conditioning,
    pipeline_class="StableDiffusionXLPipeline",
    default_guidance=5.0,
    kohya_unet_names="sgm",
    modelspec_architecture="stable-diffusion-xl-v1-base/lora",
    penultimate_encoders=("text_encoder",),  # the second encoder's last layer feeds the pooled embedding, so it trains
    vae_fp16_safe=False,
)
FAMILIES = {family.name: family for family in (SD1, SD2, SDXL)}


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
    tokenizer_2: Any = None  # SDXL's second tokenizer and text encoder (OpenCLIP-bigG with projection)
    text_encoder_2: torch.nn.Module | None = None
    clip_skip: int = 1  # the text-encoder layer the prompt is read from, counted from the end as A1111 and kohya do

    @property
    def tokenizers(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.family.tokenizer_names)

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The family's text encoders by LoRA group name (`text_encoder`, `text_encoder_2`)."""
        return {name: getattr(self, name) for name in self.family.text_encoder_names}

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
    """SDXL's UNet takes pooled text and size conditioning (`text_time`); SD 2.x uses OpenCLIP-H (1024 wide); the rest is SD 1.x-shaped."""
    if unet_config.get("addition_embed_type") == "text_time":
        return SDXL
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


def cache_root() -> Path:
    """dreamlora's cache folder: $DREAMLORA_CACHE, else $XDG_CACHE_HOME/dreamlora or ~/.cache/dreamlora."""
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


@contextlib.contextmanager
def _staged(folder: Path) -> Iterator[Path]:
    """A temporary sibling folder that replaces `folder` when the block succeeds; removed either way."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        yield tmp
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def writable_on_any_rank(*models: Any) -> None:
    """Let transformers models save their files from any process. transformers 5's `save_pretrained` writes nothing
    (not even config.json) on a torch.distributed rank other than 0, whatever `is_main_process` says: a first-use build
    or conversion run by another rank of `accelerate launch` would leave an empty folder behind."""
    for model in models:
        if model is not None and hasattr(model, "should_save_on_this_rank"):
            model.should_save_on_this_rank = lambda is_main_process: is_main_process


def _sd_scheduler(**extra: Any) -> Any:
    """Stable Diffusion's training noise schedule (1000 steps, scaled-linear betas)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False, steps_offset=1, **extra)


def _tiny_vae(**extra: Any) -> Any:
    """The tiny presets' VAE: two blocks, so latents are half the image size."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=32,
        norm_num_groups=32,
        **extra,
    )


def build_tiny(folder: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Build the tiny Stable Diffusion (32 px, seeded random weights) and save it as a diffusers folder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    with _staged(folder) as tmp:
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
        vae = _tiny_vae()
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
        scheduler = _sd_scheduler(prediction_type=prediction_type)
        unet.save_pretrained(tmp / "unet")
        vae.save_pretrained(tmp / "vae")
        writable_on_any_rank(text_encoder)
        text_encoder.save_pretrained(tmp / "text_encoder")
        scheduler.save_pretrained(tmp / "scheduler")
        _write_model_index(tmp)
    return folder


def build_tiny_sdxl(folder: Path, seed: int = 0, text_encoder_2_width: int = 32) -> Path:
    """Build a tiny SDXL (32 px, seeded random weights, SDXL's block layout) and save it as a diffusers folder.

    Like SDXL 1.0: down blocks (plain, cross-attention, cross-attention) with two layers each, so the SGM names
    (`input_blocks_4_1`, `middle_block_1`, `output_blocks_0_1`) are the real ones; two CLIP encoders whose
    penultimate states are concatenated; the second with a projection giving the pooled embedding. A second
    encoder wider than the first (as SDXL's 1280 beside 768) lets diffusers' single-file loader tell them apart.
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    with _staged(folder) as tmp:
        write_char_tokenizer(tmp / "tokenizer")
        write_char_tokenizer(tmp / "tokenizer_2")
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64, 64),
            layers_per_block=2,
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,  # six size numbers plus the pooled text embedding
            cross_attention_dim=32 + text_encoder_2_width,  # both encoders' hidden states side by side
            norm_num_groups=32,
        )
        vae = _tiny_vae(scaling_factor=0.13025, force_upcast=True)
        common = dict(
            intermediate_size=37, num_attention_heads=4, vocab_size=len(tokenizer), max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, num_hidden_layers=3, projection_dim=32, **common))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=text_encoder_2_width, num_hidden_layers=3, projection_dim=32, hidden_act="gelu", **common))
        scheduler = _sd_scheduler(timestep_spacing="leading")
        pipeline = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=CLIPTokenizer.from_pretrained(tmp / "tokenizer_2"), unet=unet, scheduler=scheduler, add_watermarker=False,
        )  # fmt: skip
        writable_on_any_rank(text_encoder, text_encoder_2)
        pipeline.save_pretrained(tmp, safe_serialization=True)
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
    folder = cache_root() / f"{preset}-v1"

    def built() -> bool:  # a rank other than 0 of an older dreamlora could leave the text encoder empty: built again
        return (folder / "model_index.json").is_file() and any((folder / "text_encoder").glob("*.safetensors"))

    if not built():
        from filelock import FileLock

        folder.parent.mkdir(parents=True, exist_ok=True)
        # One builder at a time: processes starting together (accelerate's ranks) would otherwise replace the folder
        # under each other's loads.
        with FileLock(str(folder.parent / f".{folder.name}.lock")):
            if not built():  # not built by another process while this one waited
                with torch.random.fork_rng(devices=[]):  # building on first use must not move the caller's random state
                    if preset == "tiny-sdxl":
                        build_tiny_sdxl(folder)
                    else:
                        build_tiny(folder, prediction_type=TINY_PRESETS[preset])
    return folder


# --- resolving and loading ----------------------------------------------------------------------


def check_revision(ref: str, source: Path | str, revision: str) -> None:
    """A revision names a hub model's branch, tag or commit: refused for a local model (`source` a folder)."""
    if revision and isinstance(source, Path):
        raise ConfigError(f"--revision picks a branch, tag or commit of a Hugging Face hub model; {ref!r} is a local model; drop --revision")


def resolve_model_dir(ref: str, allow_pickle: bool = False, single_file_config: str = "") -> Path | str:
    """A local diffusers folder for presets, paths and single-file checkpoints (converted once, see `single_file`), or
    the hub id itself when it is one."""
    if ref in TINY_PRESETS:
        return tiny_model_dir(ref)
    if ref == "toy":
        if not (TOY_MODEL_DIR / "model_index.json").is_file():
            raise ModelLoadError(f"the built-in toy model is missing from the package ({TOY_MODEL_DIR}); reinstall dreamlora")
        return TOY_MODEL_DIR
    path = check_local_model(ref)
    if path is None:
        return ref
    if path.is_file():
        from dreamlora.single_file import converted_folder

        return converted_folder(path, single_file_config)
    _check_weights_format(path, allow_pickle)
    return path


def check_local_model(ref: str) -> Path | None:
    """A model reference that names a local path: it exists, and is a diffusers folder or a checkpoint file (cheap, no
    weights read). None for presets and hub ids."""
    if ref in TINY_PRESETS or ref == "toy" or ref.startswith("random:"):
        return None
    path = Path(ref).expanduser()
    if not (path.exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref):
        return None  # a hub id
    if not path.exists():
        raise ModelLoadError(f"model folder '{ref}' does not exist; pass a diffusers folder (with model_index.json), a hub id, or `--model tiny`")
    if path.is_file():
        from dreamlora.single_file import SINGLE_FILE_SUFFIXES

        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(f"model '{ref}' is a file but not a checkpoint; pass a diffusers folder (with model_index.json), a .safetensors checkpoint or a hub id")
    elif not (path / "model_index.json").is_file():
        raise ModelLoadError(f"'{ref}' is not a diffusers model folder (no model_index.json); pass the folder that holds model_index.json, or `--model tiny`")
    return path


def _check_weights_format(folder: Path, allow_pickle: bool) -> None:
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    if "XL" in str(index.get("_class_name", "")) and not (index.get("text_encoder") or [None])[0]:
        raise ModelLoadError(f"'{folder}' has no first text encoder (an SDXL refiner?); dreamlora trains base models such as stable-diffusion-xl-base-1.0")
    second = ("text_encoder_2",) if (index.get("text_encoder_2") or [None])[0] else ()
    for sub in ("unet", "vae", "text_encoder", *second):
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


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE switches the Hugging Face hub off (read now, not when huggingface_hub was imported)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers (never when HF_HUB_OFFLINE is set): offline, loading fails at once."""
    if hub_offline():
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def file_options(cache_only: bool, revision: str) -> dict[str, Any]:
    """`from_pretrained`/`load_config` keywords for where a model's files are read from: the cache only, a hub revision."""
    return {"local_files_only": cache_only, **({"revision": revision} if revision else {})}


def _read_options(allow_pickle: bool, cache_only: bool, dtype: torch.dtype, variant: str, revision: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """`from_pretrained` keywords: where every part is read from (the cache only, a hub revision), and how weights are
    read (safetensors unless pickle is allowed, the dtype, the files' variant)."""
    files = file_options(cache_only, revision)
    weights = {**files, "use_safetensors": None if allow_pickle else True, "dtype": dtype, **({"variant": variant} if variant else {})}
    return files, weights


def _load_parts(source: Path | str, files: dict[str, Any], weights: dict[str, Any]) -> tuple[Any, ...]:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **files)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **weights)
    noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **files)
    return tokenizer, text_encoder, unet, vae, noise_scheduler


def _load_extra_encoders(family: ModelFamily, source: Path | str, files: dict[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
    """The family's tokenizers and text encoders beyond the first (SDXL: tokenizer_2, text_encoder_2)."""
    import transformers
    from transformers import CLIPTokenizer

    extra: dict[str, Any] = {}
    for tokenizer_name, encoder_name, class_name in list(zip(family.tokenizer_names, family.text_encoder_names, family.text_encoder_classes))[1:]:
        extra[tokenizer_name] = CLIPTokenizer.from_pretrained(source, subfolder=tokenizer_name, **files)
        extra[encoder_name] = getattr(transformers, class_name).from_pretrained(source, subfolder=encoder_name, **weights)
    return extra


def load_vae(ref: str, dtype: torch.dtype = torch.float32, allow_pickle: bool = False) -> torch.nn.Module:
    """A replacement VAE (`--vae`): a VAE folder (config.json), a model folder with vae/, or a hub id (e.g. madebyollin/sdxl-vae-fp16-fix)."""
    from diffusers import AutoencoderKL

    path = check_local_vae(ref)
    if path is not None:
        subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
        source: Path | str = path
    else:
        source, subfolder = ref, None
    try:
        return AutoencoderKL.from_pretrained(source, subfolder=subfolder, dtype=dtype, use_safetensors=None if allow_pickle else True, local_files_only=not isinstance(source, Path) and not hub_reachable())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not load the VAE {ref!r}: {error}; pass a local diffusers VAE folder with --vae PATH") from error


def check_local_vae(ref: str) -> Path | None:
    """A --vae that names a local path: a diffusers VAE folder (config.json) or a model folder with vae/ (cheap, no
    weights read). None for a hub id."""
    path = Path(ref).expanduser()
    if path.is_file():
        raise ModelLoadError(f"--vae '{ref}' is a single file; pass a diffusers VAE folder (with config.json) or a hub id such as madebyollin/sdxl-vae-fp16-fix")
    if path.is_dir():
        if not (path / "vae" / "config.json").is_file() and not (path / "config.json").is_file():
            raise ModelLoadError(f"--vae '{ref}' has no config.json (nor vae/config.json); pass a diffusers VAE folder")
        return path
    if ref.startswith((".", "/", "~")):
        raise ModelLoadError(f"--vae folder '{ref}' does not exist; pass a diffusers VAE folder or a hub id")
    return None


def vae_reference_identity(ref: str) -> str:
    """A replacement VAE as a prior set records it ("" for the model's own): a hub id as given; a local folder by its
    name and `model_fingerprint` (no path: two folders of one name are told apart, the same folder moved is not)."""
    if not ref:
        return ""
    path = Path(ref).expanduser()
    if not path.is_dir():
        return ref
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    return f"{path.resolve().name}:{model_fingerprint(folder)}"


def load_components(
    ref: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", allow_pickle: bool = False, vae: str = "", single_file_config: str = "",
    variant: str = "",
    revision: str = "",
) -> Components:
    """Load tokenizers, text encoders, UNet, VAE (or the one `vae` names) and the training noise scheduler of a model
    reference; `variant` (e.g. fp16) reads a diffusers folder's or hub id's `*.fp16.safetensors` weights, `revision`
    a hub id's branch, tag or commit."""
    if ref.startswith("random:"):
        with torch.random.fork_rng(devices=[]):  # seeded weights, and the caller's random state untouched
            torch.manual_seed(0)
            components = build_random(ref.split(":", 1)[1], dtype=dtype, device=device)
        if vae:
            components.vae = load_vae(vae, dtype, allow_pickle).to(device=device).requires_grad_(False)
        return components
    source = resolve_model_dir(ref, allow_pickle, single_file_config)
    local = isinstance(source, Path)
    check_revision(ref, source, revision)

    def load(cache_only: bool) -> tuple[tuple[Any, ...], ModelFamily, dict[str, Any]]:
        files, weights = _read_options(allow_pickle, cache_only, dtype, variant, revision)
        parts = _load_parts(source, files, weights)
        family = detect_family(parts[1].config, dict(parts[2].config))
        return parts, family, _load_extra_encoders(family, source, files, weights)

    try:
        parts, family, extra = load(True)
    except (OSError, ValueError) as error:
        # A hub id not in the cache: download only when the hub can be reached, so offline fails at once.
        if local or not hub_reachable():
            raise _load_failure(ref, source, error, variant, revision) from error
        try:
            parts, family, extra = load(False)
        except (OSError, ValueError) as second:
            raise _load_failure(ref, source, second, variant, revision) from second
    tokenizer, text_encoder, unet, base_vae, noise_scheduler = parts
    if vae:
        base_vae = load_vae(vae, dtype, allow_pickle)
    for module in (unet, base_vae, text_encoder, *(m for m in extra.values() if isinstance(m, torch.nn.Module))):
        module.to(device=device).requires_grad_(False)  # base weights never train; adapters opt in
    return Components(ref, family, tokenizer, text_encoder, unet, base_vae, noise_scheduler, source if local else None, **extra)


def load_model(model_cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Components:
    """The base model a `[model]` config section describes: `load_components` with its options, its base weights
    fused in, then its clip skip and prediction type."""
    components = load_components(
        model_cfg.name, dtype=dtype, device=device, allow_pickle=model_cfg.allow_pickle, vae=model_cfg.vae, single_file_config=model_cfg.single_file_config,
        variant=model_cfg.variant, revision=model_cfg.revision,
    )
    if model_cfg.base_weights:  # before the clip skip, which drops the layers after the one read
        from dreamlora.generate import fuse_base_weights

        fuse_base_weights(components, model_cfg.base_weights)
    apply_clip_skip(components, model_cfg.clip_skip)
    apply_prediction_type(components, model_cfg.prediction_type)
    return components


def apply_prediction_type(components: Components, prediction_type: str) -> None:
    """Treat the UNet as predicting `prediction_type` (epsilon or v_prediction; auto keeps the model's scheduler
    config), for training targets and sampling alike: a v-prediction model whose files do not say so (kohya's
    --v_parameterization, diffusers' --prediction_type)."""
    if prediction_type == "auto" or components.prediction_type == prediction_type:
        return
    log.warning("treating the model as %s (its scheduler config says %s)", prediction_type, components.prediction_type)
    components.noise_scheduler = type(components.noise_scheduler).from_config(components.noise_scheduler.config, prediction_type=prediction_type)


def apply_clip_skip(components: Components, clip_skip: int) -> None:
    """Read prompts from the text encoder's `clip_skip`-th layer from the end (2: the penultimate), as A1111's
    "Clip skip" and kohya's `--clip_skip` do: that layer's hidden state through the encoder's final layer norm.

    The encoder's last `clip_skip - 1` layers are dropped, which gives exactly that output; so training, class
    images, samples and `generate` all see the same prompts, and no LoRA goes on layers the UNet never reads.
    Calling it again with the same value does nothing.
    """
    if clip_skip == components.clip_skip:
        return
    if components.clip_skip != 1:
        raise ValueError(f"clip skip is already {components.clip_skip} on these components; load the model again for {clip_skip}")
    if components.family.name == "sdxl":
        raise ConfigError(
            f"clip skip {clip_skip} was asked for, but SDXL models already read their text encoders' penultimate layer "
            "(clip skip applies to SD 1.x/2.x models); drop --clip-skip / model.clip_skip"
        )
    encoder = getattr(components.text_encoder, "text_model", components.text_encoder)  # transformers < 5 has the extra level
    layers = list(encoder.encoder.layers)
    if clip_skip > len(layers):
        raise ConfigError(f"clip skip {clip_skip} is more than this model's text encoder has layers ({len(layers)}); SD 1.x models use 1 or 2")
    kept = len(layers) - (clip_skip - 1)
    encoder.encoder.layers = torch.nn.ModuleList(layers[:kept])
    components.text_encoder.config.num_hidden_layers = kept
    components.clip_skip = clip_skip


def _variant_hint(folder: Path, variant: str) -> str:
    """Why a folder's weights did not load when it is a matter of variants: the files it has are of another one."""
    files = [p.name for p in folder.glob("*/*.safetensors")]
    infixes = sorted({m.group(1) for name in files if (m := re.fullmatch(r"[^.]+\.([A-Za-z0-9_]+)(?:-\d+-of-\d+)?\.safetensors", name))})
    plain = [name for name in files if name.count(".") == 1]
    if not variant and infixes and not plain:
        return f"; its weights are {' and '.join(infixes)}-variant files only ({', '.join(sorted(files)[:2])}): pass --variant {infixes[0]}"
    if variant and variant not in infixes:
        return f"; it has no {variant}-variant weights (*.{variant}.safetensors): drop --variant{' or pass --variant ' + infixes[0] if infixes else ''}"
    return ""


def _load_failure(ref: str, source: Path | str, error: Exception | None, variant: str = "", revision: str = "") -> ModelLoadError:
    if isinstance(source, Path):
        if hint := _variant_hint(source, variant):
            return ModelLoadError(f"could not load the model in '{source}'{hint}")
        return ModelLoadError(f"could not load the model in '{source}': {error}; check that it is a complete diffusers Stable Diffusion folder")
    reason = "the Hugging Face hub is unreachable from this machine" if not hub_reachable() else f"loading failed: {error}"
    at = f" --revision {revision}" if revision else ""
    return ModelLoadError(
        f"model {ref!r}{' at revision ' + repr(revision) if revision else ''} is not in the local cache and {reason}. Download it where there is network "
        f"(`hf download {ref}{at}`) and pass the local folder with --model PATH, set DREAMLORA_MODEL, "
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
    tokenizer_dir = cache_root() / "char-tokenizer"
    if not (tokenizer_dir / "vocab.json").is_file():
        write_char_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    extra: dict[str, Any] = {}
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(read("unet"))
        vae = AutoencoderKL.from_config(read("vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**read("text_encoder")))
        family = detect_family(text_encoder.config, dict(unet.config))
        if len(family.text_encoder_names) > 1:
            import transformers

            for tokenizer_name, encoder_name, class_name in list(zip(family.tokenizer_names, family.text_encoder_names, family.text_encoder_classes))[1:]:
                extra[tokenizer_name] = tokenizer  # the char tokenizer: ids are all that matters for speed
                extra[encoder_name] = getattr(transformers, class_name)(CLIPTextConfig(**read(encoder_name)))
    noise_scheduler = DDPMScheduler.from_config(read("scheduler"))
    for module in (unet, vae, text_encoder, *(m for m in extra.values() if isinstance(m, torch.nn.Module))):
        module.to(dtype=dtype).requires_grad_(False)
    return Components(f"random:{arch}", family, tokenizer, text_encoder, unet, vae, noise_scheduler, **extra)


def public_model_ref(ref: str) -> str:
    """The model reference as recorded in run metadata: a local path keeps only its folder name."""
    if ref in TINY_PRESETS or ref == "toy" or ref.startswith("random:"):
        return ref
    path = Path(ref).expanduser()
    local = ref.startswith((".", "/", "~")) or "\\" in ref or ref.count("/") > 1 or path.exists()
    if not local:
        return ref  # a hub id
    return path.resolve().name if path.exists() else Path(ref.replace("\\", "/")).name


def model_fingerprint(folder: Path) -> str:
    """A short hash that tells two local model folders apart where their public names (folder names) agree: every
    config file, and each weights file's size and first MiB (its header and the start of its tensors)."""
    import hashlib

    digest = hashlib.sha256()
    root = Path(folder)
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        relative = path.relative_to(root).as_posix()
        if path.suffix == ".json":
            digest.update(f"{relative}\n".encode() + path.read_bytes())
        elif path.suffix in (".safetensors", ".bin", ".ckpt", ".pt"):
            with path.open("rb") as handle:
                digest.update(f"{relative}:{path.stat().st_size}\n".encode() + handle.read(1 << 20))
    return digest.hexdigest()[:16]


def read_length(tokenizer: Any, max_tokens: int = 0) -> int:
    """How many tokens of a prompt (BOS and EOS included) `tokenize` reads: the tokenizer's own window, whatever its
    size, up to `max_tokens` 75 (the default); `max_tokens` + 2 past it."""
    window = int(tokenizer.model_max_length)
    return window if max_tokens <= 75 or max_tokens + 2 <= window else max_tokens + 2


def tokenize(tokenizer: Any, prompts: list[str], max_tokens: int = 0) -> torch.Tensor:
    """Token ids padded to the tokenizer's maximum length, as Stable Diffusion expects.

    `max_tokens` past 75 (kohya's --max_token_length 150 or 225): each prompt is read to that many tokens and cut into
    windows of BOS + 75 tokens + EOS/pad (a smaller tokenizer's window less 2), side by side; `encode_prompts` joins
    their encodings back. For tokenizers whose pad is not EOS (SD 2.x, SDXL's second) a window cut mid-prompt ends in
    EOS and an empty one reads BOS EOS PAD ..., as kohya makes them.
    """
    ids = tokenizer(prompts, padding="max_length", max_length=read_length(tokenizer, max_tokens), truncation=True, return_tensors="pt").input_ids
    return window_ids(tokenizer, ids, max_tokens)


def window_ids(tokenizer: Any, ids: torch.Tensor, max_tokens: int = 0) -> torch.Tensor:
    """Token ids read to `read_length` (BOS, text, EOS, padding) laid out as `tokenize` gives them: as they are within
    one window, else cut into windows side by side."""
    window = tokenizer.model_max_length
    if ids.shape[-1] == window:
        return ids
    windows = []
    for start in range(1, max_tokens + 1, window - 2):
        part = torch.cat([ids[:, :1], ids[:, start : start + window - 2], ids[:, -1:]], dim=1)
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        if pad != eos:
            part[(part[:, -2] != eos) & (part[:, -2] != pad), -1] = eos
            part[part[:, 1] == pad, 1] = eos
        windows.append(part)
    return torch.cat(windows, dim=1)


def encode_prompt(text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The last hidden state of the text encoder: the UNet's cross-attention context."""
    return text_encoder(input_ids)[0]


def tokenize_all(components: Components, prompts: list[str], max_tokens: int = 0) -> list[torch.Tensor]:
    """Token ids of `prompts` for each of the family's tokenizers, in text-encoder order (`tokenize`'s `max_tokens`)."""
    return [tokenize(tokenizer, prompts, max_tokens) for tokenizer in components.tokenizers]


def encode_prompts(components: Components, input_ids: list[torch.Tensor], text_encoders: Sequence[torch.nn.Module] | None = None) -> PromptEmbeddings:
    """The family's prompt encoding (`text_encoders` replaces the components' own, e.g. wrapped for training)."""
    encoders = list(text_encoders) if text_encoders is not None else list(components.text_encoders.values())
    window = int(components.tokenizers[0].model_max_length)
    count = int(input_ids[0].shape[-1]) // window
    if count <= 1:
        return components.family.encode(encoders, input_ids)
    # Long prompts (`tokenize`'s windows): each window encoded alone, then BOS, every window's 75 tokens and the last
    # EOS joined (1 + 75 x windows + 1 positions); the pooled prompt is the first window's, as kohya's scripts do.
    rows = int(input_ids[0].shape[0])
    out = components.family.encode(encoders, [ids.reshape(rows * count, window) for ids in input_ids])
    hidden = out.context.reshape(rows, count * window, -1)
    parts = [hidden[:, :1], *[hidden[:, i * window + 1 : (i + 1) * window - 1] for i in range(count)], hidden[:, -1:]]
    pooled = out.pooled.reshape(rows, count, -1)[:, 0] if out.pooled is not None else None
    return PromptEmbeddings(torch.cat(parts, dim=1), pooled)


def default_guidance_rescale(scheduler: Any) -> float:
    """0.7 for a zero-terminal-SNR schedule, as Lin et al. advise (classifier-free guidance over-exposes such models
    otherwise; ComfyUI's RescaleCFG, A1111's CFG rescale), else 0 (plain guidance)."""
    return 0.7 if getattr(scheduler, "config", {}).get("rescale_betas_zero_snr") else 0.0


def sampler_from(config: Any, scheduler: str) -> Any:
    """Sampler `scheduler` (one of `prompts.SAMPLERS`) on the noise schedule of a scheduler `config` (the model's, with
    its prediction type, betas and zero-terminal-SNR rescaling, or another sampler's)."""
    import diffusers

    class_name, extra = SAMPLER_CLASSES[scheduler]
    return getattr(diffusers, class_name).from_config(dict(config), **extra)


# prompts.SAMPLERS -> (diffusers class, options)
SAMPLER_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def build_pipeline(components: Components, scheduler: str = "dpm++") -> Any:
    """A StableDiffusionPipeline (the family's pipeline class) over the loaded components with an inference scheduler."""
    from diffusers import StableDiffusionPipeline

    inference = sampler_from(components.noise_scheduler.config, scheduler)
    if components.family.pipeline_class != "StableDiffusionPipeline":
        return _build_family_pipeline(components, inference)
    pipeline = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=inference,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def pipeline_family(pipeline: Any) -> ModelFamily:
    """The family whose pipeline class `pipeline` is (SD 1.x for anything else)."""
    return next((f for f in FAMILIES.values() if f.pipeline_class == type(pipeline).__name__), SD1)


def _build_family_pipeline(components: Components, scheduler: Any) -> Any:
    """The family's own pipeline class (SDXL: StableDiffusionXLPipeline) over the loaded components."""
    import diffusers

    parts = {name: getattr(components, name) for name in (*components.family.text_encoder_names, *components.family.tokenizer_names)}
    options = {"add_watermarker": False} if components.family.pipeline_class == "StableDiffusionXLPipeline" else {}
    pipeline = getattr(diffusers, components.family.pipeline_class)(vae=components.vae, unet=components.unet, scheduler=scheduler, **parts, **options)
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
