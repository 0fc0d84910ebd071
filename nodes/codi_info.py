"""The ``CODI_INFO`` value: an adapter's sampler facts (:class:`ccd_sampler.adapter_info.CoDiInfo`), travelling beside
its CONTROL_NET through a graph.

Decision: :class:`CoDiAdapterLoader` has two outputs, ``CONTROL_NET`` (ComfyUI's own object, usable by the stock Apply
ControlNet nodes) and ``CODI_INFO`` (this dataclass). The loader also sets ``control_net.codi_info`` on the object it
returns, so a node given only the CONTROL_NET (``CoDiSample`` with nothing connected to ``codi_info``) still finds the
facts; ``ControlBase.copy()`` (what the Apply nodes do) does not carry the attribute, which is why the explicit output
is the primary path. Files without ``codi.*`` metadata (any stock ControlNet / Control-LoRA) load with the defaults of
:class:`ccd_sampler.CoDiMetadata` and a log line.

Only ComfyUI-provided modules and our ``ccd_sampler`` are imported here.
"""

from __future__ import annotations

import os

from ..ccd_sampler.adapter_info import ARCHITECTURE_FAMILIES, FAMILY_NAMES, CoDiInfo, check_family, read_codi_info


CODI_FOLDER = "codi"
"""``folder_paths`` key of the pack's own model folder (``models/codi``); the loader also lists ``controlnet``."""

__all__ = ["ARCHITECTURE_FAMILIES", "CODI_FOLDER", "FAMILY_NAMES", "CoDiInfo", "check_architecture", "info_of",
           "model_family", "read_codi_info", "register_codi_folder"]


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
    check_family(info, family, f"ComfyUI model config {cls_name}", node)


def info_of(control_net=None, codi_info: CoDiInfo | None = None) -> CoDiInfo | None:
    """The explicit CODI_INFO input, else the facts attached to a CONTROL_NET by the loader, else None."""
    if codi_info is not None:
        return codi_info
    return getattr(control_net, "codi_info", None) if control_net is not None else None
