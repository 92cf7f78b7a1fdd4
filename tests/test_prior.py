import json
from pathlib import Path

import pytest

from dreamlora.config import PriorConfig
from dreamlora.errors import ConfigError
from dreamlora.models import build_pipeline, load_components
from dreamlora.prior import generate_class_images, safe_name


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
