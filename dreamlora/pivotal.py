"""Pivotal tuning: new token embeddings for the subject, learned beside the LoRA.

This is the embedding half of diffusers' advanced DreamBooth script (`--train_text_encoder_ti`) and of
cloneofsimo's lora_pti. The subject's token (`sks`) becomes N new tokens `<sks_0> ... <sks_N-1>` in each
tokenizer; prompts keep spelling the token, and `expand_prompt` swaps the word for the new tokens before they are
tokenized. While training, a forward hook on each text encoder's token-embedding table puts the trained vectors at
the new tokens' positions, so the table (every existing token) stays exactly as the base model has it. For
inference `install` writes the vectors into the table's new rows instead.

The vectors are saved and exported as one tensor per text encoder (N x width) under the names AUTOMATIC1111,
ComfyUI, kohya's tools and diffusers' `load_textual_inversion` read: `emb_params` for one-encoder families,
`clip_l` / `clip_g` for SDXL; bundled into an A1111 LoRA file as `bundle_emb.<token>.*`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from dreamlora.errors import ConfigError, ExportError

log = logging.getLogger(__name__)

EMBEDDINGS_FILE = "embeddings.safetensors"  # beside a run's (or checkpoint's) LoRA file
EXPORT_SUFFIX = "_emb.safetensors"  # beside an exported LoRA: diffusers' advanced script's name for it
BUNDLE_PREFIX = "bundle_emb."
TOKEN_METADATA = "dreamlora_token"
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
SINGLE_KEY = "emb_params"
BUNDLE_SINGLE_KEY = "string_to_param.*"  # kohya's and A1111's name for a one-encoder bundled embedding


def placeholders(token: str, vectors: int) -> list[str]:
    """The new tokens standing for `token`: `<sks_0>`, `<sks_1>`, ... (lower case: CLIP lower-cases prompts)."""
    return [f"<{token.lower()}_{i}>" for i in range(vectors)]


def expand_prompt(prompt: str, token: str, vectors: int) -> str:
    """`prompt` with every whole-word `token` (any case, as CLIP reads it) replaced by its new tokens."""
    pattern = rf"(?<![\w<]){re.escape(token)}(?![\w>])"
    return re.sub(pattern, " ".join(placeholders(token, vectors)), prompt, flags=re.IGNORECASE)


def embedding_keys(encoder_names: list[str]) -> dict[str, str]:
    """The file key of each text encoder's vectors: `emb_params` for one encoder, `clip_l`/`clip_g` for SDXL's two."""
    if len(encoder_names) == 1:
        return {encoder_names[0]: SINGLE_KEY}
    return {name: SDXL_KEYS[name] for name in encoder_names}


def _add_tokens(tokenizer: Any, encoder: torch.nn.Module, token: str, vectors: int) -> int:
    """Add the placeholders to `tokenizer`, grow `encoder`'s embedding table to match (base rows untouched, the table
    stays frozen), and return the first placeholder's id (the others follow it)."""
    names = placeholders(token, vectors)
    if any(name in tokenizer.get_vocab() for name in names):
        raise ConfigError(f"the tokenizer already has a token among {', '.join(names)}; pick another --token for pivotal tuning")
    before = len(tokenizer)
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(before, before + vectors)):
        raise ConfigError(f"the tokenizer gave the new tokens {names} the ids {ids}, not {before}..{before + vectors - 1}; pivotal tuning cannot index them")
    table = encoder.get_input_embeddings()
    if table.num_embeddings < len(tokenizer):
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        encoder.get_input_embeddings().requires_grad_(False)
    _fix_pooled_eos(encoder, tokenizer)
    return before


def _fix_pooled_eos(encoder: torch.nn.Module, tokenizer: Any) -> None:
    """CLIP configs converted long ago say eos_token_id 2, and transformers then finds the end of a prompt (SDXL's
    pooled embedding) at its highest token id: with new tokens that is a placeholder. Point it at the real one."""
    eos = tokenizer.eos_token_id
    for module in encoder.modules():
        if getattr(module, "eos_token_id", None) == 2 and eos is not None and eos != 2:
            module.eos_token_id = eos


def _init_vectors(tokenizer: Any, encoder: torch.nn.Module, vectors: int, init_word: str) -> torch.Tensor:
    """Each vector starts as the mean embedding of `init_word`'s tokens (the class word: the subject starts as 'a dog'),
    or, without one, random at the table's scale (diffusers' advanced script's default)."""
    table = encoder.get_input_embeddings().weight.detach().float()
    if init_word.strip():
        ids = tokenizer(init_word.strip(), add_special_tokens=False).input_ids
        if not ids or (tokenizer.unk_token_id is not None and all(i == tokenizer.unk_token_id for i in ids)):
            raise ConfigError(f"--pivotal-init {init_word!r} is not a word this tokenizer knows; pass another word (the class name, e.g. dog)")
        return table[ids].mean(0, keepdim=True).repeat(vectors, 1).cpu()
    return (torch.randn(vectors, table.shape[1]) * table.std()).cpu()


class PivotalEmbeddings(torch.nn.Module):
    """The trained vectors of the subject's new tokens, one parameter per text encoder (fp32), and the hooks that put
    them into each encoder's token embeddings."""

    def __init__(self, token: str, vectors: int, encoder_names: list[str]) -> None:
        super().__init__()
        self.token, self.vectors = token, vectors
        self.encoder_names = list(encoder_names)
        self.keys = embedding_keys(self.encoder_names)
        self.vectors_of = torch.nn.ParameterDict()
        self.first_ids: dict[str, int] = {}
        self._hooks: list[Any] = []
        self._encoders: dict[str, torch.nn.Module] = {}  # not submodules: the vectors are all this module holds

    @classmethod
    def attach(cls, components: Any, token: str, vectors: int, init_word: str, initial: dict[str, torch.Tensor] | None = None) -> PivotalEmbeddings:
        """Add the new tokens to every tokenizer and text encoder of `components` and hook the trained vectors in.
        `initial` (file keys to tensors, as `state_dict` gives) starts from saved vectors instead of `init_word`."""
        names = list(components.text_encoders)
        self = cls(token, vectors, names)
        for name, tokenizer in zip(names, components.tokenizers):
            encoder = components.text_encoders[name]
            start = _init_vectors(tokenizer, encoder, vectors, init_word) if initial is None else initial[self.keys[name]].float().cpu()
            self.first_ids[name] = _add_tokens(tokenizer, encoder, token, vectors)
            device = encoder.get_input_embeddings().weight.device
            self.vectors_of[name] = torch.nn.Parameter(start.to(device))
            self._hooks.append(encoder.get_input_embeddings().register_forward_hook(self._hook(name)))
            self._encoders[name] = encoder
        return self

    def _hook(self, name: str) -> Any:
        def put_vectors(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            ids = args[0]
            offset = ids - self.first_ids[name]
            new = (offset >= 0) & (offset < self.vectors)
            trained = torch.nn.functional.embedding(offset.clamp(0, self.vectors - 1), self.vectors_of[name]).to(output.dtype)
            return torch.where(new.unsqueeze(-1), trained, output)  # no host sync: the graph is the same for every prompt

        return put_vectors

    def average_gradients(self, accelerator: Any) -> None:
        """Average the vectors' gradients over processes (they sit outside the models DDP wraps)."""
        for param in self.vectors_of.values():
            if param.grad is not None:
                param.grad = accelerator.reduce(param.grad, reduction="mean")

    @torch.no_grad()
    def bake(self) -> None:
        """End of training: write the vectors into the new rows and remove the hooks, leaving the text encoders as
        `install` would (a caller that passed its own components gets them in that state)."""
        for name, encoder in self._encoders.items():
            table = encoder.get_input_embeddings().weight
            first = self.first_ids[name]
            table[first : first + self.vectors] = self.vectors_of[name].detach().to(device=table.device, dtype=table.dtype)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def expand(self, prompt: str) -> str:
        return expand_prompt(prompt, self.token, self.vectors)

    def tensors(self) -> dict[str, torch.Tensor]:
        """File key to a detached fp32 CPU copy of each encoder's vectors."""
        return {self.keys[name]: param.detach().float().cpu().clone() for name, param in self.vectors_of.items()}


def install(components: Any, token: str, tensors: dict[str, torch.Tensor], replace: bool = False) -> int:
    """Give `components` (for inference) the new tokens of a pivotal-tuned LoRA: add them to each tokenizer and write
    the vectors into each text encoder's new rows (`replace`: rows an earlier install added are overwritten, e.g. by
    another checkpoint of the same run). Returns the number of vectors per token."""
    names = list(components.text_encoders)
    keys = embedding_keys(names)
    missing = [keys[n] for n in names if keys[n] not in tensors]
    if missing:
        raise ConfigError(f"the embedding of {token!r} has {', '.join(sorted(tensors))} but this model's text encoders need {', '.join(keys[n] for n in names)}; it was trained for another model family")
    vectors = int(next(iter(tensors.values())).shape[0])
    for name, tokenizer in zip(names, components.tokenizers):
        encoder = components.text_encoders[name]
        table = encoder.get_input_embeddings()
        value = tensors[keys[name]]
        if value.shape != (vectors, table.embedding_dim):
            raise ConfigError(f"the embedding of {token!r} for {name} is {tuple(value.shape)}, but this text encoder's tokens are {table.embedding_dim} wide; it was trained for another base model")
        names = placeholders(token, vectors)
        ids = tokenizer.convert_tokens_to_ids(names) if replace and all(n in tokenizer.get_vocab() for n in names) else None
        first = ids[0] if ids is not None and ids == list(range(ids[0], ids[0] + vectors)) else _add_tokens(tokenizer, encoder, token, vectors)
        with torch.no_grad():
            table = encoder.get_input_embeddings()
            table.weight[first : first + vectors] = value.to(device=table.weight.device, dtype=table.weight.dtype)
    return vectors


# --- files ---------------------------------------------------------------------------------------


def save_embeddings(path: Path, token: str, tensors: dict[str, torch.Tensor]) -> Path:
    """The vectors as a standalone embedding file (A1111/ComfyUI/diffusers), naming the token in its metadata."""
    from safetensors.torch import save

    from dreamlora.checkpoint import write_atomic

    write_atomic(Path(path), save({k: v.contiguous() for k, v in tensors.items()}, metadata={TOKEN_METADATA: token}))
    return Path(path)


def read_embeddings(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(token, tensors) of an embedding file written by `save_embeddings` (token from its metadata, else the file name)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            token = (handle.metadata() or {}).get(TOKEN_METADATA) or Path(path).name.removesuffix(EXPORT_SUFFIX).removesuffix(".safetensors")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise ExportError(f"embedding file '{path}' cannot be read ({error}); export the run again") from error
    return token, tensors


def bundle(token: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vectors as keys of an A1111 LoRA file (`bundle_emb.<token>.string_to_param.*`, SDXL `.clip_l`/`.clip_g`)."""
    if set(tensors) == {SINGLE_KEY}:
        return {f"{BUNDLE_PREFIX}{token}.{BUNDLE_SINGLE_KEY}": tensors[SINGLE_KEY]}
    return {f"{BUNDLE_PREFIX}{token}.{key}": value for key, value in tensors.items()}


def split_bundle(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """A LoRA file's state dict without its bundled embeddings, and those embeddings per token (in `tensors` keys)."""
    lora, bundled = {}, {}
    for key, value in state_dict.items():
        if not key.startswith(BUNDLE_PREFIX):
            lora[key] = value
            continue
        token, _, name = key[len(BUNDLE_PREFIX) :].partition(".")
        bundled.setdefault(token, {})[SINGLE_KEY if name == BUNDLE_SINGLE_KEY else name] = value
    return lora, bundled


def _bundled_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    if Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return []
    with safe_open(str(path), framework="pt") as handle:
        return [k for k in handle.keys() if k.startswith(BUNDLE_PREFIX)]


def lora_without_bundle(path: Path) -> dict[str, torch.Tensor] | None:
    """An A1111 LoRA file's tensors without its bundled embeddings (diffusers' loader does not know those keys); None
    when it bundles none (load the file itself)."""
    from safetensors.torch import load_file

    if not _bundled_keys(path):
        return None
    return split_bundle(load_file(str(path)))[0]


def usage_note(token: str, tensors: dict[str, torch.Tensor], standalone: Path, bundled: bool) -> str:
    """How each consumer loads the embedding, for the export's notes."""
    vectors = int(next(iter(tensors.values())).shape[0])
    where = f"bundled in the LoRA file (AUTOMATIC1111/Forge: write {token} in the prompt) and " if bundled else ""
    if SINGLE_KEY in tensors:
        diffusers = f"diffusers: pipe.load_textual_inversion('{standalone}', token='<{token}>') and write <{token}>"
    else:
        diffusers = (
            f"diffusers: load_textual_inversion of its clip_l into text_encoder/tokenizer and its clip_g into text_encoder_2/tokenizer_2, "
            f"token '<{token}>' both times, and write <{token}>"
        )
    return (
        f"pivotal-tuned embedding of {token!r} ({vectors} vectors) {where}in {standalone.name} (ComfyUI: copy it to models/embeddings as "
        f"{token}.safetensors and write embedding:{token}; {diffusers}; dreamlora generate finds it beside the LoRA)"
    )


def export_path(out: Path) -> Path:
    """Where an export's standalone embedding file goes: `<out>_emb.safetensors` beside the LoRA file or folder."""
    return out.parent / (out.name.removesuffix(".safetensors") + EXPORT_SUFFIX)


def embeddings_for(lora_file: Path) -> tuple[str, dict[str, torch.Tensor]] | None:
    """The pivotal embedding that goes with a LoRA file: bundled in it (A1111), `embeddings.safetensors` beside it (a
    run or checkpoint), or `<export>_emb.safetensors` beside its file or folder (an export). None for a plain LoRA."""
    from safetensors import safe_open

    lora_file = Path(lora_file)
    beside = [lora_file.parent / EMBEDDINGS_FILE, export_path(lora_file), export_path(lora_file.parent)]
    for candidate in beside:
        if candidate.is_file():
            return read_embeddings(candidate)
    keys = _bundled_keys(lora_file)
    if not keys:
        return None
    with safe_open(str(lora_file), framework="pt") as handle:
        _, bundled = split_bundle({k: handle.get_tensor(k) for k in keys})
    if len(bundled) > 1:
        log.warning("'%s' bundles %d embeddings; only %s is used", lora_file, len(bundled), next(iter(bundled)))
    return next(iter(bundled.items()))
