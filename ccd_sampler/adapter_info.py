"""What a host (the ComfyUI nodes, the Automatic1111 / Forge extension) knows about one adapter file before sampling
with it: its ``codi.*`` sampler facts (:class:`CoDiMetadata`), the base architecture it was made for, and the check
that refuses it on a model of another family.

Files without ``codi.*`` metadata (any stock ControlNet / Control-LoRA) get the defaults of :class:`CoDiMetadata`
and a log line. Only the safetensors header is read (no tensor, no pickle).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from .metadata import CoDiMetadata, MetadataError, read_safetensors_header

logger = logging.getLogger("codi")

# modelspec base architecture (the part before "/") -> model family
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
    """The sampler facts of one adapter file."""

    name: str                                  # the file name as the host lists it
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


def check_family(info: CoDiInfo | None, family: str | None, model_label: str, who: str) -> None:
    """Raise ``ValueError`` when the adapter was made for another model family than the model's ``family``
    (``sd1``/``sd2``/``sdxl``; None = not one of them). ``model_label`` says how the host sees the model (e.g.
    "ComfyUI model config SD15"), ``who`` names the node or panel. Unknown architectures are logged and allowed."""
    if info is None:
        return
    wanted = info.family
    if wanted is None:
        if info.architecture:
            logger.info("CoDi %s: adapter %s names architecture %r, which CoDi does not know; not checked against "
                        "the model (%s)", who, info.name, info.architecture, model_label)
        return
    if family is None:
        logger.warning("CoDi %s: the model is a %s, not SD1.x/SD2.x/SDXL; adapter %s (%s) not checked against it",
                       who, model_label, info.name, info.architecture)
        return
    if family != wanted:
        raise ValueError(
            f"CoDi {who}: adapter {info.name!r} was made for {FAMILY_NAMES[wanted]} (modelspec.architecture = "
            f"{info.architecture!r}) but the model is {FAMILY_NAMES[family]} ({model_label}). "
            f"Load a {FAMILY_NAMES[family]} CoDi adapter, or a {FAMILY_NAMES[wanted]} checkpoint.")
