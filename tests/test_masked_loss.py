"""`--masked-loss`: each photo's alpha channel weights its loss, cropped and flipped exactly as its pixels are on
every data path (cached centre crops, random crops, buckets), and the class half counts whole."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dreamlora import train as train_module
from dreamlora.cli import app
from dreamlora.config import load_config
from dreamlora.data import latent_mask
from dreamlora.lora import read_safetensors
from dreamlora.models import load_components
from dreamlora.step import dreambooth_loss
from dreamlora.train import DreamBoothBatches, resolve_data

runner = CliRunner()


def _cutouts(folder: Path) -> Path:
    """Non-square RGBA photos: an opaque red region (a different one in each) on a transparent background."""
    folder.mkdir(parents=True)
    for i, (left, right) in enumerate(((0, 20), (10, 44), (30, 48))):
        image = Image.new("RGBA", (48, 32), (0, 200, 0, 0))  # green where transparent: flattened to white
        for x in range(left, right):
            for y in range(4 + 3 * i, 28):
                image.putpixel((x, y), (255, 0, 0, 255))
        image.save(folder / f"cut{i}.png")
    return folder


def test_latent_mask_is_the_alpha_area_averaged_and_mirrored() -> None:
    assert torch.equal(latent_mask(None, (4, 6), False), torch.ones(1, 4, 6))
    alpha = Image.new("L", (8, 4), 0)
    for x in range(4):
        for y in range(4):
            alpha.putpixel((x, y), 255)
    mask = latent_mask(alpha, (2, 4), False)
    assert mask.shape == (1, 2, 4) and torch.equal(mask[0, 0], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert torch.equal(latent_mask(alpha, (2, 4), True)[0, 0], torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_masked_loss_ignores_what_the_mask_hides() -> None:
    pred = torch.zeros(2, 4, 2, 2, requires_grad=True)
    target = torch.ones(2, 4, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    loss, instance, prior = dreambooth_loss(pred, target, 1, 1.0, mask=mask)
    loss.backward()
    assert instance.item() == pytest.approx(0.5) and prior.item() == pytest.approx(1.0)  # the hidden half adds nothing, not renormalised
    assert torch.all(pred.grad[0, :, :, 1] == 0) and torch.all(pred.grad[0, :, :, 0] != 0) and torch.all(pred.grad[1] != 0)


@pytest.mark.parametrize("extra", [
    {},  # cached centre crops
    {"data.center_crop": "false"},  # random crops, encoded every step
    {"data.buckets": "true"},  # aspect-ratio buckets, cached per size
    {"data.buckets": "true", "data.center_crop": "false"},  # buckets with random crops
], ids=["centre", "random-crop", "buckets", "buckets-random-crop"])  # fmt: skip
def test_masks_follow_each_views_crop_and_flip(tmp_path: Path, class_dir: Path, monkeypatch: pytest.MonkeyPatch, extra: dict[str, str]) -> None:
    """A stand-in VAE encodes each view's redness (the opaque region) as its latent; on every path the mask must be
    that same region: the alpha cropped and mirrored exactly as the pixels were."""

    def redness(vae, pixels, batch_size=2, where=""):
        red = (1 - pixels[:, 1:2].float()) / 2  # red 1, white 0, from the green channel
        factor = 2  # the tiny VAE's
        red = torch.nn.functional.interpolate(red, size=(pixels.shape[-2] // factor, pixels.shape[-1] // factor), mode="area")
        return red.repeat(1, 4, 1, 1), torch.zeros_like(red).repeat(1, 4, 1, 1)

    monkeypatch.setattr(train_module, "encode_latent_stats", redness)
    photos = _cutouts(tmp_path / "cutouts")
    overrides = {
        "model.name": "tiny", "data.instance_dir": str(photos), "data.class_dir": str(class_dir), "data.class_name": "dog", "data.resolution": "32",
        "data.flip": "true", "data.masked_loss": "true", "data.cache_latents": "false", "train.batch_size": "2", **extra,
    }  # fmt: skip
    cfg, _ = resolve_data(load_config(None, overrides), priors_root=tmp_path / "none")
    components = load_components("tiny")
    batches = DreamBoothBatches(cfg, components, torch.device("cpu"))
    scaling = components.vae.config.scaling_factor
    flipped_views = 0
    for step in range(12):
        batch = batches.draw_batch(step)
        seen = batch.latents[:2, :1] / scaling  # the redness the stand-in VAE encoded for each instance view
        assert batch.masks.shape == (batch.latents.shape[0], 1, *batch.latents.shape[-2:])
        assert (seen - batch.masks[:2]).abs().mean() < 0.05 and (seen - batch.masks[:2]).abs().max() < 0.6, step
        assert torch.equal(batch.masks[2:], torch.ones_like(batch.masks[2:]))  # class images count whole
        flipped_views += int((seen - batch.masks[:2].flip(-1)).abs().mean() > 0.2)
    assert flipped_views > 0  # the check would catch a mask that is not mirrored with its view


def test_masked_training_runs_and_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, instance_dir: Path) -> None:
    monkeypatch.chdir(tmp_path)
    photos = _cutouts(tmp_path / "cutouts")
    common = ["train", "--model", "tiny", "--max-steps", "2", "--resolution", "32", "--set", "train.num_samples=0", "--set", "train.log_every=1", "--masked-loss"]
    trained = runner.invoke(app, [*common, "--instance", str(photos), "--flip", "--out", "runs/m"])
    assert trained.exit_code == 0, trained.output
    losses = [json.loads(line)["loss"] for line in (tmp_path / "runs" / "m" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < v < float("inf") for v in losses)
    exported = runner.invoke(app, ["export", "runs/m", "--format", "a1111", "--out", "m.safetensors", "--no-verify"])
    assert exported.exit_code == 0, exported.output
    meta = read_safetensors(tmp_path / "m.safetensors")[1]
    assert meta["ss_masked_loss"] == "True" and meta["ss_alpha_mask"] == "True"
    report = runner.invoke(app, ["dataset", "--instance", str(photos), "--masked-loss"])
    assert report.exit_code == 0 and "3 of 3 photos have an alpha channel" in " ".join(report.output.replace("│", " ").split()), report.output
    plain = runner.invoke(app, [*common, "--instance", str(instance_dir), "--out", "runs/plain"])
    assert plain.exit_code == 0 and "none of the" in " ".join(plain.output.split()), plain.output


def _mask_folder(photos: Path, out: Path, scale: float = 1.0) -> Path:
    """Each cut-out's alpha channel as a greyscale mask of the same name (a .png, or .jpg for the second), `scale` times its size."""
    out.mkdir(parents=True)
    for i, path in enumerate(sorted(photos.glob("*.png"))):
        alpha = Image.open(path).getchannel("A")
        alpha = alpha.resize((round(alpha.width * scale), round(alpha.height * scale)), Image.Resampling.NEAREST) if scale != 1 else alpha
        alpha.save(out / f"{path.stem}.{'jpg' if i == 1 and scale == 1 else 'png'}", **({"quality": 100} if i == 1 else {}))
    return out


def _flattened(photos: Path, out: Path) -> Path:
    """The cut-outs as plain RGB photos (flattened on white, as training sees them) without an alpha channel."""
    from dreamlora.data import load_image

    out.mkdir(parents=True)
    for path in sorted(photos.glob("*.png")):
        load_image(path).image.save(out / path.name)
    return out


@pytest.mark.parametrize("extra", [{}, {"data.buckets": "true", "data.center_crop": "false"}], ids=["centre", "buckets-random-crop"])
def test_masks_from_a_folder_weight_the_loss_as_the_alpha_channel_does(tmp_path: Path, class_dir: Path, extra: dict[str, str]) -> None:
    photos = _cutouts(tmp_path / "cutouts")
    plain, masks = _flattened(photos, tmp_path / "plain"), _mask_folder(photos, tmp_path / "masks")
    common = {"model.name": "tiny", "data.class_dir": str(class_dir), "data.class_name": "dog", "data.resolution": "32", "data.flip": "true",
              "data.masked_loss": "true", "data.cache_latents": "false", "train.batch_size": "2", **extra}  # fmt: skip
    components = load_components("tiny")
    by_alpha = DreamBoothBatches(resolve_data(load_config(None, {**common, "data.instance_dir": str(photos)}), priors_root=tmp_path / "none")[0], components, torch.device("cpu"))
    folder_cfg = resolve_data(load_config(None, {**common, "data.instance_dir": str(plain), "data.mask_dir": str(masks)}), priors_root=tmp_path / "none")[0]
    by_folder = DreamBoothBatches(folder_cfg, components, torch.device("cpu"))
    for step in range(6):
        alpha_batch, folder_batch = by_alpha.draw_batch(step), by_folder.draw_batch(step)
        torch.testing.assert_close(folder_batch.latents, alpha_batch.latents)
        torch.testing.assert_close(folder_batch.masks, alpha_batch.masks, atol=0.02, rtol=0)  # one mask is a JPEG
        assert folder_batch.masks[:2].min() < 0.1 < 0.9 < folder_batch.masks[:2].max()  # masks, not all ones


def test_mask_files_are_matched_by_name_scaled_and_checked(tmp_path: Path) -> None:
    from dreamlora.data import list_images, load_masks
    from dreamlora.errors import DataError

    photos = _cutouts(tmp_path / "cutouts")
    folder, sizes = list_images(photos, "instance"), [(48, 32)] * 3
    half = load_masks(folder, _mask_folder(photos, tmp_path / "half", scale=0.5), sizes)
    whole = load_masks(folder, _mask_folder(photos, tmp_path / "whole"), sizes)
    assert [m.size for m in half] == sizes and [m.mode for m in half] == ["L"] * 3
    for small, full in zip(half, whole):  # scaled up to the photo: the same region, up to its blurred edge
        assert (torch.tensor(list(small.getdata()), dtype=torch.float) - torch.tensor(list(full.getdata()), dtype=torch.float)).abs().mean() < 20
    (tmp_path / "whole" / "cut0.png").unlink()
    with pytest.raises(DataError, match=r"no mask for 1 of the 3 photos \(cut0.png\)"):
        load_masks(folder, tmp_path / "whole", sizes)
    Image.new("L", (48, 32), 255).save(tmp_path / "whole" / "cut0.png")
    Image.new("L", (48, 32), 255).save(tmp_path / "whole" / "cut0.webp")
    with pytest.raises(DataError, match=r"more than one mask for cut0 \(cut0.png, cut0.webp\)"):
        load_masks(folder, tmp_path / "whole", sizes)
    (tmp_path / "whole" / "cut0.webp").unlink()
    Image.new("L", (32, 32), 255).save(tmp_path / "whole" / "cut0.png")
    with pytest.raises(DataError, match=r"mask '.*cut0.png' is 32x32 but its photo 'cut0.png' is 48x32"):
        load_masks(folder, tmp_path / "whole", sizes)


def test_mask_folder_training_from_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    photos = _cutouts(tmp_path / "cutouts")
    plain, masks = _flattened(photos, tmp_path / "plain"), _mask_folder(photos, tmp_path / "masks")
    Image.new("L", (48, 32), 0).save(masks / "cut2.png")  # one all-black mask: that photo teaches nothing
    common = ["train", "--model", "tiny", "--instance", str(plain), "--max-steps", "1", "--resolution", "32", "--set", "train.num_samples=0"]
    trained = runner.invoke(app, [*common, "--mask-dir", str(masks), "--out", "runs/m"])
    assert trained.exit_code == 0, trained.output
    said = " ".join(trained.output.replace("│", " ").split())
    assert "--mask-dir: 3 photos masked by the files in" in said and "the masks of cut2.png are black" in said
    exported = runner.invoke(app, ["export", "runs/m", "--format", "a1111", "--out", "m.safetensors", "--no-verify"])
    assert exported.exit_code == 0, exported.output
    meta = read_safetensors(tmp_path / "m.safetensors")[1]
    assert meta["ss_masked_loss"] == "True" and meta["ss_alpha_mask"] == "False"
    report = runner.invoke(app, ["dataset", "--instance", str(plain), "--mask-dir", str(masks)])
    assert report.exit_code == 0 and "every photo has its mask in" in " ".join(report.output.replace("│", " ").split()), report.output
    (masks / "cut1.jpg").unlink()
    missing = runner.invoke(app, [*common, "--mask-dir", str(masks), "--out", "runs/missing"])
    assert missing.exit_code == 2 and "has no mask for 1 of the 3 photos (cut1.png)" in " ".join(missing.output.replace("│", " ").split())
    assert "Traceback" not in missing.output
    unmasked = runner.invoke(app, [*common, "--set", f"data.mask_dir={masks}", "--out", "runs/off"])
    assert unmasked.exit_code == 2 and "data.mask_dir is set but data.masked_loss is off" in " ".join(unmasked.output.replace("│", " ").split())


def test_a_first_batch_hidden_by_its_masks_is_not_taken_for_a_gradient_bug(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    plain = _flattened(_cutouts(tmp_path / "cutouts"), tmp_path / "plain")
    masks = tmp_path / "black"
    masks.mkdir()
    for path in plain.iterdir():
        Image.new("L", (48, 32), 0).save(masks / path.name)
    trained = runner.invoke(app, ["train", "--model", "tiny", "--instance", str(plain), "--mask-dir", str(masks), "--max-steps", "1", "--resolution", "32",
                                  "--set", "train.num_samples=0", "--out", "runs/black"])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    assert "the masks of cut0.png, cut1.png, cut2.png are black" in " ".join(trained.output.replace("│", " ").split())
