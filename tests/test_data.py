import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import numpy as np

from dreamlora import data
from dreamlora.data import ImageFolderDataset, batch_indices, collate_dreambooth, kohya_folder_hint, list_images, load_image, open_image
from dreamlora.errors import DataError


def test_missing_empty_and_non_image_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        list_images(tmp_path / "nope", "instance")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no images"):
        list_images(tmp_path / "empty", "instance")
    only_text = tmp_path / "text"
    only_text.mkdir()
    (only_text / "notes.md").write_text("hi")
    with pytest.raises(DataError, match="has no images"):
        list_images(only_text, "instance")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="is a file"):
        list_images(tmp_path / "file.png", "instance")


def test_non_images_are_skipped_with_a_note(instance_dir: Path) -> None:
    (instance_dir / "notes.md").write_text("x")
    (instance_dir / ".DS_Store").write_bytes(b"\0")
    folder = list_images(instance_dir, "instance")
    assert len(folder.paths) == 4
    assert folder.skipped == ("notes.md (not an image)",)


def test_corrupt_truncated_and_empty_images_name_the_file(tmp_path: Path, instance_dir: Path) -> None:
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(DataError, match="zero.png.*0 bytes"):
        open_image(tmp_path / "zero.png")
    (tmp_path / "junk.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="junk.jpg.*corrupt"):
        open_image(tmp_path / "junk.jpg")
    data = (instance_dir / "photo0.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.png"):
        open_image(tmp_path / "cut.png")


def test_exif_rotation_and_modes(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert open_image(tmp_path / "rotated.jpg").size == (20, 40)
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    rgba = open_image(tmp_path / "clear.png")
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) == (255, 255, 255)
    Image.new("P", (8, 8)).save(tmp_path / "palette.bmp")
    assert open_image(tmp_path / "palette.bmp").mode == "RGB"


def test_decompression_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr("dreamlora.data.MAX_PIXELS", 10_000)
    with pytest.raises(DataError, match="too large"):
        open_image(tmp_path / "big.png")


def test_dataset_shapes_range_and_collate_order(instance_dir: Path, class_dir: Path) -> None:
    instance = ImageFolderDataset(list_images(instance_dir, "instance"), "a photo of sks dog", 32, "instance")
    klass = ImageFolderDataset(list_images(class_dir, "class"), "a photo of dog", 32, "class")
    example = instance[0]
    assert example["pixel_values"].shape == (3, 32, 32)
    assert -1.0 <= example["pixel_values"].min() and example["pixel_values"].max() <= 1.0
    assert example["pixel_values"].min() < 0 < example["pixel_values"].max()
    batch = collate_dreambooth([instance[0], instance[1]], [klass[0], klass[1]])
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["prompts"] == ["a photo of sks dog"] * 2 + ["a photo of dog"] * 2
    assert batch["n_instance"] == 2
    assert torch.equal(batch["pixel_values"][0], instance[0]["pixel_values"])


def test_random_crop_is_seeded(tmp_path: Path) -> None:
    Image.new("RGB", (64, 32), (10, 20, 30)).save(tmp_path / "wide.png")
    dataset = ImageFolderDataset(list_images(tmp_path, "instance"), "p", 32, "instance", center_crop=False)
    a = dataset.random_crop(0, torch.Generator().manual_seed(1))
    b = dataset.random_crop(0, torch.Generator().manual_seed(1))
    assert a.shape == (3, 32, 32) and torch.equal(a, b)


def test_batch_indices_cover_each_epoch_and_are_pure() -> None:
    epoch = [batch_indices(step, 1, 5, seed=3)[0] for step in range(5)]
    assert sorted(epoch) == list(range(5))
    assert batch_indices(7, 2, 5, seed=3) == batch_indices(7, 2, 5, seed=3)
    first, second = [batch_indices(s, 1, 10, seed=3)[0] for s in range(10)], [batch_indices(s, 1, 10, seed=3)[0] for s in range(10, 20)]
    assert sorted(second) == list(range(10)) and first != second  # each epoch is reshuffled


def test_tiff_avif_and_16_bit_photos_are_read(tmp_path: Path) -> None:
    Image.new("RGB", (16, 12), (10, 200, 30)).save(tmp_path / "scan.tiff")
    Image.new("RGB", (16, 12), (10, 200, 30)).save(tmp_path / "phone.avif")
    # 16-bit greyscale at half scale: PIL's own convert("RGB") would clip it to white.
    Image.fromarray(np.full((12, 16), 32768, dtype=np.uint16)).save(tmp_path / "grey16.png")
    folder = list_images(tmp_path, "instance")
    assert [p.name for p in folder.paths] == ["grey16.png", "phone.avif", "scan.tiff"]
    assert open_image(tmp_path / "scan.tiff").getpixel((0, 0)) == (10, 200, 30)
    assert open_image(tmp_path / "phone.avif").size == (16, 12)
    grey = load_image(tmp_path / "grey16.png")
    assert grey.image.mode == "RGB" and grey.image.getpixel((0, 0)) == (128, 128, 128) and "16-bit greyscale scaled to 8-bit" in grey.fixes
    # 32-bit integer greyscale holding 8-bit values stays as it is; floats in [0, 1] scale to [0, 255].
    Image.fromarray(np.full((4, 4), 100, dtype=np.int32), "I").save(tmp_path / "int.tiff")
    Image.fromarray(np.full((4, 4), 0.25, dtype=np.float32), "F").save(tmp_path / "float.tiff")
    assert load_image(tmp_path / "int.tiff").image.getpixel((0, 0)) == (100, 100, 100)
    floats = load_image(tmp_path / "float.tiff")
    assert floats.image.getpixel((0, 0)) == (64, 64, 64) and "float greyscale scaled to 8-bit" in floats.fixes


def test_heic_photos_without_pillow_heif_say_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(data, "heif_readable", lambda: False)
    only = tmp_path / "iphone"
    only.mkdir()
    (only / "IMG_0001.HEIC").write_bytes(b"\0" * 16)
    with pytest.raises(DataError, match=r"only HEIC photos \(IMG_0001.HEIC\).*pip install pillow-heif"):
        list_images(only, "instance")
    Image.new("RGB", (8, 8)).save(only / "IMG_0002.jpg")
    with caplog.at_level("WARNING"):
        folder = list_images(only, "instance")
    assert [p.name for p in folder.paths] == ["IMG_0002.jpg"]
    assert "1 HEIC photos skipped (IMG_0001.HEIC)" in caplog.text and "pillow-heif" in caplog.text


def test_heic_photos_are_read_with_pillow_heif(tmp_path: Path) -> None:
    pillow_heif = pytest.importorskip("pillow_heif")  # in the test extra; optional for users (`dreamlora[heif]`)
    pillow_heif.register_heif_opener()
    Image.new("RGB", (32, 24), (200, 10, 10)).save(tmp_path / "IMG_0001.HEIC", format="HEIF")
    folder = list_images(tmp_path, "instance")
    assert [p.name for p in folder.paths] == ["IMG_0001.HEIC"]
    photo = load_image(tmp_path / "IMG_0001.HEIC")
    assert photo.format == "HEIF" and photo.image.size == (32, 24)
    assert all(abs(a - b) <= 8 for a, b in zip(photo.image.getpixel((5, 5)), (200, 10, 10)))  # lossy, close


def test_kohya_caption_files_and_a_folder_of_subfolders(tmp_path: Path) -> None:
    from dreamlora.data import instance_prompts

    img = tmp_path / "img"
    photos = img / "10_sks dog"
    photos.mkdir(parents=True)
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(photos / f"{name}.png")
    (photos / "a.caption").write_text("sks dog on a sofa\n")  # kohya's caption extension
    (photos / "b.txt").write_text("sks dog in the snow")
    (photos / "b.caption").write_text("ignored: .txt comes first")
    folder = list_images(photos, "instance")
    assert folder.skipped == ()  # caption files are not reported as skipped non-images
    assert instance_prompts(folder, "sks", "a photo of sks dog") == ["sks dog on a sofa", "sks dog in the snow", "a photo of sks dog"]
    # kohya's parent folder (img/) holds no photos itself: the message names the subfolder to pass.
    with pytest.raises(DataError, match=r"has no images itself, but its subfolders do: '.*10_sks dog'") as raised:
        list_images(img, "instance")
    assert f"(kohya's layout, 10 repeats: --instance '{photos}' --repeats 10 --token sks --class dog)" in str(raised.value)
    shutil.copytree(photos, tmp_path / "reg" / "1_toy robot")
    with pytest.raises(DataError) as raised:
        list_images(tmp_path / "reg", "class")
    assert f"(kohya's layout: --class-dir '{tmp_path / 'reg' / '1_toy robot'}')" in str(raised.value)
    assert kohya_folder_hint(tmp_path / "reg" / "5_sks toy robot", "instance").endswith("--repeats 5 --token sks --class 'toy robot')")
    assert kohya_folder_hint(photos.parent / "photos", "instance") == ""
