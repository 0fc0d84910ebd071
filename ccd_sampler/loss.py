"""The CoDi training loss for one batch (``docs/algorithm.md``, "One training step").

Models are callables ``fn(z_t, t, cond) -> model_output`` (``fn(z_t, t, cond, w)`` in ``guidance_mode="distill"``,
with ``w`` a ``[B]`` tensor of guidance scales). For a batch ``x`` with condition ``cond``:

    1. t = i k, s = (i - 1) k,  i ~ U{1, ..., N-1},  k = T // N     (one i for the batch, or one per sample)
    2. z_t = alpha_t x + sigma_t eps
    3. (no grad) x0, eps_hat = ODE model at (z_t, t);   z_s = alpha_s x0 + sigma_s e   (e = eps_hat, or the true eps)
    4. (no grad) f_target = c_skip(s) z_s + c_out(s) x0_target(z_s, s)          (target = EMA model)
    5.           f        = c_skip(t) z_t + c_out(t) x0_online(z_t, t)
    6. loss = d(f, f_target) + lambda * ||f - x||^2

``d`` is the mean squared error of the noises ``f`` and ``f_target`` imply, ``(z_t - alpha_t f) / sigma_t`` and
``(z_s - alpha_s f_target) / sigma_s`` (``consistency_space="eps"``, the default: the paper's noise
self-consistency), or of ``f`` and ``f_target`` themselves (``"x"``). CFG-aware distillation
(``guidance_mode="cfg"``) draws ``w ~ U[w_min, w_max]`` per sample and uses ``u + w (c - u)`` in steps 4 and 5; the
one-step ODE never uses guidance. ``guidance_mode="distill"`` trains a ``w``-conditioned online model, one branch,
to match the target's guided output (the target's two branches get the neutral ``w = 1``), so the sampler can run at
cfg 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .boundary import DEFAULT_SIGMA_DATA, DEFAULT_TIMESTEP_SCALING, apply_boundary
from .parameterization import eps_from_x0, normalize_prediction_type, to_x0_eps
from .sampling import guided_output
from .schedule import NoiseSchedule

ODE_MODELS = ("ema", "base", "online", "teacher")
EPS_SOURCES = ("ddim", "true")
CONSISTENCY_SPACES = ("x", "eps")
GUIDANCE_MODES = ("none", "cfg", "distill")
MIN_SNR_WEIGHTINGS = ("truncated", "x_space")


@dataclass
class CoDiLossConfig:
    """Every knob of the training step (``docs/algorithm.md``, steps 1-7), with the defaults stated there."""

    prediction_type: str = "epsilon"
    distill_grid: int = 50
    shared_timestep: bool = True
    ode_model: str = "ema"
    eps_source: str = "ddim"
    consistency_space: str = "eps"
    guidance_weight: float = 1.0
    min_snr_gamma: float | None = None
    min_snr_weighting: str = "truncated"
    boundary: bool = True
    sigma_data: float = DEFAULT_SIGMA_DATA
    timestep_scaling: float = DEFAULT_TIMESTEP_SCALING
    guidance_mode: str = "none"
    cfg_range: tuple[float, float] = field(default=(2.0, 8.0))

    def __post_init__(self):
        self.prediction_type = normalize_prediction_type(self.prediction_type)
        for name, value, allowed in (("ode_model", self.ode_model, ODE_MODELS),
                                     ("eps_source", self.eps_source, EPS_SOURCES),
                                     ("consistency_space", self.consistency_space, CONSISTENCY_SPACES),
                                     ("guidance_mode", self.guidance_mode, GUIDANCE_MODES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not isinstance(self.distill_grid, int) or not 2 <= self.distill_grid <= 1000:
            raise ValueError(f"distill_grid must be an integer in 2..1000, got {self.distill_grid!r}")
        if self.guidance_weight < 0:
            raise ValueError(f"guidance_weight must be >= 0, got {self.guidance_weight}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive, got {self.min_snr_gamma}")
        if self.min_snr_weighting not in MIN_SNR_WEIGHTINGS:
            raise ValueError(f"min_snr_weighting must be one of {MIN_SNR_WEIGHTINGS}, got {self.min_snr_weighting!r}")
        w_min, w_max = (float(v) for v in self.cfg_range)
        if not 1.0 <= w_min <= w_max:
            raise ValueError(f"cfg_range must satisfy 1 <= w_min <= w_max, got {self.cfg_range}")
        self.cfg_range = (w_min, w_max)


def draw_timesteps(batch_size: int, grid: int, shared: bool, num_train_timesteps: int = 1000,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, s)`` as ``[B]`` long tensors on the grid: ``t = i k``, ``s = (i - 1) k``, ``i ~ U{1..N-1}``.

    Index 0 is never drawn (it would give ``t = s = 0``, ``c_out = 0`` and no gradient).
    """
    k = num_train_timesteps // grid
    n = 1 if shared else batch_size
    device = generator.device if generator is not None else "cpu"
    i = torch.randint(1, grid, (n,), generator=generator, device=device).cpu().expand(batch_size)
    return i * k, (i - 1) * k


def _call(fn: Callable, z: torch.Tensor, t: torch.Tensor, cond: Any, w: torch.Tensor | None) -> torch.Tensor:
    return fn(z, t, cond) if w is None else fn(z, t, cond, w)


def _guided(fn: Callable, z: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any, w: torch.Tensor,
            neutral_w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u + w (c - u), c)`` in float32 (:func:`~ccd_sampler.sampling.guided_output`; the adapter and condition image
    apply to both branches); a ``w``-conditioned model gets ``neutral_w`` on both branches."""
    call = fn
    if neutral_w is not None:
        both = torch.cat([neutral_w, neutral_w])
        call = lambda zz, tt, cc: fn(zz, tt, cc, both)
    branches = {}

    def recording(zz, tt, cc):
        out = call(zz, tt, cc).to(zz.dtype)
        branches["cond"] = out.chunk(2)[0]
        return out

    guided = guided_output(recording, z, t, cond, uncond, w)
    return guided, branches["cond"]


def codi_loss(online: Callable, target: Callable, x: torch.Tensor, cond: Any, config: CoDiLossConfig,
              schedule: NoiseSchedule | None = None, base: Callable | None = None, uncond: Any = None,
              generator: torch.Generator | None = None, teacher: Callable | None = None,
              timestep_generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """The CoDi loss of one batch and its diagnostics.

    Args:
        online: the trainable model (base + adapter psi); the only call that keeps a graph.
        target: the EMA model (base + psi^-), called under ``no_grad``.
        x: clean latents ``[B, ...]``.
        cond: conditioning for the callables (e.g. ``{"text": ..., "hint": ...}``).
        config: :class:`CoDiLossConfig`.
        base: the frozen base without adapter, needed for ``ode_model="base"``.
        teacher: a frozen conditional model (base + a fixed, already trained adapter), needed for
            ``ode_model="teacher"``: with ``guidance_weight=0`` this is LCM-style consistency distillation of that
            teacher (the two-stage baseline: fine-tune a ControlNet, then distill it).
        uncond: the empty-text conditioning (same structure as ``cond``) for ``guidance_mode`` ``cfg``/``distill``.
        generator: draws ``t``, the noise and ``w`` (so a seeded run is reproducible).
        timestep_generator: draws ``t`` instead, when given: several processes training one model with a shared
            ``t`` seed it alike while their noise differs.

    Returns:
        ``(loss, diagnostics)``: a scalar loss with a graph through ``online``; diagnostics hold detached floats
        ``loss_consistency``, ``loss_guidance``, the drawn ``t`` / ``s`` (lists) and ``w`` (list or ``None``).
    """
    schedule = schedule or NoiseSchedule.stable_diffusion()
    batch = x.shape[0]
    if config.guidance_mode != "none" and uncond is None:
        raise ValueError(f"guidance_mode={config.guidance_mode!r} needs the empty-text conditioning `uncond`")
    if config.ode_model == "base" and base is None:
        raise ValueError("ode_model='base' needs the frozen base model callable `base`")
    if config.ode_model == "teacher" and teacher is None:
        raise ValueError("ode_model='teacher' needs the frozen teacher model callable `teacher`")

    t, s = draw_timesteps(batch, config.distill_grid, config.shared_timestep, schedule.num_train_timesteps,
                          timestep_generator or generator)
    t, s = t.to(x.device), s.to(x.device)
    gen_device = generator.device if generator is not None else x.device
    # The schedule arithmetic, the conversions and the loss run in float32 (float64 stays float64) whatever dtype
    # the models use: in bf16 the rounding of z_t alone costs x0 an RMS error of 0.04 at t = 980. The models cast
    # their inputs themselves (autocast).
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    eps = torch.randn(x.shape, generator=generator, device=gen_device, dtype=torch.float32).to(x.device, x.dtype)
    w = None
    if config.guidance_mode != "none":
        w_min, w_max = config.cfg_range
        w = w_min + (w_max - w_min) * torch.rand(batch, generator=generator, device=gen_device).to(x.device)
    distill = config.guidance_mode == "distill"
    neutral = torch.ones(batch, device=x.device) if distill else None

    alpha_t, sigma_t = schedule.alpha_sigma(t, like=x)
    alpha_s, sigma_s = schedule.alpha_sigma(s, like=x)
    z_t = alpha_t * x + sigma_t * eps

    with torch.no_grad():
        # 3. One-step PF-ODE to s, never guided (the authors report gradient blow-ups with CFG here).
        ode_fn = {"ema": target, "base": base, "online": online, "teacher": teacher}[config.ode_model]
        plain_call = config.ode_model in ("base", "teacher") or not distill
        ode_out = (ode_fn(z_t, t, cond) if plain_call else ode_fn(z_t, t, cond, neutral)).to(x.dtype)
        x0_ode, eps_ode = to_x0_eps(ode_out, z_t, alpha_t, sigma_t, config.prediction_type)
        z_s = alpha_s * x0_ode + sigma_s * (eps_ode if config.eps_source == "ddim" else eps)

        # 4. Target at (z_s, s) from the EMA model.
        if config.guidance_mode == "none":
            target_out = target(z_s, s, cond).to(x.dtype)
        else:
            target_out, _ = _guided(target, z_s, s, cond, uncond, w, neutral)
        x0_target, _ = to_x0_eps(target_out, z_s, alpha_s, sigma_s, config.prediction_type)
        f_target = apply_boundary(z_s, x0_target, s, config.boundary, config.sigma_data, config.timestep_scaling)

    # 5. Online prediction at (z_t, t), with gradient. With CFG the consistency term compares guided outputs, but
    # the regression to x acts on the conditional branch alone: on the guided output u + w (c - u) its expectation
    # over w would contain E[w^2] |c - u|^2 and drive c - u, the guidance itself, to zero.
    if config.guidance_mode == "none":
        online_out = online_cond = online(z_t, t, cond).to(x.dtype)
    elif distill:
        online_out = online_cond = online(z_t, t, cond, w).to(x.dtype)
    else:
        online_out, online_cond = _guided(online, z_t, t, cond, uncond, w, None)
    x0_online, _ = to_x0_eps(online_out, z_t, alpha_t, sigma_t, config.prediction_type)
    f = apply_boundary(z_t, x0_online, t, config.boundary, config.sigma_data, config.timestep_scaling)
    f_cond = f
    if online_cond is not online_out:
        x0_cond, _ = to_x0_eps(online_cond, z_t, alpha_t, sigma_t, config.prediction_type)
        f_cond = apply_boundary(z_t, x0_cond, t, config.boundary, config.sigma_data, config.timestep_scaling)

    # 6. Consistency term (+ optional Min-SNR-gamma weight) and conditional-guidance regression.
    reduce_dims = tuple(range(1, x.ndim))
    x_distance = (f - f_target).pow(2).mean(dim=reduce_dims)
    eps_space = config.consistency_space == "eps"
    if eps_space:
        # At s = 0 the boundary scaling makes f^- = z_s itself, whose implied noise is ~0, not a noise: there the
        # noise distance would teach the model not to denoise, so those samples use the x-space distance.
        eps_distance = (eps_from_x0(z_t, f, alpha_t, sigma_t)
                        - eps_from_x0(z_s, f_target, alpha_s, sigma_s)).pow(2).mean(dim=reduce_dims)
        per_sample = torch.where(s == 0, x_distance, eps_distance)
    else:
        per_sample = x_distance
    if config.min_snr_gamma is not None:
        space = ["eps" if eps_space and int(si) != 0 else "x" for si in s.tolist()]
        weight = min_snr_weight(schedule, t, config.min_snr_gamma, space, config.min_snr_weighting)
        per_sample = per_sample * weight.to(x.device)
    loss_consistency = per_sample.mean()
    loss_guidance = (f_cond - x).pow(2).mean()
    loss = loss_consistency + config.guidance_weight * loss_guidance

    diagnostics = {
        "loss_consistency": float(loss_consistency.detach()),
        "loss_guidance": float(loss_guidance.detach()),
        "t": t.tolist(),
        "s": s.tolist(),
        "w": None if w is None else w.tolist(),
    }
    return loss, diagnostics


def diffusion_loss(online: Callable, x: torch.Tensor, cond: Any, schedule: NoiseSchedule | None = None,
                   prediction_type: str = "epsilon", generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The plain denoising loss of a conditional fine-tune (what ControlNet trains with), for comparison with CoDi.

        t ~ U{0, ..., T-1} per sample,   z_t = alpha_t x + sigma_t eps,
        loss = || model(z_t, t, c) - y ||^2,   y = eps (epsilon), alpha_t eps - sigma_t x (v) or x (sample)

    i.e. the model's own training target for its prediction type. ``online`` keeps the graph; the diagnostics mirror
    :func:`codi_loss` (``loss_consistency`` 0, ``loss_guidance`` = the denoising loss, the drawn ``t``).
    """
    schedule = schedule or NoiseSchedule.stable_diffusion()
    prediction_type = normalize_prediction_type(prediction_type)
    batch = x.shape[0]
    gen_device = generator.device if generator is not None else x.device
    t = torch.randint(0, schedule.num_train_timesteps, (batch,), generator=generator, device=gen_device).to(x.device)
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # schedule arithmetic and loss in float32 at least
    eps = torch.randn(x.shape, generator=generator, device=gen_device, dtype=torch.float32).to(x.device, x.dtype)
    alpha_t, sigma_t = schedule.alpha_sigma(t, like=x)
    z_t = alpha_t * x + sigma_t * eps
    target = {"epsilon": eps, "v_prediction": alpha_t * eps - sigma_t * x, "sample": x}[prediction_type]
    loss = (online(z_t, t, cond).to(x.dtype) - target).pow(2).mean()
    return loss, {"loss_consistency": 0.0, "loss_guidance": float(loss.detach()), "t": t.tolist(), "s": None,
                  "w": None}


def min_snr_weight(schedule: NoiseSchedule, t: torch.Tensor, gamma: float, space, weighting: str = "x_space"
                   ) -> torch.Tensor:
    """Min-SNR-gamma weights ``[B]`` (float32) for a loss computed in ``space`` (``"x"`` or ``"eps"``, or one of them
    per sample).

    ``truncated`` (the CoDi reference code's choice): ``min(SNR, gamma) / SNR`` times the loss as computed -- in
    x-space that keeps the high-noise steps (weight 1 where SNR < gamma) and damps the low-noise ones, which 1-4-step
    sampling needs least. ``x_space`` (Hang et al.'s Min-SNR-gamma): an effective x-space weight ``min(SNR, gamma)``,
    i.e. ``min(SNR, gamma)`` on an x-space loss and ``min(SNR, gamma) / SNR`` on an eps-space one; it nearly ignores
    the high-noise steps (0.0059 at t = 980 for SD's schedule).
    """
    if weighting not in MIN_SNR_WEIGHTINGS:
        raise ValueError(f"unknown min-SNR weighting {weighting!r}; one of {MIN_SNR_WEIGHTINGS}")
    snr = schedule.snr(t.cpu())
    clipped = snr.clamp(max=gamma)
    truncated = torch.where(snr < gamma, torch.ones_like(snr), gamma / snr)  # = min(SNR, gamma) / SNR, finite at 0
    spaces = [space] * len(snr) if isinstance(space, str) else list(space)
    if weighting == "truncated":
        return truncated.float()
    return torch.stack([c if sp == "x" else tr for c, tr, sp in zip(clipped, truncated, spaces)]).float()
