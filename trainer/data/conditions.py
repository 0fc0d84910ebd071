"""Condition builders: the training-time hint (and mask) generated from a target image.

Each builder is called as ``builder(target, rng)`` (``paired``: ``builder(target, rng, condition=...)``) with
``target`` an ``HxWx3`` uint8 RGB image (already resized/cropped by the dataset) and ``rng`` a
:class:`numpy.random.Generator`, and returns a :class:`Condition` with the hint at the target's full resolution. The
same ``(target, seed)`` always gives the same arrays. Builders are made by name with :func:`make_condition_builder`
(``--task`` / the dataset TOML's ``condition = "..."``)::

    builder = make_condition_builder("sr", scale=4)            # or sr_scale=4, as the dataset TOML spells it
    cond = builder(target, np.random.default_rng(seed))      # cond.hint: HxWx3 float32, cond.mask: None

Everything that also happens at inference (upsampling the low-res image, filling masked pixels, Canny, grey) is done by
:mod:`ccd_sampler.hints`, which the ComfyUI preprocessor nodes call too: a hint made in ComfyUI is exactly the hint the
adapter was trained on. Only the random *degradations* (blur, resize kernels, noise, JPEG, masks) live here (OpenCV).

=======  ===========================================  =============  ========================  =============
task     hint                                         hint values    mask                      deterministic
=======  ===========================================  =============  ========================  =============
sr       degraded low-res, bicubic-upsampled back     [0, 1]         None                      no
inpaint  target with masked pixels = -1.0             {-1} U [0, 1]  HxW in {0, 1}, 1 = hole   no
canny    Canny edges, 3 equal channels                {0, 1}         None                      yes
gray     BT.601 luma, 3 equal channels                [0, 1]         None                      yes
blur     Gaussian-blurred target                      [0, 1]         None                      no
jpeg     JPEG-compressed target                       [0, 1]         None                      no
paired   the user's own condition image (depth, ...)  [0, 1]         None                      yes
=======  ===========================================  =============  ========================  =============

Hints are ``HxWx3`` float32 (channels last, like the target); :func:`image_to_tensor` / :func:`tensor_to_hint` convert
to and from the ``[1, 3, H, W]`` float layout of :mod:`ccd_sampler.hints`. Deterministic builders (``is_deterministic``)
ignore ``rng``, so the dataset may cache their conditions; :meth:`ConditionBuilder.options` is the settings dict for a
cache key and :meth:`ConditionBuilder.hint_preprocessing` the inference-relevant part for the adapter's
``codi.hint_preprocessing`` metadata.
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np
import torch

from ccd_sampler import hints
from ccd_sampler.hints import SR_SCALES
from trainer.data.images import to_tensor01

__all__ = [
    "BlurCondition", "CannyCondition", "Condition", "ConditionBuilder", "CONDITION_BUILDERS", "GrayCondition",
    "InpaintCondition", "JpegCondition", "MIN_IMAGE_SIZE", "PairedCondition", "SR_SCALES", "SuperResolutionCondition",
    "TASKS", "check_image", "degrade_to_low_res", "image_to_tensor", "is_deterministic", "make_condition_builder",
    "option_names",
    "tensor_to_hint",
]

#: Smallest side (pixels) of a target, and of the low-res image an ``sr`` builder makes.
MIN_IMAGE_SIZE = 8

_RESIZE_KERNELS = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
_MASK_KINDS = ("box", "stroke", "border")


@dataclass(frozen=True)
class Condition:
    """A generated condition.

    ``hint``: ``HxWx3`` float32 at the target's resolution, values as documented per task (module docstring).
    ``mask``: ``HxW`` float32 in {0, 1} (1 = pixel to inpaint) for ``inpaint``, else None.
    """

    hint: np.ndarray
    mask: np.ndarray | None = None


# ------------------------------------------------------------------------------------------------ layout helpers


def check_image(image, name: str = "target") -> np.ndarray:
    """Return ``image`` if it is an ``HxWx3`` uint8 array with both sides >= :data:`MIN_IMAGE_SIZE`, else raise."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a numpy array HxWx3 uint8 (RGB), got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must be HxWx3 (RGB, channels last), got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 (0..255), got dtype {image.dtype}")
    if min(image.shape[:2]) < MIN_IMAGE_SIZE:
        raise ValueError(f"{name} is {image.shape[0]}x{image.shape[1]}; both sides must be >= {MIN_IMAGE_SIZE} pixels")
    return image


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``HxWx3`` uint8 -> float32 tensor ``[1, 3, H, W]`` in [0, 1] (the :mod:`ccd_sampler.hints` layout)."""
    check_image(image, "image")
    return to_tensor01(image).unsqueeze(0)


def tensor_to_hint(tensor: torch.Tensor) -> np.ndarray:
    """Tensor ``[1, 3, H, W]`` (or ``[3, H, W]``) -> ``HxWx3`` float32 numpy array (values unchanged)."""
    if tensor.ndim == 4:
        if tensor.shape[0] != 1:
            raise ValueError(f"expected one image [1, 3, H, W], got batch {tensor.shape[0]}")
        tensor = tensor[0]
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a tensor [1, 3, H, W] or [3, H, W], got {list(tensor.shape)}")
    return np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).permute(1, 2, 0).numpy())


def _uint8_to_hint(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / np.float32(255.0)


def _range(task: str, name: str, value, lo: float, hi: float, integer: bool = False) -> tuple:
    """Validate an option that is a ``(min, max)`` range (a single number means ``(v, v)``) within ``[lo, hi]``."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise ValueError(f"{task}: {name} must be a (min, max) pair of numbers, got {value!r}")
    a, b = value
    if integer and (int(a) != a or int(b) != b):
        raise ValueError(f"{task}: {name} must be integers, got {value!r}")
    if not lo <= a <= b <= hi:
        raise ValueError(f"{task}: {name} must satisfy {lo} <= min <= max <= {hi}, got {value!r}")
    return (int(a), int(b)) if integer else (float(a), float(b))


def _probability(task: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{task}: {name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """OpenCV Gaussian blur with a ``2*ceil(3 sigma)+1`` kernel and reflect-101 borders; sigma <= 0 is a no-op."""
    if sigma <= 0:
        return image
    ksize = 2 * math.ceil(3 * sigma) + 1
    return cv2.GaussianBlur(image, (ksize, ksize), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip an RGB uint8 image through OpenCV's JPEG codec (4:2:0) at ``quality`` (1..100)."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a JPEG")
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


# ------------------------------------------------------------------------------------------------------ builders


class ConditionBuilder:
    """Base class: ``builder(target, rng, condition=None) -> Condition``.

    Class attributes: ``task`` (registry name), ``is_deterministic`` (the result does not depend on ``rng``, so the
    dataset may cache it), ``requires_condition`` (the caller passes the user's condition image: ``paired``).
    """

    task: ClassVar[str] = ""
    is_deterministic: ClassVar[bool] = False
    requires_condition: ClassVar[bool] = False
    #: alternative option names accepted by :func:`make_condition_builder` (after stripping the ``<task>_`` prefix)
    aliases: ClassVar[dict[str, str]] = {}

    def __init__(self, **options):
        self._options = options

    def options(self) -> dict:
        """The builder's settings (JSON-serialisable), e.g. for a cache-invalidation key."""
        return {"task": self.task, **{k: list(v) if isinstance(v, tuple) else v for k, v in self._options.items()}}

    def hint_preprocessing(self) -> dict:
        """What the inference-time preprocessor must do (``codi.hint_preprocessing`` metadata)."""
        return {"type": self.task}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._options.items())
        return f"{type(self).__name__}({args})"

    def __call__(self, target: np.ndarray, rng: np.random.Generator | None = None,
                 condition: np.ndarray | None = None) -> Condition:
        check_image(target)
        if condition is not None:
            raise ValueError(f"condition {self.task!r} is generated from the target; do not pass a condition image "
                             "(use task 'paired' for your own condition images)")
        if not self.is_deterministic and not isinstance(rng, np.random.Generator):
            raise TypeError(f"condition {self.task!r} is random: pass rng=np.random.default_rng(seed), "
                            f"got {type(rng).__name__}")
        return self._build(target, rng)

    def _build(self, target: np.ndarray, rng: np.random.Generator | None) -> Condition:
        raise NotImplementedError


class SuperResolutionCondition(ConditionBuilder):
    """``sr``: a light "real-world" degradation chain (in the spirit of Real-ESRGAN's first order), then the hint is the
    low-res image upsampled back to full size by :func:`ccd_sampler.hints.sr_hint` (bicubic, the node's filter).

    Chain, each parameter drawn uniformly from its range per call (in this order):

    1. Gaussian blur at full resolution, sigma from ``blur_sigma`` (pixels; ``None`` = no blur);
    2. downscale to ``H/scale x W/scale`` with a kernel drawn from ``resize_kernels`` (``area``, ``bilinear``,
       ``bicubic``: OpenCV's INTER_AREA / INTER_LINEAR / INTER_CUBIC; the last two alias like real cameras' resamplers);
    3. Gaussian noise with sigma from ``noise_sigma`` (0..255 units; ``None`` = none), grey (same on all channels) with
       probability ``gray_noise_prob``, else per channel; rounded and clipped to uint8;
    4. JPEG compression with quality from ``jpeg_quality`` (integers 1..100; ``None`` = none).

    Parameters: ``scale`` in (2, 4, 8), default 4 (the target's sides must be multiples of ``scale`` and the low-res
    image at least 8 px); ``blur_sigma=(0.2, 1.2)``; ``resize_kernels=("area", "bilinear", "bicubic")``;
    ``noise_sigma=(0.0, 4.0)``; ``gray_noise_prob=0.4``; ``jpeg_quality=(70, 95)``.
    """

    task = "sr"

    def __init__(self, scale: int = 4, blur_sigma=(0.2, 1.2), resize_kernels=("area", "bilinear", "bicubic"),
                 noise_sigma=(0.0, 4.0), gray_noise_prob: float = 0.4, jpeg_quality=(70, 95)):
        if isinstance(scale, bool) or scale not in SR_SCALES:
            raise ValueError(f"sr: scale must be one of {', '.join(map(str, SR_SCALES))}, got {scale!r}")
        blur_sigma = None if blur_sigma is None else _range("sr", "blur_sigma", blur_sigma, 0.0, 10.0)
        noise_sigma = None if noise_sigma is None else _range("sr", "noise_sigma", noise_sigma, 0.0, 100.0)
        jpeg_quality = None if jpeg_quality is None else _range("sr", "jpeg_quality", jpeg_quality, 1, 100, True)
        if isinstance(resize_kernels, str):
            resize_kernels = (resize_kernels,)
        resize_kernels = tuple(resize_kernels)
        bad = [k for k in resize_kernels if k not in _RESIZE_KERNELS]
        if not resize_kernels or bad:
            raise ValueError(f"sr: resize_kernels must be a non-empty subset of {', '.join(_RESIZE_KERNELS)}, "
                             f"got {resize_kernels!r}")
        gray_noise_prob = _probability("sr", "gray_noise_prob", gray_noise_prob)
        super().__init__(scale=int(scale), blur_sigma=blur_sigma, resize_kernels=resize_kernels,
                         noise_sigma=noise_sigma, gray_noise_prob=gray_noise_prob, jpeg_quality=jpeg_quality)
        self.scale = int(scale)
        self.blur_sigma, self.resize_kernels, self.noise_sigma = blur_sigma, resize_kernels, noise_sigma
        self.gray_noise_prob, self.jpeg_quality = gray_noise_prob, jpeg_quality

    def hint_preprocessing(self) -> dict:
        return {"type": "sr", "scale": self.scale, "upsample": "bicubic", "antialias": False}

    def low_res_size(self, target: np.ndarray) -> tuple[int, int]:
        """``(h, w)`` of the low-res image for ``target``; raises if the target does not fit the scale."""
        check_image(target)
        height, width = target.shape[:2]
        if height % self.scale or width % self.scale:
            raise ValueError(f"sr: the target {height}x{width} is not divisible by scale {self.scale}; crop or resize "
                             f"it to multiples of {self.scale} (training resolutions are multiples of 8)")
        h, w = height // self.scale, width // self.scale
        if min(h, w) < MIN_IMAGE_SIZE:
            raise ValueError(f"sr: the target {height}x{width} is too small for scale {self.scale}: the low-res image "
                             f"would be {h}x{w}, needs >= {MIN_IMAGE_SIZE} px per side (target >= "
                             f"{MIN_IMAGE_SIZE * self.scale})")
        return h, w

    def degrade_to_low_res(self, target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The degraded low-res image, ``(H/scale)x(W/scale)x3`` uint8 (steps 1-4 of the chain)."""
        h, w = self.low_res_size(target)
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"sr: pass rng=np.random.default_rng(seed), got {type(rng).__name__}")
        image = target
        if self.blur_sigma is not None:
            image = _gaussian_blur(image, rng.uniform(*self.blur_sigma))
        kernel = self.resize_kernels[int(rng.integers(len(self.resize_kernels)))]
        image = cv2.resize(image, (w, h), interpolation=_RESIZE_KERNELS[kernel])
        if self.noise_sigma is not None:
            sigma = rng.uniform(*self.noise_sigma)
            gray = rng.random() < self.gray_noise_prob
            noise = rng.standard_normal((h, w, 1 if gray else 3), dtype=np.float32) * np.float32(sigma)
            image = np.clip(np.rint(image.astype(np.float32) + noise), 0, 255).astype(np.uint8)
        if self.jpeg_quality is not None:
            image = _jpeg(image, int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1)))
        return np.ascontiguousarray(image)

    def hint_from_low_res(self, low_res: np.ndarray) -> np.ndarray:
        """The hint for a low-res uint8 image: :func:`ccd_sampler.hints.sr_hint` at this builder's scale."""
        return tensor_to_hint(hints.sr_hint(image_to_tensor(low_res), self.scale))

    def _build(self, target, rng):
        return Condition(self.hint_from_low_res(self.degrade_to_low_res(target, rng)))


def degrade_to_low_res(target: np.ndarray, rng: np.random.Generator, scale: int = 4, **options) -> np.ndarray:
    """The ``sr`` builder's degraded low-res image (uint8, ``(H/scale)x(W/scale)x3``); options as
    :class:`SuperResolutionCondition`. Same ``rng`` state -> the same low-res image the builder's hint is made from."""
    return SuperResolutionCondition(scale=scale, **options).degrade_to_low_res(target, rng)


class InpaintCondition(ConditionBuilder):
    """``inpaint``: a random mask (1 = inpaint) and the hint :func:`ccd_sampler.hints.inpaint_hint` (masked pixels =
    -1.0, unmasked pixels = the target).

    Each call picks one mask kind (``mask_kind="mixed"``: ``box`` / ``stroke`` / ``border`` with probabilities
    ``box_prob`` / ``stroke_prob`` / ``border_prob``, normalised; or force one kind with ``mask_kind="box"`` etc.) and a
    target coverage uniformly in ``coverage`` (fraction of pixels); the shapes are then grown until the mask covers that
    fraction, so the coverage always lies in the range.

    * ``box``: 1 to ``max_boxes`` axis-aligned rectangles (random centres and aspect ratios 1:2..2:1);
    * ``stroke``: 1 to ``max_strokes`` brush strokes: thick random-walk polylines with round caps;
    * ``border``: outpainting: bands along 1-4 randomly chosen image sides (each side's band touches that edge).

    Defaults: ``coverage=(0.1, 0.6)``, ``mask_kind="mixed"``, ``box_prob=0.4``, ``stroke_prob=0.4``,
    ``border_prob=0.2``, ``max_boxes=3``, ``max_strokes=4``. The coverage range must be at least 0.05 wide.
    """

    task = "inpaint"

    def __init__(self, coverage=(0.1, 0.6), mask_kind: str = "mixed", box_prob: float = 0.4,
                 stroke_prob: float = 0.4, border_prob: float = 0.2, max_boxes: int = 3, max_strokes: int = 4):
        coverage = _range("inpaint", "coverage", coverage, 0.0, 1.0)
        if coverage[1] - coverage[0] < 0.05 or coverage[1] <= 0:
            raise ValueError(f"inpaint: coverage range {coverage} is too narrow to hit; make it at least 0.05 wide")
        if mask_kind not in ("mixed", *_MASK_KINDS):
            raise ValueError(f"inpaint: mask_kind must be one of mixed, {', '.join(_MASK_KINDS)}; got {mask_kind!r}")
        probs = [_probability("inpaint", f"{k}_prob", p) for k, p in
                 zip(_MASK_KINDS, (box_prob, stroke_prob, border_prob))]
        if mask_kind == "mixed" and sum(probs) <= 0:
            raise ValueError("inpaint: box_prob, stroke_prob and border_prob are all 0")
        for name, value in (("max_boxes", max_boxes), ("max_strokes", max_strokes)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= 32:
                raise ValueError(f"inpaint: {name} must be an integer in 1..32, got {value!r}")
        super().__init__(coverage=coverage, mask_kind=mask_kind, box_prob=probs[0], stroke_prob=probs[1],
                         border_prob=probs[2], max_boxes=int(max_boxes), max_strokes=int(max_strokes))
        self.coverage, self.mask_kind = coverage, mask_kind
        self.kind_probs = np.asarray(probs, dtype=np.float64) / max(sum(probs), 1e-12)
        self.max_boxes, self.max_strokes = int(max_boxes), int(max_strokes)

    def hint_preprocessing(self) -> dict:
        return {"type": "inpaint", "masked_value": hints.INPAINT_MASKED_VALUE, "mask_threshold": 0.5}

    # -- mask shapes: each returns render(t) -> HxW uint8 mask, monotone (non-decreasing) in t, plus t's range

    @staticmethod
    def _boxes(shape, rng, count):
        height, width = shape
        centres = rng.uniform(0, 1, size=(count, 2)) * (height, width)
        aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=count))
        weight = rng.uniform(0.5, 1.0, size=count)
        half_h, half_w = weight * np.sqrt(aspect) * height, weight / np.sqrt(aspect) * width

        def render(t):
            mask = np.zeros(shape, np.uint8)
            for (cy, cx), hh, hw in zip(centres, half_h * t, half_w * t):
                y0, y1 = max(0, math.floor(cy - hh)), min(height, math.ceil(cy + hh))
                x0, x1 = max(0, math.floor(cx - hw)), min(width, math.ceil(cx + hw))
                mask[y0:y1, x0:x1] = 1
            return mask

        return render, 0.0, 4.0  # t = 4: every box covers the whole image

    @staticmethod
    def _strokes(shape, rng, count):
        height, width = shape
        side, diagonal = min(height, width), math.hypot(height, width)
        paths = []
        for _ in range(count):
            vertices = int(rng.integers(4, 9))
            point = rng.uniform(0, 1, size=2) * (width - 1, height - 1)
            angle = rng.uniform(0, 2 * math.pi)
            path = [point]
            for _ in range(vertices - 1):
                angle += rng.uniform(-math.pi / 2, math.pi / 2)
                step = rng.uniform(0.1, 0.35) * side
                point = np.clip(point + step * np.array([math.cos(angle), math.sin(angle)]), 0, (width - 1, height - 1))
                path.append(point)
            paths.append(np.rint(np.asarray(path)).astype(np.int32).reshape(-1, 1, 2))

        def render(t):
            mask = np.zeros(shape, np.uint8)
            thickness = int(round(t))
            if thickness > 0:
                cv2.polylines(mask, paths, isClosed=False, color=1, thickness=thickness, lineType=cv2.LINE_8)
            return mask

        return render, 0, int(math.ceil(2 * diagonal)) + 1  # thickness 2*diagonal covers every pixel

    @staticmethod
    def _border(shape, rng):
        height, width = shape
        sides = rng.permutation(4)[: int(rng.choice([1, 2, 3, 4], p=[0.4, 0.3, 0.15, 0.15]))]
        weight = rng.uniform(0.5, 1.0, size=4)

        def render(t):
            mask = np.zeros(shape, np.uint8)
            for s in sides:
                extent = height if s in (0, 1) else width
                n = min(extent, math.ceil(t * weight[s] * extent))
                if n <= 0:
                    continue
                if s == 0:
                    mask[:n] = 1          # top
                elif s == 1:
                    mask[height - n:] = 1  # bottom
                elif s == 2:
                    mask[:, :n] = 1       # left
                else:
                    mask[:, width - n:] = 1  # right
            return mask

        return render, 0.0, 2.0  # t = 2: one band alone covers the image

    def _fit(self, render, t_lo, t_hi, target, integer: bool):
        """Smallest ``t`` whose mask reaches ``target`` coverage (bisection), or the neighbour below it; the mask of the
        two that lies in the coverage range and is closest to ``target``, else None."""
        lo_cov, hi_cov = self.coverage
        if render(t_hi).mean() < target:
            return None
        a, b = t_lo, t_hi  # coverage(a) < target <= coverage(b) (or a == t_lo)
        for _ in range(64):
            if (b - a <= 1) if integer else (b - a <= 1e-6 * (t_hi - t_lo)):
                break
            mid = (a + b) // 2 if integer else (a + b) / 2
            if render(mid).mean() >= target:
                b = mid
            else:
                a = mid
        candidates = [m for m in (render(b), render(a)) if lo_cov <= m.mean() <= hi_cov]
        return min(candidates, key=lambda m: abs(m.mean() - target)) if candidates else None

    def make_mask(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """A mask ``HxW`` float32 in {0, 1} (1 = inpaint) with coverage in ``coverage``, drawn from ``rng``."""
        shape = (int(shape[0]), int(shape[1]))
        kind = self.mask_kind if self.mask_kind != "mixed" else _MASK_KINDS[int(rng.choice(3, p=self.kind_probs))]
        for _ in range(20):  # the coverage steps are small, a retry is rare
            target = rng.uniform(*self.coverage)
            if kind == "box":
                render, t_lo, t_hi = self._boxes(shape, rng, int(rng.integers(1, self.max_boxes + 1)))
            elif kind == "stroke":
                render, t_lo, t_hi = self._strokes(shape, rng, int(rng.integers(1, self.max_strokes + 1)))
            else:
                render, t_lo, t_hi = self._border(shape, rng)
            mask = self._fit(render, t_lo, t_hi, target, integer=kind == "stroke")
            if mask is not None:
                return mask.astype(np.float32)
        raise RuntimeError(f"inpaint: could not draw a {kind} mask with coverage in {self.coverage} for a "
                           f"{shape[0]}x{shape[1]} image; widen the coverage range")

    def _build(self, target, rng):
        mask = self.make_mask(target.shape[:2], rng)
        hint = hints.inpaint_hint(image_to_tensor(target), torch.from_numpy(mask)[None, None])
        return Condition(tensor_to_hint(hint), mask)


class CannyCondition(ConditionBuilder):
    """``canny``: :func:`ccd_sampler.hints.canny_hint` of the target (3 equal channels in {0, 1}); deterministic.

    Parameters: ``low_threshold=100``, ``high_threshold=200`` in OpenCV's 0..255 units, ``0 <= low <= high <= 255``
    (aliases ``low`` / ``high``, so the dataset TOML's ``canny_low`` / ``canny_high`` work).
    """

    task = "canny"
    is_deterministic = True
    aliases = {"low": "low_threshold", "high": "high_threshold"}

    def __init__(self, low_threshold: float = 100, high_threshold: float = 200):
        hints.check_canny_thresholds(low_threshold, high_threshold)
        super().__init__(low_threshold=low_threshold, high_threshold=high_threshold)
        self.low_threshold, self.high_threshold = low_threshold, high_threshold

    def hint_preprocessing(self) -> dict:
        return {"type": "canny", "low_threshold": self.low_threshold, "high_threshold": self.high_threshold}

    def _build(self, target, rng):
        edges = hints.canny_hint(image_to_tensor(target), self.low_threshold, self.high_threshold)
        return Condition(tensor_to_hint(edges))


class GrayCondition(ConditionBuilder):
    """``gray`` (colorization): :func:`ccd_sampler.hints.gray_hint`, BT.601 luma on 3 channels; no parameters."""

    task = "gray"
    is_deterministic = True

    def __init__(self):
        super().__init__()

    def _build(self, target, rng):
        return Condition(tensor_to_hint(hints.gray_hint(image_to_tensor(target))))


class BlurCondition(ConditionBuilder):
    """``blur`` (restoration / deblurring): the target Gaussian-blurred with sigma drawn uniformly from ``sigma``
    (pixels, default ``(0.5, 3.0)``; kernel ``2*ceil(3 sigma)+1``, reflect-101 borders), as uint8 / 255."""

    task = "blur"

    def __init__(self, sigma=(0.5, 3.0)):
        sigma = _range("blur", "sigma", sigma, 0.0, 50.0)
        super().__init__(sigma=sigma)
        self.sigma = sigma

    def _build(self, target, rng):
        return Condition(_uint8_to_hint(_gaussian_blur(target, rng.uniform(*self.sigma))))


class JpegCondition(ConditionBuilder):
    """``jpeg`` (restoration / artifact removal): the target round-tripped through JPEG (OpenCV, 4:2:0) at a quality
    drawn uniformly from the integers in ``quality`` (1..100, default ``(10, 50)``), as uint8 / 255."""

    task = "jpeg"

    def __init__(self, quality=(10, 50)):
        quality = _range("jpeg", "quality", quality, 1, 100, integer=True)
        super().__init__(quality=quality)
        self.quality = quality

    def _build(self, target, rng):
        return Condition(_uint8_to_hint(_jpeg(target, int(rng.integers(self.quality[0], self.quality[1] + 1)))))


class PairedCondition(ConditionBuilder):
    """``paired``: the user's own condition image (depth map, pose, ...), passed as ``condition=`` and returned as the
    hint. ``condition``: uint8 (/255) or uint16 (/65535, 16-bit depth PNGs), ``HxW``, ``HxWx1`` or ``HxWx3`` (grey is
    replicated to 3 channels), already resized/cropped exactly like the target (same ``HxW``). No parameters."""

    task = "paired"
    is_deterministic = True
    requires_condition = True

    def __init__(self):
        super().__init__()

    def __call__(self, target, rng=None, condition=None) -> Condition:
        check_image(target)
        if condition is None:
            raise ValueError("paired: pass the condition image (condition=...); paired conditions come from "
                             "--conditioning_data_dir / conditioning_data_dir, same basename as the target")
        if not isinstance(condition, np.ndarray) or condition.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"paired: the condition must be a uint8 or uint16 numpy array, got "
                             f"{getattr(condition, 'dtype', type(condition).__name__)}")
        if condition.ndim == 2:
            condition = condition[:, :, None]
        if condition.ndim != 3 or condition.shape[2] not in (1, 3):
            raise ValueError(f"paired: the condition must be HxW, HxWx1 or HxWx3, got shape {condition.shape}")
        if condition.shape[:2] != target.shape[:2]:
            raise ValueError(f"paired: condition size {condition.shape[0]}x{condition.shape[1]} differs from the "
                             f"target {target.shape[0]}x{target.shape[1]}; apply the same resize/crop to both")
        scale = np.float32(255.0 if condition.dtype == np.uint8 else 65535.0)
        hint = np.broadcast_to(condition.astype(np.float32) / scale, (*target.shape[:2], 3))
        return Condition(np.ascontiguousarray(hint))


# ------------------------------------------------------------------------------------------------------ registry

CONDITION_BUILDERS: dict[str, type[ConditionBuilder]] = {
    "sr": SuperResolutionCondition, "inpaint": InpaintCondition, "canny": CannyCondition, "gray": GrayCondition,
    "blur": BlurCondition, "jpeg": JpegCondition, "paired": PairedCondition,
}
TASKS = tuple(CONDITION_BUILDERS)


def _builder_class(task) -> type[ConditionBuilder]:
    if task not in CONDITION_BUILDERS:
        raise ValueError(f"unknown condition task {task!r}; valid: {', '.join(TASKS)} (your own condition images, "
                         "e.g. depth maps, use 'paired')")
    return CONDITION_BUILDERS[task]


def option_names(task: str) -> tuple[str, ...]:
    """The option names ``make_condition_builder(task, ...)`` accepts (without prefixes / aliases)."""
    return tuple(inspect.signature(_builder_class(task).__init__).parameters)[1:]


def is_deterministic(task: str) -> bool:
    """Whether the ``task`` builder ignores its rng (its conditions may be cached)."""
    return _builder_class(task).is_deterministic


def make_condition_builder(task: str, **options) -> ConditionBuilder:
    """The condition builder for ``task`` (one of :data:`TASKS`) with ``options`` (see each builder class).

    Option names may carry the task prefix the dataset TOML uses (``sr_scale=4`` == ``scale=4``, ``canny_low=50`` ==
    ``low_threshold=50``); ranges are ``(min, max)`` pairs (lists from TOML work). Unknown options are an error that
    lists the valid ones.
    """
    cls = _builder_class(task)
    valid = option_names(task)
    normalized: dict = {}
    for key, value in options.items():
        name = key[len(task) + 1:] if key.startswith(f"{task}_") else key
        name = cls.aliases.get(name, name)
        if name not in valid:
            raise ValueError(f"unknown option {key!r} for condition {task!r}; valid: "
                             f"{', '.join(valid) if valid else '(none)'}")
        if name in normalized:
            raise ValueError(f"condition {task!r}: option {name!r} given twice (as {key!r} and another spelling)")
        normalized[name] = tuple(value) if isinstance(value, list) else value
    return cls(**normalized)
