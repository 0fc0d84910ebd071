"""The CoDi sampler's equations in ComfyUI / k-diffusion "sigma space" (pure torch; used by the ComfyUI nodes and the
Automatic1111 / Forge extension, whose samplers are k-diffusion's too).

ComfyUI (k-diffusion) works on the variance-exploding latent ``x = x0 + sigma * eps`` with ``sigma = sigma_t / alpha_t``
(``sigma_karras``), while ``ccd_sampler`` works on the variance-preserving ``z_t = alpha_t x0 + sigma_t eps``. The two
are the same state up to a scale: ``z_t = alpha_t x`` with ``alpha_t = 1 / sqrt(1 + sigma^2)``. A "denoised" value in
ComfyUI is an ``x0`` estimate in the latent's own units, exactly ``ccd_sampler``'s ``x0_hat``. So every step of
:func:`ccd_sampler.sample` has an exact sigma-space twin:

* boundary scaling -- z: ``f = c_skip(t) z_t + c_out(t) x0_hat``;
  sigma: ``f = c_skip(t) x / sqrt(1 + sigma^2) + c_out(t) x0_hat``.
* implied noise -- z: ``eps = (z_t - alpha_t f) / sigma_t``; sigma: ``eps = (x - f) / sigma`` (the same number).
* ``ode`` step to s -- z: ``z_s = alpha_s f + sigma_s eps`` (DDIM, eta = 0);
  sigma: ``x_s = f + sigma'_s eps`` (k-diffusion Euler).
* ``consistency`` step -- z: ``z_s = alpha_s f + sigma_s xi``; sigma: ``x_s = f + sigma'_s xi`` (``sample_lcm``).
* pure-noise start -- z: ``z = xi`` (unit variance); sigma: ``x = xi sqrt(1 + sigma_0^2)``.
* img2img start -- z: ``z = alpha_t x_init + sigma_t xi``; sigma: ``x = x_init + sigma xi``.

(``sigma'_s = sigma_s / alpha_s``.) Dividing each z-space line by ``alpha_s`` gives the sigma-space line, because
``(z_t - alpha_t f) / sigma_t = (x - f) / sigma``. The Euler step is written as ``f + sigma_next * eps`` (not
k-diffusion's ``x + d * (sigma_next - sigma)``, equal in exact arithmetic): that form returns ``f`` bit-exactly when
``sigma_next = 0``, as ``ccd_sampler.sample`` returns the last ``x0``.

The boundary scalings themselves come from :func:`ccd_sampler.boundary.boundary_scalings` (one source of truth).
``t`` is the integer timestep the UNet sees for ``sigma`` (ComfyUI's ``ModelSamplingDiscrete.timestep``: the nearest
training timestep in log-sigma), so on the CoDi grid the scaling equals the z-space one exactly.
"""

from __future__ import annotations

import torch

from .boundary import DEFAULT_SIGMA_DATA, DEFAULT_TIMESTEP_SCALING, apply_boundary
from .sampling import SAMPLER_MODES


def _per_sample(value, like: torch.Tensor) -> torch.Tensor:
    """A scalar or ``[B]`` value as a tensor that broadcasts against ``like`` (``[B, ...]``)."""
    value = torch.as_tensor(value, device=like.device, dtype=like.dtype)
    if value.ndim == 0:
        return value.reshape((1,) * like.ndim)
    return value.reshape((-1,) + (1,) * (like.ndim - 1))


def alpha_from_sigma(sigma, like: torch.Tensor) -> torch.Tensor:
    """``alpha_t = 1 / sqrt(1 + sigma^2)`` for a sigma-space noise level, broadcast against ``like``."""
    sigma = _per_sample(sigma, like)
    return torch.rsqrt(1.0 + sigma * sigma)


def boundary_denoised(x: torch.Tensor, x0: torch.Tensor, sigma, t, enabled: bool = True,
                      sigma_data: float = DEFAULT_SIGMA_DATA,
                      timestep_scaling: float = DEFAULT_TIMESTEP_SCALING) -> torch.Tensor:
    """CoDi's boundary-scaled clean estimate from sigma-space inputs.

    ``x`` is ComfyUI's model input (``x0 + sigma eps``), ``x0`` the model's plain ``x0_hat`` (``calculate_denoised``)
    and ``t`` the timestep(s) the UNet saw. Returns ``c_skip(t) z_t + c_out(t) x0_hat`` with ``z_t = x / sqrt(1 +
    sigma^2)`` -- exactly :func:`ccd_sampler.apply_boundary` on the z-space state.
    """
    if not enabled:
        return x0
    z_t = x * alpha_from_sigma(sigma, x)
    t = torch.as_tensor(t).detach().cpu()
    return apply_boundary(z_t, x0, t.reshape(-1) if t.ndim else t, True, sigma_data, timestep_scaling)


def implied_eps(x: torch.Tensor, denoised: torch.Tensor, sigma) -> torch.Tensor:
    """The noise implied by a clean estimate at ``x``: ``(x - denoised) / sigma`` (= z space ``(z_t - alpha_t f) /
    sigma_t``)."""
    return (x - denoised) / _per_sample(sigma, x)


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """The ``ode`` step in sigma space: ``x_next = denoised + sigma_next (x - denoised) / sigma``.

    Equal to k-diffusion's Euler step ``x + (x - denoised) / sigma * (sigma_next - sigma)`` and, divided by
    ``alpha_s``, to the DDIM step ``z_s = alpha_s f + sigma_s eps`` of :func:`ccd_sampler.ode_step`. Returns
    ``denoised`` itself when ``sigma_next == 0``.
    """
    if float(sigma_next) == 0.0:
        return denoised
    return denoised + _per_sample(sigma_next, x) * implied_eps(x, denoised, sigma)


def lcm_step(denoised: torch.Tensor, noise: torch.Tensor, sigma_next) -> torch.Tensor:
    """The ``consistency`` step in sigma space: ``x_next = denoised + sigma_next xi`` (k-diffusion ``sample_lcm``;
    :func:`ccd_sampler.consistency_step` divided by ``alpha_s``). Returns ``denoised`` when ``sigma_next == 0``."""
    if float(sigma_next) == 0.0:
        return denoised
    return denoised + _per_sample(sigma_next, denoised) * noise.to(denoised.dtype)


def start_latent(noise: torch.Tensor, latent: torch.Tensor, sigma0, unit_variance: bool) -> torch.Tensor:
    """The sampler's starting ``x`` for raw Gaussian ``noise`` and the (processed) input ``latent``.

    ``unit_variance`` and an all-zero latent (a pure-noise start): ``x = noise sqrt(1 + sigma_0^2)``, i.e. ``z =
    noise`` -- :func:`ccd_sampler.sample` and diffusers pipelines start from ``z ~ N(0, I)``; this is also ComfyUI's
    own scaling when a schedule starts at its largest sigma (``max_denoise``). Otherwise ``x = latent + sigma_0
    noise`` (ComfyUI's default; in z space the img2img start ``alpha_t x_init + sigma_t noise``).
    """
    sigma0 = _per_sample(sigma0, noise)
    if unit_variance and not bool(torch.count_nonzero(latent)):
        return noise * torch.sqrt(1.0 + sigma0 * sigma0) + latent
    return noise * sigma0 + latent


def grid_sigmas(sigma_table: torch.Tensor, timesteps) -> torch.Tensor:
    """The sigma-space schedule of a timestep list: ``sigma_table[t]`` for each ``t`` (descending), then ``0``.

    ``sigma_table`` is the model's ``[T]`` table of ``sqrt((1 - abar_t) / abar_t)`` (ComfyUI's
    ``model_sampling.sigmas``, the web UIs' ``model_wrap.sigmas``); e.g. ``codi_timesteps(4)`` gives the sigmas of
    ``t = 980, 720, 460, 200`` and ``0``."""
    index = torch.as_tensor(list(timesteps), dtype=torch.long, device=sigma_table.device)
    return torch.cat([sigma_table[index].float(), sigma_table.new_zeros(1, dtype=torch.float32)])


@torch.no_grad()
def sample_sigma_space(model, x: torch.Tensor, sigmas: torch.Tensor, mode: str = "ode", extra_args=None,
                       callback=None, noise=None, boundary=None, progress=range) -> torch.Tensor:
    """The CoDi sampler loop over a k-diffusion denoiser ``model(x, sigma, **extra_args) -> denoised``.

    Per step ``i`` (``sigma = sigmas[i]``, ``sigma_next = sigmas[i + 1]``)::

        f = model(x, sigma)                              (optionally f <- boundary(x, f, sigma))
        ode, or the last step:  x = f + sigma_next (x - f) / sigma        (euler_step)
        consistency:            x = f + sigma_next xi,  xi = noise()       (lcm_step)

    ``boundary`` is for hosts whose denoiser returns the plain ``x0_hat`` (the web UIs): a callable ``(x, f, sigma)
    -> f`` such as :func:`boundary_denoised` with the sigma's timestep; ComfyUI applies it inside the patched model
    instead. ``noise()`` returns fresh ``N(0, I)`` noise like ``x`` (the host's seeded generator). ``callback``
    gets k-diffusion's ``{"x", "i", "sigma", "sigma_hat", "denoised"}``; ``progress`` wraps ``range`` (a progress
    bar)."""
    if mode not in SAMPLER_MODES:
        raise ValueError(f"CoDi sampler mode must be one of {SAMPLER_MODES}, got {mode!r}")
    if mode == "consistency" and noise is None:
        raise ValueError("the consistency mode needs a noise source")
    extra_args = {} if extra_args is None else extra_args
    steps = len(sigmas) - 1
    s_in = x.new_ones([x.shape[0]])
    for i in progress(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if boundary is not None:
            denoised = boundary(x, denoised, sigma)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if mode == "ode" or i + 1 == steps:
            x = euler_step(x, denoised, sigma, sigma_next)
        else:
            x = lcm_step(denoised, noise(), sigma_next)
    return x


__all__ = ["alpha_from_sigma", "boundary_denoised", "euler_step", "grid_sigmas", "implied_eps", "lcm_step",
           "sample_sigma_space", "start_latent"]
