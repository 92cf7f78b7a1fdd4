from pathlib import Path

import pytest

from dreamlora.config import RunConfig, from_dict, load_config, parse_set_options, to_dict, to_toml
from dreamlora.errors import ConfigError


def test_defaults_are_valid() -> None:
    cfg = RunConfig()
    assert cfg.adapter.resolved_alpha == cfg.adapter.rank == 4
    assert cfg.train.max_steps == 800 and cfg.train.gradient_checkpointing
    assert cfg.data.resolved_instance_prompt() == "a photo of sks"


def test_instance_prompt_defaults_to_token_and_class() -> None:
    cfg = load_config(None, {"data.class_name": "dog", "data.token": "zwx"})
    assert cfg.data.resolved_instance_prompt() == "a photo of zwx dog"


def test_unknown_key_names_the_closest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        load_config(None, {"train.max_step": "3"})
    path = tmp_path / "c.toml"
    path.write_text("[trian]\nmax_steps = 3\n")
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config(path)


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[train\nmax_steps = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("data.resolution", "500", "multiple of 8"),
        ("adapter.rank", "0", "adapter.rank"),
        ("train.max_steps", "0", "train.max_steps"),
        ("train.lr", "5", "train.lr"),
        ("train.batch_size", "0", "train.batch_size"),
        ("train.lr", "fast", "must be a float"),
        ("data.token", "my dog", "has a space"),
        ("data.token", "", "empty"),
        ("model.precision", "fp8", "one of"),
    ],
)
def test_out_of_range_values_are_refused(key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, {key: value})


def test_toml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, {"adapter.rank": "8", "adapter.alpha": "3", "train.lr": "2e-4", "adapter.unet_targets": "to_q,to_v", "data.flip": "true"})
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    again = load_config(path)
    assert again == cfg
    assert from_dict(to_dict(cfg)) == cfg
    assert again.adapter.unet_targets == ("to_q", "to_v") and again.data.flip is True


def test_overrides_beat_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[train]\nmax_steps = 10\nlr = 0.001\n")
    cfg = load_config(path, parse_set_options(["train.max_steps=3"]))
    assert cfg.train.max_steps == 3 and cfg.train.lr == 0.001
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_set_options(["nonsense"])


def test_set_takes_a_toml_list_so_list_values_keep_their_commas() -> None:
    cfg = load_config(None, parse_set_options(['train.sample_prompts=["a photo of sks dog, at sunset", "a painting of sks dog"]']))
    assert cfg.train.sample_prompts == ("a photo of sks dog, at sunset", "a painting of sks dog")
    plain = load_config(None, parse_set_options(["adapter.unet_targets=to_q, to_v"]))
    assert plain.adapter.unet_targets == ("to_q", "to_v")
    with pytest.raises(ConfigError, match="not a TOML list"):
        load_config(None, parse_set_options(['train.sample_prompts=["unclosed']))
    with pytest.raises(ConfigError, match="train.sample_prompts must be a tuple"):
        load_config(None, parse_set_options(["train.sample_prompts=[1, [2]]"]))


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", [*sorted((ROOT / "samples").glob("*.toml")), ROOT / "dreamlora" / "configs" / "toy.toml"], ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    # The README points users at these files; a renamed or misspelt key would make them an error.
    cfg = load_config(path)
    assert cfg.model.name and cfg.train.max_steps >= 1
    assert f"`{path.relative_to(ROOT).as_posix()}`" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_text_encoder_settings_without_a_text_encoder_lora_are_refused() -> None:
    """--no-text-encoder makes every text-encoder-only setting moot: a config with both is a mistake, said up front."""
    assert not load_config(None, {"adapter.train_text_encoder": "false"}).adapter.train_text_encoder
    for key, value in (
        ("train.text_encoder_lr", "1e-3"), ("train.text_encoder_lr_scheduler", "cosine"), ("train.text_encoder_warmup_steps", "10"),
        ("train.text_encoder_steps_fraction", "0.5"), ("train.loraplus_text_encoder_lr_ratio", "4"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=f"so {key} would do nothing; drop them or drop --no-text-encoder"):
            load_config(None, {"adapter.train_text_encoder": "false", key: value})
        assert load_config(None, {key: value})  # with a text-encoder LoRA they are fine
