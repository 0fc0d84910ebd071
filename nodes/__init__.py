"""ComfyUI glue for CoDi (V3 schema): adapter loader, model-sampling patch, CoDi scheduler (SIGMAS), CoDi sampler
(SAMPLER), one-box sample node and condition preprocessors.

Imported only through the pack's root ``__init__.py`` (relative imports): ComfyUI has a top-level module named
``nodes`` too, so nothing may import this package as a top-level ``nodes``.

Nodes (V3 ids; inputs -> outputs; optional inputs in brackets):

* ``CoDiAdapterLoader`` (loaders/codi): adapter_name (models/codi + models/controlnet) -> CONTROL_NET, CODI_INFO.
* ``CoDiModelPatch`` (sampling/codi): model, boundary (auto/on/off), lora_name, lora_strength, [codi_info] -> MODEL.
* ``CoDiScheduler`` (sampling/codi): model, steps (1-8), grid (0 = adapter's N), end (zero/sigma_0), denoise,
  [codi_info] -> SIGMAS.
* ``CoDiSampler`` (sampling/codi): mode (ode/consistency), noise_seed, start (codi/comfyui) -> SAMPLER.
* ``CoDiSample`` (sampling/codi): model, positive, negative, control_net, image, seed, steps (0 = adapter's), cfg
  (0 = adapter's), strength, mode (auto/ode/consistency), denoise, width, height, [latent], [codi_info] -> LATENT.
* ``CoDiSuperResolutionInput`` (image/codi): image, scale (auto/2/4/8), [codi_info] -> IMAGE hint, LATENT.
* ``CoDiInpaintInput`` (image/codi): image, mask -> IMAGE hint, MASK, LATENT.
* ``CoDiCanny`` (image/codi): image, low_threshold, high_threshold, thresholds (adapter/manual), [codi_info] -> IMAGE.

The math is ``ccd_sampler`` (``comfy_space.py`` for ComfyUI's sigma space); each module's docstring states its
equations and the deliberate choices (CODI_INFO in ``codi_info.py``, timestep rounding in ``model_patch.py``, the
start noise in ``sampler.py``, schedule ends and denoise in ``scheduler.py``).
"""

from __future__ import annotations


def node_list() -> list:
    """The pack's V3 node classes (imported here, inside ComfyUI, so ``comfy_api`` is available)."""
    from .codi_info import register_codi_folder
    from .loader import CoDiAdapterLoader
    from .model_patch import CoDiModelPatch
    from .preprocessors import CoDiCanny, CoDiInpaintInput, CoDiSuperResolutionInput
    from .sample import CoDiSample
    from .sampler import CoDiSampler
    from .scheduler import CoDiScheduler

    register_codi_folder()
    return [CoDiAdapterLoader, CoDiModelPatch, CoDiScheduler, CoDiSampler, CoDiSample,
            CoDiSuperResolutionInput, CoDiInpaintInput, CoDiCanny]
