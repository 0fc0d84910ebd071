"""Closed-form helpers for the analytic ("Layer A") tests: Gaussian / Gaussian-mixture data in low dimension, whose
noised marginals, exact denoisers, exact PF-ODE flow (single Gaussian) and exact conditional posteriors are known.

Everything is float64. Notation (``docs/algorithm.md``): ``z_t = alpha_t x + sigma_t eps``, ``eps ~ N(0, I)``.

Gaussian mixture ``p(x) = sum_j pi_j N(x; m_j, P_j)``. Under the VP noising

    z_t | j ~ N(alpha m_j, C_j),            C_j = alpha^2 P_j + sigma^2 I
    E[x | z_t, j] = m_j + alpha P_j C_j^{-1} (z_t - alpha m_j)
    r_j(z_t) = pi_j N(z_t; alpha m_j, C_j) / sum_l pi_l N(z_t; alpha m_l, C_l)     (responsibilities)
    E[x | z_t] = sum_j r_j(z_t) E[x | z_t, j]
    eps_hat(z_t) = E[eps | z_t] = (z_t - alpha E[x | z_t]) / sigma

(a single Gaussian is the ``K = 1`` case). A noisy observation ``c = x + s n`` (``n ~ N(0, I)``) gives the posterior

    p(x | c) = sum_j w_j(c) N(x; m'_j, P'_j),   P'_j = (P_j^{-1} + I / s^2)^{-1},
    m'_j = P'_j (P_j^{-1} m_j + c / s^2),      w_j(c) ∝ pi_j N(c; m_j, P_j + s^2 I)

which is again a mixture, so the exact *conditional* denoiser ``E[x | z_t, c]`` is the mixture formula above with the
per-condition parameters ``(w(c), m'(c), P'(c))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ccd_sampler import NoiseSchedule, from_x0_eps

F64 = torch.float64


@dataclass
class Mixture:
    """A Gaussian mixture with (optionally per-sample) parameters.

    ``weights [..., K]``, ``means [..., K, D]``, ``covs [..., K, D, D]``; a leading batch axis ``B`` means one mixture
    per sample (e.g. one posterior per condition).
    """

    weights: torch.Tensor
    means: torch.Tensor
    covs: torch.Tensor

    def __post_init__(self):
        self.weights = torch.as_tensor(self.weights, dtype=F64)
        self.means = torch.as_tensor(self.means, dtype=F64)
        self.covs = torch.as_tensor(self.covs, dtype=F64)
        self.weights = self.weights / self.weights.sum(-1, keepdim=True)

    @property
    def dim(self) -> int:
        return int(self.means.shape[-1])

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact mean ``sum_j pi_j m_j`` and covariance ``sum_j pi_j (P_j + m_j m_j^T) - mean mean^T``."""
        w = self.weights[..., None]
        mean = (w * self.means).sum(-2)
        second = (w[..., None] * (self.covs + self.means[..., :, None] * self.means[..., None, :])).sum(-3)
        return mean, second - mean[..., :, None] * mean[..., None, :]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` exact samples ``[n, D]`` (for per-sample parameters, ``n`` must equal the batch size)."""
        batched = self.weights.ndim == 2
        weights = self.weights if batched else self.weights.expand(n, -1)
        j = torch.multinomial(weights, 1, generator=generator).squeeze(-1)                       # [n]
        means = self.means[torch.arange(n), j] if batched else self.means[j]
        covs = self.covs[torch.arange(n), j] if batched else self.covs[j]
        noise = torch.randn(n, self.dim, generator=generator, dtype=F64)
        return means + (torch.linalg.cholesky(covs) @ noise[..., None]).squeeze(-1)

    def posterior_mean(self, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``E[x | z_t]`` for ``z [B, D]`` and per-sample ``alpha, sigma`` (``[B]`` or ``[B, 1]``), see module doc."""
        z = z.to(F64)
        alpha = alpha.to(F64).reshape(-1, 1, 1)                                                  # [B, 1, 1]
        sigma = sigma.to(F64).reshape(-1, 1, 1)
        eye = torch.eye(self.dim, dtype=F64)
        covs_z = alpha[..., None] ** 2 * self.covs + sigma[..., None] ** 2 * eye                  # [B, K, D, D]
        diff = z[:, None, :] - alpha * self.means                                               # [B, K, D]
        solved = torch.linalg.solve(covs_z, diff[..., None]).squeeze(-1)                        # C^-1 (z - a m)
        log_r = (torch.log(self.weights) - 0.5 * torch.logdet(covs_z) - 0.5 * (diff * solved).sum(-1))
        r = torch.softmax(log_r, dim=-1)                                                        # [B, K]
        cond_means = self.means + alpha * (self.covs @ solved[..., None]).squeeze(-1)           # [B, K, D]
        return (r[..., None] * cond_means).sum(-2)

    def observe(self, c: torch.Tensor, obs_std: float) -> Mixture:
        """The exact posterior ``p(x | c)`` for ``c = x + obs_std * n`` (one mixture per row of ``c [B, D]``)."""
        c = c.to(F64)
        eye = torch.eye(self.dim, dtype=F64)
        prec = torch.linalg.inv(self.covs) + eye / obs_std**2                                    # [K, D, D]
        post_covs = torch.linalg.inv(prec)
        rhs = (torch.linalg.inv(self.covs) @ self.means[..., None]).squeeze(-1)                  # [K, D]
        post_means = (post_covs @ (rhs[None] + c[:, None, :] / obs_std**2)[..., None]).squeeze(-1)  # [B, K, D]
        marg = self.covs + obs_std**2 * eye                                                     # [K, D, D]
        diff = c[:, None, :] - self.means[None]                                                 # [B, K, D]
        quad = (diff * torch.linalg.solve(marg, diff[..., None]).squeeze(-1)).sum(-1)
        log_w = torch.log(self.weights) - 0.5 * torch.logdet(marg) - 0.5 * quad
        return Mixture(torch.softmax(log_w, -1), post_means, post_covs.expand(c.shape[0], -1, -1, -1))

    def select(self, index: torch.Tensor) -> Mixture:
        """Rows ``index`` of a per-sample mixture."""
        return Mixture(self.weights[index], self.means[index], self.covs[index])


def exact_denoiser(mixture: Mixture, schedule: NoiseSchedule, prediction_type: str = "epsilon",
                   conditional: bool = False):
    """``denoise_fn(z, t, cond)`` returning the exact ``eps``/``v``/``x`` prediction (float64) for the mixture.

    With ``conditional=True`` ``cond`` is a per-sample :class:`Mixture` (the posterior of each row) and the result is
    the exact conditional predictor; otherwise ``cond`` is ignored.
    """

    def denoise_fn(z: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        mix = cond if conditional else mixture
        alpha, sigma = schedule.alpha_sigma(t, like=z.to(F64))                                  # [B, 1]
        if alpha.shape[0] != z.shape[0]:
            alpha, sigma = alpha.expand(z.shape[0], 1), sigma.expand(z.shape[0], 1)
        x0 = mix.posterior_mean(z, alpha, sigma)
        eps = (z.to(F64) - alpha * x0) / sigma
        return from_x0_eps(x0, eps, alpha, sigma, prediction_type).to(z.dtype)

    return denoise_fn


def sd_alphas_cumprod() -> torch.Tensor:
    """SD's ``abar_t`` recomputed here (independently of ``ccd_sampler``): ``beta_i = linspace(sqrt(0.00085),
    sqrt(0.012), 1000)_i^2``, ``abar_t = prod_{i<=t} (1 - beta_i)``."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2
    return torch.cumprod(1.0 - betas, 0)


_ABAR = sd_alphas_cumprod()


def alpha_sigma(t: int) -> tuple[float, float]:
    """``(alpha_t, sigma_t)`` of SD's schedule as Python floats (from :func:`sd_alphas_cumprod`)."""
    abar = float(_ABAR[t])
    return abar**0.5, (1.0 - abar) ** 0.5


def lcm_scalings(t: float, sigma_data: float = 0.5, tau: float = 10.0) -> tuple[float, float]:
    """``c_skip = sd^2 / ((tau t)^2 + sd^2)``, ``c_out = tau t / sqrt((tau t)^2 + sd^2)`` (``docs/algorithm.md``)."""
    u = tau * t
    return sigma_data**2 / (u**2 + sigma_data**2), u / (u**2 + sigma_data**2) ** 0.5


def gaussian_denoiser_affine(mu: torch.Tensor, cov: torch.Tensor, t: int, boundary: bool = False):
    """The exact (boundary-scaled) clean estimate of ``N(mu, cov)`` data as an affine map ``x0 = F z_t + h``:

        E[x | z_t] = mu + G (z_t - alpha mu),  G = alpha cov (alpha^2 cov + sigma^2 I)^{-1};
        with the boundary: c_skip z_t + c_out E[x | z_t]  ->  F = c_skip I + c_out G,  h = c_out (mu - alpha G mu).
    """
    a, s = alpha_sigma(t)
    eye = torch.eye(mu.shape[0], dtype=F64)
    gain = a * cov @ torch.linalg.inv(a * a * cov + s * s * eye)
    shift = mu - a * gain @ mu
    c_skip, c_out = lcm_scalings(t) if boundary else (0.0, 1.0)
    return c_skip * eye + c_out * gain, c_out * shift


def ddim_step_affine(t: int, s: int, x0_map):
    """The deterministic DDIM step ``z_s = alpha_s x0 + sigma_s (z_t - alpha_t x0) / sigma_t`` for ``x0 = F z + h``,
    as an affine map ``z_s = D z_t + e``."""
    (a_t, s_t), (a_s, s_s) = alpha_sigma(t), alpha_sigma(s)
    f_mat, h = x0_map
    k = a_s - s_s * a_t / s_t
    return k * f_mat + (s_s / s_t) * torch.eye(f_mat.shape[0], dtype=F64), k * h


def gaussian_ddim_sampler_affine(mu: torch.Tensor, cov: torch.Tensor, timesteps, boundary: bool = True):
    """Closed form of the whole ``ode``-mode sampler with the exact denoiser of ``N(mu, cov)``: every step is affine,
    so the output (``x0`` of the last step) is ``A z_start + b``. Returns ``(A, b)``."""
    dim = mu.shape[0]
    a_tot, b_tot = torch.eye(dim, dtype=F64), torch.zeros(dim, dtype=F64)
    for i, t in enumerate(timesteps):
        x0_map = gaussian_denoiser_affine(mu, cov, t, boundary)
        if i + 1 == len(timesteps):
            f_mat, h = x0_map
            return f_mat @ a_tot, f_mat @ b_tot + h
        d_mat, e = ddim_step_affine(t, timesteps[i + 1], x0_map)
        a_tot, b_tot = d_mat @ a_tot, d_mat @ b_tot + e
    raise ValueError("empty timesteps")


def gaussian_flow_matrix(cov: torch.Tensor, t: int, s: int) -> torch.Tensor:
    """The exact PF-ODE flow of ``N(mu, cov)`` data from ``t`` to ``s``: ``z_s - alpha_s mu = M (z_t - alpha_t mu)``,

        M = Q diag( sqrt((alpha_s^2 lam_i + sigma_s^2) / (alpha_t^2 lam_i + sigma_t^2)) ) Q^T,   cov = Q diag(lam) Q^T.

    In the eigenbasis the coordinates decouple, and a 1-D Gaussian PF-ODE keeps the standardised value
    ``(z - alpha mu) / sqrt(alpha^2 lam + sigma^2)`` constant (it transports Gaussian to Gaussian monotonically).
    """
    (a_t, s_t), (a_s, s_s) = alpha_sigma(t), alpha_sigma(s)
    lam, q = torch.linalg.eigh(cov.to(F64))
    return q @ torch.diag(torch.sqrt((a_s**2 * lam + s_s**2) / (a_t**2 * lam + s_t**2))) @ q.T


def gaussian_consistency_expectation(mu: torch.Tensor, cov: torch.Tensor, grid: int, boundary: bool = True) -> float:
    """Closed form of ``E[loss_consistency]`` of ``codi_loss`` when online = target = ODE model = the exact denoiser of
    ``N(mu, cov)`` (x-space, DDIM eps, index ``i ~ U{1..N-1}``, ``t = i k``, ``s = (i-1) k``):

        f(z, t) = F_t z + h_t,   z_s = D z_t + e (DDIM, no boundary),   f(z_s, s) = F_s z_s + h_s
        diff = (F_t - F_s D) z_t + (h_t - F_s e - h_s),   z_t ~ N(alpha_t mu, alpha_t^2 cov + sigma_t^2 I)
        E|diff|^2 / dim = (|E diff|^2 + tr(Mat C Mat^T)) / dim,   averaged over the N - 1 indices.
    """
    dim = mu.shape[0]
    k = 1000 // grid
    total = 0.0
    for i in range(1, grid):
        t, s = i * k, (i - 1) * k
        a_t, s_t = alpha_sigma(t)
        f_t, h_t = gaussian_denoiser_affine(mu, cov, t, boundary)
        f_s, h_s = gaussian_denoiser_affine(mu, cov, s, boundary)
        d_mat, e = ddim_step_affine(t, s, gaussian_denoiser_affine(mu, cov, t, False))
        mat = f_t - f_s @ d_mat
        shift = h_t - f_s @ e - h_s
        mean = mat @ (a_t * mu) + shift
        cov_z = a_t**2 * cov + s_t**2 * torch.eye(dim, dtype=F64)
        total += float(mean @ mean + torch.trace(mat @ cov_z @ mat.T)) / dim
    return total / (grid - 1)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased (U-statistic) squared energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` (0 iff same law)."""
    x, y = x.to(F64), y.to(F64)
    n, m = x.shape[0], y.shape[0]
    dxy = torch.cdist(x, y).mean()
    dxx = torch.cdist(x, x).sum() / (n * (n - 1))
    dyy = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * dxy - dxx - dyy)


def sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample mean and unbiased covariance of ``x [n, D]``."""
    x = x.to(F64)
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


def mean_cov_standard_errors(cov: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte-Carlo standard errors of the sample mean (``sqrt(S_ii / n)``) and sample covariance entries
    (Gaussian: ``Var(S_ij) = (S_ij^2 + S_ii S_jj) / n``) for ``n`` samples of a law with covariance ``cov``."""
    diag = torch.diagonal(cov)
    return torch.sqrt(diag / n), torch.sqrt((cov**2 + diag[:, None] * diag[None, :]) / n)


def sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    lam, q = torch.linalg.eigh(matrix)
    return q @ torch.diag(lam.clamp(min=0).sqrt()) @ q.T


def log_ratio_slope(ns, values) -> float:
    """Least-squares slope of ``log(values)`` against ``log(ns)``."""
    lx = torch.tensor([math.log(n) for n in ns], dtype=F64)
    ly = torch.tensor([math.log(v) for v in values], dtype=F64)
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float((lx * ly).sum() / (lx * lx).sum())
