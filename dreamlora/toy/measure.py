"""The README's toy DreamBooth table, measured: the real `prior`, `train` and the demo's reader, over seeds.

    python -m dreamlora.toy.measure --out toy-table                  # the shipped toy model, seeds 0 and 1
    python -m dreamlora.toy.measure --out t --model path/to/new-toy  # a newly pretrained one (issue 8's protocol)

For each training seed and prior weight it trains the toy recipe (`dreamlora/configs/toy.toml`: rank 8, lr 1e-3 for the
UNet LoRA and 1e-4 for the text-encoder LoRA, 300 steps, batch 4+4, 50 class images) on the sample photos, then
draws 16 images per prompt at fixed seeds with the base model and with the LoRA and reads each back with the toy
world's reader (`demo.evaluate`). It prints the table in the README's layout and writes it to OUT/table.md (table-2.md and runs/...-2 on a rerun), with one
base-vs-trained picture per run. The behavioural test (`tests/test_toy_dreambooth.py`) trains and reads exactly as
this does, for one seed.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dreamlora.checkpoint import next_free_path
from dreamlora.config import RunConfig, load_config
from dreamlora.demo import SAMPLE_PHOTOS, TOY_RECIPE, PromptScore, evaluate


@dataclass(frozen=True)
class Measurement:
    seed: int
    prior_weight: float
    scores: dict[str, PromptScore]  # by prompt

    def mark(self, prompt: str, trained: bool = True) -> float:
        score = self.scores[prompt]
        return score.trained_mark_rate if trained else score.base_mark_rate

    def right_class(self, prompt: str, trained: bool = True) -> float:
        score = self.scores[prompt]
        return score.trained_class_rate if trained else score.base_class_rate

    def palette_drift(self, prompt: str) -> float:
        """How far the trained images' colours moved from the base model's (`monitor.palette_drift`)."""
        return self.scores[prompt].palette_drift


def recipe(model: str, class_dir: Path, out: Path, seed: int = 0, prior_weight: float = 1.0, extra: dict[str, str] | None = None) -> RunConfig:
    """The toy recipe on the sample photos, with the class images of `class_dir`; no sample grids. `extra`: more
    config overrides (`section.key` to value), e.g. `adapter.pivotal`."""
    from dreamlora.train import resolve_data

    overrides = {
        "model.name": model, "data.instance_dir": str(SAMPLE_PHOTOS), "data.class_dir": str(class_dir), "train.seed": str(seed),
        "train.prior_weight": str(prior_weight), "train.num_samples": "0", "train.out": str(out), "train.log_every": "50",
        **(extra or {}),
    }  # fmt: skip
    cfg, needs_prior = resolve_data(load_config(TOY_RECIPE, overrides))
    if needs_prior:
        raise RuntimeError(f"no complete prior set in {class_dir}; make it with `make_prior_set` first")
    return cfg


def make_prior_set(model: str, class_dir: Path) -> None:
    """The toy recipe's class images ("a photo of dog", 50, 20 steps, guidance 5), topped up if some exist."""
    from dreamlora.config import replace
    from dreamlora.prior import run_prior

    cfg = load_config(TOY_RECIPE, {"model.name": model})
    run_prior(replace(cfg.prior, out=str(class_dir)), cfg.model, cfg.data.resolution)


def measure(
    model: str, out: Path, seeds: Sequence[int] = (0, 1), prior_weights: Sequence[float] = (1.0, 0.0), eval_seeds: int = 16, guidance: float = 5.0,
    extra: dict[str, str] | None = None,
) -> list[Measurement]:
    """Train and read back every (seed, prior weight) pair, drawing at `guidance`; the class set is made once in OUT/priors/dog.
    Run again on the same OUT, it reuses the class set and writes new runs and pictures beside the old (`-2`, `-3`, ...)."""
    from dreamlora.train import train

    class_dir = out / "priors" / "dog"
    make_prior_set(model, class_dir)
    rows = []
    for seed in seeds:
        for weight in prior_weights:
            name = f"seed{seed}-prior{weight:g}"
            result = train(recipe(model, class_dir, next_free_path(out / "runs" / name), seed, weight, extra))
            picture = next_free_path(out / result.run_dir.name, ".png")
            scores = evaluate(result.run_dir, picture, seeds=eval_seeds, guidance=guidance, model=model).scores
            rows.append(Measurement(seed, weight, {s.prompt: s for s in scores}))
    return rows


def _percent(value: float) -> str:
    return f"{round(value * 100)}%"


def format_table(rows: Sequence[Measurement]) -> str:
    """The README's table: one line per run, then the base model's line (the same for every run)."""
    lines = [
        '| seed | prior preservation | mark in "a photo of sks dog" | mark in "a photo of dog" | "a photo of cat" (mark / right class) |'
        ' palette drift of "a photo of dog" |',
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        weight = "no" if row.prior_weight == 0 else "yes" if row.prior_weight == 1 else f"weight {row.prior_weight:g}"
        cat = f"{_percent(row.mark('a photo of cat'))} / {_percent(row.right_class('a photo of cat'))}"
        marks = f"{_percent(row.mark('a photo of sks dog'))} | {_percent(row.mark('a photo of dog'))}"
        lines.append(f"| {row.seed} | {weight} | {marks} | {cat} | {row.palette_drift('a photo of dog'):.2f} |")
    if rows:
        base = rows[0]
        cat = f"{_percent(base.mark('a photo of cat', False))} / {_percent(base.right_class('a photo of cat', False))}"
        lines.append(f"| base model | | {_percent(base.mark('a photo of sks dog', False))} | {_percent(base.mark('a photo of dog', False))} | {cat} | - |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dreamlora.toy.measure", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder (prior set, runs, pictures, table.md)")
    parser.add_argument("--model", default="toy", help="the toy model (default) or a pretrained toy-world model's folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    parser.add_argument("--prior-weights", type=float, nargs="+", default=[1.0, 0.0], help="0 trains without prior preservation")
    parser.add_argument("--eval-seeds", type=int, default=16, help="images per prompt read back")
    parser.add_argument("--guidance", type=float, default=5.0, help="guidance scale of the images read back (the demo's: 5)")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE", help="another training setting, e.g. adapter.pivotal=true (repeatable)")
    args = parser.parse_args(argv)
    from dreamlora.config import parse_set_options

    rows = measure(args.model, args.out, args.seeds, args.prior_weights, args.eval_seeds, args.guidance, parse_set_options(args.extra))
    table = format_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    next_free_path(args.out / "table", ".md").write_text(table + "\n", encoding="utf-8")  # an earlier table is kept
    print(table, flush=True)


if __name__ == "__main__":
    main()
