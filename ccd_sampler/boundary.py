"""Consistency-model boundary scalings (LCM form).

``f(z_t, t) = c_skip(t) z_t + c_out(t) x0_hat`` with

    c_skip(t) = sigma_d^2 / ((tau t)^2 + sigma_d^2),    c_out(t) = tau t / sqrt((tau t)^2 + sigma_d^2),

``sigma_d = 0.5`` and timestep scaling ``tau = 10``. Then ``f(z_0, 0) = z_0`` exactly (``c_skip(0) = 1``,
``c_out(0) = 0``) and for ``t >= 20`` the map is the identity on ``x0_hat`` to within 1e-4. (The official JAX release
multiplies ``c_out`` by ``sigma_d``; that halves the output and is a bug we do not reproduce.)
"""

from __future__ import annotations

import torch

DEFAULT_SIGMA_DATA = 0.5
DEFAULT_TIMESTEP_SCALING = 10.0


def boundary_scalings(t, sigma_data: float = DEFAULT_SIGMA_DATA,
                      timestep_scaling: float = DEFAULT_TIMESTEP_SCALING) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip(t), c_out(t))`` in float64 for timesteps ``t`` (integer or real, scalar or ``[B]``)."""
    if sigma_data <= 0 or timestep_scaling <= 0:
        raise ValueError(f"sigma_data and timestep_scaling must be positive, got {sigma_data}, {timestep_scaling}")
    scaled = torch.as_tensor(t, dtype=torch.float64) * timestep_scaling
    denom = scaled**2 + sigma_data**2
    return sigma_data**2 / denom, scaled / denom.sqrt()


def apply_boundary(z_t: torch.Tensor, x0: torch.Tensor, t, enabled: bool = True,
                   sigma_data: float = DEFAULT_SIGMA_DATA,
                   timestep_scaling: float = DEFAULT_TIMESTEP_SCALING) -> torch.Tensor:
    """``f = c_skip(t) z_t + c_out(t) x0_hat`` (or ``x0_hat`` unchanged when ``enabled`` is false)."""
    if not enabled:
        return x0
    c_skip, c_out = boundary_scalings(t, sigma_data, timestep_scaling)
    shape = (-1,) + (1,) * (x0.ndim - 1) if c_skip.ndim else (1,) * x0.ndim
    c_skip = c_skip.to(device=x0.device, dtype=x0.dtype).reshape(shape)
    c_out = c_out.to(device=x0.device, dtype=x0.dtype).reshape(shape)
    return c_skip * z_t + c_out * x0
