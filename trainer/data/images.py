"""Reading images and captions the way every part of the trainer does: any mode PIL opens, 8-bit to [0, 1], captions
beside the image, kohya's cover-then-centre-crop geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

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
            try:
                return path.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError as exc:
                raise DataError(f"caption {path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as "
                                "UTF-8") from None
    return default


# EXIF orientations that turn the picture by 90 degrees: the displayed width and height are swapped
_TRANSPOSING = {5, 6, 7, 8}
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _open_error(path: Path, exc: Exception) -> DataError:
    if isinstance(exc, Image.DecompressionBombError):
        return DataError(f"image {path} is larger than Pillow's safety limit ({exc}); downscale it (e.g. to 4096 "
                         "pixels on the long side) -- training crops it to the resolution anyway")
    return DataError(f"cannot read image {path}: {exc}")


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` as the image is displayed (its EXIF orientation applied), from the file header; a file
    that is not an image is a :class:`DataError` naming it."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise _open_error(path, exc) from None
    return (height, width) if orientation in _TRANSPOSING else (width, height)


def verify_image(path: Path) -> None:
    """Decode the whole file (a truncated or corrupt image fails here, not in the middle of training)."""
    try:
        with Image.open(path) as img:
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _open_error(path, exc) from None


def _as_eight_bit(img: Image.Image) -> Image.Image:
    """16-bit and float images scaled into 8 bits (PIL's convert would clip them: a 16-bit grey PNG turns white)."""
    array = np.asarray(img, dtype=np.float32)
    if img.mode.startswith("I;16"):
        full_scale = 65535.0
    elif img.mode == "I":  # 32-bit integers: Pillow reads some 16-bit files so
        full_scale = 65535.0 if array.max(initial=0) > 255 else 255.0
    else:  # "F": floats in [0, 1], else 8-bit levels
        full_scale = 1.0 if array.max(initial=0) <= 1.0 else 255.0
    return Image.fromarray(np.clip(np.round(array / full_scale * 255.0), 0, 255).astype(np.uint8), "L")


def load_rgb(path: Path, mode: str = "RGB") -> Image.Image:
    """The image at ``path`` as it is displayed (EXIF orientation applied, as ComfyUI's LoadImage and every viewer
    do), converted to ``mode``; 16-bit and float images are scaled, not clipped. A file PIL cannot read is a
    :class:`DataError` naming it."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in _HIGH_BIT_MODES:
                img = _as_eight_bit(img)
            return img.convert(mode)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _open_error(path, exc) from None


def load_condition_image(path: Path, size, box) -> np.ndarray:
    """A paired condition image (EXIF orientation applied) resized to ``size`` and cropped to ``box``, as ``HxWx3``
    float32 in [0, 1]: 8-bit images /255 (Lanczos, like the target); 16-bit greyscale PNGs (depth maps) /65535
    (OpenCV Lanczos, no clipping to 8 bits); grey is replicated to 3 channels."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                import cv2

                array = np.asarray(img, dtype=np.float32) / 65535.0
                array = np.clip(cv2.resize(array, tuple(size), interpolation=cv2.INTER_LANCZOS4), 0.0, 1.0)
                left, top, right, bottom = box
                return np.repeat(array[top:bottom, left:right, None], 3, axis=2)
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _open_error(path, exc) from None
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
