"""Training data: (target image, condition image, caption) items and the dataset that loads them.

This is the minimal paired-folder source (``--train_data_dir`` + ``--conditioning_data_dir``, same basenames); kohya
dataset TOMLs, generated conditions and buckets plug in by producing the same :class:`ImageItem` list and the same
sample dicts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(ValueError):
    """The training data is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class ImageItem:
    image_path: Path
    condition_path: Path | None
    caption: str


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def read_caption(image_path: Path, caption_extension: str, default: str = "") -> str:
    """The caption beside an image: ``<stem><caption_extension>``, else ``<stem>.txt`` / ``<stem>.caption``."""
    for ext in (caption_extension, ".txt", ".caption"):
        path = image_path.with_suffix(ext)
        if path.is_file():
            return path.read_text(encoding="utf-8").strip()
    return default


def collect_paired_items(train_data_dir, conditioning_data_dir, caption_extension: str = ".caption",
                         default_caption: str = "") -> list[ImageItem]:
    """Pair every image in ``train_data_dir`` with the condition image of the same basename (any image extension)."""
    image_dir = Path(train_data_dir)
    if not image_dir.is_dir():
        raise DataError(f"--train_data_dir {image_dir} is not a folder")
    images = _images_in(image_dir)
    if not images:
        raise DataError(f"--train_data_dir {image_dir} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    if conditioning_data_dir is None:
        raise DataError("give the condition images with --conditioning_data_dir (same basenames as the targets)")
    cond_dir = Path(conditioning_data_dir)
    if not cond_dir.is_dir():
        raise DataError(f"--conditioning_data_dir {cond_dir} is not a folder")
    by_stem = {p.stem: p for p in _images_in(cond_dir)}
    missing = [p.name for p in images if p.stem not in by_stem]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DataError(f"{len(missing)} of {len(images)} images have no condition image in {cond_dir}: {shown}")
    return [ImageItem(p, by_stem[p.stem], read_caption(p, caption_extension, default_caption)) for p in images]


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def resize_center_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scale so the image covers ``width x height`` (Lanczos), then crop the centre."""
    scale = max(width / img.width, height / img.height)
    new_size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(new_size, Image.LANCZOS)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


def to_tensor01(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class PairedImageDataset(torch.utils.data.Dataset):
    """Loads items as ``{"pixel_values": [3,H,W] in [-1,1], "hint": [3,H,W] in [0,1], "caption", "index"}``.

    Target and condition get the same geometry; a flip (``flip_aug``) hits both. Flips are a function of
    ``(seed, epoch, index)`` so a resumed run sees exactly the same data.
    """

    def __init__(self, items: list[ImageItem], resolution: tuple[int, int], flip_aug: bool = False, seed: int = 0):
        if not items:
            raise DataError("the dataset is empty")
        self.items, self.resolution, self.flip_aug, self.seed = items, resolution, flip_aug, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        width, height = self.resolution
        target = resize_center_crop(load_rgb(item.image_path), width, height)
        hint = resize_center_crop(load_rgb(item.condition_path), width, height)
        pixels, hint = to_tensor01(target), to_tensor01(hint)
        if self.flip_aug and random.Random(hash((self.seed, self.epoch, index))).random() < 0.5:
            pixels, hint = pixels.flip(-1), hint.flip(-1)
        return {"pixel_values": pixels * 2.0 - 1.0, "hint": hint, "caption": item.caption, "index": index}


def collate(samples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "hint": torch.stack([s["hint"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "index": torch.tensor([s["index"] for s in samples]),
    }


class EpochBatches:
    """Deterministic batches of item indices: epoch ``e`` is the permutation drawn from ``seed + e``; a global
    batch of ``batch_size * world_size`` indices is split so rank ``r`` takes every ``world_size``-th index.
    Position ``(epoch, batch)`` fully determines the data, so resuming needs only those two numbers."""

    def __init__(self, num_items: int, batch_size: int, seed: int, world_size: int = 1, rank: int = 0,
                 repeats: int = 1):
        self.num_items, self.batch_size, self.seed = num_items * repeats, batch_size, seed
        self.base_items = num_items
        self.world_size, self.rank = world_size, rank
        self.global_batch = batch_size * world_size
        if self.num_items < self.global_batch:
            raise DataError(f"{num_items} images x {repeats} repeats is fewer than one batch of "
                            f"{batch_size} x {world_size} processes; lower --train_batch_size or add images")

    def __len__(self) -> int:
        """Batches per epoch (the incomplete tail batch is dropped so every process gets the same batch size)."""
        return self.num_items // self.global_batch

    def batch(self, epoch: int, position: int) -> list[int]:
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch))
        start = position * self.global_batch
        global_batch = order[start:start + self.global_batch].tolist()
        return [i % self.base_items for i in global_batch[self.rank::self.world_size]]
