"""The training hints as ControlNet preprocessors of Forge and of Mikubill's sd-webui-controlnet (A1111).

``codi_sr`` (the low-res image, bicubic-upsampled by the scale that takes it to the output size), ``codi_inpaint``
(the image with masked pixels set to -1) and ``codi_canny`` (the trainer's Canny) compute their hint with
``ccd_sampler.hints`` from the same ``uint8 / 255`` pixels the trainer uses, and hand the ControlNet a float tensor
``[1, 3, H, W]``: both UIs use a tensor as the hint unchanged, where an image would be quantised to 8 bits (the -1 of
an inpaint hint would not survive) and resized with their own filters.

The output size comes from the CoDi panel (:data:`codi_webui.plan.CURRENT`, set before any preprocessor runs): a
preprocessor is not told the generation's size. A hint that cannot be built (an SR input whose size does not divide
the output by 2, 4 or 8, a missing mask) is recorded there and raised by the CoDi sampler, because both ControlNets
log a preprocessor's exception and go on without the unit.

The hints follow the adapter they feed, as the ComfyUI nodes do: the generation's CoDi adapters (read by the panel
before any preprocessor runs) carry ``codi.hint_preprocessing``; ``codi_canny`` takes the thresholds the adapter was
trained with while its threshold sliders stay at their defaults (100 / 200; neither UI hands a preprocessor a third
setting or, in Forge, the unit's model), the sliders once the user moves them; ``codi_sr`` refuses an output size
whose scale is not the one the adapter was trained for.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ccd_sampler.hints import SR_SCALES, canny_hint, check_canny_thresholds, inpaint_hint, sr_hint

from .plan import CURRENT

logger = logging.getLogger("codi")

NAMES = ("codi_sr", "codi_inpaint", "codi_canny")
CANNY_DEFAULTS = (100, 200)


def trained_preprocessing(kind: str) -> tuple[str, dict] | None:
    """``(adapter name, codi.hint_preprocessing)`` of the generation's first CoDi adapter trained on ``kind`` hints
    (``sr``, ``canny``, ...), or None."""
    for info in CURRENT.adapters:
        prep = getattr(info.metadata, "hint_preprocessing", None) or {}
        if info.has_codi_metadata and prep.get("type") == kind:
            return info.name, dict(prep)
    return None


# ------------------------------------------------------------------------------------------------ the hints

def image_to_bchw(image) -> torch.Tensor:
    """An ``HxWxC`` uint8 image (C = 3, 4: alpha dropped, 1 or 2-D: grey repeated) -> float32 ``[1, 3, H, W]`` in
    [0, 1], computed as ``uint8 / 255`` like the trainer."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an HxWx3 image, got shape {list(array.shape)}")
    array = np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[:, :, :3]
    if array.dtype != np.uint8:
        raise ValueError(f"expected 8-bit pixels, got {array.dtype}")
    return torch.from_numpy(np.array(array, dtype=np.uint8)).float().div_(255.0).permute(2, 0, 1).unsqueeze(0)


def mask_to_b1hw(mask, size: tuple[int, int]) -> torch.Tensor:
    """An ``HxW[xC]`` mask (white / 255 = inpaint; the first channel, or alpha of RGBA) -> ``[1, 1, H, W]`` {0, 1}."""
    array = np.asarray(mask)
    if array.ndim == 3:
        array = array[:, :, 3] if array.shape[2] == 4 else array[:, :, 0]
    if array.shape != tuple(size):
        raise ValueError(f"the mask is {array.shape[1]}x{array.shape[0]} but the image {size[1]}x{size[0]} "
                         "(width x height)")
    return torch.from_numpy(np.ascontiguousarray(array > 127)).float()[None, None]


def sr_input_hint(image, target_size: tuple[int, int] | None, trained: tuple[str, dict] | None = None
                  ) -> torch.Tensor:
    """The SR hint for a low-res ``image``: upsampled by the scale (2, 4 or 8) that gives ``target_size`` (H, W),
    which must be the scale of the ``trained`` adapter (its name and ``codi.hint_preprocessing``) when given."""
    low = image_to_bchw(image)
    h, w = low.shape[-2:]
    if target_size is None:
        raise ValueError("codi_sr: the output size is unknown (is the CoDi extension's panel script loaded?)")
    height, width = target_size
    scale = height // h
    if scale not in SR_SCALES or (h * scale, w * scale) != (height, width):
        options = ", ".join(f"x{s}: {w * s}x{h * s}" for s in SR_SCALES)
        raise ValueError(f"codi_sr: the low-res image is {w}x{h} but the output is {width}x{height} (width x height); "
                         f"set the output size to the image times 2, 4 or 8 ({options})")
    if trained is not None and trained[1].get("scale") not in (None, scale):
        name, want = trained[0], trained[1]["scale"]
        raise ValueError(f"codi_sr: adapter {name} was trained for x{want} super-resolution, but the low-res image "
                         f"is {w}x{h} and the output {width}x{height} (x{scale}); set the output size to "
                         f"{w * want}x{h * want}")
    return sr_hint(low, scale)


def check_output_size(pixels: torch.Tensor, target_size: tuple[int, int] | None, name: str) -> None:
    """Inpaint and Canny hints are built at the output size, as in training (a resized hint is another hint)."""
    h, w = pixels.shape[-2:]
    if target_size is not None and (h, w) != tuple(target_size):
        raise ValueError(f"{name}: the image is {w}x{h} but the output is {target_size[1]}x{target_size[0]} (width x "
                         "height); set the output size to the image's, or resize the image first")


def inpaint_input_hint(image, mask, target_size: tuple[int, int] | None = None) -> torch.Tensor:
    """The inpaint hint: ``image`` with the pixels where ``mask`` is white set to -1."""
    pixels = image_to_bchw(image)
    check_output_size(pixels, target_size, "codi_inpaint")
    if mask is None:
        raise ValueError("codi_inpaint: no mask; draw one on the unit's image or send mask_image")
    return inpaint_hint(pixels, mask_to_b1hw(mask, tuple(pixels.shape[-2:])))


def canny_input_hint(image, low_threshold, high_threshold, target_size: tuple[int, int] | None = None
                     ) -> torch.Tensor:
    check_canny_thresholds(float(low_threshold), float(high_threshold))
    pixels = image_to_bchw(image)
    check_output_size(pixels, target_size, "codi_canny")
    return canny_hint(pixels, float(low_threshold), float(high_threshold))


def canny_thresholds(slider_1=None, slider_2=None) -> tuple[float, float]:
    """The thresholds ``codi_canny`` uses: the sliders once moved from their defaults (100 / 200; unset = the
    defaults), else the CoDi adapter's trained ones (``codi.hint_preprocessing``) when it names them."""
    sliders = tuple(d if v in (None, -1) else v for v, d in zip((slider_1, slider_2), CANNY_DEFAULTS))
    trained = trained_preprocessing("canny")
    if trained is None:
        return sliders
    name, prep = trained
    if sliders != CANNY_DEFAULTS:
        if (prep.get("low_threshold"), prep.get("high_threshold")) not in ((None, None), sliders):
            logger.warning("CoDi: codi_canny uses the sliders %s; adapter %s was trained with (%s, %s)", sliders,
                           name, prep.get("low_threshold"), prep.get("high_threshold"))
        return sliders
    if "low_threshold" not in prep or "high_threshold" not in prep:
        logger.warning("CoDi: adapter %s names no canny thresholds; using the sliders %s", name, sliders)
        return sliders
    low, high = prep["low_threshold"], prep["high_threshold"]
    if (low, high) != sliders:
        logger.info("CoDi: codi_canny uses the thresholds adapter %s was trained with (%s, %s), not the sliders' "
                    "defaults %s (move the sliders to choose others)", name, low, high, sliders)
    return low, high


def build_hint(name: str, image, mask=None, slider_1=None, slider_2=None) -> torch.Tensor | None:
    """The hint of preprocessor ``name``, or None after recording why it cannot be built (the sampler raises it)."""
    try:
        if name == "codi_sr":
            return sr_input_hint(image, CURRENT.target_size, trained_preprocessing("sr"))
        if name == "codi_inpaint":
            return inpaint_input_hint(image, mask, CURRENT.target_size)
        return canny_input_hint(image, *canny_thresholds(slider_1, slider_2), CURRENT.target_size)
    except ValueError as e:
        CURRENT.fail(str(e) if str(e).startswith(name) else f"{name}: {e}")
        return None


def display_image(hint: torch.Tensor) -> np.ndarray:
    """A hint as an 8-bit picture for the UI (the -1 of an inpaint hint shows black)."""
    return (hint[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)


# ------------------------------------------------------------------------------------------------ Forge

def register_forge() -> bool:
    """Add the three preprocessors to Forge's registry (by name: registering again replaces them)."""
    try:
        from modules_forge.shared import add_supported_preprocessor
        from modules_forge.supported_preprocessor import Preprocessor, PreprocessorParameter
    except ImportError:
        return False

    class CoDiPreprocessor(Preprocessor):
        def __init__(self, name: str, tags: list[str], filters: list[str]):
            super().__init__()
            self.name, self.tags, self.model_filename_filters = name, tags, filters
            self.slider_resolution = PreprocessorParameter(visible=False)
            self.sorting_priority = 50
            self.corp_image_with_a1111_mask_when_in_img2img_inpaint_tab = False
            if name == "codi_canny":
                self.slider_1 = PreprocessorParameter(minimum=0, maximum=255, step=1, value=100,
                                                      label="Low Threshold", visible=True)
                self.slider_2 = PreprocessorParameter(minimum=0, maximum=255, step=1, value=200,
                                                      label="High Threshold", visible=True)

        def __call__(self, input_image, resolution, slider_1=None, slider_2=None, slider_3=None, input_mask=None,
                     **kwargs):
            hint = build_hint(self.name, input_image, input_mask, slider_1, slider_2)
            return hint if hint is not None else torch.zeros(1, 3, 8, 8)

        def process_before_every_sampling(self, process, cond, mask, *args, **kwargs):
            return cond, None  # the mask is in the hint (-1); passed on, Forge would weight the control by it

    for name, tags, filters in (("codi_sr", ["CoDi", "Tile"], ["codi", "sr"]),
                                ("codi_inpaint", ["CoDi", "Inpaint"], ["codi", "inpaint"]),
                                ("codi_canny", ["CoDi", "Canny"], ["codi", "canny"])):
        add_supported_preprocessor(CoDiPreprocessor(name, tags, filters))
    return True


# ------------------------------------------------------------------------------------------------ Mikubill

def register_mikubill() -> bool:
    """Add the three preprocessors to sd-webui-controlnet's registry once it has loaded (it asserts on a second
    registration of a name, so an existing one is replaced in place)."""
    import sys

    module = sys.modules.get("scripts.supported_preprocessor")
    if module is None:
        return False
    Preprocessor, PreprocessorParameter = module.Preprocessor, module.PreprocessorParameter

    class CoDiPreprocessor(Preprocessor):
        def __init__(self, name: str, tags: list[str]):
            super().__init__(name=name, tags=tags)
            self.returns_image = False  # the value (a tensor) is the hint as it is
            self.slider_resolution = PreprocessorParameter(visible=False)
            self.sorting_priority = 50
            self.corp_image_with_a1111_mask_when_in_img2img_inpaint_tab = False
            if name == "codi_canny":
                self.slider_1 = PreprocessorParameter(minimum=0, maximum=255, step=1, value=100,
                                                      label="Low Threshold")
                self.slider_2 = PreprocessorParameter(minimum=0, maximum=255, step=1, value=200,
                                                      label="High Threshold")

        def cached_call(self, input_image, *args, **kwargs):
            # not cached: the SR hint depends on the output size, which is not an argument
            mask = None
            if self.name == "codi_inpaint" and np.asarray(input_image).ndim == 3 and input_image.shape[2] == 4:
                mask = input_image  # sd-webui-controlnet sends inpaint units RGBA, alpha = mask
            hint = build_hint(self.name, input_image, mask, kwargs.get("slider_1"), kwargs.get("slider_2"))
            if hint is None:
                hint = torch.zeros(1, 3, 8, 8)
            shown = display_image(hint)
            return Preprocessor.Result(value=hint.to(self.device), display_images=[shown])

        def __call__(self, input_image, resolution, slider_1=None, slider_2=None, slider_3=None, input_mask=None,
                     **kwargs):
            return self.cached_call(input_image, slider_1=slider_1, slider_2=slider_2).value

    for name in NAMES:
        processor = CoDiPreprocessor(name, ["CoDi"])
        Preprocessor.all_processors[processor.label] = processor
        Preprocessor.all_processors_by_name[processor.name] = processor
    return True
