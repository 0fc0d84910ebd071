"""``CoDiModelPatch``: a cloned MODEL whose ``model_sampling`` applies CoDi's boundary scalings, plus an optional kohya
UNet LoRA.

The patch subclasses the model's own model-sampling class (``ModelSamplingDiscrete`` + ``EPS`` or ``V_PREDICTION``,
whatever ComfyUI built for the checkpoint) so sigmas, ``timestep(sigma)``, ``calculate_input`` and noise scaling stay
ComfyUI's; only ``calculate_denoised`` changes::

    x0_hat = <the model's own calculate_denoised>          (eps: x - sigma out;  v: alpha^2 x - sigma alpha out)
    denoised = c_skip(t) * x / sqrt(1 + sigma^2) + c_out(t) * x0_hat      (ccd_sampler.comfy_space.boundary_denoised)

``x / sqrt(1 + sigma^2)`` is CoDi's ``z_t`` and ``t = self.timestep(sigma)`` is the integer timestep the UNet (and the
ControlNet) receive for that sigma: ComfyUI's nearest training timestep in log-sigma. On the CoDi grid that is the grid
timestep exactly (``timestep(sigma(980)) == 980``, tested), so the scaling equals ``ccd_sampler``'s; for sigmas off the
training grid (another scheduler) ``t`` is rounded the same way the UNet's own timestep is. The patch is registered
like the stock ModelSamplingDiscrete node does it: ``model.clone()`` + ``add_object_patch("model_sampling", ...)``.
"""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..ccd_sampler.boundary import DEFAULT_SIGMA_DATA, DEFAULT_TIMESTEP_SCALING
from ..ccd_sampler.comfy_space import boundary_denoised
from .codi_info import CoDiInfo, check_architecture
from .types import CoDiInfoType

logger = logging.getLogger("codi")

NO_LORA = "None"
BOUNDARY_CHOICES = ("auto", "on", "off")


class CoDiBoundaryMixin:
    """Mixed in front of a ComfyUI ``ModelSamplingDiscrete`` + ``EPS``/``V_PREDICTION`` class."""

    codi_boundary = True
    codi_sigma_data = DEFAULT_SIGMA_DATA
    codi_timestep_scaling = DEFAULT_TIMESTEP_SCALING

    def calculate_denoised(self, sigma, model_output, model_input):
        x0 = super().calculate_denoised(sigma, model_output, model_input)
        if not self.codi_boundary:
            return x0
        t = self.timestep(sigma.reshape(-1).float())
        return boundary_denoised(model_input, x0, sigma.reshape(-1), t, True, self.codi_sigma_data,
                                 self.codi_timestep_scaling)


def _unpatched_class(cls):
    """The model-sampling class under our mixin (the model's own class when it is not CoDi-patched)."""
    while issubclass(cls, CoDiBoundaryMixin):
        cls = next(b for b in cls.__mro__[1:] if not issubclass(b, CoDiBoundaryMixin))
    return cls


def prediction_type_of(model_sampling) -> str:
    """``epsilon`` or ``v_prediction`` for a discrete-time SD model's sampling object; ``ValueError`` otherwise."""
    import comfy.model_sampling as ms

    base = _unpatched_class(type(model_sampling))
    if not issubclass(base, ms.ModelSamplingDiscrete):
        raise ValueError(f"CoDi needs a discrete-time SD model (ModelSamplingDiscrete); this model samples with "
                         f"{base.__name__}")
    if base.calculate_denoised is ms.V_PREDICTION.calculate_denoised:
        return "v_prediction"
    if base.calculate_denoised is ms.EPS.calculate_denoised:
        return "epsilon"
    raise ValueError(f"CoDi supports epsilon and v-prediction models; this model's sampling ({base.__name__}) "
                     "computes its denoised output another way (an LCM / x0 / EDM patch?)")


def codi_model_sampling(current, model_config, *, boundary: bool, sigma_data: float, timestep_scaling: float,
                        zero_terminal_snr: bool = False):
    """A new model-sampling object: ``current``'s class with the CoDi boundary mixed in and ``current``'s sigmas --
    or, for an adapter trained on the zero-terminal-SNR schedule while the model samples with SD's, that schedule as
    ComfyUI's own ``zsnr`` option builds it (the stock ModelSamplingDiscrete node's ``zsnr``)."""
    prediction_type_of(current)  # refuses EDM / flow / continuous models
    base = _unpatched_class(type(current))  # patching a patched model: mix into the original class
    cls = type(f"CoDi{base.__name__}", (CoDiBoundaryMixin, base), {})
    if zero_terminal_snr and not getattr(current, "zsnr", False):
        patched = cls(model_config, zsnr=True)
    else:
        patched = cls(model_config)
        patched.set_sigmas(current.sigmas.detach().clone())  # keeps zsnr or another patch's schedule
    patched.sigma_data = current.sigma_data
    patched.codi_boundary = bool(boundary)
    patched.codi_sigma_data = float(sigma_data)
    patched.codi_timestep_scaling = float(timestep_scaling)
    return patched


def resolve_boundary(choice: str, info: CoDiInfo | None) -> bool:
    if choice not in BOUNDARY_CHOICES:
        raise ValueError(f"boundary must be one of {BOUNDARY_CHOICES}, got {choice!r}")
    if choice == "auto":
        return info.metadata.boundary if info is not None else True
    return choice == "on"


def load_unet_lora(model, lora_name: str, strength: float):
    """``model`` with a kohya UNet LoRA from the ``loras`` folder added as weight patches (ComfyUI's own loader and key
    map). Raises ``ValueError`` when none of the file's modules maps onto this model's UNet (the count is given)."""
    import comfy.lora
    import comfy.lora_convert
    import comfy.utils
    import folder_paths

    path = folder_paths.get_full_path("loras", lora_name)
    if path is None:
        raise ValueError(f"CoDi: LoRA {lora_name!r} not found in the loras folder")
    try:
        lora = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as e:
        raise ValueError(f"CoDi: LoRA {lora_name!r} cannot be read ({type(e).__name__}: {e})") from None
    modules = {k.split(".lora_")[0].split(".alpha")[0] for k in lora
               if ".lora_" in k or k.endswith(".alpha")}
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map, log_missing=False)
    if not patches:
        raise ValueError(
            f"CoDi: LoRA {lora_name!r} has 0 of its {len(modules) or len(lora)} modules matching this model's UNet "
            f"({len(lora)} tensors; expected kohya names like lora_unet_<block>.lora_down.weight for a "
            f"{type(model.model.model_config).__name__} model)")
    if len(patches) < len(modules):
        logger.warning("CoDi: LoRA %s: %d of %d modules map onto the UNet; the others are ignored", lora_name,
                       len(patches), len(modules))
    patched = model.clone()
    patched.add_patches(patches, strength)
    logger.info("CoDi: UNet LoRA %s applied to %d layers (strength %s)", lora_name, len(patches), strength)
    return patched


def patch_model(model, info: CoDiInfo | None = None, boundary: str = "auto", lora_name: str = NO_LORA,
                lora_strength: float = 1.0, node: str = "CoDiModelPatch"):
    """The CoDi-patched clone of ``model`` (never mutates ``model``)."""
    check_architecture(info, model, node)
    if lora_name and lora_name != NO_LORA and lora_strength != 0:
        model = load_unet_lora(model, lora_name, lora_strength)
    patched = model.clone()
    current = patched.get_model_object("model_sampling")
    prediction = prediction_type_of(current)
    if info is not None and info.has_codi_metadata and info.metadata.prediction_type != prediction:
        logger.warning("CoDi %s: adapter %s was trained for %s but the model predicts %s; using the model's own "
                       "prediction type", node, info.name, info.metadata.prediction_type, prediction)
    sigma_data = info.metadata.sigma_data if info is not None else DEFAULT_SIGMA_DATA
    scaling = info.metadata.timestep_scaling if info is not None else DEFAULT_TIMESTEP_SCALING
    zsnr = info is not None and info.metadata.zero_terminal_snr
    if zsnr and not getattr(current, "zsnr", False):
        logger.info("CoDi %s: adapter %s was trained on the zero-terminal-SNR schedule: the model samples with it "
                    "too (ComfyUI's zsnr rescaling)", node, info.name)
    sampling = codi_model_sampling(current, patched.model.model_config, boundary=resolve_boundary(boundary, info),
                                   sigma_data=sigma_data, timestep_scaling=scaling, zero_terminal_snr=zsnr)
    patched.add_object_patch("model_sampling", sampling)
    return patched


def lora_options() -> list[str]:
    import folder_paths

    return [NO_LORA] + folder_paths.get_filename_list("loras")


class CoDiModelPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CoDiModelPatch",
            display_name="CoDi Model Patch",
            category="sampling/codi",
            description="Clone the MODEL and give it CoDi's consistency boundary scalings (c_skip/c_out, from the "
                        "adapter's metadata) in its model sampling; optionally add the adapter's kohya UNet LoRA.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("boundary", options=list(BOUNDARY_CHOICES), default="auto",
                               tooltip="auto: the adapter's codi.boundary (on without CODI_INFO)."),
                io.Combo.Input("lora_name", options=lora_options(), default=NO_LORA,
                               tooltip="Optional UNet LoRA trained with the adapter (kohya format, loras folder)."),
                io.Float.Input("lora_strength", default=1.0, min=-10.0, max=10.0, step=0.01),
                CoDiInfoType.Input("codi_info", optional=True,
                                   tooltip="Sampler facts from CoDi Adapter Loader (sigma_data, timestep scaling, "
                                           "boundary); also checks the adapter's architecture against the model."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, boundary, lora_name, lora_strength, codi_info=None) -> io.NodeOutput:
        return io.NodeOutput(patch_model(model, codi_info, boundary, lora_name, lora_strength))


__all__ = ["CoDiModelPatch", "codi_model_sampling", "patch_model", "prediction_type_of"]
