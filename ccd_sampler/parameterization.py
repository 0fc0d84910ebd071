"""Conversions between a network's raw output and the clean/noise predictions ``(x0_hat, eps_hat)``.

With ``z_t = alpha_t x + sigma_t eps`` (``alpha^2 + sigma^2 = 1``):

- ``epsilon``:       ``eps_hat = out``,  ``x0_hat = (z_t - sigma_t eps_hat) / alpha_t``
- ``v_prediction``:  ``x0_hat = alpha_t z_t - sigma_t v``,  ``eps_hat = alpha_t v + sigma_t z_t``
- ``sample`` (x):    ``x0_hat = out``,  ``eps_hat = (z_t - alpha_t x0_hat) / sigma_t``
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_ALIASES = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction",
            "x": "sample", "x0": "sample", "sample": "sample"}


def normalize_prediction_type(prediction_type: str) -> str:
    """Map the accepted spellings (``eps``/``epsilon``, ``v``/``v_prediction``, ``x``/``x0``/``sample``) to the
    diffusers names used throughout the project."""
    try:
        return _ALIASES[prediction_type]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown prediction type {prediction_type!r}; expected one of {sorted(_ALIASES)}"
        ) from None


def to_x0_eps(model_output: torch.Tensor, z_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
              prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0_hat, eps_hat)`` from the raw network output at ``(z_t, t)``; ``alpha``/``sigma`` broadcast against
    ``z_t``."""
    kind = normalize_prediction_type(prediction_type)
    if kind == "epsilon":
        eps = model_output
        return (z_t - sigma * eps) / alpha, eps
    if kind == "v_prediction":
        v = model_output
        return alpha * z_t - sigma * v, alpha * v + sigma * z_t
    x0 = model_output
    return x0, (z_t - alpha * x0) / sigma


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                prediction_type: str) -> torch.Tensor:
    """The raw network output that corresponds to ``(x0, eps)``: ``eps``, ``v = alpha eps - sigma x0`` or ``x0``."""
    kind = normalize_prediction_type(prediction_type)
    if kind == "epsilon":
        return eps
    if kind == "v_prediction":
        return alpha * eps - sigma * x0
    return x0


def eps_from_x0(z_t: torch.Tensor, x0: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The noise implied by a clean estimate at ``z_t``: ``eps = (z_t - alpha_t x0) / sigma_t``."""
    return (z_t - alpha * x0) / sigma
