"""``CoDiScheduler`` (MODEL -> SIGMAS): the CoDi timestep grid as ComfyUI sigmas.

``ccd_sampler.codi_timesteps(steps, N)`` gives the evaluation timesteps (N = 50: 4 steps -> 980, 720, 460, 200); each
becomes ``model_sampling.sigma(t)`` of the (patched) model, and the schedule ends with

* ``zero`` (default): sigma 0, the final "step to t = 0": the last Euler/LCM step returns the clean estimate itself,
  as ``ccd_sampler.sample(..., final="x0")`` does;
* ``sigma_0``: ``sigma(0)``, ComfyUI's smallest training noise level: the output is ``x0 + sigma(0) eps_hat``, which
  is ``ccd_sampler.sample(..., final="z0")`` divided by ``alpha_0`` (ComfyUI latents are ``z / alpha``). When the grid
  itself already ends at t = 0 (8 steps on N = 50) nothing is appended.

``denoise < 1`` (img2img) keeps the tail of the schedule like ``ccd_sampler.img2img_timesteps``: the last
``round(denoise * steps)`` timesteps (at least one). Unlike BasicScheduler, ``steps`` is the length of the full schedule
the adapter was made for, so the kept timesteps stay on the adapter's grid. ``denoise == 0`` gives an empty schedule
(the latent passes through), like BasicScheduler.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..ccd_sampler.grids import MAX_STEPS, codi_timesteps, img2img_timesteps
from .codi_info import CoDiInfo, check_architecture
from .types import CoDiInfoType

END_CHOICES = ("zero", "sigma_0")
DEFAULT_GRID = 50


def check_steps(steps: int, node: str) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"CoDi {node}: steps must be an integer in 1..{MAX_STEPS} (CoDi is a 1-8 step sampler), "
                         f"got {steps!r}")
    return steps


def resolve_grid(grid: int, info: CoDiInfo | None) -> int:
    if grid:
        return int(grid)
    return info.metadata.distill_grid if info is not None else DEFAULT_GRID


def codi_sigmas(model, steps: int, grid: int = 0, end: str = "zero", denoise: float = 1.0,
                info: CoDiInfo | None = None, node: str = "CoDiScheduler") -> torch.Tensor:
    """The SIGMAS tensor (float32, CPU, descending, ending in 0 for ``end="zero"``) for ``model``."""
    check_steps(steps, node)
    if end not in END_CHOICES:
        raise ValueError(f"CoDi {node}: end must be one of {END_CHOICES}, got {end!r}")
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"CoDi {node}: denoise must be in 0..1, got {denoise}")
    check_architecture(info, model, node)
    sampling = model.get_model_object("model_sampling")
    num_timesteps = int(getattr(sampling, "num_timesteps", len(sampling.sigmas)))
    if info is not None and info.metadata.num_train_timesteps != num_timesteps:
        raise ValueError(f"CoDi {node}: adapter {info.name!r} was distilled on a {info.metadata.num_train_timesteps}-"
                         f"step schedule but the model has {num_timesteps} timesteps")
    grid = resolve_grid(grid, info)
    try:
        timesteps = codi_timesteps(steps, grid, num_timesteps)
    except ValueError as e:
        raise ValueError(f"CoDi {node}: {e}") from None
    if denoise <= 0.0:
        return torch.FloatTensor([])
    if denoise < 1.0:
        timesteps = img2img_timesteps(timesteps, denoise)
    sigmas = sampling.sigma(torch.tensor(timesteps, dtype=torch.float32)).float().cpu()
    if end == "zero":
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    elif timesteps[-1] != 0:
        sigmas = torch.cat([sigmas, sampling.sigma(torch.tensor([0.0])).float().cpu()])
    return sigmas


class CoDiScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CoDiScheduler",
            display_name="CoDi Scheduler",
            category="sampling/codi",
            description="CoDi's few-step schedule: the adapter's distillation grid [k(N-1), ..., k, 0] taken with "
                        "stride ceil(N/steps) (N=50, 4 steps: t = 980, 720, 460, 200), as sigmas of the model, "
                        "ending at 0.",
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("steps", default=4, min=1, max=MAX_STEPS),
                io.Int.Input("grid", default=0, min=0, max=1000,
                             tooltip="Distillation grid N; 0 = the adapter's codi.distill_grid (50 without "
                                     "CODI_INFO)."),
                io.Combo.Input("end", options=list(END_CHOICES), default="zero",
                               tooltip="zero: end on the clean estimate (final step to t=0). sigma_0: end at "
                                       "sigma(t=0), leaving ComfyUI's smallest training noise."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="img2img: keep the last round(denoise*steps) steps of the schedule."),
                CoDiInfoType.Input("codi_info", optional=True),
            ],
            outputs=[io.Sigmas.Output(display_name="sigmas")],
        )

    @classmethod
    def execute(cls, model, steps, grid, end, denoise, codi_info=None) -> io.NodeOutput:
        return io.NodeOutput(codi_sigmas(model, steps, grid, end, denoise, codi_info))
