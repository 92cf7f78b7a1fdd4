"""kohya's block-wise learning rates (`--down-lr-weight`, `--mid-lr-weight`, `--up-lr-weight`,
`--block-lr-zero-threshold`): block numbering, presets, which modules get a LoRA, the optimizer groups, the record."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dreamlora.cli import app
from dreamlora.config import block_weights, load_config
from dreamlora.errors import ConfigError
from dreamlora.lora import read_diffusers_lora, read_safetensors, unet_block_index
from dreamlora.train import make_optimizer

runner = CliRunner()


def test_presets_and_lists_of_twelve_factors() -> None:
    assert block_weights("", "w") is None
    sine, linear = block_weights("sine", "w"), block_weights("linear", "w")
    assert len(sine) == len(linear) == 12 and sine[0] == linear[0] == 0.0 and sine[-1] == pytest.approx(1.0) and linear[-1] == 1.0
    assert list(sine) == sorted(sine) and sine[6] > linear[6]  # a quarter sine wave rises faster than a line
    assert block_weights("cosine", "w") == tuple(reversed(sine)) and block_weights("reverse_linear", "w") == tuple(reversed(linear))
    assert block_weights("zeros+0.5", "w") == (0.5,) * 12
    assert block_weights(",".join(["2"] * 12), "w") == (2.0,) * 12
    with pytest.raises(ConfigError, match="needs 12 factors"):
        block_weights("1,1,1", "adapter.down_lr_weight")
    with pytest.raises(ConfigError, match="sine, cosine, linear"):
        block_weights("wavy", "adapter.down_lr_weight")
    with pytest.raises(ConfigError, match="block_lr_zero_threshold applies"):
        load_config(None, {"adapter.block_lr_zero_threshold": "0.1"})
    with pytest.raises(ConfigError, match="Prodigy"):
        load_config(None, {"train.optimizer": "prodigy", "train.lr": "1.0", "adapter.mid_lr_weight": "0.5"})
    load_config(None, {"train.optimizer": "prodigy", "train.lr": "1.0", "adapter.mid_lr_weight": "0"})  # 0 only drops the block


def test_block_numbers_are_kohyas() -> None:
    numbers = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 1, "down_blocks.0.resnets.1.conv1": 2, "down_blocks.0.downsamplers.0.conv": 3,
        "down_blocks.2.downsamplers.0.conv": 9, "down_blocks.3.resnets.1.conv2": 11, "mid_block.attentions.0.proj_in": 12,
        "up_blocks.0.resnets.0.conv1": 13, "up_blocks.0.resnets.2.conv1": 15, "up_blocks.1.upsamplers.0.conv": 18, "up_blocks.3.attentions.2.proj_out": 24,
        "conv_in": -1, "time_embedding.linear_1": -1,
    }  # fmt: skip
    assert {name: unet_block_index(name) for name in numbers} == numbers


def test_one_group_per_factor_split_by_loraplus() -> None:
    cfg = load_config(None, {"train.lr": "1e-3", "train.loraplus_lr_ratio": "4"})
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(6)]
    factors, ups = [1.0, 1.0, 0.5, 0.5, 2.0, 2.0], [False, True] * 3
    optimizer = make_optimizer({"unet": params}, cfg, torch.device("cpu"), up_weights={"unet": ups}, lr_factors={"unet": factors})
    index = {id(p): i for i, p in enumerate(params)}
    got = [(g["lr"], g["scale"], [index[id(p)] for p in g["params"]]) for g in optimizer.param_groups]
    assert got == [(1e-3, 1.0, [0]), (4e-3, 4.0, [1]), (5e-4, 0.5, [2]), (2e-3, 2.0, [3]), (2e-3, 2.0, [4]), (8e-3, 8.0, [5])]


def test_zero_blocks_get_no_lora_and_the_record_keeps_the_weights(tmp_path: Path, instance_dir: Path) -> None:
    # The tiny UNet's attention LoRAs sit in blocks 4 (down), 12 (middle), 13 and 14 (up 0 and 1).
    down, up = ["1"] * 12, ["1"] * 12
    down[4], up[0], up[1] = "0", "2", "0.05"
    run = tmp_path / "runs" / "blocks"
    args = ["train", "--model", "tiny", "--instance", str(instance_dir), "--max-steps", "2", "--resolution", "32", "--set", "train.num_samples=0",
            "--set", "train.log_every=1", "--set", "adapter.init=nonzero", "--down-lr-weight", ",".join(down), "--mid-lr-weight", "0.5",
            "--up-lr-weight", ",".join(up), "--block-lr-zero-threshold", "0.1", "--out", str(run)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    state_dicts, _ = read_diffusers_lora(run / "lora")
    modules = {k.split(".lora_")[0] for k in state_dicts["unet"]}
    assert {unet_block_index(m) for m in modules} == {12, 13}  # block 4 weighs 0, block 14 falls under the threshold
    assert "text_encoder" in state_dicts  # the text encoder is not a UNet block
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in metrics] == [1e-4, 1e-4]  # the base rate, whatever the blocks' factors
    exported = runner.invoke(app, ["export", str(run), "--format", "a1111", "--out", str(tmp_path / "b.safetensors")])
    assert exported.exit_code == 0, exported.output
    args_record = json.loads(read_safetensors(tmp_path / "b.safetensors")[1]["ss_network_args"])
    assert args_record["down_lr_weight"] == ",".join(down) and args_record["mid_lr_weight"] == "0.5" and args_record["block_lr_zero_threshold"] == "0.1"
    nothing = runner.invoke(app, [*args[:-2], "--down-lr-weight", "zeros", "--mid-lr-weight", "0", "--up-lr-weight", "zeros", "--out", str(tmp_path / "none")])
    assert nothing.exit_code == 2 and "nothing would train" in " ".join(nothing.output.replace("│", " ").split()) and not (tmp_path / "none").exists()
