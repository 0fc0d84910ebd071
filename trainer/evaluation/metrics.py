"""Image metrics of the quality report, on images in ``[0, 1]`` (data range 1), per image.

* **PSNR** ``10 log10(1 / MSE)`` over all pixels and channels (identical images: ``inf``, or ``cap_db``).
* **masked PSNR**: the same over the pixels where ``mask == 1`` (inpainting: the pixels to fill).
* **SSIM** (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, computed per channel on the
  valid region (no padding) and averaged, as in the authors' reference code; equal to scikit-image's
  ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` (a test checks it).
  torchmetrics 1.9 also averages over reflect-padded borders and differs in the third decimal.
* **edge F1** of two binary edge maps with a tolerance of 1 pixel (an edge pixel counts as matched when the other map
  has an edge within that Chebyshev distance, as in the BSDS benchmark); the edges come from
  :func:`canny_edge_detector`, the same Canny the ``canny`` hints are made with.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ccd_sampler.hints import canny_hint

SSIM_KERNEL, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
EDGE_TOLERANCE = 1


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"expected images [B, C, H, W] or [C, H, W], got shape {tuple(x.shape)}")
    return x.to(torch.float64)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0,
         cap_db: float | None = None) -> torch.Tensor:
    """Per-image PSNR ``[B]`` in dB: ``10 log10(data_range^2 / MSE)`` over all pixels and channels. Identical images
    give ``inf`` (or ``cap_db`` when given; every value is clamped to at most ``cap_db``)."""
    pred, target = _as_batch(pred), _as_batch(target)
    if pred.shape != target.shape:
        raise ValueError(f"psnr: shapes differ {tuple(pred.shape)} vs {tuple(target.shape)}")
    mse = (pred - target).pow(2).flatten(1).mean(1)
    out = 10.0 * torch.log10(data_range ** 2 / mse)  # mse == 0 -> inf
    return out if cap_db is None else out.clamp(max=cap_db)


def masked_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, data_range: float = 1.0,
                cap_db: float | None = None) -> torch.Tensor:
    """Per-image PSNR ``[B]`` over the pixels where ``mask == 1`` only (``mask`` ``[B, 1, H, W]`` / ``[1, H, W]``, all
    channels of a masked pixel count). ``nan`` for an image whose mask is empty."""
    pred, target, mask = _as_batch(pred), _as_batch(target), _as_batch(mask)
    if mask.shape[1] != 1 or mask.shape[-2:] != pred.shape[-2:] or mask.shape[0] != pred.shape[0]:
        raise ValueError(f"masked_psnr: mask {tuple(mask.shape)} does not fit images {tuple(pred.shape)}")
    m = (mask > 0.5).to(pred.dtype).expand_as(pred)
    count = m.flatten(1).sum(1)
    mse = ((pred - target).pow(2) * m).flatten(1).sum(1) / count
    out = torch.where(count > 0, 10.0 * torch.log10(data_range ** 2 / mse), torch.full_like(count, float("nan")))
    return out if cap_db is None else out.clamp(max=cap_db)


def _gaussian_window(size: int, sigma: float, dtype) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, kernel_size: int = SSIM_KERNEL,
         sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Per-image SSIM ``[B]`` (Gaussian window, computed per channel on the valid region and averaged). Images
    smaller than the window use the largest odd window that fits."""
    pred, target = _as_batch(pred), _as_batch(target)
    if pred.shape != target.shape:
        raise ValueError(f"ssim: shapes differ {tuple(pred.shape)} vs {tuple(target.shape)}")
    size = min(kernel_size, min(pred.shape[-2:]))
    size -= (size + 1) % 2  # odd
    channels = pred.shape[1]
    window = _gaussian_window(size, sigma, pred.dtype).expand(channels, 1, size, size).contiguous()

    def blur(x):
        return F.conv2d(x, window, groups=channels)

    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = blur(pred), blur(target)
    sxx = blur(pred * pred) - mu_x ** 2
    syy = blur(target * target) - mu_y ** 2
    sxy = blur(pred * target) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return ssim_map.flatten(1).mean(1)


def _dilate(edges: torch.Tensor, radius: int) -> torch.Tensor:
    if radius <= 0:
        return edges
    return F.max_pool2d(edges.float().unsqueeze(1), 2 * radius + 1, stride=1, padding=radius).squeeze(1) > 0.5


def edge_f1(pred_edges: torch.Tensor, target_edges: torch.Tensor, tolerance: int = EDGE_TOLERANCE) -> torch.Tensor:
    """Per-image F1 ``[B]`` of binary edge maps ``[B, H, W]`` (or ``[H, W]``). Precision: the share of predicted
    edge pixels with a target edge within ``tolerance`` pixels (Chebyshev distance); recall the other way round.
    Two empty maps agree perfectly (F1 = 1); one empty map gives 0."""
    p, t = torch.as_tensor(pred_edges).bool(), torch.as_tensor(target_edges).bool()
    if p.ndim == 2:
        p, t = p.unsqueeze(0), t.unsqueeze(0)
    if p.shape != t.shape or p.ndim != 3:
        raise ValueError(f"edge_f1: expected two [B, H, W] maps of one shape, got {tuple(p.shape)} / {tuple(t.shape)}")
    n_p, n_t = p.flatten(1).sum(1).double(), t.flatten(1).sum(1).double()
    precision = (p & _dilate(t, tolerance)).flatten(1).sum(1).double() / n_p.clamp(min=1)
    recall = (t & _dilate(p, tolerance)).flatten(1).sum(1).double() / n_t.clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(precision))
    both_empty = (n_p == 0) & (n_t == 0)
    return torch.where(both_empty, torch.ones_like(f1), f1)


def canny_edge_detector(**kwargs) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """``(detector, description)``: images ``[B, 3, H, W]`` in [0, 1] -> bool edges ``[B, H, W]`` by
    ``ccd_sampler.hints.canny_hint``, the hint builder, with the thresholds among ``kwargs`` (e.g. an adapter's
    ``hint_preprocessing``; other keys are ignored)."""
    used = {k: kwargs[k] for k in ("low_threshold", "high_threshold") if k in kwargs}

    def detect(images: torch.Tensor) -> torch.Tensor:
        return canny_hint(images.float().clamp(0, 1), **used)[:, 0] > 0.5

    return detect, f"ccd_sampler.hints.canny_hint({', '.join(f'{k}={v}' for k, v in used.items())})"
