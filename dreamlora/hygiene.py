"""Image-set hygiene: perceptual hashes for near-duplicates, and blank, black or NaN images."""

from __future__ import annotations

import numpy as np
from PIL import Image

NEAR_DUPLICATE_BITS = 6  # dHash distance (of 64 bits) at or below which two images count as near-duplicates
BLACK_MEAN = 0.03  # mean brightness in [0, 1] below which an image is black
BLANK_STD = 0.02  # brightness spread in [0, 1] below which an image is a flat colour


def dhash(image: Image.Image) -> int:
    """64-bit difference hash: a 9x8 grayscale thumbnail, one bit per horizontally adjacent pair (left brighter)."""
    thumb = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (thumb[:, :-1] > thumb[:, 1:]).flatten()
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def near_duplicates(hashes: list[int], max_bits: int = NEAR_DUPLICATE_BITS) -> list[tuple[int, int, int]]:
    """(i, j, distance) for every pair i < j of perceptually near-identical images."""
    return [(i, j, d) for i in range(len(hashes)) for j in range(i + 1, len(hashes)) if (d := hamming(hashes[i], hashes[j])) <= max_bits]


def later_duplicates(hashes: list[int], max_bits: int = NEAR_DUPLICATE_BITS) -> dict[int, int]:
    """Each image that nearly repeats an earlier one, mapped to the earliest one it repeats."""
    earliest: dict[int, int] = {}
    for i, j, _ in near_duplicates(hashes, max_bits):
        earliest.setdefault(j, i)  # pairs come with i ascending, so the first seen is the earliest
    return earliest


def image_problem(pixels: np.ndarray | Image.Image) -> str | None:
    """'nan', 'black' or 'blank' (one flat colour) for an unusable image, else None.

    `pixels` is a PIL image or an HxWxC array in [0, 1] (float, as a pipeline returns it before conversion) or uint8.
    """
    array = np.asarray(pixels)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        return "nan"
    gray = array.mean(axis=-1) if array.ndim == 3 else array
    if gray.mean() < BLACK_MEAN:
        return "black"
    if gray.std() < BLANK_STD:
        return "blank"
    return None
