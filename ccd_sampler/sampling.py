"""The few-step CoDi sampler over a denoiser callable, in the style of k-diffusion's ``sampling.py``.

A denoiser is any callable ``denoise_fn(z_t, t, cond) -> model_output`` where ``z_t`` is ``[B, ...]``, ``t`` is an
integer ``[B]`` tensor and the output is an epsilon / v / x prediction (``prediction_type``). One step from ``t`` to
``s < t``:

    out = denoise_fn(z_t, t, c)                     (CFG: out = u + w (c - u), one batched call over [cond, uncond])
    x0, eps = to_x0_eps(out, z_t, alpha_t, sigma_t)
    x0 <- c_skip(t) z_t + c_out(t) x0                (boundary scaling, optional)
    eps <- (z_t - alpha_t x0) / sigma_t              (the noise implied by the scaled x0)
    ode:          z_s = alpha_s x0 + sigma_s eps      (deterministic DDIM, = k-diffusion Euler in sigma space)
    consistency:  z_s = alpha_s x0 + sigma_s xi       (fresh noise xi, = k-diffusion ``sample_lcm``)

Re-deriving ``eps`` from the boundary-scaled ``x0`` changes nothing where the scaling is the identity (``t >= 20``) and
makes the ``ode`` step exactly the Euler step ComfyUI takes with a boundary-patched model. The result is the ``x0`` of
the last step (or ``alpha_0 x0 + sigma_0 eps`` with ``final="z0"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .boundary import DEFAULT_SIGMA_DATA, DEFAULT_TIMESTEP_SCALING, apply_boundary
from .grids import img2img_timesteps, validate_timesteps
from .parameterization import eps_from_x0, to_x0_eps
from .schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
SAMPLER_MODES = ("ode", "consistency")


def batch_conditions(cond: Any, uncond: Any) -> Any:
    """Concatenate two conditioning structures along the batch axis: tensors are ``torch.cat``-ed, dicts, lists and
    tuples are walked, ``None`` stays ``None``; other leaves (strings, numbers) must be equal and are kept."""
    if cond is None and uncond is None:
        return None
    if isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor):
        return torch.cat([cond, uncond], dim=0)
    if isinstance(cond, dict) and isinstance(uncond, dict):
        if cond.keys() != uncond.keys():
            raise ValueError(f"cond and uncond have different keys: {sorted(cond)} vs {sorted(uncond)}")
        return {key: batch_conditions(cond[key], uncond[key]) for key in cond}
    if isinstance(cond, (list, tuple)) and isinstance(uncond, (list, tuple)) and len(cond) == len(uncond):
        return type(cond)(batch_conditions(a, b) for a, b in zip(cond, uncond))
    if type(cond) is type(uncond) and not isinstance(cond, torch.Tensor) and cond == uncond:
        return cond
    raise ValueError(f"cannot batch cond of type {type(cond).__name__} with uncond of type {type(uncond).__name__}")


def guided_output(denoise_fn: Denoiser, z_t: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any = None,
                  cfg: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Classifier-free guidance ``u + w (c - u)`` with the two branches in one batched call.

    ``cfg`` is a float or a per-sample ``[B]`` tensor. With ``uncond is None`` or ``cfg == 1`` (exactly) only the
    conditional branch runs, as in ComfyUI.
    """
    if uncond is None or (not isinstance(cfg, torch.Tensor) and cfg == 1.0):
        return denoise_fn(z_t, t, cond)
    out = denoise_fn(torch.cat([z_t, z_t]), torch.cat([t, t]), batch_conditions(cond, uncond))
    out_c, out_u = out.chunk(2)
    w = torch.as_tensor(cfg, device=out.device, dtype=out.dtype)
    if w.ndim:
        w = w.reshape((-1,) + (1,) * (out.ndim - 1))
    return out_u + w * (out_c - out_u)


def ode_step(x0: torch.Tensor, eps: torch.Tensor, alpha_s: torch.Tensor, sigma_s: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) step to ``s``: ``z_s = alpha_s x0 + sigma_s eps``."""
    return alpha_s * x0 + sigma_s * eps


def consistency_step(x0: torch.Tensor, noise: torch.Tensor, alpha_s: torch.Tensor,
                     sigma_s: torch.Tensor) -> torch.Tensor:
    """LCM / multistep consistency step to ``s``: ``z_s = alpha_s x0 + sigma_s xi`` with fresh noise ``xi``."""
    return alpha_s * x0 + sigma_s * noise


def predict_x0_eps(denoise_fn: Denoiser, z_t: torch.Tensor, t: int, schedule: NoiseSchedule, prediction_type: str,
                   cond: Any = None, uncond: Any = None, cfg: float = 1.0, boundary: bool = True,
                   sigma_data: float = DEFAULT_SIGMA_DATA,
                   timestep_scaling: float = DEFAULT_TIMESTEP_SCALING) -> tuple[torch.Tensor, torch.Tensor]:
    """One (guided) network evaluation at integer timestep ``t``, converted to the boundary-scaled ``x0`` and the
    ``eps`` it implies at ``z_t``."""
    t_batch = torch.full((z_t.shape[0],), int(t), device=z_t.device, dtype=torch.long)
    alpha_t, sigma_t = schedule.alpha_sigma(t_batch, like=z_t)
    out = guided_output(denoise_fn, z_t, t_batch, cond, uncond, cfg).to(z_t.dtype)
    x0, eps = to_x0_eps(out, z_t, alpha_t, sigma_t, prediction_type)
    if boundary:
        x0 = apply_boundary(z_t, x0, t_batch, True, sigma_data, timestep_scaling)
        eps = eps_from_x0(z_t, x0, alpha_t, sigma_t)
    return x0, eps


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Drawn on the generator's device then moved, so a CPU generator gives the same noise on any device.
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device, x.dtype)


@torch.no_grad()
def sample(denoise_fn: Denoiser, noise: torch.Tensor, timesteps: Sequence[int], prediction_type: str,
           schedule: NoiseSchedule | None = None, mode: str = "ode", cond: Any = None, uncond: Any = None,
           cfg: float = 1.0, generator: torch.Generator | None = None,
           callback: Callable[[dict], None] | None = None, boundary: bool = True,
           sigma_data: float = DEFAULT_SIGMA_DATA, timestep_scaling: float = DEFAULT_TIMESTEP_SCALING,
           init_image: torch.Tensor | None = None, strength: float = 1.0, final: str = "x0") -> torch.Tensor:
    """Sample with the CoDi few-step sampler.

    Args:
        denoise_fn: ``denoise_fn(z_t, t, cond) -> model_output``.
        noise: starting Gaussian noise ``[B, ...]`` (its shape and device are the sample's). The state, the
            conversions and the result are float32 (or float64) whatever the noise's and the model's dtypes.
        timesteps: descending evaluation timesteps, e.g. ``codi_timesteps(4, grid=50)``; the last step goes to
            ``t = 0``.
        prediction_type: ``epsilon`` / ``v_prediction`` / ``sample`` (aliases ``eps``, ``v``, ``x``).
        mode: ``ode`` (deterministic) or ``consistency`` (fresh noise from ``generator`` at every intermediate step).
        cond, uncond, cfg: conditioning passed to ``denoise_fn``; ``cfg != 1`` with an ``uncond`` runs guidance.
        callback: called after every step with ``{"i", "t", "s", "z", "x0"}`` (previews, progress bars).
        boundary, sigma_data, timestep_scaling: the consistency boundary scalings (see ``boundary.py``).
        init_image, strength: img2img. Only the last ``round(strength * steps)`` steps run and the start is
            ``z = alpha_t x_init + sigma_t noise`` at the first kept timestep.
        final: ``x0`` returns the clean estimate of the last step; ``z0`` returns ``alpha_0 x0 + sigma_0 eps``
            (bit-parity with pipelines that end on the DDIM step to ``t = 0``).
    """
    if mode not in SAMPLER_MODES:
        raise ValueError(f"unknown sampler mode {mode!r}; expected one of {SAMPLER_MODES}")
    if final not in ("x0", "z0"):
        raise ValueError(f"final must be 'x0' or 'z0', got {final!r}")
    schedule = schedule or NoiseSchedule.stable_diffusion()
    timesteps = validate_timesteps(timesteps, schedule.num_train_timesteps)
    # schedule arithmetic in float32 at least: in half precision x0 at t = 980 loses ~0.04 RMS to rounding
    noise = noise.to(torch.promote_types(noise.dtype, torch.float32))
    z = noise
    if init_image is not None:
        if init_image.shape != noise.shape:
            raise ValueError(f"init_image shape {tuple(init_image.shape)} differs from noise shape "
                             f"{tuple(noise.shape)}")
        timesteps = img2img_timesteps(timesteps, strength)
        alpha, sigma = schedule.alpha_sigma(timesteps[0], like=noise)
        z = alpha * init_image.to(noise.dtype) + sigma * noise
    elif strength != 1.0:
        raise ValueError("strength < 1 needs an init_image")

    x0 = eps = None
    for i, t in enumerate(timesteps):
        s = timesteps[i + 1] if i + 1 < len(timesteps) else 0
        x0, eps = predict_x0_eps(denoise_fn, z, t, schedule, prediction_type, cond, uncond, cfg, boundary,
                                 sigma_data, timestep_scaling)
        alpha_s, sigma_s = schedule.alpha_sigma(s, like=z)
        last = i + 1 == len(timesteps)
        if mode == "ode" or last:
            z = ode_step(x0, eps, alpha_s, sigma_s)
        else:
            z = consistency_step(x0, _randn_like(z, generator), alpha_s, sigma_s)
        if callback is not None:
            callback({"i": i, "t": t, "s": s, "z": z, "x0": x0})
    return x0 if final == "x0" else z
