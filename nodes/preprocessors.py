"""Condition preprocessors (image/codi): the hint an adapter was trained on, built by ``ccd_sampler.hints``.

The trainer's condition builders (``trainer/conditions.py``) call the very same functions, so for the same input
image (and mask) a node's hint equals the training hint exactly (tested: max abs difference 0).

* ``CoDiSuperResolutionInput``: image (the low-res photo), scale (auto/2/4/8), [codi_info] -> hint (bicubic upscale,
  ``sr_hint``), latent (an empty latent at the target size, for CoDiSample's ``latent`` input). ``auto`` takes the
  adapter's ``codi.hint_preprocessing.scale`` (4 when no adapter info is connected or it names none). The target size
  ``scale * input`` must be a multiple of 8 (the latent is 1/8 of it): otherwise a node error with the sizes.
* ``CoDiInpaintInput``: image, mask -> hint (``inpaint_hint``: masked pixels, ``mask > 0.5``, set to -1.0), mask
  (broadcast to ``[B, H, W]``, for compositing the result over the original), latent (empty, at the image size; the
  size must be a multiple of 8). The MASK may be ``[H, W]``, ``[1, H, W]`` or ``[B, H, W]`` (1 = inpaint; LoadImage's
  MASK is 1 where the PNG is transparent); a mask of another size than the image is a node error.
* ``CoDiCanny``: image, low_threshold, high_threshold (0-255, OpenCV units; defaults 100/200), thresholds
  (adapter/manual), [codi_info] -> edges (``canny_hint``: 3 equal channels in {0, 1}). ``adapter`` uses the thresholds
  the adapter was trained with (``codi.hint_preprocessing``) when a CODI_INFO that names them is connected, else the
  widgets.

ComfyUI IMAGEs are ``[B, H, W, C]`` floats in 0..1; ``ccd_sampler.hints`` works on ``[B, 3, H, W]``: the nodes move the
channels (``movedim``) and never modify their inputs.
"""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..ccd_sampler.hints import SR_SCALES, canny_hint, check_canny_thresholds, inpaint_hint, sr_hint
from .types import CoDiInfoType

logger = logging.getLogger("codi")

DEFAULT_SR_SCALE = 4
SCALE_CHOICES = ("auto",) + tuple(str(s) for s in SR_SCALES)
THRESHOLD_SOURCES = ("adapter", "manual")
LATENT_FACTOR = 8


def as_rgb_image(image, node: str, name: str = "image") -> torch.Tensor:
    """A ComfyUI IMAGE as ``[B, H, W, 3]``: an RGBA image loses its alpha channel (ComfyUI keeps transparency in a
    separate MASK; the adapters were trained on RGB), a one-channel grey image is repeated to three channels, and
    anything else is refused with the node's own message."""
    if isinstance(image, torch.Tensor) and image.ndim == 4:
        channels = image.shape[-1]
        if channels == 3:
            return image
        if channels == 4:
            return image[..., :3]
        if channels == 1:
            return image.expand(*image.shape[:-1], 3)
    shape = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
    raise ValueError(f"{node}: {name} must be a ComfyUI IMAGE [batch, height, width, channels] with 3 (RGB), 4 (RGBA) "
                     f"or 1 (grey) channels, got {shape}")


def image_to_bchw(image, node: str, name: str = "image") -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, C]`` -> ``[B, 3, H, W]`` (a view; the hint functions do not write to it), through
    :func:`as_rgb_image`."""
    return as_rgb_image(image, node, name).movedim(-1, 1)


def bchw_to_image(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.movedim(1, -1).contiguous()


def empty_latent(batch: int, height: int, width: int, node: str, what: str) -> dict:
    """``{"samples": zeros [B, 4, H/8, W/8]}`` (as EmptyLatentImage); ``ValueError`` unless H, W are multiples of 8."""
    import comfy.model_management

    if height % LATENT_FACTOR or width % LATENT_FACTOR:
        raise ValueError(
            f"{node}: {what} is {width}x{height} (width x height), which is not a multiple of {LATENT_FACTOR} on both "
            f"sides; the latent is 1/{LATENT_FACTOR} of the image size. Crop or pad the input first "
            f"(e.g. to {width // LATENT_FACTOR * LATENT_FACTOR}x{height // LATENT_FACTOR * LATENT_FACTOR}).")
    samples = torch.zeros([batch, 4, height // LATENT_FACTOR, width // LATENT_FACTOR],
                          device=comfy.model_management.intermediate_device())
    return {"samples": samples}


def _preprocessing(codi_info) -> dict:
    meta = getattr(codi_info, "metadata", None)
    return dict(getattr(meta, "hint_preprocessing", None) or {}) if meta is not None else {}


# ----------------------------------------------------------------------------------------------- super-resolution


def resolve_sr_scale(scale: str, codi_info=None) -> int:
    node = "CoDiSuperResolutionInput"
    if scale != "auto":
        if scale not in SCALE_CHOICES:
            raise ValueError(f"{node}: scale must be one of {', '.join(SCALE_CHOICES)}, got {scale!r}")
        return int(scale)
    prep = _preprocessing(codi_info)
    if codi_info is None or "scale" not in prep:
        if codi_info is not None:
            logger.warning("%s: adapter %s names no super-resolution scale (task %s); using %d", node,
                           getattr(codi_info, "name", "?"), getattr(codi_info.metadata, "task", "?"), DEFAULT_SR_SCALE)
        return DEFAULT_SR_SCALE
    value = prep["scale"]
    if isinstance(value, bool) or value not in SR_SCALES:
        raise ValueError(f"{node}: adapter {getattr(codi_info, 'name', '?')!r} has codi.hint_preprocessing scale "
                         f"{value!r}; supported: {', '.join(map(str, SR_SCALES))} (pick the scale by hand)")
    return int(value)


def super_resolution_input(image, scale: str = "auto", codi_info=None):
    """``(hint IMAGE, empty LATENT)`` for the low-res ``image``."""
    node = "CoDiSuperResolutionInput"
    low = image_to_bchw(image, node)
    factor = resolve_sr_scale(scale, codi_info)
    b, _, h, w = low.shape
    latent = empty_latent(b, h * factor, w * factor, node,
                          f"the target size ({w}x{h} input x{factor})")
    hint = bchw_to_image(sr_hint(low, factor))
    logger.info("%s: %dx%d -> %dx%d (x%d)", node, w, h, w * factor, h * factor, factor)
    return hint, latent


class CoDiSuperResolutionInput(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CoDiSuperResolutionInput",
            display_name="CoDi Super-Resolution Input",
            category="image/codi",
            description="Upscale a low-res image (bicubic, exactly as the CoDi trainer builds its sr hints) into the "
                        "adapter's hint, and make an empty latent of the target size for CoDi Sample.",
            inputs=[
                io.Image.Input("image", tooltip="The low-resolution image."),
                io.Combo.Input("scale", options=list(SCALE_CHOICES), default="auto",
                               tooltip="auto = the adapter's trained scale (codi.hint_preprocessing), 4 without one."),
                CoDiInfoType.Input("codi_info", optional=True, tooltip="From CoDi Adapter Loader (for scale = auto)."),
            ],
            outputs=[io.Image.Output(display_name="hint"), io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, image, scale, codi_info=None) -> io.NodeOutput:
        return io.NodeOutput(*super_resolution_input(image, scale, codi_info))


# ------------------------------------------------------------------------------------------------------- inpaint


def mask_to_b1hw(mask, image_bchw: torch.Tensor, node: str) -> torch.Tensor:
    """ComfyUI MASK ``[H, W]`` / ``[B, H, W]`` (or ``[B, 1, H, W]``) -> ``[B', 1, H, W]`` with B' in (1, B)."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{node}: mask must be a ComfyUI MASK tensor [B, H, W], got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    elif mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 3:
        raise ValueError(f"{node}: mask must be a ComfyUI MASK [B, H, W] or [H, W], got shape {list(mask.shape)}")
    b, _, h, w = image_bchw.shape
    if tuple(mask.shape[-2:]) != (h, w):
        raise ValueError(f"{node}: the mask is {mask.shape[-1]}x{mask.shape[-2]} (width x height) but the image is "
                         f"{w}x{h}; they must be the same size (draw the mask on this image, or resize the mask)")
    if mask.shape[0] not in (1, b):
        raise ValueError(f"{node}: the mask batch ({mask.shape[0]}) must be 1 or the image batch ({b})")
    return mask.to(device=image_bchw.device, dtype=image_bchw.dtype).unsqueeze(1)


def inpaint_input(image, mask):
    """``(hint IMAGE, mask [B, H, W], empty LATENT)`` for ``image`` with the region ``mask > 0.5`` to inpaint."""
    node = "CoDiInpaintInput"
    pixels = image_to_bchw(image, node)
    mask4 = mask_to_b1hw(mask, pixels, node)
    b, _, h, w = pixels.shape
    latent = empty_latent(b, h, w, node, "the image")
    hint = bchw_to_image(inpaint_hint(pixels, mask4))
    mask_out = mask4[:, 0].expand(b, h, w).clone()
    return hint, mask_out, latent


class CoDiInpaintInput(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CoDiInpaintInput",
            display_name="CoDi Inpaint Input",
            category="image/codi",
            description="The inpainting hint: the image with the masked pixels (mask > 0.5) set to -1, exactly as "
                        "the CoDi trainer builds it; plus the mask (for compositing the result over the original) "
                        "and an empty latent of the image size for CoDi Sample.",
            inputs=[
                io.Image.Input("image"),
                io.Mask.Input("mask", tooltip="1 = inpaint this pixel (LoadImage: the transparent area). Same size "
                                              "as the image; [H, W] or batch 1 is used for every image."),
            ],
            outputs=[io.Image.Output(display_name="hint"), io.Mask.Output(display_name="mask"),
                     io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, image, mask) -> io.NodeOutput:
        return io.NodeOutput(*inpaint_input(image, mask))


# --------------------------------------------------------------------------------------------------------- canny


def resolve_canny_thresholds(low_threshold, high_threshold, thresholds: str = "adapter", codi_info=None):
    node = "CoDiCanny"
    if thresholds not in THRESHOLD_SOURCES:
        raise ValueError(f"{node}: thresholds must be one of {THRESHOLD_SOURCES}, got {thresholds!r}")
    if thresholds == "adapter" and codi_info is not None:
        prep = _preprocessing(codi_info)
        if "low_threshold" in prep and "high_threshold" in prep:
            low_threshold, high_threshold = prep["low_threshold"], prep["high_threshold"]
        else:
            logger.warning("%s: adapter %s names no canny thresholds; using the widgets (%s, %s)", node,
                           getattr(codi_info, "name", "?"), low_threshold, high_threshold)
    try:
        check_canny_thresholds(low_threshold, high_threshold)
    except ValueError as e:
        raise ValueError(f"{node}: {e}") from None
    return low_threshold, high_threshold


def canny_edges(image, low_threshold=100, high_threshold=200, thresholds: str = "adapter", codi_info=None):
    node = "CoDiCanny"
    low, high = resolve_canny_thresholds(low_threshold, high_threshold, thresholds, codi_info)
    return bchw_to_image(canny_hint(image_to_bchw(image, node), low, high))


class CoDiCanny(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CoDiCanny",
            display_name="CoDi Canny",
            category="image/codi",
            description="Canny edges exactly as the CoDi trainer builds its canny hints (OpenCV's 8-bit pipeline: "
                        "grey, 5x5 Gaussian blur, Sobel, L1 magnitude, hysteresis). Thresholds in 0..255.",
            inputs=[
                io.Image.Input("image"),
                io.Int.Input("low_threshold", default=100, min=0, max=255, step=1),
                io.Int.Input("high_threshold", default=200, min=0, max=255, step=1),
                io.Combo.Input("thresholds", options=list(THRESHOLD_SOURCES), default="adapter",
                               tooltip="adapter = the thresholds the connected adapter was trained with "
                                       "(codi.hint_preprocessing), else the widgets; manual = the widgets."),
                CoDiInfoType.Input("codi_info", optional=True, tooltip="From CoDi Adapter Loader."),
            ],
            outputs=[io.Image.Output(display_name="edges")],
        )

    @classmethod
    def execute(cls, image, low_threshold, high_threshold, thresholds, codi_info=None) -> io.NodeOutput:
        return io.NodeOutput(canny_edges(image, low_threshold, high_threshold, thresholds, codi_info))
