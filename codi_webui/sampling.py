"""The "CoDi" and "CoDi ODE" samplers and the "CoDi" scheduler for Automatic1111 and Forge.

Both web UIs run samplers with k-diffusion's signature ``fn(model, x, sigmas, extra_args, callback, disable)``, where
``model`` is the UI's CFG denoiser: it returns ``denoised``, the guided ``x0`` estimate in sigma space (``x = x0 +
sigma eps``) for epsilon and v-prediction checkpoints alike. So one sampler serves both UIs:

* the loop is :func:`ccd_sampler.comfy_space.sample_sigma_space` (``ode``: Euler = CoDi's DDIM step; ``consistency``:
  ``x = denoised + sigma_next xi``);
* the boundary scalings are applied to ``denoised`` here, with ``t = round(model_wrap.sigma_to_t(sigma))`` -- the UIs'
  denoisers do not apply them (A1111's LCM denoiser would, Forge never calls it). Guidance combines the two branches
  with weights that sum to one, so scaling after CFG equals scaling each branch;
* a txt2img start is CoDi's ``z ~ N(0, I)``: the UIs start from ``xi sigma_0`` unless "SGM noise multiplier" is on,
  so ``x`` is scaled by ``sqrt(1 + sigma_0^2) / sigma_0`` (1.0023 at t = 980); img2img and hires passes keep the
  last ``round(strength * steps)`` timesteps of the grid (:func:`img2img_schedule`) from ``x_init + sigma xi``;
* consistency noise comes from the UI's seeded generator (``k_diffusion.sampling.torch.randn_like``, which both UIs
  point at the generation's per-seed RNG), so a seed reproduces an image, also inside a batch.

The scheduler returns the sigmas of ``codi_timesteps(steps, N)`` (N = 50, 4 steps: t = 980, 720, 460, 200) from the
model's own sigma table, then 0.

Set ``CODI_WEBUI_TRACE`` to a folder and every CoDi sampling writes ``trace-<n>.safetensors`` there (start ``x``,
sigmas, timesteps, result): the tests compare it with :func:`ccd_sampler.sample`.
"""

from __future__ import annotations

import logging
import math
import os
from functools import partial

import torch

from ccd_sampler.comfy_space import boundary_denoised, grid_sigmas, sample_sigma_space
from ccd_sampler.grids import codi_timesteps, img2img_timesteps

from .plan import CURRENT, SAMPLER_NAMES, SCHEDULER_LABEL, SCHEDULER_NAME, CoDiPlan, CoDiWebUIError, default_plan

logger = logging.getLogger("codi")
TRACE_ENV = "CODI_WEBUI_TRACE"


def active_plan(steps: int, mode: str) -> CoDiPlan:
    """The panel's plan for this generation, or the default sampler facts when the panel made none."""
    CURRENT.raise_errors()
    return CURRENT.plan if CURRENT.plan is not None else default_plan(steps, 1.0, mode)


def timesteps_of(model_wrap, sigmas: torch.Tensor) -> torch.Tensor:
    """The integer training timestep of each sigma, on the CPU: Forge's ``sigma_to_t`` returns it; A1111's
    interpolates in log-sigma (exact on the grid up to rounding), so it is rounded. The sigmas go to the device of
    the model's sigma table first: A1111 subtracts them from it as they are."""
    sigmas = sigmas.float().to(model_wrap.sigmas.device)
    return torch.as_tensor(model_wrap.sigma_to_t(sigmas)).float().round().cpu()


def _is_txt2img_start(p) -> bool:
    return p is not None and not hasattr(p, "init_images") and not getattr(p, "is_hr_pass", False)


def _sgm_noise_multiplier() -> bool:
    try:
        from modules.shared import opts
    except ImportError:
        return False
    return bool(getattr(opts, "sgm_noise_multiplier", False))


def _seeded_randn_like(x: torch.Tensor) -> torch.Tensor:
    try:
        import k_diffusion.sampling as kds  # both UIs point its ``torch`` at the generation's seeded RNG
    except ImportError:
        return torch.randn_like(x)
    return kds.torch.randn_like(x)


def _progress(disable):
    try:
        from tqdm.auto import trange
    except ImportError:  # pragma: no cover - both UIs ship tqdm
        return range
    return partial(trange, disable=disable)


@torch.no_grad()
def sample_codi(model, x, sigmas, extra_args=None, callback=None, disable=None, mode: str = "ode"):
    """The sampler function (k-diffusion signature); ``model`` is the UI's CFG denoiser."""
    sigmas = sigmas.to(x.device)
    if len(sigmas) <= 1:
        return x
    model_wrap = model.inner_model
    p = getattr(model, "p", None)
    plan = active_plan(int(getattr(p, "steps", 0) or len(sigmas) - 1), mode)
    mode = plan.mode
    check_schedule(plan, model_wrap)
    if _is_txt2img_start(p):
        sigma0 = float(sigmas[0])
        if not _sgm_noise_multiplier() and sigma0 > 0:
            x = x * (math.sqrt(1.0 + sigma0 * sigma0) / sigma0)
    elif p is not None:
        x, sigmas = img2img_schedule(model, x, sigmas, plan, p)
    start = x
    meta = plan.metadata
    if meta.boundary:
        def boundary(x, denoised, sigma):
            t = timesteps_of(model_wrap, sigma.reshape(-1))
            return boundary_denoised(x, denoised, sigma, t, True, meta.sigma_data, meta.timestep_scaling)
    else:
        boundary = None
    result = sample_sigma_space(model, x, sigmas, mode, extra_args, callback, lambda: _seeded_randn_like(x),
                                boundary, _progress(disable))
    logger.info("CoDi: %d steps (%s, boundary %s), t = %s, sigmas %s", len(sigmas) - 1, mode,
                "on" if meta.boundary else "off", timesteps_of(model_wrap, sigmas[:-1]).long().tolist(),
                [round(float(s), 4) for s in sigmas])
    _trace(start, sigmas, model_wrap, result, extra_args)
    return result


def img2img_schedule(model, x, sigmas, plan: CoDiPlan, p):
    """img2img (and hires passes) with CoDi's convention, as the ComfyUI nodes' ``denoise``: the last
    ``round(strength * steps)`` timesteps of the adapter's grid (:func:`ccd_sampler.img2img_timesteps`). The web
    UIs would run ``int(strength * steps) + 1`` steps -- at 2 steps and strength 0.5 both, from t = 980, which
    ignores the input image. The UI's start ``x = init + sigma xi`` is rebuilt at the first kept sigma from the same
    noise ``xi``."""
    init = getattr(model, "init_latent", None)
    strength = float(getattr(p, "denoising_strength", 1.0) or 1.0)
    if init is None or init.shape != x.shape or not 0.0 < strength < 1.0:
        return x, sigmas
    model_wrap = model.inner_model
    wanted = img2img_timesteps(plan.timesteps, strength)
    if timesteps_of(model_wrap, sigmas[:-1]).long().tolist() == wanted:
        return x, sigmas
    noise = (x - init.to(x)) / sigmas[0]
    kept = grid_sigmas(model_wrap.sigmas.detach().float().cpu(), wanted).to(x.device)
    return init.to(x) + kept[0] * noise, kept


# the largest sigma of SD's schedule is 14.6; rescaled to zero terminal SNR it is ~4.5e3 (A1111) or infinite
ZTSNR_SIGMA_MAX = 100.0


def check_schedule(plan: CoDiPlan, model_wrap) -> None:
    """An adapter distilled on the zero-terminal-SNR schedule needs the UI to sample on it (and the other way
    round): the same timesteps mean other noise levels."""
    ztsnr = float(model_wrap.sigmas[-1]) > ZTSNR_SIGMA_MAX
    if plan.metadata.zero_terminal_snr and not ztsnr:
        raise CoDiWebUIError(f"CoDi: adapter {plan.adapter.name if plan.adapter else ''} was distilled with zero "
                             "terminal SNR: set Settings > Sampler parameters > Noise schedule for sampling to "
                             "'Zero Terminal SNR' (or load the checkpoint it was made from)")
    if ztsnr and plan.adapter is not None and not plan.metadata.zero_terminal_snr:
        logger.warning("CoDi: the UI samples with zero terminal SNR but adapter %s was distilled on the standard "
                       "schedule; set Noise schedule for sampling to 'Default' for the results it was made for",
                       plan.adapter.name)


sample_codi_consistency = partial(sample_codi, mode="consistency")
sample_codi_ode = partial(sample_codi, mode="ode")


def codi_scheduler(n, sigma_min, sigma_max, inner_model, device):
    """The "CoDi" scheduler: the adapter's grid (the panel's plan; N = 50 without one) as the model's sigmas."""
    plan = CURRENT.plan
    grid = plan.metadata.distill_grid if plan is not None else 50
    table = inner_model.sigmas
    try:
        timesteps = codi_timesteps(int(n), grid, len(table))
    except ValueError as e:
        raise CoDiWebUIError(f"CoDi scheduler: {e}") from None
    return grid_sigmas(table.detach().float().cpu(), timesteps).to(device)


def _trace(start, sigmas, model_wrap, result, extra_args) -> None:
    """Tests: what this sampling started from, stepped through and returned, and the text conditioning the UNet
    saw (the UI's own reconstruction of its prompt schedule at step 0)."""
    folder = os.environ.get(TRACE_ENV)
    if not folder:
        return
    from safetensors.torch import save_file

    tensors = {"x_start": start, "sigmas": sigmas, "timesteps": timesteps_of(model_wrap, sigmas[:-1]),
               "result": result, "sigma_table": model_wrap.sigmas}
    try:
        from modules import prompt_parser

        _, cond = prompt_parser.reconstruct_multicond_batch((extra_args or {})["cond"], 0)
        if isinstance(cond, dict):
            tensors.update({f"cond.{k}": v for k, v in cond.items() if isinstance(v, torch.Tensor)})
        else:
            tensors["cond"] = cond
    except (ImportError, KeyError, TypeError, AttributeError) as e:
        logger.info("CoDi trace: no conditioning recorded (%s)", e)
    os.makedirs(folder, exist_ok=True)
    index = len([f for f in os.listdir(folder) if f.startswith("trace-")])
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
              os.path.join(folder, f"trace-{index:04d}.safetensors"))


# ------------------------------------------------------------------------------------------------ registration

def register() -> None:
    """Add the samplers and the scheduler to the running UI's lists (replacing earlier registrations by name: "Reload
    UI" imports the extension again). A1111 1.10 has no ``add_sampler``; Forge's would not replace."""
    from modules import sd_samplers, sd_samplers_common, sd_samplers_kdiffusion, sd_schedulers

    functions = {SAMPLER_NAMES["consistency"]: (sample_codi_consistency, ["codi"]),
                 SAMPLER_NAMES["ode"]: (sample_codi_ode, ["codi_ode"])}
    samplers = sd_samplers.all_samplers
    for name, (function, aliases) in functions.items():
        def constructor(model, function=function):
            return sd_samplers_kdiffusion.KDiffusionSampler(function, model)

        data = sd_samplers_common.SamplerData(name, constructor, aliases, {"scheduler": SCHEDULER_NAME})
        samplers[:] = [s for s in samplers if s.name != name] + [data]  # in place: ``samplers`` aliases this list
    sd_samplers.all_samplers_map = {s.name: s for s in samplers}
    sd_samplers.set_samplers()

    scheduler = sd_schedulers.Scheduler(SCHEDULER_NAME, SCHEDULER_LABEL, codi_scheduler, need_inner_model=True)
    sd_schedulers.schedulers[:] = [s for s in sd_schedulers.schedulers if s.name != SCHEDULER_NAME] + [scheduler]
    sd_schedulers.schedulers_map[SCHEDULER_NAME] = scheduler
    sd_schedulers.schedulers_map[SCHEDULER_LABEL] = scheduler
    cache_clear = getattr(sd_samplers.get_sampler_and_scheduler, "cache_clear", None)
    if cache_clear is not None:
        cache_clear()
