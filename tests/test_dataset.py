"""Real-world image folders: EXIF rotation, alpha, palette GIFs, corrupt files, duplicates, captions, buckets, caches."""

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from dreamlora.cli import app
from dreamlora.config import load_config, replace
from dreamlora.data import (
    batch_indices, caption_prompt, instance_prompts, jitter_colors, list_images, load_image, make_buckets, nearest_bucket, resize_and_crop, resize_and_crop_to,
)
from dreamlora.dataset_report import build_dataset_report
from dreamlora.errors import DataError
from dreamlora.hygiene import dhash, hamming, image_problem
from dreamlora.models import load_components
from dreamlora.sampling import BucketPlan, SquarePlan, class_span
from dreamlora.train import DreamBoothBatches, resolve_data, train

runner = CliRunner()


def flat(output: str) -> str:
    """Output without rich's table and panel borders and line wrapping."""
    return re.sub(r"[│┃╭╮╰╯─━┌┐└┘├┤┬┴┼╇╈┡┩┏┓┗┛\s]+", " ", output)


def scene(size: tuple[int, int], seed: int) -> Image.Image:
    """A photo-like picture: a gradient sky, a coloured disc and a bar, different for each seed."""
    w, h = size
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, h)[:, None, None]
    base = (np.array([60, 90, 160]) * (1 - y) + np.array([200, 190, 120]) * y).repeat(w, axis=1)
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    cx, cy, r = rng.integers(w // 4, 3 * w // 4), rng.integers(h // 4, 3 * h // 4), min(w, h) // 4
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    left = int(rng.integers(0, w - 8))
    draw.rectangle((left, 0, left + 6, h), fill=(20, 20, 20))
    return image


@pytest.fixture
def messy_dir(tmp_path: Path) -> Path:
    """A phone-photo folder: every case from issue 6 except the corrupt file (see `with_corrupt`)."""
    folder = tmp_path / "dog"
    folder.mkdir()
    rotated = scene((96, 64), 1)  # stored landscape, shown portrait
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(folder / "rotated.jpg", exif=exif, quality=95)
    rgba = scene((64, 64), 2).convert("RGBA")
    rgba.putalpha(Image.new("L", (64, 64), 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(folder / "heic.png")
    scene((80, 64), 3).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.gif")
    scene((64, 96), 4).save(folder / "portrait.png")
    scene((96, 64), 5).save(folder / "landscape.png")
    scene((96, 64), 5).save(folder / "landscape-copy.jpg", quality=90)  # a near-duplicate of landscape.png
    scene((20, 20), 6).save(folder / "tiny.png")  # under half of a 64 px resolution
    (folder / "portrait.txt").write_text("{token} dog asleep on a sofa\n")
    (folder / "landscape.txt").write_text("a dog in the park")
    (folder / ".DS_Store").write_bytes(b"\0\0")
    (folder / "notes.md").write_text("shot on a phone")
    return folder


@pytest.fixture
def dirty_class_dir(tmp_path: Path, messy_dir: Path) -> Path:
    folder = tmp_path / "priors" / "dog"
    folder.mkdir(parents=True)
    for i in range(4):
        scene((64, 64), 100 + i).save(folder / f"{i:05d}.png")
    Image.new("RGB", (64, 64), (0, 0, 0)).save(folder / "00004.png")
    Image.new("RGB", (64, 64), (128, 128, 128)).save(folder / "00005.png")
    shutil.copy(folder / "00001.png", folder / "00006.png")
    resize_and_crop_to(load_image(messy_dir / "portrait.png").image, (64, 64)).save(folder / "00007.png")  # a subject photo among class images
    (folder / "manifest.json").write_text(json.dumps({"prompt": "a photo of dog", "class_name": "dog", "files": []}))
    return folder


def test_images_load_upright_flattened_and_report_their_fixes(messy_dir: Path) -> None:
    folder = list_images(messy_dir, "instance")
    assert [p.name for p in folder.paths] == ["heic.png", "landscape-copy.jpg", "landscape.png", "palette.gif", "portrait.png", "rotated.jpg", "tiny.png"]
    rotated = load_image(messy_dir / "rotated.jpg")
    assert rotated.file_size == (96, 64) and rotated.image.size == (64, 96) and rotated.fixes == ("EXIF orientation 6 applied",)
    rgba = load_image(messy_dir / "heic.png")
    assert rgba.image.mode == "RGB" and rgba.image.getpixel((0, 0)) == (255, 255, 255) and "alpha flattened on white" in rgba.fixes
    gif = load_image(messy_dir / "palette.gif")
    assert gif.format == "GIF" and gif.image.mode == "RGB" and gif.fixes == ("palette converted to RGB",)


def test_captions_become_prompts_with_the_token(messy_dir: Path) -> None:
    assert caption_prompt("{token} dog on a sofa", "sks") == "sks dog on a sofa"
    assert caption_prompt("a dog in the park", "sks") == "sks, a dog in the park"
    assert caption_prompt("photo of sks dog", "sks") == "photo of sks dog"
    assert caption_prompt("a photo of (sks:1.2) dog.", "sks") == "a photo of (sks:1.2) dog."  # a word of its own in brackets
    assert caption_prompt("close-up of sks.", "sks") == "close-up of sks."
    assert caption_prompt("sksdog and sks-like toys", "sks") == "sks, sksdog and sks-like toys"  # part of a longer word: not the token
    prompts = dict(zip([p.name for p in list_images(messy_dir, "instance").paths], instance_prompts(list_images(messy_dir, "instance"), "sks", "a photo of sks dog")))
    assert prompts["portrait.png"] == "sks dog asleep on a sofa" and prompts["landscape.png"] == "sks, a dog in the park"
    assert prompts["heic.png"] == "a photo of sks dog"
    (messy_dir / "heic.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="heic.txt.*UTF-8"):
        instance_prompts(list_images(messy_dir, "instance"), "sks", "p")


def test_buckets_are_kohya_style() -> None:
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets and (384, 640) in buckets and (640, 384) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w, h) / min(w, h) <= 2 for w, h in buckets)
    assert nearest_bucket((3024, 4032), buckets) == (448, 576)  # a 3:4 phone portrait
    assert nearest_bucket((4032, 3024), buckets) == (576, 448)
    assert nearest_bucket((1000, 1000), buckets) == (512, 512)
    assert make_buckets(64, 16) == [(48, 80), (64, 64), (80, 48)]  # the tiny model: 8 x its VAE factor of 2
    assert make_buckets(512, 64, max_ratio=1.0) == [(512, 512)]  # data.bucket_max_ratio: how elongated a bucket may be
    assert (256, 1024) in make_buckets(512, 64, max_ratio=4.0) and (256, 1024) not in buckets
    wide = scene((97, 41), 3)  # the square path and the bucket path render a square view alike (they share cache entries)
    assert np.array_equal(np.asarray(resize_and_crop(wide, 32)), np.asarray(resize_and_crop_to(wide, (32, 32))))


def test_hygiene_checks() -> None:
    assert image_problem(Image.new("RGB", (8, 8))) == "black"
    assert image_problem(Image.new("RGB", (8, 8), (200, 10, 10))) == "blank"
    assert image_problem(np.full((8, 8, 3), np.nan, dtype=np.float32)) == "nan"
    assert image_problem(scene((64, 64), 1)) is None
    a, b = scene((64, 64), 1), scene((64, 64), 2)
    assert hamming(dhash(a), dhash(a.resize((48, 48)))) <= 2 and hamming(dhash(a), dhash(b)) > 10


def test_plans_repeats_and_class_ratio() -> None:
    square = SquarePlan(5, 32, 1, 1, seed=3)
    assert [square.batch(s)[0] for s in range(9)] == [batch_indices(s, 1, 5, 3) for s in range(9)]  # unchanged without repeats
    repeated = SquarePlan(3, 32, 2, 2, seed=0)
    assert repeated.batches_per_epoch == 3
    assert sorted(i for s in range(3) for i in repeated.batch(s)[0]) == [0, 0, 1, 1, 2, 2]
    assert [class_span(p, 2, 1.0) for p in range(3)] == [(0, 2), (2, 2), (4, 2)]
    assert [class_span(p, 1, 0.5)[1] for p in range(6)] == [0, 1, 0, 1, 0, 1]
    plan = BucketPlan([(48, 80), (80, 48), (80, 48), (64, 64), (80, 48)], batch_size=2, repeats=1, seed=0)
    assert plan.batches_per_epoch == 4
    epoch = [plan.batch(p) for p in range(4)]
    members = {0: (48, 80), 1: (80, 48), 2: (80, 48), 3: (64, 64), 4: (80, 48)}
    assert all(len(idx) == 2 and all(members[i] == size for i in idx) for idx, size in epoch)
    assert {i for idx, _ in epoch for i in idx} == set(members)
    assert BucketPlan(list(members.values()), 2, 1, 0).batch(5) == plan.batch(5)  # pure in (seed, position)


def test_dataset_report_finds_every_problem(tmp_path: Path, messy_dir: Path, dirty_class_dir: Path) -> None:
    (messy_dir / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    cfg = load_config(None, {
        "data.instance_dir": str(messy_dir), "data.class_dir": str(dirty_class_dir), "data.resolution": "64", "data.buckets": "true",
        "data.repeats": "2", "train.batch_size": "2", "train.max_steps": "40",
    })
    report = build_dataset_report(cfg, vae_scale_factor=2, sheet_path=tmp_path / "sheet.png")
    inst = report.instance
    assert len(inst.images) == 7 and inst.formats == {"PNG": 4, "JPEG": 2, "GIF": 1}
    assert [u.split("'")[1] for u in inst.unreadable] == [str(messy_dir / "broken.jpg")]
    assert sorted(inst.skipped) == [".DS_Store (system file, ignored)", "notes.md (not an image)"]
    assert {e.name: e.fixes for e in inst.images if e.fixes} == {
        "heic.png": ("alpha flattened on white",), "palette.gif": ("palette converted to RGB",), "rotated.jpg": ("EXIF orientation 6 applied",),
    }
    assert [(a, b) for a, b, _ in inst.near_duplicates] == [("landscape-copy.jpg", "landscape.png")]
    assert inst.too_small == ["tiny.png (20x20)"] and inst.captions == 2
    assert inst.orientations == {"portrait": 2, "landscape": 3, "square": 2}
    sizes = {e.name: e.train_size for e in inst.images}
    assert sizes["rotated.jpg"] == sizes["portrait.png"] == (48, 80) and sizes["landscape.png"] == (80, 48) and sizes["heic.png"] == (64, 64)
    assert sorted(report.klass.problems) == [("00004.png", "black"), ("00005.png", "blank")]
    assert ("00001.png", "00006.png") in [(a, b) for a, b, _ in report.klass.near_duplicates]
    assert [(a, b) for a, b, _ in report.in_class_set] == [("portrait.png", "00007.png")]
    # buckets (48x80: 2 images, 80x48: 3, 64x64: 2) x 2 repeats at batch 2: 2 + 3 + 2 batches
    assert report.steps_per_epoch == 7 and report.epochs == pytest.approx(40 / 7) and report.class_per_epoch == 14
    with pytest.raises(DataError, match="broken.jpg"):
        report.raise_if_fatal()
    # The contact sheet holds exactly the training view: the EXIF-rotated photo, upright, cover-resized and cropped to its bucket.
    sheet = np.asarray(Image.open(report.sheet))
    view = np.asarray(resize_and_crop_to(load_image(messy_dir / "rotated.jpg").image, (48, 80)).resize((96, 160), Image.Resampling.NEAREST))
    order = [e.name for e in inst.images].index("rotated.jpg")
    cell_w = 80 * 2 + 8
    x = order * cell_w + 4
    assert np.array_equal(sheet[4 : 4 + 160, x : x + 96], view)


def test_dataset_command_exits_2_naming_the_corrupt_file(tmp_path: Path, messy_dir: Path, dirty_class_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (messy_dir / "broken.jpg").write_bytes(b"garbage")
    args = ["dataset", str(messy_dir), "--class-dir", str(dirty_class_dir), "--model", "tiny", "--resolution", "64", "--buckets"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "broken.jpg'cannotberead" in flat(result.output).replace(" ", "") and "Traceback" not in result.output
    (messy_dir / "broken.jpg").unlink()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for text in ("near-duplicates", "EXIF orientation 6", "instance in class set", "black", "steps per epoch", "48x80"):
        assert text in flat(result.output), text
    assert (tmp_path / "dog-dataset.png").is_file()  # beside the folder, not inside it
    assert not (messy_dir / "dog-dataset.png").exists()


def _batches(instance: Path, class_dir: Path | None, **extra: str) -> tuple[DreamBoothBatches, object]:
    overrides = {"model.name": "tiny", "data.instance_dir": str(instance), "data.resolution": "32", "data.class_name": "dog", **extra}
    if class_dir is not None:
        overrides["data.class_dir"] = str(class_dir)
    cfg, _ = resolve_data(load_config(None, overrides), priors_root=instance.parent / "none")
    components = load_components("tiny")
    return cfg, components


def _count_encodes(components, counter: list[int]) -> None:
    encode = components.vae.encode

    def counted(pixels, *args, **kwargs):
        counter.append(pixels.shape[0])
        return encode(pixels, *args, **kwargs)

    components.vae.encode = counted


def test_latent_cache_is_reused_and_invalidated(tmp_path: Path, instance_dir: Path, class_dir: Path) -> None:
    cache = tmp_path / "latents"
    extra = {"data.flip": "true", "data.latent_cache_dir": str(cache)}
    cfg, components = _batches(instance_dir, class_dir, **extra)
    encodes: list[int] = []
    _count_encodes(components, encodes)
    first = DreamBoothBatches(cfg, components, torch.device("cpu"))
    assert len(encodes) == 2 * (4 + 6) and first.disk.misses == 20  # each image and its flip, encoded alone
    assert len(list(cache.rglob("*.safetensors"))) == 20
    encodes.clear()
    second = DreamBoothBatches(cfg, components, torch.device("cpu"))
    assert encodes == [] and second.disk.hits == 20
    assert torch.equal(first.draw(3)[0], second.draw(3)[0])
    no_disk = DreamBoothBatches(replace(cfg, data=replace(cfg.data, cache_latents=False)), components, torch.device("cpu"))
    assert torch.allclose(first.draw(3)[0], no_disk.draw(3)[0], atol=1e-5)  # the cache changes where latents come from, not what they are
    scene((40, 40), 9).save(instance_dir / "photo0.png")  # new content for one image
    encodes.clear()
    DreamBoothBatches(cfg, components, torch.device("cpu"))
    assert len(encodes) == 2  # that image and its flip
    encodes.clear()
    DreamBoothBatches(replace(cfg, data=replace(cfg.data, resolution=24)), components, torch.device("cpu"))
    assert len(encodes) == 20
    encodes.clear()
    jitter = DreamBoothBatches(replace(cfg, data=replace(cfg.data, color_jitter=0.1)), components, torch.device("cpu"))
    assert jitter.disk is None and encodes == []  # jittered views are encoded every step instead
    jitter.draw(0)
    assert encodes == [1, 1]


def test_captions_ratio_and_dropout_in_batches(tmp_path: Path, instance_dir: Path, class_dir: Path) -> None:
    (instance_dir / "photo1.txt").write_text("{token} dog on a beach")
    cfg, components = _batches(instance_dir, class_dir, **{"data.class_ratio": "0.5", "data.caption_dropout": "0.5", "data.latent_cache_dir": str(tmp_path / "c")})
    batches = DreamBoothBatches(cfg, components, torch.device("cpu"))
    assert batches.prompts == ["a photo of sks dog", "a photo of dog", "sks dog on a beach"]
    assert batches.instance_rows == [0, 2, 0, 0]
    shapes, rows_seen = [], set()
    for step in range(16):
        latents, rows, _ = batches.draw(step)
        shapes.append(latents.shape[0])
        rows_seen |= set(rows.tolist())
    assert shapes == [1, 2] * 8  # one class image every other step
    assert rows_seen == {0, 1, 2}
    uncaptioned = [batches.draw(s)[1][0].item() for s in range(40)]
    photo1 = [batches.plan.batch(s)[0][0] == 1 for s in range(40)]
    picks = [row for row, is_captioned in zip(uncaptioned, photo1) if is_captioned]
    assert 0 in picks and 2 in picks  # dropout sometimes trains the captioned photo on the plain prompt


def test_bucketed_training_with_everything_on(tmp_path: Path, messy_dir: Path, class_dir: Path) -> None:
    overrides = {
        "model.name": "tiny", "data.instance_dir": str(messy_dir), "data.class_dir": str(class_dir), "data.class_name": "dog",
        "data.resolution": "64", "data.buckets": "true", "data.flip": "true", "data.repeats": "2", "data.class_ratio": "1",
        "data.caption_dropout": "0.2", "data.latent_cache_dir": str(tmp_path / "cache"), "train.batch_size": "2", "train.max_steps": "4",
        "train.out": str(tmp_path / "runs" / "b"), "train.num_samples": "1", "prior.steps": "1", "train.log_every": "1", "train.lr": "1e-3",
    }
    cfg, _ = resolve_data(load_config(None, overrides), priors_root=tmp_path / "none")
    components = load_components("tiny")
    batches = DreamBoothBatches(cfg, components, torch.device("cpu"))
    sizes = set()
    for step in range(batches.plan.batches_per_epoch):
        latents, rows, _ = batches.draw(step)
        sizes.add(tuple(latents.shape[-2:]))
        assert latents.shape[0] == 4 and rows.shape == (4,)  # 2 instance rows, then 2 class rows at the same size
    assert sizes == {(40, 24), (24, 40), (32, 32)}  # 80x48, 48x80 and 64x64 pixels at the tiny VAE's factor 2
    result = train(cfg, components=components)
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4 and all(math.isfinite(m["loss"]) and m["prior_loss"] > 0 for m in metrics)


def test_colour_jitter_is_light_and_seeded() -> None:
    image = scene((32, 32), 1)
    a = jitter_colors(image, 0.1, torch.Generator().manual_seed(0))
    b = jitter_colors(image, 0.1, torch.Generator().manual_seed(0))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    diff = np.abs(np.asarray(a, dtype=float) - np.asarray(image, dtype=float))
    assert 0 < diff.mean() < 40


def test_train_flags_reach_the_run_config(tmp_path: Path, messy_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tomllib

    monkeypatch.chdir(tmp_path)
    args = [
        "train", "--model", "tiny", "--instance", str(messy_dir), "--resolution", "64", "--max-steps", "1", "--out", "runs/x",
        "--buckets", "--repeats", "2", "--class-ratio", "0.5", "--caption-dropout", "0.1", "--color-jitter", "0.05",
        "--no-latent-cache", "--latent-cache", "elsewhere", "--no-captions", "--set", "train.num_samples=1", "--set", "prior.steps=1",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = tomllib.loads((tmp_path / "runs" / "x" / "config.toml").read_text())["data"]
    assert (data["buckets"], data["repeats"], data["class_ratio"], data["caption_dropout"], data["color_jitter"]) == (True, 2, 0.5, 0.1, 0.05)
    assert (data["cache_latents"], data["latent_cache_dir"], data["captions"]) == (False, "elsewhere", False)
    assert not (tmp_path / "elsewhere").exists()


def test_latent_cache_prunes_least_recently_used_first(tmp_path: Path) -> None:
    import os
    import time

    from dreamlora.latent_cache import LatentDiskCache, prune_cache

    cache = LatentDiskCache(tmp_path / "latents", "vae")
    keys = [cache.key(f"image{i}", (32, 32), "centre", False) for i in range(4)]
    for i, key in enumerate(keys):
        cache.save(key, torch.full((4, 4, 4), float(i)), torch.ones(4, 4, 4))
        os.utime(cache.path(key), (time.time() - (10 - i) * 86400,) * 2)  # entry i last used 10 - i days ago
    (tmp_path / "latents" / "notes.txt").write_text("not an entry")
    size = cache.path(keys[0]).stat().st_size
    assert cache.load(keys[0]) is not None  # a hit makes entry 0 the most recently used
    usage = prune_cache(tmp_path / "latents", older_than_days=8.5)  # entry 1 (9 days) goes; 0 was just used
    assert (usage.removed, usage.entries) == (1, 3) and not cache.path(keys[1]).exists() and cache.path(keys[0]).exists()
    usage = prune_cache(tmp_path / "latents", max_bytes=2 * size)  # least recently used next: entry 2
    assert (usage.removed, usage.entries, usage.bytes) == (1, 2, 2 * size)
    assert [cache.path(k).exists() for k in keys] == [True, False, False, True]
    pruned = runner.invoke(app, ["cache", "--dir", str(tmp_path / "latents"), "--prune-days", "5"])  # entry 3, unused for 7 days
    assert pruned.exit_code == 0 and "removed" in pruned.output and [cache.path(k).exists() for k in keys] == [True, False, False, False], pruned.output
    negative = runner.invoke(app, ["cache", "--dir", str(tmp_path / "latents"), "--prune-days", "-1"])
    assert negative.exit_code == 2 and "--prune-days must be 0 or more" in negative.output and cache.path(keys[0]).exists()
    result = runner.invoke(app, ["cache", "--dir", str(tmp_path / "latents"), "--clear"])
    assert result.exit_code == 0 and "1 entries" in result.output, result.output
    assert not list((tmp_path / "latents").glob("??")) and (tmp_path / "latents" / "notes.txt").is_file()
    for wrong in ("-1", "10XB", "GB"):
        bad = runner.invoke(app, ["cache", "--dir", str(tmp_path / "latents"), "--max-size", wrong])
        assert bad.exit_code == 2 and "is not a size" in bad.output and "Traceback" not in bad.output, wrong
    from dreamlora.cli import parse_size

    assert [parse_size(t, "--max-size") for t in ("500MB", "2gb", "1.5", "1.5 G", "64k")] == [500_000_000, 2_000_000_000, 1_500_000_000, 1_500_000_000, 64_000]


def test_dataset_takes_instance_as_train_does_and_checks_the_prior_set_train_would_use(tmp_path: Path, instance_dir: Path, class_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert class_dir == tmp_path / "priors" / "dog"  # a prior set where `train` looks for one
    result = runner.invoke(app, ["dataset", "--instance", str(instance_dir), "--model", "tiny"])
    assert result.exit_code == 0, result.output
    assert "checking the prior set in priors/dog too" in flat(result.output)
    assert re.search(r"classimagesperepoch[1-9]", flat(result.output).replace(" ", ""))
    # A named class without a prior set: no class images, as train would generate them first.
    result = runner.invoke(app, ["dataset", "--instance", str(instance_dir), "--model", "tiny", "--class", "cat"])
    assert result.exit_code == 0 and "checking the prior set" not in result.output
    result = runner.invoke(app, ["dataset", str(instance_dir), "--instance", str(tmp_path / "other"), "--model", "tiny"])
    assert result.exit_code == 2 and "two instance folders given" in flat(result.output) and "Traceback" not in result.output
    # The prompts train would use, checked for the token: the prior set's own prompt among them.
    assert "token" not in flat(runner.invoke(app, ["dataset", str(instance_dir), "--model", "tiny"]).output)
    manifest = json.loads((class_dir / "manifest.json").read_text())
    (class_dir / "manifest.json").write_text(json.dumps({**manifest, "prompt": "a photo of sks dog"}))
    result = runner.invoke(app, ["dataset", str(instance_dir), "--model", "tiny", "--instance-prompt", "a photo of my dog"])
    assert result.exit_code == 0, result.output
    assert "theinstanceprompt'aphotoofmydog'doesnotcontainthetoken'sks'" in flat(result.output).replace(" ", "")
    assert "theclassprompt'aphotoofsksdog'containsthetoken'sks'" in flat(result.output).replace(" ", "")


def test_fewer_than_three_photos_are_warned_about_in_train_and_dataset(tmp_path: Path, instance_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy2(sorted(instance_dir.glob("*.png"))[0], one / "photo.png")
    overrides = {"model.name": "tiny", "data.instance_dir": str(one), "data.resolution": "32"}
    with caplog.at_level("WARNING"):
        resolve_data(load_config(None, overrides), priors_root=tmp_path / "none")
    assert "only 1 photo of the subject: DreamBooth works best with 3-20" in caplog.text
    report = build_dataset_report(load_config(None, overrides), sheet_path=tmp_path / "sheet.png")
    assert any(note.startswith("only 1 photo") for note in report.notes)
    caplog.clear()
    with caplog.at_level("WARNING"):
        resolve_data(load_config(None, {**overrides, "data.instance_dir": str(instance_dir)}), priors_root=tmp_path / "none")
    assert "photo of the subject" not in caplog.text and "photos of the subject" not in caplog.text


def test_captions_longer_than_the_text_encoder_reads_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    from dreamlora.models import load_components
    from dreamlora.train import warn_long_prompts

    tokenizer = load_components("tiny").tokenizer  # character-level: one token per character
    long = "sks dog " + "sitting on a red sofa in a sunny living room " * 3
    with caplog.at_level("WARNING"):
        cut = warn_long_prompts(tokenizer, ["a photo of sks dog", long])
    assert cut == [long]
    assert "1 prompt(s) are longer than the 77 tokens read" in caplog.text and "sks dog sitting on a red sofa" in caplog.text


def test_vary_caption_keeps_the_first_tags_shuffles_and_drops_the_rest() -> None:
    from dreamlora.data import vary_caption

    prompt = "sks, dog, red collar, on grass, sunny, close-up"
    seen = set()
    for seed in range(30):
        out = vary_caption(prompt, ",", 2, True, 0.0, torch.Generator().manual_seed(seed))
        tags = out.split(", ")
        assert tags[:2] == ["sks", "dog"] and sorted(tags[2:]) == sorted(["red collar", "on grass", "sunny", "close-up"])
        seen.add(out)
    assert len(seen) > 5  # really shuffled
    assert vary_caption(prompt, ",", 2, True, 0.0, torch.Generator().manual_seed(3)) == vary_caption(prompt, ",", 2, True, 0.0, torch.Generator().manual_seed(3))
    dropped = [vary_caption(prompt, ",", 1, False, 0.5, torch.Generator().manual_seed(s)).split(", ") for s in range(40)]
    assert all(tags[0] == "sks" for tags in dropped) and min(map(len, dropped)) < 4 and max(map(len, dropped)) == 6
    assert all(tags[1:] == [t for t in prompt.split(", ")[1:] if t in tags[1:]] for tags in dropped)  # order kept without --shuffle-caption
    assert vary_caption("a photo of sks dog", ",", 0, True, 0.5, torch.Generator().manual_seed(0)) == "a photo of sks dog"
    assert sorted(vary_caption("sks | dog | grass", "|", 1, True, 0.0, torch.Generator().manual_seed(1)).split(" | ")) == ["dog", "grass", "sks"]


def test_shuffled_captions_train_per_step_and_resume_exactly(tmp_path: Path, instance_dir: Path, class_dir: Path) -> None:
    (instance_dir / "photo1.txt").write_text("{token}, dog, red collar, on grass, sunny")
    cfg, components = _batches(instance_dir, class_dir, **{"data.shuffle_caption": "true", "data.keep_tokens": "1", "data.caption_tag_dropout": "0.2", "data.latent_cache_dir": str(tmp_path / "c")})
    batches = DreamBoothBatches(cfg, components, torch.device("cpu"))
    texts = [batches.draw_batch(s).texts for s in range(24)]
    captioned = [t[0] for t in texts if t[0] != "a photo of sks dog"]
    assert len(set(captioned)) > 2 and all(t.startswith("sks, ") for t in captioned)
    assert all(t[-1] == "a photo of dog" for t in texts if len(t) > 1)  # class prompts are left alone
    assert [batches.draw_batch(s).texts for s in range(24)] == texts  # a pure function of the step: resume is exact
    with pytest.raises(Exception, match="keep_tokens"):
        load_config(None, {"data.keep_tokens": "1"})

    runner = CliRunner()
    common = ["train", "--model", "tiny", "--instance", str(instance_dir), "--max-steps", "4", "--resolution", "32", "--set", "train.num_samples=0",
              "--shuffle-caption", "--keep-tokens", "1", "--caption-tag-dropout", "0.2", "--checkpoint-every", "2", "--set", "train.log_every=1"]
    for extra in ([], ["--no-text-encoder"]):
        out = tmp_path / ("run" + "".join(extra))
        trained = runner.invoke(app, [*common, *extra, "--out", str(out)])
        assert trained.exit_code == 0, trained.output
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", resumed)
    shutil.rmtree(resumed / "lora")
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    again = runner.invoke(app, ["train", "--resume", "--out", str(resumed)])
    assert again.exit_code == 0, again.output
    from dreamlora.lora import read_diffusers_lora

    a, b = read_diffusers_lora(tmp_path / "run" / "lora")[0], read_diffusers_lora(resumed / "lora")[0]
    assert all(torch.equal(a[g][k], b[g][k]) for g in a for k in a[g])
    exported = runner.invoke(app, ["export", str(tmp_path / "run"), "--format", "a1111", "--out", str(tmp_path / "s.safetensors"), "--no-verify"])
    assert exported.exit_code == 0, exported.output
    from dreamlora.lora import read_safetensors

    meta = read_safetensors(tmp_path / "s.safetensors")[1]
    assert (meta["ss_shuffle_caption"], meta["ss_keep_tokens"], meta["ss_caption_tag_dropout_rate"]) == ("True", "1", "0.2")
