"""What the CoDi panel applies to one generation.

The panel looks at the enabled ControlNet units: the first whose model file carries ``codi.*`` metadata is *the
adapter*. Its recommended steps, cfg and sampler mode, its grid and boundary scalings become the generation's
settings, except where the panel overrides them (steps / cfg > 0, mode other than ``auto``). A generation with no CoDi
adapter is left alone -- unless the user picked a CoDi sampler, which then samples with the defaults of
:class:`ccd_sampler.CoDiMetadata` (grid 50, boundary on) and says so in the log.

Errors found here are kept on the :class:`Generation` and raised from the sampler: the web UIs swallow exceptions of
script hooks (the request would succeed without CoDi), but not of the sampling call, whose exception reaches the API
response and the UI's error box.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ccd_sampler.adapter_info import CoDiInfo, check_family
from ccd_sampler.grids import MAX_STEPS, codi_timesteps
from ccd_sampler.metadata import CoDiMetadata

logger = logging.getLogger("codi")

SAMPLER_NAMES = {"consistency": "CoDi", "ode": "CoDi ODE"}
SCHEDULER_NAME, SCHEDULER_LABEL = "codi", "CoDi"
MODE_CHOICES = ("auto", "ode", "consistency")
INFOTEXT_KEYS = {"adapter": "CoDi adapter", "steps": "CoDi steps", "cfg": "CoDi cfg", "mode": "CoDi mode",
                 "grid": "CoDi grid", "boundary": "CoDi boundary"}


class CoDiWebUIError(ValueError):
    """A user error: the API answers it with HTTP 400 and the message (the web UIs read ``status_code`` and
    ``detail`` from the exception's instance attributes)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.status_code = 400
        self.detail = message


@dataclass(frozen=True)
class PanelSettings:
    """The CoDi panel's controls: 0 / ``auto`` take the adapter's value."""

    enabled: bool = True
    steps: int = 0
    cfg: float = 0.0
    mode: str = "auto"


@dataclass(frozen=True)
class CoDiPlan:
    """The settings one generation samples with."""

    adapter: CoDiInfo | None
    steps: int
    cfg: float
    mode: str
    metadata: CoDiMetadata = field(default_factory=CoDiMetadata)

    @property
    def sampler_name(self) -> str:
        return SAMPLER_NAMES[self.mode]

    @property
    def timesteps(self) -> list[int]:
        return codi_timesteps(self.steps, self.metadata.distill_grid, self.metadata.num_train_timesteps)

    def infotext(self) -> dict[str, object]:
        """The PNG infotext fields (``CoDi steps: 4, CoDi cfg: 1.0, ...``); pasting them restores the panel."""
        values = {"adapter": self.adapter.name if self.adapter else "none", "steps": self.steps, "cfg": self.cfg,
                  "mode": self.mode, "grid": self.metadata.distill_grid,
                  "boundary": "on" if self.metadata.boundary else "off"}
        return {INFOTEXT_KEYS[k]: v for k, v in values.items()}


def missing_unet_lora(plan: CoDiPlan | None, prompt: str) -> str | None:
    """A warning when the adapter was trained with a UNet LoRA (``codi.unet_lora``) that the prompt does not load.

    The trainer writes that LoRA beside the adapter as ``<adapter>_unet_lora.safetensors`` in kohya's format; the
    web UIs load it from ``models/Lora`` through the prompt (``<lora:<adapter>_unet_lora:1>``). Without it the
    adapter still runs, but not as it was distilled."""
    if plan is None or plan.adapter is None or not plan.metadata.unet_lora:
        return None
    lora = plan.adapter.name.split(" [")[0] + "_unet_lora"
    if f"<lora:{lora}:" in prompt:
        return None
    return (f"CoDi: adapter {plan.adapter.name} was distilled together with a UNet LoRA: put {lora}.safetensors in "
            f"models/Lora and add <lora:{lora}:1> to the prompt, or the result will not be what it was trained for")


def default_plan(steps: int, cfg: float, mode: str) -> CoDiPlan:
    """A CoDi sampler picked without a CoDi adapter: the default sampler facts."""
    return CoDiPlan(adapter=None, steps=steps, cfg=cfg, mode=mode)


def make_plan(adapters: list[CoDiInfo], panel: PanelSettings, family: str | None, model_label: str,
              chosen_sampler: str, steps: int, cfg: float) -> CoDiPlan | None:
    """The plan for a generation, or None when CoDi stays out of it.

    ``adapters`` are the ControlNet units' files (with or without ``codi.*`` metadata) in unit order; ``family`` is
    the loaded checkpoint's (``sd1``/``sd2``/``sdxl``); ``chosen_sampler``, ``steps`` and ``cfg`` are what the user
    set in the UI. Raises :class:`CoDiWebUIError` for an adapter made for another architecture or steps CoDi cannot
    take.
    """
    codi = [a for a in adapters if a.has_codi_metadata]
    codi_sampler = chosen_sampler in SAMPLER_NAMES.values()
    # checked even with the panel's settings off: an adapter for another base fails or makes noise either way
    for info in codi:
        try:
            check_family(info, family, model_label, "panel")
        except ValueError as e:
            raise CoDiWebUIError(str(e)) from None
    if not panel.enabled or not (codi or codi_sampler):
        return None
    if not codi:
        names = ", ".join(a.name for a in adapters) or "no ControlNet unit"
        logger.info("CoDi: sampler %s without a CoDi adapter (%s): default sampler facts (grid N=50, boundary on)",
                    chosen_sampler, names)
        mode = _mode(panel, "consistency" if chosen_sampler == SAMPLER_NAMES["consistency"] else "ode")
        return _checked(default_plan(panel.steps or steps, panel.cfg or cfg, mode))
    info = codi[0]
    if len({(a.metadata.distill_grid, a.metadata.boundary) for a in codi}) > 1:
        logger.warning("CoDi: units hold CoDi adapters with different grids or boundary settings; following the "
                       "first, %s", info.name)
    meta = info.metadata
    if meta.objective == "diffusion":
        logger.warning("CoDi: %s is a plain ControlNet fine-tune (codi.objective = diffusion): it needs many steps, "
                       "not the CoDi sampler; leaving the generation alone", info.name)
        return None
    plan = CoDiPlan(adapter=info, steps=panel.steps or meta.recommended_steps,
                    cfg=panel.cfg or meta.recommended_cfg, mode=_mode(panel, meta.sampler_mode), metadata=meta)
    return _checked(plan)


def _mode(panel: PanelSettings, default: str) -> str:
    if panel.mode not in MODE_CHOICES:
        raise CoDiWebUIError(f"CoDi panel: mode must be one of {', '.join(MODE_CHOICES)}, got {panel.mode!r}")
    return default if panel.mode == "auto" else panel.mode


def _checked(plan: CoDiPlan) -> CoDiPlan:
    if isinstance(plan.steps, bool) or not 1 <= int(plan.steps) <= MAX_STEPS:
        raise CoDiWebUIError(f"CoDi: steps must be in 1..{MAX_STEPS} (CoDi is a 1-{MAX_STEPS} step sampler), got "
                             f"{plan.steps}; set Sampling steps or the CoDi panel's steps to 1-{MAX_STEPS}")
    if plan.cfg < 1.0:
        raise CoDiWebUIError(f"CoDi: cfg must be >= 1, got {plan.cfg}")
    try:
        codi_timesteps(plan.steps, plan.metadata.distill_grid, plan.metadata.num_train_timesteps)
    except ValueError as e:
        raise CoDiWebUIError(f"CoDi: {e}") from None
    return plan


@dataclass
class Generation:
    """The CoDi state of the generation in progress (the web UIs run one at a time): the plan, the output size the
    hint preprocessors aim at, and errors to raise from the sampler."""

    plan: CoDiPlan | None = None
    target_size: tuple[int, int] | None = None  # (height, width) in pixels, multiples of 8
    errors: list[str] = field(default_factory=list)
    adapters: list[CoDiInfo] = field(default_factory=list)  # the enabled units' files, in unit order

    refused: bool = False  # the panel refused the generation: it plans nothing

    def reset(self, target_size: tuple[int, int] | None = None) -> None:
        self.plan, self.target_size, self.errors, self.adapters, self.refused = None, target_size, [], [], False

    def fail(self, message: str) -> None:
        """Record an error for the sampling to raise (a preprocessor's, or the panel's)."""
        logger.error("%s", message)
        self.errors.append(message)

    def refuse(self, message: str) -> None:
        self.fail(message)
        self.refused = True

    def raise_errors(self) -> None:
        if self.errors:
            message = self.errors[0]
            self.errors = []
            raise CoDiWebUIError(message)


CURRENT = Generation()
