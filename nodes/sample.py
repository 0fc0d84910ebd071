"""``CoDiSample``: the one-box CoDi node (model, conditioning, adapter, condition image -> LATENT).

It is exactly the stock-node graph ControlNetApplyAdvanced(strength, 0..1) -> CoDiModelPatch -> CoDiScheduler ->
CoDiSampler -> SamplerCustom (tested to give the same latent), with the defaults taken from the adapter's metadata:

* ``steps = 0`` -> ``codi.recommended_steps``; ``cfg = 0`` -> ``codi.recommended_cfg`` (cfg exactly 1 runs no uncond
  pass); ``mode = auto`` -> ``codi.sampler_mode``; grid N, boundary on/off, sigma_data and timestep scaling from the
  metadata (defaults for files without ``codi.*`` keys).
* ``latent`` optional: without it an empty latent of ``width`` x ``height`` (0 = the condition image's size, rounded
  down to a multiple of 8) and the image's batch size; with it, ``denoise < 1`` runs img2img on the schedule's tail.
* The start noise is ComfyUI's for ``seed`` (``comfy.sample.prepare_noise``); consistency mode draws its fresh noise
  from ``seed + 1``.
* Condition image: ``[B, H, W, C]`` in 0..1 like any ControlNet hint. ComfyUI scales it to the latent's pixel size; if
  the aspect ratio differs it crops the centre (ComfyUI's ControlNet behaviour) -- the node logs a warning then.
"""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from .codi_info import check_architecture, info_of
from .model_patch import patch_model
from .preprocessors import as_rgb_image
from .sampler import codi_sampler
from .scheduler import MAX_STEPS, check_steps, codi_sigmas
from .types import CoDiInfoType

logger = logging.getLogger("codi")

MODE_CHOICES = ("auto", "ode", "consistency")


def apply_control(positive, negative, control_net, image, strength: float, start: float = 0.0, end: float = 1.0):
    """Attach ``control_net`` (a copy with the hint set) to copies of both conditionings, as the stock
    ControlNetApplyAdvanced node does (inputs are never mutated)."""
    if strength == 0:
        return positive, negative
    hint = image.movedim(-1, 1)
    nets = {}
    out = []
    for conditioning in (positive, negative):
        items = []
        for emb, opts in conditioning:
            opts = opts.copy()
            previous = opts.get("control", None)
            if previous in nets:
                net = nets[previous]
            else:
                net = control_net.copy().set_cond_hint(hint, strength, (start, end), vae=None)
                net.set_previous_controlnet(previous)
                nets[previous] = net
            opts["control"] = net
            opts["control_apply_to_uncond"] = False
            items.append([emb, opts])
        out.append(items)
    return out[0], out[1]


def empty_latent(image, width: int, height: int):
    import comfy.model_management

    width = (width or image.shape[2]) // 8 * 8
    height = (height or image.shape[1]) // 8 * 8
    if width < 8 or height < 8:
        raise ValueError(f"CoDiSample: the output size {width}x{height} is too small (at least 8x8 pixels)")
    samples = torch.zeros([image.shape[0], 4, height // 8, width // 8],
                          device=comfy.model_management.intermediate_device())
    return {"samples": samples}


def warn_on_aspect(image, latent_samples) -> None:
    h, w = image.shape[1], image.shape[2]
    lh, lw = latent_samples.shape[-2] * 8, latent_samples.shape[-1] * 8
    if abs(h / w - lh / lw) > 0.01:
        logger.warning("CoDiSample: the condition image (%dx%d) has another aspect ratio than the output (%dx%d); "
                       "ComfyUI scales it and crops its centre", w, h, lw, lh)


def codi_sample(model, positive, negative, control_net, image, seed: int, steps: int = 0, cfg: float = 0.0,
                strength: float = 1.0, mode: str = "auto", denoise: float = 1.0, latent=None, width: int = 0,
                height: int = 0, codi_info=None):
    import comfy.sample
    import comfy.utils
    import latent_preview

    info = info_of(control_net, codi_info)
    check_architecture(info, model, "CoDiSample")
    image = as_rgb_image(image, "CoDiSample")
    meta = info.metadata if info is not None else None
    steps = check_steps(int(steps) if steps else (meta.recommended_steps if meta else 4), "CoDiSample")
    cfg = float(cfg) if cfg > 0 else (meta.recommended_cfg if meta else 1.0)
    if mode not in MODE_CHOICES:
        raise ValueError(f"CoDiSample: mode must be one of {MODE_CHOICES}, got {mode!r}")
    mode = (meta.sampler_mode if meta else "ode") if mode == "auto" else mode

    patched = patch_model(model, info, "auto", node="CoDiSample")
    sigmas = codi_sigmas(patched, steps, 0, "zero", denoise, info, node="CoDiSample")
    sampler = codi_sampler(mode, int(seed) + 1, "codi")
    if latent is None and denoise < 1.0:
        raise ValueError(f"CoDiSample: denoise {denoise} < 1 is img2img and needs an input latent (connect a VAE "
                         "Encode output to 'latent')")
    latent = latent if latent is not None else empty_latent(image, width, height)
    latent_image = comfy.sample.fix_empty_latent_channels(patched, latent["samples"])
    warn_on_aspect(image, latent_image)
    positive, negative = apply_control(positive, negative, control_net, image, strength)

    noise = comfy.sample.prepare_noise(latent_image, int(seed), latent.get("batch_index"))
    x0_output = {}
    callback = latent_preview.prepare_callback(patched, sigmas.shape[-1] - 1, x0_output)
    samples = comfy.sample.sample_custom(patched, noise, cfg, sampler, sigmas, positive, negative, latent_image,
                                         noise_mask=latent.get("noise_mask"), callback=callback,
                                         disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=int(seed))
    out = latent.copy()
    out["samples"] = samples
    logger.info("CoDiSample: %d steps (%s), cfg %s, sigmas %s", steps, mode, cfg,
                [round(float(s), 4) for s in sigmas])
    return out


class CoDiSample(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CoDiSample",
            display_name="CoDi Sample",
            category="sampling/codi",
            description="One box: apply the CoDi adapter to both conditionings, patch the model's boundary, and "
                        "sample in 1-8 steps with the adapter's own schedule. 0 / auto take the adapter's "
                        "recommended values.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.ControlNet.Input("control_net", tooltip="From CoDi Adapter Loader (or any ControlNet loader)."),
                io.Image.Input("image", tooltip="The condition (hint) image, values 0..1."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                io.Int.Input("steps", default=0, min=0, max=MAX_STEPS,
                             tooltip="1-8; 0 = the adapter's recommended steps."),
                io.Float.Input("cfg", default=0.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="0 = the adapter's recommended cfg; exactly 1 skips the negative pass."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Adapter (ControlNet) strength."),
                io.Combo.Input("mode", options=list(MODE_CHOICES), default="auto",
                               tooltip="auto = the adapter's codi.sampler_mode."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="With an input latent: img2img on the last round(denoise*steps) steps."),
                io.Int.Input("width", default=0, min=0, max=16384, step=8,
                             tooltip="Output width without an input latent; 0 = the condition image's."),
                io.Int.Input("height", default=0, min=0, max=16384, step=8,
                             tooltip="Output height without an input latent; 0 = the condition image's."),
                io.Latent.Input("latent", optional=True),
                CoDiInfoType.Input("codi_info", optional=True,
                                   tooltip="From CoDi Adapter Loader; without it the facts attached to the "
                                           "CONTROL_NET by the loader are used (defaults for stock files)."),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, model, positive, negative, control_net, image, seed, steps, cfg, strength, mode, denoise,
                width, height, latent=None, codi_info=None) -> io.NodeOutput:
        return io.NodeOutput(codi_sample(model, positive, negative, control_net, image, seed, steps, cfg, strength,
                                         mode, denoise, latent, width, height, codi_info))
