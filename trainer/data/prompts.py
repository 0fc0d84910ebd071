"""kohya-style sample-prompt files (``--sample_prompts``): what the trainer renders with the CoDi sampler as it goes.

Each non-empty line (``#`` starts a comment) is a prompt with options: ``--n`` negative prompt, ``--w``/``--h`` size,
``--d`` seed, ``--s`` steps, ``--l`` cfg scale, ``--cn`` condition image (required: a CoDi adapter is conditional).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.data.errors import DataError
from trainer.data.images import load_rgb, resize_center_crop, to_tensor01, verify_image

_OPTION = re.compile(r"\s--(n|w|h|d|s|l|cn)\s+")


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    cfg: float | None = None
    condition: Path | None = None


def parse_prompt_line(line: str, base_dir: Path) -> SamplePrompt:
    parts = _OPTION.split(" " + line.strip())
    sample = SamplePrompt(prompt=parts[0].strip())
    for key, value in zip(parts[1::2], parts[2::2]):
        value = value.strip()
        if key == "n":
            sample.negative = value
        elif key in ("w", "h", "d", "s"):
            number = int(value)
            setattr(sample, {"w": "width", "h": "height", "d": "seed", "s": "steps"}[key], number)
        elif key == "l":
            sample.cfg = float(value)
        elif key == "cn":
            path = Path(shlex.split(value)[0])
            sample.condition = path if path.is_absolute() else base_dir / path
    return sample


def read_prompt_file(path, max_steps: int = 8) -> list[SamplePrompt]:
    """Every prompt of the file, each checked now (steps in 1..``max_steps``, sizes, cfg, a readable condition image)
    so a bad line stops the run before training, not at the first sample."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--sample_prompts {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"--sample_prompts {path} is not UTF-8 text ({exc.reason}): save it as UTF-8") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            sample = parse_prompt_line(line, path.parent)
        except ValueError as exc:
            raise DataError(f"{path}:{number}: cannot parse options ({exc})") from None
        if sample.condition is None:
            raise DataError(f"{path}:{number}: add --cn <condition image>; a CoDi adapter needs a condition")
        if not sample.condition.is_file():
            raise DataError(f"{path}:{number}: condition image {sample.condition} does not exist")
        verify_image(sample.condition)
        problem = (f"--s {sample.steps}: steps must be in 1..{max_steps}" if sample.steps is not None and
                   not 1 <= sample.steps <= max_steps else
                   f"--w {sample.width} / --h {sample.height}: sizes must be 64..8192 pixels" if any(
                       v is not None and not 64 <= v <= 8192 for v in (sample.width, sample.height)) else
                   f"--l {sample.cfg}: cfg must be >= 1" if sample.cfg is not None and not sample.cfg >= 1 else None)
        if problem:
            raise DataError(f"{path}:{number}: {problem}")
        prompts.append(sample)
    if not prompts:
        raise DataError(f"--sample_prompts {path} has no prompts")
    return prompts


def load_condition(sample: SamplePrompt, default_size: tuple[int, int]) -> torch.Tensor:
    """The condition image as ``[1, 3, H, W]`` in [0, 1] at the sample's size (multiples of 8)."""
    width = (sample.width or default_size[0]) // 8 * 8
    height = (sample.height or default_size[1]) // 8 * 8
    return to_tensor01(resize_center_crop(load_rgb(sample.condition), width, height)).unsqueeze(0)
