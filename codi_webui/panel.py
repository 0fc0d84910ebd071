"""The CoDi panel's work in a generation: find the adapters in the ControlNet units, decide the plan
(:func:`codi_webui.plan.make_plan`) and apply it to the processing object ``p`` -- or make the generation fail with
the reason.

A hook's exception would be logged and ignored by the web UIs, so a refusal is recorded and ``p.sample`` (called
directly by ``process_images``) is wrapped to raise it: the API answers 400 with the message, the UI shows it, and
the server goes on serving.
"""

from __future__ import annotations

import logging

from ccd_sampler.adapter_info import CoDiInfo, read_codi_info

from . import controlnet
from .plan import CURRENT, CoDiPlan, CoDiWebUIError, PanelSettings, make_plan, missing_unet_lora

logger = logging.getLogger("codi")


def model_family(sd_model) -> tuple[str | None, str]:
    """``(family, label)`` of the loaded checkpoint: family ``sd1``/``sd2``/``sdxl`` (both UIs set ``is_sd1``,
    ``is_sd2``, ``is_sdxl`` on it) or None."""
    name = getattr(getattr(sd_model, "sd_checkpoint_info", None), "name", None) or "?"
    for family, flag in (("sdxl", "is_sdxl"), ("sd2", "is_sd2"), ("sd1", "is_sd1")):
        if getattr(sd_model, flag, False):
            return family, f"checkpoint {name}"
    return None, f"checkpoint {name}"


def unit_adapters(p) -> list[CoDiInfo]:
    """The sampler facts of each enabled unit's model file (units whose file is not found are left out, with a log
    line: the ControlNet reports them itself)."""
    files = controlnet.known_model_files()
    infos = []
    for unit in controlnet.enabled_units(p):
        name = controlnet.unit_model(unit)
        if name is None:
            continue
        path = controlnet.model_file(name, files)
        if path is None:
            logger.info("CoDi: ControlNet model %r is not among the listed files; not checked", name)
            continue
        try:
            infos.append(read_codi_info(path, name))
        except ValueError as e:
            raise CoDiWebUIError(str(e)) from None
    return infos


def plan_generation(p, panel: PanelSettings, adapters: list[CoDiInfo]) -> CoDiPlan | None:
    from modules import shared

    family, label = model_family(shared.sd_model)
    return make_plan(adapters, panel, family, label, str(p.sampler_name), int(p.steps), float(p.cfg_scale))


def apply_plan(p, plan: CoDiPlan) -> None:
    """Steps, cfg, sampler and scheduler of ``p`` from the plan, and its infotext fields."""
    p.steps, p.cfg_scale = int(plan.steps), float(plan.cfg)
    p.sampler_name, p.scheduler = plan.sampler_name, "CoDi"
    p.extra_generation_params.update(plan.infotext())
    logger.info("CoDi: %s -> %d steps, cfg %s, sampler %s, t = %s", plan.adapter.name if plan.adapter else
                "no CoDi adapter", plan.steps, plan.cfg, plan.sampler_name, plan.timesteps)


def guard_sampling(p) -> None:
    """Raise what the panel or a CoDi preprocessor recorded (:meth:`Generation.fail`) when ``p`` is about to sample,
    whatever its sampler: ``process_images`` calls ``p.sample`` directly, so its exception reaches the API (400 with
    the message) and the UI, where a hook's would be logged and ignored."""
    original = p.sample

    def sample(*args, **kwargs):
        CURRENT.raise_errors()
        return original(*args, **kwargs)

    p.sample = sample


def inspect(p) -> None:
    """The panel's ``before_process`` hook: reset the generation's state, guard its sampling, and read the units'
    adapter files -- before any ``process`` hook, because Forge's ControlNet moves a file it cannot read out of the
    way in its own."""
    CURRENT.reset((int(p.height) // 8 * 8, int(p.width) // 8 * 8))
    guard_sampling(p)
    try:
        CURRENT.adapters = unit_adapters(p)
    except CoDiWebUIError as e:
        CURRENT.refuse(str(e))


def run(p, panel: PanelSettings) -> None:
    """The panel's ``process`` hook."""
    if CURRENT.refused:
        return
    try:
        plan = plan_generation(p, panel, CURRENT.adapters)
    except CoDiWebUIError as e:
        CURRENT.refuse(str(e))
        return
    CURRENT.plan = plan
    if plan is not None:
        apply_plan(p, plan)
        warning = missing_unet_lora(plan, str(getattr(p, "prompt", "")))
        if warning:
            logger.warning("%s", warning)
