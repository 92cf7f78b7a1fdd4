"""`dreamlora bench` on CPU (tiny model): the report's shape and that it ran the real paths; never its speed."""

import json

from typer.testing import CliRunner

from dreamlora.cli import app
from dreamlora.config import replace


def test_bench_reports_training_and_prior_as_json() -> None:
    result = CliRunner().invoke(app, ["bench", "--model", "tiny", "--json", "--steps", "2", "--warmup", "1", "--prior-images", "2", "--set", "prior.steps=2"])
    assert result.exit_code == 0, result.output
    # The runner mixes log lines into the output; the report is the JSON object in it.
    report, _ = json.JSONDecoder().raw_decode(result.output[result.output.index("{\n"):])
    assert report["device"] == "cpu" and report["model"] == "tiny" and report["torch_version"]
    train, prior = report["train"], report["prior"]
    assert [t["gradient_checkpointing"] for t in train] == [True, False]  # the default and the variant
    for t in train:
        assert t["it_s"] > 0 and t["ms_per_step"] > 0 and not t["cuda_graphs"] and t["precision"] == "fp32"
        assert "lora_file" not in t  # its temporary folder is gone
        assert t["peak_memory_gib"] is None and t["setup_peak_gib"] is None and t["steps_peak_gib"] is None  # GPU memory only
    assert [(p["scheduler"], p["steps"]) for p in prior] == [("dpm++", 2), ("pndm", 50)]  # ours, then the reference's settings
    # Each row says what it times as it starts (the bench takes minutes on a GPU).
    assert "timing train: checkpointing on" in result.output and "timing prior: pndm 50 steps" in result.output
    for p in prior:
        assert p["images_per_s"] > 0 and p["images"] == 2
        shares = p["phase_shares"]
        assert set(shares) == {"unet", "vae_decode", "rest"} and abs(sum(shares.values()) - 1) < 1e-6
        assert shares["unet"] > 0 and shares["vae_decode"] > 0


def test_bench_rejects_an_unknown_part() -> None:
    result = CliRunner().invoke(app, ["bench", "--part", "everything"])
    assert result.exit_code == 2 and "--part" in result.output and "Traceback" not in result.output


def test_unet_tweaks_keep_the_prior_images(tmp_path) -> None:
    """The inference-only UNet changes the bench times on a GPU must not change what `prior` draws."""
    import numpy as np
    import pytest
    from PIL import Image

    from dreamlora.bench import apply_unet_tweaks, bench_prior, compare_prior_images, default_bench_config

    cfg = default_bench_config("tiny", {})
    prior_cfg = replace(cfg.prior, num_images=3, class_name="dog", steps=3)
    images, rows = {}, []
    for tweaks in ("", "fused-qkv+channels-last"):
        rows.append(bench_prior(cfg, prior_cfg, tmp_path / (tweaks or "plain"), tweaks))
        assert rows[-1].unet_tweaks == tweaks and rows[-1].images == 3 and rows[-1].warmup_seconds > 0
        images[tweaks] = [np.asarray(Image.open(p), dtype=np.int16) for p in sorted((tmp_path / (tweaks or "plain") / "prior").glob("*.png"))]
    assert len(images[""]) == 3
    for plain, tweaked in zip(images[""], images["fused-qkv+channels-last"]):
        assert np.abs(plain - tweaked).max() <= 2
    # The bench's own check (it runs on the GPU rows): each row against the first with the same sampler and steps.
    compare_prior_images(rows, [tmp_path / "plain" / "prior", tmp_path / "fused-qkv+channels-last" / "prior"])
    assert rows[0].max_pixel_diff is None and rows[1].max_pixel_diff == max(int(np.abs(a - b).max()) for a, b in zip(images[""], images["fused-qkv+channels-last"]))
    with pytest.raises(ValueError, match="known: fused-qkv, channels-last, compile"):
        apply_unet_tweaks(None, "fused-qkv+tensorrt")


def test_the_compile_tweak_compiles_the_unet_in_place() -> None:
    # Compiling the tiny UNet takes minutes on two CPU cores, so CI checks the wiring; the bench compares the compiled
    # row's images with the plain row's on the GPU (max_pixel_diff).
    from dreamlora.bench import apply_unet_tweaks

    class Unet:
        compiled = 0

        def compile(self) -> None:
            self.compiled += 1

    unet = Unet()
    apply_unet_tweaks(unet, "compile")
    assert unet.compiled == 1


def test_the_device_script_runs_a_part_and_writes_its_json(tmp_path) -> None:
    # scripts/device_bench.sh is what a session with a GPU runs there (README, Performance); on the tiny model it runs
    # here, so a broken script is found before device time is spent on it.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "BENCH_MODEL": "tiny", "OUT": str(tmp_path), "PYTHON": sys.executable, "WHEELS": str(tmp_path / "none")}
    script = str(root / "scripts" / "device_bench.sh")
    done = subprocess.run(["bash", script, "sd15-train", "--steps", "2", "--warmup", "1", "--no-variants"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "sd15-train.json").read_text())
    assert result["model"] == "tiny" and len(result["train"]) == 1 and result["train"][0]["it_s"] > 0
    log = (tmp_path / "sd15-train.log").read_text()
    assert "diffusers" in log and "--part train" in log and "timing train" in log and "measured: " in log and "it/s, first step" in log
    wrong = subprocess.run(["bash", script, "sd14-train"], env=env, capture_output=True, text=True)
    assert wrong.returncode == 2 and "usage" in wrong.stderr
