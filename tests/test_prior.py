import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreamlora.config import PriorConfig
from dreamlora.errors import ConfigError
from dreamlora.models import build_pipeline, load_components
from dreamlora.prior import generate_class_images, safe_name

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline():
    return build_pipeline(load_components("tiny"))


def test_tops_up_and_reproduces(tmp_path: Path, pipeline) -> None:
    out = tmp_path / "priors" / "dog"
    first = generate_class_images(pipeline, PriorConfig(class_name="dog", num_images=3, steps=2, batch_size=2), 32, out, "tiny")
    assert (first.existing, first.generated) == (0, 3)
    original = (out / "00001.png").read_bytes()
    (out / "00001.png").unlink()
    second = generate_class_images(pipeline, PriorConfig(class_name="dog", num_images=5, steps=2, batch_size=3), 32, out, "tiny")
    assert (second.existing, second.generated) == (2, 3)
    assert (out / "00001.png").read_bytes() == original  # per-index seeds: the same image whatever the batch
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompt"] == "a photo of dog" and manifest["num_images"] == 5
    assert [f["file"] for f in manifest["files"]] == [f"{i:05d}.png" for i in range(5)]
    assert not list(out.glob(".*"))  # no temporary files left behind
    third = generate_class_images(pipeline, PriorConfig(class_name="dog", num_images=5, steps=2), 32, out, "tiny")
    assert third.generated == 0


def test_an_interrupted_set_is_topped_up(tmp_path: Path, pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest is written before the first image, so a set cut short is recognised as dreamlora's and finished
    with the images an uninterrupted run makes (while folders without one are refused: test_bad_input)."""
    import dreamlora.prior as prior_module

    settings = PriorConfig(class_name="dog", num_images=4, steps=2, batch_size=2)
    whole = tmp_path / "whole"
    generate_class_images(pipeline, settings, 32, whole, "tiny")
    render = prior_module._render

    def first_batch_then_stop(pipeline, prior_cfg, settings, seeds, batch_size, sink):
        render(pipeline, prior_cfg, settings, dict(sorted(seeds.items())[:2]), batch_size, sink)
        raise KeyboardInterrupt

    cut = tmp_path / "cut"
    monkeypatch.setattr(prior_module, "_render", first_batch_then_stop)
    with pytest.raises(KeyboardInterrupt):
        generate_class_images(pipeline, settings, 32, cut, "tiny", model_fingerprint="first")
    monkeypatch.setattr(prior_module, "_render", render)
    assert sorted(p.name for p in cut.iterdir()) == ["00000.png", "00001.png", "manifest.json"]
    with pytest.raises(ConfigError, match="another folder of that name"):  # the early manifest knows its model too
        generate_class_images(pipeline, settings, 32, cut, "tiny", model_fingerprint="second")
    result = generate_class_images(pipeline, settings, 32, cut, "tiny", model_fingerprint="first")
    assert (result.existing, result.generated) == (2, 2)
    for i in range(4):
        assert (cut / f"{i:05d}.png").read_bytes() == (whole / f"{i:05d}.png").read_bytes()


def test_other_settings_are_not_mixed_in(tmp_path: Path, pipeline) -> None:
    out = tmp_path / "dog"
    generate_class_images(pipeline, PriorConfig(class_name="dog", num_images=1, steps=2), 32, out, "tiny")
    with pytest.raises(ConfigError, match="prompt"):
        generate_class_images(pipeline, PriorConfig(class_name="dog", prompt="a dog", num_images=2, steps=2), 32, out, "tiny")
    assert len(list(out.glob("*.png"))) == 1


def test_class_names_cannot_escape_the_folder() -> None:
    assert safe_name("../../x") == "x"
    assert safe_name("golden retriever") == "golden-retriever"
    assert "/" not in safe_name("a/b/../c")
    with pytest.raises(ConfigError):
        safe_name("../..")


class FaultyPipeline:
    """The tiny pipeline, except that chosen seeds give a black, a NaN or a repeated image (as a random base model can)."""

    def __init__(self, pipeline, bad: dict[int, str]) -> None:
        self.pipeline, self.bad = pipeline, bad

    @property
    def device(self):
        return self.pipeline.device

    @property
    def scheduler(self):
        return self.pipeline.scheduler

    def __call__(self, generator, **kwargs):
        import numpy as np
        import torch

        out = self.pipeline(generator=generator, **kwargs)
        for k, g in enumerate(generator):
            kind = self.bad.get(g.initial_seed()) or self.bad.get(("any", g.initial_seed() % 2**40))
            if kind == "black":
                out.images[k] = 0.0
            elif kind == "nan":
                out.images[k] = np.nan
            elif kind == "copy":
                out.images[k] = self.pipeline(generator=[torch.Generator().manual_seed(0)], **{**kwargs, "prompt": kwargs["prompt"][:1]}).images[0]
        return out


def test_bad_class_images_are_regenerated_with_recorded_seeds(tmp_path: Path, pipeline) -> None:
    import numpy as np
    from PIL import Image

    from dreamlora.prior import find_class_problems, retry_seed

    out = tmp_path / "dog"
    cfg = PriorConfig(class_name="dog", num_images=5, steps=2, batch_size=5)
    result = generate_class_images(FaultyPipeline(pipeline, {1: "black", 2: "nan", 3: "copy"}), cfg, 32, out, "tiny")
    assert result.rejected == (("00001.png", "black"), ("00002.png", "nan"), ("00003.png", "near-duplicate of 00000.png"))
    assert result.unresolved == () and result.rendered == 8
    manifest = json.loads((out / "manifest.json").read_text())
    entries = {e["index"]: e for e in manifest["files"]}
    for index, reason in ((1, "black"), (2, "nan"), (3, "near-duplicate of 00000.png")):
        assert entries[index]["seed"] == retry_seed(0, index, 1)
        assert entries[index]["rejected"] == [{"seed": index, "reason": reason}]
    assert "rejected" not in entries[0] and find_class_problems(out, {i: e["file"] for i, e in entries.items()}) == {}
    assert np.asarray(Image.open(out / "00001.png")).mean() > 10
    # Reproducible: a deleted replacement comes back from the seed the manifest recorded (up to CPU batch-size rounding).
    original = np.asarray(Image.open(out / "00002.png"), dtype=np.int16)
    (out / "00002.png").unlink()
    again = generate_class_images(pipeline, cfg, 32, out, "tiny")
    assert again.generated == 1 and again.rejected == ()
    assert np.abs(np.asarray(Image.open(out / "00002.png"), dtype=np.int16) - original).max() <= 2


def test_an_image_that_stays_bad_is_reported(tmp_path: Path, pipeline) -> None:
    from dreamlora.prior import MAX_RETRIES

    out = tmp_path / "dog"
    result = generate_class_images(FaultyPipeline(pipeline, {("any", 1): "black"}), PriorConfig(class_name="dog", num_images=2, steps=2), 32, out, "tiny")
    assert result.unresolved == (("00001.png", "black"),) and len(result.rejected) == MAX_RETRIES
    entry = json.loads((out / "manifest.json").read_text())["files"][1]
    assert [r["reason"] for r in entry["rejected"]] == ["black"] * MAX_RETRIES


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on CPU is exercised on Linux CI")
def test_two_processes_split_the_prior_set(tmp_path: Path, model_cache: Path) -> None:
    """Under `accelerate launch --multi_gpu --num_processes 2`, each process draws its own indices, none twice,
    and the set is the one a single process makes (per-index seeds)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "DREAMLORA_CACHE": str(model_cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = ["prior", "--model", "tiny", "--class", "dog", "-n", "5", "--steps", "2", "--resolution", "32", "--batch-size", "2"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29518", "-m", "dreamlora"]
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    two = subprocess.run(launch + args, cwd=tmp_path / "two", env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("prior set") == 1 and "2 (3 + 2 images)" in two.stdout  # rank 0 takes 0, 2, 4; rank 1 takes 1, 3
    assert re.search(r"class images, process 1/2 .* 3/3", two.stderr)  # the one bar counts the main process's 3 images
    one = subprocess.run([sys.executable, "-m", "dreamlora", *args], cwd=tmp_path / "one", env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout + one.stderr
    folders = [tmp_path / name / "priors" / "dog" for name in ("two", "one")]
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in folders]
    assert manifests[0] == manifests[1] and [f["index"] for f in manifests[0]["files"]] == list(range(5))
    assert sorted(p.name for p in folders[0].iterdir()) == [f"{i:05d}.png" for i in range(5)] + ["manifest.json"]
    for index in range(5):
        pair = [np.asarray(Image.open(folder / f"{index:05d}.png"), dtype=np.int16) for folder in folders]
        assert np.abs(pair[0] - pair[1]).max() <= 2, index  # CPU batch-size rounding, as above
    assert (tmp_path / "two" / "priors" / "dog-preview.png").is_file()


def test_another_local_model_of_the_same_folder_name_does_not_top_up_the_set(tmp_path: Path, tiny_dir: Path) -> None:
    """run.json and manifests keep only a local model's folder name; a fingerprint tells two such folders apart."""
    import shutil

    from safetensors.torch import load_file, save_file

    from dreamlora.config import load_config
    from dreamlora.prior import run_prior

    first, second = tmp_path / "a" / "model", tmp_path / "b" / "model"
    shutil.copytree(tiny_dir, first)
    shutil.copytree(tiny_dir, second)
    weights = next((second / "unet").glob("*.safetensors"))
    tensors = load_file(str(weights))
    tensors = {k: v + 0.01 for k, v in tensors.items()}  # a fine-tune of the same architecture
    save_file(tensors, str(weights))

    def prior(model: Path, n: int):
        cfg = load_config(None, {"model.name": str(model), "prior.class_name": "dog", "prior.num_images": str(n), "prior.steps": "2"})
        return run_prior(cfg.prior, cfg.model, 32, priors_root=tmp_path / "priors")

    assert prior(first, 2).generated == 2
    manifest = json.loads((tmp_path / "priors" / "dog" / "manifest.json").read_text())
    assert manifest["model"] == "model" and len(manifest["model_fingerprint"]) == 16
    with pytest.raises(ConfigError, match="another folder of that name"):
        prior(second, 3)
    assert sorted(p.name for p in (tmp_path / "priors" / "dog").glob("*.png")) == ["00000.png", "00001.png"]
    assert prior(first, 3).generated == 1  # the same folder tops its set up


def test_sigterm_stops_prior_with_a_line_and_the_set_is_finished_by_the_same_command(tmp_path: Path, model_cache: Path) -> None:
    import signal
    import time

    env = {**os.environ, "DREAMLORA_CACHE": str(model_cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "dreamlora", "prior", "--model", "tiny", "--class", "dog", "-n", "200", "--steps", "2", "--resolution", "32", "--batch-size", "1"]
    folder = tmp_path / "priors" / "dog"
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (folder / "00001.png").is_file():
        assert process.poll() is None and time.monotonic() < deadline, "prior ended or stalled before its second image"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, output
    flat = " ".join(output.replace("│", " ").split())
    assert "stopped by SIGTERM: the class images written so far are kept; run the same command again" in flat and "Traceback" not in output
    kept = sorted(p.name for p in folder.glob("*.png"))
    assert 2 <= len(kept) < 200 and not list(folder.glob(".*"))  # whole images only, no temporary files
    finished = subprocess.run([*command[:command.index("200")], "5", *command[command.index("200") + 1 :]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert json.loads((folder / "manifest.json").read_text())["num_images"] >= 5
