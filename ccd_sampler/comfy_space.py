"""The CoDi sampler's equations in ComfyUI / k-diffusion "sigma space" (pure torch; used by the ComfyUI nodes).

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


__all__ = ["alpha_from_sigma", "boundary_denoised", "euler_step", "implied_eps", "lcm_step", "start_latent"]
