"""The ``CODI_INFO`` value: an adapter's sampler facts, travelling beside its CONTROL_NET through a graph.

Decision: :class:`CoDiAdapterLoader` has two outputs, ``CONTROL_NET`` (ComfyUI's own object, usable by the stock Apply
ControlNet nodes) and ``CODI_INFO`` (this dataclass). The loader also sets ``control_net.codi_info`` on the object it
returns, so a node given only the CONTROL_NET (``CoDiSample`` with nothing connected to ``codi_info``) still finds the
facts; ``ControlBase.copy()`` (what the Apply nodes do) does not carry the attribute, which is why the explicit output
is the primary path. Files without ``codi.*`` metadata (any stock ControlNet / Control-LoRA) load with the defaults of
:class:`ccd_sampler.CoDiMetadata` and a log line.

Only ComfyUI-provided modules and our ``ccd_sampler`` are imported here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from ..ccd_sampler import CoDiMetadata, MetadataError, read_safetensors_header

logger = logging.getLogger("codi")

CODI_FOLDER = "codi"
"""``folder_paths`` key of the pack's own model folder (``models/codi``); the loader also lists ``controlnet``."""

# modelspec base architecture (the part before "/") -> family; ComfyUI model_config classes per family below.
ARCHITECTURE_FAMILIES = {
    "stable-diffusion-v1": "sd1",
    "stable-diffusion-v2-512": "sd2",
    "stable-diffusion-v2-768-v": "sd2",
    "stable-diffusion-v2": "sd2",
    "stable-diffusion-xl-v1-base": "sdxl",
}
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


@dataclass(frozen=True)
class CoDiInfo:
    """What the nodes know about one adapter file."""

    name: str                                  # the file name as listed in the loader
    metadata: CoDiMetadata = field(default_factory=CoDiMetadata)
    has_codi_metadata: bool = False            # False: defaults (a stock ControlNet / Control-LoRA file)
    architecture: str | None = None            # modelspec.architecture, e.g. stable-diffusion-v1/codi-controlnet
    modelspec_prediction_type: str | None = None

    @property
    def base_architecture(self) -> str | None:
        return self.architecture.split("/", 1)[0] if self.architecture else None

    @property
    def family(self) -> str | None:
        return ARCHITECTURE_FAMILIES.get(self.base_architecture) if self.base_architecture else None

    def describe(self) -> str:
        m = self.metadata
        source = "codi metadata" if self.has_codi_metadata else "no codi metadata: defaults"
        return (f"{self.name} ({self.architecture or 'unknown architecture'}; {source}): task={m.task}, "
                f"grid N={m.distill_grid}, steps={m.recommended_steps}, cfg={m.recommended_cfg}, "
                f"mode={m.sampler_mode}, boundary={m.boundary} (sigma_data={m.sigma_data}, tau={m.timestep_scaling}), "
                f"prediction={m.prediction_type}, objective={m.objective}")


def register_codi_folder() -> None:
    """Register ``models/codi`` with ``folder_paths`` (idempotent; keeps paths added by extra_model_paths.yaml)."""
    import folder_paths

    path = os.path.join(folder_paths.models_dir, CODI_FOLDER)
    if CODI_FOLDER in folder_paths.folder_names_and_paths:
        paths, _ = folder_paths.folder_names_and_paths[CODI_FOLDER]
        if path not in paths:
            paths.insert(0, path)
    else:
        paths = [path]
    folder_paths.folder_names_and_paths[CODI_FOLDER] = (paths, set(folder_paths.supported_pt_extensions))


def read_codi_info(path: str, name: str | None = None) -> CoDiInfo:
    """Sampler facts of the adapter file at ``path``. Raises ``ValueError`` naming the file when a safetensors file is
    truncated or not safetensors, or when its ``codi.*`` metadata is malformed."""
    name = name or os.path.basename(path)
    if not path.lower().endswith((".safetensors", ".sft")):
        logger.info("CoDi: %s is not a safetensors file; no metadata to read, using default sampler facts", name)
        return CoDiInfo(name=name)
    try:
        _, metadata = read_safetensors_header(path)
    except ValueError as e:
        raise ValueError(f"CoDi adapter {name!r} cannot be read: {e}") from None
    architecture = metadata.get("modelspec.architecture") or None
    prediction = metadata.get("modelspec.prediction_type") or None
    if not CoDiMetadata.has_metadata(metadata):
        logger.info("CoDi: %s has no codi.* metadata (not written by the CoDi trainer); using default sampler facts "
                    "(grid N=50, 4 steps, cfg 1, ode, boundary on)", name)
        return CoDiInfo(name=name, architecture=architecture, modelspec_prediction_type=prediction)
    try:
        codi = CoDiMetadata.from_metadata(metadata)
    except MetadataError as e:
        raise ValueError(f"CoDi adapter {name!r} has invalid codi.* metadata: {e}") from None
    return CoDiInfo(name=name, metadata=codi, has_codi_metadata=True, architecture=architecture,
                    modelspec_prediction_type=prediction)


def model_family(model) -> tuple[str | None, str]:
    """``(family, config class name)`` of a ComfyUI MODEL (a ModelPatcher): family ``sd1``/``sd2``/``sdxl`` or None."""
    import comfy.supported_models as sm

    config = getattr(getattr(model, "model", None), "model_config", None)
    cls_name = type(config).__name__ if config is not None else "unknown"
    if config is None:
        return None, cls_name
    if isinstance(config, sm.SD_X4Upscaler):  # an SD20 subclass with another UNet: no SD2 ControlNet fits it
        return None, cls_name
    for family, cls in (("sd1", sm.SD15), ("sd2", sm.SD20), ("sdxl", sm.SDXL)):
        if isinstance(config, cls):
            return family, cls_name
    return None, cls_name


def check_architecture(info: CoDiInfo | None, model, node: str) -> None:
    """Raise ``ValueError`` when the adapter was made for another model family than ``model`` (e.g. an SDXL adapter
    on an SD1.5 checkpoint). Unknown architectures (no modelspec, other model types) are logged and allowed."""
    if info is None:
        return
    family, cls_name = model_family(model)
    wanted = info.family
    if wanted is None:
        if info.architecture:
            logger.info("CoDi %s: adapter %s names architecture %r, which CoDi does not know; not checked against "
                        "the model (%s)", node, info.name, info.architecture, cls_name)
        return
    if family is None:
        logger.warning("CoDi %s: the model is a %s, not SD1.x/SD2.x/SDXL; adapter %s (%s) not checked against it",
                       node, cls_name, info.name, info.architecture)
        return
    if family != wanted:
        raise ValueError(
            f"CoDi {node}: adapter {info.name!r} was made for {FAMILY_NAMES[wanted]} (modelspec.architecture = "
            f"{info.architecture!r}) but the model is {FAMILY_NAMES[family]} (ComfyUI model config {cls_name}). "
            f"Load a {FAMILY_NAMES[family]} CoDi adapter, or a {FAMILY_NAMES[wanted]} checkpoint.")


def info_of(control_net=None, codi_info: CoDiInfo | None = None) -> CoDiInfo | None:
    """The explicit CODI_INFO input, else the facts attached to a CONTROL_NET by the loader, else None."""
    if codi_info is not None:
        return codi_info
    return getattr(control_net, "codi_info", None) if control_net is not None else None
