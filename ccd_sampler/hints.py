"""Hint (condition image) builders shared by the trainer and the ComfyUI preprocessor nodes.

One source of truth for the hint an adapter sees: the trainer builds its training hints with these functions (from the
degraded / masked / clean target) and the ComfyUI nodes call the very same functions at inference, so a hint made in
ComfyUI is exactly the hint the adapter was trained on. Pure torch: no OpenCV, no PIL (the node pack must import with
ComfyUI's requirements only).

Conventions (every function):

* images are float tensors ``[B, 3, H, W]`` with values in ``[0, 1]`` (ComfyUI's IMAGE is ``[B, H, W, C]``: move the
  channels first);
* masks are ``[B, 1, H, W]`` (``B`` may be 1 to broadcast over the images); a pixel is *masked* (to be inpainted) where
  ``mask > 0.5``, so soft ComfyUI masks work and the trainer's {0, 1} masks mean exactly what they say;
* results keep the input's device and dtype (float16/bfloat16 inputs are computed in float32 and cast back), are
  batched (image ``i`` of the output depends only on image ``i`` of the input) and deterministic;
* no input is modified in place.

=======  ===============================================================  ====================================
hint     what it is                                                       values
=======  ===============================================================  ====================================
sr       low-res image, bicubic upsampling (antialias off) to ``scale`` x  ``[0, 1]`` (clamped)
inpaint  the image with masked pixels set to -1.0 (INPAINT_MASKED_VALUE)   ``{-1} U [0, 1]``
canny    Canny edges, OpenCV 5's 8-bit pipeline reproduced exactly         ``{0, 1}``, 3 equal channels
gray     BT.601 luma                                                      ``[0, 1]``, 3 equal channels
=======  ===============================================================  ====================================

The trainer's other hints (``blur``, ``jpeg``, ``paired``) are plain images in ``[0, 1]`` (:data:`HINT_RANGES`).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

__all__ = [
    "BT601_WEIGHTS", "CANNY_BLUR_KERNEL_SIZE", "CANNY_BLUR_SIGMA", "HINT_RANGES", "INPAINT_MASKED_VALUE", "SR_SCALES",
    "canny_hint", "check_canny_thresholds", "gray_hint", "inpaint_hint", "rgb_to_luma", "sr_hint", "upscale_to",
]

#: ITU-R BT.601 luma weights (R, G, B), as OpenCV's ``COLOR_RGB2GRAY`` and PIL's ``convert("L")`` use.
BT601_WEIGHTS = (0.299, 0.587, 0.114)

#: Upscale factors of the super-resolution hint (the trainer's ``--sr_scale``, the hosts' SR input).
SR_SCALES = (2, 4, 8)

#: Value given to masked pixels of an inpainting hint (see :func:`inpaint_hint`).
INPAINT_MASKED_VALUE = -1.0

#: The fixed Gaussian pre-blur of :func:`canny_hint` (kornia's / ComfyUI's stock Canny defaults: 5x5, sigma 1).
CANNY_BLUR_KERNEL_SIZE = 5
CANNY_BLUR_SIGMA = 1.0

#: Documented value range of each hint type: (min, max, description).
HINT_RANGES = {
    "sr": (0.0, 1.0, "[0, 1]"),
    "inpaint": (INPAINT_MASKED_VALUE, 1.0, "{-1} U [0, 1] (-1 exactly at masked pixels)"),
    "canny": (0.0, 1.0, "{0, 1}"),
    "gray": (0.0, 1.0, "[0, 1]"),
    "blur": (0.0, 1.0, "[0, 1]"),
    "jpeg": (0.0, 1.0, "[0, 1]"),
    "paired": (0.0, 1.0, "[0, 1]"),
}

# OpenCV's fixed-point constants (see canny_hint): RGB->grey weights (sum 2^15; BT.601 0.299/0.587/0.114), the 5x5
# sigma-1 Gaussian as an integer kernel (sum 2^8, OpenCV's error-diffused rounding) and round(tan(22.5 deg) * 2^15).
_GRAY_FIXED = (9798.0, 19235.0, 3735.0)
_BLUR_FIXED = (14.0, 62.0, 104.0, 62.0, 14.0)
_TG22 = 13573


# ---------------------------------------------------------------------------------------------------------- helpers


def _check_image(image: torch.Tensor, name: str = "image") -> None:
    """Raise ``ValueError`` unless ``image`` is a floating ``[B, 3, H, W]`` tensor."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, 3, H, W] in [0, 1], got {type(image).__name__}")
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"{name} must have shape [B, 3, H, W] (channels first, RGB), got {list(image.shape)}"
                         " (a ComfyUI IMAGE [B, H, W, C] needs .movedim(-1, 1))")
    if not image.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in [0, 1], got dtype {image.dtype}")
    if image.shape[0] == 0 or image.shape[2] == 0 or image.shape[3] == 0:
        raise ValueError(f"{name} is empty: shape {list(image.shape)}")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float type is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rgb_to_luma(image: torch.Tensor) -> torch.Tensor:
    """BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` of ``image`` ``[B, 3, H, W]`` -> ``[B, 1, H, W]`` (same dtype)."""
    _check_image(image)
    weights = torch.tensor(BT601_WEIGHTS, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    return (image * weights).sum(dim=1, keepdim=True)


# ---------------------------------------------------------------------------------------------------- super-resolution


def upscale_to(low_res: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Upsample ``low_res`` ``[B, 3, h, w]`` to ``size = (H, W)`` with H >= h, W >= w: the super-resolution hint.

    Interpolation: bicubic (Keys kernel, a = -0.75), ``align_corners=False`` (pixel centres), ``antialias=False``,
    borders clamped (replicate), result clamped to [0, 1]. This is the same filter as OpenCV's
    ``cv2.resize(..., interpolation=cv2.INTER_CUBIC)`` for upsampling (PIL's BICUBIC uses a = -0.5 and differs
    slightly).
    Only enlarging is allowed: without antialiasing a downscale would alias.
    """
    _check_image(low_res, "low_res")
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise ValueError(f"size must be (H, W) positive integers, got {size!r}")
    height, width = int(size[0]), int(size[1])
    h, w = low_res.shape[-2:]
    if height < h or width < w:
        raise ValueError(f"upscale_to only enlarges: target {height}x{width} is smaller than the input {h}x{w}")
    work = low_res.to(_work_dtype(low_res.dtype))
    if (height, width) == (h, w):
        out = work.clamp(0.0, 1.0)
    else:
        out = F.interpolate(work, size=(height, width), mode="bicubic", align_corners=False, antialias=False)
        out = out.clamp_(0.0, 1.0)
    return out.to(low_res.dtype)


def sr_hint(low_res: torch.Tensor, scale: int) -> torch.Tensor:
    """The super-resolution hint: ``low_res`` ``[B, 3, h, w]`` upsampled to ``[B, 3, h*scale, w*scale]``.

    ``scale`` is a positive integer (the trainer's ``sr`` builder uses 2, 4 or 8); :func:`upscale_to` has the filter.
    """
    if isinstance(scale, bool) or int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    _check_image(low_res, "low_res")
    h, w = low_res.shape[-2:]
    return upscale_to(low_res, (h * int(scale), w * int(scale)))


# ---------------------------------------------------------------------------------------------------------- inpaint


def inpaint_hint(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inpainting hint: ``image`` with every masked pixel (``mask > 0.5``) set to -1.0 in all three channels.

    Parameters: ``image`` ``[B, 3, H, W]`` in [0, 1]; ``mask`` ``[B, 1, H, W]`` or ``[1, 1, H, W]`` (1 = inpaint this
    pixel; soft masks are thresholded at 0.5). The result lies in {-1} U [0, 1].

    Why -1 and not grey: no real pixel is -1, so the adapter can always tell a hole from black or grey content (a 0.5
    fill is indistinguishable from a grey wall), and the mask is recoverable from the hint alone (``hint < 0``). It is
    also the convention users already have ControlNet inpaint models for: sd-webui-controlnet's ``inpaint``
    preprocessor, comfyui_controlnet_aux's InpaintPreprocessor and diffusers' ControlNet inpaint example all set masked
    pixels to -1.0.
    """
    _check_image(image)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor [B, 1, H, W], got {type(mask).__name__}")
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must have shape [B, 1, H, W], got {list(mask.shape)}"
                         " (a ComfyUI MASK [B, H, W] needs .unsqueeze(1))")
    if mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"mask size {tuple(mask.shape[-2:])} differs from the image size {tuple(image.shape[-2:])}")
    if mask.shape[0] not in (1, image.shape[0]):
        raise ValueError(f"mask batch {mask.shape[0]} must be 1 or the image batch {image.shape[0]}")
    masked = (mask.to(device=image.device) > 0.5).expand(image.shape[0], 3, -1, -1)
    return torch.where(masked, torch.full_like(image, INPAINT_MASKED_VALUE), image)


# ------------------------------------------------------------------------------------------------------ gray / canny


def gray_hint(image: torch.Tensor) -> torch.Tensor:
    """The colorization hint: BT.601 luma of ``image`` ``[B, 3, H, W]`` replicated to 3 channels, in [0, 1]."""
    luma = rgb_to_luma(image.to(_work_dtype(image.dtype))).clamp(0.0, 1.0)
    return luma.expand(-1, 3, -1, -1).to(image.dtype).contiguous()


def check_canny_thresholds(low_threshold: float, high_threshold: float) -> None:
    """Raise ``ValueError`` unless ``0 <= low_threshold <= high_threshold <= 255`` (OpenCV's 0..255 units)."""
    for name, value in (("low_threshold", low_threshold), ("high_threshold", high_threshold)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"canny {name} must be a number in 0..255, got {value!r}")
        if not 0 <= value <= 255:
            raise ValueError(f"canny {name} must be in 0..255 (OpenCV units), got {value}")
    if low_threshold > high_threshold:
        raise ValueError(f"canny low_threshold {low_threshold} must not exceed high_threshold {high_threshold}")


def _integer_levels(image: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> float32 integer levels 0..255: ``round(255 x)``, exact for k/255 in any float
    type."""
    return torch.round(image.to(torch.float32).clamp(0.0, 1.0) * 255.0)


def _fixed_point_gray(rgb255: torch.Tensor) -> torch.Tensor:
    """8-bit grey from integer RGB levels: ``(9798 R + 19235 G + 3735 B + 2^14) >> 15`` (OpenCV's RGB2GRAY)."""
    r, g, b = rgb255[:, 0:1], rgb255[:, 1:2], rgb255[:, 2:3]
    return torch.floor((r * _GRAY_FIXED[0] + g * _GRAY_FIXED[1] + b * _GRAY_FIXED[2] + 16384.0) / 32768.0)


def _shift(x: torch.Tensor, dy: int, dx: int, mode: str = "constant") -> torch.Tensor:
    """``out[..., y, x] = x[..., y + dy, x + dx]`` for ``|dy|, |dx| <= r``; outside the image: zeros (``constant``),
    the nearest edge pixel (``replicate``) or the mirror without repeating the edge (``reflect``, OpenCV's
    reflect-101)."""
    r = max(abs(dy), abs(dx), 1)
    padded = F.pad(x, (r, r, r, r), mode=mode)
    h, w = x.shape[-2:]
    return padded[..., r + dy: r + dy + h, r + dx: r + dx + w]


def _fixed_point_blur(gray255: torch.Tensor) -> torch.Tensor:
    """OpenCV's bit-exact 8-bit ``GaussianBlur(gray, (5, 5), 1)``: integer kernel [14, 62, 104, 62, 14] / 256 per axis,
    reflect-101 borders, ``(sum + 2^15) >> 16``. All intermediate values are integers < 2^24, computed with
    elementwise ops (no convolution, so no TF32 / reduction-order effects): the same on every device."""
    r = len(_BLUR_FIXED) // 2
    mode = "reflect" if min(gray255.shape[-2:]) > r else "replicate"
    rows = sum(w * _shift(gray255, 0, i - r, mode) for i, w in enumerate(_BLUR_FIXED))
    both = sum(w * _shift(rows, i - r, 0, mode) for i, w in enumerate(_BLUR_FIXED))
    return torch.floor((both + 32768.0) / 65536.0)


def _sobel(gray255: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """3x3 Sobel derivatives (unnormalised, OpenCV's ``apertureSize=3``, replicated borders) as int64 tensors."""
    def at(dy, dx):
        return _shift(gray255, dy, dx, "replicate")

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    return gx.to(torch.int64), gy.to(torch.int64)


def _non_max_suppression(gx: torch.Tensor, gy: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """True where ``magnitude`` is a local maximum across the edge, in 4 quantised directions (OpenCV's integer rule).

    With ``TG22 = round(tan(22.5 deg) 2^15)``: horizontal gradients (``|gy| 2^15 < |gx| TG22``) compare with left/right,
    vertical ones (``|gy| 2^15 > |gx| (TG22 + 2^16)``, i.e. beyond 67.5 deg) with up/down, diagonal ones with the two
    diagonal neighbours along the gradient; ties are broken as OpenCV does (``>`` one side, ``>=`` the other).
    Neighbours outside the image count as 0.
    """
    ax, ay = gx.abs(), gy.abs()
    m = magnitude
    tg22x = ax * _TG22
    horizontal = ay * 32768 < tg22x
    vertical = ay * 32768 > tg22x + ax * 65536
    same_sign = (gx * gy) >= 0  # gradient along (1, 1) or (-1, -1) in (x, y-down) coordinates
    keep_h = (m > _shift(m, 0, -1)) & (m >= _shift(m, 0, 1))
    keep_v = (m > _shift(m, -1, 0)) & (m >= _shift(m, 1, 0))
    keep_d_same = (m > _shift(m, -1, -1)) & (m > _shift(m, 1, 1))
    keep_d_opp = (m > _shift(m, -1, 1)) & (m > _shift(m, 1, -1))
    keep_d = torch.where(same_sign, keep_d_same, keep_d_opp)
    return torch.where(horizontal, keep_h, torch.where(vertical, keep_v, keep_d))


def _dilate3x3(mask: torch.Tensor) -> torch.Tensor:
    """Boolean 3x3 dilation (8-connectivity) of ``[B, 1, H, W]``, outside the image = False (separable OR of shifts)."""
    p = F.pad(mask, (1, 1, 1, 1))
    rows = p[..., :, :-2] | p[..., :, 1:-1] | p[..., :, 2:]
    return rows[..., :-2, :] | rows[..., 1:-1, :] | rows[..., 2:, :]


def _hysteresis(strong: torch.Tensor, weak: torch.Tensor, steps_per_check: int = 8) -> torch.Tensor:
    """Grow boolean ``strong`` edges into 8-connected ``weak`` candidates (``strong`` within ``weak``) until stable."""
    edges = strong & weak
    while True:
        previous = edges
        for _ in range(steps_per_check):
            edges = _dilate3x3(edges) & weak
        if torch.equal(edges, previous):
            return edges


def canny_hint(image: torch.Tensor, low_threshold: float = 100, high_threshold: float = 200) -> torch.Tensor:
    """The canny hint: a deterministic pure-torch Canny edge map of ``image`` ``[B, 3, H, W]``, 3 channels in {0, 1}.

    Steps (all on integer levels, as OpenCV does for 8-bit images):

    1. ``round(255 x)`` per channel, then BT.601 grey in OpenCV's fixed point
       ``(9798 R + 19235 G + 3735 B + 2^14) >> 15``;
    2. a fixed 5x5 Gaussian blur, sigma 1 (kornia's / ComfyUI's Canny defaults), in OpenCV's bit-exact fixed point
       (kernel [14, 62, 104, 62, 14] / 256 per axis, reflect-101 borders, rounded to integer levels);
    3. 3x3 Sobel (replicated borders) and the L1 magnitude ``|gx| + |gy|`` (OpenCV's default ``L2gradient=False``);
    4. non-maximum suppression in 4 directions (OpenCV's integer direction test and tie rule);
    5. double threshold: candidates where magnitude > ``low_threshold``, seeds where magnitude > ``high_threshold``;
       hysteresis by iterated 3x3 dilation of the seeds inside the candidates until stable (8-connectivity).

    Thresholds are in OpenCV's 0..255 units with ``0 <= low <= high <= 255``. The result equals
    ``cv2.Canny(cv2.GaussianBlur(cv2.cvtColor(rgb8, cv2.COLOR_RGB2GRAY), (5, 5), 1), low, high) / 255`` on OpenCV 5 for
    8-bit inputs (not guaranteed bit for bit: OpenCV 4 rounds grey with 14-bit weights). Every intermediate value is an
    integer computed exactly, so the edges do not depend on the device, the input float type or the batch.
    """
    _check_image(image)
    check_canny_thresholds(low_threshold, high_threshold)
    gray = _fixed_point_blur(_fixed_point_gray(_integer_levels(image)))
    gx, gy = _sobel(gray)
    magnitude = gx.abs() + gy.abs()
    candidate = _non_max_suppression(gx, gy, magnitude) & (magnitude > low_threshold)
    strong = candidate & (magnitude > high_threshold)
    edges = _hysteresis(strong, candidate)
    return edges.expand(-1, 3, -1, -1).to(image.dtype).contiguous()
