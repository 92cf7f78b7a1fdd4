"""Shared fixtures: a per-session model cache, the tiny model, and small instance and class folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset is built once per pytest run into a temporary cache."""
    # diffusers and transformers give their loggers a stream handler on first use, bound to the sys.stderr of that
    # moment: first used inside a CliRunner invocation, it would write to that invocation's closed stream ever after
    # ("--- Logging error ---" in a later command's output). Configured here, before any invocation.
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.get_logger("diffusers")
    transformers.utils.logging.get_logger("transformers")
    cache = Path(os.environ.get("DREAMLORA_TEST_CACHE") or tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DREAMLORA_CACHE", str(cache))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.delenv("DREAMLORA_MODEL", raising=False)
        yield cache


@pytest.fixture(scope="session")
def tiny_dir(model_cache: Path) -> Path:
    from dreamlora.models import tiny_model_dir

    return tiny_model_dir("tiny")


def draw_subject(path: Path, size: tuple[int, int] = (40, 40), shift: int = 0, colour=(220, 30, 30)) -> None:
    image = Image.new("RGB", size, (200, 220, 240))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse((w // 5 + shift, h // 5, 4 * w // 5 + shift, 4 * h // 5), fill=colour)
    draw.rectangle((w // 2 - 3 + shift, h // 2 - 3, w // 2 + 3 + shift, h // 2 + 3), fill=(250, 230, 0))
    image.save(path)


@pytest.fixture
def instance_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "dog"
    folder.mkdir()
    for i in range(4):
        draw_subject(folder / f"photo{i}.png", shift=i)
    return folder


@pytest.fixture
def class_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "priors" / "dog"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
        files.append({"file": f"{i:05d}.png", "index": i, "seed": i})
    manifest = {"model": "tiny", "prompt": "a photo of dog", "class_name": "dog", "files": files, "num_images": 6}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder
