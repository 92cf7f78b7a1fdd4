"""AUTOMATIC1111's prompt emphasis for the images dreamlora draws (`generate`, sample grids) and, with
`--weighted-captions` (kohya's `--weighted_captions`), for the captions it trains on: `(word)` weighs a word
1.1 times, `((word))` 1.21, `[word]` 1/1.1, `(word:1.3)` 1.3; `\\(` and `\\)` are literal brackets. Each token's
embedding is scaled by its weight, then the whole prompt's embedding is rescaled to its unweighted mean, as A1111 does.
Prompts without brackets take diffusers' own path unchanged."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from dreamlora.models import PromptEmbeddings, pipeline_family, read_length, window_ids

ROUND, SQUARE = 1.1, 1 / 1.1
# An escaped bracket or backslash, an opening bracket, ":weight)" closing a round bracket, a closing bracket, plain text.
_PIECE = re.compile(r"\\[()\[\]\\]|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|\]|[^\\()\[\]:]+|[\\:]")


def has_emphasis(prompt: str) -> bool:
    return bool(re.search(r"[()\[\]]", prompt))


def parse_emphasis(prompt: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) pieces, neighbours of equal weight joined. An unclosed bracket still counts from
    where it opened to the end, and a stray closing one is ignored, as A1111 reads them."""
    pieces: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _PIECE.finditer(prompt):
        text, weight = match.group(0), match.group(1)
        if text.startswith("\\") and len(text) == 2:
            pieces.append([text[1], 1.0])
        elif text == "(":
            round_open.append(len(pieces))
        elif text == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif text == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif text == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        elif weight is not None:  # ":1.2)" with no round bracket open: literal text
            pieces.append([text, 1.0])
        elif text not in (")", "]"):
            pieces.append([text, 1.0])
    for start in round_open:
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)
    joined: list[tuple[str, float]] = []
    for text, weight in pieces:
        if joined and joined[-1][1] == weight:
            joined[-1] = (joined[-1][0] + text, weight)
        else:
            joined.append((text, weight))
    return joined


def weighted_tokens(tokenizer: Any, prompts: list[str], max_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts' token ids with the brackets read, laid out as `models.tokenize` lays out plain ones (windows past 75
    tokens with `max_tokens`), and each position's weight before windowing: (prompts, `read_length`), 1 on BOS, EOS and
    padding. A window's encodings joined back (`models.encode_prompts`) line up with the weights."""
    length = read_length(tokenizer, max_tokens)
    all_ids, all_weights = [], []
    for prompt in prompts:
        ids: list[int] = []
        weights: list[float] = []
        for text, weight in parse_emphasis(prompt):
            tokens = tokenizer(text, add_special_tokens=False).input_ids
            ids += tokens
            weights += [weight] * len(tokens)
        ids, weights = ids[: length - 2], weights[: length - 2]
        padding = length - 2 - len(ids)
        all_ids.append([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id, *[tokenizer.pad_token_id] * padding])
        all_weights.append([1.0, *weights, *[1.0] * (padding + 1)])
    return window_ids(tokenizer, torch.tensor(all_ids), max_tokens), torch.tensor(all_weights)


MEAN_FLOOR = 1e-3  # weigh_context rescales a prompt only when both of its means are at least this share of its RMS


def weigh_context(encoded: PromptEmbeddings, weights: torch.Tensor | None) -> PromptEmbeddings:
    """A1111's emphasis on encoded prompts: each position's context scaled by its weight, then each prompt's context
    rescaled to its unweighted mean (SDXL's pooled embedding is not weighted). Differentiable, so training can use it."""
    if weights is None:
        return encoded
    context = encoded.context.float()
    weighted = context * weights.to(context.device, context.dtype)[..., None]
    before, after = context.mean(dim=(1, 2)), weighted.mean(dim=(1, 2))
    # A mean near zero beside the context's size (a text encoder whose final layer norm has no bias) makes the ratio
    # noise, 0 or huge: that prompt keeps its weighted context unrescaled rather than being zeroed or blown up.
    size = context.square().mean(dim=(1, 2)).sqrt()
    defined = (before.abs() > MEAN_FLOOR * size) & (after.abs() > MEAN_FLOOR * size)
    weighted = weighted * torch.where(defined, before / torch.where(defined, after, 1.0), 1.0)[:, None, None]
    return PromptEmbeddings(weighted.to(encoded.context.dtype), encoded.pooled)


def tokenize_weighted(tokenizers: Sequence[Any], prompts: list[str], max_tokens: int = 0) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Each tokenizer's ids (`weighted_tokens`) and the first one's weights, which every encoder's context shares
    (SDXL's two tokenizers split text alike); None when no prompt weighs anything."""
    rows = [weighted_tokens(tokenizer, prompts, max_tokens) for tokenizer in tokenizers]
    weights = rows[0][1]
    return [ids for ids, _ in rows], None if bool((weights == 1).all()) else weights


def plain_text(prompt: str) -> str:
    """The prompt as the text encoder reads it with emphasis: brackets and weights gone."""
    return "".join(text for text, _ in parse_emphasis(prompt))


def emphasized_embeddings(pipeline: Any, prompts: list[str]) -> PromptEmbeddings:
    """The pipeline's text encoding of `prompts` with A1111's emphasis (`weigh_context`)."""
    family = pipeline_family(pipeline)
    tokenizers = [getattr(pipeline, name) for name in family.tokenizer_names]
    encoders = [getattr(pipeline, name) for name in family.text_encoder_names]
    device = encoders[0].device
    input_ids, weights = tokenize_weighted(tokenizers, prompts)
    with torch.no_grad():
        encoded = family.encode(encoders, [ids.to(device) for ids in input_ids])
    return weigh_context(encoded, weights)


def pipeline_inputs(pipeline: Any, prompts: list[str], negative_prompts: list[str] | None) -> dict[str, Any]:
    """What to pass the pipeline for these prompts: the text itself, or (with emphasis in any of them) the embeddings."""
    negatives = negative_prompts or [""] * len(prompts)
    if not any(has_emphasis(p) for p in (*prompts, *negatives)):
        return {"prompt": prompts, "negative_prompt": negative_prompts}
    positive, negative = emphasized_embeddings(pipeline, prompts), emphasized_embeddings(pipeline, negatives)
    inputs = {"prompt_embeds": positive.context, "negative_prompt_embeds": negative.context}
    if positive.pooled is not None:
        inputs.update(pooled_prompt_embeds=positive.pooled, negative_pooled_prompt_embeds=negative.pooled)
    return inputs
