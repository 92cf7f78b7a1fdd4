"""Prompts with their own sampling settings, in kohya's sample-prompt format: `a photo of sks dog on a beach --n blurry
--w 512 --h 768 --d 42 --l 7.5 --s 30 --ss euler_a` (negative prompt, width, height, first seed, guidance, steps, sampler). `generate
--from-file` reads a file of them, and `train --sample-prompt`/`--sample-prompts` lines may carry them too."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamlora.errors import ConfigError

log = logging.getLogger(__name__)

SAMPLERS = ("dpm++", "pndm", "ddim", "euler", "euler_a", "heun", "dpm2", "dpm2_a", "unipc")  # inference schedulers (models.SAMPLER_CLASSES)
PROMPT_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "l": "guidance", "s": "steps", "ss": "scheduler"}
# kohya's sampler names (--ss, --sample_sampler) -> dreamlora's (SAMPLERS); its lms and dpmsingle are not offered
KOHYA_SAMPLERS = {
    "dpmsolver++": "dpm++", "k_euler": "euler", "k_euler_a": "euler_a", "k_heun": "heun",
    "dpm_2": "dpm2", "k_dpm_2": "dpm2", "dpm_2_a": "dpm2_a", "k_dpm_2_a": "dpm2_a",
}  # fmt: skip
_OPTION = re.compile(r"\s+--(?=[A-Za-z]+\b)")  # " --w": an option; "dog--w" inside a word is the prompt's


@dataclass(frozen=True)
class PromptSpec:
    """One prompt to draw and the settings it chooses (None: the command's)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    guidance: float | None = None
    steps: int | None = None
    scheduler: str | None = None  # one of SAMPLERS

    def filled(self, defaults: PromptSpec) -> PromptSpec:
        """This prompt with every setting it leaves open (None) taken from `defaults`."""
        return dataclasses.replace(self, **{f.name: getattr(defaults, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is None})


def setting_problems(steps: int | None = None, guidance: float | None = None, sizes: dict[str, int | None] | None = None) -> list[str]:
    """What is wrong with sampling settings (None: not given), one message per problem, named as the flags are."""
    problems = []
    if steps is not None and not 1 <= steps <= 1000:
        problems.append(f"--steps must be in 1..1000; got {steps}")
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        problems.append(f"--guidance must be 0 or more; got {guidance}")
    for flag, size in (sizes or {}).items():
        if size is not None and not (8 <= size <= 8192 and size % 8 == 0):
            problems.append(f"{flag} must be a positive multiple of 8; got {size}")
    return problems


def parse_prompt_line(line: str, where: str, ignored: set[str] | None = None) -> PromptSpec:
    """One prompt and its options (case-blind); unknown options (kohya's `--ss` sampler, say) go into `ignored`. A bad
    value is a ConfigError that starts with `where` (e.g. "prompt file 'p.txt' line 3")."""
    prompt, *options = _OPTION.split(" " + line.strip())
    values: dict[str, Any] = {}
    for option in options:
        name, _, value = option.strip().partition(" ")
        field = PROMPT_OPTIONS.get(name.lower())
        if field is None:
            if ignored is not None:
                ignored.add(f"--{name}")
            continue
        value = value.strip()
        if field == "scheduler":
            sampler = KOHYA_SAMPLERS.get(value.lower(), value.lower())
            if sampler in SAMPLERS:
                values[field] = sampler
            elif ignored is not None:
                ignored.add(f"--{name} {value} (samplers: {', '.join(SAMPLERS)})")
            continue
        try:
            values[field] = value if field == "negative_prompt" else float(value) if field == "guidance" else int(value)
        except ValueError:
            kind = "a number" if field == "guidance" else "a whole number"
            raise ConfigError(f"{where}: --{name} {value!r} is not {kind}") from None
    problems = setting_problems(values.get("steps"), values.get("guidance"), {"--w": values.get("width"), "--h": values.get("height")})
    if problems:
        raise ConfigError(f"{where}: {'; '.join(problems)}")
    if not prompt.strip():
        raise ConfigError(f"{where} has options but no prompt; write the prompt first, then --n, --w, --h, --d, --l, --s, --ss")
    return PromptSpec(prompt.strip(), **values)


def prompt_lines(path: Path | str) -> list[tuple[int, str]]:
    """The prompt lines of a text file with their line numbers: blank lines and lines starting with # are skipped."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"prompt file '{path}' cannot be read ({error}); pass a UTF-8 text file with one prompt per line") from error
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip() and not line.strip().startswith("#")]
    if not lines:
        raise ConfigError(f"prompt file '{path}' has no prompts; write one per line (# starts a comment)")
    return lines


def read_prompt_file(path: Path | str) -> list[PromptSpec]:
    """The prompts of a text file, one per line, each with its options (`parse_prompt_line`); options dreamlora does
    not read are named in one warning."""
    ignored: set[str] = set()
    specs = [parse_prompt_line(line, f"prompt file '{path}' line {number}", ignored) for number, line in prompt_lines(path)]
    warn_ignored(ignored, f"prompt file {path}")
    return specs


def warn_ignored(ignored: set[str], where: str) -> None:
    if ignored:
        log.warning("%s: %s ignored (dreamlora reads --n, --w, --h, --d, --l, --s and --ss)", where, ", ".join(sorted(ignored)))
