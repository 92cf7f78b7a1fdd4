"""DreamBooth on the built-in toy model, which understands its prompts: the subject is learned and bound to "sks",
and prior preservation keeps the class.

Measured on CPU with the toy recipe (rank 8, lr 1e-3 for the UNet LoRA and 1e-4 for the text-encoder LoRA, 300 steps,
batch 4+4, 50 class images; 16 images per prompt, mark rate = share of images the toy world's reader sees the yellow
mark in):

| seed | prior preservation | "a photo of sks dog" | "a photo of dog" | "a photo of cat" (mark / right class) | palette drift of "a photo of dog" |
|---|---|---|---|---|---|
| 0 | yes | 1.00 | 0.12 | 0.00 / 1.00 | 0.08 |
| 0 | no  | 0.50 | 0.75 | 0.00 / 1.00 | 0.19 |
| 1 | yes | 0.56 | 0.12 | 0.00 / 1.00 | 0.13 |
| 1 | no  | 0.62 | 0.56 | 0.00 / 0.75 | 0.22 |
| 2 | yes | 0.81 | 0.00 | 0.00 / 1.00 | 0.05 |
| 2 | no  | 0.94 | 0.88 | 0.00 / 1.00 | 0.27 |
| 3 | yes | 0.88 | 0.06 | 0.00 / 1.00 | 0.24 |
| 3 | no  | 0.69 | 0.56 | 0.00 / 0.88 | 0.38 |
| base model | | 0.00 | 0.00 | 0.00 / 1.00 | - |

`python -m dreamlora.toy.measure --out FOLDER` measures this table (the README's); the thresholds below sit a few
images inside its seed-0 rows (deterministic with OMP_NUM_THREADS=1).
"""

from pathlib import Path

import pytest

from dreamlora.models import TOY_MODEL_DIR
from dreamlora.toy.measure import format_table, measure

pytestmark = pytest.mark.skipif(not (TOY_MODEL_DIR / "model_index.json").is_file(), reason="toy model not in the package")


@pytest.fixture(scope="module")
def toy_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The measure's folder, shared: its class set (OUT/priors/dog, 50 images) is drawn once for this module's tests."""
    return tmp_path_factory.mktemp("toy-measure")


def test_subject_is_learned_and_prior_preservation_keeps_the_class(toy_out: Path) -> None:
    # The README's protocol (python -m dreamlora.toy.measure) for training seed 0: with, then without prior preservation.
    kept, drifted = measure("toy", toy_out, seeds=(0,), prior_weights=(1.0, 0.0))
    print(format_table([kept, drifted]))
    assert kept.mark("a photo of sks dog", trained=False) <= 0.0625  # the base model does not draw the subject
    assert kept.mark("a photo of sks dog") >= 0.75 and kept.right_class("a photo of sks dog") >= 0.9  # learned, still a dog
    # Bound to "sks": with prior preservation plain "dog" images rarely carry the subject's mark, "sks dog" ones mostly do.
    assert kept.mark("a photo of dog") <= 0.25 and kept.mark("a photo of sks dog") >= kept.mark("a photo of dog") + 0.5
    # Without it, the class drifts to the subject: plain "dog" images carry the mark far more often.
    assert drifted.mark("a photo of dog") >= kept.mark("a photo of dog") + 0.375
    assert drifted.mark("a photo of sks dog") >= 0.375
    # The monitor's set-level figure sees it too: the class images' colours move further from the base model's without it.
    assert drifted.palette_drift("a photo of dog") >= kept.palette_drift("a photo of dog") + 0.05
    for run in (kept, drifted):
        assert run.mark("a photo of cat") <= 0.0625 and run.right_class("a photo of cat") >= 0.875  # another class stays a blue square
    assert (toy_out / "seed0-prior1.png").is_file() and (toy_out / "seed0-prior0.png").is_file()  # base vs trained pictures


def test_a_rerun_of_the_measure_keeps_the_earlier_runs_pictures_and_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from dreamlora import train as train_module
    from dreamlora.demo import PromptScore
    from dreamlora.toy import measure as measure_module

    trained: list[Path] = []

    def fake_train(cfg: types.SimpleNamespace) -> types.SimpleNamespace:
        cfg.out.mkdir(parents=True)  # as train does: an existing folder would be refused
        trained.append(cfg.out)
        return types.SimpleNamespace(run_dir=cfg.out)

    def fake_evaluate(run_dir: Path, picture: Path, **_: object) -> types.SimpleNamespace:
        assert not picture.exists()
        picture.write_bytes(b"png")
        prompts = ("a photo of sks dog", "a photo of dog", "a photo of cat")
        return types.SimpleNamespace(scores=[PromptScore(p, 0.0, 1.0, 1.0, 1.0, 0.1) for p in prompts])

    monkeypatch.setattr(measure_module, "make_prior_set", lambda model, class_dir: None)
    monkeypatch.setattr(measure_module, "recipe", lambda model, class_dir, out, *args: types.SimpleNamespace(out=out))
    monkeypatch.setattr(measure_module, "evaluate", fake_evaluate)
    monkeypatch.setattr(train_module, "train", fake_train)
    for _ in range(2):
        measure_module.main(["--out", str(tmp_path), "--seeds", "0", "--prior-weights", "1"])
    assert [p.name for p in trained] == ["seed0-prior1", "seed0-prior1-2"]
    assert (tmp_path / "seed0-prior1.png").is_file() and (tmp_path / "seed0-prior1-2.png").is_file()
    assert (tmp_path / "table.md").is_file() and (tmp_path / "table-2.md").is_file()


def test_held_out_class_loss_stays_lower_with_prior_preservation(tmp_path: Path, toy_out: Path) -> None:
    # `--validate-every` on the toy recipe (seed 0, the first 100 steps of the README's runs, 4 of the 50 class images
    # held out). The toy VAE's posterior is wide, so most of the fall below the base model's loss is both runs
    # learning its noise (docs/toy-model.md); prior preservation keeps the held-out loss lower at every reading
    # (measured: 0.382 / 0.336 with it, 0.395 / 0.345 without, base 0.495).
    import json

    from dreamlora.toy.measure import make_prior_set, recipe
    from dreamlora.train import train

    class_dir = toy_out / "priors" / "dog"
    make_prior_set("toy", class_dir)  # the measure's set (made here if this test runs alone)
    readings = {}
    for weight in (1.0, 0.0):
        cfg = recipe("toy", class_dir, tmp_path / f"prior{weight:g}", 0, weight, {"train.max_steps": "100", "train.validate_every": "50"})
        records = [json.loads(line) for line in (train(cfg).run_dir / "metrics.jsonl").read_text().splitlines()]
        readings[weight] = [r for r in records if "val_class_loss" in r]
    print(readings)
    for kept, drifted in zip(readings[1.0], readings[0.0]):
        assert kept["step"] == drifted["step"] and kept["val_class_loss_base"] == drifted["val_class_loss_base"]
        assert kept["val_class_loss"] <= drifted["val_class_loss"] - 0.005
    assert [r["step"] for r in readings[1.0]] == [50, 100]
