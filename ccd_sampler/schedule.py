"""Variance-preserving noise schedules on integer timesteps.

A latent ``x`` is noised as ``z_t = alpha_t * x + sigma_t * eps`` with ``alpha_t = sqrt(abar_t)`` and
``sigma_t = sqrt(1 - abar_t)``. Stable Diffusion's DDPM schedule has 1000 steps and "scaled_linear" betas,
``beta_i = linspace(sqrt(0.00085), sqrt(0.012), 1000)_i ** 2`` and ``abar_t = prod_{i<=t} (1 - beta_i)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SD_BETA_START = 0.00085
SD_BETA_END = 0.012
SD_NUM_TRAIN_TIMESTEPS = 1000


def betas_for_schedule(
    schedule: str = "scaled_linear",
    num_train_timesteps: int = SD_NUM_TRAIN_TIMESTEPS,
    beta_start: float = SD_BETA_START,
    beta_end: float = SD_BETA_END,
) -> torch.Tensor:
    """The per-step betas (float64) of a DDPM schedule.

    ``scaled_linear``: ``beta_i = linspace(sqrt(beta_start), sqrt(beta_end), T)_i ** 2`` (Stable Diffusion);
    ``linear``: ``beta_i = linspace(beta_start, beta_end, T)_i``.
    """
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
    if schedule == "scaled_linear":
        return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps, dtype=torch.float64) ** 2
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {schedule!r}; expected 'scaled_linear' or 'linear'")


@dataclass(frozen=True)
class NoiseSchedule:
    """``abar_t`` for integer timesteps ``0 .. T-1`` and the ``(alpha_t, sigma_t)`` derived from it.

    ``alphas_cumprod`` is kept in float64; lookups cast to the dtype and device of the tensor they are used with.
    """

    alphas_cumprod: torch.Tensor

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "NoiseSchedule":
        return cls(torch.cumprod(1.0 - betas.to(torch.float64), dim=0))

    @classmethod
    def stable_diffusion(cls) -> "NoiseSchedule":
        """SD1.x/SD2.x/SDXL: 1000 steps, scaled_linear betas 0.00085 .. 0.012."""
        return cls.from_betas(betas_for_schedule())

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def _check(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        if t.is_floating_point():
            if not torch.equal(t, t.round()):
                raise ValueError(f"timesteps must be integers, got {t.tolist()}")
            t = t.long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps):
            raise ValueError(
                f"timesteps must lie in 0..{self.num_train_timesteps - 1}, got {t.tolist()}"
            )
        return t.long()

    def alpha_sigma(self, t, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` for integer timesteps ``t`` (scalar or shape ``[B]``).

        With ``like`` (a ``[B, ...]`` tensor) the result is cast to its dtype/device and shaped ``[B, 1, 1, ...]`` (or
        ``[1, 1, ...]`` for a scalar ``t``) so it broadcasts against it.
        """
        t = self._check(t)
        abar = self.alphas_cumprod[t.cpu()]
        alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
        if like is not None:
            shape = (-1,) + (1,) * (like.ndim - 1) if t.ndim else (1,) * like.ndim
            alpha = alpha.to(device=like.device, dtype=like.dtype).reshape(shape)
            sigma = sigma.to(device=like.device, dtype=like.dtype).reshape(shape)
        return alpha, sigma

    def snr(self, t) -> torch.Tensor:
        """Signal-to-noise ratio ``alpha_t^2 / sigma_t^2`` (float64)."""
        abar = self.alphas_cumprod[self._check(t).cpu()]
        return abar / (1.0 - abar)

    def sigma_karras(self, t) -> torch.Tensor:
        """The k-diffusion / ComfyUI noise level ``sigma_t / alpha_t`` (float64): ``x = x0 + sigma * eps``."""
        abar = self.alphas_cumprod[self._check(t).cpu()]
        return ((1.0 - abar) / abar).sqrt()
