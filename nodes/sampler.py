"""``CoDiSampler`` (-> SAMPLER): CoDi's update rules as a ``comfy.samplers.KSAMPLER``.

Per step, with ``denoised`` from the (CoDi-patched) model at ``sigma``:

* ``ode``: ``x = denoised + sigma_next (x - denoised) / sigma`` -- k-diffusion Euler, = CoDi's DDIM step;
* ``consistency``: ``x = denoised + sigma_next xi`` with fresh seeded noise ``xi`` -- ``sample_lcm``; the last step is
  the ``ode`` step, as in ``ccd_sampler.sample``.

The equations are ``ccd_sampler.comfy_space`` (one source of truth with the pure-torch sampler). Consistency noise is
drawn from a CPU ``torch.Generator`` seeded with ``noise_seed`` (one ``randn`` of the latent's shape per intermediate
step, float32, then moved), exactly as ``ccd_sampler.sample(generator=...)`` draws it.

``start``: ``codi`` (default) starts a pure-noise sample (all-zero input latent) from ``z ~ N(0, I)``, i.e. ``x = xi
sqrt(1 + sigma_0^2)`` -- what ``ccd_sampler.sample`` and diffusers pipelines do, and ComfyUI's own ``max_denoise``
scaling; ``comfyui`` keeps ComfyUI's ``x = latent + sigma_0 xi`` (the two differ by the factor ``sigma_t`` of the first
timestep, 0.9971 at t = 980). With a non-empty latent (img2img) both are ComfyUI's ``latent + sigma_0 xi``.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..ccd_sampler.comfy_space import sample_sigma_space, start_latent
from ..ccd_sampler.sampling import SAMPLER_MODES

START_CHOICES = ("codi", "comfyui")


def _trange(n: int, disable):
    try:
        from tqdm.auto import trange
    except ImportError:  # pragma: no cover - tqdm is a ComfyUI requirement
        return range(n)
    return trange(n, disable=disable)


def _start(model, x, sigmas, start: str) -> torch.Tensor:
    """Recompute the starting ``x`` from the raw noise and latent ComfyUI keeps on the wrapped model."""
    noise = getattr(model, "noise", None)
    latent = getattr(model, "latent_image", None)
    if start != "codi" or noise is None or latent is None or noise.shape != x.shape:
        return x
    try:
        sampling = model.inner_model.inner_model.model_sampling
    except AttributeError:
        sampling = None
    if sampling is not None and type(sampling).noise_scaling is not _eps_noise_scaling():
        return x  # flow / other noise scalings: leave ComfyUI's start alone
    return start_latent(noise.to(x), latent.to(x), sigmas[0], unit_variance=True)


def _eps_noise_scaling():
    import comfy.model_sampling as ms

    return ms.EPS.noise_scaling


@torch.no_grad()
def sample_codi(model, x, sigmas, extra_args=None, callback=None, disable=None, mode: str = "ode",
                noise_seed: int = 0, start: str = "codi"):
    """The KSAMPLER sampler function (k-diffusion signature): :func:`ccd_sampler.comfy_space.sample_sigma_space`
    over the CoDi-patched model (which applies the boundary scalings itself)."""
    if mode not in SAMPLER_MODES:
        raise ValueError(f"CoDi sampler mode must be one of {SAMPLER_MODES}, got {mode!r}")
    if len(sigmas) <= 1:
        return x
    x = _start(model, x, sigmas, start)
    generator = torch.Generator(device="cpu").manual_seed(int(noise_seed)) if mode == "consistency" else None

    def noise():
        return torch.randn(x.shape, generator=generator, device="cpu", dtype=torch.float32).to(x)

    return sample_sigma_space(model, x, sigmas, mode, extra_args, callback, noise,
                              progress=lambda n: _trange(n, disable))


def codi_sampler(mode: str = "ode", noise_seed: int = 0, start: str = "codi"):
    import comfy.samplers

    if mode not in SAMPLER_MODES:
        raise ValueError(f"CoDi sampler mode must be one of {SAMPLER_MODES}, got {mode!r}")
    if start not in START_CHOICES:
        raise ValueError(f"CoDi sampler start must be one of {START_CHOICES}, got {start!r}")
    return comfy.samplers.KSAMPLER(sample_codi, {"mode": mode, "noise_seed": int(noise_seed), "start": start})


class CoDiSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CoDiSampler",
            display_name="CoDi Sampler",
            category="sampling/codi",
            description="CoDi's few-step update: ode (deterministic, = Euler on the CoDi-patched model) or "
                        "consistency (LCM-style fresh noise each step). Use with CoDi Scheduler in SamplerCustom / "
                        "SamplerCustomAdvanced.",
            inputs=[
                io.Combo.Input("mode", options=list(SAMPLER_MODES), default="ode"),
                io.Int.Input("noise_seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="Seed of the fresh noise of consistency mode (unused by ode)."),
                io.Combo.Input("start", options=list(START_CHOICES), default="codi",
                               tooltip="codi: a pure-noise start is z ~ N(0, I) (x = noise * sqrt(1 + sigma0^2)), "
                                       "as the CoDi/diffusers sampler; comfyui: x = noise * sigma0."),
            ],
            outputs=[io.Sampler.Output(display_name="sampler")],
        )

    @classmethod
    def execute(cls, mode, noise_seed, start) -> io.NodeOutput:
        return io.NodeOutput(codi_sampler(mode, noise_seed, start))
