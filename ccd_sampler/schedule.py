"""Variance-preserving noise schedules on integer timesteps.

A latent ``x`` is noised as ``z_t = alpha_t * x + sigma_t * eps`` with ``alpha_t = sqrt(abar_t)`` and
``sigma_t = sqrt(1 - abar_t)``. Stable Diffusion's DDPM schedule has 1000 steps and "scaled_linear" betas,
``beta_i = linspace(sqrt(0.00085), sqrt(0.012), 1000)_i ** 2`` and ``abar_t = prod_{i<=t} (1 - beta_i)``.

Zero terminal SNR (Lin et al., "Common Diffusion Noise Schedules and Sample Steps Are Flawed", 2024): SD's schedule
ends at ``alpha_999 = 0.068``, so the last training step still shows the model some signal and a sampler that starts
from pure noise at ``t = 999`` asks it something it never saw. The rescaled schedule shifts and scales
``sqrt(abar_t)`` so that it keeps its first value and ends at exactly 0:
``sqrt(abar_t) <- (sqrt(abar_t) - sqrt(abar_T)) * sqrt(abar_0) / (sqrt(abar_0) - sqrt(abar_T))``. At ``t = T - 1``
then ``alpha = 0``, ``sigma = 1``: only v- (or x-) prediction models can be trained on it.
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


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``abar_t`` rescaled so that ``sqrt(abar)`` keeps its first value and ends at exactly 0 (float64)."""
    root = alphas_cumprod.to(torch.float64).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    return ((root - last) * first / (first - last)) ** 2


@dataclass(frozen=True)
class NoiseSchedule:
    """``abar_t`` for integer timesteps ``0 .. T-1`` and the ``(alpha_t, sigma_t)`` derived from it.

    ``alphas_cumprod`` is kept in float64; lookups cast to the dtype and device of the tensor they are used with.
    """

    alphas_cumprod: torch.Tensor

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> NoiseSchedule:
        return cls(torch.cumprod(1.0 - betas.to(torch.float64), dim=0))

    @classmethod
    def from_config(cls, config: dict | None = None) -> NoiseSchedule:
        """The schedule of a diffusers-style scheduler config (``beta_schedule``, ``num_train_timesteps``,
        ``beta_start``, ``beta_end``, ``rescale_betas_zero_snr``); missing keys take Stable Diffusion's values."""
        config = config or {}
        betas = betas_for_schedule(config.get("beta_schedule", "scaled_linear"),
                                   int(config.get("num_train_timesteps", SD_NUM_TRAIN_TIMESTEPS)),
                                   float(config.get("beta_start", SD_BETA_START)),
                                   float(config.get("beta_end", SD_BETA_END)))
        schedule = cls.from_betas(betas)
        if config.get("rescale_betas_zero_snr"):
            schedule = cls(rescale_zero_terminal_snr(schedule.alphas_cumprod))
        return schedule

    @property
    def zero_terminal_snr(self) -> bool:
        """Whether the last timestep carries no signal at all (``alpha_{T-1} = 0``)."""
        return bool(self.alphas_cumprod[-1] == 0)

    @classmethod
    def stable_diffusion(cls) -> NoiseSchedule:
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
