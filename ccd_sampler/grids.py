"""Timestep grids for few-step sampling.

CoDi trains on the grid ``[k(N-1), ..., k, 0]`` with ``k = T // N`` (``T = 1000`` training steps, ``N`` the distillation
grid). A sampler with ``steps`` steps takes that descending grid with stride ``ceil(N / steps)``:

    N = 50:  1 -> [980]   2 -> [980, 480]   4 -> [980, 720, 460, 200]   8 -> [980, 840, ..., 140, 0]

Every list returned here is the descending list of timesteps at which the network is evaluated; the sampler then steps
from each to the next and from the last to ``t = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .schedule import SD_NUM_TRAIN_TIMESTEPS

MAX_STEPS = 8  # CoDi is a 1-8 step sampler: the hosts (ComfyUI nodes, web-UI panel) refuse more


def distill_grid(grid: int, num_train_timesteps: int = SD_NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The full descending CoDi grid ``[k(N-1), ..., k, 0]`` with ``k = T // N``."""
    if not isinstance(grid, int) or isinstance(grid, bool) or not 2 <= grid <= num_train_timesteps:
        raise ValueError(f"the distillation grid N must be an integer in 2..{num_train_timesteps}, got {grid!r}")
    k = num_train_timesteps // grid
    return [k * i for i in range(grid - 1, -1, -1)]


def codi_timesteps(steps: int, grid: int = 50, num_train_timesteps: int = SD_NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The ``steps`` timesteps of the CoDi grid used by a ``steps``-step sampler (stride ``ceil(N / steps)``)."""
    full = distill_grid(grid, num_train_timesteps)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= grid:
        raise ValueError(f"steps must be an integer in 1..{grid} for a grid of N={grid}, got {steps!r}")
    stride = math.ceil(grid / steps)
    timesteps = full[::stride]
    if len(timesteps) != steps:
        # ceil(N / steps) * (steps - 1) >= N for some (N, steps): the strided grid then has fewer points.
        raise ValueError(
            f"a grid of N={grid} cannot be split into {steps} steps with stride ceil(N/steps)={stride} "
            f"(only {len(timesteps)} points: {timesteps}); pick another step count"
        )
    return timesteps


def even_timesteps(steps: int, t_max: int = SD_NUM_TRAIN_TIMESTEPS - 1, t_min: int = 0) -> list[int]:
    """``steps`` evenly spaced integer timesteps from ``t_max`` down to ``t_min`` (inclusive; rounded)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not 0 <= t_min <= t_max:
        raise ValueError(f"need 0 <= t_min <= t_max, got t_min={t_min}, t_max={t_max}")
    if steps == 1:
        return [t_max]
    points = [round(t_max - i * (t_max - t_min) / (steps - 1)) for i in range(steps)]
    return validate_timesteps(points, num_train_timesteps=t_max + 1)


def validate_timesteps(timesteps: Sequence[int], num_train_timesteps: int = SD_NUM_TRAIN_TIMESTEPS) -> list[int]:
    """Check a custom list: non-empty integers in ``0..T-1``, strictly descending. Returns it as a list of ints."""
    values = list(timesteps)
    if not values:
        raise ValueError("the timestep list is empty")
    if any(not float(v).is_integer() for v in values):
        raise ValueError(f"timesteps must be integers, got {values}")
    values = [int(v) for v in values]
    if min(values) < 0 or max(values) >= num_train_timesteps:
        raise ValueError(f"timesteps must lie in 0..{num_train_timesteps - 1}, got {values}")
    if any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(f"timesteps must be strictly descending, got {values}")
    return values


def img2img_timesteps(timesteps: Sequence[int], strength: float) -> list[int]:
    """Keep the tail of a schedule for an img2img start: the last ``round(strength * len)`` timesteps (at least one).

    ``strength = 1`` keeps every step (pure noise start); ``strength -> 0`` keeps only the final step.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    values = list(timesteps)
    keep = max(1, round(strength * len(values)))
    return values[len(values) - keep:]
