"""DreamBooth on the built-in toy model, which understands its prompts: the subject is learned and prior preservation keeps the class.

Measured on CPU with the toy recipe (rank 8, lr 1e-3, 300 steps, batch 1+1, 50 class images; 16 images per prompt,
mark rate = share of images the toy world's reader sees the yellow mark in):

| seed | prior preservation | "a photo of sks dog" | "a photo of dog" | "a photo of cat" (mark / right class) |
|---|---|---|---|---|
| 0 | yes | 0.75 | 0.69 | 0.00 / 1.00 |
| 0 | no  | 0.88 | 0.88 | 0.00 / 1.00 |
| 1 | yes | 0.44 | 0.44 | 0.00 / 0.94 |
| 1 | no  | 0.81 | 0.81 | 0.00 / 1.00 |
| base model | | 0.06 | 0.00 | 0.00 / 1.00 |

The thresholds below sit one to two images inside those numbers (seed 0, deterministic with OMP_NUM_THREADS=1).
"""

from pathlib import Path

import pytest

from dreamlora.config import load_config
from dreamlora.demo import SAMPLE_PHOTOS, evaluate
from dreamlora.models import TOY_MODEL_DIR
from dreamlora.prior import run_prior
from dreamlora.train import resolve_data, train

pytestmark = pytest.mark.skipif(not (TOY_MODEL_DIR / "model_index.json").is_file(), reason="toy model not in the package")


def _train(tmp_path: Path, name: str, prior_weight: str) -> dict[str, tuple[float, float, float, float]]:
    overrides = {
        "model.name": "toy", "data.instance_dir": str(SAMPLE_PHOTOS), "data.class_name": "dog", "data.class_dir": str(tmp_path / "priors" / "dog"),
        "adapter.rank": "8", "adapter.alpha": "8", "train.max_steps": "300", "train.lr": "1e-3", "train.prior_weight": prior_weight,
        "train.num_samples": "0", "train.out": str(tmp_path / "runs" / name), "train.log_every": "50", "prior.num_images": "50",
    }
    cfg, needs_prior = resolve_data(load_config(None, overrides))
    assert not needs_prior
    result = train(cfg)
    scores = evaluate(result.run_dir, tmp_path / f"{name}.png", seeds=16).scores
    return {s.prompt: (s.base_mark_rate, s.trained_mark_rate, s.base_class_rate, s.trained_class_rate) for s in scores}


def test_subject_is_learned_and_prior_preservation_keeps_the_class(tmp_path: Path) -> None:
    prior_cfg = load_config(None, {"prior.class_name": "dog", "prior.num_images": "50", "prior.steps": "20", "prior.guidance": "5", "prior.out": str(tmp_path / "priors" / "dog"), "model.name": "toy"})
    run_prior(prior_cfg.prior, prior_cfg.model, 64)
    kept = _train(tmp_path, "with-prior", "1.0")
    drifted = _train(tmp_path, "without-prior", "0")
    base_mark, sks_mark, _, sks_class = kept["a photo of sks dog"]
    assert base_mark <= 0.125  # the base model does not draw the subject
    assert sks_mark >= 0.5 and sks_class >= 0.9  # the subject is learned, still a dog
    assert drifted["a photo of sks dog"][1] >= 0.75
    # Prior preservation: plain "dog" images carry the subject's mark clearly less often than without it.
    assert kept["a photo of dog"][1] <= drifted["a photo of dog"][1] - 0.125
    for run in (kept, drifted):
        _, cat_mark, _, cat_class = run["a photo of cat"]
        assert cat_mark <= 0.0625 and cat_class >= 0.9  # another class stays a blue square
