"""Reading images and captions the way every part of the trainer does: any mode PIL opens, 8-bit to [0, 1], captions
beside the image, kohya's cover-then-centre-crop geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from trainer.data.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def read_caption(image_path: Path, caption_extension: str, default: str = "") -> str:
    """The caption beside an image: ``<stem><caption_extension>``, else ``<stem>.txt`` / ``<stem>.caption``."""
    for ext in (caption_extension, ".txt", ".caption"):
        if not ext:
            continue
        path = image_path.with_suffix(ext if ext.startswith(".") else "." + ext)
        if path.is_file():
            return path.read_text(encoding="utf-8").strip()
    return default


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the file header; a file that is not an image is a :class:`DataError` naming it."""
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def load_rgb(path: Path, mode: str = "RGB") -> Image.Image:
    """The image at ``path`` converted to ``mode``; a file PIL cannot read is a :class:`DataError` naming it."""
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def load_condition_image(path: Path, size, box) -> np.ndarray:
    """A paired condition image resized to ``size`` and cropped to ``box``, as ``HxWx3`` float32 in [0, 1]: 8-bit
    images /255 (Lanczos, like the target); 16-bit greyscale PNGs (depth maps) /65535 (OpenCV Lanczos, no clipping to
    8 bits); grey is replicated to 3 channels."""
    try:
        with Image.open(path) as img:
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                import cv2

                array = np.asarray(img, dtype=np.float32) / 65535.0
                array = np.clip(cv2.resize(array, tuple(size), interpolation=cv2.INTER_LANCZOS4), 0.0, 1.0)
                left, top, right, bottom = box
                return np.repeat(array[top:bottom, left:right, None], 3, axis=2)
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    return np.asarray(rgb.resize(tuple(size), Image.LANCZOS).crop(box), dtype=np.float32) / 255.0


def cover_size(size, target) -> tuple[int, int]:
    """The size that covers ``target`` with the aspect ratio of ``size`` (kohya's rounding)."""
    (w, h), (tw, th) = size, target
    if w / h > tw / th:
        return max(tw, int(w * th / h + 0.5)), th
    return tw, max(th, int(h * tw / w + 0.5))


def resize_center_crop(img: Image.Image, width: int, height: int, resample=Image.LANCZOS) -> Image.Image:
    """Scale so the image covers ``width x height`` (Lanczos unless ``resample``), then crop the centre."""
    new_size = cover_size(img.size, (width, height))
    img = img.resize(new_size, resample)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


def to_tensor01(img) -> torch.Tensor:
    """An 8-bit image (PIL or ``HxW[xC]`` array) as a ``[C, H, W]`` float tensor in [0, 1] (grey: one channel)."""
    array = np.asarray(img, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()
