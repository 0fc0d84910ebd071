"""Shared pieces of the trainer tests: colorization pairs from real photos (the ``gray_pairs`` fixture, registered in
``conftest.py``), the common trainer flags and reading an adapter file."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open


def _photos():
    from skimage import data

    return {"astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee(),
            "rocket": data.rocket()}


@pytest.fixture(scope="session")
def gray_pairs(tmp_path_factory) -> Path:
    """Colorization pairs from real photos: targets (64x64 RGB) + grayscale conditions + captions."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    (root / "conditions").mkdir()
    for name, array in _photos().items():
        img = Image.fromarray(array).convert("RGB").resize((64, 64), Image.LANCZOS)
        img.save(root / "images" / f"{name}.png")
        img.convert("L").convert("RGB").save(root / "conditions" / f"{name}.png")
        (root / "images" / f"{name}.txt").write_text(f"a photo of {name}")
    return root


def base_args(checkpoint, data: Path, out: Path, tokenizer_dir, *extra) -> list[str]:
    args = ["--pretrained_model_name_or_path", str(checkpoint), "--train_data_dir", str(data / "images"),
            "--conditioning_data_dir", str(data / "conditions"), "--caption_extension", ".txt",
            "--resolution", "64", "--output_dir", str(out), "--output_name", "adapter", "--train_batch_size", "1",
            "--seed", "7", "--save_precision", "float", "--learning_rate", "1e-4", "--task", "gray"]
    if tokenizer_dir is not None and not Path(checkpoint).is_dir():
        args += ["--tokenizer_path", str(tokenizer_dir)]
    return args + [str(e) for e in extra]


def read_adapter(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()
